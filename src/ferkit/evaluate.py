"""Metrics of a model on a split: accuracy, balanced accuracy, loss, calibration, per-class P/R/F1, confusion
matrix; temperature fitting; the robustness benchmark (`ferkit.corruptions`); scores against FER+'s votes and
across the FER-2013 and FER+ vocabularies.

The logits come from `ferkit.inference.predict_logits`, the same code every other command runs, and
are adjusted (temperature, prior) by `ferkit.inference.adjusted_logits` as every report of ferkit is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import fit_temperature  # noqa: F401  (its home before ferkit.calibration; still imported from here)
from .errors import UsageError
from .labels import EMOTIONS, FERPLUS_CLASSES
from .outputs import check_output_file
from .votes import majority_labels, plurality_labels, vote_distributions

if TYPE_CHECKING:
    from .data import FerData
    from .inference import Preprocessing

FER2013_TEST_COUNTS = {"angry": 491, "disgust": 55, "fear": 528, "happy": 879, "sad": 594, "surprise": 416,
                       "neutral": 626}
"""FER-2013's PrivateTest images per class (3,589 in all): `--record` stores figures of the whole split only."""

@dataclass
class Metrics:
    """A model's scores on labelled faces (`compute_metrics`); fractions, not percentages."""

    accuracy: float
    balanced_accuracy: float  # the mean per-class recall
    loss: float  # mean cross-entropy
    ece: float  # expected calibration error, 15 bins
    num_images: int
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support
    confusion_matrix: list[list[int]]  # counts[true][predicted]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, in the order `--json` prints them; parts a report lacks are left out."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class FerplusScores:
    """A model scored against FER+'s crowd votes (`ferplus_report`), over the classes it shares with FER+."""

    classes: list[str]
    majority_accuracy: float
    majority_faces: int
    majority_balanced_accuracy: float
    majority_ece: float
    majority_macro_f1: float
    confusion_matrix: list[list[int]]
    plurality_accuracy: float
    plurality_faces: int
    distribution_nll: float
    distribution_kl: float
    distribution_faces: int


@dataclass
class CorruptionScores:
    """The robustness benchmark (`corruption_report`): accuracy on clean faces and under each corruption."""

    clean_accuracy: float
    mean_corruption_accuracy: float
    per_corruption: dict[str, float]  # the mean over the severities
    per_severity: dict[str, dict[str, float]]  # corruption -> severity (as text) -> accuracy
    severities: list[int]


@dataclass(kw_only=True)
class Evaluation(Metrics):
    """`evaluate_weights`' report: the metrics of the weights on a split, what was scored and how, and the
    optional parts (None where not computed; `to_dict` leaves them out, as `--json` always has)."""

    ece_at_temperature_1: float
    priors: dict[str, dict[str, float]] | None = None  # prior -> `prior_metrics`, on the model's own classes
    default_prior: str | None = None
    ferplus: FerplusScores | None = None
    weights: str
    arch: str
    data_labels: str
    classes: list[str]
    split: str
    views: int
    prior: str
    temperature: float
    calibration_map: bool
    figures: list[str] = field(default_factory=list)
    corruptions: CorruptionScores | None = None


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    flat = targets.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(
    logits: torch.Tensor, targets: np.ndarray | torch.Tensor, classes: list[str] | tuple[str, ...] = EMOTIONS
) -> Metrics:
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
    per_class: dict[str, dict[str, float]] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, actual, strict=True)
    }
    return Metrics(
        accuracy=float(true_positive.sum() / max(len(truth), 1)),
        balanced_accuracy=float(recall[actual > 0].mean()) if (actual > 0).any() else 0.0,
        loss=float(loss),
        ece=expected_calibration_error(logits, target_tensor),
        num_images=len(truth),
        macro_f1=float(f1.mean()),
        per_class=per_class,
        confusion_matrix=matrix.tolist(),
    )


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
) -> CorruptionScores:
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
    return CorruptionScores(clean_accuracy=accuracy(images),
                            mean_corruption_accuracy=float(np.mean(list(means.values()))),
                            per_corruption=means, per_severity=per, severities=list(chosen))


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
    output: str | None = None,
    votes: str | None = None,
) -> Evaluation:
    """Score a weights file (or run folder, or shipped model) on a split.

    `views`: test-time views per face (default: the weights' own). `prior`: "train" or "uniform"
    (see `inference.adjusted_logits`) for the report, its figures and the corruptions; `priors` holds
    accuracy, balanced accuracy, loss and ECE under both, and the ECE on the split reweighted to a
    uniform class mix (`ece_uniform_mix`); `default_prior` is the one `ferkit predict` uses. The
    report's probabilities are the weights' calibrated ones (temperature and calibration map);
    `ece_at_temperature_1` is the error before calibration. `corruptions` adds the robustness
    benchmark. `record` stores the split's figures under the training prior in the weights' metadata
    (test: `test_*`, only for the whole test split; val: `val_*`, which the choice of the default model
    reads; only with the weights' own views): what `ferkit models` shows; it writes the weights to
    `output` (default: in place; never into the installed package).
    Figures only where asked: the confusion matrix and a reliability diagram into `figures_dir`, and, when
    the weights come from a run folder, its curves.
    On FER+ data (or `votes`: FER+'s fer2013new.csv beside a fer2013.csv) the labels are FER+'s majority
    protocol, `ferplus` adds the scores against the votes, and a model of the other vocabulary is scored
    over the classes the two share.
    """
    from .devices import pick_device
    from .inference import DEFAULT_PRIOR, adjusted_logits
    from .weights import load_model, resolve_weights

    path = resolve_weights(weights)
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    pre = meta.preprocessing.with_views(views)
    if record:  # refused before the scoring, which takes minutes
        check_output_file(output or path)
        _check_record(split, pre.views, meta.views)
    dataset = labelled_data(data, votes)
    part = dataset[split]
    if record:
        _check_whole_split(split, part.labels, dataset.classes, meta.classes)
    raw, every_raw = split_logits(model, dataset, split, torch_device, batch_size, pre)

    def shared(preprocessing: Preprocessing) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        logits, labels, classes, _ = shared_class_view(adjusted_logits(raw, preprocessing, prior), part.labels,
                                                       meta.classes, dataset.classes)
        return torch.from_numpy(logits).float(), labels, classes

    logits, labels, classes = shared(pre)
    uncalibrated = pre.without_calibration()
    own = classes == list(meta.classes)  # the priors and the corruptions need the model's own classes
    report = Evaluation(
        **asdict(compute_metrics(logits, labels, classes)),
        ece_at_temperature_1=expected_calibration_error(shared(uncalibrated)[0], torch.as_tensor(labels)),
        priors={name: prior_metrics(raw, labels, pre, name, meta.classes) for name in available_priors(pre)}
        if own else None,
        default_prior=DEFAULT_PRIOR if own else None,
        ferplus=None if every_raw is None or dataset.all_faces is None else ferplus_report(
            adjusted_logits(every_raw, pre, prior), dataset.all_faces[split].votes, meta.classes),
        weights=str(path), arch=meta.arch, data_labels=dataset.labels, classes=classes, split=split,
        views=pre.views, prior=prior, temperature=pre.temperature, calibration_map=pre.calibrated)
    if figures_dir:
        report.figures = _write_figures(report, torch.softmax(logits, 1).numpy(), labels, Path(figures_dir), path)
    if corruptions:
        if not own:
            raise UsageError("--corruptions scores a model on labels of its own classes")
        report.corruptions = corruption_report(model, part.images, labels, pre, torch_device, batch_size, prior,
                                               severities)
    if record:
        _record_test_metrics(output or path, model, meta, report)
    return report


def labelled_data(data: str | None, votes: str | None = None) -> FerData:
    """The data set that evaluation and calibration score on: FER-2013's labels, or FER+'s majority protocol."""
    from .data import load_fer2013
    from .ferplus import with_label_scheme

    dataset = load_fer2013(data, votes=votes)
    return dataset if dataset.labels == "fer2013" else with_label_scheme(dataset, "ferplus-majority")


def split_logits(
    model: torch.nn.Module, data: FerData, split: str, device: torch.device, batch_size: int,
    preprocessing: Preprocessing,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw logits of the faces `data[split]` labels and, under a FER+ scheme, of all the split's faces (which the
    votes score). The model runs once: the majority protocol's faces (validation and test always) are those of
    all the faces that have a majority."""
    from .inference import predict_logits

    def logits(images: np.ndarray) -> np.ndarray:
        return predict_logits(model, images, device, batch_size, preprocessing).numpy()

    part = data[split]
    if data.all_faces is None:
        return logits(part.images), None
    every = data.all_faces[split]
    every_raw = logits(every.images)
    majority = majority_labels(every.votes) >= 0 if every.votes is not None else np.zeros(len(every), bool)
    if np.array_equal(every.names[majority], part.names):
        return every_raw[majority], every_raw
    return logits(part.images), every_raw  # a training split under another scheme


def _write_figures(report: Evaluation, probabilities: np.ndarray, labels: np.ndarray, out_dir: Path,
                   weights: Path) -> list[str]:
    """The confusion matrix, the reliability diagram and, for weights in a run folder, the run's curves."""
    from .plots import plot_confusion, plot_curves, plot_reliability
    from .runs import METRICS_CSV, read_metrics_csv

    title = f"{report.arch} ({weights.name}), {report.split}"
    figures = [plot_confusion(report.confusion_matrix, report.classes, out_dir / f"confusion_matrix_{report.split}.png",
                              f"{title}: accuracy {100 * report.accuracy:.2f}%"),
               plot_reliability(probabilities, labels, out_dir / f"reliability_{report.split}.png",
                                f"{title}: ECE {report.ece:.3f} (T = {report.temperature:.3f}"
                                f"{', map' if report.calibration_map else ''}, prior {report.prior})")]
    metrics_csv = weights.parent / METRICS_CSV
    if metrics_csv.exists():
        figures.append(plot_curves(read_metrics_csv(metrics_csv), out_dir / "curves.png", title=report.arch))
    return [str(f) for f in figures]


def _check_record(split: str, views: int, own_views: int) -> None:
    if split not in ("test", "val") or views != own_views:
        raise UsageError("--record stores the figures of the weights as they are used: --split test or val and "
                         "the weights' own views")


def _check_whole_split(split: str, labels: np.ndarray, classes: tuple[str, ...], model_classes: list[str]) -> None:
    """ValueError unless the model names the data's classes (figures across vocabularies are not its own
    benchmark's) and, for the test split, `labels` are FER-2013's whole PrivateTest split (or, on FER+, its
    whole majority-protocol test split), class by class."""
    from .ferplus import FERPLUS_TEST_MAJORITY_COUNTS

    if list(classes) != list(model_classes):
        raise UsageError(f"--record stores figures on the model's own classes ({', '.join(model_classes)}), not "
                         f"on data labelled {', '.join(classes)}")
    if split != "test":
        return
    fer2013 = tuple(classes) == EMOTIONS
    manifest, split_name = (FER2013_TEST_COUNTS, "PrivateTest") if fer2013 else \
        (FERPLUS_TEST_MAJORITY_COUNTS, "FER2013Test (majority protocol)")
    expected = [manifest.get(name, -1) for name in classes]
    counts = np.bincount(labels, minlength=len(classes)).tolist()
    if counts != expected:
        differ = ", ".join(f"{name} {n} of {e}" for name, n, e in zip(classes, counts, expected, strict=True)
                           if n != e)
        raise UsageError(f"--record stores figures of the whole {split_name} split ({sum(expected):,} images), but "
                         f"this data's test split has {len(labels):,} images ({differ}); score the full data set")


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
    return {"accuracy": metrics.accuracy, "balanced_accuracy": metrics.balanced_accuracy,
            "macro_f1": metrics.macro_f1, "loss": metrics.loss, "ece": metrics.ece,
            "ece_uniform_mix": calibration_error(probabilities, targets, weights)}


def _record_test_metrics(path: Any, model: torch.nn.Module, meta: Any, report: Evaluation) -> None:
    from .weights import save_weights

    split, priors = report.split, report.priors or {}
    train = priors["train"]
    figures = {f"{split}_acc": train["accuracy"], f"{split}_balanced_acc": train["balanced_accuracy"],
               f"{split}_ece": train["ece"], f"{split}_loss": train["loss"]}
    if split == "test":
        figures["test_macro_f1"] = train["macro_f1"]
    if "uniform" in priors:
        figures[f"{split}_ece_uniform_prior_uniform_mix"] = priors["uniform"]["ece_uniform_mix"]
    bench = report.corruptions
    if bench and len(bench.severities) == 5 and report.prior == "train":
        figures["mean_corruption_acc" if split == "test" else "val_mean_corruption_acc"] = \
            bench.mean_corruption_accuracy
    save_weights(path, model, dataclasses.replace(meta, metrics={**meta.metrics, **figures}))


def calibrate_weights(
    weights: str | None, data: str | None, output: str | None = None, device: str = "auto", batch_size: int = 512,
    calibration_map: str = "auto", strength: float = 1e-3, confidence_step: str = "auto",
) -> dict[str, Any]:
    """Fit the calibration on the validation split (never the test split) and store it in the weights.

    `calibration_map`: "temperature" (alone), "vector" or "matrix" (an affine map of the tempered
    logits, L2 `strength` towards the identity; see `ferkit.calibration`), or "auto": the family and
    strength with the lowest cross-validated ECE on the validation split. `confidence_step`: "on", "off",
    or "auto": whichever cross-validates better with the map. Writes the weights, with the temperature,
    map and step in their preprocessing metadata, to `output` (default: in place; never into the
    installed package, whose shipped models are everyone's). Returns what was fitted, the
    cross-validation table (when anything was "auto") and the validation NLL and ECE before and after.
    On FER+ data the validation labels are FER+'s majority protocol.
    """
    from .calibration import CANDIDATES, cross_validate, fit_map
    from .devices import pick_device
    from .inference import adjusted_logits, predict_logits
    from .weights import load_model, resolve_weights, save_weights

    if confidence_step not in ("auto", "on", "off"):
        raise UsageError(f"confidence step {confidence_step!r}: choose auto, on or off")
    path = resolve_weights(weights)
    out = str(check_output_file(output or path))  # before the fitting, not after it
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    val = labelled_data(data)["val"]
    raw = predict_logits(model, val.images, torch_device, batch_size, meta.preprocessing).numpy()
    candidates = CANDIDATES if calibration_map == "auto" else ((calibration_map, strength),)
    steps = (False, True) if confidence_step == "auto" else (confidence_step == "on",)
    table = cross_validate(raw, val.labels, candidates, steps) if len(candidates) * len(steps) > 1 else None
    family, strength, step = ((table[0]["family"], table[0]["strength"], table[0]["confidence_step"]) if table
                              else (calibration_map, strength, steps[0]))
    fitted = fit_map(raw, val.labels, family, strength, step)
    pre = dataclasses.replace(meta.preprocessing, **_stored(fitted, affine=family != "temperature"))
    before = compute_metrics(torch.from_numpy(raw), val.labels, meta.classes)
    after = compute_metrics(torch.from_numpy(adjusted_logits(raw, pre)).float(), val.labels, meta.classes)
    save_weights(out, model, dataclasses.replace(meta, preprocessing=pre))
    return {"weights": str(path), "output": out, "map": family, "strength": strength if family != "temperature"
            else None, "temperature": pre.temperature, "calibration_matrix": pre.calibration_matrix,
            "calibration_bias": pre.calibration_bias, "confidence_step": step,
            "confidence_knots": pre.confidence_knots, "confidence_values": pre.confidence_values, "split": "val",
            "cross_validation": table, "val_nll_before": before.loss, "val_nll_after": after.loss,
            "val_ece_before": before.ece, "val_ece_after": after.ece, "val_accuracy_before": before.accuracy,
            "val_accuracy_after": after.accuracy, "num_images": len(val.labels)}


def _stored(fitted: Any, affine: bool) -> dict[str, Any]:
    """A fitted `CalibrationMap` as the weights' preprocessing fields, rounded to 6 decimals."""
    def numbers(values: Any) -> tuple[float, ...]:
        return tuple(round(float(v), 6) for v in values)

    return {"temperature": round(fitted.temperature, 6),
            "calibration_matrix": tuple(numbers(row) for row in fitted.matrix) if affine else None,
            "calibration_bias": numbers(fitted.bias) if affine else None,
            "confidence_knots": None if fitted.knots is None else numbers(fitted.knots),
            "confidence_values": None if fitted.values is None else numbers(fitted.values)}


# ---------------------------------------------------------------------------------------------
# FER+: scores against the crowd votes, and across the FER-2013 and FER+ vocabularies


def class_columns(from_classes: list[str] | tuple[str, ...], to_classes: list[str] | tuple[str, ...]) -> list[int]:
    """Indices into `from_classes` of each of `to_classes`, by name (e.g. a FER+ model's logits in FER-2013 order)."""
    missing = [c for c in to_classes if c not in from_classes]
    if missing:
        raise ValueError(f"classes {', '.join(missing)} are not among {', '.join(from_classes)}")
    return [list(from_classes).index(c) for c in to_classes]


def ferplus_report(
    logits: np.ndarray, votes: np.ndarray | None, classes: list[str] | tuple[str, ...]
) -> FerplusScores:
    """A model's (N, classes) logits scored against FER+ votes (N, 10) over the classes both share.

    For a FER+ model that is all eight; a FER-2013 model is scored over its seven (faces whose majority is
    contempt are left out). Majority accuracy is the literature's protocol; plurality accuracy, balanced
    accuracy, ECE and the confusion matrix are over the faces each scheme keeps; NLL and KL are against
    the vote distributions (outliers removed, renormalised over the shared classes).
    """
    if votes is None:
        raise ValueError("no FER+ votes to score against")
    shared = [c for c in FERPLUS_CLASSES if c in classes]
    z = torch.from_numpy(np.asarray(logits, dtype=np.float32)[:, class_columns(classes, shared)])
    to_shared = np.array([shared.index(c) if c in shared else -1 for c in FERPLUS_CLASSES])

    def scored(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mapped = np.where(labels >= 0, to_shared[np.maximum(labels, 0)], -1)
        return mapped >= 0, mapped

    keep, majority = scored(majority_labels(votes))
    report = compute_metrics(z[keep], majority[keep], shared)
    plural_keep, plurality = scored(plurality_labels(votes))
    plural = compute_metrics(z[plural_keep], plurality[plural_keep], shared)
    nll, kl, faces = _distribution_fit(z, votes, shared)
    return FerplusScores(
        classes=shared, majority_accuracy=report.accuracy, majority_faces=int(keep.sum()),
        majority_balanced_accuracy=report.balanced_accuracy, majority_ece=report.ece,
        majority_macro_f1=report.macro_f1, confusion_matrix=report.confusion_matrix,
        plurality_accuracy=plural.accuracy, plurality_faces=int(plural_keep.sum()),
        distribution_nll=nll, distribution_kl=kl, distribution_faces=faces)


def _distribution_fit(z: torch.Tensor, votes: np.ndarray, shared: list[str]) -> tuple[float, float, int]:
    """Mean cross-entropy and KL divergence (nats) of softmax(z) from the vote distributions over `shared`."""
    targets, keep = vote_distributions(votes)
    p = targets[:, [FERPLUS_CLASSES.index(c) for c in shared]].astype(np.float64)
    total = p.sum(1)
    keep &= total > 0
    p = p[keep] / total[keep, None]
    log_q = torch.log_softmax(z[torch.from_numpy(keep)].double(), 1).numpy()
    nll = -(p * log_q).sum(1)
    entropy = -(p * np.log(p, out=np.zeros_like(p), where=p > 0)).sum(1)
    return float(nll.mean()), float((nll - entropy).mean()), int(keep.sum())


def shared_class_view(
    logits: np.ndarray, labels: np.ndarray, model_classes: list[str] | tuple[str, ...],
    label_classes: list[str] | tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """A model scored on labels of another vocabulary (a FER-2013 model on FER+, a FER+ model on FER-2013):
    (logits over the shared classes, labels as indices into them, the shared classes in the labels' order,
    the mask of faces whose label is shared). With one vocabulary it changes nothing."""
    shared = [c for c in label_classes if c in model_classes]
    to_shared = np.array([shared.index(c) if c in shared else -1 for c in label_classes])
    labels = np.asarray(labels)
    mapped = np.where(labels >= 0, to_shared[np.maximum(labels, 0)], -1)
    keep = mapped >= 0
    return np.asarray(logits)[keep][:, class_columns(model_classes, shared)], mapped[keep], shared, keep
