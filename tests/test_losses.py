"""The training criterion on tensors small enough to work out by hand.

Three classes and logits chosen so that the softmax is exact: softmax([ln 2, 0, 0]) = (1/2, 1/4, 1/4), so
-log p = (ln 2, 2 ln 2, 2 ln 2); softmax([2 ln 2, 0, 0]) = (2/3, 1/6, 1/6). Every expected value below is
written out from these, not computed by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ferkit.augment import mix_batch
from ferkit.losses import Criterion, Distillation

LN2 = math.log(2)
HALF_QUARTERS = [LN2, 0.0, 0.0]  # softmax: (1/2, 1/4, 1/4)
TWO_THIRDS = [2 * LN2, 0.0, 0.0]  # softmax: (2/3, 1/6, 1/6); at T = 2 it is HALF_QUARTERS


def _loss(criterion: Criterion, logits: list[list[float]], labels: list[int],
          inputs: torch.Tensor | None = None) -> float:
    y = torch.tensor(labels)
    targets = criterion.targets(y, torch.arange(len(labels)))
    return float(criterion(torch.tensor(logits), targets, inputs))


def test_hard_labels_are_the_mean_negative_log_probability() -> None:
    plain = Criterion(num_classes=3)
    assert _loss(plain, [HALF_QUARTERS], [0]) == pytest.approx(LN2)
    assert _loss(plain, [HALF_QUARTERS], [1]) == pytest.approx(2 * LN2)
    assert _loss(plain, [HALF_QUARTERS, HALF_QUARTERS], [0, 1]) == pytest.approx(1.5 * LN2)


def test_label_smoothing_spreads_eps_over_the_classes() -> None:
    # eps 0.3 over 3 classes: the target of label 0 is (0.8, 0.1, 0.1); 0.8 ln 2 + 0.1 (2 ln 2) + 0.1 (2 ln 2).
    smoothed = Criterion(num_classes=3, label_smoothing=0.3)
    assert _loss(smoothed, [HALF_QUARTERS], [0]) == pytest.approx(1.2 * LN2)
    # Label 1: (0.1, 0.8, 0.1) -> 0.1 ln 2 + 0.8 (2 ln 2) + 0.1 (2 ln 2).
    assert _loss(smoothed, [HALF_QUARTERS], [1]) == pytest.approx(1.9 * LN2)


def test_class_weights_scale_each_image_and_the_mean_is_over_images() -> None:
    weighted = Criterion(num_classes=3, class_weights=torch.tensor([2.0, 1.0, 1.0]))
    assert _loss(weighted, [HALF_QUARTERS], [0]) == pytest.approx(2 * LN2)  # 2 x ln 2
    assert _loss(weighted, [HALF_QUARTERS], [1]) == pytest.approx(2 * LN2)  # 1 x 2 ln 2
    # (2 ln 2 + 2 ln 2) / 2 images, not / (2 + 1), the sum of the weights (as index targets would divide).
    assert _loss(weighted, [HALF_QUARTERS, HALF_QUARTERS], [0, 1]) == pytest.approx(2 * LN2)
    both = Criterion(num_classes=3, label_smoothing=0.3, class_weights=torch.tensor([2.0, 1.0, 1.0]))
    # (0.8, 0.1, 0.1) weighted (2, 1, 1): 1.6 ln 2 + 0.1 (2 ln 2) + 0.1 (2 ln 2).
    assert _loss(both, [HALF_QUARTERS], [0]) == pytest.approx(2.0 * LN2)


def test_distributions_take_the_place_of_the_labels() -> None:
    distributions = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    soft = Criterion(num_classes=3, distributions=distributions)
    labels = torch.tensor([0, 2])  # only the accuracy reads these; the loss reads the distributions
    torch.testing.assert_close(soft.targets(labels, torch.tensor([1, 0])), distributions[[1, 0]])
    # Row 0: 0.5 ln 2 + 0.5 (2 ln 2).
    assert _loss(soft, [HALF_QUARTERS], [0]) == pytest.approx(1.5 * LN2)


def test_cached_distillation_weighs_the_labels_against_the_teachers_at_temperature() -> None:
    # Student TWO_THIRDS: CE to label 0 is ln(3/2); at T = 2 its probabilities are (1/2, 1/4, 1/4), and the
    # teachers' (1/4, 1/2, 1/4) are KL = 1/4 ln(1/2) + 1/2 ln 2 + 1/4 ln 1 = ln 2 / 4 from them, times T^2 = 4.
    teacher = torch.tensor([[0.25, 0.5, 0.25]])
    criterion = Criterion(num_classes=3, distillation=Distillation(weight=0.5, temperature=2.0, cached=teacher))
    targets = criterion.targets(torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.0, 0.25, 0.5, 0.25]]))
    assert float(criterion(torch.tensor([TWO_THIRDS]), targets)) == pytest.approx(0.5 * math.log(1.5) + 0.5 * LN2)
    only_teacher = Criterion(num_classes=3, distillation=Distillation(weight=1.0, temperature=2.0, cached=teacher))
    assert _loss(only_teacher, [TWO_THIRDS], [0]) == pytest.approx(LN2)
    agreeing = Criterion(num_classes=3, distillation=Distillation(1.0, 2.0, cached=torch.tensor([[0.5, 0.25, 0.25]])))
    assert _loss(agreeing, [TWO_THIRDS], [2]) == pytest.approx(0.0, abs=1e-7)


def test_online_teachers_score_the_inputs_they_are_given() -> None:
    # The teacher returns its input: logits (0, 2 ln 2, 0), at T = 2 probabilities (1/4, 1/2, 1/4), as above.
    criterion = Criterion(num_classes=3, distillation=Distillation(0.5, 2.0, teachers=(nn.Identity(),)))
    inputs = torch.tensor([[0.0, 2 * LN2, 0.0]])
    targets = criterion.targets(torch.tensor([0]), torch.tensor([0]))
    assert targets.shape == (1, 3)  # nothing cached to mix
    assert float(criterion(torch.tensor([TWO_THIRDS]), targets, inputs)) == pytest.approx(
        0.5 * math.log(1.5) + 0.5 * LN2)
    # Other inputs, other soft targets: the teacher's (1/2, 1/4, 1/4) equal the student's at T = 2, KL 0.
    assert float(criterion(torch.tensor([TWO_THIRDS]), targets, torch.tensor([TWO_THIRDS]))) == pytest.approx(
        0.5 * math.log(1.5))
    with pytest.raises(ValueError, match="pass its inputs"):
        criterion(torch.tensor([TWO_THIRDS]), targets)


def test_mixup_mixes_labels_and_cached_soft_targets_alike() -> None:
    """One lambda and one partner per image for the images, the labels and the teachers' probabilities."""
    teacher = torch.tensor([[0.25, 0.5, 0.25], [0.0, 0.0, 1.0]])
    criterion = Criterion(num_classes=3, distillation=Distillation(0.5, 1.0, cached=teacher))
    x = torch.tensor([[[[1.0]]], [[[0.0]]]])  # image i's single pixel is 1 - i: the mix shows lambda
    targets = criterion.targets(torch.tensor([0, 1]), torch.tensor([0, 1]))
    checked = 0
    for seed in range(8):
        mixed_x, mixed = mix_batch(x, targets, mixup=1.0, cutmix=0.0, generator=torch.Generator().manual_seed(seed))
        for i in range(2):
            own = float(mixed_x[i].flatten()[0])  # lam * (1 - i) + (1 - lam) * (1 - partner)
            if own in (0.0, 1.0):
                continue  # mixed with itself
            lam = own if i == 0 else 1 - own
            partner = 1 - i
            torch.testing.assert_close(mixed[i], lam * targets[i] + (1 - lam) * targets[partner])
            torch.testing.assert_close(mixed[i, :3].sum(), torch.tensor(1.0))
            checked += 1
    assert checked > 0
