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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, UsageError

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
    """A temperature, then an affine map of the tempered logits: softmax(W (z / T) + b)."""

    temperature: float
    matrix: np.ndarray
    bias: np.ndarray

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return (np.asarray(logits, np.float64) / self.temperature) @ self.matrix.T + self.bias


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


def fit_map(logits: np.ndarray, targets: np.ndarray, family: str, strength: float) -> CalibrationMap:
    """The temperature (NLL-optimal), then the family's affine map fitted on the tempered logits."""
    temperature = fit_temperature(logits, targets)
    matrix, bias = fit_affine(np.asarray(logits, np.float64) / temperature, targets, family, strength)
    return CalibrationMap(temperature, matrix, bias)


def stratified_folds(targets: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index 0..folds-1 for each face, each class spread evenly over the folds (seeded)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(targets), np.int64)
    for cls in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == cls))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


def cross_validate(logits: np.ndarray, targets: np.ndarray, candidates: tuple[tuple[str, float], ...] = CANDIDATES,
                   folds: int = 5, repeats: int = 3) -> list[dict[str, Any]]:
    """Out-of-fold NLL, ECE and accuracy of each (family, strength), best (lowest ECE, then NLL) first.

    Each figure is pooled over all faces, then averaged over `repeats` seeded splits into `folds`
    (one split's ECE moves by about 0.002 with the seed).
    """
    targets = np.asarray(targets)
    splits = [stratified_folds(targets, folds, seed) for seed in range(repeats)]
    rows = []
    for family, strength in candidates:
        scores = [_out_of_fold(logits, targets, fold, family, strength) for fold in splits]
        rows.append({"family": family, "strength": strength,
                     **{key: float(np.mean([s[key] for s in scores])) for key in scores[0]}})
    return sorted(rows, key=lambda r: (round(r["cv_ece"], 4), r["cv_nll"]))


def _out_of_fold(logits: np.ndarray, targets: np.ndarray, fold: np.ndarray, family: str, strength: float
                 ) -> dict[str, float]:
    out = np.zeros_like(np.asarray(logits, np.float64))
    for f in np.unique(fold):
        held = fold == f
        out[held] = fit_map(logits[~held], targets[~held], family, strength).apply(logits[held])
    probabilities = torch.softmax(torch.from_numpy(out), 1).numpy()
    nll = float(F.cross_entropy(torch.from_numpy(out), torch.from_numpy(targets).long()))
    accuracy = float((out.argmax(1) == targets).mean())
    return {"cv_nll": nll, "cv_ece": calibration_error(probabilities, targets), "cv_accuracy": accuracy}
