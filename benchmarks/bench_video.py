"""Video speed on the CPU: frames a second through decode, detect, track, smooth and classify.

A synthetic 640x480 clip with one real face (scikit-image's astronaut portrait, drifting a little,
fresh noise every frame) is written as MJPG .avi, then read with `VideoRecognizer.frames`, the code
`ferkit predict clip.avi` runs. The rate is video frames covered a second of wall time, so with
`--every N` it says how fast a long file goes when only every Nth frame is read by the model (every
frame is still decoded). Run it alone on the machine: the figure is the machine's.

    .venv/bin/python benchmarks/bench_video.py                           # default model and detector; every 1, 2, 5
    .venv/bin/python benchmarks/bench_video.py --json docs/results/video/bench_video.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ferkit.faces import DEFAULT_DETECT_MAX_SIDE
from ferkit.predict import EmotionRecognizer
from ferkit.video import VideoRecognizer


def cpu_flags() -> dict[str, Any]:
    """The CPU's model name and the vector extensions that matter to PyTorch and OpenCV."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
    return {"model": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def write_clip(path: Path, frames: int, fps: int = 30, seed: int = 0) -> Path:
    """A 640x480 MJPG clip: the astronaut's face drifting by a few pixels, with per-frame noise."""
    try:
        from skimage.data import astronaut
    except ImportError:
        sys.exit("the benchmark needs scikit-image for its face (pip install -e '.[dev]')")
    portrait = cv2.cvtColor(cv2.resize(astronaut(), (640, 640), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (640, 480))
    for i in range(frames):
        dx = int(8 * np.sin(i / 15))
        frame = np.roll(portrait[:480], dx, axis=1)
        writer.write(np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8))
    writer.release()
    return path


def frames_per_second(video: VideoRecognizer, clip: Path, every: int, repeats: int) -> dict[str, Any]:
    """Best of `repeats` passes over the clip: video frames covered a second, and faces found."""
    best, faces = 0.0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        frames = list(video.frames(clip, every=every))
        elapsed = time.perf_counter() - start
        covered = frames[-1].frame + 1
        best = max(best, covered / elapsed)
        faces = sum(len(f.faces) for f in frames)
    return {"every": every, "frames_per_s": round(best, 1), "sampled": len(frames), "faces": faces,
            "tracks": len({face.track for f in frames for face in f.faces})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="model (default: the shipped default)")
    parser.add_argument("--detector", default=None, help="detector (default: EmotionRecognizer's default)")
    parser.add_argument("--detect-max-side", type=int, default=DEFAULT_DETECT_MAX_SIDE)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--frames", type=int, default=300, help="clip length (default: 300, 10 s at 30 fps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    options: dict[str, Any] = {"device": "cpu", "detect_max_side": args.detect_max_side or None}
    if args.detector:
        options["detector"] = args.detector
    recognizer = EmotionRecognizer(args.weights, **options)
    video = VideoRecognizer(recognizer)
    result: dict[str, Any] = {
        "cpu": cpu_flags(), "python": platform.python_version(), "torch": torch.__version__,
        "opencv": cv2.__version__, "model": recognizer.backend.path.name, "views": recognizer.meta.views,
        "detector": type(recognizer.detector).__name__, "detect_max_side": args.detect_max_side,
        "clip": f"640x480, {args.frames} frames at 30 fps, MJPG, one face", "runs": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.avi", args.frames)
        list(video.frames(clip, every=1))  # warm-up: model, detector, decoder
        for every in args.every:
            run = frames_per_second(video, clip, every, args.repeats)
            result["runs"].append(run)
            print(f"every {every}: {run['frames_per_s']:7.1f} frames/s  ({run['sampled']} frames sampled, "
                  f"{run['faces']} faces, {run['tracks']} track{'s' * (run['tracks'] != 1)})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
