"""Training: `fit()` runs a whole run, `train_one_epoch()` one pass; recipes, checkpoints, resume, DDP.

`TrainConfig` is the recipe (its augmentation options in an `AugmentConfig`); `build_criterion` turns it
into the loss (`ferkit.losses.Criterion`) that the step is handed, as torchvision's reference scripts hand
theirs a `criterion`.

A run folder (see `ferkit.runs`) holds `config.json` (the resolved recipe, versions and data
identity), `checkpoint.safetensors` (everything needed to resume, written atomically after every
epoch before anything else, so that resuming can rebuild the rest), `best.safetensors` (best
validation accuracy) and `last.safetensors`, `metrics.csv` (one row per epoch), and at the end
`test_metrics.json` plus the curves and confusion-matrix figures. The
weights' metadata carries the recipe and the preprocessing (views, training class prior).
Model selection sees only the validation split; the test split is scored once, at the end.

Under `torchrun --nproc_per_node=N` the same `fit()` runs with DistributedDataParallel: every rank
trains on its own shard of each epoch's shuffle and only rank 0 writes files.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

from .augment import AugmentConfig, mix_batch, train_transform
from .data import FerData, load_fer2013
from .deprecations import VIEWS_FROM_TTA, rename_keys, resolve
from .devices import DeviceError, autocast_dtype, pick_device
from .distill import load_teachers, soft_targets, teacher_logits
from .errors import UsageError
from .evaluate import compute_metrics, ferplus_report, split_logits
from .ferplus import LABEL_SCHEMES, with_label_scheme
from .inference import VIEW_COUNTS, Preprocessing, predict_logits, preprocess, to_tensor
from .labels import IMAGE_SIZE, NUM_CLASSES
from .losses import Criterion, Distillation
from .models import create_model, list_models
from .plots import plot_confusion, plot_curves
from .runs import (
    BEST_WEIGHTS,
    CHECKPOINT,
    CONFIG_JSON,
    LAST_WEIGHTS,
    METRICS_CSV,
    OLD_CHECKPOINT,
    TEST_METRICS,
    CheckpointError,
    check_run_dir,
    data_identity,
    read_checkpoint,
    read_metrics_csv,
    remove_stale_temp_files,
    write_checkpoint,
    write_config_json,
    write_metrics_csv,
    write_text_atomic,
)
from .weights import WeightsError, WeightsMeta, load_model, read_meta, resolve_weights, save_weights, unwrap
from .widen import widen_into, widen_problem


@dataclass
class TrainConfig:
    """One training run. The defaults are the reference recipe: reference CNN, Adam 1e-3, 50 epochs."""

    data: str | None = field(default=None, metadata={"help": "FER-2013 or FER+ source (default: $FERKIT_DATA)"})
    votes: str | None = field(default=None, metadata={
        "help": "FER+'s fer2013new.csv, joined by row position with a fer2013.csv --data"})
    labels: str = field(default="fer2013", metadata={
        "help": "training targets: FER-2013's labels, or FER+ votes by majority, plurality or as distributions "
                "(validation and test: FER+'s majority protocol)", "choices": LABEL_SCHEMES})
    run_dir: str = field(default="runs/reference", metadata={"help": "run folder: checkpoint, weights, metrics"})
    preset: str = field(default="reference", metadata={
        "help": "named recipe: reference, fast, accurate, student or ferplus; flags override it"})
    arch: str = field(default="refcnn", metadata={"help": "architecture from the model registry"})
    epochs: int = 50
    batch_size: int = field(default=64, metadata={"help": "images per step and process"})
    optimizer: str = field(default="adam", metadata={"help": "adam, adamw or sgd (Nesterov momentum)",
                                                     "choices": ("adam", "adamw", "sgd")})
    lr: float = 1e-3
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = 0.0
    schedule: str = field(default="plateau", metadata={"help": "plateau, onecycle or cosine",
                                                       "choices": ("plateau", "onecycle", "cosine")})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up for cosine"})
    plateau_factor: float = field(default=0.5, metadata={"help": "ReduceLROnPlateau factor"})
    plateau_patience: int = field(default=2, metadata={"help": "ReduceLROnPlateau patience (epochs)"})
    label_smoothing: float = 0.0
    class_weights: bool = field(default=False, metadata={"help": "weight the loss by inverse class frequency"})
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Flips, rotations, shifts, erasing, the camera augmentations, mixup and CutMix: one option each."""
    init: str | None = field(default=None, metadata={
        "help": "start from these weights (shipped name, run folder or file) of the same architecture, not at random "
                "(none: at random, where the preset starts from weights)"})
    teacher: list[str] = field(default_factory=list, metadata={
        "help": "distil from these weights (shipped name, run folder or file; repeat for several)", "repeatable": True})
    teacher_mode: str = field(default="cached", metadata={
        "help": "cached: teachers score each clean training image once, with their views; online: they score the "
                "student's own augmented batch, one view, each step", "choices": ("cached", "online")})
    distill_weight: float = field(default=0.5, metadata={"help": "share of the soft-target loss, with --teacher"})
    distill_temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the soft targets"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the weights per step (0: off), e.g. 0.999"})
    views: int = field(default=1, metadata={"help": "test-time views per face, stored in the weights: 1, 2 (mirror) or "
                                                    "10 (five positions, each mirrored)", "choices": VIEW_COUNTS})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast where the device supports it"})
    channels_last: bool = True
    eval_batch_size: int = 512
    limit_train: int = field(default=0, metadata={"help": "train on a seeded random N of the training images (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --run-dir from its checkpoint (the "
                                                          "fields its state depends on may not change)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @classmethod
    def from_preset(cls, preset: str = "reference", **overrides: Any) -> TrainConfig:
        """The named recipe, with `overrides` on top (old option names accepted with a warning)."""
        preset = preset if preset in PRESETS else resolve("preset", preset)
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[preset], **_spread_augment(upgrade_config(overrides, warn=True)),
                              "preset": preset})

    @classmethod
    def for_resume(cls, **given: Any) -> TrainConfig:
        """The recipe of the run in `run_dir` (its config.json), with the options `given` on top, so that
        `--resume --run-dir DIR` alone continues a run; without a readable config.json, the preset's."""
        preset = given.pop("preset", None)
        run_dir = Path(given.get("run_dir") or cls.from_preset(preset or "reference").run_dir)
        try:
            recipe = upgrade_config(dict(json.loads((run_dir / CONFIG_JSON).read_text())["config"]))
        except (OSError, ValueError, KeyError, TypeError):  # no run there: the checks of `fit` say so
            return cls.from_preset(preset or "reference", **given)
        if preset is not None and preset != recipe.get("preset"):
            raise UsageError(f"{run_dir} holds a run of --preset {recipe.get('preset')}, not {preset}: --resume "
                             "continues a run with its own recipe (leave out --preset)")
        known = {f.name for f, _ in cls().options()}  # a newer ferkit's config.json may hold more
        recipe = {name: value for name, value in recipe.items() if name in known}
        return cls.from_dict({**recipe, **_spread_augment(upgrade_config(given, warn=True)), "run_dir": str(run_dir)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from one value per option, named as the flags are (presets, `to_dict`, the CLI); the
        augmentation's options go into `augment` (an `augment` given as an AugmentConfig or a dict, as
        `dataclasses.asdict` nests it, is spread first). Unknown names are a TypeError."""
        rest = _spread_augment(values)
        augment = AugmentConfig(**{f.name: rest.pop(f.name) for f in fields(AugmentConfig) if f.name in rest})
        return cls(**rest, augment=augment)

    def to_dict(self) -> dict[str, Any]:
        """One value per option, the augmentation's among them: what config.json, checkpoints and the weights'
        `recipe` record (flat, as before `augment` held its options, so that every recorded run still loads)."""
        return {f.name: value for f, value in self.options()}

    def options(self) -> list[tuple[Field[Any], Any]]:
        """Every option's field and value, the augmentation's in the place of `augment`."""
        pairs: list[tuple[Field[Any], Any]] = []
        for f in fields(self):
            if f.name == "augment":
                pairs += [(a, getattr(self.augment, a.name)) for a in fields(AugmentConfig)]
            else:
                pairs.append((f, getattr(self, f.name)))
        return pairs

    def validate(self) -> None:
        """Refuse impossible values now, in one line naming each option, not after (or during) training."""
        problems = [p for f, value in self.options() if (p := _field_problem(f, value))]
        if not problems and resolve("preset", self.preset, warn=False) not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if not problems and resolve("architecture", self.arch, warn=False) not in list_models():
            problems.append(f"unknown architecture {self.arch!r}; choose one of: {', '.join(list_models())}")
        if not problems:
            try:
                pick_device(self.device)
            except DeviceError as err:  # names the devices this machine has
                problems.append(str(err))
        if not problems and self.init is not None:
            problems.extend(_init_problem(self.init, self.arch))
        if problems:
            raise UsageError("; ".join(problems))


def _spread_augment(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with an `augment` entry (an AugmentConfig, or a dict) spread into its options' names; the
    other values win, so that `from_preset(..., augment=AugmentConfig(...), noise=0.2)` means what it says."""
    rest = dict(values)
    augment = rest.pop("augment", {})
    return {**(asdict(augment) if isinstance(augment, AugmentConfig) else augment), **rest}


_LIMITS: dict[str, tuple[Any, str]] = {
    # field: (test, what the value must be); NaN fails every test.
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "limit_train": (lambda v: v >= 0, "0 (all) or more"),
    "seed": (lambda v: 0 <= v < 2**32, "from 0 to 4294967295"),
    "lr": (lambda v: 0 < v < math.inf, "a positive number"),
    "momentum": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "0 or more"),
    "warmup_epochs": (lambda v: 0 <= v < math.inf, "0 or more"),
    "plateau_factor": (lambda v: 0 < v < 1, "between 0 and 1"),
    "plateau_patience": (lambda v: v >= 0, "0 or more"),
    "label_smoothing": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "rotate_degrees": (lambda v: 0 <= v <= 180, "from 0 to 180"),
    "shift_pixels": (lambda v: 0 <= v < IMAGE_SIZE // 2, f"from 0 to {IMAGE_SIZE // 2 - 1}"),
    "erasing": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "mixup": (lambda v: 0 <= v < math.inf, "0 (off) or more"),
    "cutmix": (lambda v: 0 <= v < math.inf, "0 (off) or more"),
    "ema_decay": (lambda v: 0 <= v < 1, "0 (off) or from 0 to below 1"),
    "scale_jitter": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "aspect_jitter": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "brightness": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "contrast": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "gamma": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "blur": (lambda v: 0 <= v <= 1, "a probability, from 0 to 1"),
    "noise": (lambda v: 0 <= v <= 1, "a probability, from 0 to 1"),
    "jpeg": (lambda v: 0 <= v <= 1, "a probability, from 0 to 1"),
    "downsample": (lambda v: 0 <= v <= 1, "a probability, from 0 to 1"),
    "distill_weight": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "distill_temperature": (lambda v: 0 < v < math.inf, "a positive number"),
}


def _init_problem(init: str, arch: str) -> list[str]:
    """Why `--init` cannot start a model of `arch` (empty: it can)."""
    try:
        meta = read_meta(resolve_weights(init))
    except WeightsError as err:
        return [f"--init {err}"]
    if resolve("architecture", meta.arch, warn=False) == resolve("architecture", arch, warn=False):
        return []
    source, target = create_model(meta.arch, len(meta.classes)), create_model(arch, len(meta.classes))
    if _shapes(source) == _shapes(target) or widen_problem(source, target) is None:
        return []
    return [f"--init {init} holds a {meta.arch!r} model, whose parameters neither fit nor widen into the "
            f"{arch!r} this run trains"]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each parameter's and buffer's shape: architectures that differ only in strides (`resnet`, `resnet_hr`)
    have the same, so one can start the other."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_initial_weights(model: nn.Module, init: str, device: torch.device, classes: tuple[str, ...], arch: str
                         ) -> None:
    """Start `model` (an `arch`) from the weights `init`: of the same shapes, or of a narrower model of the same
    layout, widened (`ferkit.widen`). Where the classes differ (FER-2013's seven -> FER+'s eight), the last
    linear layer's rows are copied by class name and a class the weights lack keeps its random start."""
    source, meta = load_model(init, device)
    state = source.state_dict()
    start = create_model(arch, len(meta.classes)).to(device)  # `arch` with the weights' classes
    if _shapes(source) != _shapes(start):
        widen_into(source.float(), start)
        state = start.state_dict()
    head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    target = model.state_dict()
    if list(meta.classes) != list(classes):
        for key in (f"{head}.weight", f"{head}.bias"):
            rows = target[key].clone()
            for k, name in enumerate(classes):
                if name in meta.classes:
                    rows[k] = state[key][meta.classes.index(name)]
            state[key] = rows
    model.load_state_dict(state)


def _field_problem(f: Field[Any], value: Any) -> str | None:
    """What is wrong with one TrainConfig value (its type, range or choice), as `--option must be ...`."""
    flag = "--" + f.name.replace("_", "-")
    kind = str(f.type)
    if kind == "bool" and not isinstance(value, bool):
        return f"{flag} must be true or false, not {value!r}"
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{flag} must be a whole number, not {value!r}"
    if kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{flag} must be a number, not {value!r}"
    if kind == "str" and (not isinstance(value, str) or not value):
        return f"{flag} must be a non-empty string, not {value!r}"
    if kind == "str | None" and value is not None and not isinstance(value, str):
        return f"{flag} must be a path, not {value!r}"
    if kind == "list[str]" and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
        return f"{flag} must be a list of names or paths, not {value!r}"
    if f.name in _LIMITS and not _LIMITS[f.name][0](value):
        return f"{flag} must be {_LIMITS[f.name][1]}, not {value!r}"
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        return f"{flag} must be one of {', '.join(map(str, choices))}, not {value!r}"
    return None


def upgrade_config(values: dict[str, Any], warn: bool = False) -> dict[str, Any]:
    """TrainConfig fields under old names and values (`ferkit.deprecations`) -> today's; today's win."""
    values = rename_keys(values, "training option", warn=warn)
    if isinstance(values.get("views"), str):  # the old name took names of view counts
        values["views"] = VIEWS_FROM_TTA.get(values["views"], values["views"])
    if isinstance(values.get("preset"), str) and values["preset"] not in PRESETS:
        values["preset"] = resolve("preset", values["preset"], warn=warn)
    if isinstance(values.get("arch"), str) and values["arch"] not in list_models():
        values["arch"] = resolve("architecture", values["arch"], warn=warn)
    return values


PRESETS: dict[str, dict[str, Any]] = {
    # Each recipe's purpose; what its runs scored is in the README and docs/results, not here.
    # The reference recipe, unchanged: the dataclass defaults.
    "reference": {},
    # The reference's accuracy in a fraction of its time on a CPU: AdamW, one-cycle, label smoothing, shifts.
    "fast": {
        "run_dir": "runs/fast", "epochs": 16, "batch_size": 128, "optimizer": "adamw", "lr": 4e-3,
        "weight_decay": 0.05, "schedule": "onecycle", "label_smoothing": 0.1, "shift_pixels": 3, "views": 2,
    },
    # The most accurate single model in about two and a half hours on a 2-core CPU: the fast recipe's AdamW and
    # one-cycle on a ResNet, trained longer behind stronger augmentation, with an EMA of the weights and ten-view
    # TTA. Mixup and erasing at 0.5 hold off the overfitting that made validation peak early and slide without them.
    "accurate": {
        "run_dir": "runs/accurate", "arch": "resnet", "epochs": 120, "batch_size": 128, "optimizer": "adamw",
        "lr": 3e-3, "weight_decay": 0.05, "schedule": "onecycle", "label_smoothing": 0.1, "shift_pixels": 4,
        "erasing": 0.5, "mixup": 0.2, "ema_decay": 0.999, "views": 10,
    },
    # A single-view model for real use: the accurate recipe's ResNet, distilled from the shipped ten-view ResNet
    # (its soft targets computed once, cached in the run folder) and trained on faces as other cameras deliver
    # them; planned to stay within about two and a half hours on a 2-core AVX-512 bf16 CPU. It made
    # `ferkit-resnet-robust`. Keep the cached teacher: `--teacher-mode online` lets the fragile ten-view teacher
    # score corrupted faces, and cost the student its robustness on PublicTest (docs/results/student-ft). To try:
    # no label smoothing (the soft targets already smooth, and smoothing caps a confidence that a temperature
    # cannot restore), and longer runs.
    "student": {
        "run_dir": "runs/student", "arch": "resnet", "epochs": 100, "batch_size": 128, "optimizer": "adamw",
        "lr": 3e-3, "weight_decay": 0.05, "schedule": "onecycle", "label_smoothing": 0.1, "shift_pixels": 4,
        "erasing": 0.4, "mixup": 0.2, "ema_decay": 0.999, "views": 1,
        "teacher": ["ferkit-resnet"], "distill_weight": 0.7, "distill_temperature": 2.0,
        "scale_jitter": 0.12, "aspect_jitter": 0.06, "brightness": 0.25, "contrast": 0.3, "gamma": 0.3,
        "blur": 0.15, "noise": 0.15, "jpeg": 0.15, "downsample": 0.15,
    },
    # FER+ (`--data` FER+'s folder): the shipped ResNet fine-tuned on the crowd's vote distributions for eight
    # classes and one view, with the student's camera augmentations. The FER-2013 head's rows start the seven
    # shared classes (contempt starts at random). `ferkit-resnet` saw FER-2013's training faces only (selected on
    # PublicTest = FER2013Valid), so FER2013Test stays unseen.
    "ferplus": {
        "run_dir": "runs/ferplus", "arch": "resnet", "epochs": 16, "batch_size": 128, "optimizer": "adamw",
        "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.0,
        "shift_pixels": 4, "erasing": 0.4, "mixup": 0.2, "ema_decay": 0.999, "views": 1,
        "labels": "ferplus-distribution", "init": "ferkit-resnet",
        "scale_jitter": 0.12, "aspect_jitter": 0.06, "brightness": 0.25, "contrast": 0.3, "gamma": 0.3,
        "blur": 0.15, "noise": 0.15, "jpeg": 0.15, "downsample": 0.15,
    },
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepContext:
    """What a training step needs besides the model, its loss, its optimiser and the batch."""

    device: torch.device
    augment: AugmentConfig
    amp_dtype: torch.dtype | None
    channels_last: bool
    step_scheduler: Any = None  # schedules that step every batch (not ReduceLROnPlateau)
    ema: AveragedModel | None = None


def train_one_epoch(
    model: nn.Module,
    criterion: Criterion,
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

    `criterion` gives each batch's targets (by the images' positions) and its loss. Returns the mean
    loss, the accuracy against the unmixed labels, and images/s.
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
        y = labels[index]
        x = train_transform(images[index], ctx.augment, generator)
        x, targets = mix_batch(x, criterion.targets(y, index), ctx.augment.mixup, ctx.augment.cutmix, generator)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.float32, enabled=bool(ctx.amp_dtype)):
            logits = model(x)
        loss = criterion(logits, targets, x)
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
    """Run (or resume) training as `config` says; returns the run folder.

    Everything that can be refused is refused before the data loads: bad options, a run folder that
    cannot be written, a checkpoint that cannot be resumed or a recipe that changed since it was written.
    """
    config.validate()
    env, device = init_distributed(config.device)
    run_dir = Path(config.run_dir)
    saved = _open_run_dir(run_dir, config, env)
    data = with_label_scheme(data or load_fer2013(config.data, votes=config.votes), config.labels)
    identity = data_identity(data)
    if saved is not None:
        _check_same_data(saved, identity, run_dir / CHECKPOINT)
    seed_everything(config.seed)
    model = _new_model(config, data.classes, device, start_from_init=saved is None)
    subset = _training_subset(len(data["train"]), config.limit_train, config.seed)
    images = to_tensor(data["train"].images[subset]).to(device)
    labels = torch.from_numpy(data["train"].labels[subset]).to(device)
    steps_per_epoch = -(-len(labels) // (env.world_size * config.batch_size))  # each rank's share, in batches
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    # The EMA averages parameters only; its BatchNorm statistics are re-estimated before each use.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=False) \
        if config.ema_decay > 0 else None
    state: dict[str, Any] = {"epoch": 0, "best_val_acc": -1.0, "history": [], "world_size": env.world_size,
                             "data": identity}
    if saved is not None:
        state = _restore(saved, run_dir / CHECKPOINT, model, optimizer, scheduler, ema)
        if env.is_main:
            _sync_run_files(run_dir, config, data, ema.module if ema is not None else model, state)
    first_epoch = state["epoch"]
    if env.world_size > 1:
        model = _distributed_model(model, device)
    ctx = StepContext(device, config.augment, autocast_dtype(device, config.amp), config.channels_last,
                      step_scheduler=None if config.schedule == "plateau" else scheduler, ema=ema)
    criterion = build_criterion(config, data, subset, images, run_dir, env, ctx.amp_dtype)
    if env.is_main:
        _print_start(config, env, ctx, len(labels), first_epoch, run_dir)
    for epoch in range(first_epoch, config.epochs):
        order, generator = _epoch_randomness(config.seed, epoch, len(labels), env)
        started = time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not (config.progress and env.is_main), leave=False, unit="batch") as bar:
            train_stats = train_one_epoch(model, criterion, optimizer, images, labels, ctx, config.batch_size,
                                          generator, bar, order=shard_order(order, env))
        scored = ema.module if ema is not None else unwrap(model)
        if ema is not None:
            refresh_batchnorm(ema.module, images[_bn_subset(len(labels), config.seed)], config.eval_batch_size)
        val_loss, val_acc = _validation_scores(scored, data, device, config.eval_batch_size)
        lr = optimizer.param_groups[0]["lr"]
        if config.schedule == "plateau":
            scheduler.step(val_loss)
        row = {"epoch": epoch + 1, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
               "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "images_per_s": train_stats["images_per_s"],
               "seconds": time.perf_counter() - started}
        is_best = val_acc > state["best_val_acc"]
        state["history"].append(row)
        state.update(epoch=epoch + 1, best_val_acc=max(state["best_val_acc"], val_acc))
        if env.is_main:
            _save_epoch(run_dir, config, data, scored, model, optimizer, scheduler, ema, state, is_best)
            if epoch == first_epoch:  # with the first checkpoint: a run folder is made by a finished epoch
                write_config_json(run_dir, config.to_dict(), data, identity)
            _print_epoch(row, config.epochs)
    if env.is_main:
        finish_run(run_dir, data, device, config.eval_batch_size)
    if dist.is_initialized():
        # The DDP wrapper's reducer must die before its process group does: freed after it, at exit,
        # it can abort the process.
        del model, ctx, criterion
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def _new_model(config: TrainConfig, classes: tuple[str, ...], device: torch.device, start_from_init: bool
               ) -> nn.Module:
    """The model to train, at random or from `--init` (a resumed run's weights come from its checkpoint)."""
    model = create_model(config.arch, len(classes)).to(device)
    if config.init is not None and start_from_init:
        load_initial_weights(model, config.init, device, classes, config.arch)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def build_criterion(
    config: TrainConfig, data: FerData, subset: np.ndarray, images: torch.Tensor, run_dir: Path, env: Distributed,
    amp_dtype: torch.dtype | None,
) -> Criterion:
    """The loss the recipe asks for, over the training `subset` (`images`, on the device): label smoothing, class
    weights, the label scheme's class distributions and the teachers' soft targets."""
    train, device, num_classes = data["train"], images.device, len(data.classes)
    distillation = None
    if config.teacher:
        distillation = Distillation(
            config.distill_weight, config.distill_temperature, amp_dtype=amp_dtype,
            cached=_teacher_targets(config, images, device, run_dir, env) if config.teacher_mode == "cached" else None,
            teachers=tuple(load_teachers(config.teacher, device)) if config.teacher_mode == "online" else ())
    return Criterion(
        num_classes, config.label_smoothing,
        class_weights=_class_weights(train.labels[subset], num_classes).to(device) if config.class_weights else None,
        distributions=torch.from_numpy(train.targets[subset]).to(device) if train.targets is not None else None,
        distillation=distillation)


def _epoch_randomness(seed: int, epoch: int, total: int, env: Distributed) -> tuple[torch.Tensor, torch.Generator]:
    """The epoch's shuffle and this rank's generator, with torch's global seed for kornia's draws.

    Per-epoch seeds make a resumed run take the same shuffles and augmentations as an unbroken one; every
    rank draws the same shuffle and its own augmentations.
    """
    seed_everything(seed * 1000 + epoch + 7919 * env.rank)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return order, torch.Generator().manual_seed(seed * 1000 + epoch + 7919 * env.rank)


def _validation_scores(model: nn.Module, data: FerData, device: torch.device, batch_size: int) -> tuple[float, float]:
    """(loss, accuracy) of `model` on the validation split, the same on every rank."""
    val = compute_metrics(predict_logits(model, data["val"].images, device, batch_size), data["val"].labels,
                          data.classes)
    scores = [val.loss, val.accuracy]
    if dist.is_initialized():
        # Each rank's BatchNorm statistics end the epoch on its own last batch, so the ranks' scores differ
        # in the last digits: take rank 0's everywhere, so that every rank's plateau schedule decides alike
        # (else the ranks' learning rates, then their weights, drift apart).
        shared = torch.tensor(scores, dtype=torch.float64, device=device)
        dist.broadcast(shared, src=0)
        scores = shared.tolist()
    return scores[0], scores[1]


def _print_start(config: TrainConfig, env: Distributed, ctx: StepContext, images: int, first_epoch: int,
                 run_dir: Path) -> None:
    epochs = f"epochs {first_epoch + 1}..{config.epochs}" if first_epoch < config.epochs else \
        f"all {config.epochs} epochs done"
    print(f"ferkit: training {config.arch} ({config.preset} preset) on {ctx.device} x{env.world_size} "
          f"({ctx.amp_dtype or 'float32'}), {images} images, {epochs} -> {run_dir}", flush=True)


def _print_epoch(row: dict[str, Any], epochs: int) -> None:
    print(f"epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
          f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.2e}  "
          f"{row['images_per_s']:.0f} img/s  {row['seconds']:.0f}s", flush=True)


def _teacher_targets(
    config: TrainConfig, images: torch.Tensor, device: torch.device, run_dir: Path, env: Distributed
) -> torch.Tensor:
    """The teachers' soft targets for every training image: computed once by rank 0 and cached in the run folder."""
    started = time.perf_counter()
    if env.is_main:
        logits = teacher_logits(config.teacher, images, device, config.eval_batch_size, run_dir)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the cache; the other ranks read it
    if not env.is_main:
        logits = teacher_logits(config.teacher, images, device, config.eval_batch_size, run_dir)
    if env.is_main:
        print(f"ferkit: soft targets of {len(config.teacher)} teacher(s) for {len(images)} images in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return soft_targets(logits, config.distill_temperature).to(device)


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


def class_prior(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> tuple[float, ...]:
    """Each class's share of the training labels: the prior that `prior="uniform"` divides out.

    A class with no training label counts as one (a prior must be positive; a subset may lack a rare class)."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1).astype(np.float64)
    return tuple(float(c) for c in counts / counts.sum())


def _class_weights(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1: rare classes like disgust count for more."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = counts.sum() / np.maximum(counts, 1) / num_classes
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def finish_run(run_dir: Path, data: FerData, device: torch.device, batch_size: int = 512) -> dict[str, Any]:
    """Score the best checkpoint once on the test split; write test_metrics.json and the figures."""
    model, meta = load_model(run_dir / BEST_WEIGHTS, device)
    logits, every_logits = split_logits(model, data, "test", device, batch_size, meta.preprocessing)
    metrics = compute_metrics(torch.from_numpy(logits), data["test"].labels, meta.classes)
    report = metrics.to_dict()
    if every_logits is not None and data.all_faces is not None:
        report["ferplus"] = asdict(ferplus_report(every_logits, data.all_faces["test"].votes, meta.classes))
    report.update(best_epoch=meta.epoch, views=meta.views)
    write_text_atomic(run_dir / TEST_METRICS, json.dumps(report, indent=2))
    history = read_metrics_csv(run_dir / METRICS_CSV)
    plot_curves(history, run_dir / "curves.png", title=f"{meta.arch}: {run_dir.name}")
    plot_confusion(metrics.confusion_matrix, meta.classes, run_dir / "confusion_matrix_test.png",
                   title=f"{meta.arch}, PrivateTest: accuracy {100 * metrics.accuracy:.2f}%")
    print(f"ferkit: best epoch {meta.epoch}, test accuracy {100 * metrics.accuracy:.2f}% ({meta.views} view"
          f"{'s' * (meta.views > 1)}), loss {metrics.loss:.4f} -> {run_dir / TEST_METRICS}", flush=True)
    return report


def _training_subset(total: int, limit: int, seed: int) -> np.ndarray:
    """All indices, or a seeded random `limit` of them (the data is stored sorted by class)."""
    if not limit or limit >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:limit])


def _weights_meta(config: TrainConfig, data: FerData, row: dict[str, Any]) -> WeightsMeta:
    subset = _training_subset(len(data["train"]), config.limit_train, config.seed)
    return WeightsMeta(
        arch=config.arch, data_source=data.source, epoch=int(row["epoch"]), recipe=config.to_dict(),
        classes=list(data.classes),
        preprocessing=Preprocessing(views=config.views,
                                    class_prior=class_prior(data["train"].labels[subset], len(data.classes))),
        metrics={"val_acc": row["val_acc"], "val_loss": row["val_loss"], "train_acc": row["train_acc"]},
    )


def _save_epoch(
    run_dir: Path, config: TrainConfig, data: FerData, scored: nn.Module, model: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, ema: AveragedModel | None, state: dict[str, Any],
    is_best: bool,
) -> None:
    """The checkpoint first: every other file of the run can be rebuilt from it (see `_sync_run_files`)."""
    _save_checkpoint(run_dir, config, model, optimizer, scheduler, ema, state)
    meta = _weights_meta(config, data, state["history"][-1])
    if is_best:
        save_weights(run_dir / BEST_WEIGHTS, scored, meta)
    save_weights(run_dir / LAST_WEIGHTS, scored, meta)
    write_metrics_csv(run_dir / METRICS_CSV, state["history"])


# ---------------------------------------------------------------------------------------------
# Resume: what must not change, and how a checkpoint is checked before any of it is used

RESUME_FIXED: dict[str, Any] = {
    # The fields that a run's state (weights, optimiser, schedule, training subset) depends on, and when.
    "arch": lambda c: True, "batch_size": lambda c: True, "limit_train": lambda c: True, "seed": lambda c: True,
    "optimizer": lambda c: True, "lr": lambda c: True, "weight_decay": lambda c: True,
    "momentum": lambda c: c.optimizer == "sgd", "schedule": lambda c: True,
    "epochs": lambda c: c.schedule != "plateau",  # one-cycle and cosine are laid out over all the epochs
    "warmup_epochs": lambda c: c.schedule == "cosine",
    "plateau_factor": lambda c: c.schedule == "plateau", "plateau_patience": lambda c: c.schedule == "plateau",
    "ema_decay": lambda c: True,
}
"""Fields that `--resume` refuses to change; the others (augmentation, views, device, batch size for
evaluation, progress...) may change. More epochs are fine under the plateau schedule."""


def _open_run_dir(run_dir: Path, config: TrainConfig, env: Distributed) -> dict[str, Any] | None:
    """Check the folder, clear what killed writers left, and read the checkpoint to resume (None: a new run)."""
    check_run_dir(run_dir)
    if env.is_main:
        remove_stale_temp_files(run_dir)
    checkpoint, old = run_dir / CHECKPOINT, run_dir / OLD_CHECKPOINT
    if not config.resume:
        for path in (checkpoint, old):
            if path.exists():
                raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, "
                                      "or a new --run-dir")
        return None
    if not checkpoint.exists() and old.exists():
        raise CheckpointError(f"{old}: a checkpoint of ferkit 0.1, a pickle file that this ferkit does not load: "
                              "finish the run with ferkit 0.1, or start a new one")
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: nothing to resume")
    saved = _checked_state(read_checkpoint(checkpoint), checkpoint)
    _check_unchanged(saved, config, env, checkpoint)
    return saved


def _checked_state(saved: dict[str, Any], path: Path) -> dict[str, Any]:
    """The checkpoint's bookkeeping, checked for type and consistency (the tensors are checked as they load)."""
    history = saved.get("history")
    problem = None
    if not isinstance(saved.get("config"), dict):
        problem = "no config"
    elif not all(isinstance(saved.get(k), dict) for k in ("model", "optimizer", "scheduler")):
        problem = "no model, optimizer or scheduler state"
    elif not isinstance(history, list) or not all(
            isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in HISTORY_KEYS)
            for row in history):
        problem = f"its history is not a list of epochs with {', '.join(HISTORY_KEYS)}"
    elif not isinstance(saved.get("epoch"), int) or saved["epoch"] < 1 or saved["epoch"] != len(history) or \
            [row["epoch"] for row in history] != list(range(1, len(history) + 1)):
        problem = f"epoch {saved.get('epoch')!r} does not match its history of {len(history)} epochs"
    elif not isinstance(saved.get("best_val_acc"), float) or \
            saved["best_val_acc"] != max(row["val_acc"] for row in history):
        problem = "its best validation accuracy is not its history's"
    if problem:
        raise CheckpointError(f"{path}: malformed checkpoint ({problem})")
    return saved


HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds")


def _check_unchanged(saved: dict[str, Any], config: TrainConfig, env: Distributed, path: Path) -> None:
    """Refuse, naming each, the changes to fields that the saved state depends on."""
    before = upgrade_config(saved["config"])
    now = config.to_dict()
    changed = [f"--{name.replace('_', '-')} {before.get(name)} in the run, {now[name]} now"
               for name, applies in RESUME_FIXED.items() if applies(config) and before.get(name) != now[name]]
    if saved.get("world_size", 1) != env.world_size:
        changed.append(f"{saved.get('world_size', 1)!r} processes in the run, {env.world_size} now")
    if changed:
        raise CheckpointError(f"{path}: cannot resume with a changed {'; '.join(changed)} (the run's state depends "
                              "on these: resume with the run's values, or start a new --run-dir)")
    if config.epochs < saved["epoch"]:
        raise CheckpointError(f"{path}: --epochs {config.epochs} is fewer than the {saved['epoch']} epochs the run "
                              "has finished")


def _check_same_data(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """The same images and labels (wherever they are now) as the run trained on."""
    before = saved.get("data")
    if not isinstance(before, dict) or before.get("sha256") != identity["sha256"]:
        old = before.get("sha256", "?") if isinstance(before, dict) else "?"
        raise CheckpointError(f"{path}: the run trained on other data (sha256 {str(old)[:12]}... in the run, "
                              f"{identity['sha256'][:12]}... now, from {identity['source']})")


def _restore(
    saved: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    ema: AveragedModel | None,
) -> dict[str, Any]:
    """Load the saved state into the fresh objects; CheckpointError naming `path` where it does not fit them."""
    if ema is not None and not isinstance(saved.get("ema"), dict):
        raise CheckpointError(f"{path}: has no EMA weights to resume --ema-decay from")
    try:
        _check_like(saved["scheduler"], scheduler.state_dict(), "scheduler")
        for group, fresh in zip(saved["optimizer"].get("param_groups", []), optimizer.state_dict()["param_groups"],
                                strict=False):
            _check_like(group, fresh, "optimizer group")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        _check_optimizer_state(optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        text = str(err).strip().splitlines()
        raise CheckpointError(f"{path}: does not fit this {unwrap(model).__class__.__name__} and its optimiser "
                              f"({text[0][:200] if text else type(err).__name__})") from None
    return {key: saved[key] for key in ("epoch", "best_val_acc", "history", "world_size", "data") if key in saved}


def _check_like(saved: Any, fresh: dict[str, Any], what: str) -> None:
    """Saved scheduler or optimiser settings: a dict of no other keys than the fresh one's, of the same kinds.

    (Loading sets them as attributes: a hostile file could otherwise replace, say, the scheduler's optimiser.)
    """
    if not isinstance(saved, dict):
        raise ValueError(f"{what} is not a dict")
    extra = set(saved) - set(fresh)
    if extra:
        raise ValueError(f"{what} has unknown settings ({', '.join(sorted(map(str, extra)))})")
    for key in set(saved) & set(fresh):
        if _kind(saved[key]) != _kind(fresh[key]) and not (saved[key] is None or fresh[key] is None):
            raise ValueError(f"{what} setting {key!r} is {saved[key]!r}")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's state tensors have its shape (or are scalars like Adam's step), in its memory format."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor) or (value.numel() == 1 and value.ndim <= 1):
                    continue
                if value.shape != param.shape:
                    raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)} for a parameter of "
                                     f"shape {tuple(param.shape)}")
                # As an unbroken run has it (safetensors stores tensors contiguous): a resumed run stays bit-identical.
                optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _sync_run_files(run_dir: Path, config: TrainConfig, data: FerData, scored: nn.Module,
                    state: dict[str, Any]) -> None:
    """Rebuild from the checkpoint the files that a kill after it may have left behind or missing."""
    history = state["history"]
    write_metrics_csv(run_dir / METRICS_CSV, history)
    last = history[-1]
    best_epoch = 1 + int(np.argmax([row["val_acc"] for row in history]))  # the first of the best, as in training
    meta = _weights_meta(config, data, last)
    if _weights_epoch(run_dir / LAST_WEIGHTS) != last["epoch"]:
        save_weights(run_dir / LAST_WEIGHTS, scored, meta)
    if best_epoch == last["epoch"] and _weights_epoch(run_dir / BEST_WEIGHTS) != best_epoch:
        save_weights(run_dir / BEST_WEIGHTS, scored, meta)
    if not (run_dir / CONFIG_JSON).exists():
        write_config_json(run_dir, config.to_dict(), data, state.get("data"))


def _weights_epoch(path: Path) -> int | None:
    try:
        return read_meta(path).epoch
    except WeightsError:
        return None


def _save_checkpoint(
    run_dir: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    ema: AveragedModel | None, state: dict[str, Any],
) -> None:
    """One safetensors file, written by one rename: a kill at any moment leaves the previous checkpoint whole."""
    payload = {
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if not callable(v)},
        "config": config.to_dict(), **state,
    }
    if ema is not None:
        payload["ema"] = ema.state_dict()
    write_checkpoint(run_dir / CHECKPOINT, payload)
