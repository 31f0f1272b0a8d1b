"""Inference on uint8 face crops: preprocessing built from data, test-time views, logits, probabilities.

Everything that turns 48x48 uint8 crops into logits lives here, once. `Preprocessing` (in
`ferkit.preprocessing`, with the numpy arithmetic on logits, so that ONNX prediction needs no torch) is a
small config stored in every weights file's metadata (input size, normalisation, face crop scale, views,
temperature, calibration map, class prior); `InferenceModel` builds the whole computation from it:
uint8 crops in, float logits out, normalisation and views inside (and, for export, the calibration).
`predict_logits` (training's validation, `ferkit evaluate`, `ferkit predict`), the exported ONNX and
TorchScript graphs and the service all run that one module, so no two of them can preprocess differently.

This module imports nothing of ferkit's but the label vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .labels import NUM_CLASSES
from .preprocessing import (
    DEFAULT_PREPROCESSING,
    DEFAULT_PRIOR,
    PRIORS,
    VIEW_COUNTS,
    Preprocessing,
    adjusted_logits,
    calibration_map,
    softmax,
)

__all__ = ["DEFAULT_PREPROCESSING", "DEFAULT_PRIOR", "PRIORS", "VIEW_COUNTS", "InferenceModel", "Preprocessing",
           "adjusted_logits", "calibration_map", "confidence_step", "make_views", "normalize", "predict_logits",
           "preprocess", "softmax", "to_tensor"]


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 48, 48) or (N, 1, 48, 48) uint8 array -> uint8 tensor of shape (N, 1, 48, 48)."""
    batch = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if batch.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}")
    return batch.unsqueeze(1) if batch.dim() == 3 else batch


def normalize(pixels01: torch.Tensor, preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> torch.Tensor:
    """[0, 1] floats -> model input (the reference's [-1, 1] by default)."""
    return (pixels01 - preprocessing.mean) / preprocessing.std


def preprocess(
    images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
) -> torch.Tensor:
    """uint8 face crops (N, 48, 48) -> float32 model input (N, 1, 48, 48) on `device`, one view."""
    batch = to_tensor(images).to(device, non_blocking=True)
    return normalize(batch.float() / 255.0, preprocessing)


def make_views(batch: torch.Tensor, views: int, shift: int, fill: float) -> list[torch.Tensor]:
    """The views of a normalised batch that test-time augmentation averages over.

    Shifted views are crops of the batch padded with `fill` (black, as the training-time shifts pad).
    """
    if views == 1:
        return [batch]
    out = [batch]
    if views == 10:
        padded = F.pad(batch, (shift, shift, shift, shift), value=fill)
        size = batch.shape[-1]
        out += [padded[..., y : y + size, x : x + size]
                for y, x in ((0, shift), (2 * shift, shift), (shift, 0), (shift, 2 * shift))]
    return out + [view.flip(-1) for view in out]


class InferenceModel(nn.Module):
    """A classifier with its preprocessing and views: uint8 crops (N, 1, S, S) -> float32 logits (N, classes).

    `channels_last` converts each view for oneDNN's fastest CPU convolutions (about 1.6x here); export
    turns it off, as graph formats have no memory layouts. `calibrate`: the logits come out divided by
    the temperature, through the calibration map and the confidence step (what export builds into its
    graphs); otherwise raw, as training and evaluation want them, and `adjusted_logits` applies them.
    """

    calibration_matrix: torch.Tensor
    calibration_bias: torch.Tensor
    confidence_knots: torch.Tensor | None
    confidence_values: torch.Tensor | None

    def __init__(self, model: nn.Module, preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
                 channels_last: bool = True, calibrate: bool = False) -> None:
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.channels_last = channels_last
        self.calibrate = calibrate
        if calibrate:
            matrix, bias = calibration_map(preprocessing, _num_outputs(model))
            self.register_buffer("calibration_matrix", torch.from_numpy(matrix).float(), persistent=False)
            self.register_buffer("calibration_bias", torch.from_numpy(bias).float(), persistent=False)
        step = calibrate and preprocessing.confidence_knots is not None
        for name in ("confidence_knots", "confidence_values"):
            value = getattr(preprocessing, name)
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64) if step else None, persistent=False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        pre = self.preprocessing
        x = normalize(crops.float() / 255.0, pre)
        black = (0.0 - pre.mean) / pre.std
        views = make_views(x, pre.views, pre.view_shift, black)
        if self.channels_last:
            views = [view.contiguous(memory_format=torch.channels_last) for view in views]
        logits = torch.stack([self.model(view).float() for view in views]).mean(0)
        if not self.calibrate:
            return logits
        logits = logits @ self.calibration_matrix.T + self.calibration_bias
        if self.confidence_knots is None or self.confidence_values is None:
            return logits
        return confidence_step(logits, self.confidence_knots, self.confidence_values)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
    views: int | None = None,
) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 crops (N, 48, 48), in eval mode and float32.

    `views` overrides `preprocessing.views` (1, 2 or 10; see `make_views`).
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    if views is not None and views not in VIEW_COUNTS:
        raise UsageError(f"views {views}: choose one of {', '.join(map(str, VIEW_COUNTS))}")
    wrapped = InferenceModel(model, preprocessing.with_views(views))
    was_training = model.training
    if was_training:  # switching modes walks every module: a few ms a call, as much as a face's forward pass
        model.eval()
    try:
        outputs = [wrapped(to_tensor(images[i : i + batch_size]).to(device, non_blocking=True)).cpu()
                   for i in range(0, len(images), batch_size)]
    finally:
        if was_training:
            model.train()
    return torch.cat(outputs) if outputs else torch.zeros(0, _num_outputs(model))


def _num_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else NUM_CLASSES


def piecewise_linear(x: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The line through (knots, values) at each x in [knots[0], knots[-1]], as a sum of ramps (no search, so
    that ONNX graphs hold it as plain arithmetic)."""
    slopes = (values[1:] - values[:-1]) / (knots[1:] - knots[:-1])
    changes = torch.cat([slopes[:1], slopes[1:] - slopes[:-1]])
    return values[0] + (torch.relu(x - knots[:-1]) * changes).sum(-1, keepdim=True)


def confidence_step(logits: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (N, classes) whose top class has probability g(c), g the line through (knots, values)
    and c its probability under `logits`; the other classes share 1 - g(c) as they shared 1 - c.

    g(c) is raised where needed to keep the top class above the second, so the argmax never changes. In log
    space throughout, so exact however close c is to 1, and in float64: the ramps' sum cancels, and the log of
    1 - g(c) magnifies float32's error a hundredfold where g(c) is near 1 (exports would miss their parity).
    """
    dtype = logits.dtype
    logits, knots, values = logits.double(), knots.double(), values.double()
    is_top = torch.zeros_like(logits).scatter(1, logits.argmax(1, keepdim=True), 1.0) > 0
    top, second = logits.topk(2, dim=1).values.split(1, dim=1)
    total = torch.logsumexp(logits, 1, keepdim=True)
    rest = torch.logsumexp(logits.masked_fill(is_top, float("-inf")), 1, keepdim=True)
    second_share = torch.exp(second - total)
    floor = second_share / (torch.exp(rest - total) + second_share)  # the least g that keeps the top on top
    mapped = piecewise_linear(torch.exp(top - total), knots, values)
    new = torch.clamp(torch.maximum(mapped, floor + 1e-6), max=1 - 1e-6)
    return torch.where(is_top, torch.log(new), logits - rest + torch.log1p(-new)).to(dtype)


