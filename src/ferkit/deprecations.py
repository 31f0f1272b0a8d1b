"""Every name ferkit has renamed, in one table, and the one function that resolves them.

An old name keeps working until `REMOVED_IN`, with one `OldNameWarning` per old name and process (the
`ferkit` command prints it as one `ferkit: warning: ...` line). Nothing else in ferkit knows old names:
registries, listings (`ferkit models`, `list_models()`, the presets) and `--help` show only the new ones.

Precedence, everywhere: the new name wins.
- A mapping that holds a value under both the old key and the new one (training options, a weights
  file's metadata) keeps the new key's value; the old one is dropped, still with its warning.
- A name that is itself a current name (a shipped model, a preset, an architecture) is never renamed.
- For weights, a file or folder on disk wins over any name, old or new (`ferkit.weights.resolve_weights`).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from typing import Any

REMOVED_IN = "0.3"

RENAMES: dict[str, dict[str, str]] = {
    # kind of name: {old name: new name}; the kind is how the warning names it.
    "shipped model": {"seed": "ferkit-refcnn", "best": "ferkit-resnet"},
    "preset": {"seed": "reference", "best": "accurate"},
    "architecture": {"seed": "refcnn"},
    "training option": {"out": "run_dir", "tta": "views"},  # TrainConfig fields: from_preset(), config.json
    "weights metadata field": {"tta": "views"},  # metadata format 1 (ferkit 0.1)
    "ferkit train option": {"--out": "--run-dir", "--tta": "--views"},
    "ferkit evaluate option": {"--out": "--figures-dir", "--tta": "--views"},
    "ferkit export option": {"--out": "--output", "--tta": "--views"},
    "ferkit predict option": {"--detect-size": "--detect-max-side"},
}
VIEWS_FROM_TTA = {"none": 1, "flip": 2, "crops": 10}
"""The values of the old `tta` (option, training option, metadata field) as the view counts of `views`."""


def views_from_tta(value: str) -> int | None:
    """A value of the old `--tta` option as a view count (auto: None, the weights' own); an argparse type."""
    if value == "auto":
        return None
    if value not in VIEWS_FROM_TTA:
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from auto, {', '.join(VIEWS_FROM_TTA)})")
    return VIEWS_FROM_TTA[value]


class OldNameWarning(FutureWarning):
    """An old name was used; it works until `REMOVED_IN`. A FutureWarning, so that users see it by default."""


_warned: set[tuple[str, str]] = set()


def resolve(kind: str, name: str, *, warn: bool = True) -> str:
    """`name`, or its new name if it is an old name of this `kind` (a key of `RENAMES`).

    The first use of each old name in a process warns (unless `warn` is False: checks that only compare
    names leave the warning to the use that follows); later uses are silent.
    """
    new = RENAMES[kind].get(name)
    if new is None:
        return name
    if warn and (kind, name) not in _warned:
        _warned.add((kind, name))
        warnings.warn(f"the {kind} {name!r} is now called {new!r}; the old name goes in {REMOVED_IN}",
                      OldNameWarning, stacklevel=3)
    return new


def rename_keys(values: Mapping[str, Any], kind: str, *, warn: bool = True) -> dict[str, Any]:
    """A copy of `values` with each old key of `kind` under its new name; where both are present, the new
    key's value wins."""
    renamed = dict(values)
    for old in RENAMES[kind]:
        if old in renamed:
            value = renamed.pop(old)
            renamed.setdefault(resolve(kind, old, warn=warn), value)
    return renamed


def forget_warnings() -> None:
    """Warn again on the next use of each old name (for tests that check the warning)."""
    _warned.clear()
