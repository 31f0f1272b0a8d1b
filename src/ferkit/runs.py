"""Run folders: what `ferkit train` writes besides weights, readable by people and tools.

A run folder holds `config.json` (the resolved `TrainConfig`, the ferkit and torch versions and
the identity of the data it trained on), `metrics.csv` (one row per epoch), the checkpoint,
`best.safetensors` (best validation accuracy), `last.safetensors`, and after the last epoch
`test_metrics.json` and the figures. This module reads and writes the plain-text files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import FerData

CONFIG_JSON = "config.json"
METRICS_CSV = "metrics.csv"
BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
TEST_METRICS = "test_metrics.json"


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


def write_config_json(run_dir: Path, config: dict[str, Any], data: FerData) -> Path:
    """config.json: the resolved recipe, the software that ran it and the data it saw."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config,
        "ferkit_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "data": data_identity(data),
    }
    return write_text_atomic(run_dir / CONFIG_JSON, json.dumps(record, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write-then-rename, so that a kill leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv from the history of epochs, atomically."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metrics_csv(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
