"""Training: `fit()` runs a whole run, `train_one_epoch()` one pass; checkpoints, resume, metrics.

A run folder holds `checkpoint.pt` (everything needed to resume, written atomically after every
epoch), `best.safetensors` (best validation accuracy) and `last.safetensors`, `metrics.csv` (one
row per epoch), and at the end `test_metrics.json` plus the curves and confusion-matrix figures.
Model selection sees only the validation split; the test split is scored once, at the end.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import AugmentConfig, to_tensor, train_transform
from .data import FerData, load_fer2013
from .evaluate import compute_metrics, predict_logits
from .labels import EMOTIONS
from .models import create_model
from .plots import plot_confusion, plot_curves
from .weights import WeightsMeta, load_model, save_weights


@dataclass
class TrainConfig:
    """One training run. The defaults are the reference recipe: seed CNN, Adam 1e-3, 50 epochs."""

    data: str | None = field(default=None, metadata={"help": "FER-2013 source (default: $FERKIT_DATA)"})
    out: str = field(default="runs/seed", metadata={"help": "run folder"})
    arch: str = field(default="seed", metadata={"help": "architecture from the model registry"})
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    plateau_factor: float = field(default=0.5, metadata={"help": "ReduceLROnPlateau factor"})
    plateau_patience: int = field(default=2, metadata={"help": "ReduceLROnPlateau patience (epochs)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    rotate_degrees: float = field(default=10.0, metadata={"help": "random rotation range, +-degrees"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast where the device supports it"})
    channels_last: bool = True
    eval_batch_size: int = 512
    limit_train: int = field(default=0, metadata={"help": "train on a seeded random N of the training images (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the hardware computes it natively, else None (train in float32)."""
    if not enabled:
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    ctx: StepContext,
    batch_size: int,
    generator: torch.Generator,
    progress: tqdm | None = None,
) -> dict[str, float]:
    """One pass over `images` (uint8, on the device) in a shuffled order; returns loss, acc, img/s."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    order = torch.randperm(len(labels), generator=generator).to(ctx.device)
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        index = order[first : first + batch_size]
        x = train_transform(images[index], ctx.augment, generator)
        y = labels[index]
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.float32, enabled=bool(ctx.amp_dtype)):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress is not None:
            progress.update(1)
            if progress.n % 20 == 0 or seen == len(order):
                rate = seen / (time.perf_counter() - start)
                progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / seen:.3f}", ips=f"{rate:.0f}")
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "images_per_s": seen / elapsed}


def fit(config: TrainConfig, data: FerData | None = None) -> Path:
    """Run (or resume) training as `config` says; returns the run folder."""
    run_dir = Path(config.out)
    data = data or load_fer2013(config.data)
    device = pick_device(config.device)
    seed_everything(config.seed)
    model = create_model(config.arch).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
    )
    state = _start_or_resume(run_dir, config, model, optimizer, scheduler)
    train = data["train"]
    subset = _training_subset(len(train), config.limit_train, config.seed)
    images = to_tensor(train.images[subset]).to(device)
    labels = torch.from_numpy(train.labels[subset]).to(device)
    ctx = StepContext(
        device, AugmentConfig(config.hflip, config.rotate_degrees), autocast_dtype(device, config.amp),
        config.channels_last,
    )
    batches = -(-len(labels) // config.batch_size)
    print(f"ferkit: training {config.arch} on {device} ({ctx.amp_dtype or 'float32'}), {len(labels)} images, "
          f"epochs {state['epoch'] + 1}..{config.epochs} -> {run_dir}")
    for epoch in range(state["epoch"], config.epochs):
        # Per-epoch seeds make a resumed run take the same shuffles and augmentations as an unbroken one.
        seed_everything(config.seed * 1000 + epoch)
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        started = time.perf_counter()
        with tqdm(total=batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress,
                  leave=False, unit="batch") as bar:
            train_stats = train_one_epoch(model, optimizer, images, labels, ctx, config.batch_size, generator, bar)
        val = compute_metrics(predict_logits(model, data["val"].images, device, config.eval_batch_size),
                              data["val"].labels)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(val["loss"])
        row = {
            "epoch": epoch + 1, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
            "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": lr,
            "images_per_s": train_stats["images_per_s"], "seconds": time.perf_counter() - started,
        }
        state["history"].append(row)
        state["epoch"] = epoch + 1
        meta = _meta(config, data, epoch + 1, row)
        if val["accuracy"] > state["best_val_acc"]:
            state["best_val_acc"] = val["accuracy"]
            save_weights(run_dir / "best.safetensors", model, meta)
        save_weights(run_dir / "last.safetensors", model, meta)
        _save_checkpoint(run_dir, config, model, optimizer, scheduler, state)
        _write_metrics_csv(run_dir / "metrics.csv", state["history"])
        print(f"epoch {epoch + 1:3d}/{config.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
              f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {lr:.2e}  "
              f"{row['images_per_s']:.0f} img/s  {row['seconds']:.0f}s", flush=True)
    finish_run(run_dir, data, device, config.eval_batch_size)
    return run_dir


def finish_run(run_dir: Path, data: FerData, device: torch.device, batch_size: int = 512) -> dict[str, Any]:
    """Score the best checkpoint once on the test split; write test_metrics.json and the figures."""
    model, meta = load_model(run_dir / "best.safetensors", device)
    metrics = compute_metrics(predict_logits(model, data["test"].images, device, batch_size, meta.tta),
                              data["test"].labels)
    metrics["best_epoch"] = meta.epoch
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    history = read_metrics_csv(run_dir / "metrics.csv")
    plot_curves(history, run_dir / "curves.png", title=f"{meta.arch}: {run_dir.name}")
    plot_confusion(metrics["confusion_matrix"], EMOTIONS, run_dir / "confusion_matrix_test.png",
                   title=f"{meta.arch}, PrivateTest: accuracy {100 * metrics['accuracy']:.2f}%")
    print(f"ferkit: best epoch {meta.epoch}, test accuracy {100 * metrics['accuracy']:.2f}%, "
          f"loss {metrics['loss']:.4f} -> {run_dir / 'test_metrics.json'}")
    return metrics


def _training_subset(total: int, limit: int, seed: int) -> np.ndarray:
    """All indices, or a seeded random `limit` of them (the data is stored sorted by class)."""
    if not limit or limit >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:limit])


def _meta(config: TrainConfig, data: FerData, epoch: int, row: dict[str, float]) -> WeightsMeta:
    return WeightsMeta(
        arch=config.arch, data_source=data.source, epoch=epoch,
        metrics={"val_acc": row["val_acc"], "val_loss": row["val_loss"], "train_acc": row["train_acc"]},
    )


def _start_or_resume(
    run_dir: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    checkpoint = run_dir / "checkpoint.pt"
    if not config.resume:
        if checkpoint.exists():
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or a new --out")
        return {"epoch": 0, "best_val_acc": -1.0, "history": []}
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: nothing to resume")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if saved["config"]["arch"] != config.arch:
        raise ValueError(f"{checkpoint} was trained as {saved['config']['arch']!r}, not {config.arch!r}")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return {"epoch": saved["epoch"], "best_val_acc": saved["best_val_acc"], "history": saved["history"]}


def _save_checkpoint(
    run_dir: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    state: dict[str, Any],
) -> None:
    """Write-then-rename, so that a kill at any moment leaves the previous checkpoint whole."""
    payload = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "config": asdict(config), **state,
    }
    tmp = run_dir / f".checkpoint.pt.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / "checkpoint.pt")


def _write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def read_metrics_csv(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
