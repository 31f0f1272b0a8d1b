"""Weights files: safetensors tensors plus a JSON metadata header; the named models that ship.

A weights file carries everything needed to rebuild and use its model: the architecture, the
classes, the input size and normalisation, where it was trained and how well it did. Loading
never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .augment import MEAN, STD
from .labels import EMOTIONS, IMAGE_SIZE
from .models import create_model

METADATA_KEY = "ferkit"
DEFAULT_MODEL = "best"
"""The shipped model that `ferkit` uses when no weights are named."""


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or does not fit its architecture."""


@dataclass
class WeightsMeta:
    """What a weights file says about itself."""

    arch: str
    classes: list[str] = field(default_factory=lambda: list(EMOTIONS))
    image_size: int = IMAGE_SIZE
    normalization: dict[str, float] = field(default_factory=lambda: {"mean": MEAN, "std": STD})
    data_source: str = ""
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    tta: str = "none"
    ferkit_version: str = __version__


def shipped_models() -> dict[str, Path]:
    """Named models inside the package: name -> weights path."""
    folder = resources.files("ferkit") / "weights"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".safetensors")}


def resolve_weights(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A path to a weights file, a run folder (its best.safetensors), or a shipped model's name."""
    if name_or_path is None or str(name_or_path) == "default":
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "best.safetensors"
    if path.is_file():
        return path
    shipped = shipped_models()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    names = ", ".join(sorted(shipped)) or "none"
    raise WeightsError(f"{name_or_path}: no such weights file, run folder or shipped model (shipped: {names})")


def save_weights(path: str | os.PathLike[str], model: nn.Module, meta: WeightsMeta) -> None:
    """Write `model`'s state as safetensors with `meta` in the header, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta.__dict__)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files private (0600); weights are meant to be shared
    os.replace(tmp, path)


def read_meta(path: str | os.PathLike[str]) -> WeightsMeta:
    """The metadata of a weights file, without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    if METADATA_KEY not in header:
        raise WeightsError(f"{path}: no ferkit metadata in this safetensors file")
    try:
        fields = json.loads(header[METADATA_KEY])
        return WeightsMeta(**fields)
    except (json.JSONDecodeError, TypeError) as err:
        raise WeightsError(f"{path}: malformed ferkit metadata ({err})") from None


def load_model(
    name_or_path: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, WeightsMeta]:
    """Rebuild the model a weights file describes, load its tensors, and put it in eval mode."""
    path = resolve_weights(name_or_path)
    meta = read_meta(path)
    try:
        model = create_model(meta.arch, num_classes=len(meta.classes))
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from None
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path}: tensors do not fit architecture {meta.arch!r}: {err}") from None
    model = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model.eval(), meta


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel or compiled wrapper."""
    inner: Any = model
    while isinstance(getattr(inner, "module", None), nn.Module) or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "_orig_mod", None) or inner.module
    return inner
