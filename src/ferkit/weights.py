"""Weights files: safetensors tensors plus a JSON metadata header; the named models that ship.

A weights file carries everything needed to rebuild and use its model: the architecture, the
classes, the preprocessing (`ferkit.preprocessing.Preprocessing`: input size, normalisation, crop
scale, views, temperature, calibration map, class prior), where it was trained, with what recipe and how well it
did. The metadata is parsed and checked in one place, `meta_from_json`, for weights files and
exported models alike; that part, which needs no torch, is `ferkit.metadata`, re-exported here.
Loading never unpickles anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .metadata import (
    DEFAULT_RULE_POINTS,
    EXPORT_KEY,
    MAX_CLASS_NAME,
    META_FORMAT,
    METADATA_KEY,
    WeightsError,
    WeightsMeta,
    _shorten,
    check_classes,
    choose_default,
    default_choice,
    default_model,
    meta_from_json,
    parse_json_object,
    read_meta,
    resolve_weights,
    shipped_models,
    shipped_onnx_twin,
)
from .models import create_model
from .outputs import atomic_write

__all__ = [
    "DEFAULT_RULE_POINTS", "EXPORT_KEY", "MAX_CLASS_NAME", "METADATA_KEY", "META_FORMAT", "WeightsError",
    "WeightsMeta", "average_weights", "check_classes", "choose_default", "default_choice", "default_model",
    "load_model", "meta_from_json", "parse_json_object", "read_meta", "resolve_weights", "save_weights",
    "shipped_models", "shipped_onnx_twin", "unwrap",
]


def save_weights(path: str | os.PathLike[str], model: nn.Module, meta: WeightsMeta) -> None:
    """Write `model`'s state as safetensors with `meta` in the header, atomically (never over a non-file)."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: meta.to_json()})


def load_model(
    name_or_path: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, WeightsMeta]:
    """Rebuild the model a weights file describes, load its tensors, and put it in eval mode."""
    path = resolve_weights(name_or_path)
    meta = read_meta(path)
    try:
        model = create_model(meta.arch, num_classes=len(meta.classes))
    except ValueError as err:
        raise WeightsError(f"{path}: {_shorten(err)}") from None
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    except RuntimeError as err:
        # PyTorch lists every mismatch on lines of their own: one line, the first mismatches
        detail = RuntimeError(" ".join(str(err).split()))
        raise WeightsError(f"{path}: tensors do not fit architecture {meta.arch!r}: {_shorten(detail, 400)}") from None
    model = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model.eval(), meta


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel or compiled wrapper."""
    inner: Any = model
    while isinstance(getattr(inner, "module", None), nn.Module) or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "_orig_mod", None) or inner.module
    return inner


def average_weights(parts: Mapping[str | os.PathLike[str], float], output: str | os.PathLike[str]) -> WeightsMeta:
    """Write the weighted average of the tensors of `parts` (weights file -> its share; shares sum to 1) to
    `output`: one model, as fast as each part (a "model soup" of runs fine-tuned from the same start).

    The parts must share an architecture and classes. The metadata is the first part's, without its recorded
    figures or calibration (the average has its own: calibrate and evaluate it), with `recipe["average_of"]`
    naming each part and its share.
    """
    paths = [resolve_weights(p) for p in parts]
    shares = [float(s) for s in parts.values()]
    if len(paths) < 2 or any(s < 0 for s in shares) or abs(sum(shares) - 1) > 1e-9:
        raise WeightsError(f"average of {len(paths)} file(s) with shares {shares}: need two or more shares "
                           "of at least 0 that sum to 1")
    metas = [read_meta(p) for p in paths]
    if any((m.arch, m.classes) != (metas[0].arch, metas[0].classes) for m in metas):
        raise WeightsError(f"{', '.join(map(str, paths))}: not all of one architecture and class list")
    states = [load_file(str(p)) for p in paths]
    if any(s.keys() != states[0].keys() for s in states):
        raise WeightsError(f"{', '.join(map(str, paths))}: their tensors differ in names")
    average = {name: _mix([s[name] for s in states], shares) for name in states[0]}
    first = metas[0]
    meta = WeightsMeta(
        arch=first.arch, classes=first.classes, data_source=first.data_source, epoch=first.epoch,
        preprocessing=first.preprocessing.without_calibration(),
        recipe={**first.recipe, "average_of": [{"file": str(p), "share": s} for p, s in parts.items()]},
    )
    with atomic_write(output) as tmp:
        save_file(average, str(tmp), metadata={METADATA_KEY: meta.to_json()})
    return meta


def _mix(tensors: list[torch.Tensor], shares: list[float]) -> torch.Tensor:
    """The shares' mix of floating tensors; a count (BatchNorm's batches seen) is the first part's."""
    if not tensors[0].is_floating_point():
        return tensors[0].contiguous()
    mixed = sum((share * t.double() for t, share in zip(tensors, shares, strict=True)), torch.zeros(()))
    return mixed.to(tensors[0].dtype).contiguous()


def __getattr__(name: str) -> str:
    # `DEFAULT_MODEL` is computed from the shipped files' metadata, when first asked for.
    if name == "DEFAULT_MODEL":
        return default_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
