"""A fixed, seeded robustness benchmark: FER crops as other cameras, lighting and detectors deliver them.

Like ImageNet-C for ImageNet: each corruption is applied to uint8 48x48 crops at five severities,
with parameters fixed here and randomness (a sign, a direction) drawn from a generator seeded by
the corruption's name and severity, so the same images always get the same corruption and a model's
figures are the same on every run. The corruptions are written with OpenCV and numpy, apart from the
training-time augmentations (`ferkit.augment`), so a model is not scored on exactly what it trained on.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import cv2
import numpy as np

from .errors import UsageError

SEVERITIES = (1, 2, 3, 4, 5)
BENCHMARK_SEED = 2013

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
"""uint8 crops (N, 48, 48), severity 1..5, generator -> corrupted uint8 crops (N, 48, 48)."""


def _pixels(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _signs(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n)


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Over- or under-exposure: every pixel shifted by the same amount, up or down at random."""
    delta = (0.08, 0.16, 0.24, 0.32, 0.4)[severity - 1] * 255
    return _to_uint8(_pixels(images) + (delta * _signs(len(images), rng))[:, None, None])


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Flat lighting: pixels pulled toward each image's mean."""
    factor = (0.75, 0.6, 0.45, 0.33, 0.22)[severity - 1]
    x = _pixels(images)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8(mean + (x - mean) * factor)


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Out of focus or motion-soft: a Gaussian blur."""
    sigma = (0.5, 0.8, 1.1, 1.5, 2.0)[severity - 1]
    return np.stack([cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for image in images])


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise in low light."""
    std = (0.03, 0.06, 0.09, 0.13, 0.18)[severity - 1] * 255
    return _to_uint8(_pixels(images) + rng.normal(0, std, images.shape).astype(np.float32))


def jpeg(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Compression: JPEG at falling quality."""
    quality = (60, 40, 25, 15, 8)[severity - 1]
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    decoded = [cv2.imdecode(cv2.imencode(".jpg", image, params)[1], cv2.IMREAD_GRAYSCALE) for image in images]
    return np.stack([np.asarray(image, dtype=np.uint8) for image in decoded])


def low_resolution(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A small face far from the camera: down to a few pixels across, then back up to 48."""
    side = (36, 28, 22, 18, 14)[severity - 1]
    size = images.shape[1]
    return np.stack([cv2.resize(cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA), (size, size),
                                interpolation=cv2.INTER_LINEAR) for image in images])


def _warp(images: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    size = images.shape[1]
    return np.stack([cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                     for image, m in zip(images, matrices, strict=True)])


def crop_shift(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another detector's box centre: the face moved by a few pixels in a random direction."""
    distance = (2, 4, 6, 8, 10)[severity - 1]
    angles = rng.uniform(0, 2 * np.pi, len(images))
    return _warp(images, [np.array([[1, 0, distance * np.cos(a)], [0, 1, distance * np.sin(a)]], np.float32)
                          for a in angles])


def crop_scale(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another detector's box size: a tighter or looser crop (zoom in or out about the centre)."""
    factor = (1.1, 1.2, 1.3, 1.45, 1.6)[severity - 1]
    centre = (images.shape[2] / 2 - 0.5, images.shape[1] / 2 - 0.5)
    scales = np.where(_signs(len(images), rng) > 0, factor, 1 / factor)
    return _warp(images, [cv2.getRotationMatrix2D(centre, 0, float(s)) for s in scales])


def rotation(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A tilted head or camera."""
    degrees = (5, 10, 15, 22, 30)[severity - 1]
    centre = (images.shape[2] / 2 - 0.5, images.shape[1] / 2 - 0.5)
    return _warp(images, [cv2.getRotationMatrix2D(centre, float(degrees * s), 1.0)
                          for s in _signs(len(images), rng)])


CORRUPTIONS: dict[str, Corruption] = {
    "brightness": brightness, "contrast": contrast, "gaussian_blur": gaussian_blur,
    "gaussian_noise": gaussian_noise, "jpeg": jpeg, "low_resolution": low_resolution,
    "crop_shift": crop_shift, "crop_scale": crop_scale, "rotation": rotation,
}


def corrupt(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """`images` (uint8, N x 48 x 48) under corruption `name` at `severity`, the same on every call."""
    if name not in CORRUPTIONS:
        raise UsageError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise UsageError(f"severity {severity}: choose from {', '.join(map(str, SEVERITIES))}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise UsageError(f"expected uint8 crops (N, H, W), got {images.dtype} {images.shape}")
    seed = zlib.crc32(f"{BENCHMARK_SEED}/{name}/{severity}".encode())
    return CORRUPTIONS[name](images, severity, np.random.default_rng(seed))
