"""What a model's weights say about reading a face, and the arithmetic on its logits, in numpy alone.

`Preprocessing` is the small config stored in every weights file's metadata (input size,
normalisation, face crop scale, views, temperature, calibration map, confidence step, class prior);
`adjusted_logits` and `softmax` turn a model's logits into the probabilities ferkit reports. None of
it needs torch, so that the prediction path on an exported (ONNX) model never imports it;
`ferkit.inference` builds the torch computation from the same config (and re-exports these names).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from .errors import InputError, UsageError
from .labels import IMAGE_SIZE

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
        assert preprocessing.confidence_values is not None
        scaled = confidence_step(scaled, np.asarray(preprocessing.confidence_knots, dtype=np.float64),
                                 np.asarray(preprocessing.confidence_values, dtype=np.float64))
    if prior == "uniform":
        if preprocessing.class_prior is None:
            raise InputError("these weights carry no class prior, so prior='uniform' cannot be applied")
        scaled = scaled - np.log(np.asarray(preprocessing.class_prior, dtype=np.float64))
    return scaled

def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=1, keepdims=True)
    return np.asarray(top + np.log(np.exp(x - top).sum(1, keepdims=True)))


def confidence_step(logits: np.ndarray, knots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`ferkit.inference.confidence_step` (which exported graphs hold) in numpy, float64: log-probabilities whose top
    class has probability g(c), g the line through (knots, values) and c its probability under `logits`; the other
    classes share 1 - g(c) as they shared 1 - c, and the top class stays on top."""
    logits = np.asarray(logits, dtype=np.float64)
    is_top = np.zeros(logits.shape, dtype=bool)
    is_top[np.arange(len(logits)), logits.argmax(1)] = True
    ordered = np.sort(logits, axis=1)
    top, second = ordered[:, -1:], ordered[:, -2:-1]
    total = _logsumexp(logits)
    rest = _logsumexp(np.where(is_top, -np.inf, logits))
    second_share = np.exp(second - total)
    floor = second_share / (np.exp(rest - total) + second_share)  # the least g that keeps the top on top
    slopes = np.diff(values) / np.diff(knots)
    changes = np.concatenate([slopes[:1], np.diff(slopes)])
    mapped = values[0] + (np.maximum(np.exp(top - total) - knots[:-1], 0) * changes).sum(-1, keepdims=True)
    new = np.minimum(np.maximum(mapped, floor + 1e-6), 1 - 1e-6)
    return np.asarray(np.where(is_top, np.log(new), logits - rest + np.log1p(-new)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for any finite logits."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)

