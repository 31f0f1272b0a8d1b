"""Training: `fit()` runs a whole run, `train_one_epoch()` one pass; recipes, checkpoints, resume, DDP.

A run folder (see `ferkit.runs`) holds `config.json` (the resolved recipe, versions and data
identity), `checkpoint.pt` (everything needed to resume, written atomically after every epoch),
`best.safetensors` (best validation accuracy) and `last.safetensors`, `metrics.csv` (one row per
epoch), and at the end `test_metrics.json` plus the curves and confusion-matrix figures. The
weights' metadata carries the recipe and the preprocessing (views, training class prior).
Model selection sees only the validation split; the test split is scored once, at the end.

Under `torchrun --nproc_per_node=N` the same `fit()` runs with DistributedDataParallel: every rank
trains on its own shard of each epoch's shuffle and only rank 0 writes files.
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

from .augment import AugmentConfig, mix_batch, train_transform
from .data import FerData, load_fer2013
from .devices import autocast_dtype, pick_device
from .evaluate import compute_metrics
from .inference import VIEW_COUNTS, Preprocessing, predict_logits, preprocess, to_tensor
from .labels import EMOTIONS, NUM_CLASSES
from .models import ARCH_RENAMES, create_model
from .plots import plot_confusion, plot_curves
from .runs import (
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    METRICS_CSV,
    TEST_METRICS,
    read_metrics_csv,
    write_config_json,
    write_metrics_csv,
)
from .weights import WeightsMeta, load_model, save_weights, unwrap


@dataclass
class TrainConfig:
    """One training run. The defaults are the reference recipe: seed CNN, Adam 1e-3, 50 epochs."""

    data: str | None = field(default=None, metadata={"help": "FER-2013 source (default: $FERKIT_DATA)"})
    run_dir: str = field(default="runs/reference", metadata={"help": "run folder: checkpoint, weights, metrics"})
    preset: str = field(default="reference",
                        metadata={"help": "named recipe: reference, fast or accurate; flags override it"})
    arch: str = field(default="refcnn", metadata={"help": "architecture from the model registry"})
    epochs: int = 50
    batch_size: int = field(default=64, metadata={"help": "images per step and process"})
    optimizer: str = field(default="adam", metadata={"help": "adam, adamw or sgd (Nesterov momentum)"})
    lr: float = 1e-3
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = 0.0
    schedule: str = field(default="plateau", metadata={"help": "plateau, onecycle or cosine"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up for cosine"})
    plateau_factor: float = field(default=0.5, metadata={"help": "ReduceLROnPlateau factor"})
    plateau_patience: int = field(default=2, metadata={"help": "ReduceLROnPlateau patience (epochs)"})
    label_smoothing: float = 0.0
    class_weights: bool = field(default=False, metadata={"help": "weight the loss by inverse class frequency"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    rotate_degrees: float = field(default=10.0, metadata={"help": "random rotation range, +-degrees"})
    shift_pixels: int = field(default=0, metadata={"help": "random crop of the zero-padded image, +-pixels"})
    erasing: float = field(default=0.0, metadata={"help": "random-erasing probability"})
    mixup: float = field(default=0.0, metadata={"help": "mixup Beta alpha (0: off)"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix Beta alpha (0: off)"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the weights per step (0: off), e.g. 0.999"})
    views: int = field(default=1, metadata={"help": "test-time views per face, stored in the weights: 1, 2 (mirror) or "
                                                    "10 (five positions, each mirrored)", "choices": VIEW_COUNTS})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast where the device supports it"})
    channels_last: bool = True
    eval_batch_size: int = 512
    limit_train: int = field(default=0, metadata={"help": "train on a seeded random N of the training images (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @classmethod
    def from_preset(cls, preset: str = "reference", **overrides: Any) -> TrainConfig:
        """The named recipe, with `overrides` on top (old option names accepted with a warning)."""
        if preset in PRESET_RENAMES:
            _renamed("preset", preset, PRESET_RENAMES[preset])
            preset = PRESET_RENAMES[preset]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **upgrade_config(overrides, warn=True), "preset": preset})


def _renamed(kind: str, old: str, new: str) -> None:
    warnings.warn(f"the {kind} {old!r} is now called {new!r}; the old name goes in 0.3", FutureWarning, stacklevel=3)


def upgrade_config(values: dict[str, Any], warn: bool = False) -> dict[str, Any]:
    """TrainConfig fields as ferkit 0.1 named them (`out`, `tta`, old preset and arch names) -> today's."""
    values = dict(values)
    if "out" in values:
        if warn:
            _renamed("option", "out", "run_dir")
        values["run_dir"] = values.pop("out")
    if "tta" in values:
        if warn:
            _renamed("option", "tta", "views")
        tta = values.pop("tta")
        values["views"] = {"none": 1, "flip": 2, "crops": 10}.get(tta, tta)
    if values.get("preset") in PRESET_RENAMES:
        values["preset"] = PRESET_RENAMES[values["preset"]]
    if values.get("arch") in ARCH_RENAMES:
        if warn:
            _renamed("architecture", values["arch"], ARCH_RENAMES[values["arch"]])
        values["arch"] = ARCH_RENAMES[values["arch"]]
    return values


PRESETS: dict[str, dict[str, Any]] = {
    # The reference recipe, unchanged: the dataclass defaults.
    "reference": {},
    # Reaches the reference's test accuracy in a fraction of its time on a 2-core CPU.
    "fast": {
        "run_dir": "runs/fast", "epochs": 16, "batch_size": 128, "optimizer": "adamw", "lr": 4e-3,
        "weight_decay": 0.05, "schedule": "onecycle", "label_smoothing": 0.1, "shift_pixels": 3, "views": 2,
    },
    # The most accurate single model in about 150 minutes on a 2-core CPU: the fast recipe's AdamW + one-cycle
    # on a ResNet, trained ~8x longer behind stronger augmentation, with an EMA of the weights and ten-view TTA.
    # Its full run: 71.80% PrivateTest in 138 min. Mixup and erasing at 0.5 are there because without them
    # (125 epochs, erasing 0.25) validation peaked at epoch 65 and slid as the model overfit: 70.55%.
    "accurate": {
        "run_dir": "runs/accurate", "arch": "resnet", "epochs": 120, "batch_size": 128, "optimizer": "adamw",
        "lr": 3e-3, "weight_decay": 0.05, "schedule": "onecycle", "label_smoothing": 0.1, "shift_pixels": 4,
        "erasing": 0.5, "mixup": 0.2, "ema_decay": 0.999, "views": 10,
    },
}
PRESET_RENAMES = {"seed": "reference", "best": "accurate"}
"""Presets' names before 0.2, accepted with a warning until 0.3."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepContext:
    """What a training step needs besides the model and the batch."""

    device: torch.device
    augment: AugmentConfig
    amp_dtype: torch.dtype | None
    channels_last: bool
    class_weights: torch.Tensor | None = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    step_scheduler: Any = None
    ema: AveragedModel | None = None
    num_classes: int = NUM_CLASSES


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    ctx: StepContext,
    batch_size: int,
    generator: torch.Generator,
    progress: tqdm | None = None,
    order: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over `images` (uint8, on the device) in `order` (default: a fresh shuffle).

    Returns the mean loss, the accuracy against the unmixed labels, and images/s.
    """
    model.train()
    if order is None:
        order = torch.randperm(len(labels), generator=generator)
    order = order.to(ctx.device)
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        index = order[first : first + batch_size]
        x = train_transform(images[index], ctx.augment, generator)
        y = labels[index]
        x, targets = mix_batch(x, F.one_hot(y, ctx.num_classes).float(), ctx.mixup, ctx.cutmix, generator)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.float32, enabled=bool(ctx.amp_dtype)):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), targets, weight=ctx.class_weights, label_smoothing=ctx.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ctx.step_scheduler is not None:
            ctx.step_scheduler.step()
        if ctx.ema is not None:
            ctx.ema.update_parameters(model)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress is not None:
            progress.update(1)
            if progress.n % 20 == 0 or seen == len(order):
                rate = seen / (time.perf_counter() - start)
                progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / seen:.3f}", ips=f"{rate:.0f}")
    elapsed = time.perf_counter() - start
    totals = torch.tensor([loss_sum.item(), float(correct.item()), float(seen)], device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {"loss": totals[0].item() / totals[2].item(), "acc": totals[1].item() / totals[2].item(),
            "images_per_s": totals[2].item() / elapsed}


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment, if any: nccl on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size, local_rank), device


def shard_order(order: torch.Tensor, env: Distributed) -> torch.Tensor:
    """This rank's share of a shuffle, padded by wrapping so that every rank takes the same number of steps."""
    if env.world_size == 1:
        return order
    per_rank = -(-len(order) // env.world_size)
    padded = torch.cat([order, order[: per_rank * env.world_size - len(order)]])
    return padded[env.rank :: env.world_size]


def fit(config: TrainConfig, data: FerData | None = None) -> Path:
    """Run (or resume) training as `config` says; returns the run folder."""
    env, device = init_distributed(config.device)
    run_dir = Path(config.run_dir)
    data = data or load_fer2013(config.data)
    seed_everything(config.seed)
    model = create_model(config.arch).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    train = data["train"]
    subset = _training_subset(len(train), config.limit_train, config.seed)
    images = to_tensor(train.images[subset]).to(device)
    labels = torch.from_numpy(train.labels[subset]).to(device)
    shard_size = -(-len(labels) // env.world_size)
    steps_per_epoch = -(-shard_size // config.batch_size)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    # The EMA averages parameters only; its BatchNorm statistics are re-estimated before each use.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=False) \
        if config.ema_decay > 0 else None
    state = _start_or_resume(run_dir, config, model, optimizer, scheduler, ema)
    first_epoch = state["epoch"]
    if env.world_size > 1:
        model = _distributed_model(model, device)
    ctx = StepContext(
        device, AugmentConfig(config.hflip, config.rotate_degrees, config.shift_pixels, config.erasing),
        autocast_dtype(device, config.amp), config.channels_last,
        class_weights=_class_weights(train.labels[subset]).to(device) if config.class_weights else None,
        label_smoothing=config.label_smoothing, mixup=config.mixup, cutmix=config.cutmix,
        step_scheduler=None if config.schedule == "plateau" else scheduler, ema=ema,
    )
    if env.is_main:
        print(f"ferkit: training {config.arch} ({config.preset} preset) on {device} x{env.world_size} "
              f"({ctx.amp_dtype or 'float32'}), {len(labels)} images, epochs {state['epoch'] + 1}..{config.epochs} "
              f"-> {run_dir}", flush=True)
    for epoch in range(state["epoch"], config.epochs):
        # Per-epoch seeds make a resumed run take the same shuffles and augmentations as an unbroken one;
        # every rank draws the same shuffle and its own augmentations.
        seed_everything(config.seed * 1000 + epoch + 7919 * env.rank)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch + 7919 * env.rank)
        started = time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not (config.progress and env.is_main), leave=False, unit="batch") as bar:
            train_stats = train_one_epoch(model, optimizer, images, labels, ctx, config.batch_size, generator, bar,
                                          order=shard_order(order, env))
        scored = ema.module if ema is not None else unwrap(model)
        if ema is not None:
            refresh_batchnorm(ema.module, images[_bn_subset(len(labels), config.seed)], config.eval_batch_size)
        val = compute_metrics(predict_logits(scored, data["val"].images, device, config.eval_batch_size),
                              data["val"].labels)
        if dist.is_initialized():
            # Each rank's BatchNorm statistics end the epoch on its own last batch, so the ranks' scores differ
            # in the last digits: take rank 0's everywhere, so that every rank's plateau schedule decides alike
            # (else the ranks' learning rates, then their weights, drift apart).
            shared = torch.tensor([val["loss"], val["accuracy"]], dtype=torch.float64, device=device)
            dist.broadcast(shared, src=0)
            val["loss"], val["accuracy"] = shared.tolist()
        lr = optimizer.param_groups[0]["lr"]
        if config.schedule == "plateau":
            scheduler.step(val["loss"])
        row = {
            "epoch": epoch + 1, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
            "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": lr,
            "images_per_s": train_stats["images_per_s"], "seconds": time.perf_counter() - started,
        }
        state["history"].append(row)
        state["epoch"] = epoch + 1
        is_best = val["accuracy"] > state["best_val_acc"]
        state["best_val_acc"] = max(state["best_val_acc"], val["accuracy"])
        if env.is_main:
            _save_epoch(run_dir, config, data, scored, model, optimizer, scheduler, ema, state, is_best)
            if epoch == first_epoch:  # with the first checkpoint: a run folder is made by a finished epoch
                write_config_json(run_dir, asdict(config), data)
            print(f"epoch {epoch + 1:3d}/{config.epochs}  "
                  f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                  f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {lr:.2e}  "
                  f"{row['images_per_s']:.0f} img/s  {row['seconds']:.0f}s", flush=True)
    if env.is_main:
        finish_run(run_dir, data, device, config.eval_batch_size)
    if dist.is_initialized():
        # The DDP wrapper's reducer must die before its process group does: freed after it, at exit,
        # it can abort the process.
        del model, ctx
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def _distributed_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP; on GPUs BatchNorm statistics are synchronised across ranks (SyncBatchNorm is GPU-only).

    On CPUs each rank normalises over its own batch of `batch_size` images, exactly what a single
    process does, and DDP broadcasts rank 0's running statistics so that every rank holds the same.
    """
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(model)


BN_REFRESH_IMAGES = 4096


def _bn_subset(total: int, seed: int) -> torch.Tensor:
    """A fixed, seeded sample of training indices for re-estimating BatchNorm statistics."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:BN_REFRESH_IMAGES]


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> None:
    """Re-estimate `model`'s BatchNorm running statistics on uint8 `images`, unaugmented.

    Averaged (EMA) weights need statistics of their own: the average of past statistics does not
    fit the average of past weights. Measured on the best preset at epoch 6: raw model 45% val,
    EMA with averaged statistics 30%, the same EMA with re-estimated statistics 41.5%.
    """
    batches = [preprocess(images[i : i + batch_size], images.device).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(images), batch_size)]
    update_bn(batches, model)
    model.eval()


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters, as is usual for SGD and AdamW recipes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adam, adamw or sgd")


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """ReduceLROnPlateau steps once an epoch on the validation loss; the others step every batch."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
        )
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=0.2)
    if config.schedule == "cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(total - warmup, 1)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"unknown schedule {config.schedule!r}; choose plateau, onecycle or cosine")


def class_prior(labels: np.ndarray) -> tuple[float, ...]:
    """Each class's share of the training labels: the prior that `prior="uniform"` divides out."""
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    return tuple(float(c) for c in counts / counts.sum())


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1: rare classes like disgust count for more."""
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    weights = counts.sum() / np.maximum(counts, 1) / NUM_CLASSES
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def finish_run(run_dir: Path, data: FerData, device: torch.device, batch_size: int = 512) -> dict[str, Any]:
    """Score the best checkpoint once on the test split; write test_metrics.json and the figures."""
    model, meta = load_model(run_dir / BEST_WEIGHTS, device)
    metrics = compute_metrics(predict_logits(model, data["test"].images, device, batch_size, meta.preprocessing),
                              data["test"].labels)
    metrics["best_epoch"] = meta.epoch
    metrics["views"] = meta.views
    (run_dir / TEST_METRICS).write_text(json.dumps(metrics, indent=2))
    history = read_metrics_csv(run_dir / METRICS_CSV)
    plot_curves(history, run_dir / "curves.png", title=f"{meta.arch}: {run_dir.name}")
    plot_confusion(metrics["confusion_matrix"], EMOTIONS, run_dir / "confusion_matrix_test.png",
                   title=f"{meta.arch}, PrivateTest: accuracy {100 * metrics['accuracy']:.2f}%")
    print(f"ferkit: best epoch {meta.epoch}, test accuracy {100 * metrics['accuracy']:.2f}% ({meta.views} view"
          f"{'s' * (meta.views > 1)}), loss {metrics['loss']:.4f} -> {run_dir / TEST_METRICS}", flush=True)
    return metrics


def _training_subset(total: int, limit: int, seed: int) -> np.ndarray:
    """All indices, or a seeded random `limit` of them (the data is stored sorted by class)."""
    if not limit or limit >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:limit])


def _save_epoch(
    run_dir: Path, config: TrainConfig, data: FerData, scored: nn.Module, model: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, ema: AveragedModel | None, state: dict[str, Any],
    is_best: bool,
) -> None:
    row = state["history"][-1]
    meta = WeightsMeta(
        arch=config.arch, data_source=data.source, epoch=row["epoch"], recipe=asdict(config),
        preprocessing=Preprocessing(views=config.views, class_prior=class_prior(
            data["train"].labels[_training_subset(len(data["train"]), config.limit_train, config.seed)])),
        metrics={"val_acc": row["val_acc"], "val_loss": row["val_loss"], "train_acc": row["train_acc"]},
    )
    if is_best:
        save_weights(run_dir / BEST_WEIGHTS, scored, meta)
    save_weights(run_dir / LAST_WEIGHTS, scored, meta)
    _save_checkpoint(run_dir, config, model, optimizer, scheduler, ema, state)
    write_metrics_csv(run_dir / METRICS_CSV, state["history"])


def _start_or_resume(
    run_dir: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    ema: AveragedModel | None,
) -> dict[str, Any]:
    checkpoint = run_dir / "checkpoint.pt"
    if not config.resume:
        if checkpoint.exists():
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or a new --out")
        return {"epoch": 0, "best_val_acc": -1.0, "history": []}
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: nothing to resume")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved_arch = upgrade_config(saved["config"])["arch"]
    if saved_arch != config.arch:
        raise ValueError(f"{checkpoint} was trained as {saved_arch!r}, not {config.arch!r}")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        if "ema" not in saved:
            raise ValueError(f"{checkpoint} has no EMA weights to resume --ema-decay from")
        ema.load_state_dict(saved["ema"])
    return {"epoch": saved["epoch"], "best_val_acc": saved["best_val_acc"], "history": saved["history"]}


def _save_checkpoint(
    run_dir: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    ema: AveragedModel | None, state: dict[str, Any],
) -> None:
    """Write-then-rename, so that a kill at any moment leaves the previous checkpoint whole."""
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if not callable(v)}
    payload = {
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler_state,
        "config": asdict(config), **state,
    }
    if ema is not None:
        payload["ema"] = ema.state_dict()
    tmp = run_dir / f".checkpoint.pt.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / "checkpoint.pt")
