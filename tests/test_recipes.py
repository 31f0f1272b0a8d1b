"""Every training option of TrainConfig does what it says, shown on real faces.

Mixup and CutMix, random erasing, shifts, label smoothing, class weights, the optimisers and their
weight-decay groups, the schedules, EMA (and its resume), test-time augmentation, the presets, and
one training step of every architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

import ferkit.train as train_module
from conftest import take
from ferkit.augment import AugmentConfig, mix_batch, random_affine, random_erasing
from ferkit.cli import main as cli_main
from ferkit.data import FerData
from ferkit.evaluate import compute_metrics, evaluate_weights
from ferkit.inference import DEFAULT_PREPROCESSING, make_views, predict_logits, preprocess, to_tensor
from ferkit.labels import EMOTIONS, NUM_CLASSES
from ferkit.losses import Criterion
from ferkit.models import create_model, list_models
from ferkit.runs import read_checkpoint
from ferkit.train import (
    PRESETS,
    StepContext,
    TrainConfig,
    _class_weights,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    fit,
    read_metrics_csv,
    train_one_epoch,
)
from ferkit.weights import load_model, read_meta, save_weights

CPU = torch.device("cpu")
PLAIN = AugmentConfig(hflip=False, rotate_degrees=0)


@pytest.fixture(scope="module")
def faces(small_data: FerData) -> tuple[np.ndarray, np.ndarray]:
    """32 real training faces (uint8, 48x48) and their labels, every class represented."""
    images, labels = small_data["train"].images[::9][:32], small_data["train"].labels[::9][:32]
    assert len(np.unique(labels)) == NUM_CLASSES
    return images, labels


def _one_hot(labels: np.ndarray) -> torch.Tensor:
    return F.one_hot(torch.from_numpy(labels), NUM_CLASSES).float()


# ---------------------------------------------------------------------------------------------
# Mixup and CutMix


def _lam_from_targets(targets: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    """The one (lambda, 1 - lambda) of a mixed batch, read off the rows whose two labels differ.

    Both as the float32 numbers that multiplied the images (1 - lambda is rounded on its own).
    """
    rows = [i for i in range(len(labels)) if (targets[i] > 0).sum() == 2]
    assert rows, "no pair of different labels was mixed"
    pairs = set()
    for i in rows:
        other = [c for c in torch.nonzero(targets[i]).flatten().tolist() if c != labels[i]]
        pairs.add((float(targets[i, labels[i]]), float(targets[i, other[0]])))
    assert len(pairs) == 1, f"one lambda per batch, got {pairs}"
    return pairs.pop()


def _check_targets(targets: torch.Tensor, labels: np.ndarray, partner: list[int], lam: float) -> None:
    """Each soft target is lam * one_hot(own label) + (1 - lam) * one_hot(partner's label)."""
    torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)), rtol=0, atol=1e-6)
    expected = lam * _one_hot(labels) + (1 - lam) * _one_hot(labels[partner])
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-6)
    for i, j in enumerate(partner):
        nonzero = set(torch.nonzero(targets[i]).flatten().tolist())
        assert nonzero == {int(labels[i]), int(labels[j])}


def test_mixup_blends_each_face_with_one_partner_and_mixes_the_labels_alike(
    faces: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = faces
    x = preprocess(images)
    seen_lams = []
    for seed in range(4):
        mixed, targets = mix_batch(x, _one_hot(labels), mixup=0.4, cutmix=0.0,
                                   generator=torch.Generator().manual_seed(seed))
        assert mixed.shape == x.shape and targets.shape == (32, NUM_CLASSES)
        lam, rest = _lam_from_targets(targets, labels)
        assert 0 < lam < 1 and lam + rest == pytest.approx(1, abs=1e-6)
        partner = []
        for i in range(32):
            # Exactly (bit for bit) a convex combination of this face and one face of the batch.
            matches = [j for j in range(32) if torch.equal(mixed[i], lam * x[i] + rest * x[j])]
            assert len(matches) == 1, f"seed {seed}, image {i}: {matches}"
            partner.append(matches[0])
        assert sorted(partner) == list(range(32)), "the partners are a permutation of the batch"
        assert sum(j != i for i, j in enumerate(partner)) > 24
        _check_targets(targets, labels, partner, lam)
        seen_lams.append(lam)
    assert len(set(seen_lams)) == 4  # a fresh Beta draw per batch
    # Reproducible from the generator; no mixing at all when both alphas are 0.
    again = mix_batch(x, _one_hot(labels), 0.4, 0.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(again[0], mixed, rtol=0, atol=0)
    same, same_targets = mix_batch(x, _one_hot(labels), 0.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, x) and torch.equal(same_targets, _one_hot(labels))


def _explain_cutmix(x: torch.Tensor, mixed: torch.Tensor) -> tuple[tuple[int, int, int, int], list[int]] | None:
    """The pasted box (top, bottom, left, right) and each image's partner, or None if not a CutMix."""
    changed = (mixed != x).any(0).any(0)  # pixels that differ in some image of the batch
    if not changed.any():
        return (0, 0, 0, 0), list(range(len(x)))
    rows, cols = torch.nonzero(changed.any(1)).flatten(), torch.nonzero(changed.any(0)).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = torch.zeros(x.shape[-2:], dtype=torch.bool)
    box[top:bottom, left:right] = True
    partner = []
    for i in range(len(x)):
        if not torch.equal(mixed[i][:, ~box], x[i][:, ~box]):
            return None  # pixels outside one rectangle changed
        matches = [j for j in range(len(x)) if torch.equal(mixed[i][:, box], x[j][:, box])]
        if len(matches) != 1:
            return None
        partner.append(matches[0])
    return (top, bottom, left, right), partner


def test_cutmix_pastes_one_rectangle_from_a_partner_and_lambda_is_the_kept_area(
    faces: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = faces
    x = preprocess(images)
    areas = []
    for seed in range(6):
        mixed, targets = mix_batch(x, _one_hot(labels), mixup=0.0, cutmix=1.0,
                                   generator=torch.Generator().manual_seed(seed))
        explained = _explain_cutmix(x, mixed)
        assert explained is not None, f"seed {seed}: not one box pasted from one partner"
        (top, bottom, left, right), partner = explained
        assert sorted(partner) == list(range(32))
        area = (bottom - top) * (right - left) / (48 * 48)
        lam = 1 - area
        _check_targets(targets, labels, partner, lam)
        areas.append(area)
    assert len(set(areas)) > 3 and max(areas) > 0.1  # real boxes of varying size


def test_with_both_on_each_batch_is_either_mixup_or_cutmix(faces: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = faces
    x = preprocess(images[:8])
    kinds = []
    for seed in range(16):
        mixed, _ = mix_batch(x, _one_hot(labels[:8]), mixup=1.0, cutmix=1.0,
                             generator=torch.Generator().manual_seed(seed))
        kinds.append("cutmix" if _explain_cutmix(x, mixed) is not None else "mixup")
    assert 3 <= kinds.count("cutmix") <= 13, kinds


# ---------------------------------------------------------------------------------------------
# Random erasing and shifts


def _erased_box(out: torch.Tensor, plain: torch.Tensor) -> tuple[int, int] | None:
    """(height, width) of the one zero rectangle in `out` (1, 48, 48), or None if nothing was erased;
    fails unless everything else is `plain`."""
    erased = (out[0] == 0).numpy()
    if not erased.any():
        assert torch.equal(out, plain)
        return None
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    assert erased[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all(), "the erased pixels are not one rectangle"
    assert erased.sum() == len(rows) * len(cols)
    keep = torch.from_numpy(~erased)
    assert torch.equal(out[0][keep], plain[0][keep]), "pixels outside the rectangle changed"
    return len(rows), len(cols)


def test_random_erasing_blanks_exactly_one_rectangle_of_the_configured_size(
    faces: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = faces
    plain = preprocess(images)
    assert not (plain == 0).any()  # 127.5 is no uint8 value: 0 (mid-grey) marks erased pixels
    # Through the training transform, with the default range: 2-25% of the image, aspect 0.3-3.3.
    config = AugmentConfig(hflip=False, rotate_degrees=0, erasing=1.0)
    out = train_module.train_transform(to_tensor(images), config, torch.Generator().manual_seed(0))
    sizes = [_erased_box(out[i], plain[i]) for i in range(32)]
    assert None not in sizes
    for height, width in sizes:  # type: ignore[misc]
        # A box of real size h x w covers between h-1 and h+1 rows (and so on) of pixels.
        assert (height - 1) * (width - 1) <= 0.25 * 48 * 48 and (height + 1) * (width + 1) >= 0.02 * 48 * 48
        assert (width - 1) / (height + 1) <= 3.3 and (width + 1) / (height - 1 or 1) >= 0.3
    assert len(set(sizes)) > 20
    # A fixed size and shape: a 0.1 * 2304 = 230.4 pixel square, so 15 or 16 pixels a side.
    fixed = random_erasing(plain, 1.0, torch.Generator().manual_seed(1), area=(0.1, 0.1), aspect=(1.0, 1.0))
    for i in range(32):
        height, width = _erased_box(fixed[i], plain[i])  # type: ignore[misc]
        assert height in (15, 16) and width in (15, 16)
    # Probability 0 changes nothing; 0.5 erases about half.
    assert torch.equal(random_erasing(plain, 0.0, torch.Generator().manual_seed(2)), plain)
    half = random_erasing(plain, 0.5, torch.Generator().manual_seed(2))
    erased = sum(_erased_box(half[i], plain[i]) is not None for i in range(32))
    assert 8 <= erased <= 24


def test_shift_pixels_translates_by_whole_pixels_up_to_the_limit_with_black_fill(
    faces: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = faces
    batch = to_tensor(images[:24]).float() / 255.0
    limit, search = 3, 5
    out = random_affine(batch, degrees=0, shift_pixels=limit, generator=torch.Generator().manual_seed(0))
    padded = F.pad(batch, (search, search, search, search), value=0.0)  # black beyond the edges
    shifts = []
    for i in range(24):
        matches = [(dy, dx) for dy in range(-search, search + 1) for dx in range(-search, search + 1)
                   if torch.equal(out[i], padded[i, :, search + dy : search + dy + 48, search + dx : search + dx + 48])]
        assert len(matches) == 1, f"image {i} is not one shifted copy of its input: {matches}"
        dy, dx = matches[0]
        assert max(abs(dy), abs(dx)) <= limit
        shifts.append((dy, dx))
    assert len(set(shifts)) > 8
    assert {dy for dy, _ in shifts} >= {-limit, limit} or {dx for _, dx in shifts} >= {-limit, limit}
    # No shift and no rotation is the identity.
    same = random_affine(batch, degrees=0, shift_pixels=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, batch)


# ---------------------------------------------------------------------------------------------
# The loss: label smoothing and class weights


def _loss_of_one_step(model: nn.Module, images: np.ndarray, labels: np.ndarray, **loss_options: Any) -> float:
    """The loss train_one_epoch computes on one batch of `images`, before its optimiser step."""
    ctx = StepContext(CPU, PLAIN, None, False)
    trained = copy.deepcopy(model)  # leaves `model` untouched
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.0)
    torch.manual_seed(11)  # the dropout masks
    stats = train_one_epoch(trained, Criterion(**loss_options), optimizer, to_tensor(images), torch.from_numpy(labels),
                            ctx, len(labels), torch.Generator().manual_seed(0), order=torch.arange(len(labels)))
    return stats["loss"]


def _hand_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray, smoothing: float = 0.0,
               weights: torch.Tensor | None = None) -> float:
    """-mean over images of sum_c w_c t_c log softmax(logits)_c, t = (1 - eps) one_hot + eps / C."""
    torch.manual_seed(11)
    with torch.no_grad():
        log_p = torch.log_softmax(copy.deepcopy(model).train()(preprocess(images)).double(), 1)
    target = (1 - smoothing) * _one_hot(labels).double() + smoothing / NUM_CLASSES
    w = torch.ones(NUM_CLASSES, dtype=torch.float64) if weights is None else weights.double()
    return float(-(target * w * log_p).sum(1).mean())


@pytest.fixture(scope="module")
def real_train_labels(data_root: Path) -> np.ndarray:
    """The labels of the whole real FER-2013 training split, counted from its class folders."""
    counts = [sum(name.startswith("Training_") for name in os.listdir(data_root / "train" / cls)) for cls in EMOTIONS]
    return np.repeat(np.arange(NUM_CLASSES), counts)


def test_class_weights_are_inverse_frequency_with_mean_1_and_disgust_largest(real_train_labels: np.ndarray) -> None:
    counts = np.bincount(real_train_labels, minlength=NUM_CLASSES)
    assert counts.sum() == 28709 and counts.argmin() == EMOTIONS.index("disgust")
    weights = _class_weights(real_train_labels)
    assert weights.dtype == torch.float32 and weights.shape == (NUM_CLASSES,)
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-6)
    products = weights.double().numpy() * counts
    np.testing.assert_allclose(products, products[0], rtol=1e-6)  # weight x count is the same for every class
    assert int(weights.argmax()) == EMOTIONS.index("disgust") and int(weights.argmin()) == EMOTIONS.index("happy")
    disgust, happy = float(weights[EMOTIONS.index("disgust")]), float(weights[EMOTIONS.index("happy")])
    assert disgust / happy == pytest.approx(7215 / 436, rel=1e-5) and disgust > 4
    # A balanced subset gets equal weights.
    torch.testing.assert_close(_class_weights(np.repeat(np.arange(NUM_CLASSES), 5)), torch.ones(NUM_CLASSES))


def test_label_smoothing_and_class_weights_change_the_training_loss_as_written(
    faces: tuple[np.ndarray, np.ndarray], real_train_labels: np.ndarray,
) -> None:
    images, labels = faces
    torch.manual_seed(0)
    model = create_model("refcnn")
    weights = _class_weights(real_train_labels)
    plain = _loss_of_one_step(model, images, labels)
    assert plain == pytest.approx(_hand_loss(model, images, labels), rel=1e-5)
    assert plain == pytest.approx(F.cross_entropy(_logits_like_training(model, images), torch.from_numpy(labels))
                                  .item(), rel=1e-5)
    smoothed = _loss_of_one_step(model, images, labels, label_smoothing=0.2)
    assert smoothed == pytest.approx(_hand_loss(model, images, labels, smoothing=0.2), rel=1e-5)
    weighted = _loss_of_one_step(model, images, labels, class_weights=weights)
    assert weighted == pytest.approx(_hand_loss(model, images, labels, weights=weights), rel=1e-5)
    both = _loss_of_one_step(model, images, labels, class_weights=weights, label_smoothing=0.2)
    assert both == pytest.approx(_hand_loss(model, images, labels, 0.2, weights), rel=1e-5)
    assert len({round(v, 5) for v in (plain, smoothed, weighted, both)}) == 4
    # The weighted loss counts each disgust face for more: only the disgust faces, weighted, cost more.
    disgust = labels == EMOTIONS.index("disgust")
    assert disgust.any()
    assert _loss_of_one_step(model, images[disgust], labels[disgust], class_weights=weights) == pytest.approx(
        float(weights[EMOTIONS.index("disgust")]) * _loss_of_one_step(model, images[disgust], labels[disgust]),
        rel=1e-5)


def _logits_like_training(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    torch.manual_seed(11)
    with torch.no_grad():
        return copy.deepcopy(model).train()(preprocess(images))


# ---------------------------------------------------------------------------------------------
# Optimisers and schedules


def _decays(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("arch", ["refcnn", "vgg_small"])
def test_optimizers_and_their_weight_decay_groups(arch: str) -> None:
    model = create_model(arch)
    named = dict(model.named_parameters())
    matrices = {name for name, p in named.items() if p.ndim > 1}  # conv and linear weights
    vectors = set(named) - matrices  # biases, BatchNorm weights and biases
    assert matrices and any(name.endswith(".bias") for name in vectors)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    adam = build_optimizer(TrainConfig(optimizer="adam", lr=2e-3, weight_decay=1e-4), model)
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 2e-3
    assert set(_decays(adam).values()) == {1e-4}  # the reference's Adam: L2 on every parameter
    assert len(_decays(adam)) == len(named)

    for name, kind in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        optimizer = build_optimizer(TrainConfig(optimizer=name, lr=0.05, weight_decay=0.01, momentum=0.8), model)
        assert type(optimizer) is kind
        decays = _decays(optimizer)
        assert len(decays) == len(named)  # every parameter exactly once
        assert {n for n, p in named.items() if decays[id(p)] == 0.01} == matrices
        assert {n for n, p in named.items() if decays[id(p)] == 0.0} == vectors
        assert all(group["lr"] == 0.05 for group in optimizer.param_groups)
        if name == "sgd":
            assert all(g["nesterov"] and g["momentum"] == 0.8 for g in optimizer.param_groups)
        # With zero gradients only the decay moves weights: matrices shrink, biases and BatchNorm stay.
        before = {n: p.detach().clone() for n, p in named.items()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for n, p in named.items():
            if n in matrices:
                assert p.abs().sum() < before[n].abs().sum(), n
            else:
                assert torch.equal(p, before[n]), n
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(before[n])

    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose adam, adamw or sgd"):
        build_optimizer(TrainConfig(optimizer="rmsprop"), model)


def _lr_trace(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of every training step, stepping the scheduler as train_one_epoch does."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    trace = []
    for _ in range(config.epochs * steps_per_epoch):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace


def test_onecycle_rises_to_lr_then_anneals_far_below_it() -> None:
    lr, epochs, steps = 0.05, 5, 20
    trace = _lr_trace(TrainConfig(schedule="onecycle", lr=lr, epochs=epochs), steps)
    peak = int(np.argmax(trace))
    assert trace[peak] == pytest.approx(lr)
    assert peak == pytest.approx(0.2 * epochs * steps, abs=2)  # 20% warm-up
    assert trace[0] == pytest.approx(lr / 25)
    assert all(a <= b for a, b in itertools.pairwise(trace[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(trace[peak:]))
    assert trace[-1] < lr / 1000


def test_cosine_warms_up_linearly_then_decays_to_zero() -> None:
    lr, epochs, steps = 0.1, 4, 10
    trace = _lr_trace(TrainConfig(schedule="cosine", lr=lr, epochs=epochs, warmup_epochs=1.5), steps)
    warmup = 15
    np.testing.assert_allclose(trace[:warmup], [lr * (k + 1) / warmup for k in range(warmup)], rtol=1e-9)
    assert trace[warmup] == pytest.approx(lr)
    decay = trace[warmup:]
    assert all(a > b for a, b in itertools.pairwise(decay))
    total = epochs * steps
    half_cosine = [lr * 0.5 * (1 + math.cos(math.pi * k / (total - warmup))) for k in range(total - warmup)]
    np.testing.assert_allclose(decay, half_cosine, rtol=1e-9)
    assert decay[len(decay) // 2] == pytest.approx(lr / 2, rel=0.1) and trace[-1] < lr * 0.005
    no_warmup = _lr_trace(TrainConfig(schedule="cosine", lr=lr, epochs=epochs), steps)
    assert no_warmup[0] == pytest.approx(lr) and no_warmup[-1] < lr * 0.005


def test_plateau_halves_the_lr_after_patience_epochs_without_improvement() -> None:
    config = TrainConfig(lr=1e-3)  # the reference: factor 0.5, patience 2
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=100)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    lrs = []
    for val_loss in (1.0, 0.9, 0.95, 0.92, 0.91, 0.85, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9):
        scheduler.step(val_loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    # Epochs 3-4 do not beat 0.9: no change yet; the third in a row (epoch 5) halves it. Epoch 6
    # improves; 7-8 do not; 9 halves again, then the count restarts: 12 halves a third time.
    assert lrs == pytest.approx([1e-3] * 4 + [5e-4] * 4 + [2.5e-4] * 3 + [1.25e-4])
    other = build_scheduler(TrainConfig(plateau_factor=0.1, plateau_patience=0), optimizer, 100)
    assert other.factor == 0.1 and other.patience == 0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown schedule 'step'; choose plateau, onecycle or cosine"):
        build_scheduler(TrainConfig(schedule="step"), optimizer, 10)


# ---------------------------------------------------------------------------------------------
# fit() passes every option on


class _Stop(Exception):
    pass


def test_fit_hands_every_option_to_the_training_step(
    tmp_path: Path, small_data: FerData, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def first_epoch(model: nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    labels: torch.Tensor, ctx: StepContext, batch_size: int, *args: Any, **kwargs: Any) -> None:
        seen.update(model=model, criterion=criterion, optimizer=optimizer, labels=labels, ctx=ctx,
                    batch_size=batch_size)
        raise _Stop

    monkeypatch.setattr(train_module, "train_one_epoch", first_epoch)
    with pytest.raises(_Stop):
        fit(TrainConfig(run_dir=str(tmp_path / "a"), limit_train=100, device="cpu"), small_data)
    ctx, criterion = seen["ctx"], seen["criterion"]
    assert ctx.augment == AugmentConfig(hflip=True, rotate_degrees=10.0, shift_pixels=0, erasing=0.0, mixup=0.0,
                                        cutmix=0.0)
    assert criterion == Criterion(num_classes=7, label_smoothing=0.0, class_weights=None, distributions=None,
                                  distillation=None)
    assert ctx.ema is None
    assert ctx.step_scheduler is None  # plateau steps once an epoch, on the validation loss
    assert seen["batch_size"] == 64 and type(seen["optimizer"]) is torch.optim.Adam

    config = TrainConfig.from_dict(dict(
        run_dir=str(tmp_path / "b"), limit_train=100, device="cpu", batch_size=16, hflip=False, rotate_degrees=5,
        shift_pixels=2, erasing=0.3, mixup=0.2, cutmix=0.5, label_smoothing=0.1, class_weights=True, ema_decay=0.9,
        schedule="cosine", optimizer="sgd", lr=0.05))
    with pytest.raises(_Stop):
        fit(config, small_data)
    ctx, criterion = seen["ctx"], seen["criterion"]
    assert ctx.augment == AugmentConfig(hflip=False, rotate_degrees=5, shift_pixels=2, erasing=0.3, mixup=0.2,
                                        cutmix=0.5)
    assert criterion.label_smoothing == 0.1 and criterion.distillation is None
    assert len(seen["labels"]) == 100
    torch.testing.assert_close(criterion.class_weights, _class_weights(seen["labels"].numpy()))
    assert isinstance(ctx.step_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert type(seen["optimizer"]) is torch.optim.SGD and seen["batch_size"] == 16
    # The EMA averages the model being trained with decay 0.9: after a copy, ema += 0.1 (model - ema).
    ema, model = ctx.ema, seen["model"]
    assert isinstance(ema, AveragedModel)
    ema.update_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for averaged, current in zip(ema.module.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(averaged, current - 0.9, rtol=0, atol=1e-5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# EMA and test-time augmentation in real runs


def _ema_config(out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(run_dir=str(out), limit_train=64, batch_size=32, eval_batch_size=64, progress=False,
                                    device="cpu", ema_decay=0.9, views=10, epochs=2)
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_ema_runs_save_the_averaged_weights_and_resume_them(tmp_path: Path, small_data: FerData) -> None:
    data = take(small_data, {"val": 21, "test": 14})
    unbroken = fit(_ema_config(tmp_path / "unbroken"), data)
    checkpoint = read_checkpoint(unbroken / "checkpoint.safetensors")
    raw, ema = checkpoint["model"], checkpoint["ema"]
    assert set(ema) == {f"module.{name}" for name in raw} | {"n_averaged"}
    assert int(ema["n_averaged"]) == 4  # one update per step: 2 epochs of 64 / 32
    last = load_file(unbroken / "last.safetensors")
    assert last.keys() == raw.keys()
    differ = 0
    for name, tensor in last.items():
        torch.testing.assert_close(tensor, ema[f"module.{name}"], rtol=0, atol=0)  # the EMA, not the raw model
        differ += not torch.equal(tensor, raw[name])
    assert differ > len(raw) / 2
    # Validation scored the EMA weights, and test-time augmentation comes from the config.
    model, meta = load_model(unbroken / "last.safetensors")
    assert meta.views == 10
    history = read_metrics_csv(unbroken / "metrics.csv")
    assert compute_metrics(predict_logits(model, data["val"].images), data["val"].labels).loss == pytest.approx(
        history[-1]["val_loss"], abs=1e-4)
    best, best_meta = load_model(unbroken / "best.safetensors")
    report = json.loads((unbroken / "test_metrics.json").read_text())
    test = compute_metrics(predict_logits(best, data["test"].images, views=10), data["test"].labels)
    assert report["views"] == 10 and report["loss"] == pytest.approx(test.loss, abs=1e-6)
    assert report["loss"] != pytest.approx(compute_metrics(predict_logits(best, data["test"].images),
                                                           data["test"].labels).loss, abs=1e-6)
    if best_meta.epoch == 2:
        assert all(torch.equal(t, ema[f"module.{n}"]) for n, t in load_file(unbroken / "best.safetensors").items())

    # Resume restores the EMA: one epoch then a resumed second equals two epochs, bit for bit.
    broken = fit(_ema_config(tmp_path / "broken", epochs=1), data)
    assert int(read_checkpoint(broken / "checkpoint.safetensors")["ema"]["n_averaged"]) == 2
    fit(_ema_config(broken, resume=True), data)
    resumed = read_checkpoint(broken / "checkpoint.safetensors")
    assert resumed["ema"].keys() == ema.keys()
    for name, tensor in ema.items():
        torch.testing.assert_close(resumed["ema"][name], tensor, rtol=0, atol=0, msg=name)
    for a, b in zip(read_metrics_csv(broken / "metrics.csv"), history, strict=True):
        assert (a["epoch"], a["val_loss"], a["val_acc"]) == (b["epoch"], b["val_loss"], b["val_acc"])


def test_a_checkpoint_without_ema_cannot_resume_with_it(run_copy: Path, small_data: FerData) -> None:
    before = (run_copy / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"--ema-decay 0.0 in the run, 0.9 now"):
        fit(_ema_config(run_copy, limit_train=256, batch_size=64, epochs=3, resume=True, views=1), small_data)
    assert (run_copy / "checkpoint.safetensors").read_bytes() == before


def test_flip_and_crops_tta_average_the_logits_of_their_views(small_data: FerData) -> None:
    torch.manual_seed(0)
    model = create_model("refcnn").eval()
    faces = small_data["val"].images[:12]
    x = preprocess(faces)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
    torch.testing.assert_close(predict_logits(model, faces, views=2, batch_size=5), (plain + mirrored) / 2,
                               rtol=0, atol=1e-5)

    views = make_views(x, 10, DEFAULT_PREPROCESSING.view_shift, -1.0)
    assert len(views) == 10 and DEFAULT_PREPROCESSING.view_shift == 2
    assert torch.equal(views[0], x)
    shifts = []
    for view in views[1:5]:
        found = [(dy, dx) for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)) if torch.equal(view, _shifted(x, dy, dx))]
        assert len(found) == 1
        shifts.extend(found)
    assert sorted(shifts) == sorted([(2, 0), (-2, 0), (0, 2), (0, -2)])
    for view, mirror in zip(views[:5], views[5:], strict=True):
        assert torch.equal(mirror, view.flip(-1))
    with torch.no_grad():
        expected = torch.stack([model(v) for v in views]).mean(0)
    crops = predict_logits(model, faces, views=10, batch_size=5)
    torch.testing.assert_close(crops, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(crops, (plain + mirrored) / 2, atol=1e-3)
    with pytest.raises(ValueError, match="views 3: choose one of 1, 2, 10"):
        predict_logits(model, faces, views=3)


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` moved down by dy and right by dx pixels, the uncovered border black (-1)."""
    out = torch.full_like(x, -1.0)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        x[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def test_evaluate_uses_the_views_in_the_weights(run_copy: Path, small_root: Path, small_data: FerData) -> None:
    model, meta = load_model(run_copy / "best.safetensors")
    assert meta.views == 1
    save_weights(run_copy / "best.safetensors", model,
                 dataclasses.replace(meta, preprocessing=meta.preprocessing.with_views(2)))
    assert read_meta(run_copy / "best.safetensors").views == 2
    test = small_data["test"]
    auto = evaluate_weights(str(run_copy), str(small_root), figures_dir=str(run_copy / "figures"))
    assert auto.views == 2
    flip = compute_metrics(predict_logits(model, test.images, views=2), test.labels)
    assert auto.loss == pytest.approx(flip.loss, abs=1e-6) and auto.accuracy == flip.accuracy
    forced = evaluate_weights(str(run_copy), str(small_root), figures_dir=str(run_copy / "figures"), views=1)
    assert forced.views == 1
    assert forced.loss == pytest.approx(compute_metrics(predict_logits(model, test.images), test.labels).loss,
                                           abs=1e-6)
    assert forced.loss != pytest.approx(auto.loss, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Presets


def test_the_reference_preset_is_the_reference_recipe() -> None:
    seed = TrainConfig.from_preset("reference")
    assert seed == TrainConfig() == TrainConfig.from_preset()
    reference = dict(arch="refcnn", optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="plateau",
                     plateau_factor=0.5, plateau_patience=2, epochs=50, batch_size=64, hflip=True,
                     rotate_degrees=10.0, shift_pixels=0, erasing=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                     class_weights=False, ema_decay=0.0, views=1, limit_train=0, preset="reference")
    assert {k: seed.to_dict()[k] for k in reference} == reference


# The presets as docs/training.md's table gives them: the fields each sets; every other field keeps the reference's.
CAMERA = dict(scale_jitter=0.12, aspect_jitter=0.06, brightness=0.25, contrast=0.3, gamma=0.3, blur=0.15, noise=0.15,
              jpeg=0.15, downsample=0.15)
PINNED_PRESETS: dict[str, dict[str, Any]] = {
    "fast": dict(run_dir="runs/fast", epochs=16, batch_size=128, optimizer="adamw", lr=4e-3, weight_decay=0.05,
                 schedule="onecycle", label_smoothing=0.1, shift_pixels=3, views=2),
    "accurate": dict(run_dir="runs/accurate", arch="resnet", epochs=120, batch_size=128, optimizer="adamw", lr=3e-3,
                     weight_decay=0.05, schedule="onecycle", label_smoothing=0.1, shift_pixels=4, erasing=0.5,
                     mixup=0.2, ema_decay=0.999, views=10),
    "student": dict(run_dir="runs/student", arch="resnet", epochs=100, batch_size=128, optimizer="adamw", lr=3e-3,
                    weight_decay=0.05, schedule="onecycle", label_smoothing=0.1, shift_pixels=4, erasing=0.4,
                    mixup=0.2, ema_decay=0.999, views=1, teacher=["ferkit-resnet"], distill_weight=0.7, **CAMERA),
    "ferplus": dict(run_dir="runs/ferplus", arch="resnet", epochs=16, batch_size=128, optimizer="adamw", lr=1e-3,
                    weight_decay=0.05, schedule="cosine", warmup_epochs=1.0, shift_pixels=4, erasing=0.4, mixup=0.2,
                    ema_decay=0.999, views=1, labels="ferplus-distribution", init="ferkit-resnet", **CAMERA),
}


def test_every_preset_is_pinned_here() -> None:
    assert set(PRESETS) == {"reference", *PINNED_PRESETS}


@pytest.mark.parametrize("name", sorted(PINNED_PRESETS))
def test_other_presets_change_the_recipe_and_flags_override_them(name: str) -> None:
    config = TrainConfig.from_preset(name)
    assert config.to_dict() == {**TrainConfig().to_dict(), **PINNED_PRESETS[name], "preset": name}
    overridden = TrainConfig.from_preset(name, lr=0.123, epochs=2, hflip=False, run_dir="x")
    assert (overridden.lr, overridden.epochs, overridden.augment.hflip, overridden.run_dir) == (0.123, 2, False, "x")
    assert (overridden.schedule, overridden.optimizer) == (PINNED_PRESETS[name]["schedule"], "adamw")
    with pytest.raises(ValueError, match="unknown preset 'fastest'; choose one of: reference, fast, accurate, student"):
        TrainConfig.from_preset("fastest")


def test_cli_preset_fast_trains_with_its_values_and_flags_win(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = cli_main(["train", "--preset", "fast", "--data", str(tiny_root), "--run-dir", str(run), "--epochs", "1",
                     "--limit-train", "14", "--lr", "0.002", "--no-hflip", "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "(fast preset)" in out
    saved = read_checkpoint(run / "checkpoint.safetensors")["config"]
    expected = {**TrainConfig().to_dict(), **PINNED_PRESETS["fast"], "preset": "fast", "data": str(tiny_root),
                "run_dir": str(run), "epochs": 1, "limit_train": 14, "lr": 0.002, "hflip": False, "progress": False,
                "device": "cpu"}
    assert saved == expected
    # The preset's values are in force, the flags on top of them.
    assert (saved["optimizer"], saved["schedule"], saved["batch_size"], saved["weight_decay"]) == (
        "adamw", "onecycle", 128, 0.05)
    assert (saved["label_smoothing"], saved["shift_pixels"], saved["views"]) == (0.1, 3, 2)
    assert (saved["epochs"], saved["lr"], saved["hflip"], saved["rotate_degrees"]) == (1, 0.002, False, 10.0)
    assert read_meta(run / "best.safetensors").views == 2
    assert json.loads((run / "test_metrics.json").read_text())["views"] == 2
    assert json.loads((run / "config.json").read_text())["config"] == expected


# ---------------------------------------------------------------------------------------------
# Every architecture trains


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_takes_a_training_step_on_real_faces(
    arch: str, faces: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = faces
    torch.manual_seed(0)
    model = create_model(arch).to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05), model)
    ctx = StepContext(CPU, AugmentConfig(), autocast_dtype(CPU, True), True)
    stats = train_one_epoch(model, Criterion(label_smoothing=0.1), optimizer, to_tensor(images[:16]),
                            torch.from_numpy(labels[:16]), ctx, 16, torch.Generator().manual_seed(0))
    assert math.isfinite(stats["loss"]) and stats["loss"] == pytest.approx(math.log(7), abs=1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) == len(before)


def test_refresh_batchnorm_re_estimates_statistics_on_real_faces(small_data: FerData) -> None:
    images = to_tensor(small_data["train"].images[:200])
    model = create_model("refcnn").eval()
    first_bn = model.features[0][1]
    first_bn.running_mean.fill_(100.0)
    first_bn.running_var.fill_(1e-3)
    train_module.refresh_batchnorm(model, images, batch_size=50)
    assert not model.training
    with torch.no_grad():
        conv_out = model.features[0][0](preprocess(images))
    # BatchNorm's cumulative statistics: the average over the four batches of each batch's mean and
    # unbiased variance.
    batches = conv_out.split(50)
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(first_bn.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var, expected_var, rtol=1e-4, atol=1e-5)
