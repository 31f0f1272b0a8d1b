"""Weights metadata without the weights: what a file says about its model, the named models that ship, and
which is the default; no torch.

`meta_from_json` parses and checks the JSON metadata of weights files and exported models alike;
`read_meta` reads it from a safetensors header without loading a tensor. `ferkit.weights` (which loads
models, and needs torch) re-exports all of it; the ONNX prediction path imports this module alone.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from . import __version__
from .deprecations import VIEWS_FROM_TTA, rename_keys, resolve
from .errors import InputError
from .labels import EMOTIONS
from .preprocessing import DEFAULT_PREPROCESSING, Preprocessing

METADATA_KEY = "ferkit"
EXPORT_KEY = "ferkit_export"
"""Exported models also carry, under this key, what the export did (format, views, source, opset)."""
META_FORMAT = 2
"""Version of the metadata layout: 1 had `image_size`, `normalization` and the views (by an old name, as a
name: see `ferkit.deprecations`) at the top level."""
DEFAULT_RULE_POINTS = 1.5
"""The default model: among one-view shipped models, the highest PublicTest mean corruption accuracy among
those within this many points of the best one-view PublicTest accuracy (see `choose_default`)."""
MAX_CLASS_NAME = 40


class WeightsError(InputError):
    """A weights file that is missing, unreadable, or does not fit its architecture."""


@dataclass
class WeightsMeta:
    """What a weights file says about itself."""

    arch: str
    classes: list[str] = field(default_factory=lambda: list(EMOTIONS))
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING
    data_source: str = ""
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    ferkit_version: str = __version__
    format: int = META_FORMAT

    @property
    def views(self) -> int:
        return self.preprocessing.views

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "preprocessing": self.preprocessing.to_dict()})


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "arch": str, "data_source": str, "epoch": int, "metrics": dict, "recipe": dict, "ferkit_version": str,
    "format": int,
}


def meta_from_json(text: str | bytes | None, path: str | os.PathLike[str]) -> WeightsMeta:
    """Parse and check the metadata JSON of a weights file or exported model; WeightsError naming `path`."""
    if not text:
        raise WeightsError(f"{path}: no ferkit metadata in this file (weights come from `ferkit train`, models "
                           "from `ferkit export`)")
    try:
        values = json.loads(text)
    except (ValueError, RecursionError) as err:  # also: not UTF-8, ints of over 4,300 digits, nesting past the limit
        raise WeightsError(f"{path}: malformed ferkit metadata ({_shorten(err)})") from None
    if not isinstance(values, dict):
        raise WeightsError(f"{path}: malformed ferkit metadata (a JSON object expected)")
    try:
        return _meta_from_dict(_upgrade(values))
    except (ValueError, TypeError, OverflowError) as err:  # OverflowError: an int too large for a float
        raise WeightsError(f"{path}: bad ferkit metadata: {_shorten(err)}") from None


def _shorten(err: BaseException, limit: int = 300) -> str:
    """An error's text as one printable line of at most `limit` characters: it quotes values from the file."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(err) or type(err).__name__)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """Format-1 metadata (ferkit 0.1) -> format 2: preprocessing gathered, old names as today's."""
    if values.get("format", 1) != 1:
        return values
    values = rename_keys(values, "weights metadata field")
    pre: dict[str, Any] = {}
    if "image_size" in values:
        pre["image_size"] = values.pop("image_size")
    norm = values.pop("normalization", {"mean": 0.5, "std": 0.5})
    if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
        raise ValueError(f"normalization must be {{'mean': m, 'std': s}}, not {norm!r}")
    pre.update(norm)
    views = values.pop("views", "none")  # format 1 named the view count
    if isinstance(views, str):
        if views not in VIEWS_FROM_TTA:
            raise ValueError(f"tta {views!r} is not one of {', '.join(VIEWS_FROM_TTA)}")
        views = VIEWS_FROM_TTA[views]
    pre["views"] = views
    values["preprocessing"] = pre
    if isinstance(values.get("arch"), str):
        values["arch"] = resolve("architecture", values["arch"])
    values["format"] = META_FORMAT
    return values


def _meta_from_dict(values: dict[str, Any]) -> WeightsMeta:
    known = set(WeightsMeta.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    if "arch" not in values:
        raise ValueError("no architecture ('arch')")
    for name, kind in _FIELD_TYPES.items():
        if name in values and (not isinstance(values[name], kind) or isinstance(values[name], bool)):
            raise ValueError(f"{name} must be {getattr(kind, '__name__', kind)}, not {values[name]!r}")
    if values.get("format") != META_FORMAT:
        raise ValueError(f"metadata format {values.get('format')!r}; this ferkit reads formats 1 and {META_FORMAT} "
                         "(upgrade ferkit for newer files)")
    classes = values.get("classes", list(EMOTIONS))
    check_classes(classes)
    pre = values.get("preprocessing", {})
    if not isinstance(pre, dict):
        raise ValueError(f"preprocessing must be an object, not {pre!r}")
    preprocessing = Preprocessing.from_dict(pre)
    if preprocessing.class_prior is not None and len(preprocessing.class_prior) != len(classes):
        raise ValueError(f"class prior has {len(preprocessing.class_prior)} values for {len(classes)} classes")
    if preprocessing.calibration_bias is not None and len(preprocessing.calibration_bias) != len(classes):
        raise ValueError(f"calibration map has {len(preprocessing.calibration_bias)} biases for {len(classes)} classes")
    return WeightsMeta(**{**values, "classes": list(classes), "preprocessing": preprocessing})


def check_classes(classes: object) -> None:
    """Class names must be distinct, short, printable words: they go to terminals, CSV headers and JSON keys."""
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be a list of names, not {classes!r}")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes!r} are not two or more distinct names")
    for name in classes:
        if not name or len(name) > MAX_CLASS_NAME or not name.isprintable() or name != name.strip():
            raise ValueError(f"class name {name!r} is not a printable name of 1 to {MAX_CLASS_NAME} characters")


def parse_json_object(text: str | bytes | None) -> dict[str, Any]:
    """A JSON object from optional metadata text; {} when absent or not an object."""
    try:
        value = json.loads(text) if text else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def shipped_models() -> dict[str, Path]:
    """Named models inside the package: name -> weights path."""
    folder = resources.files("ferkit") / "weights"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".safetensors")}


def shipped_onnx_twin(name: str) -> Path | None:
    """The shipped model `name` exported to ONNX inside the package (`ferkit export`, calibration map in the
    graph), where it ships one: the default model does, so that the CPU default path runs on onnxruntime."""
    twin = resources.files("ferkit") / "weights" / f"{name}.onnx"
    return Path(str(twin)) if twin.is_file() else None


def choose_default(metas: Mapping[str, WeightsMeta], points: float = DEFAULT_RULE_POINTS) -> tuple[str, str]:
    """The default model among `metas` (name -> metadata) by the stated rule, and why, from the metadata alone.

    FER-2013's seven classes (a FER+ model's figures are another benchmark's); one view (the default must be
    fast); PublicTest figures only (`val_acc`, `val_mean_corruption_acc`,
    recorded by `ferkit evaluate --split val --corruptions --record`): of the models within `points`
    of the best PublicTest accuracy, the highest mean corruption accuracy (users' photos are not
    FER-2013's); where none has that figure, the most accurate.
    """
    def figure(meta: WeightsMeta, key: str) -> float | None:
        value = meta.metrics.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    accuracy = {name: acc for name, meta in metas.items()
                if meta.views == 1 and meta.classes == list(EMOTIONS) and (acc := figure(meta, "val_acc")) is not None}
    if not accuracy:
        raise WeightsError("no one-view model with a recorded PublicTest accuracy (val_acc) to choose a default from")
    best = max(accuracy.values())
    close = sorted(name for name, acc in accuracy.items() if acc >= best - points / 100 - 1e-12)
    robust = {name: r for name in close if (r := figure(metas[name], "val_mean_corruption_acc")) is not None}
    if robust:
        name = max(sorted(robust), key=robust.__getitem__)
        return name, (f"one view; PublicTest accuracy {100 * accuracy[name]:.2f}%, within {points:g} points of the "
                      f"best one-view model's {100 * best:.2f}% (as are: {', '.join(close)}); the highest PublicTest "
                      f"mean corruption accuracy among them, {100 * robust[name]:.2f}%")
    name = max(close, key=accuracy.__getitem__)
    return name, (f"one view; PublicTest accuracy {100 * best:.2f}%, the best (no model within {points:g} points "
                  "has a PublicTest corruption figure)")


@functools.cache
def default_choice() -> tuple[str, str]:
    """The shipped default model's name and why it is the default (`choose_default` over the shipped files)."""
    return choose_default({name: read_meta(path) for name, path in sorted(shipped_models().items())})


def default_model() -> str:
    """The shipped model that `ferkit` uses when no weights are named."""
    return default_choice()[0]


def resolve_weights(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A path to a weights file, a run folder (its best.safetensors), or a shipped model's name.

    A file or folder on disk wins over a name; a shipped model's name over an old name (`ferkit.deprecations`).
    """
    if name_or_path is None or str(name_or_path) == "default":
        name_or_path = default_model()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from .runs import BEST_WEIGHTS  # run folders are training's: torch is loaded for them anyway

        if (path / BEST_WEIGHTS).is_file():
            return path / BEST_WEIGHTS
        raise WeightsError(f"{path}: a folder without {BEST_WEIGHTS} (a run folder has one once an epoch has ended)")
    if path.is_file():
        return path
    shipped = shipped_models()
    name = str(name_or_path)
    if name not in shipped and not path.exists():
        name = resolve("shipped model", name)
    if name in shipped:
        return shipped[name]
    names = ", ".join(sorted(shipped)) or "none"
    raise WeightsError(f"{name_or_path}: no such weights file, run folder or shipped model (shipped: {names})")


def read_meta(path: str | os.PathLike[str]) -> WeightsMeta:
    """The metadata of a weights file, without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    return meta_from_json(header.get(METADATA_KEY), path)
