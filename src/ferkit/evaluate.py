"""Metrics of a model on a split: accuracy, balanced accuracy, loss, calibration, per-class P/R/F1, confusion
matrix; temperature fitting; the robustness benchmark (`ferkit.corruptions`).

The logits come from `ferkit.inference.predict_logits`, the same code every other command runs, and
are adjusted (temperature, prior) by `ferkit.inference.adjusted_logits` as every report of ferkit is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import fit_temperature  # noqa: F401  (its home before ferkit.calibration; still imported from here)
from .labels import EMOTIONS


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    flat = targets.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(
    logits: torch.Tensor, targets: np.ndarray | torch.Tensor, classes: list[str] | tuple[str, ...] = EMOTIONS
) -> dict[str, Any]:
    """Accuracy (a fraction), balanced accuracy (mean per-class recall), mean cross-entropy, expected calibration
    error (15 bins), macro F1, per-class P/R/F1 and the confusion matrix."""
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
        "balanced_accuracy": float(recall[actual > 0].mean()) if (actual > 0).any() else 0.0,
        "loss": float(loss),
        "ece": expected_calibration_error(logits, target_tensor),
        "num_images": len(truth),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


ECE_BINS = 15


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-label ECE over 15 equal-width confidence bins (torchmetrics' MulticlassCalibrationError, l1)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if len(targets) == 0:
        return float("nan")
    probabilities = torch.softmax(logits.float(), 1)
    return float(multiclass_calibration_error(probabilities, targets, num_classes=logits.shape[1], n_bins=ECE_BINS,
                                              norm="l1"))


def corruption_report(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, preprocessing: Any, device: torch.device,
    batch_size: int = 512, prior: str = "train", severities: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Accuracy on clean crops and under every corruption of `ferkit.corruptions` at each severity.

    `mean_corruption_accuracy` averages over corruptions and severities, as ImageNet-C does.
    """
    from .corruptions import CORRUPTIONS, SEVERITIES, corrupt
    from .inference import adjusted_logits, predict_logits

    def accuracy(crops: np.ndarray) -> float:
        logits = adjusted_logits(predict_logits(model, crops, device, batch_size, preprocessing).numpy(),
                                 preprocessing, prior)
        return float((logits.argmax(1) == labels).mean())

    chosen = severities or SEVERITIES
    per = {name: {str(s): accuracy(corrupt(images, name, s)) for s in chosen} for name in CORRUPTIONS}
    means = {name: float(np.mean(list(by_severity.values()))) for name, by_severity in per.items()}
    return {"clean_accuracy": accuracy(images), "mean_corruption_accuracy": float(np.mean(list(means.values()))),
            "per_corruption": means, "per_severity": per, "severities": list(chosen)}


def evaluate_weights(
    weights: str | None,
    data: str | None,
    split: str = "test",
    figures_dir: str | None = None,
    device: str = "auto",
    views: int | None = None,
    batch_size: int = 512,
    prior: str = "train",
    corruptions: bool = False,
    severities: tuple[int, ...] | None = None,
    record: bool = False,
) -> dict[str, Any]:
    """Score a weights file (or run folder, or shipped model) on a split; write the figures.

    `views`: test-time views per face (default: the weights' own). `prior`: "train" or "uniform"
    (see `inference.adjusted_logits`) for the report, its figures and the corruptions; `priors` holds
    accuracy, balanced accuracy, loss and ECE under both, and the ECE on the split reweighted to a
    uniform class mix (`ece_uniform_mix`); `default_prior` is the one `ferkit predict` uses. The
    report's probabilities are the weights' calibrated ones (temperature and calibration map);
    `ece_at_temperature_1` is the error before calibration. `corruptions` adds the robustness
    benchmark. `record` stores the split's figures under the training prior in the weights' metadata
    (test: `test_*`; val: `val_*`, which the choice of the default model reads; only with the
    weights' own views): what `ferkit models` shows.
    Writes the confusion matrix and a reliability diagram to `figures_dir` (default: the run folder
    the weights are in, else ./ferkit-eval) and, when the weights come from a run folder, the curves.
    """
    from pathlib import Path

    from .data import load_fer2013
    from .devices import pick_device
    from .inference import DEFAULT_PRIOR, adjusted_logits, predict_logits
    from .plots import plot_confusion, plot_curves, plot_reliability
    from .runs import METRICS_CSV, read_metrics_csv
    from .weights import load_model, resolve_weights

    path = resolve_weights(weights)
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    part = load_fer2013(data)[split]
    pre = meta.preprocessing.with_views(views)
    raw = predict_logits(model, part.images, torch_device, batch_size, pre).numpy()
    logits = torch.from_numpy(adjusted_logits(raw, pre, prior)).float()
    report = compute_metrics(logits, part.labels, meta.classes)
    uncalibrated = dataclasses.replace(pre, temperature=1.0, calibration_matrix=None, calibration_bias=None)
    report["ece_at_temperature_1"] = expected_calibration_error(
        torch.from_numpy(adjusted_logits(raw, uncalibrated, prior)).float(), torch.as_tensor(part.labels))
    report["priors"] = {name: prior_metrics(raw, part.labels, pre, name, meta.classes)
                        for name in available_priors(pre)}
    report["default_prior"] = DEFAULT_PRIOR
    metrics_csv = path.parent / METRICS_CSV
    out_dir = Path(figures_dir) if figures_dir else (path.parent if metrics_csv.exists() else Path("ferkit-eval"))
    title = f"{meta.arch} ({path.name}), {split}: accuracy {100 * report['accuracy']:.2f}%"
    figures = [plot_confusion(report["confusion_matrix"], meta.classes, out_dir / f"confusion_matrix_{split}.png",
                              title),
               plot_reliability(torch.softmax(logits, 1).numpy(), part.labels, out_dir / f"reliability_{split}.png",
                                f"{meta.arch} ({path.name}), {split}: ECE {report['ece']:.3f} "
                                f"(T = {pre.temperature:.3f}{', map' if pre.calibrated else ''}, prior {prior})")]
    if metrics_csv.exists():
        figures.append(plot_curves(read_metrics_csv(metrics_csv), out_dir / "curves.png", title=meta.arch))
    report.update(weights=str(path), arch=meta.arch, split=split, views=pre.views, prior=prior,
                  temperature=pre.temperature, calibration_map=pre.calibrated, figures=[str(f) for f in figures])
    if corruptions:
        report["corruptions"] = corruption_report(model, part.images, part.labels, pre, torch_device, batch_size,
                                                  prior, severities)
    if record:
        _record_test_metrics(path, model, meta, report)
    return report


def available_priors(preprocessing: Any) -> tuple[str, ...]:
    """The priors these weights can report under: uniform needs their training class prior."""
    from .inference import PRIORS

    return PRIORS if preprocessing.class_prior is not None else ("train",)


def prior_metrics(raw: np.ndarray, targets: np.ndarray, preprocessing: Any, prior: str, classes: list[str]
                  ) -> dict[str, float]:
    """Accuracy, balanced accuracy, loss and ECE under `prior`; and the ECE on the split reweighted to a uniform
    class mix (each face weighing 1 / its class count), the mix uniform-prior probabilities are meant for."""
    from .calibration import calibration_error, uniform_mix_weights
    from .inference import adjusted_logits, softmax

    adjusted = adjusted_logits(raw, preprocessing, prior)
    metrics = compute_metrics(torch.from_numpy(adjusted).float(), targets, classes)
    probabilities = softmax(adjusted)
    weights = uniform_mix_weights(targets, len(classes))
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "macro_f1": metrics["macro_f1"], "loss": metrics["loss"], "ece": metrics["ece"],
            "ece_uniform_mix": calibration_error(probabilities, targets, weights)}


def _record_test_metrics(path: Any, model: torch.nn.Module, meta: Any, report: dict[str, Any]) -> None:
    from .weights import save_weights

    if report["split"] not in ("test", "val") or report["views"] != meta.views:
        raise ValueError("--record stores the figures of the weights as they are used: --split test or val and "
                         "the weights' own views")
    split, train = report["split"], report["priors"]["train"]
    figures = {f"{split}_acc": train["accuracy"], f"{split}_balanced_acc": train["balanced_accuracy"],
               f"{split}_ece": train["ece"], f"{split}_loss": train["loss"]}
    if split == "test":
        figures["test_macro_f1"] = train["macro_f1"]
    if "uniform" in report["priors"]:
        figures[f"{split}_ece_uniform_prior_uniform_mix"] = report["priors"]["uniform"]["ece_uniform_mix"]
    bench = report.get("corruptions")
    if bench and len(bench["severities"]) == 5 and report["prior"] == "train":
        figures["mean_corruption_acc" if split == "test" else "val_mean_corruption_acc"] = \
            bench["mean_corruption_accuracy"]
    save_weights(path, model, dataclasses.replace(meta, metrics={**meta.metrics, **figures}))


def calibrate_weights(
    weights: str | None, data: str | None, output: str | None = None, device: str = "auto", batch_size: int = 512,
    calibration_map: str = "auto", strength: float = 1e-3,
) -> dict[str, Any]:
    """Fit the calibration on the validation split (never the test split) and store it in the weights.

    `calibration_map`: "temperature" (alone), "vector" or "matrix" (an affine map of the tempered
    logits, L2 `strength` towards the identity; see `ferkit.calibration`), or "auto": the family and
    strength with the lowest cross-validated ECE on the validation split. Writes the weights, with the
    temperature and map in their preprocessing metadata, to `output` (default: in place). Returns what
    was fitted, the cross-validation table (auto) and the validation NLL and ECE before and after.
    """
    from .calibration import cross_validate, fit_map
    from .data import load_fer2013
    from .devices import pick_device
    from .inference import adjusted_logits, predict_logits
    from .weights import load_model, resolve_weights, save_weights

    path = resolve_weights(weights)
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    val = load_fer2013(data)["val"]
    raw = predict_logits(model, val.images, torch_device, batch_size, meta.preprocessing).numpy()
    table = cross_validate(raw, val.labels) if calibration_map == "auto" else None
    family, strength = (table[0]["family"], table[0]["strength"]) if table else (calibration_map, strength)
    fitted = fit_map(raw, val.labels, family, strength)
    affine = family != "temperature"
    pre = dataclasses.replace(
        meta.preprocessing, temperature=round(fitted.temperature, 6),
        calibration_matrix=tuple(tuple(round(float(v), 6) for v in row) for row in fitted.matrix) if affine else None,
        calibration_bias=tuple(round(float(v), 6) for v in fitted.bias) if affine else None)
    before = compute_metrics(torch.from_numpy(raw), val.labels, meta.classes)
    after = compute_metrics(torch.from_numpy(adjusted_logits(raw, pre)).float(), val.labels, meta.classes)
    out = output or str(path)
    save_weights(out, model, dataclasses.replace(meta, preprocessing=pre))
    return {"weights": str(path), "output": out, "map": family, "strength": strength if affine else None,
            "temperature": pre.temperature, "calibration_matrix": pre.calibration_matrix,
            "calibration_bias": pre.calibration_bias, "split": "val", "cross_validation": table,
            "val_nll_before": before["loss"], "val_nll_after": after["loss"], "val_ece_before": before["ece"],
            "val_ece_after": after["ece"], "val_accuracy_before": before["accuracy"],
            "val_accuracy_after": after["accuracy"], "num_images": len(val.labels)}
