"""Export to ONNX and TorchScript: outputs equal PyTorch's within 1e-4 on real faces; the ONNX path runs no torch."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from by_hand import calibrated_by_hand
from fer_photos import fer_faces, read_gray
from ferkit import cli
from ferkit.export import (
    PARITY_TOLERANCE,
    check_parity,
    export_model,
    exported_logits,
    format_for,
    read_export_info,
)
from ferkit.inference import predict_logits
from ferkit.labels import EMOTIONS
from ferkit.predict import EmotionRecognizer
from ferkit.weights import (
    WeightsError,
    WeightsMeta,
    default_model,
    load_model,
    read_meta,
    save_weights,
    shipped_models,
    shipped_onnx_twin,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def faces(data_root: Path) -> np.ndarray:
    """280 real PrivateTest faces, 40 of every class."""
    return np.stack([read_gray(p) for cls in EMOTIONS for p in fer_faces(data_root, cls)[:40]])


@pytest.fixture(scope="module")
def onnx_file(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(weights, tmp_path_factory.mktemp("onnx") / "model.onnx")


def exported_meta(meta: WeightsMeta, views: int | None = None) -> WeightsMeta:
    """What an export's metadata says: the calibration is in the graph, so none is left to apply."""
    return dataclasses.replace(meta, preprocessing=meta.preprocessing.with_views(views).without_calibration())


def test_onnx_matches_pytorch_on_real_faces(onnx_file: Path, weights: Path, faces: np.ndarray) -> None:
    model, meta = load_model(weights)
    reference = calibrated_by_hand(predict_logits(model, faces, preprocessing=meta.preprocessing).numpy(), meta)
    exported = exported_logits(onnx_file, faces)
    assert exported.shape == (len(faces), len(EMOTIONS))
    assert np.abs(exported - reference).max() <= PARITY_TOLERANCE
    assert check_parity(weights, onnx_file, faces) <= PARITY_TOLERANCE
    for size in (1, 7):  # the batch dimension is free
        assert np.abs(exported_logits(onnx_file, faces[:size]) - reference[:size]).max() <= PARITY_TOLERANCE


def test_onnx_holds_a_confidence_step_from_the_weights(weights: Path, faces: np.ndarray, tmp_path: Path) -> None:
    model, meta = load_model(weights)
    pre = dataclasses.replace(meta.preprocessing, confidence_knots=(0.0, 0.3, 0.6, 1.0),
                              confidence_values=(0.1, 0.25, 0.55, 0.85))
    stepped = dataclasses.replace(meta, preprocessing=pre)
    save_weights(tmp_path / "stepped.safetensors", model, stepped)
    onnx_file = export_model(tmp_path / "stepped.safetensors", tmp_path / "stepped.onnx")
    reference = calibrated_by_hand(predict_logits(model, faces, preprocessing=pre).numpy(), stepped)
    exported = exported_logits(onnx_file, faces)
    assert np.abs(exported - reference).max() <= PARITY_TOLERANCE
    assert (exported.argmax(1) == reference.argmax(1)).all()
    assert read_export_info(onnx_file)[0].preprocessing.confidence_knots is None  # in the graph, not applied twice


def test_onnx_carries_the_weights_metadata(onnx_file: Path, weights: Path) -> None:
    meta, info = read_export_info(onnx_file)
    assert meta == exported_meta(read_meta(weights))
    assert info["format"] == "onnx" and info["views"] == meta.views and info["opset"] >= 17 and info["calibrated"]


def test_onnx_runs_on_onnxruntime_and_numpy_alone(onnx_file: Path, weights: Path, faces: np.ndarray) -> None:
    """What docs/cli.md shows: uint8 crops in, calibrated logits out; normalisation, views, calibration and the
    uniform prior (the log class prior subtracted) are in the graph."""

    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == [("input", "tensor(uint8)", [1, 48, 48])]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["ferkit"])
    assert meta["preprocessing"]["temperature"] == 1.0 and meta["preprocessing"]["calibration_matrix"] is None
    assert json.loads(session.get_modelmeta().custom_metadata_map["ferkit_export"])["prior"] == "uniform"
    for prior in ("train", "uniform"):
        logits = session.run(None, {"input": faces[:, None]})[0]  # under the uniform prior, predict's default
        if prior == "train":
            logits = logits + np.log(meta["preprocessing"]["class_prior"])
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        recognizer = EmotionRecognizer(weights, device="cpu", detect=False, prior=prior)
        expected = [r[0] for r in recognizer.predict_batch(list(faces))]
        assert [meta["classes"][k] for k in probabilities.argmax(1)] == [r.label for r in expected]
        np.testing.assert_allclose(probabilities, [list(r.probabilities.values()) for r in expected], atol=1e-5)


def test_the_exported_default_gives_predicts_labels_on_1000_privatetest_crops(
    onnx_file: Path, weights: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ferkit export`'s default prior is `ferkit predict`'s: the graph's argmax, with onnxruntime and numpy alone,
    is the label `ferkit predict --no-detect` prints, on 1,000 PrivateTest crops (every class)."""
    import onnxruntime as ort

    files = sorted((data_root / "test").glob("*/PrivateTest_*.jpg"))
    files = files[:: len(files) // 1000][:1000]
    crops = np.stack([read_gray(p) for p in files])
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["ferkit"])["classes"]
    exported = [classes[k] for k in session.run(None, {"input": crops[:, None]})[0].argmax(1)]
    assert cli.main(["predict", "--no-detect", "--no-progress", "--json", "--weights", str(weights),
                     *map(str, files)]) == 0
    predicted = [record["faces"][0]["label"] for record in json.loads(capsys.readouterr().out)]
    assert len(set(exported)) == len(EMOTIONS)
    assert exported == predicted


def test_an_export_under_the_training_prior(weights: Path, faces: np.ndarray, tmp_path: Path) -> None:
    out = export_model(weights, tmp_path / "train.onnx", prior="train")
    assert read_export_info(out)[1]["prior"] == "train"
    model, meta = load_model(weights)
    reference = calibrated_by_hand(predict_logits(model, faces, preprocessing=meta.preprocessing).numpy(), meta)
    assert np.abs(exported_logits(out, faces, graph=True) - reference).max() <= PARITY_TOLERANCE
    assert check_parity(weights, out, faces) <= PARITY_TOLERANCE


def test_recognizer_on_onnx_runs_no_torch_code(
    onnx_file: Path, weights: Path, faces: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    astronaut = skimage_data.astronaut()
    torch_results = EmotionRecognizer(weights, device="cpu").predict(astronaut)
    torch_crops = EmotionRecognizer(weights, device="cpu", detect=False).predict_batch(list(faces[:64]))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch code ran on the ONNX path")

    monkeypatch.setattr(torch.nn.Module, "__call__", forbidden)
    monkeypatch.setattr("ferkit.inference.predict_logits", forbidden)
    monkeypatch.setattr("ferkit.inference.preprocess", forbidden)
    monkeypatch.setattr(torch, "from_numpy", forbidden)
    recognizer = EmotionRecognizer(onnx_file, device="cpu")
    assert recognizer.backend.name == "onnxruntime"
    onnx_results = recognizer.predict(astronaut)
    assert [(r.box, r.label) for r in onnx_results] == [(r.box, r.label) for r in torch_results]
    onnx_crops = EmotionRecognizer(onnx_file, device="cpu", detect=False).predict_batch(list(faces[:64]))
    for a, b in zip(onnx_crops, torch_crops, strict=True):
        np.testing.assert_allclose(list(a[0].probabilities.values()), list(b[0].probabilities.values()), atol=1e-5)


@pytest.mark.slow
def test_torchscript_matches_pytorch_with_two_views(weights: Path, faces: np.ndarray, tmp_path: Path) -> None:
    out = export_model(weights, tmp_path / "model.pt", "torchscript", views=2)
    model, weights_meta = load_model(weights)
    reference = calibrated_by_hand(predict_logits(model, faces, views=2).numpy(), weights_meta)
    assert np.abs(exported_logits(out, faces) - reference).max() <= PARITY_TOLERANCE
    meta, info = read_export_info(out)
    assert meta == exported_meta(weights_meta, views=2)
    assert info == {**info, "format": "torchscript", "views": 2}


@pytest.mark.slow
def test_cli_export_onnx_with_views_checks_parity(weights: Path, faces: np.ndarray, tiny_root: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "flip.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["export", "--weights", str(weights), "--format", "onnx", "--output", str(out),
                           "--views", "2", "--data", str(tiny_root), "--check-images", "14"])
    assert status == 0
    lines = stdout.getvalue().splitlines()
    assert lines[0].startswith(f"wrote {out} (onnx, opset") and "2 views" in lines[0]
    assert lines[1].startswith("parity with PyTorch on 14 test images") and lines[1].endswith(": ok")
    model, meta = load_model(weights)
    reference = calibrated_by_hand(predict_logits(model, faces, views=2).numpy(), meta)
    assert np.abs(exported_logits(out, faces) - reference).max() <= PARITY_TOLERANCE


def test_export_usage_errors(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--weights", str(weights), "--output", str(tmp_path / "model.bin")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert cli.main(["export", "--weights", str(weights)]) == 2
    assert "needs --output FILE" in capsys.readouterr().err
    assert cli.main(["export", "--weights", str(tmp_path / "none.safetensors"), "--output",
                     str(tmp_path / "m.onnx")]) == 2
    assert "no such weights file" in capsys.readouterr().err
    assert format_for("m.ONNX") == "onnx" and format_for("m.pt") == "torchscript"
    assert not (tmp_path / "m.onnx").exists()


def test_broken_onnx_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="not an ONNX model"):
        EmotionRecognizer(tmp_path / "junk.onnx")
    with pytest.raises(WeightsError, match="no such ONNX file"):
        EmotionRecognizer(tmp_path / "missing.onnx")


def test_onnx_without_ferkit_metadata_is_refused(onnx_file: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(WeightsError, match="no ferkit metadata"):
        EmotionRecognizer(tmp_path / "bare.onnx")


def test_the_default_models_onnx_twin_gives_its_probabilities(faces: np.ndarray) -> None:
    # The default model also ships exported (`shipped_onnx_twin`), and the CPU default path runs it on
    # onnxruntime: a face's forward pass takes well under half of PyTorch's time for one face. It must be the
    # same model, calibration map included, under either prior.
    name = default_model()
    twin = shipped_onnx_twin(name)
    assert twin is not None and twin.suffix == ".onnx"
    _, export_info = read_export_info(twin)
    assert export_info["source"] == f"{name}.safetensors" and export_info["calibrated"] is True
    default = EmotionRecognizer(detect=False, device="cpu")
    assert default.backend.name == "onnxruntime" and Path(default.backend.path) == twin
    on_torch = EmotionRecognizer(weights=shipped_models()[name], detect=False, device="cpu")
    assert on_torch.backend.name == "torch"
    assert default.backend.meta.classes == on_torch.backend.meta.classes
    assert default.backend.meta.preprocessing.class_prior == on_torch.backend.meta.preprocessing.class_prior
    for prior in ("uniform", "train"):
        ours, theirs = ([[face.probabilities[c] for c in EMOTIONS]
                         for (face,) in r.predict_batch(list(faces), prior=prior)] for r in (default, on_torch))
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-4)
    assert EmotionRecognizer(weights=name, detect=False, device="cpu").backend.name == "onnxruntime"
