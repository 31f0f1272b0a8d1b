"""Drawing results onto images: a box per face and its label with the label's probability."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .images import to_bgr
from .outputs import check_output_file
from .predict import FaceResult

COLORS_BGR: dict[str, tuple[int, int, int]] = {
    "angry": (40, 40, 230), "disgust": (40, 150, 40), "fear": (180, 80, 160), "happy": (30, 200, 250),
    "sad": (200, 120, 30), "surprise": (250, 200, 60), "neutral": (200, 200, 200),
}
WRITABLE_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def draw_results(bgr: np.ndarray, results: Sequence[FaceResult]) -> np.ndarray:
    """Draw each face's box and "label 87%" onto a BGR uint8 image, in place; returns it.

    A tracked face (video, camera) reads "#3 label 87%": its track id and smoothed label.
    """
    height, width = bgr.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    for result in results:
        x, y, w, h = result.box
        color = COLORS_BGR.get(result.label, (0, 255, 0))
        cv2.rectangle(bgr, (x, y), (x + w - 1, y + h - 1), color, thickness)
        text = f"{result.label} {result.probabilities[result.label]:.0%}"
        if result.track is not None:
            text = f"#{result.track} {text}"
        scale = label_scale(height, width, w)
        # Strokes as thick as the font is large, not as the box's line: a thick stroke on a small font is a blob.
        stroke = max(1, round(scale * 1.5))
        (text_w, text_h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, stroke)
        pad = max(2, round(text_h / 6))
        top = y - text_h - base - pad if y - text_h - base - pad >= 0 else y + h  # above the box, else below it
        cv2.rectangle(bgr, (x, top), (x + text_w + 2 * pad, top + text_h + base + pad), color, cv2.FILLED)
        cv2.putText(bgr, text, (x + pad, top + text_h + pad // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), stroke,
                    cv2.LINE_AA)
    return bgr


def label_scale(height: int, width: int, box_width: int) -> float:
    """The font scale of a label: with the face's box (a small face, a small label) but at least 1.6% of the
    image's shorter side tall, so that a label stays readable on a large photo seen whole (an 8000x6000 photo:
    about 96 px), and never over 4% of it. OpenCV's font scale 1 is about 22 px tall."""
    shorter = min(height, width)
    smallest, largest = max(0.4, 0.016 * shorter / 22), max(0.4, 0.04 * shorter / 22)
    return min(max(box_width / 160, smallest), largest)


def annotated_image_path(out: str | os.PathLike[str]) -> Path:
    """`out`, or `out` with a .png suffix where OpenCV cannot write its format."""
    out = Path(out)
    return out if out.suffix.lower() in WRITABLE_IMAGE_SUFFIXES else out.with_name(out.name + ".png")


def write_annotated_image(image: np.ndarray, results: Sequence[FaceResult], out: str | os.PathLike[str]) -> Path:
    """Write a copy of a gray or RGB uint8 image with its results drawn; returns the path written."""
    path = check_output_file(annotated_image_path(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), draw_results(to_bgr(image), results)):
        raise OSError(f"{path}: OpenCV could not write this image")
    return path
