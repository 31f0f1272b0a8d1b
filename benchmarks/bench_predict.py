"""Prediction speed: crops per second (PyTorch and onnxruntime) and end-to-end latency of one photo.

- Throughput: batches of 48x48 uint8 crops through `EmotionRecognizer.logits` (preprocessing, the
  weights' test-time augmentation and the model; no detection), for each weights given.
- Latency: `EmotionRecognizer.predict` on one 640x480 RGB photo with one face (scikit-image's
  astronaut portrait, resized), detection included: median and p95, from an in-memory array and
  from a JPEG file (decoding included).

    .venv/bin/python benchmarks/bench_predict.py                      # ferkit-refcnn and the default model
    .venv/bin/python benchmarks/bench_predict.py --weights ferkit-refcnn --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ferkit.export import export_model
from ferkit.faces import find_faces
from ferkit.predict import EmotionRecognizer
from ferkit.weights import WeightsError, resolve_weights


def photo_640x480() -> np.ndarray:
    """A real 640x480 RGB photograph with one face: the astronaut, resized to 640 wide, top 480 rows."""
    try:
        from skimage.data import astronaut
    except ImportError:
        sys.exit("the latency benchmark needs scikit-image (pip install -e '.[dev]')")
    return np.ascontiguousarray(cv2.resize(astronaut(), (640, 640), interpolation=cv2.INTER_AREA)[:480])


def crops_per_second(logits: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, batch: int,
                     seconds: float) -> float:
    """Best rate over repeated passes of `crops` in batches of `batch`, for about `seconds` in all."""
    logits(crops[:batch])  # warm-up: allocation, kernel choice
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        for i in range(0, len(crops), batch):
            logits(crops[i : i + batch])
        best = max(best, len(crops) / (time.perf_counter() - start))
    return best


def latency_ms(run: Callable[[], object], runs: int) -> dict[str, float]:
    for _ in range(5):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
            "min_ms": float(np.min(times))}


def bench_weights(name: str, args: argparse.Namespace, crops: np.ndarray, image: np.ndarray, jpeg: Path,
                  workdir: Path) -> dict[str, Any]:
    path = resolve_weights(name)
    onnx_path = export_model(path, workdir / f"{path.stem}-{abs(hash(str(path)))}.onnx")
    result: dict[str, Any] = {"weights": name, "path": str(path)}
    for backend, weights in (("torch", path), ("onnxruntime", onnx_path)):
        recognizer = EmotionRecognizer(weights, device="cpu")
        result["views"] = recognizer.meta.views
        result["arch"] = recognizer.meta.arch
        result[f"{backend}_crops_per_s"] = crops_per_second(recognizer.logits, crops, args.batch_size, args.seconds)
        faces = recognizer.predict(image)
        if len(faces) != 1:
            print(f"warning: {len(faces)} faces found in the benchmark photo", file=sys.stderr)
        result[f"{backend}_photo"] = latency_ms(lambda r=recognizer: r.predict(image), args.runs)
        result[f"{backend}_photo_jpeg"] = latency_ms(lambda r=recognizer: r.predict(jpeg), args.runs)
        if backend == "torch":
            detector = recognizer.detector
            assert detector is not None
            result["detection_only"] = latency_ms(lambda d=detector: find_faces(image, d), args.runs)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=["ferkit-refcnn", "default"],
                        help="shipped names, weights files or run folders (default: ferkit-refcnn, the default)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--crops", type=int, default=4096, help="crops per timed pass")
    parser.add_argument("--seconds", type=float, default=5.0, help="time spent on each throughput figure")
    parser.add_argument("--runs", type=int, default=200, help="photos per latency figure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (args.crops, 48, 48), dtype=np.uint8)  # speed does not depend on content
    image = photo_640x480()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = Path(tmp) / "photo.jpg"
        cv2.imwrite(str(jpeg), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        seen: dict[Path, str] = {}
        for name in args.weights:
            try:
                path = resolve_weights(None if name == "default" else name)
            except WeightsError as err:
                print(f"skipping {name}: {err}", file=sys.stderr)
                continue
            if path in seen:
                results.append({"weights": name, "same_as": seen[path], "path": str(path)})
                continue
            seen[path] = name
            results.append(bench_weights(name if name != "default" else str(path), args, crops, image, jpeg,
                                         Path(tmp)))
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
               "torch": torch.__version__, "opencv": cv2.__version__, "batch_size": args.batch_size}
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return 0
    print(f"machine: {machine}")
    print(f"{'weights':<28}{'views':>6}{'torch crops/s':>15}{'ort crops/s':>13}"
          f"{'photo torch ms (med/p95)':>26}{'photo ort ms (med/p95)':>24}{'jpeg torch ms':>15}{'detect ms':>11}")
    for r in results:
        if "same_as" in r:
            print(f"{r['weights']:<28} same file as {r['same_as']} ({r['path']})")
            continue
        torch_photo, ort_photo = r["torch_photo"], r["onnxruntime_photo"]
        print(f"{Path(r['weights']).name[:27]:<28}{r['views']:>6}{r['torch_crops_per_s']:>15.0f}"
              f"{r['onnxruntime_crops_per_s']:>13.0f}"
              f"{torch_photo['median_ms']:>15.1f} / {torch_photo['p95_ms']:<8.1f}"
              f"{ort_photo['median_ms']:>13.1f} / {ort_photo['p95_ms']:<8.1f}"
              f"{r['torch_photo_jpeg']['median_ms']:>15.1f}{r['detection_only']['median_ms']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
