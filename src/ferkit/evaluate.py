"""Metrics of a model on a split: accuracy, loss, per-class precision / recall / F1, confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import preprocess
from .labels import EMOTIONS


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    tta: str = "none",
) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 crops (N, 48, 48), in eval mode and float32.

    `tta="flip"` averages the logits of each image and its mirror image; `tta="crops"` those of ten
    views: the image and four copies shifted by 2 pixels (crops of the padded image), each mirrored.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = preprocess(images[start : start + batch_size], device)
        # Channels-last is what oneDNN's convolutions run fastest on a CPU (about 1.6x here).
        views = [view.contiguous(memory_format=torch.channels_last) for view in tta_views(batch, tta)]
        outputs.append(torch.stack([model(view).float() for view in views]).mean(0).cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0, len(EMOTIONS))


TTA_MODES = ("none", "flip", "crops")
TTA_SHIFT = 2


def tta_views(batch: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a normalised batch that test-time augmentation averages over."""
    if tta == "none":
        return [batch]
    views = [batch]
    if tta == "crops":
        s = TTA_SHIFT
        # Black (-1) padding, the same fill as the training-time shifts.
        padded = F.pad(batch, (s, s, s, s), value=-1.0)
        size = batch.shape[-1]
        views += [padded[..., y : y + size, x : x + size] for y, x in ((0, s), (2 * s, s), (s, 0), (s, 2 * s))]
    return views + [view.flip(-1) for view in views]


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
    out: str | None = None,
    device: str = "auto",
    tta: str = "auto",
    batch_size: int = 512,
) -> dict[str, Any]:
    """Score a weights file (or run folder, or shipped model) on a split; write the figures.

    Writes the confusion matrix to `out` (default: the run folder the weights are in, else
    ./ferkit-eval) and, when the weights come from a run folder, the training curves too.
    """
    from pathlib import Path

    from .data import load_fer2013
    from .devices import pick_device
    from .plots import plot_confusion, plot_curves
    from .train import read_metrics_csv
    from .weights import load_model, resolve_weights

    path = resolve_weights(weights)
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    part = load_fer2013(data)[split]
    chosen_tta = meta.tta if tta == "auto" else tta
    report = compute_metrics(predict_logits(model, part.images, torch_device, batch_size, chosen_tta), part.labels,
                             meta.classes)
    metrics_csv = path.parent / "metrics.csv"
    out_dir = Path(out) if out else (path.parent if metrics_csv.exists() else Path("ferkit-eval"))
    title = f"{meta.arch} ({path.name}), {split}: accuracy {100 * report['accuracy']:.2f}%"
    figures = [plot_confusion(report["confusion_matrix"], meta.classes, out_dir / f"confusion_matrix_{split}.png",
                              title)]
    if metrics_csv.exists():
        figures.append(plot_curves(read_metrics_csv(metrics_csv), out_dir / "curves.png", title=meta.arch))
    report.update(weights=str(path), arch=meta.arch, split=split, tta=chosen_tta,
                  figures=[str(f) for f in figures])
    return report
