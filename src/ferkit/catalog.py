"""The shipped models described: what `ferkit models` prints and `ferkit serve` lists.

Size and cost come from the architecture (parameters, multiply-adds times views); accuracy,
balanced accuracy, calibration and robustness from each file's own metadata, where `ferkit train`
and `ferkit evaluate --record` put the figures measured on PrivateTest (and on PublicTest, from
which `weights.choose_default` picks the default and says why); speed is measured here and now.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .inference import predict_logits
from .models import count_macs, count_parameters
from .weights import default_choice, load_model, shipped_models

SPEED_BATCH = 256
BENCHMARKS = {"fer2013": "FER-2013 PrivateTest"}
"""Where each file's test figures come from, by the labels it was trained on (any FER+ scheme: FER+'s test)."""


def crops_per_second(model: torch.nn.Module, preprocessing: Any, seconds: float, batch: int = SPEED_BATCH) -> float:
    """Crops/s of `model` with its views on this machine's CPU, PyTorch eager, batches of `batch`."""
    crops = np.random.default_rng(0).integers(0, 256, (batch, 48, 48), dtype=np.uint8)
    predict_logits(model, crops, "cpu", batch, preprocessing)  # warm-up
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        predict_logits(model, crops, "cpu", batch, preprocessing)
        done += batch
    return done / (time.perf_counter() - start)


def describe_shipped_models(speed_seconds: float = 1.0) -> list[dict[str, Any]]:
    """One record per shipped model, the default first (with `default_reason`: why it is the default)."""
    default, reason = default_choice()
    rows = []
    for name, path in sorted(shipped_models().items(), key=lambda item: (item[0] != default, item[0])):
        model, meta = load_model(path, "cpu")
        metrics = meta.metrics
        rows.append({
            "name": name, "default": name == default, "default_reason": reason if name == default else None,
            "arch": meta.arch, "path": str(path), "classes": meta.classes,
            "benchmark": BENCHMARKS.get(str(meta.recipe.get("labels", "fer2013")), "FER+ FER2013Test (majority)"),
            "parameters": count_parameters(model), "macs": count_macs(model) * meta.views, "views": meta.views,
            "temperature": meta.preprocessing.temperature,
            "val_accuracy": metrics.get("val_acc"),
            "val_mean_corruption_accuracy": metrics.get("val_mean_corruption_acc"),
            "test_accuracy": metrics.get("test_acc"),
            "test_balanced_accuracy": metrics.get("test_balanced_acc"), "test_macro_f1": metrics.get("test_macro_f1"),
            "test_ece": metrics.get("test_ece"), "mean_corruption_accuracy": metrics.get("mean_corruption_acc"),
            "crops_per_s": crops_per_second(model, meta.preprocessing, speed_seconds) if speed_seconds > 0 else None,
        })
    return rows
