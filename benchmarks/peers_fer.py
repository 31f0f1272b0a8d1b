"""The `fer` side of benchmarks/peers.py, run by it as a subprocess in `fer`'s own virtual environment.

`fer` (pip `fer`, Haar cascade + its quantised TFLite mini-Xception) is never a ferkit dependency, so this
file imports nothing of ferkit's. Commands (each prints one JSON object):

- `classify CROPS.npy OUT.npy`: `fer`'s probabilities for uint8 48x48 face crops. The crops go through
  `fer`'s own classification path (`FER._classify_emotions`) prepared exactly as `detect_emotions`
  prepares a face whose box is the whole crop (resize to the model's 64x64, scale to [-1, 1]); the
  public API would round the probabilities to 2 decimals, which ties argmaxes.
- `photo PHOTO.png REPEATS`: seconds per `detect_emotions` call (Haar detection included, `fer`'s
  defaults) on one photo, after warm-up calls, and the faces it found.
- `crops REPEATS`: crops/s of the classifier on 256 random crops at a time.
- `photos LIST OUT.json`: `detect_emotions` on each photo named in the file LIST (one path a line), as
  `fer` is used on a folder; OUT.json gets each photo's faces (box and top emotion), and the loop's wall
  seconds and CPU seconds (this process, every thread) are printed: model loading is left out.
"""

from __future__ import annotations

import json
import sys
import time

import cv2
import numpy as np
from fer.fer import FER

LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""`fer`'s output order: FER-2013's ids, as ferkit's."""
WARMUP = 5


def prepare(crops: np.ndarray) -> np.ndarray:
    resized = np.stack([cv2.resize(c, (64, 64)) for c in crops]).astype(np.float32)
    return (resized / 255.0 - 0.5) * 2.0


def classify(detector: FER, crops: np.ndarray, batch: int = 1024) -> np.ndarray:
    return np.concatenate([np.asarray(detector._classify_emotions(prepare(crops[i : i + batch])), np.float32)
                           for i in range(0, len(crops), batch)])


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    detector = FER()
    labels = [detector._get_labels()[i] for i in range(7)]
    assert tuple(labels) == LABELS, labels
    if command == "classify":
        crops = np.load(args[0], mmap_mode="r")
        np.save(args[1], classify(detector, crops))
        print(json.dumps({"crops": len(crops)}))
    elif command == "photo":
        image = cv2.imread(args[0], cv2.IMREAD_COLOR)
        for _ in range(WARMUP):
            faces = detector.detect_emotions(image)
        seconds = []
        for _ in range(int(args[1])):
            start = time.perf_counter()
            detector.detect_emotions(image)
            seconds.append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds, "faces": [[int(v) for v in f["box"]] for f in faces]}))
    elif command == "photos":
        with open(args[0]) as f:
            paths = [line.strip() for line in f if line.strip()]
        found = {}
        detector.detect_emotions(cv2.imread(paths[0], cv2.IMREAD_COLOR))  # warm-up, as the timing of `photo`
        start, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            faces = detector.detect_emotions(cv2.imread(path, cv2.IMREAD_COLOR))
            found[path] = [[*map(int, f["box"]), max(f["emotions"], key=f["emotions"].get)] for f in faces]
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        with open(args[1], "w") as f:
            json.dump(found, f)
        print(json.dumps({"photos": len(paths), "wall_s": wall, "cpu_s": cpu}))
    elif command == "crops":
        crops = np.random.default_rng(0).integers(0, 256, (256, 48, 48), dtype=np.uint8)
        classify(detector, crops)
        start = time.perf_counter()
        for _ in range(int(args[0])):
            classify(detector, crops)
        print(json.dumps({"crops_per_s": int(args[0]) * len(crops) / (time.perf_counter() - start)}))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
