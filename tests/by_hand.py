"""The weights' calibration written out in plain numpy, apart from ferkit's own code, for tests to compare with.

Shared by the tests of evaluation, prediction and export; nothing here is a test.
"""

from __future__ import annotations

import numpy as np

from ferkit.weights import WeightsMeta


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def confidence_step_by_hand(logits: np.ndarray, knots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Log-probabilities whose top class has probability np.interp(c, knots, values), raised to just above where
    the second class would overtake it, the other classes rescaled to fill the rest."""
    p = softmax(np.asarray(logits, np.float64))
    rows = np.arange(len(p))
    top, confidence, second = p.argmax(1), p.max(1), np.sort(p, 1)[:, -2]
    new = np.interp(confidence, knots, values)
    new = np.minimum(np.maximum(new, second / (1 - confidence + second) + 1e-6), 1 - 1e-6)
    q = p * ((1 - new) / (1 - confidence))[:, None]
    q[rows, top] = new
    return np.log(q)


def calibrated_by_hand(logits: np.ndarray, meta: WeightsMeta) -> np.ndarray:
    """(z / T) W^T + b, or z / T where the weights carry no map; then the confidence step where they carry one."""
    pre = meta.preprocessing
    z = np.asarray(logits, np.float64) / pre.temperature
    if pre.calibration_matrix is not None:
        z = z @ np.array(pre.calibration_matrix).T + np.array(pre.calibration_bias)
    if pre.confidence_knots is not None:
        z = confidence_step_by_hand(z, np.array(pre.confidence_knots), np.array(pre.confidence_values))
    return z
