"""`ferkit predict`'s smaller behaviours: annotated copies not read back, small-face hints, track summaries alone,
warnings said once, FFmpeg kept quiet, wide boxes in the table, readable labels on large photos, rounded scores,
help texts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fer_photos import fer_faces, photo, read_gray, write_video
from ferkit import cli
from ferkit.annotate import COLORS_BGR
from ferkit.sources import ANNOTATED_MARKER


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(["predict", "--no-progress", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def faces(data_root: Path) -> list[np.ndarray]:
    return [read_gray(p) for p in fer_faces(data_root, "happy")[2:5]]


def test_annotated_copies_inside_an_input_folder_are_not_read_next_run(
    faces: list[np.ndarray], tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo(faces[:1], [(220, 110, 170, 170)], seed=1)).save(folder / "one.jpg", quality=95)
    argv = ["--json", "--weights", str(weights), "--annotate", str(folder / "annotated"), str(folder)]
    for _ in range(2):  # the second run finds the first run's copy in the folder, and leaves it out
        status, out, _ = _run(argv, capsys)
        assert status == 0 and [Path(r["path"]).name for r in json.loads(out)] == ["one.jpg"]
    assert (folder / "annotated" / ANNOTATED_MARKER).is_file()
    assert [p.name for p in (folder / "annotated").rglob("*.jpg")] == ["one.jpg"]
    # Named on its own, the annotated folder is an input like any other.
    status, out, _ = _run(["--json", "--weights", str(weights), str(folder / "annotated")], capsys)
    assert status == 0 and len(json.loads(out)) == 1


def test_annotate_onto_a_file_is_one_line_before_any_work(tmp_path: Path, weights: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "out.png"
    taken.write_bytes(b"a file, not a folder")
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(3):
        Image.fromarray(photo([], [], seed=n)).save(photos / f"{n}.jpg")
    status, out, err = _run(["--weights", str(weights), "--annotate", str(taken), str(photos)], capsys)
    assert status == 2 and out == ""
    assert err.splitlines() == [f"ferkit: error: --annotate {taken}: a file is there; give a folder for the "
                                "annotated copies"]


def test_small_faces_give_one_hint_that_finds_them(faces: list[np.ndarray], tmp_path: Path, weights: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """70 px faces in 2000x1500 photos: missed at the defaults, with one note naming the options that find them."""
    paths = []
    for n in range(2):
        paths.append(tmp_path / f"crowd{n}.jpg")
        Image.fromarray(photo(faces[n : n + 2], [(300, 300, 70, 70), (1000, 600, 70, 70)], 2000, 1500, seed=n)
                        ).save(paths[-1], quality=95)
    status, out, err = _run(["--weights", str(weights), *map(str, paths)], capsys)
    assert status == 0 and out.count("no face") == 2
    notes = [line for line in err.splitlines() if "--min-face" in line]
    assert len(notes) == 1 and "no face found in 2 photos" in notes[0] and "--detect-max-side" in notes[0]
    status, out, err = _run(["--json", "--weights", str(weights), "--min-face", "32", "--detect-max-side", "0",
                             *map(str, paths)], capsys)
    assert status == 0 and [len(r["faces"]) for r in json.loads(out)] == [2, 2] and "--min-face" not in err


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, faces: list[np.ndarray]) -> Path:
    """12 frames at 10 fps of a real FER-2013 face moving across a 480x360 background."""
    frames = [photo(faces[:1], [(100 + 10 * i, 80, 160, 160)], width=480, height=360, seed=i) for i in range(12)]
    return write_video(tmp_path_factory.mktemp("clip") / "clip.avi", frames)


def test_tracks_only_gives_each_videos_summary_alone(clip: Path, weights: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--weights", str(weights), "--every", "2", str(clip)]
    status, full, _ = _run(base, capsys)
    assert status == 0
    status, out, _ = _run(["--tracks-only", *base], capsys)
    lines = out.splitlines()
    assert status == 0 and len(lines) < len(full.splitlines())
    assert "6 frames read, 1 track" in lines[1] and lines[2].split()[:2] == ["track", "first"]
    assert lines[3:] and all(line.startswith("  ") for line in lines[2:])  # the summary table, nothing per frame
    status, out, _ = _run(["--tracks-only", "--csv", *base], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and rows and all(r["face"] == "summary" for r in rows)
    status, _, err = _run(["--tracks-only", "--json", *base], capsys)
    assert status == 2 and "--tracks-only is for the table and CSV" in err
    status, _, err = _run(["--tracks-only", "--output", str(clip.with_name("rows.csv")), *base], capsys)
    assert status == 2 and "--summary FILE writes the track summaries" in err


def test_timeline_with_only_photos_warns_once(faces: list[np.ndarray], tmp_path: Path, weights: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for n in range(2):
        paths.append(tmp_path / f"{n}.jpg")
        Image.fromarray(photo(faces[:1], [(220, 110, 170, 170)], seed=n)).save(paths[-1])
    status, out, err = _run(["--weights", str(weights), "--timeline", str(tmp_path / "t.png"), *map(str, paths)],
                            capsys)
    assert status == 0 and out.count("happy") == 2 and not (tmp_path / "t.png").exists()
    assert [line for line in err.splitlines() if "--timeline" in line] == [
        "ferkit: warning: --timeline draws videos' tracks, and no input is a video: no timeline is written"]


def test_ffmpeg_says_nothing_of_its_own(tmp_path: Path, weights: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A file FFmpeg cannot read: ferkit's line, not FFmpeg's ("moov atom not found"), on the real stderr."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    status = cli.main(["predict", "--no-progress", "--csv", "--weights", str(weights), str(broken)])
    err = capfd.readouterr().err
    assert status == 1 and err.splitlines() and all(line.startswith("ferkit: ") for line in err.splitlines()), err


def test_a_large_photo_keeps_its_columns_and_readable_labels(faces: list[np.ndarray], tmp_path: Path, weights: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An 8000x6000 photo: 4-digit boxes leave a space before the label; the drawn label is tall and not a blob."""
    big = tmp_path / "big.jpg"
    small = photo(faces[2:3], [(500, 300, 150, 150)], 800, 600, seed=1)  # 10x up: quicker than noise at full size
    Image.fromarray(cv2.resize(small, (8000, 6000), interpolation=cv2.INTER_LINEAR)).save(big, quality=90)
    status, out, _ = _run(["--weights", str(weights), "--annotate", str(tmp_path / "ann"), str(big)], capsys)
    header, row = out.splitlines()
    column = header.index("label")
    assert status == 0 and row[column - 1] == " " and row[column:].split()[0] == "happy"
    x, y, w, h = map(int, row[header.index("box"):column].replace(",", " ").split())
    assert min(x, y, w, h) >= 1000
    drawn = cv2.imread(str(tmp_path / "ann" / "big.jpg"))
    label_color = np.array(COLORS_BGR["happy"])
    column_above = np.abs(drawn[: y, x + 5].astype(int) - label_color).max(axis=1) < 40
    label_height = int(column_above.sum())
    assert label_height >= 0.015 * 6000  # at least 90 px tall: readable when the whole photo is on a screen
    label = drawn[y - label_height : y, x : x + 6 * label_height]
    ink = (label.max(axis=2) < 80).mean()  # the black text's share of the label
    assert 0.05 < ink < 0.4  # letters, not a filled blob


def test_scores_are_rounded(faces: list[np.ndarray], tmp_path: Path, weights: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.jpg"
    Image.fromarray(photo(faces[:1], [(220, 110, 170, 170)], seed=1)).save(path)
    _, out, _ = _run(["--json", "--weights", str(weights), str(path)], capsys)
    score = json.loads(out)[0]["faces"][0]["score"]
    _, out, _ = _run(["--csv", "--weights", str(weights), str(path)], capsys)
    text = next(csv.DictReader(io.StringIO(out)))["score"]
    assert 0 < score < 1 and round(score, 6) == score and len(text) <= 8 and float(text) == score


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["predict", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE where the model runs" in text and "--batch-size N faces per model call" in text
    assert "(default: $FERKIT_DATA) --votes" in text and "(default: None)" not in text
