"""Calibration maps fitted on validation logits, chosen by cross-validation, and the error they are judged by.

A temperature alone cannot calibrate every model (`ferkit-resnet-robust`'s best temperature left its
PublicTest ECE at 0.030, docs/results/calibration/ece_by_temperature.txt), so `ferkit calibrate` can
also fit an affine map of the tempered logits, z -> W z + b: `vector` (W diagonal: vector scaling)
or `matrix` (W full), both L2-regularised towards the identity (W = I, b = 0), so that a strong
regularisation gives back the temperature alone. The family and its regularisation are chosen by
stratified k-fold cross-validation on the validation split, repeated over seeded splits: the lowest
out-of-fold ECE, then NLL, each fold's temperature and map fitted on the other folds only. The map
is stored in the weights' `Preprocessing` (`calibration_matrix`, `calibration_bias`) and applied by
`inference.adjusted_logits`.

An affine map moves every face's logits alike, and on PublicTest it left four shipped models' out-of-fold
ECE at 0.023-0.034 (docs/results/calibration/step/). The optional confidence step after it recalibrates the top
class's probability alone, by centred isotonic regression of correctness on confidence: the isotonic fit's
blocks become knots at each block's mean confidence, joined by straight lines, so the map is monotone and
continuous and keeps the ranking of faces by confidence; the other classes are rescaled and the top class
stays on top (`inference.confidence_step`). Cross-validation decides whether it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import isotonic_regression

from .errors import InputError, UsageError
from .inference import confidence_step

ECE_BINS = 15
FAMILIES = ("temperature", "vector", "matrix")
CANDIDATES: tuple[tuple[str, float], ...] = (
    ("temperature", 0.0),
    *(("vector", s) for s in (1e-4, 1e-3, 1e-2, 1e-1)),
    *(("matrix", s) for s in (1e-4, 1e-3, 1e-2, 1e-1)),
)
"""(family, L2 strength) pairs `ferkit calibrate --map auto` cross-validates."""


@dataclass(frozen=True)
class CalibrationMap:
    """A temperature, then an affine map of the tempered logits: softmax(W (z / T) + b); then, if `knots` is
    set, the confidence step through (knots, values)."""

    temperature: float
    matrix: np.ndarray
    bias: np.ndarray
    knots: np.ndarray | None = None
    values: np.ndarray | None = None

    def apply(self, logits: np.ndarray) -> np.ndarray:
        mapped = (np.asarray(logits, np.float64) / self.temperature) @ self.matrix.T + self.bias
        return mapped if self.knots is None else _step(mapped, self.knots, self.values)


def _step(logits: np.ndarray, knots: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    return confidence_step(torch.from_numpy(logits), torch.from_numpy(knots), torch.from_numpy(values)).numpy()


def fit_confidence_step(logits: np.ndarray, targets: np.ndarray, pseudo_count: float = 1.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Knots and values of the confidence step for these (calibrated) logits, rounded to 6 decimals as the
    weights store them: centred isotonic regression of whether the top class is right on its probability,
    from (0, at most 1 / classes) to (1, at least the last block's mean confidence).

    Each block's rate counts `pseudo_count` more faces, right with the block's mean confidence: so no block
    says 0 or 1 on the strength of a few faces. On PublicTest one such face kept the out-of-fold ECE of four
    models and lowered their NLL (`benchmarks/calibration_step.py`, docs/results/calibration/step/).
    """
    probabilities = torch.softmax(torch.as_tensor(np.asarray(logits, np.float64)), 1).numpy()
    confidence = probabilities.max(1)
    order = np.argsort(confidence, kind="stable")
    x = confidence[order]
    right = (probabilities.argmax(1) == np.asarray(targets))[order].astype(np.float64)
    fitted = np.asarray(isotonic_regression(right).x, np.float64)
    starts = np.flatnonzero(np.r_[True, np.diff(fitted) != 0])
    sizes = np.diff(np.r_[starts, len(x)])
    centres = np.asarray(np.add.reduceat(x, starts) / sizes, np.float64)
    rates = np.maximum.accumulate((np.add.reduceat(right, starts) + pseudo_count * centres) / (sizes + pseudo_count))
    knots = np.r_[0.0, centres, 1.0].round(6)
    values = np.r_[min(rates[0], 1 / logits.shape[1]), rates, max(rates[-1], centres[-1])].round(6)
    keep = np.r_[True, np.diff(knots) > 0] & (knots > 0) & (knots < 1)
    keep[0] = keep[-1] = True
    return knots[keep], np.maximum.accumulate(values[keep])


def calibration_error(probabilities: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None,
                      bins: int = ECE_BINS) -> float:
    """Top-label ECE over `bins` equal-width confidence bins, each face weighing `weights` (default 1).

    Unweighted, it is torchmetrics' `multiclass_calibration_error(norm="l1")`, which `ferkit evaluate`
    reports; weights 1 / (the face's class count) give the error on the split reweighted to a uniform
    class mix, the mix that uniform-prior probabilities are meant for.
    """
    probabilities = np.asarray(probabilities, np.float64)
    if len(probabilities) == 0:
        return float("nan")
    weight = np.ones(len(probabilities)) if weights is None else np.asarray(weights, np.float64)
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == np.asarray(targets)).astype(np.float64)
    index = np.searchsorted(np.linspace(0, 1, bins + 1), confidence, side="right") - 1
    gap = np.bincount(index, weight * (correct - confidence), minlength=bins + 1)
    return float(np.abs(gap).sum() / weight.sum())


def uniform_mix_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Each face's weight 1 / (its class's count): every class weighs the same in total."""
    counts = np.bincount(np.asarray(targets), minlength=num_classes).astype(np.float64)
    return 1.0 / counts[np.asarray(targets)]


def fit_affine(logits: np.ndarray, targets: np.ndarray, family: str, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """W and b minimising mean NLL of softmax(W z + b) + strength x (|W - I|^2 + |b|^2); identity for `temperature`."""
    if family not in FAMILIES:
        raise UsageError(f"calibration map {family!r}: choose one of {', '.join(FAMILIES)}")
    k = logits.shape[1]
    if family == "temperature":
        return np.eye(k), np.zeros(k)
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    delta = torch.zeros(k if family == "vector" else (k, k), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([delta, bias], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def matrix() -> torch.Tensor:
        return torch.eye(k, dtype=torch.float64) + (torch.diag(delta) if family == "vector" else delta)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ matrix().T + bias, y) + strength * (delta.square().sum() + bias.square().sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return matrix().detach().numpy(), bias.detach().numpy()


def fit_temperature(logits: torch.Tensor | np.ndarray, targets: np.ndarray | torch.Tensor) -> float:
    """The temperature T that minimises the NLL of softmax(logits / T) on (validation) data.

    The NLL is convex in 1/T, so a ternary search over 1/T in [0.05, 20] finds the minimum,
    deterministically, to about 1e-6.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if len(y) == 0:
        raise InputError("cannot fit a temperature on no images")

    def nll(inverse_t: float) -> float:
        return float(F.cross_entropy(z * inverse_t, y))

    low, high = 0.05, 20.0
    for _ in range(200):
        a, b = low + (high - low) / 3, high - (high - low) / 3
        if nll(a) <= nll(b):
            high = b
        else:
            low = a
    return 1.0 / ((low + high) / 2)


def fit_map(logits: np.ndarray, targets: np.ndarray, family: str, strength: float, step: bool = False
            ) -> CalibrationMap:
    """The temperature (NLL-optimal), then the family's affine map fitted on the tempered logits, then (`step`)
    the confidence step fitted on the mapped logits."""
    temperature = fit_temperature(logits, targets)
    matrix, bias = fit_affine(np.asarray(logits, np.float64) / temperature, targets, family, strength)
    affine = CalibrationMap(temperature, matrix, bias)
    if not step:
        return affine
    knots, values = fit_confidence_step(affine.apply(logits), targets)
    return CalibrationMap(temperature, matrix, bias, knots, values)


def stratified_folds(targets: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index 0..folds-1 for each face, each class spread evenly over the folds (seeded)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(targets), np.int64)
    for cls in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == cls))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


def cross_validate(logits: np.ndarray, targets: np.ndarray, candidates: tuple[tuple[str, float], ...] = CANDIDATES,
                   steps: tuple[bool, ...] = (False, True), folds: int = 5, repeats: int = 3) -> list[dict[str, Any]]:
    """Out-of-fold NLL, ECE and accuracy of each (family, strength) without and with the confidence step
    (`steps`), best (lowest ECE, then NLL) first.

    Each figure is pooled over all faces, then averaged over `repeats` seeded splits into `folds`
    (one split's ECE moves by about 0.002 with the seed).
    """
    targets = np.asarray(targets)
    splits = [stratified_folds(targets, folds, seed) for seed in range(repeats)]
    rows = []
    for family, strength in candidates:
        scores = [_out_of_fold(logits, targets, fold, family, strength, steps) for fold in splits]
        for step in steps:
            rows.append({"family": family, "strength": strength, "confidence_step": step,
                         **{key: float(np.mean([s[step][key] for s in scores])) for key in scores[0][step]}})
    return sorted(rows, key=lambda r: (round(r["cv_ece"], 4), r["cv_nll"]))


def _out_of_fold(logits: np.ndarray, targets: np.ndarray, fold: np.ndarray, family: str, strength: float,
                 steps: tuple[bool, ...]) -> dict[bool, dict[str, float]]:
    out = {step: np.zeros_like(np.asarray(logits, np.float64)) for step in steps}
    for f in np.unique(fold):
        held = fold == f
        affine = fit_map(logits[~held], targets[~held], family, strength)
        mapped = affine.apply(logits[held])
        for step in steps:
            if step:
                knots, values = fit_confidence_step(affine.apply(logits[~held]), targets[~held])
                out[step][held] = _step(mapped, knots, values)
            else:
                out[step][held] = mapped
    return {step: _scores(z, targets) for step, z in out.items()}


def _scores(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
    nll = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets).long()))
    accuracy = float((logits.argmax(1) == targets).mean())
    return {"cv_nll": nll, "cv_ece": calibration_error(probabilities, targets), "cv_accuracy": accuracy}
