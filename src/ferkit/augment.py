"""Preprocessing and augmentation, on whole batches of tensors on the training device.

`preprocess` is the one function that turns uint8 face crops into model input; training,
evaluation, prediction, export and the service all call it, so they can never drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MEAN = 0.5
STD = 0.5
"""Normalisation of [0, 1] pixels to [-1, 1], as in the reference."""


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 48, 48) or (N, 1, 48, 48) uint8 array -> uint8 tensor of shape (N, 1, 48, 48)."""
    batch = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if batch.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}")
    return batch.unsqueeze(1) if batch.dim() == 3 else batch


def normalize(pixels01: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> [-1, 1]."""
    return (pixels01 - MEAN) / STD


def preprocess(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 face crops (N, 48, 48) -> float32 model input (N, 1, 48, 48) in [-1, 1] on `device`."""
    batch = to_tensor(images).to(device, non_blocking=True)
    return normalize(batch.float() / 255.0)


@dataclass
class AugmentConfig:
    """Training augmentation; the defaults are the reference's (flip, rotation within +-10 degrees)."""

    hflip: bool = True
    rotate_degrees: float = 10.0


def random_hflip(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = torch.rand(batch.shape[0], generator=generator, device="cpu") < 0.5
    flip = flip.to(batch.device).view(-1, 1, 1, 1)
    return torch.where(flip, batch.flip(-1), batch)


def random_rotate(
    batch: torch.Tensor, degrees: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rotate each image by its own angle in [-degrees, degrees] about its centre, filling with 0.

    Nearest-neighbour sampling and black fill, like torchvision's RandomRotation defaults.
    """
    n = batch.shape[0]
    angles = (torch.rand(n, generator=generator, device="cpu") * 2 - 1) * math.radians(degrees)
    cos, sin = angles.cos(), angles.sin()
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta.to(batch.device, batch.dtype), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def train_transform(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 (N, 1, 48, 48) on the device -> augmented, normalised float32 batch."""
    batch = images.float() / 255.0
    if config.hflip:
        batch = random_hflip(batch, generator)
    if config.rotate_degrees > 0:
        batch = random_rotate(batch, config.rotate_degrees, generator)
    return normalize(batch)
