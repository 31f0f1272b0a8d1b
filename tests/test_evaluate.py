"""Metrics against hand-computed values, test-time augmentation, and scoring a run folder."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from by_hand import calibrated_by_hand
from ferkit.data import FerData
from ferkit.evaluate import calibrate_weights, compute_metrics, confusion_matrix, evaluate_weights, fit_temperature
from ferkit.inference import predict_logits, preprocess
from ferkit.labels import EMOTIONS
from ferkit.models import create_model
from ferkit.weights import load_model, read_meta

# Six examples, three classes; predictions (argmax) 0 0 1 1 0 0; class 2 is never predicted.
LOGITS = [
    [2.0, 1.0, 0.0],   # true 0, predicted 0
    [1.0, 0.0, -1.0],  # true 0, predicted 0
    [0.0, 3.0, 1.0],   # true 0, predicted 1
    [0.5, 1.5, 0.0],   # true 1, predicted 1
    [1.0, 0.0, 0.5],   # true 1, predicted 0
    [2.0, 0.0, 1.0],   # true 2, predicted 0
]
TARGETS = [0, 0, 0, 1, 1, 2]
CLASSES = ("a", "b", "c")


def test_compute_metrics_by_hand() -> None:
    metrics = compute_metrics(torch.tensor(LOGITS), np.array(TARGETS), CLASSES)
    assert metrics.num_images == 6
    assert metrics.accuracy == pytest.approx(3 / 6)
    # Mean of -log softmax(logits)[target], written out.
    nll = [-(row[t] - math.log(sum(math.exp(v) for v in row))) for row, t in zip(LOGITS, TARGETS, strict=True)]
    assert metrics.loss == pytest.approx(sum(nll) / 6, rel=1e-6)
    assert metrics.confusion_matrix == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    expected = {
        # precision = TP / predicted, recall = TP / actual, F1 = 2PR / (P + R)
        "a": (2 / 4, 2 / 3, 4 / 7, 3),
        "b": (1 / 2, 1 / 2, 1 / 2, 2),
        "c": (0.0, 0.0, 0.0, 1),  # never predicted: precision 0, not NaN
    }
    assert list(metrics.per_class) == list(CLASSES)
    for name, (precision, recall, f1, support) in expected.items():
        got = metrics.per_class[name]
        assert got["precision"] == pytest.approx(precision)
        assert got["recall"] == pytest.approx(recall)
        assert got["f1"] == pytest.approx(f1)
        assert got["support"] == support
    assert metrics.macro_f1 == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)
    json.dumps(metrics.to_dict(), allow_nan=False)  # plain JSON types, no NaN anywhere


def test_classes_absent_from_a_split_score_zero_not_nan() -> None:
    # Seven classes, two images of "happy", both right: every other class has no support and no predictions.
    logits = torch.full((2, 7), -1.0)
    logits[:, EMOTIONS.index("happy")] = 4.0
    metrics = compute_metrics(logits, np.array([3, 3]))
    assert metrics.accuracy == 1.0
    assert metrics.loss == pytest.approx(-math.log(math.exp(4) / (math.exp(4) + 6 * math.exp(-1))))
    assert metrics.per_class["happy"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    for name in EMOTIONS:
        if name != "happy":
            assert metrics.per_class[name] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics.macro_f1 == pytest.approx(1 / 7)
    json.dumps(metrics.to_dict(), allow_nan=False)


def test_confusion_matrix_is_true_by_predicted() -> None:
    matrix = confusion_matrix(np.array([0, 1, 2, 2]), np.array([1, 1, 0, 2]), 3)
    np.testing.assert_array_equal(matrix, [[0, 1, 0], [0, 1, 0], [1, 0, 1]])


@pytest.fixture(scope="module")
def model_and_faces(small_data: FerData) -> tuple[torch.nn.Module, np.ndarray]:
    torch.manual_seed(0)
    return create_model("refcnn").eval(), small_data["val"].images[:20]


def test_flip_tta_averages_the_image_and_its_mirror(model_and_faces: tuple[torch.nn.Module, np.ndarray]) -> None:
    model, faces = model_and_faces
    with torch.no_grad():
        plain = model(preprocess(faces))
        mirrored = model(preprocess(np.ascontiguousarray(faces[:, :, ::-1])))
    flip = predict_logits(model, faces, views=2, batch_size=8)
    torch.testing.assert_close(flip, (plain + mirrored) / 2, rtol=0, atol=1e-5)
    assert not torch.allclose(flip, plain, atol=1e-3)  # the mirror image really contributes
    torch.testing.assert_close(predict_logits(model, faces, views=1), plain, rtol=0, atol=1e-5)


def test_predict_logits_edge_cases(model_and_faces: tuple[torch.nn.Module, np.ndarray]) -> None:
    model, faces = model_and_faces
    torch.testing.assert_close(predict_logits(model, faces, batch_size=3), predict_logits(model, faces),
                               rtol=0, atol=1e-5)
    assert predict_logits(model, faces[:0]).shape == (0, 7)
    with pytest.raises(ValueError, match="views 4: choose one of 1, 2, 10"):
        predict_logits(model, faces, views=4)
    with pytest.raises(ValueError, match="batch size must be at least 1, not 0"):
        predict_logits(model, faces, batch_size=0)


def test_evaluate_weights_on_a_run_folder(run_copy: Path, small_root: Path, small_data: FerData) -> None:
    for figure in ("curves.png", "confusion_matrix_test.png"):
        (run_copy / figure).unlink()
    before = sorted(p.name for p in run_copy.iterdir())
    report = evaluate_weights(str(run_copy), str(small_root), split="test", views=1)
    assert {"accuracy", "loss", "per_class", "confusion_matrix", "num_images", "macro_f1"} <= report.to_dict().keys()
    assert report.weights == str(run_copy / "best.safetensors")
    assert report.arch == "refcnn" and report.split == "test" and report.views == 1
    assert report.num_images == 42
    assert 0.0 <= report.accuracy <= 1.0
    assert report.accuracy * 42 == pytest.approx(round(report.accuracy * 42))
    assert list(report.per_class) == list(EMOTIONS)
    assert [report.per_class[c]["support"] for c in EMOTIONS] == [6] * 7
    assert np.trace(report.confusion_matrix) == round(report.accuracy * 42)
    # The same numbers as training's one look at the test split, and as scoring the weights by hand.
    trained = json.loads((run_copy / "test_metrics.json").read_text())
    assert report.accuracy == trained["accuracy"]
    assert report.loss == pytest.approx(trained["loss"], abs=1e-6)
    model, _ = load_model(run_copy / "best.safetensors")
    by_hand = compute_metrics(predict_logits(model, small_data["test"].images), small_data["test"].labels)
    assert report.confusion_matrix == by_hand.confusion_matrix
    # Figures only where asked: none without a folder, not even beside the run's metrics.csv.
    assert report.figures == [] and report.to_dict()["figures"] == []
    assert sorted(p.name for p in run_copy.iterdir()) == before
    asked = evaluate_weights(str(run_copy), str(small_root), split="test", views=1, figures_dir=str(run_copy))
    assert sorted(asked.figures) == sorted([str(run_copy / "confusion_matrix_test.png"),
                                            str(run_copy / "reliability_test.png"), str(run_copy / "curves.png")])
    for figure in asked.figures:
        assert Path(figure).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    json.dumps(asked.to_dict(), allow_nan=False)


def test_the_report_as_json_keeps_its_keys_in_order(run_copy: Path, small_root: Path) -> None:
    """`ferkit evaluate --json` (and the docs/results files made with it): the same keys, in the same order, as
    before the report became a dataclass; the optional parts (corruptions, FER+) only where computed."""
    report = evaluate_weights(str(run_copy), str(small_root), split="val").to_dict()
    assert list(report) == [
        "accuracy", "balanced_accuracy", "loss", "ece", "num_images", "macro_f1", "per_class", "confusion_matrix",
        "ece_at_temperature_1", "priors", "default_prior", "weights", "arch", "data_labels", "classes", "split",
        "views", "prior", "temperature", "calibration_map", "figures"]
    assert list(report["priors"]["train"]) == ["accuracy", "balanced_accuracy", "macro_f1", "loss", "ece",
                                               "ece_uniform_mix"]


def test_evaluate_weights_on_val_into_another_folder(run_copy: Path, small_root: Path, tmp_path: Path) -> None:
    report = evaluate_weights(str(run_copy / "last.safetensors"), str(small_root), split="val",
                              figures_dir=str(tmp_path / "figures"))
    assert report.split == "val" and report.num_images == 42
    history = [line.split(",") for line in (run_copy / "metrics.csv").read_text().splitlines()]
    val_acc = float(history[-1][history[0].index("val_acc")])
    assert report.accuracy == pytest.approx(val_acc, abs=1e-9)  # last.safetensors = the last epoch
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["confusion_matrix_val.png", "curves.png",
                                                                          "reliability_val.png"]


# The PrivateTest accuracy each shipped model must keep, with its own views and calibration: the reference's
# 63.33% for `ferkit-refcnn`; for the ten-view `ferkit-resnet`, the 71.80% (2,577 of 3,589) it scored when it
# shipped, less two images for bf16 rounding on another CPU (and still above the 71% it must reach); for the
# one-view `ferkit-resnet-robust`, its 69.66% (2,500 of 3,589, before and after its calibration map) less two
# images; for the one-view default `ferkit-resnet-robust-v2`, its 69.57% (2,497 of 3,589, with its calibration map
# and confidence step, which change no label under this prior) less two images.
SHIPPED_MODEL_FLOOR = {"ferkit-refcnn": 0.6333, "ferkit-resnet": 0.7175, "ferkit-resnet-robust": 0.6960,
                       "ferkit-resnet-robust-v2": 0.6951}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED_MODEL_FLOOR))
def test_shipped_models_keep_their_test_accuracy(name: str, full_data: Path, tmp_path: Path) -> None:
    report = evaluate_weights(name, str(full_data), split="test", figures_dir=str(tmp_path), device="cpu")
    assert report.num_images == 3589
    assert report.accuracy >= SHIPPED_MODEL_FLOOR[name], f"{name}: {report.accuracy:.4f}"


# ---------------------------------------------------------------------------------------------
# Calibration and balanced accuracy


def test_balanced_accuracy_and_ece_by_hand() -> None:
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 2, (500, 7))).float()
    targets = rng.integers(0, 7, 500)
    report = compute_metrics(logits, targets)
    predictions = logits.argmax(1).numpy()
    recalls = [(predictions[targets == k] == k).mean() for k in range(7)]
    assert report.balanced_accuracy == pytest.approx(np.mean(recalls))
    probabilities = torch.softmax(logits, 1).numpy()
    confidence, correct = probabilities.max(1), predictions == targets
    bins = np.minimum((confidence * 15).astype(int), 14)  # 15 equal-width bins of the top confidence
    ece = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert report.ece == pytest.approx(ece, abs=1e-5)


def _nll(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(labels)))


def test_the_fitted_temperature_lowers_validation_nll(small_data: FerData) -> None:
    model, _ = load_model("ferkit-refcnn")
    val = small_data["val"]
    logits = predict_logits(model, val.images)
    for scale in (0.3, 1.0, 4.0):  # under-, as trained and over-confident versions of the same model
        temperature = fit_temperature(logits * scale, val.labels)
        after = _nll(logits * scale / temperature, val.labels)
        assert after < _nll(logits * scale, val.labels) - 1e-3 or scale == 1.0
        for nearby in (0.9, 1.1):  # a minimum: nudging the temperature either way does not help
            assert _nll(logits * scale / (temperature * nearby), val.labels) >= after
    assert fit_temperature(logits * 4.0, val.labels) == pytest.approx(4.0 * fit_temperature(logits, val.labels),
                                                                      rel=1e-3)


def test_calibrate_stores_a_temperature_that_evaluate_then_uses(run_copy: Path, small_root: Path,
                                                               small_data: FerData, tmp_path: Path) -> None:
    before = evaluate_weights(str(run_copy), str(small_root), figures_dir=str(tmp_path))
    result = calibrate_weights(str(run_copy), str(small_root), output=str(tmp_path / "calibrated.safetensors"),
                               calibration_map="temperature", confidence_step="off")
    assert result["split"] == "val" and result["val_nll_after"] <= result["val_nll_before"]
    meta = read_meta(tmp_path / "calibrated.safetensors")
    assert meta.preprocessing.temperature == result["temperature"] != 1.0
    assert meta.preprocessing.calibration_matrix is None and result["cross_validation"] is None
    after = evaluate_weights(str(tmp_path / "calibrated.safetensors"), str(small_root), figures_dir=str(tmp_path))
    assert after.accuracy == before.accuracy  # a temperature never changes a label
    assert after.confusion_matrix == before.confusion_matrix
    assert after.temperature == result["temperature"] and after.ece_at_temperature_1 == before.ece
    assert str(tmp_path / "reliability_test.png") in after.figures


def test_the_uniform_prior_is_logit_adjustment(tiny_run: Path, small_root: Path, small_data: FerData,
                                               tmp_path: Path) -> None:
    model, meta = load_model(tiny_run / "best.safetensors")
    prior = np.array(meta.preprocessing.class_prior)
    assert prior == pytest.approx(np.bincount(small_data["train"].labels, minlength=7) / len(small_data["train"]),
                                  abs=0.03)  # the run's 256 of the 280 training faces
    uniform = evaluate_weights(str(tiny_run), str(small_root), figures_dir=str(tmp_path), prior="uniform")
    logits = predict_logits(model, small_data["test"].images).numpy() - np.log(prior)
    by_hand = compute_metrics(torch.from_numpy(logits).float(), small_data["test"].labels)
    assert uniform.prior == "uniform" and uniform.confusion_matrix == by_hand.confusion_matrix
    assert uniform.balanced_accuracy == pytest.approx(by_hand.balanced_accuracy)


@pytest.mark.parametrize("family", ["vector", "matrix"])
def test_calibrate_stores_a_map_that_lowers_validation_nll_and_keeps_shapes_and_classes(
        family: str, run_copy: Path, small_root: Path, small_data: FerData, tmp_path: Path) -> None:
    out = tmp_path / "mapped.safetensors"
    temperature_only = calibrate_weights(str(run_copy), str(small_root), output=str(tmp_path / "t.safetensors"),
                                         calibration_map="temperature", confidence_step="off")
    result = calibrate_weights(str(run_copy), str(small_root), output=str(out), calibration_map=family,
                               strength=1e-3, confidence_step="off")
    assert result["map"] == family and result["val_nll_after"] < temperature_only["val_nll_after"]
    model, meta = load_model(out)
    source, source_meta = load_model(run_copy / "best.safetensors")
    assert meta.classes == source_meta.classes == list(EMOTIONS)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in source.state_dict().items()}
    matrix = np.array(meta.preprocessing.calibration_matrix)
    assert matrix.shape == (7, 7) and len(meta.preprocessing.calibration_bias or ()) == 7
    if family == "vector":
        assert np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0
    # evaluate applies it: (z / T) W^T + b, written out.
    z = predict_logits(model, small_data["test"].images).numpy() / meta.preprocessing.temperature
    by_hand = compute_metrics(torch.from_numpy(z @ matrix.T + np.array(meta.preprocessing.calibration_bias)).float(),
                              small_data["test"].labels)
    report = evaluate_weights(str(out), str(small_root), figures_dir=str(tmp_path))
    assert report.calibration_map and report.confusion_matrix == by_hand.confusion_matrix
    assert report.ece == pytest.approx(by_hand.ece, abs=1e-6)


def test_calibrate_stores_a_confidence_step_that_evaluate_applies_after_the_map(
        run_copy: Path, small_root: Path, small_data: FerData, tmp_path: Path) -> None:
    out = tmp_path / "stepped.safetensors"
    result = calibrate_weights(str(run_copy), str(small_root), output=str(out), calibration_map="vector",
                               strength=1e-2, confidence_step="on")
    assert result["confidence_step"] and result["cross_validation"] is None
    model, meta = load_model(out)
    pre = meta.preprocessing
    assert pre.confidence_knots == tuple(result["confidence_knots"]) and pre.confidence_knots[0] == 0
    assert pre.calibration_matrix is not None
    by_hand = calibrated_by_hand(predict_logits(model, small_data["test"].images).numpy(), meta)
    report = evaluate_weights(str(out), str(small_root), figures_dir=str(tmp_path))
    expected = compute_metrics(torch.from_numpy(by_hand).float(), small_data["test"].labels)
    assert report.calibration_map and report.confusion_matrix == expected.confusion_matrix
    assert report.ece == pytest.approx(expected.ece, abs=1e-6)
    # The step never changes a label: the map alone gives the same confusion matrix.
    mapped = dataclasses.replace(meta, preprocessing=dataclasses.replace(pre, confidence_knots=None,
                                                                         confidence_values=None))
    alone = compute_metrics(torch.from_numpy(calibrated_by_hand(predict_logits(
        model, small_data["test"].images).numpy(), mapped)).float(), small_data["test"].labels)
    assert alone.confusion_matrix == report.confusion_matrix
    auto = calibrate_weights(str(run_copy), str(small_root), output=str(tmp_path / "auto.safetensors"),
                             calibration_map="vector", strength=1e-2)
    assert {row["confidence_step"] for row in auto["cross_validation"]} == {False, True}
    assert auto["confidence_step"] == auto["cross_validation"][0]["confidence_step"]


@pytest.mark.slow
def test_the_shipped_default_map_lowers_publictest_nll_and_keeps_the_class_order(full_data: Path) -> None:
    from ferkit.data import load_fer2013
    from ferkit.inference import adjusted_logits
    from ferkit.weights import default_model

    model, meta = load_model(default_model())
    pre = meta.preprocessing
    assert pre.calibration_matrix is not None and meta.classes == list(EMOTIONS)
    val = load_fer2013(str(full_data))["val"]
    raw = predict_logits(model, val.images).numpy()
    temperature_only = dataclasses.replace(pre.without_calibration(), temperature=pre.temperature)
    calibrated = adjusted_logits(raw, pre)
    assert calibrated.shape == raw.shape == (3589, 7)
    assert _nll(torch.from_numpy(calibrated), val.labels) < _nll(torch.from_numpy(adjusted_logits(
        raw, temperature_only)), val.labels) < _nll(torch.from_numpy(raw), val.labels)
    # Near the identity: each class's calibrated logit is driven most by its own raw logit.
    matrix = np.array(pre.calibration_matrix)
    assert (matrix.argmax(1) == np.arange(7)).all()


def test_calibration_error_is_torchmetrics_unweighted_and_reweights_to_a_uniform_mix() -> None:
    from ferkit.calibration import calibration_error, uniform_mix_weights

    rng = np.random.default_rng(3)
    counts = np.array([60, 20, 30, 12, 15, 10, 20])
    targets = np.repeat(np.arange(7), counts)
    logits = torch.from_numpy(rng.normal(0, 2, (len(targets), 7)) + 2 * np.eye(7)[targets]).float()
    probabilities = torch.softmax(logits, 1).numpy()
    assert calibration_error(probabilities, targets) == pytest.approx(
        compute_metrics(logits, targets).ece, abs=1e-6)
    weights = uniform_mix_weights(targets, 7)
    assert weights[targets == 0].sum() == pytest.approx(1.0) and weights.sum() == pytest.approx(7.0)
    # Weighting each face by 1 / its class count is the plain ECE of the split with each class repeated up to
    # 60 faces (every face of a class of c faces taken 60 / c times).
    repeated = np.repeat(np.arange(len(targets)), (60 // counts)[targets])
    assert calibration_error(probabilities, targets, weights) == pytest.approx(
        calibration_error(probabilities[repeated], targets[repeated]), abs=1e-12)
    assert calibration_error(probabilities, targets, weights) != pytest.approx(calibration_error(probabilities,
                                                                                                 targets))


def test_on_ferplus_data_the_model_runs_once_over_all_faces(small_data: FerData,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """FER+'s majority protocol scores the faces of a split that have a majority, the votes score them all: one
    pass over all the faces gives both."""
    import ferkit.inference as inference
    from ferkit.data import Split
    from ferkit.evaluate import split_logits
    from ferkit.ferplus import with_label_scheme

    rng = np.random.default_rng(0)

    def votes(n: int) -> np.ndarray:
        counts = np.zeros((n, 10), np.int64)
        counts[np.arange(n), rng.integers(0, 8, n)] += 6  # a majority of 6 of 8 to 10 votes...
        counts[np.arange(n), rng.integers(0, 8, n)] += rng.integers(2, 5, n)
        counts[::3, :2] = 5  # ...except every third face: a tie of 5 and 5, which the majority drops
        counts[::3, 2:] = 0
        return counts

    splits = {name: Split(part.images, part.labels, part.names, votes=votes(len(part)))
              for name, part in small_data.splits.items()}
    data = with_label_scheme(dataclasses.replace(small_data, splits=splits), "ferplus-distribution")
    assert data.all_faces is not None
    real = inference.predict_logits
    calls: list[int] = []

    def counted(model: torch.nn.Module, images: np.ndarray, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(len(images))
        return real(model, images, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inference, "predict_logits", counted)
    torch.manual_seed(0)
    model = create_model("refcnn", 8).eval()
    cpu = torch.device("cpu")
    scored, every = split_logits(model, data, "test", cpu, 16, inference.DEFAULT_PREPROCESSING)
    assert calls == [len(data.all_faces["test"])] == [len(small_data["test"])]
    assert every is not None and 0 < len(scored) == len(data["test"]) < len(every)
    np.testing.assert_allclose(scored, real(model, data["test"].images).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(every, real(model, small_data["test"].images).numpy(), rtol=0, atol=1e-5)
    # The training split under the distribution scheme keeps other faces than the majority: scored on its own.
    calls.clear()
    train, _ = split_logits(model, data, "train", cpu, 16, inference.DEFAULT_PREPROCESSING)
    assert calls == [len(small_data["train"]), len(data["train"])]
    np.testing.assert_allclose(train, real(model, data["train"].images).numpy(), rtol=0, atol=1e-5)
