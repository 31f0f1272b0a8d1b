"""The shipped models described: what `ferkit models` prints and `ferkit serve` lists.

Accuracy, balanced accuracy, calibration and robustness come from each file's own metadata, where
`ferkit train` and `ferkit evaluate --record` put the figures measured on PrivateTest (and on
PublicTest, from which `weights.choose_default` picks the default and says why), read from the
safetensors header without loading a tensor. Size, cost and speed are measured once
(`benchmarks/model_speeds.py`) and stored beside the package's code in `catalog.json` (parameters,
multiply-adds times views, crops/s and the machine that measured them), so that listing the models
imports no torch and takes a moment; `speed_seconds` measures the speed here and now instead (PyTorch).
A shipped file the stored table does not know (another size) is measured here.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metadata import default_choice, read_meta, shipped_models

if TYPE_CHECKING:
    import torch

SPEED_BATCH = 256
BENCHMARKS = {"fer2013": "FER-2013 PrivateTest"}
"""Where each file's test figures come from, by the labels it was trained on (any FER+ scheme: FER+'s test)."""
CATALOG_FILE = "catalog.json"


def crops_per_second(model: torch.nn.Module, preprocessing: Any, seconds: float, batch: int = SPEED_BATCH) -> float:
    """Crops/s of `model` with its views on this machine's CPU, PyTorch eager, batches of `batch`."""
    from .inference import predict_logits

    crops = np.random.default_rng(0).integers(0, 256, (batch, 48, 48), dtype=np.uint8)
    predict_logits(model, crops, "cpu", batch, preprocessing)  # warm-up
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        predict_logits(model, crops, "cpu", batch, preprocessing)
        done += batch
    return done / (time.perf_counter() - start)


def stored_catalog() -> dict[str, Any]:
    """The stored measurements (`benchmarks/model_speeds.py`): {"machine", "command", "models": {name: {...}}}."""
    path = resources.files("ferkit") / CATALOG_FILE
    return json.loads(path.read_text()) if path.is_file() else {"models": {}}


def measure_model(path: Path, speed_seconds: float) -> dict[str, Any]:
    """Parameters, multiply-adds a face (views included) and, for `speed_seconds` > 0, crops/s, measured here."""
    from .models import count_macs, count_parameters
    from .weights import load_model

    model, meta = load_model(path, "cpu")
    return {"parameters": count_parameters(model), "macs": count_macs(model) * meta.views, "bytes": path.stat().st_size,
            "crops_per_s": crops_per_second(model, meta.preprocessing, speed_seconds) if speed_seconds > 0 else None}


def describe_shipped_models(speed_seconds: float = 0.0) -> list[dict[str, Any]]:
    """One record per shipped model, the default first (with `default_reason`: why it is the default).

    Size, cost and crops/s are the stored ones (`speed_source` "stored", with the machine in `speed_machine`);
    `speed_seconds` > 0 measures crops/s here and now, for that long per model (`speed_source` "measured here").
    """
    default, reason = default_choice()
    stored = stored_catalog()
    rows = []
    for name, path in sorted(shipped_models().items(), key=lambda item: (item[0] != default, item[0])):
        meta = read_meta(path)
        figures = stored["models"].get(name)
        if speed_seconds > 0 or figures is None or figures.get("bytes") != path.stat().st_size:
            figures, source, machine = measure_model(path, speed_seconds), "measured here", None
        else:
            source, machine = "stored", stored.get("machine")
        metrics = meta.metrics
        rows.append({
            "name": name, "default": name == default, "default_reason": reason if name == default else None,
            "arch": meta.arch, "path": str(path), "classes": meta.classes,
            "benchmark": BENCHMARKS.get(str(meta.recipe.get("labels", "fer2013")), "FER+ FER2013Test (majority)"),
            "parameters": figures["parameters"], "macs": figures["macs"], "views": meta.views,
            "temperature": meta.preprocessing.temperature,
            "val_accuracy": metrics.get("val_acc"),
            "val_mean_corruption_accuracy": metrics.get("val_mean_corruption_acc"),
            "test_accuracy": metrics.get("test_acc"),
            "test_balanced_accuracy": metrics.get("test_balanced_acc"), "test_macro_f1": metrics.get("test_macro_f1"),
            "test_ece": metrics.get("test_ece"), "mean_corruption_accuracy": metrics.get("mean_corruption_acc"),
            "crops_per_s": figures["crops_per_s"], "speed_source": source if figures["crops_per_s"] else None,
            "speed_machine": machine if figures["crops_per_s"] else None,
        })
    return rows
