"""The Python API: EmotionRecognizer on every input type, on real photos and crops, and its refusals."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ferkit
import ferkit.images
from by_hand import calibrated_by_hand, confidence_step_by_hand
from fer_photos import ASTRONAUT_FACE, background, fer_faces, iou, photo, read_gray
from ferkit.faces import find_faces
from ferkit.inference import predict_logits
from ferkit.labels import EMOTIONS
from ferkit.models import create_model
from ferkit.predict import EmotionRecognizer, FaceResult
from ferkit.weights import METADATA_KEY, WeightsError, WeightsMeta, load_model, read_meta, resolve_weights, save_weights

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def crops_reader(weights: Path) -> EmotionRecognizer:
    return EmotionRecognizer(weights, device="cpu", detect=False, prior="train")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


def _same(a: list[FaceResult], b: list[FaceResult], atol: float = 0.0) -> None:
    assert [(r.box, r.label, r.score) for r in a] == [(r.box, r.label, r.score) for r in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(list(x.probabilities.values()), list(y.probabilities.values()), atol=atol, rtol=0)


def test_the_astronaut(recognizer: EmotionRecognizer, astronaut: np.ndarray) -> None:
    (face,) = recognizer.predict(astronaut)
    # ASTRONAUT_FACE is Haar's box; the default YuNet's crop square is larger (its boxes are taller), so the
    # PASCAL criterion, IoU >= 0.5, and the same centre within a few pixels.
    assert iou(face.box, ASTRONAUT_FACE) >= 0.5
    assert abs(face.box[0] + face.box[2] / 2 - 224.5) <= 8 and abs(face.box[1] + face.box[3] / 2 - 113.5) <= 12
    assert list(face.probabilities) == list(EMOTIONS)
    assert abs(sum(face.probabilities.values()) - 1) < 1e-6
    assert face.label == max(face.probabilities, key=face.probabilities.__getitem__)
    assert face.score is not None and face.score > 0
    record = face.to_dict(6)
    assert record["box"] == list(face.box) and record["label"] == face.label
    json.dumps(record)


def test_every_input_type_gives_the_same_result(recognizer: EmotionRecognizer, astronaut: np.ndarray,
                                                tmp_path: Path) -> None:
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    expected = recognizer.predict(astronaut)
    assert len(expected) == 1
    for image in (str(tmp_path / "astronaut.png"), tmp_path / "astronaut.png", Image.open(tmp_path / "astronaut.png"),
                  Image.fromarray(astronaut).convert("RGBA")):
        _same(recognizer.predict(image), expected)
    bgr = np.ascontiguousarray(astronaut[..., ::-1])
    _same(recognizer.predict(bgr, color_order="bgr"), expected)
    # A gray array and a PIL "L" image are read as the same gray face.
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    gray_result = recognizer.predict(gray)
    _same(recognizer.predict(Image.fromarray(gray)), gray_result)
    assert len(gray_result) == 1 and iou(gray_result[0].box, expected[0].box) > 0.8


def test_predict_batch_equals_predict(recognizer: EmotionRecognizer, astronaut: np.ndarray, data_root: Path) -> None:
    faces = [read_gray(p) for p in fer_faces(data_root, "happy")[:4]]
    images = [astronaut, photo(faces[:2], [(40, 60, 150, 150), (360, 150, 180, 180)]), background(seed=2),
              photo(faces[2:], [(60, 80, 170, 170), (380, 120, 160, 160)], seed=3)]
    batch = recognizer.predict_batch(images)
    assert len(batch) == 4 and batch[2] == []
    for image, results in zip(images, batch, strict=True):
        _same(results, recognizer.predict(image), atol=1e-6)


def test_predict_batch_one_bad_file_among_good_ones(recognizer: EmotionRecognizer, data_root: Path, tmp_path: Path
                                                   ) -> None:
    """The default records a bad file's error and returns the good files' faces; errors="raise" raises."""
    faces = [read_gray(p) for p in fer_faces(data_root, "happy")[:3]]
    good = [tmp_path / "two.jpg", tmp_path / "one.png"]
    Image.fromarray(photo(faces[:2], [(40, 60, 150, 150), (360, 150, 180, 180)])).save(good[0], quality=95)
    Image.fromarray(photo(faces[2:], [(220, 110, 170, 170)], seed=2)).save(good[1])
    bad = tmp_path / "notes.jpg"
    bad.write_text("a text file named .jpg\n")
    missing = tmp_path / "gone.jpg"
    batch = recognizer.predict_batch([good[0], bad, good[1], missing])
    assert [len(faces) for faces in batch] == [2, 0, 1, 0]
    assert batch[0].error is None and batch[2].error is None
    assert batch[1].error is not None and str(bad) in batch[1].error and "not an image" in batch[1].error
    assert batch[3].error is not None and str(missing) in batch[3].error
    for path, results in zip(good, (batch[0], batch[2]), strict=True):
        _same(results, recognizer.predict(path), atol=1e-6)
    frame = batch[1].to_pandas()
    assert len(frame) == 1 and "not an image" in frame["error"].iloc[0]
    with pytest.raises(ferkit.images.ImageError, match="not an image"):
        recognizer.predict_batch([good[0], bad], errors="raise")
    with pytest.raises(ValueError, match="choose 'record' or 'raise'"):
        recognizer.predict_batch([good[0]], errors="skip")


def test_no_face_is_an_empty_result_not_an_error(recognizer: EmotionRecognizer) -> None:
    assert recognizer.predict(background(seed=4)) == []
    assert recognizer.predict_batch([]) == []


def test_crops_predict_what_evaluate_scores(crops_reader: EmotionRecognizer, weights: Path, data_root: Path) -> None:
    files = [p for cls in EMOTIONS for p in fer_faces(data_root, cls)[:12]]
    crops = np.stack([read_gray(p) for p in files])
    model, meta = load_model(weights)
    logits = predict_logits(model, crops, preprocessing=meta.preprocessing)
    results = crops_reader.predict_batch(files)
    # Labels and probabilities through the weights' calibration (temperature and map), as evaluate reports them.
    calibrated = torch.from_numpy(calibrated_by_hand(logits.numpy(), meta))
    assert [r[0].label for r in results] == [meta.classes[int(k)] for k in calibrated.argmax(1)]
    probabilities = torch.softmax(calibrated, 1).numpy()
    np.testing.assert_allclose([list(r[0].probabilities.values()) for r in results], probabilities, atol=1e-6)
    assert all(r[0].box == (0, 0, 48, 48) and r[0].score is None for r in results)


def test_labels_of_pasted_faces_match_the_model_on_their_crops(
    recognizer: EmotionRecognizer, weights: Path, data_root: Path
) -> None:
    crops_reader = EmotionRecognizer(weights, device="cpu", detect=False, prior=recognizer.prior)
    files = fer_faces(data_root, "happy")[:16]
    originals = crops_reader.predict_batch(files)
    checked, agree = 0, 0
    for i in range(0, 16, 2):
        faces = [read_gray(p) for p in files[i : i + 2]]
        boxes = [(40 + 3 * i, 60, 150, 150), (360, 150 + 3 * i, 180, 180)]
        image = photo(faces, boxes, seed=i)
        results = recognizer.predict(image)
        # Exactly the model on the detector's crop: the API adds nothing between crop and model.
        detected = find_faces(image, recognizer.detector)  # type: ignore[arg-type]
        assert [r.label for r in results] == [crops_reader.predict(f.crop)[0].label for f in detected]
        for j, box in enumerate(boxes):
            matches = [r for r in results if iou(r.box, box) >= 0.5]
            direct = originals[i + j][0]
            if matches and direct.probabilities[direct.label] >= 0.7:
                checked += 1
                agree += matches[0].label == direct.label
    # Against the original 48x48 crop the pasted face went through upscaling, JPEG-free pasting
    # and re-cropping, so only confident faces are compared, and most (not all) must agree.
    assert checked >= 4
    assert agree >= 0.8 * checked, f"{agree} of {checked} confident faces agree"


def test_default_recognizer_loads_the_shipped_model() -> None:
    try:
        expected = resolve_weights(None)
    except WeightsError:
        pytest.skip("no shipped default model in this checkout")
    recognizer = EmotionRecognizer(device="cpu")
    # On the CPU the default runs its shipped ONNX twin (tests/test_export.py holds it to the weights).
    assert Path(recognizer.backend.path) == expected.with_suffix(".onnx") and recognizer.backend.name == "onnxruntime"
    assert EmotionRecognizer(weights=expected, device="cpu").backend.name == "torch"
    assert "EmotionRecognizer(" in repr(recognizer)


def test_logits_checks_its_input(recognizer: EmotionRecognizer) -> None:
    assert recognizer.logits(np.zeros((0, 48, 48), np.uint8)).shape == (0, len(EMOTIONS))
    with pytest.raises(ValueError, match="uint8 crops"):
        recognizer.logits(np.zeros((2, 48, 48), np.float32))


def test_import_ferkit_is_light_and_exports_the_api() -> None:
    code = "import sys, ferkit; print(sorted(m for m in ('torch', 'cv2', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert ferkit.EmotionRecognizer is EmotionRecognizer
    assert ferkit.FaceResult is FaceResult
    with pytest.raises(AttributeError):
        _ = ferkit.NoSuchThing  # type: ignore[attr-defined]


def _weights_with(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "odd.safetensors"
    meta = {**json.loads(WeightsMeta(arch="refcnn").to_json()), **fields}
    save_file(dict(create_model("refcnn").state_dict()), str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="input size 64: ferkit crops faces to 48x48"):
        EmotionRecognizer(_weights_with(tmp_path, preprocessing={"image_size": 64}))
    with pytest.raises(WeightsError, match="std must be positive"):
        EmotionRecognizer(_weights_with(tmp_path, preprocessing={"mean": 0.0, "std": -1.0}))
    with pytest.raises(WeightsError, match="tensors do not fit"):
        EmotionRecognizer(_weights_with(tmp_path, classes=["a", "b", "c"]))
    for name in ("model.pt", "model.pth", "checkpoint.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(WeightsError, match="never loaded"):
            EmotionRecognizer(tmp_path / name)
    with pytest.raises(WeightsError, match="no such"):
        EmotionRecognizer(tmp_path / "missing.safetensors")


def test_the_uniform_prior_divides_the_training_mix_out_of_the_probabilities(weights: Path, data_root: Path) -> None:
    """Logit adjustment: p_uniform(k) is proportional to p_train(k) / prior(k), at the same temperature."""
    faces = np.stack([read_gray(p) for cls in EMOTIONS for p in fer_faces(data_root, cls)[:2]])
    trained = EmotionRecognizer(weights, device="cpu", detect=False, prior="train").predict_batch(list(faces))
    uniform = EmotionRecognizer(weights, device="cpu", detect=False, prior="uniform").predict_batch(list(faces))
    assert EmotionRecognizer(weights, device="cpu", detect=False).prior == "uniform"  # the default
    prior = np.array(read_meta(weights).preprocessing.class_prior)
    for a, b in zip(trained, uniform, strict=True):
        p_train = np.array(list(a[0].probabilities.values()))
        p_uniform = np.array(list(b[0].probabilities.values()))
        expected = p_train / prior
        np.testing.assert_allclose(p_uniform, expected / expected.sum(), rtol=1e-6, atol=1e-9)
        assert b[0].label == EMOTIONS[int(np.argmax(expected))]
    with pytest.raises(ValueError, match="prior 'flat': choose one of train, uniform"):
        EmotionRecognizer(weights, device="cpu", prior="flat")


def test_the_temperature_in_the_weights_scales_the_probabilities(tmp_path: Path, weights: Path) -> None:
    model, meta = load_model(weights)
    plain = meta.preprocessing.without_calibration()
    hot = dataclasses.replace(meta, preprocessing=dataclasses.replace(plain, temperature=2.0))
    cold = dataclasses.replace(meta, preprocessing=dataclasses.replace(plain, temperature=0.5))
    save_weights(tmp_path / "hot.safetensors", model, hot)
    save_weights(tmp_path / "cold.safetensors", model, cold)
    crop = np.random.default_rng(1).integers(0, 256, (48, 48), dtype=np.uint8)
    logits = EmotionRecognizer(weights, device="cpu", detect=False).logits(crop[None])[0].astype(np.float64)
    for path, t in ((tmp_path / "hot.safetensors", 2.0), (tmp_path / "cold.safetensors", 0.5)):
        face = EmotionRecognizer(path, device="cpu", detect=False, prior="train").predict(crop)[0]
        expected = np.exp(logits / t - (logits / t).max())
        np.testing.assert_allclose(list(face.probabilities.values()), expected / expected.sum(), rtol=1e-5)
        assert face.label == EMOTIONS[int(np.argmax(logits))]


def test_the_calibration_map_in_the_weights_is_applied_after_the_temperature(tmp_path: Path, weights: Path) -> None:
    model, meta = load_model(weights)
    plain = meta.preprocessing.without_calibration()
    save_weights(tmp_path / "plain.safetensors", model, dataclasses.replace(meta, preprocessing=plain))
    k = len(meta.classes)
    matrix = np.eye(k) * np.linspace(0.5, 1.5, k) + 0.05 * np.tri(k, k, -1)
    bias = np.linspace(-1.0, 1.0, k)
    mapped = dataclasses.replace(plain, temperature=2.0, calibration_matrix=tuple(map(tuple, matrix.tolist())),
                                 calibration_bias=tuple(bias.tolist()))
    save_weights(tmp_path / "mapped.safetensors", model, dataclasses.replace(meta, preprocessing=mapped))
    crops = np.random.default_rng(2).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    raw = EmotionRecognizer(tmp_path / "plain.safetensors", device="cpu", detect=False).logits(crops).astype(np.float64)
    for prior in ("train", "uniform"):
        results = EmotionRecognizer(tmp_path / "mapped.safetensors", device="cpu", detect=False,
                                    prior=prior).predict_batch(list(crops))
        z = (raw / 2.0) @ matrix.T + bias - (np.log(np.array(meta.preprocessing.class_prior)) if prior == "uniform"
                                             else 0.0)
        expected = np.exp(z - z.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        np.testing.assert_allclose([list(r[0].probabilities.values()) for r in results], expected, rtol=1e-5)
        assert [r[0].label for r in results] == [EMOTIONS[int(i)] for i in z.argmax(1)]


def test_the_confidence_step_in_the_weights_is_applied_after_the_map_and_before_the_prior(
        tmp_path: Path, weights: Path) -> None:
    model, meta = load_model(weights)
    plain = meta.preprocessing.without_calibration()
    save_weights(tmp_path / "plain.safetensors", model, dataclasses.replace(meta, preprocessing=plain))
    k = len(meta.classes)
    bias = np.linspace(-0.5, 0.5, k)
    knots, values = np.array([0.0, 0.3, 0.6, 1.0]), np.array([0.1, 0.2, 0.5, 0.8])  # confidence pulled down
    stepped = dataclasses.replace(plain, temperature=0.5, calibration_matrix=tuple(map(tuple, np.eye(k).tolist())),
                                  calibration_bias=tuple(bias.tolist()), confidence_knots=tuple(knots.tolist()),
                                  confidence_values=tuple(values.tolist()))
    save_weights(tmp_path / "stepped.safetensors", model, dataclasses.replace(meta, preprocessing=stepped))
    crops = np.random.default_rng(4).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    raw = EmotionRecognizer(tmp_path / "plain.safetensors", device="cpu", detect=False).logits(crops).astype(np.float64)
    log_p = confidence_step_by_hand(raw / 0.5 + bias, knots, values)
    for prior in ("train", "uniform"):
        results = EmotionRecognizer(tmp_path / "stepped.safetensors", device="cpu", detect=False,
                                    prior=prior).predict_batch(list(crops))
        z = log_p - (np.log(np.array(meta.preprocessing.class_prior)) if prior == "uniform" else 0.0)
        expected = np.exp(z - z.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        np.testing.assert_allclose([list(r[0].probabilities.values()) for r in results], expected, rtol=1e-5)
        assert [r[0].label for r in results] == [EMOTIONS[int(i)] for i in z.argmax(1)]
    # Under the training prior the top class's probability is the line's value, and the label the map's.
    top = [max(r[0].probabilities.values()) for r in EmotionRecognizer(
        tmp_path / "stepped.safetensors", device="cpu", detect=False, prior="train").predict_batch(list(crops))]
    mapped = raw / 0.5 + bias
    confidence = np.exp(mapped.max(1)) / np.exp(mapped).sum(1)
    assert np.all(np.array(top) >= np.interp(confidence, knots, values) - 1e-6)
    assert (log_p.argmax(1) == mapped.argmax(1)).all()


def test_the_detector_is_yunet_unless_chosen(weights: Path, astronaut: np.ndarray) -> None:
    from ferkit.faces import LANDMARKS, HaarDetector, YuNetDetector

    default = EmotionRecognizer(weights, device="cpu")
    assert isinstance(default.detector, YuNetDetector)
    assert isinstance(EmotionRecognizer(weights, device="cpu", detector="haar").detector, HaarDetector)
    (face,) = default.predict(astronaut)
    assert iou(face.box, ASTRONAUT_FACE) >= 0.5 and face.score is not None and 0.7 <= face.score <= 1
    assert face.landmarks is not None and list(face.landmarks) == list(LANDMARKS)
    x, y, w, h = face.box
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in face.landmarks.values())
    points = face.landmarks
    # The person's right eye is on the image's left; eyes above the nose tip, the nose above the mouth.
    assert points["right_eye"][0] < points["left_eye"][0]
    assert max(points["right_eye"][1], points["left_eye"][1]) < points["nose_tip"][1]
    assert points["nose_tip"][1] < min(points["right_mouth_corner"][1], points["left_mouth_corner"][1])
    (haar_face,) = EmotionRecognizer(weights, device="cpu", detector="haar").predict(astronaut)
    assert haar_face.landmarks is None


# ---------------------------------------------------------------------------------------------
# Call-time options: prior, top_k and detector per call, nothing kept in the recognizer


def _flat(batches: list[list[FaceResult]]) -> list[FaceResult]:
    return [result for results in batches for result in results]


def test_a_calls_prior_overrides_the_recognizers_own(weights: Path, data_root: Path) -> None:
    crops = [read_gray(p) for cls in EMOTIONS for p in fer_faces(data_root, cls)[:2]]
    made = {prior: EmotionRecognizer(weights, device="cpu", detect=False, prior=prior)
            for prior in ("train", "uniform")}
    for own, other in (("train", "uniform"), ("uniform", "train")):
        recognizer = made[own]
        # Exactly what a recognizer made with that prior gives, through predict_batch, predict and classify.
        _same(_flat(recognizer.predict_batch(crops, prior=other)), _flat(made[other].predict_batch(crops)))
        _same(recognizer.predict(crops[0], prior=other), made[other].predict(crops[0]))
        faces = [recognizer.find_faces(crop)[0] for crop in crops]
        _same(recognizer.classify(faces, prior=other), made[other].classify(faces))
        # The call changed nothing: without a prior, the recognizer's own again.
        assert recognizer.prior == own
        _same(_flat(recognizer.predict_batch(crops)), _flat(made[own].predict_batch(crops)))
    trained, uniform = made["train"].predict(crops[0])[0], made["train"].predict(crops[0], prior="uniform")[0]
    assert trained.probabilities != uniform.probabilities  # the two priors differ on this face
    with pytest.raises(ValueError, match="prior 'flat': choose one of train, uniform"):
        made["train"].predict(crops[0], prior="flat")


def test_a_uniform_prior_per_call_needs_the_weights_class_prior(tmp_path: Path, weights: Path) -> None:
    model, meta = load_model(weights)
    plain = dataclasses.replace(meta, preprocessing=dataclasses.replace(meta.preprocessing, class_prior=None))
    save_weights(tmp_path / "no-prior.safetensors", model, plain)
    recognizer = EmotionRecognizer(tmp_path / "no-prior.safetensors", device="cpu", detect=False)
    assert recognizer.prior == "train"  # the default where the weights carry no class prior
    crop = np.full((48, 48), 128, np.uint8)
    with pytest.raises(WeightsError, match=r"prior 'uniform': no-prior\.safetensors carries no training class prior"):
        recognizer.predict(crop, prior="uniform")
    with pytest.raises(WeightsError, match="carries no training class prior"):
        EmotionRecognizer(tmp_path / "no-prior.safetensors", device="cpu", prior="uniform")
    assert len(recognizer.predict(crop, prior="train")) == 1


def test_top_k_keeps_the_k_most_likely_most_likely_first(crops_reader: EmotionRecognizer, data_root: Path) -> None:
    crops = [read_gray(p) for cls in EMOTIONS for p in fer_faces(data_root, cls)[:1]]
    full = _flat(crops_reader.predict_batch(crops))
    for k in (1, 3, len(EMOTIONS)):
        for everything, top in zip(full, _flat(crops_reader.predict_batch(crops, top_k=k)), strict=True):
            ranked = sorted(everything.probabilities, key=everything.probabilities.__getitem__, reverse=True)
            assert list(top.probabilities) == ranked[:k]
            assert top.probabilities == {name: everything.probabilities[name] for name in ranked[:k]}
            assert top.label == everything.label == ranked[0] and top.box == everything.box
    assert list(full[0].probabilities) == list(EMOTIONS)  # no top_k: every class, in the model's order
    for bad in (0, len(EMOTIONS) + 1, 2.0, True):
        with pytest.raises(ValueError, match="top_k"):
            crops_reader.predict(crops[0], top_k=bad)  # type: ignore[arg-type]


def test_a_calls_detector_is_used_instead_of_the_recognizers(weights: Path, astronaut: np.ndarray) -> None:
    from ferkit.faces import make_detector

    yunet = EmotionRecognizer(weights, device="cpu")
    haar = EmotionRecognizer(weights, device="cpu", detector="haar")
    own_haar = make_detector("haar")
    _same(yunet.predict(astronaut, detector=own_haar), haar.predict(astronaut))
    _same(yunet.predict_batch([astronaut], detector=own_haar)[0], haar.predict(astronaut))
    assert yunet.predict(astronaut)[0].box != haar.predict(astronaut)[0].box  # so the detector made the difference
    # A recognizer without detection detects when a call brings a detector.
    crops_only = EmotionRecognizer(weights, device="cpu", detect=False)
    assert crops_only.predict(astronaut)[0].box == (0, 0, 512, 512)
    _same(crops_only.predict(astronaut, detector=own_haar), haar.predict(astronaut))


def test_threads_with_other_priors_at_once_each_get_their_own(crops_reader: EmotionRecognizer, weights: Path,
                                                             data_root: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    crops = [read_gray(p) for cls in EMOTIONS for p in fer_faces(data_root, cls)[:2]]
    expected = {prior: EmotionRecognizer(weights, device="cpu", detect=False, prior=prior).predict_batch(crops)
                for prior in ("train", "uniform")}
    priors = ["train", "uniform"] * 8
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda prior: crops_reader.predict_batch(crops, prior=prior), priors))
    for prior, answer in zip(priors, answers, strict=True):
        _same(_flat(answer), _flat(expected[prior]), atol=1e-6)
    assert crops_reader.prior == "train"


def test_a_call_runs_the_model_on_the_thread_count_the_process_set(crops_reader: EmotionRecognizer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The count is process-wide: a call that changed it would change it under every other thread's torch calls."""
    import ferkit.inference

    seen: list[int] = []
    real = ferkit.inference.predict_logits

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ferkit.inference, "predict_logits", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        crops_reader.predict(np.full((48, 48), 100, np.uint8))  # one face: once run on a thread of its own
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
