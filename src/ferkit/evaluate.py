"""Metrics of a model on a split: accuracy, loss, per-class precision / recall / F1, confusion matrix.

The logits come from `ferkit.inference.predict_logits`, the same code every other command runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .labels import EMOTIONS


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    flat = targets.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(
    logits: torch.Tensor, targets: np.ndarray | torch.Tensor, classes: list[str] | tuple[str, ...] = EMOTIONS
) -> dict[str, Any]:
    """Accuracy (a fraction), mean cross-entropy, per-class P/R/F1 and the confusion matrix."""
    target_tensor = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    loss = F.cross_entropy(logits.float(), target_tensor).item() if len(target_tensor) else float("nan")
    predictions = logits.argmax(1).numpy()
    truth = target_tensor.numpy()
    matrix = confusion_matrix(truth, predictions, len(classes))
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(0)
    actual = matrix.sum(1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, actual, strict=True)
    }
    return {
        "accuracy": float(true_positive.sum() / max(len(truth), 1)),
        "loss": float(loss),
        "num_images": len(truth),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def evaluate_weights(
    weights: str | None,
    data: str | None,
    split: str = "test",
    figures_dir: str | None = None,
    device: str = "auto",
    views: int | None = None,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Score a weights file (or run folder, or shipped model) on a split; write the figures.

    `views`: test-time views per face (default: the weights' own). Writes the confusion matrix to
    `figures_dir` (default: the run folder the weights are in, else ./ferkit-eval) and, when the
    weights come from a run folder, the training curves too.
    """
    from pathlib import Path

    from .data import load_fer2013
    from .devices import pick_device
    from .inference import predict_logits
    from .plots import plot_confusion, plot_curves
    from .runs import METRICS_CSV, read_metrics_csv
    from .weights import load_model, resolve_weights

    path = resolve_weights(weights)
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    part = load_fer2013(data)[split]
    pre = meta.preprocessing.with_views(views)
    logits = predict_logits(model, part.images, torch_device, batch_size, pre)
    report = compute_metrics(logits, part.labels, meta.classes)
    metrics_csv = path.parent / METRICS_CSV
    out_dir = Path(figures_dir) if figures_dir else (path.parent if metrics_csv.exists() else Path("ferkit-eval"))
    title = f"{meta.arch} ({path.name}), {split}: accuracy {100 * report['accuracy']:.2f}%"
    figures = [plot_confusion(report["confusion_matrix"], meta.classes, out_dir / f"confusion_matrix_{split}.png",
                              title)]
    if metrics_csv.exists():
        figures.append(plot_curves(read_metrics_csv(metrics_csv), out_dir / "curves.png", title=meta.arch))
    report.update(weights=str(path), arch=meta.arch, split=split, views=pre.views,
                  figures=[str(f) for f in figures])
    return report
