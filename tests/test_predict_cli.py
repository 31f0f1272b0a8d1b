"""`ferkit predict`: folders of real photos, bad inputs among good ones, crops, video, output formats."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from by_hand import calibrated_by_hand
from fer_photos import ASTRONAUT_FACE, background, fer_faces, iou, photo, read_gray, write_video
from ferkit import cli
from ferkit.inference import predict_logits
from ferkit.labels import EMOTIONS
from ferkit.predict import EmotionRecognizer
from ferkit.predict_files import predict_command
from ferkit.sources import expand_inputs
from ferkit.video import VideoError, run_camera
from ferkit.weights import load_model

skimage_data = pytest.importorskip("skimage.data")

PASTED = {
    "two.jpg": [(40, 60, 150, 150), (360, 150, 180, 180)],
    "people/one.png": [(220, 110, 170, 170)],
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A folder of real photos: FER-2013 faces pasted at known places, the astronaut, one without faces."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    (folder / "people").mkdir(parents=True)
    faces = [read_gray(p) for p in fer_faces(data_root, "happy")[2:5]]
    Image.fromarray(photo(faces[:2], PASTED["two.jpg"], seed=1)).save(folder / "two.jpg", quality=95)
    Image.fromarray(photo(faces[2:], PASTED["people/one.png"], seed=2)).save(folder / "people" / "one.png")
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(background(seed=3)).save(folder / "empty-room.jpg")
    (folder / "notes.txt").write_text("not a photo: skipped when the folder is searched\n")
    (folder / ".hidden.jpg").write_text("hidden: skipped\n")
    return folder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(["predict", "--no-progress", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _bad_files(folder: Path, good: Path) -> dict[str, str]:
    """Write one of each kind of bad image file into `folder`; returns name -> expected message."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.jpg").write_text("I am a text file\n")
    blob = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(blob[: len(blob) // 2])
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    bomb = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", 12_000, 12_000) + bomb[24:29]
    bomb[16:29] = ihdr
    bomb[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (folder / "bomb.png").write_bytes(bytes(bomb))
    buffer = io.BytesIO()
    Image.open(good).save(buffer, "PNG")
    corrupt = bytearray(buffer.getvalue())
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = bytes(64)  # zeros in the middle of the pixel data
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    return {"text.jpg": "not an image", "truncated.jpg": "corrupt or truncated",
            "bomb.png": "over the pixel limit", "corrupt.png": "corrupt or truncated"}


def test_a_folder_of_real_photos(photos: Path, recognizer: EmotionRecognizer, capsys: pytest.CaptureFixture[str],
                                 weights: Path) -> None:
    status, out, err = _run(["--json", "--weights", str(weights), str(photos)], capsys)
    assert status == 0, err
    records = {Path(r["path"]).relative_to(photos).as_posix(): r for r in json.loads(out)}
    assert list(records) == ["astronaut.png", "empty-room.jpg", "people/one.png", "two.jpg"]  # sorted, recursive
    assert all(r["error"] is None and r["type"] == "image" for r in records.values())
    assert records["empty-room.jpg"]["faces"] == []
    (astronaut,) = records["astronaut.png"]["faces"]
    assert iou(tuple(astronaut["box"]), ASTRONAUT_FACE) >= 0.5  # Haar's box; YuNet's crop square is larger
    assert (records["astronaut.png"]["width"], records["astronaut.png"]["height"]) == (512, 512)
    found = 0
    for name, boxes in PASTED.items():
        faces = records[name]["faces"]
        assert len(faces) <= len(boxes)
        found += sum(any(iou(tuple(f["box"]), box) >= 0.5 for f in faces) for box in boxes)
        # Labels and probabilities are the API's on the same file, which uses the model on the crop.
        api = recognizer.predict(photos / name)
        assert [f["label"] for f in faces] == [r.label for r in api]
        for face, result in zip(faces, api, strict=True):
            assert list(face["probabilities"]) == list(EMOTIONS)
            assert face["probabilities"][face["label"]] == pytest.approx(result.probabilities[result.label], abs=1e-6)
            assert face["score"] == pytest.approx(result.score)
    assert found >= 2, "the detector found fewer than 2 of the 3 pasted faces"


def test_the_detector_option_reaches_predict(photos: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    boxes = {}
    for name in ("yunet", "haar", None):
        options = ["--detector", name] if name else []
        status, out, err = _run(["--json", *options, "--weights", str(weights), str(photos / "astronaut.png")],
                                capsys)
        assert status == 0, err
        (face,) = json.loads(out)[0]["faces"]
        boxes[name] = face["box"]
        if name:
            (expected,) = EmotionRecognizer(weights, device="cpu", detector=name).predict(photos / "astronaut.png")
            assert face["box"] == list(expected.box)
    assert boxes[None] == boxes["yunet"] != boxes["haar"]  # YuNet unless told otherwise


def test_bad_inputs_fail_alone(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: Path
                               ) -> None:
    bad = tmp_path / "bad"
    expected = _bad_files(bad, photos / "two.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-notes").mkdir()
    (tmp_path / "only-notes" / "readme.md").write_text("no images here")
    arguments = [str(photos / "astronaut.png"), str(bad), str(tmp_path / "empty"), str(tmp_path / "only-notes"),
                 str(tmp_path / "missing.jpg"), str(tmp_path / "*.nothing"), str(photos / "empty-room.jpg")]
    status, out, err = _run(["--json", "--weights", str(weights), *arguments], capsys)
    assert status == 1
    records = json.loads(out)
    by_path = {r["path"]: r for r in records}
    assert len(records) == 4 + 4 + 2  # every input has its object, in order
    assert records[0]["path"] == str(photos / "astronaut.png") and len(records[0]["faces"]) == 1
    assert records[-1]["path"] == str(photos / "empty-room.jpg") and records[-1]["error"] is None
    for name, message in expected.items():
        record = by_path[str(bad / name)]
        assert record["faces"] == [] and message in record["error"] and str(bad / name) in record["error"]
        assert f"ferkit: {record['error']}" in err.splitlines()  # one line naming the file on stderr too
    assert by_path[str(tmp_path / "empty")]["error"] == f"{tmp_path / 'empty'}: folder holds no images or videos"
    assert "(1 other file)" in by_path[str(tmp_path / "only-notes")]["error"]
    assert by_path[str(tmp_path / "missing.jpg")]["error"].endswith("no such file or folder")
    assert by_path[str(tmp_path / "*.nothing")]["error"].endswith("no files match")
    assert err.splitlines()[-1] == "ferkit: 8 of 10 inputs failed"
    # The pixel limit is a flag too.
    status, out, _ = _run(["--json", "--weights", str(weights), "--max-pixels", "1000", str(photos / "astronaut.png")],
                          capsys)
    assert status == 1 and "over the pixel limit of 1,000" in json.loads(out)[0]["error"]


def test_table_csv_globs_and_annotated_copies(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              weights: Path) -> None:
    pattern = str(photos / "*.png")
    status, out, _ = _run(["--weights", str(weights), pattern, str(photos / "empty-room.jpg")], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["path", "face", "box", "(x,", "y,", "w,", "h)", "label", "p", "score"]
    shown, full = lines[1].split()[0], str(photos / "astronaut.png")  # long paths keep their tail after "..."
    assert (shown == full or (shown.startswith("...") and full.endswith(shown[3:]))) and lines[-1].endswith("no face")

    status, out, _ = _run(["--csv", "--weights", str(weights), str(photos)], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and [*rows[0]][-8:] == [*EMOTIONS, "error"]
    astronaut = next(r for r in rows if r["path"].endswith("astronaut.png"))
    assert astronaut["face"] == "1" and astronaut["label"] in EMOTIONS
    assert float(astronaut[astronaut["label"]]) == float(astronaut["probability"])
    empty = next(r for r in rows if r["path"].endswith("empty-room.jpg"))
    assert empty["face"] == "" and empty["error"] == ""

    out_dir = tmp_path / "annotated"
    status, out, _ = _run(["--json", "--weights", str(weights), "--annotate", str(out_dir), str(photos)], capsys)
    assert status == 0
    for record in json.loads(out):
        written = Path(record["annotated"])
        assert written.is_relative_to(out_dir / "photos") and written.is_file()
        original = cv2.imread(record["path"])
        drawn = cv2.imread(str(written))
        assert drawn.shape == original.shape
        assert (np.abs(drawn.astype(int) - original).max() > 100) == bool(record["faces"])  # boxes drawn
    # An annotated copy never replaces its input.
    status, out, _ = _run(["--json", "--weights", str(weights), "--annotate", str(photos.parent),
                           str(photos / "astronaut.png"), str(photos)], capsys)
    errors = [r["error"] for r in json.loads(out) if r["error"]]
    assert status == 1 and errors and all("would overwrite it" in e for e in errors)


def test_no_detect_on_privatetest_crops_predicts_what_evaluate_scores(
    data_root: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [p for cls in EMOTIONS for p in fer_faces(data_root, cls)[:50]]
    model, meta = load_model(weights)
    pre = meta.preprocessing
    z = calibrated_by_hand(predict_logits(model, np.stack([read_gray(p) for p in files]), preprocessing=pre).numpy(),
                           meta)
    # --prior train: what evaluate scores; no --prior: the default, uniform (the log training prior subtracted).
    for options, logits in ((["--prior", "train"], z), ([], z - np.log(np.array(pre.class_prior)))):
        status, out, _ = _run(["--no-detect", "--json", *options, "--weights", str(weights), *map(str, files)],
                              capsys)
        assert status == 0
        records = json.loads(out)
        assert [r["faces"][0]["label"] for r in records] == [meta.classes[int(k)] for k in logits.argmax(1)]
        assert all(r["faces"][0]["box"] == [0, 0, 48, 48] and r["faces"][0]["score"] is None for r in records)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """12-frame clips at 10 fps of a real FER-2013 face moving across a 480x360 background."""
    folder = tmp_path_factory.mktemp("videos")
    face = read_gray(fer_faces(data_root, "happy")[0])
    frames = [photo([face], [(100 + 10 * i, 80, 160, 160)], width=480, height=360, seed=i) for i in range(12)]
    return {suffix: write_video(folder / f"clip.{suffix}", frames) for suffix in ("avi", "mp4")}


def test_video_gives_a_row_per_sampled_frame_and_an_annotated_video(
    videos: dict[str, Path], tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "annotated"
    (tmp_path / "broken.mp4").write_text("not a video")
    arguments = ["--json", "--every", "5", "--annotate", str(out_dir), "--weights", str(weights),
                 str(videos["avi"]), str(videos["mp4"]), str(tmp_path / "broken.mp4")]
    status, out, _ = _run(arguments, capsys)
    assert status == 1
    avi, mp4, broken = json.loads(out)
    for record in (avi, mp4):
        assert record["type"] == "video" and record["error"] is None
        assert record["sampled_frames"] == [0, 5, 10] and record["fps"] == pytest.approx(10)
        assert (record["width"], record["height"]) == (480, 360)
        frames = [face["frame"] for face in record["faces"]]
        assert set(frames) <= {0, 5, 10} and len(frames) >= 2  # one face per frame, Haar finds most
        for face in record["faces"]:
            assert face["time"] == pytest.approx(face["frame"] / 10)
            assert iou(tuple(face["box"]), (100 + 10 * face["frame"], 80, 160, 160)) >= 0.5
        capture = cv2.VideoCapture(record["annotated"])
        count = 0
        while capture.read()[0]:
            count += 1
        assert count == 12 and Path(record["annotated"]).suffix == Path(record["path"]).suffix
    assert broken["type"] == "video" and "broken.mp4" in broken["error"]

    status, out, _ = _run(["--csv", "--every", "4", "--weights", str(weights), str(videos["avi"])], capsys)
    rows = [r for r in csv.DictReader(io.StringIO(out)) if r["face"] != "summary"]  # then a row per track
    assert status == 0 and sorted({int(r["frame"]) for r in rows}) == [0, 4, 8]
    assert len(rows) == 3  # one face, or one empty row, per sampled frame


def test_camera_without_a_display_is_a_clear_error(weights: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    status, _, err = _run(["--camera", "0", "--weights", str(weights)], capsys)
    assert status == 2 and "camera 0: cannot show a live window" in err
    with pytest.raises(VideoError, match="cannot show a live window"):
        run_camera(EmotionRecognizer(weights, device="cpu"), 0)


def test_usage_errors(weights: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(["--weights", str(weights)], capsys)
    assert status == 2 and "give image or video PATHs, or --camera" in err
    status, _, err = _run(["--every", "0", "--weights", str(weights), str(photos)], capsys)
    assert status == 2 and "--every must be at least 1" in err
    status, _, err = _run(["--weights", str(photos / "nothing.safetensors"), str(photos)], capsys)
    assert status == 2 and "no such weights file" in err
    with pytest.raises(SystemExit):
        cli.main(["predict", "--json", "--csv", str(photos)])


def test_stdout_stays_json_with_a_progress_bar(photos: Path, recognizer: EmotionRecognizer) -> None:
    out = io.StringIO()
    assert predict_command(recognizer, [str(photos)], "json", progress=True, out=out) == 0
    assert len(json.loads(out.getvalue())) == 4


def test_expand_inputs_keeps_argument_order(photos: Path) -> None:
    items = expand_inputs([str(photos / "two.jpg"), str(photos / "people"), str(photos / "astronaut.png")])
    assert [Path(i.display).name for i in items] == ["two.jpg", "one.png", "astronaut.png"]
    assert all(i.error is None and i.kind == "image" for i in items)
