"""Test photos made from real FER-2013 faces: upscaled faces pasted onto larger backgrounds at known places.

Shared by the tests of face detection, prediction and the CLI, and by the benchmarks; nothing here is a test.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

Box = tuple[int, int, int, int]


def fer_faces(data_root: Path, cls: str, usage: str = "PrivateTest") -> list[Path]:
    """The image files of one class and Usage of the FER-2013 folder layout, sorted by name."""
    part = "train" if usage == "Training" else "test"
    return sorted((data_root / part / cls).glob(f"{usage}_*.jpg"))


def read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image is not None, path
    return image


def background(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """An RGB background: a smooth colour gradient with mild noise, no face-like structure."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    base = 70 + 60 * x * np.array([1.0, 0.6, 0.2]) + 50 * y * np.array([0.2, 0.5, 1.0])
    noisy = base + rng.normal(0, 6, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, face: np.ndarray, box: Box) -> np.ndarray:
    """Paste a gray face, resized to the box's w x h, into an RGB canvas (in place); returns the canvas."""
    x, y, w, h = box
    resized = cv2.resize(face, (w, h), interpolation=cv2.INTER_LINEAR)
    canvas[y : y + h, x : x + w] = resized[..., None]
    return canvas


def photo(faces: list[np.ndarray], boxes: list[Box], width: int = 640, height: int = 480, seed: int = 0
          ) -> np.ndarray:
    """An RGB photo with each face pasted at its box."""
    canvas = background(width, height, seed)
    for face, box in zip(faces, boxes, strict=True):
        paste(canvas, face, box)
    return canvas


def iou(a: Box, b: Box) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    return inter / (aw * ah + bw * bh - inter)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """RGB frames -> an MJPG .avi or mp4v .mp4 file."""
    fourcc = cv2.VideoWriter.fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), fourcc, fps, (width, height))
    assert writer.isOpened(), path
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


ASTRONAUT_FACE: Box = (177, 66, 95, 95)
"""The face in scikit-image's astronaut.png (512x512), as measured with OpenCV's default Haar cascade."""


def model_weights() -> Path:
    """The weights the prediction tests use: the shipped default model.

    $FERKIT_TEST_WEIGHTS overrides it (for working before a model ships); the tests compare the
    model with itself on crops, never with fixed emotions, so any trained model will do.
    """
    import os

    from ferkit.weights import DEFAULT_MODEL, resolve_weights

    return resolve_weights(os.environ.get("FERKIT_TEST_WEIGHTS") or DEFAULT_MODEL)
