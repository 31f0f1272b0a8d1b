"""The confidence step: its line, its guarantees (sums, class order), its fit, and its place in the weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from by_hand import confidence_step_by_hand, softmax
from ferkit.calibration import calibration_error, cross_validate, fit_confidence_step, fit_map
from ferkit.inference import Preprocessing, adjusted_logits, confidence_step, piecewise_linear

KNOTS = np.array([0.0, 0.25, 0.5, 0.8, 1.0])
VALUES = np.array([0.1, 0.2, 0.45, 0.7, 0.9])


def _step(logits: np.ndarray, knots: np.ndarray = KNOTS, values: np.ndarray = VALUES) -> np.ndarray:
    return confidence_step(torch.from_numpy(logits), torch.from_numpy(knots), torch.from_numpy(values)).numpy()


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose top class is right with probability 0.3 + 0.5 c (c: its probability), so confident faces are
    overconfident and doubtful ones underconfident: no temperature can fix both."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 7))
    p = softmax(logits)
    right = rng.random(n) < 0.3 + 0.5 * p.max(1)
    others = (p.argmax(1) + rng.integers(1, 7, n)) % 7
    return logits, np.where(right, p.argmax(1), others)


def test_the_ramps_draw_the_line_through_the_knots() -> None:
    x = torch.linspace(0, 1, 101, dtype=torch.float64)[:, None]
    line = piecewise_linear(x, torch.from_numpy(KNOTS), torch.from_numpy(VALUES))[:, 0].numpy()
    np.testing.assert_allclose(line, np.interp(x[:, 0].numpy(), KNOTS, VALUES), atol=1e-12)


def test_the_step_sets_the_top_probability_keeps_the_ratios_and_the_class_order() -> None:
    logits = np.random.default_rng(0).normal(0, 2, (500, 7))
    out = _step(logits)
    np.testing.assert_allclose(np.exp(out).sum(1), 1, atol=1e-9)
    np.testing.assert_allclose(out, confidence_step_by_hand(logits, KNOTS, VALUES), atol=1e-9)
    assert (out.argmax(1) == logits.argmax(1)).all()
    p, q = softmax(logits), np.exp(out)
    confidence, wanted = p.max(1), np.interp(p.max(1), KNOTS, VALUES)
    second = np.sort(p, 1)[:, -2]
    free = wanted > second / (1 - confidence + second) + 1e-6  # where the line itself keeps the top on top
    assert free.mean() > 0.5
    np.testing.assert_allclose(q.max(1)[free], wanted[free], atol=1e-9)
    others = np.argsort(-p, 1)[:, 1:]  # the other classes keep their ratios to each other
    ratio = np.take_along_axis(q, others, 1) / np.take_along_axis(p, others, 1)
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(6, 1), rtol=1e-9)


def test_the_step_holds_where_a_face_is_all_but_certain() -> None:
    logits = np.array([[60.0, 0, 0, 0, 0, 0, 0], [0, 30.0, 29.9, 0, 0, 0, 0]])
    out = _step(logits)
    assert np.isfinite(out).all() and (out.argmax(1) == [0, 1]).all()
    assert np.exp(out[0, 0]) == pytest.approx(0.9)
    out32 = confidence_step(torch.from_numpy(logits).float(), torch.from_numpy(KNOTS).float(),
                            torch.from_numpy(VALUES).float())
    assert torch.isfinite(out32).all() and (out32.argmax(1) == torch.tensor([0, 1])).all()


def test_the_fitted_step_lowers_held_out_ece_where_a_temperature_cannot() -> None:
    logits, targets = _overconfident(6000, seed=1)
    fit_logits, fit_targets, held_logits, held_targets = logits[:3000], targets[:3000], logits[3000:], targets[3000:]
    knots, values = fit_confidence_step(fit_logits, fit_targets)
    assert knots[0] == 0 and knots[-1] == 1 and (np.diff(knots) > 0).all() and (np.diff(values) >= 0).all()
    tempered = fit_map(fit_logits, fit_targets, "temperature", 0.0).apply(held_logits)
    stepped = fit_map(fit_logits, fit_targets, "temperature", 0.0, step=True).apply(held_logits)
    ece_tempered = calibration_error(softmax(tempered), held_targets)
    ece_stepped = calibration_error(softmax(stepped), held_targets)
    assert ece_stepped < ece_tempered / 2
    assert (stepped.argmax(1) == held_logits.argmax(1)).all()


def test_cross_validation_weighs_the_step_beside_each_map() -> None:
    logits, targets = _overconfident(1500, seed=2)
    table = cross_validate(logits, targets, candidates=(("temperature", 0.0), ("vector", 1e-2)))
    assert sorted((r["family"], r["confidence_step"]) for r in table) == [
        ("temperature", False), ("temperature", True), ("vector", False), ("vector", True)]
    assert table[0]["confidence_step"]  # this data needs it
    assert table == sorted(table, key=lambda r: (round(r["cv_ece"], 4), r["cv_nll"]))


def test_the_weights_store_the_step_and_refuse_a_broken_one() -> None:
    pre = Preprocessing(confidence_knots=tuple(KNOTS), confidence_values=tuple(VALUES))
    assert pre.calibrated and Preprocessing.from_dict(pre.to_dict()) == pre
    logits = np.random.default_rng(3).normal(0, 2, (20, 7))
    np.testing.assert_allclose(adjusted_logits(logits, pre), _step(logits), atol=1e-12)
    assert not pre.without_calibration().calibrated
    for bad, message in (
        ({"confidence_knots": (0.0, 1.0)}, "needs both"),
        ({"confidence_knots": (0.0, 1.0), "confidence_values": (0.5,)}, "as many"),
        ({"confidence_knots": (0.0, 0.6, 0.5, 1.0), "confidence_values": (0.1, 0.2, 0.3, 0.4)}, "rise strictly"),
        ({"confidence_knots": (0.1, 1.0), "confidence_values": (0.1, 0.4)}, "rise strictly from 0 to 1"),
        ({"confidence_knots": (0.0, 0.5, 1.0), "confidence_values": (0.1, 0.6, 0.5)}, "must not fall"),
        ({"confidence_knots": (0.0, 1.0), "confidence_values": (0.1, 1.5)}, "probabilities"),
    ):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(Preprocessing(), **bad)
