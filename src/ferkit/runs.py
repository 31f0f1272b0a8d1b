"""Run folders: what `ferkit train` writes besides weights, readable by people and tools.

A run folder holds `config.json` (the resolved `TrainConfig`, the ferkit and torch versions and
the identity of the data it trained on), `metrics.csv` (one row per epoch), `checkpoint.safetensors`,
`best.safetensors` (best validation accuracy), `last.safetensors`, and after the last epoch
`test_metrics.json` and the figures. This module reads and writes the plain-text files and the
checkpoint, and checks a folder before a run writes into it.

The checkpoint is one safetensors file: every tensor of the training state (model, optimiser, EMA)
is a tensor of the file, and everything else (epoch, history, scheduler, config, the optimiser's
hyperparameters) is JSON in its header, with each tensor's place marked by its name. Reading it
never unpickles anything, and it is written by one rename, so a kill leaves the old one or the new.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from . import __version__
from .errors import UsageError
from .outputs import TEMP_FILE, write_bytes_atomic, write_csv_atomic, write_text_atomic

if TYPE_CHECKING:
    from .data import FerData

CONFIG_JSON = "config.json"
METRICS_CSV = "metrics.csv"
BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
TEST_METRICS = "test_metrics.json"
CHECKPOINT = "checkpoint.safetensors"
OLD_CHECKPOINT = "checkpoint.pt"
"""ferkit 0.1's pickled checkpoint: recognised, never loaded."""
CHECKPOINT_KEY = "ferkit_checkpoint"
CHECKPOINT_FORMAT = 1


class RunDirError(UsageError):
    """A run folder that cannot be written, or whose checkpoint cannot be used."""


class CheckpointError(RunDirError):
    """A checkpoint that is unreadable, not ferkit's, hostile, or does not fit the run resuming it."""


def data_identity(data: FerData) -> dict[str, Any]:
    """Where the data came from and a digest of its decoded pixels and labels, split by split."""
    digest = hashlib.sha256()
    counts = {}
    for name, split in data.splits.items():
        digest.update(name.encode())
        digest.update(split.images.tobytes())
        digest.update(split.labels.astype("int64").tobytes())
        counts[name] = len(split)
    return {"source": data.source, "format": data.format, "counts": counts, "sha256": digest.hexdigest()}


def write_config_json(run_dir: Path, config: dict[str, Any], data: FerData,
                      identity: dict[str, Any] | None = None) -> Path:
    """config.json: the resolved recipe, the software that ran it and the data it saw (`identity`, if known)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config,
        "ferkit_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "data": identity or data_identity(data),
    }
    return write_text_atomic(run_dir / CONFIG_JSON, json.dumps(record, indent=2) + "\n")


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv from the history of epochs, atomically."""
    write_csv_atomic(path, history)


def read_metrics_csv(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def check_run_dir(run_dir: Path) -> None:
    """Refuse, before any training, a run folder that is a file or cannot be written (RunDirError).

    A folder that does not exist yet is checked where it would be made: its nearest existing parent.
    Nothing is created; a probe file is written and removed.
    """
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file" if existing == run_dir else f"{existing} is a file"
        raise RunDirError(f"{run_dir}: not a folder ({where}): pass another --run-dir")
    probe = existing / f".ferkit-write-test.tmp{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as err:
        raise RunDirError(f"{run_dir}: cannot write in {existing} ({err.strerror or err}): "
                          "pass another --run-dir") from None
    finally:
        probe.unlink(missing_ok=True)


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the `.NAME.tmpPID` files that killed writers left, keeping any whose process still runs."""
    removed = []
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        match = TEMP_FILE.match(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier process with this id: this process has not written yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not ours to judge: keep its file
    return True


# ---------------------------------------------------------------------------------------------
# Checkpoints: nested state (dicts, lists, tuples, numbers, strings, tensors) <-> one safetensors file


def write_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write `state` as a checkpoint, atomically: its tensors as tensors, the rest as JSON in the header."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state, tensors, "")
    header = json.dumps({"format": CHECKPOINT_FORMAT, "state": structure})
    return write_bytes_atomic(Path(path), save_safetensors(tensors, metadata={CHECKPOINT_KEY: header}))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state that `write_checkpoint` wrote, on the CPU; CheckpointError naming `path` for anything else.

    Only its form is checked here; whether it fits a model and a recipe is for the trainer to check.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not head:
        raise CheckpointError(f"{path}: an empty file, not a checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(CHECKPOINT_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # any failure to parse a file from outside is "not readable", never a traceback
        if head.startswith((b"\x80", b"PK\x03\x04")):  # pickle protocol 2+, or torch.save's zip of pickles
            raise CheckpointError(f"{path}: a pickle or torch.save file, which ferkit never loads (its checkpoints "
                                  "are safetensors)") from None
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({_first_line(err)})") from None
    if header is None:
        raise CheckpointError(f"{path}: a safetensors file without a ferkit checkpoint in it (weights files are not "
                              "checkpoints)")
    try:
        record = json.loads(header)
        if not isinstance(record, dict) or not isinstance(record.get("state"), dict):
            raise ValueError("not a JSON object with a state")
        if record.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {record.get('format')!r}; this ferkit reads {CHECKPOINT_FORMAT}")
        state = _join(record["state"], tensors)
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        raise CheckpointError(f"{path}: malformed checkpoint ({_first_line(err)})") from None
    return dict(state)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def _split(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON for `value`, with each tensor moved into `tensors` under its path and marked by name."""
    if isinstance(value, torch.Tensor):
        if where in tensors:
            raise ValueError(f"two tensors at {where!r}")
        tensors[where] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: where}
    if isinstance(value, tuple):
        return {_TUPLE: [_split(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {_TENSOR, _TUPLE, _ITEMS} & set(value):
            return {k: _split(v, tensors, f"{where}/{k}".lstrip("/")) for k, v in value.items()}
        return {_ITEMS: [[k, _split(v, tensors, f"{where}/{k}")] for k, v in value.items()]}  # e.g. int keys
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {where!r})")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_split`; ValueError/KeyError for anything `_split` cannot have written."""
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_join(value[_TUPLE], tensors))
    if _ITEMS in value:
        items = value[_ITEMS]
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 and isinstance(i[0], (int, str))
                                                  for i in items):
            raise ValueError("malformed dict items")
        return {k: _join(v, tensors) for k, v in items}
    return {k: _join(v, tensors) for k, v in value.items()}
