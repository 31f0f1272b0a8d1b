"""A corpus through ferkit and `fer`: images/s, frames/s, peak memory, faces found and labels right, in one run.

The corpus is generated: N 640x480 photos in nested folders, each with 1 or 2 FER-2013 PrivateTest faces
(upscaled to 80-200 px, pasted at known places on varied backgrounds: three in four are random crops of
scikit-image's face-free photos (brick, coffee, gravel, the Hubble deep field...; scaled, flipped, tinted),
the others colour gradients with plain shapes; noise on all), and a video of 640x480 at 25 fps in which
faces drift across scenes of 4 s on the same backgrounds. The pasted places and classes are the truth: a face
is found when a returned box's centre lies inside its pasted square (one box per face), and its label is
right when that box's label is the face's FER-2013 class; both are counted over all pasted faces.
(PrivateTest faces: nothing here chooses a setting.)

Measured, each as a separate process (wall clock, CPU time / wall, and peak RSS from `os.wait4`):
- `ferkit predict DIR --output out.parquet` (the whole command, start-up included), with every core
  and with `--workers 1`; with `--engine ray` too when this ferkit has it (a local Ray; its workers are
  Ray's processes, not the command's children, so their CPU and memory are not in its figures); and
  `ferkit predict DIR --json`, the path to stdout that came before `--output`;
- `fer` in its own virtual environment (benchmarks/peers_fer.py `photos`): `detect_emotions` on each
  photo, timed over the loop only (its import and model load left out), as in benchmarks/peers.py;
- `ferkit predict VIDEO --output v.parquet` on the first `--short-video` seconds and the whole video: frames/s
  and peak RSS, which should not grow with the video's length.

    cpu-alone .venv/bin/python benchmarks/corpus.py --data ../shared/data/fer2013 --photos 2000 \\
        --video-seconds 600 --short-video 120 --output docs/results/corpus/corpus.json \\
        > docs/results/corpus/corpus.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fer_photos import background, fer_faces, read_gray
from ferkit.labels import EMOTIONS

Box = tuple[int, int, int, int]
FER_WORKER = Path(__file__).resolve().parent / "peers_fer.py"
FPS = 25.0


NATURAL = ("brick", "coffee", "coins", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "moon",
           "rocket", "cell", "clock", "page", "text", "colorwheel", "retina")
"""scikit-image's bundled photos without a human (or cat) face: backgrounds with the texture of real photos."""


def natural_photos() -> list[np.ndarray]:
    from skimage import data, img_as_ubyte

    photos = []
    for name in NATURAL:
        image = img_as_ubyte(getattr(data, name)())
        photos.append(np.repeat(image[..., None], 3, 2) if image.ndim == 2 else image[..., :3])
    return photos


def varied_background(rng: np.random.Generator, naturals: list[np.ndarray], width: int = 640, height: int = 480
                      ) -> np.ndarray:
    """Three times in four a random crop of a real photo (scaled, flipped, tinted), else a gradient with plain shapes;
    noise on both. No two alike, no face in any."""
    if rng.random() < 0.75:
        source = naturals[int(rng.integers(len(naturals)))]
        scale = max(width / source.shape[1], height / source.shape[0]) * rng.uniform(1.0, 2.0)
        big = cv2.resize(source, (int(np.ceil(source.shape[1] * scale)), int(np.ceil(source.shape[0] * scale))))
        x, y = int(rng.integers(0, big.shape[1] - width + 1)), int(rng.integers(0, big.shape[0] - height + 1))
        canvas = big[y : y + height, x : x + width].astype(np.float32)
        if rng.random() < 0.5:
            canvas = canvas[:, ::-1]
        canvas = canvas * rng.uniform(0.8, 1.2, 3)
    else:
        canvas = background(width, height, seed=int(rng.integers(1 << 30))).astype(np.float32)
        canvas = canvas * rng.uniform(0.6, 1.4, 3) + rng.uniform(-40, 40, 3)
        for _ in range(int(rng.integers(0, 5))):
            colour = rng.uniform(0, 255, 3).tolist()
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            if rng.random() < 0.5:
                cv2.rectangle(canvas, (x, y), (x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))), colour,
                              -1)
            else:
                cv2.line(canvas, (x, y), (int(rng.integers(0, width)), int(rng.integers(0, height))), colour,
                         int(rng.integers(2, 12)))
    return np.clip(canvas + rng.normal(0, 4, canvas.shape), 0, 255).astype(np.uint8)


def place(rng: np.random.Generator, count: int, width: int = 640, height: int = 480) -> list[Box]:
    """`count` squares of 80-200 px that do not overlap."""
    boxes: list[Box] = []
    while len(boxes) < count:
        side = int(rng.integers(80, 201))
        box = (int(rng.integers(0, width - side)), int(rng.integers(0, height - side)), side, side)
        if all(box[0] + box[2] < b[0] or b[0] + b[2] < box[0] or box[1] + box[3] < b[1] or b[1] + b[3] < box[1]
               for b in boxes):
            boxes.append(box)
    return boxes


def paste(canvas: np.ndarray, face: np.ndarray, box: Box) -> None:
    x, y, w, h = box
    canvas[y : y + h, x : x + w] = cv2.resize(face, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]


def test_faces(data: Path) -> list[tuple[np.ndarray, str]]:
    return [(read_gray(path), cls) for cls in EMOTIONS for path in fer_faces(data, cls)]


def build_photos(folder: Path, count: int, data: Path, seed: int = 0) -> dict[str, Any]:
    """The photos and their truth ({relative path: [[x, y, w, h, class], ...]}), made once per folder."""
    truth_file = folder / "truth.json"
    if truth_file.is_file():
        return dict(json.loads(truth_file.read_text()))
    rng = np.random.default_rng(seed)
    faces, naturals = test_faces(data), natural_photos()
    order = rng.permutation(len(faces))
    truth, used = {}, 0
    for n in range(count):
        canvas = varied_background(rng, naturals)
        boxes = place(rng, 1 if rng.random() < 0.7 else 2)
        entries = []
        for box in boxes:
            face, cls = faces[order[used % len(faces)]]
            used += 1
            paste(canvas, face, box)
            entries.append([*box, cls])
        relative = Path(f"set{n % 4}") / f"part{(n // 4) % 5}" / f"photo{n:06d}.jpg"
        (folder / "photos" / relative.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(folder / "photos" / relative, quality=90)
        truth[str(relative)] = entries
    truth_file.write_text(json.dumps(truth))
    return truth


def build_video(path: Path, seconds: float, data: Path, seed: int = 1) -> Path:
    """A 640x480 25 fps mp4 of scenes of 4 s, each with 1-2 faces drifting across a background; made once."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    faces, naturals = test_faces(data), natural_photos()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FPS, (640, 480))
    frames, scene = int(seconds * FPS), int(4 * FPS)
    for start in range(0, frames, scene):
        ground = varied_background(rng, naturals)
        boxes = place(rng, 1 if rng.random() < 0.6 else 2)
        chosen = [faces[int(rng.integers(len(faces)))][0] for _ in boxes]
        drift = rng.uniform(-1.0, 1.0, (len(boxes), 2))
        for t in range(min(scene, frames - start)):
            canvas = ground.copy()
            for face, (x, y, w, h), (dx, dy) in zip(chosen, boxes, drift, strict=True):
                nx = int(np.clip(x + dx * t, 0, 640 - w))
                ny = int(np.clip(y + dy * t, 0, 480 - h))
                paste(canvas, face, (nx, ny, w, h))
            writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def run(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall seconds, CPU % (user + system over wall) and peak RSS (MB) of one process, and its output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode:
        raise SystemExit(f"{' '.join(command[:6])} failed ({process.returncode}): {stderr[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 2), "cpu_percent": round(100 * cpu / wall),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "stdout": stdout, "stderr": stderr}


def score(truth: dict[str, Any], found: dict[str, list[list[Any]]]) -> dict[str, Any]:
    """Faces found and labels right, each over all pasted faces; `found`: {relative path: [[x, y, w, h, label]]}."""
    faces = found_count = right = 0
    for relative, entries in truth.items():
        boxes = list(found.get(relative, []))
        for x, y, w, h, cls in entries:
            faces += 1
            inside = [b for b in boxes if x <= b[0] + b[2] / 2 <= x + w and y <= b[1] + b[3] / 2 <= y + h]
            if not inside:
                continue
            best = min(inside, key=lambda b: abs(b[0] + b[2] / 2 - x - w / 2) + abs(b[1] + b[3] / 2 - y - h / 2))
            boxes.remove(best)
            found_count += 1
            right += best[4] == cls
    return {"faces": faces, "found": found_count, "found_percent": round(100 * found_count / faces, 1),
            "labels_right": right, "labels_right_percent": round(100 * right / faces, 1)}


def ferkit_found(table: Any, photos: Path) -> dict[str, list[list[Any]]]:
    found: dict[str, list[list[Any]]] = {}
    for row in table[table["face"].notna()].itertuples():
        relative = str(Path(row.path).relative_to(photos))
        found.setdefault(relative, []).append([int(row.x), int(row.y), int(row.w), int(row.h), row.label])
    return found


def ferkit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ferkit", "predict", *args, "--no-progress"]


def has_ray_engine() -> bool:
    done = subprocess.run(ferkit_command("--help"), capture_output=True, text=True, check=False)
    return "--engine" in done.stdout


def read_any(path: Path) -> Any:
    import pandas as pd

    import ferkit

    return ferkit.read_results(path) if path.is_file() else pd.read_parquet(path)


def photo_runs(args: argparse.Namespace, folder: Path, truth: dict[str, Any], work: Path) -> dict[str, Any]:
    photos = folder / "photos"
    count = len(truth)
    runs: dict[str, Any] = {}
    engines = [("ferkit, all cores", ["--output"]), ("ferkit, --workers 1", ["--workers", "1", "--output"])]
    if not args.skip_ray and has_ray_engine():
        engines.append(("ferkit --engine ray (local Ray)", ["--engine", "ray", "--output"]))
    for name, options in engines:
        out = work / f"{len(runs)}.parquet"
        result = run(ferkit_command(str(photos), *options, str(out)))
        result.update(score(truth, ferkit_found(read_any(out), photos)),
                      images_per_s=round(count / result["wall_s"], 1), timed="the whole command")
        runs[name] = result
        print(f"{name}: {result['images_per_s']} images/s", file=sys.stderr, flush=True)
    result = run(ferkit_command(str(photos), "--json"))  # the stdout path, as before --output
    found_json = {str(Path(record["path"]).relative_to(photos)): [[*face["box"], face["label"]]
                                                                  for face in record["faces"]]
                  for record in json.loads(result["stdout"])}
    result.update(score(truth, found_json), images_per_s=round(count / result["wall_s"], 1),
                  timed="the whole command")
    runs["ferkit --json (one process, stdout)"] = result
    if args.fer_python:
        listing = work / "photos.txt"
        listing.write_text("".join(f"{photos / relative}\n" for relative in truth))
        result = run([args.fer_python, str(FER_WORKER), "photos", str(listing), str(work / "fer.json")])
        loop = json.loads(result["stdout"])
        found = {str(Path(path).relative_to(photos)): faces
                 for path, faces in json.loads((work / "fer.json").read_text()).items()}
        result.update(score(truth, found), images_per_s=round(count / loop["wall_s"], 1),
                      cpu_percent=round(100 * loop["cpu_s"] / loop["wall_s"]), loop_wall_s=round(loop["wall_s"], 2),
                      timed="the detect_emotions loop only (import and model loading left out)")
        runs["fer 25.10.3 (detect_emotions per photo)"] = result
    return runs


def video_runs(args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    runs = {}
    for seconds in (args.short_video, args.video_seconds):
        video = build_video(folder / f"video-{seconds:g}s.mp4", seconds, args.data)
        out = work / f"video-{seconds:g}.parquet"
        result = run(ferkit_command(str(video), "--output", str(out)))
        frames = int(read_any(out)["frame"].nunique())
        result.update(frames=frames, frames_per_s=round(frames / result["wall_s"], 1),
                      table_mb=round(out.stat().st_size / 2**20, 1), timed="the whole command")
        runs[f"ferkit, a {seconds:g} s video"] = result
        print(f"video {seconds:g} s: {result['frames_per_s']} frames/s, {result['peak_rss_mb']} MB", file=sys.stderr,
              flush=True)
    return runs


def table(result: dict[str, Any]) -> str:
    lines = ["| | wall s | images/s | CPU | peak RSS | faces found | labels right (of all faces) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["photos"].items():
        lines.append(f"| {name} | {r.get('loop_wall_s', r['wall_s'])} | {r['images_per_s']} | {r['cpu_percent']}% | "
                     f"{r['peak_rss_mb']} MB | {r['found_percent']}% | {r['labels_right_percent']}% |")
    lines += ["", "| video | frames | wall s | frames/s | CPU | peak RSS | table |", "|---|---|---|---|---|---|---|"]
    for name, r in result["videos"].items():
        lines.append(f"| {name} | {r['frames']} | {r['wall_s']} | {r['frames_per_s']} | {r['cpu_percent']}% | "
                     f"{r['peak_rss_mb']} MB | {r['table_mb']} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FERKIT_DATA", "../shared/data/fer2013")))
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "ferkit-corpus",
                        help="where the corpus is generated (once; reused after)")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--video-seconds", type=float, default=600)
    parser.add_argument("--short-video", type=float, default=120)
    parser.add_argument("--fer-python", default="/work/venv-fer/bin/python", help="python of fer's own venv ('' skips)")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-videos", action="store_true")
    parser.add_argument("--output", type=Path, help="JSON of every figure")
    args = parser.parse_args()
    folder = args.folder / f"photos-{args.photos}"
    folder.mkdir(parents=True, exist_ok=True)
    truth = build_photos(folder, args.photos, args.data)
    faces = sum(len(entries) for entries in truth.values())
    with tempfile.TemporaryDirectory(prefix="corpus-bench-") as tmp:
        result: dict[str, Any] = {"photos": photo_runs(args, folder, truth, Path(tmp))}
        result["videos"] = {} if args.skip_videos else video_runs(args, args.folder, Path(tmp))
    for runs in result.values():
        for r in runs.values():
            r.pop("stdout", None)
            r["stderr"] = r["stderr"][-500:]
    ours, fer = result["photos"]["ferkit, all cores"], result["photos"].get("fer 25.10.3 (detect_emotions per photo)")
    result["corpus"] = {"photos": args.photos, "faces": faces, "size": "640x480", "video_fps": FPS,
                        "cores": len(os.sched_getaffinity(0))}
    if fer:
        result["speedup_over_fer"] = round(ours["images_per_s"] / fer["images_per_s"], 2)
    print(f"{args.photos} generated 640x480 photos with {faces} pasted FER-2013 PrivateTest faces; "
          f"{result['corpus']['cores']} cores\n")
    print(table(result))
    if fer:
        print(f"\nferkit (whole command, all cores) / fer (loop only): {result['speedup_over_fer']}x images/s")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
