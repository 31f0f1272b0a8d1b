"""The Ray engine on one node: throughput, memory per actor, against the local engine on the same photos.

Builds N generated 640x480 photos (1-2 pasted FER-2013 PrivateTest faces on varied backgrounds, one in five
without a face), then runs, each as a whole command (`python -m ferkit predict DIR --output OUT.parquet
--no-progress`): the local engine, and `--engine ray` (a local Ray, started by the command: one node, an actor
a core). The Ray engine's throughput per node is the rate it reports from its first rows to its last (Ray's
start and the actors' loading come before the first rows, and are reported apart). While each command runs,
every process of its tree is read from /proc twice a second: the peak RSS of each actor (`ray::MapWorker...`),
the largest sum of RSS over the tree, and the CPU time of the tree (each process's last reading), since Ray's
workers are not the command's own children and its rusage does not count them.

    cpu-alone python benchmarks/scale.py --photos 1000 --output docs/results/scale/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fer_photos import background, fer_faces, photo, read_gray

CLOCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def build_photos(folder: Path, count: int, data: Path, seed: int = 0) -> Path:
    """`count` photos in nested folders, 1-2 PrivateTest faces each, at random places and sizes."""
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == count:
        return folder
    rng = np.random.default_rng(seed)
    faces = [read_gray(p) for cls in ("angry", "happy", "sad", "surprise", "neutral")
             for p in fer_faces(data, cls)[:40]]
    for i in range(count):
        side = [int(rng.integers(110, 200)) for _ in range(1 + i % 2)]
        boxes = [(int(rng.integers(0, 300 - side[0])), int(rng.integers(0, 480 - side[0])), side[0], side[0])]
        if len(side) > 1:
            boxes.append((int(rng.integers(330, 640 - side[1])), int(rng.integers(0, 480 - side[1])), side[1], side[1]))
        chosen = [faces[int(k)] for k in rng.integers(0, len(faces), len(boxes))]
        image = photo(chosen, boxes, seed=i) if i % 5 else background(seed=i)  # one in five without a face
        target = folder / f"d{i % 7}" / f"e{i % 3}" / f"p{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target, quality=90)
    return folder


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _read(pid: int) -> tuple[str, int, float] | None:
    """(process title, RSS bytes, CPU seconds) of a live process."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return None
    return title, rss, (int(fields[11]) + int(fields[12])) / CLOCK


def measure(command: list[str]) -> dict[str, Any]:
    """Run `command`, reading its process tree twice a second; wall, CPU %, peak RSS of the tree and of each actor."""
    cpu: dict[int, float] = {}
    actor_peak: dict[int, int] = {}
    tree_peak = 0
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()
    out: dict[str, str] = {}

    def collect() -> None:
        out["stdout"], out["stderr"] = process.communicate()
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    while not done.wait(0.5):
        total = 0
        for pid in _tree(process.pid):
            reading = _read(pid)
            if reading is None:
                continue
            title, rss, seconds = reading
            total += rss
            cpu[pid] = max(cpu.get(pid, 0.0), seconds)
            if "MapWorker" in title:
                actor_peak[pid] = max(actor_peak.get(pid, 0), rss)
        tree_peak = max(tree_peak, total)
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(command[:8])} failed ({process.returncode}): {out['stderr'][-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_percent": round(100 * sum(cpu.values()) / wall),
            "peak_rss_tree_mb": round(tree_peak / 2**20),
            "actors": len(actor_peak), "actor_peak_rss_mb": sorted(round(v / 2**20) for v in actor_peak.values()),
            "stderr_last_line": out["stderr"].strip().splitlines()[-1] if out["stderr"].strip() else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FERKIT_DATA", "../shared/data/fer2013")))
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "ferkit-scale")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    photos = build_photos(args.folder / f"photos-{args.photos}", args.photos, args.data, seed=1)
    ferkit = [sys.executable, "-m", "ferkit", "predict"]
    runs: dict[str, Any] = {}
    for name, extra in (("local engine (all cores)", []), ("ray engine (local Ray: 1 node, an actor a core)",
                                                             ["--engine", "ray"])):
        out = args.folder / f"out-{len(runs)}.parquet"
        out.unlink(missing_ok=True)
        result = measure([*ferkit, str(photos), *extra, "--output", str(out), "--no-progress"])
        result.update(photos=args.photos, images_per_s=round(args.photos / result["wall_s"], 1), timed="whole command")
        reported = re.search(r"the first rows after ([\d.]+) s, then ([\d.]+) inputs/s", result["stderr_last_line"])
        if reported:
            result.update(first_rows_s=float(reported[1]), images_per_s_once_running=float(reported[2]))
        runs[name] = result
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    report = {"photos": args.photos, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": runs,
              "command": " ".join(["cpu-alone", "python", *sys.argv])}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
