"""Inference on uint8 face crops: preprocessing built from data, test-time views, logits, probabilities.

Everything that turns 48x48 uint8 crops into logits lives here, once. `Preprocessing` is a small
config stored in every weights file's metadata (input size, normalisation, face crop scale, views,
temperature, calibration map, class prior); `InferenceModel` builds the whole computation from it:
uint8 crops in, float logits out, normalisation and views inside (and, for export, the calibration).
`predict_logits` (training's validation, `ferkit evaluate`, `ferkit predict`), the exported ONNX and
TorchScript graphs and the service all run that one module, so no two of them can preprocess differently.

This module imports nothing of ferkit's but the label vocabulary.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, UsageError
from .labels import IMAGE_SIZE, NUM_CLASSES

VIEW_COUNTS = (1, 2, 10)
"""Views per face: the image; it and its mirror; five positions (centre, shifted up/down/left/right) each mirrored."""
PRIORS = ("train", "uniform")
"""`train`: probabilities as trained (FER-2013's class mix); `uniform`: the training prior divided out."""
DEFAULT_PRIOR = "uniform"
"""The prior of `ferkit predict`, the API, the service and the page: users' faces are not mixed like FER-2013's
(25% happy, 1.5% disgust, a product of how its images were searched for)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model reads a face, stored with its weights; the defaults are the reference's.

    `crop_scale`: the square crop's side over the face detector's box. `views`/`view_shift`: test-time
    views averaged per face and the shift in pixels of the shifted ones. `temperature`: logits are divided
    by it before the softmax (1: as trained). `calibration_matrix`/`calibration_bias`: an affine map
    W z + b applied to the logits after the temperature (vector scaling when W is diagonal), fitted on
    validation data by `ferkit calibrate`; None: none. `confidence_knots`/`confidence_values`: after the
    map, a monotone piecewise-linear map of the top class's probability through these points, the other
    classes rescaled to fill the rest and the top class kept on top (see `confidence_step`); None: none.
    `class_prior`: training-set class frequencies, for `prior="uniform"` (logit adjustment); None when unknown.
    """

    image_size: int = IMAGE_SIZE
    mean: float = 0.5
    std: float = 0.5
    crop_scale: float = 1.05
    views: int = 1
    view_shift: int = 2
    temperature: float = 1.0
    calibration_matrix: tuple[tuple[float, ...], ...] | None = None
    calibration_bias: tuple[float, ...] | None = None
    confidence_knots: tuple[float, ...] | None = None
    confidence_values: tuple[float, ...] | None = None
    class_prior: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What is wrong with these values, or None."""
        if self.image_size != IMAGE_SIZE:
            return f"input size {self.image_size}: ferkit crops faces to {IMAGE_SIZE}x{IMAGE_SIZE}"
        if not (math.isfinite(self.std) and self.std > 0 and math.isfinite(self.mean)):
            return f"normalisation mean {self.mean}, std {self.std}: std must be positive and both finite"
        if not (math.isfinite(self.crop_scale) and 0.5 <= self.crop_scale <= 3):
            return f"crop scale {self.crop_scale} is outside 0.5..3"
        if self.views not in VIEW_COUNTS:
            return f"views {self.views}: choose one of {', '.join(map(str, VIEW_COUNTS))}"
        if not 0 <= self.view_shift <= self.image_size // 4:
            return f"view shift {self.view_shift} is outside 0..{self.image_size // 4}"
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            return f"temperature {self.temperature} must be positive"
        calibration = _calibration_problem(self.calibration_matrix, self.calibration_bias)
        if calibration:
            return calibration
        step = _confidence_problem(self.confidence_knots, self.confidence_values)
        if step:
            return step
        prior = self.class_prior
        if prior is not None and not (all(math.isfinite(p) and p > 0 for p in prior) and abs(sum(prior) - 1) < 1e-3):
            return f"class prior {list(prior)} must be positive frequencies summing to 1"
        return None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["class_prior"] = list(self.class_prior) if self.class_prior is not None else None
        matrix = self.calibration_matrix
        values["calibration_matrix"] = [list(row) for row in matrix] if matrix is not None else None
        for name in ("calibration_bias", "confidence_knots", "confidence_values"):
            value = getattr(self, name)
            values[name] = list(value) if value is not None else None
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """Checked construction from JSON values; raises ValueError saying which value is wrong."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown preprocessing field(s) {', '.join(unknown)}")
        checked: dict[str, Any] = {}
        for name, value in values.items():
            kind = known[name].type
            if name in ("class_prior", "calibration_bias", "confidence_knots", "confidence_values"):
                value = None if value is None else _numbers(value, f"preprocessing {name}")
            elif name == "calibration_matrix":
                if value is not None:
                    if not isinstance(value, list):
                        raise ValueError(f"preprocessing calibration_matrix must be a list of rows, not {value!r}")
                    value = tuple(_numbers(row, "a calibration_matrix row") for row in value)
            elif kind in ("int", int):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"preprocessing {name} must be an integer, not {value!r}")
            elif not _is_number(value):
                raise ValueError(f"preprocessing {name} must be a number, not {value!r}")
            else:
                value = float(value)
            checked[name] = value
        return cls(**checked)

    def with_views(self, views: int | None) -> Preprocessing:
        """The same preprocessing with another number of views (None: unchanged)."""
        return self if views is None else replace(self, views=views)

    def without_calibration(self) -> Preprocessing:
        """The same preprocessing with the raw logits' probabilities: temperature 1, no map, no confidence step."""
        return replace(self, temperature=1.0, calibration_matrix=None, calibration_bias=None, confidence_knots=None,
                       confidence_values=None)

    @property
    def calibrated(self) -> bool:
        """Whether a calibration map or confidence step (beyond the temperature) is applied."""
        return self.calibration_matrix is not None or self.confidence_knots is not None

    @property
    def num_classes(self) -> int | None:
        """The class count the calibration map or prior implies, None if neither is set."""
        sizes = [len(v) for v in (self.calibration_bias, self.class_prior) if v is not None]
        return sizes[0] if sizes else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numbers(value: object, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise ValueError(f"{what} must be a list of numbers, not {value!r}")
    return tuple(float(v) for v in value)


def _calibration_problem(matrix: tuple[tuple[float, ...], ...] | None, bias: tuple[float, ...] | None) -> str | None:
    if (matrix is None) != (bias is None):
        return "a calibration map needs both calibration_matrix and calibration_bias"
    if matrix is None or bias is None:
        return None
    size = len(bias)
    if size < 2 or len(matrix) != size or any(len(row) != size for row in matrix):
        return f"calibration map: a {size}x{size} matrix expected for {size} biases"
    if not all(math.isfinite(v) for v in (*bias, *(v for row in matrix for v in row))):
        return "calibration map values must be finite"
    return None


def _confidence_problem(knots: tuple[float, ...] | None, values: tuple[float, ...] | None) -> str | None:
    if (knots is None) != (values is None):
        return "a confidence step needs both confidence_knots and confidence_values"
    if knots is None or values is None:
        return None
    if len(knots) < 2 or len(values) != len(knots):
        return f"confidence step: {len(knots)} knots and {len(values)} values, two or more of each and as many"
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (*knots, *values)):
        return "confidence step: knots and values must be probabilities (0..1)"
    if knots[0] != 0 or knots[-1] != 1 or any(b <= a for a, b in itertools.pairwise(knots)):
        return "confidence step: knots must rise strictly from 0 to 1"
    if any(b < a for a, b in itertools.pairwise(values)):
        return "confidence step: values must not fall"
    return None


DEFAULT_PREPROCESSING = Preprocessing()


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


def calibration_map(preprocessing: Preprocessing, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole calibration as one affine map of raw logits, (W, b): z -> W z + b, temperature included.

    Raw logits are divided by the temperature, then mapped: W = calibration_matrix / T.
    """
    if preprocessing.calibration_matrix is None or preprocessing.calibration_bias is None:
        return np.eye(num_classes) / preprocessing.temperature, np.zeros(num_classes)
    matrix = np.asarray(preprocessing.calibration_matrix, dtype=np.float64)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"calibration map of shape {matrix.shape} for {num_classes} classes")
    return matrix / preprocessing.temperature, np.asarray(preprocessing.calibration_bias, dtype=np.float64)


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


def adjusted_logits(logits: np.ndarray, preprocessing: Preprocessing, prior: str = "train") -> np.ndarray:
    """Logits as ferkit reports them: divided by the temperature, through the calibration map and the
    confidence step (if any); with `prior="uniform"`, minus the log training prior.

    Logit adjustment (Menon et al., 2021): subtracting the log training prior turns p(class | face)
    under FER-2013's class mix into the probabilities under equally likely classes.
    """
    if prior not in PRIORS:
        raise UsageError(f"prior {prior!r}: choose one of {', '.join(PRIORS)}")
    scaled = np.asarray(logits, dtype=np.float64) / preprocessing.temperature
    if preprocessing.calibration_matrix is not None:
        scaled = scaled @ np.asarray(preprocessing.calibration_matrix).T + np.asarray(preprocessing.calibration_bias)
    if preprocessing.confidence_knots is not None:
        knots, values = (torch.tensor(v, dtype=torch.float64) for v in
                         (preprocessing.confidence_knots, preprocessing.confidence_values))
        scaled = confidence_step(torch.from_numpy(scaled), knots, values).numpy()
    if prior == "uniform":
        if preprocessing.class_prior is None:
            raise InputError("these weights carry no class prior, so prior='uniform' cannot be applied")
        scaled = scaled - np.log(np.asarray(preprocessing.class_prior, dtype=np.float64))
    return scaled


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for any finite logits."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)
