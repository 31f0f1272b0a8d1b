"""The local engine into a results table: the rows of real photos and a real video, formats, resume, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import ferkit
from fer_photos import background, fer_faces, photo, read_gray, write_video
from ferkit import cli
from ferkit.batches import ImageSource, image_rows
from ferkit.errors import UsageError
from ferkit.labels import EMOTIONS
from ferkit.local import predict_table
from ferkit.parts import parts_folder
from ferkit.predict import EmotionRecognizer
from ferkit.records import columns, to_table
from ferkit.sources import expand_inputs
from ferkit.video import VideoRecognizer

KEY = ["path", "frame", "face"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """12 photos in nested folders with 1 or 2 real FER-2013 faces each, one without, one broken; a 90-frame video."""
    folder = tmp_path_factory.mktemp("corpus") / "corpus"
    rng = np.random.default_rng(0)
    faces = [read_gray(p) for cls in EMOTIONS for p in fer_faces(data_root, cls)[:2]]
    for n in range(12):
        boxes = [(40, 60, 150, 150), (360, 150, 180, 180)][: 1 + n % 2]
        picked = [faces[int(i)] for i in rng.choice(len(faces), len(boxes), replace=False)]
        path = folder / f"set{n % 2}" / f"photo{n:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(picked, boxes, seed=n)).save(path, quality=92)
    Image.fromarray(background(seed=20)).save(folder / "set0" / "empty.png")
    (folder / "set1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    moving = [photo([faces[3]], [(20 + 3 * i, 80, 160, 160)], width=480, height=360, seed=i) for i in range(90)]
    write_video(folder / "clip.avi", moving)
    return folder


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY, na_position="first").reset_index(drop=True)


def test_rows_are_the_batch_and_video_rows(corpus: Path, recognizer: EmotionRecognizer, tmp_path: Path) -> None:
    items = expand_inputs([str(corpus)])
    out = tmp_path / "out.parquet"
    counts = predict_table(recognizer, items, out, summary=tmp_path / "tracks.csv", workers=2, part_rows=7)
    assert (counts.inputs, counts.failed, counts.faceless, counts.frames) == (15, 1, 1, 90)
    assert not parts_folder(out).exists()
    table = ferkit.read_results(out)
    assert list(table.columns) == columns(recognizer.classes)
    assert list(dict.fromkeys(table["path"])) == [item.display for item in items]  # input order
    photos = [item for item in items if item.kind == "image"]
    expected = ferkit.records.to_pandas(to_table(image_rows(recognizer, [ImageSource(i.identity(), i.path)
                                                                          for i in photos]), recognizer.classes))
    got = table[table["path"] != str(corpus / "clip.avi")].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_exact=False, atol=2e-6)

    video = VideoRecognizer(recognizer).predict(corpus / "clip.avi")
    rows = table[table["path"] == str(corpus / "clip.avi")].reset_index(drop=True)
    reference = video.to_pandas()
    assert list(rows["frame"]) == list(reference["frame"]) and list(rows["label"]) == list(reference["label"])
    assert list(rows["track"]) == list(reference["track"])
    probabilities = [*recognizer.classes, *(f"raw_{c}" for c in recognizer.classes)]
    assert np.allclose(rows[probabilities].to_numpy(float), reference[probabilities].to_numpy(float), atol=1e-5)
    tracks = ferkit.read_results(tmp_path / "tracks.csv")
    assert list(tracks["track"]) == [t.track for t in video.tracks]
    assert list(tracks["dominant"]) == [t.dominant for t in video.tracks]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_every_format_holds_the_same_table(suffix: str, corpus: Path, recognizer: EmotionRecognizer,
                                           tmp_path: Path) -> None:
    items = expand_inputs([str(corpus / "set0")])
    predict_table(recognizer, items, tmp_path / "a.parquet", workers=1)
    predict_table(recognizer, items, tmp_path / f"a{suffix}", workers=2, part_rows=3)
    pd.testing.assert_frame_equal(ferkit.read_results(tmp_path / f"a{suffix}"),
                                  ferkit.read_results(tmp_path / "a.parquet"))


def test_resume_skips_what_is_done_and_redoes_what_changed(corpus: Path, recognizer: EmotionRecognizer,
                                                           tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((corpus / "set1").glob("photo*.jpg")):
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out.csv"
    first = sorted(folder.iterdir())[:3]
    predict_table(recognizer, expand_inputs([str(p) for p in first]), out)
    with pytest.raises(UsageError, match="parts"):  # an interrupted run is never overwritten by accident
        parts_folder(out).mkdir()
        predict_table(recognizer, expand_inputs([str(folder)]), out)
    parts_folder(out).rmdir()
    changed = first[1]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    counts = predict_table(recognizer, expand_inputs([str(p) for p in sorted(folder.iterdir())]), out, resume=True)
    assert counts.skipped == 2 and counts.done == len(list(folder.iterdir())) - 2
    table = ferkit.read_results(out)
    assert not table.duplicated(KEY).any()
    assert set(table["path"]) == {str(p) for p in folder.iterdir()}
    assert (table.loc[table["path"] == str(changed), "file_mtime_ns"] == changed.stat().st_mtime_ns).all()
    fresh = tmp_path / "fresh.csv"
    predict_table(recognizer, expand_inputs([str(p) for p in sorted(folder.iterdir())]), fresh, resume=True)
    pd.testing.assert_frame_equal(_sorted(table), _sorted(ferkit.read_results(fresh)))


def test_the_command_line(corpus: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "faces.jsonl"
    code = cli.main(["predict", str(corpus / "set0"), "--weights", str(weights), "--device", "cpu", "--output",
                     str(out), "--workers", "2", "--no-progress"])
    assert code == 0 and capsys.readouterr().out == ""
    assert len(ferkit.read_results(out)) >= 6
    assert cli.main(["predict", str(corpus), "--output", str(tmp_path / "x.txt"), "--weights", str(weights)]) == 2
    assert "the suffix picks the format" in capsys.readouterr().err
    assert cli.main(["predict", str(corpus), "--resume", "--weights", str(weights)]) == 2
    assert "--resume goes with --output" in capsys.readouterr().err


KILL_RUN = """
import sys
from ferkit.local import predict_table
from ferkit.predict import EmotionRecognizer
from ferkit.sources import expand_inputs
recognizer = EmotionRecognizer(sys.argv[1], device="cpu")
predict_table(recognizer, expand_inputs([sys.argv[2]]), sys.argv[3], summary=sys.argv[4], resume=True, workers=2,
              part_rows=4, progress=False)
"""


@pytest.mark.slow
def test_killed_at_three_moments_and_resumed_equals_one_run(corpus: Path, weights: Path, tmp_path: Path) -> None:
    def run(out: Path, kill_after_parts: int | None = None) -> int:
        command = [sys.executable, "-c", KILL_RUN, str(weights), str(corpus), str(out), str(out) + ".tracks.parquet"]
        process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if kill_after_parts is not None:
            before = set(parts_folder(out).glob("faces-*.parquet"))
            while process.poll() is None and len(set(parts_folder(out).glob("faces-*.parquet")) - before) < \
                    kill_after_parts:
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
        return process.wait(timeout=300)

    reference_out = tmp_path / "reference.parquet"
    predict_table(EmotionRecognizer(weights, device="cpu"), expand_inputs([str(corpus)]), reference_out,
                  summary=str(reference_out) + ".tracks.parquet", workers=2)
    reference = _sorted(ferkit.read_results(reference_out))
    out = tmp_path / "out.parquet"
    for moment in (1, 2, 4):  # new parts: the photos' (all in one), then into the video (restarted each time)
        assert run(out, moment) == -signal.SIGKILL, "the run ended before it could be killed"
        partial = ferkit.read_results(out)  # readable, and every input in it whole
        assert not partial.duplicated(KEY).any()
        for path, rows in partial.groupby("path"):
            pd.testing.assert_frame_equal(_sorted(rows), reference[reference["path"] == path].reset_index(drop=True))
    assert run(out) == 0
    assert not parts_folder(out).exists()
    pd.testing.assert_frame_equal(_sorted(ferkit.read_results(out)), reference)
    tracks = ferkit.read_results(str(out) + ".tracks.parquet")
    pd.testing.assert_frame_equal(tracks, ferkit.read_results(str(reference_out) + ".tracks.parquet"))


def test_a_kill_between_the_merge_and_the_cleanup_merges_nothing_twice(
        corpus: Path, recognizer: EmotionRecognizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = expand_inputs([str(corpus / "set1")])
    out = tmp_path / "out.parquet"

    def killed(path: Path) -> None:
        raise KeyboardInterrupt  # stands for the kill: the table is renamed into place, its parts are still there

    with monkeypatch.context() as patch:
        patch.setattr("ferkit.parts.shutil.rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            predict_table(recognizer, items, out, part_rows=3)
    assert parts_folder(out).is_dir()
    once = ferkit.read_results(out)
    assert not once.duplicated(KEY).any()
    counts = predict_table(recognizer, items, out, resume=True)
    assert counts.skipped == len(items) and not parts_folder(out).exists()
    pd.testing.assert_frame_equal(ferkit.read_results(out), once)


def test_progress_only_where_asked(corpus: Path, recognizer: EmotionRecognizer, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ferkit.progress.DELAY", 0.0)
    items = expand_inputs([str(corpus / "set0"), str(corpus / "clip.avi")])
    predict_table(recognizer, items, tmp_path / "quiet.parquet")  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    predict_table(recognizer, items, tmp_path / "shown.parquet", progress=True)
    err = capsys.readouterr().err
    assert f"{len(items)}/{len(items)} inputs" in err and "90 frames" in err and "faces/s" in err
