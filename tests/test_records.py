"""Records, writers and readers: rows of real photos and a real video, written in every format and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ferkit
from fer_photos import background, fer_faces, photo, read_gray, write_video
from ferkit.batches import ImageSource, image_rows
from ferkit.predict import EmotionRecognizer
from ferkit.records import columns, identify, schema, to_table
from ferkit.video import VideoRecognizer
from ferkit.writers import WRITERS, open_writer, read_table

BOXES = [(40, 60, 150, 150), (360, 150, 180, 180)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> list[Path]:
    """Two FER-2013 faces pasted into one photo, a photo without faces, and a file that is no image."""
    folder = tmp_path_factory.mktemp("record-photos")
    faces = [read_gray(p) for p in fer_faces(data_root, "happy")[2:4]]
    Image.fromarray(photo(faces, BOXES, seed=1)).save(folder / "two.jpg", quality=95)
    Image.fromarray(background(seed=3)).save(folder / "empty.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return [folder / "two.jpg", folder / "empty.png", folder / "broken.jpg"]


def test_image_rows_one_row_per_face_or_input(photos: list[Path], recognizer: EmotionRecognizer) -> None:
    sources = [ImageSource(identify(p), p) for p in photos]
    rows = image_rows(recognizer, sources)
    assert [r["path"] for r in rows] == [str(photos[0])] * 2 + [str(photos[1]), str(photos[2])]
    assert [r.get("face") for r in rows] == [1, 2, None, None]
    assert rows[3]["error"].startswith(str(photos[2])) and rows[0]["error"] is None
    assert rows[0]["file_size"] == photos[0].stat().st_size and rows[0]["file_mtime_ns"] == photos[0].stat().st_mtime_ns
    # The same faces and probabilities as predict on the photo, and the same from the file's bytes.
    expected = recognizer.predict(photos[0])
    assert [(r["x"], r["y"], r["w"], r["h"]) for r in rows[:2]] == [f.box for f in expected]
    assert [r["label"] for r in rows[:2]] == [f.label for f in expected]
    assert rows[0]["right_eye_x"] is not None and rows[0].get("raw_happy") is None
    from_bytes = image_rows(recognizer, [ImageSource(identify(photos[0]), data=photos[0].read_bytes())])
    assert from_bytes == rows[:2]


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_every_format_reads_back_the_same_table(suffix: str, photos: list[Path], recognizer: EmotionRecognizer,
                                                tmp_path: Path) -> None:
    rows = image_rows(recognizer, [ImageSource(identify(p), p) for p in photos])
    expected = to_table(rows, recognizer.classes)
    path = tmp_path / f"out{suffix}"
    writer = open_writer(path, schema(recognizer.classes))
    for start in range(0, len(rows), 2):  # written in parts
        writer.write(to_table(rows[start : start + 2], recognizer.classes))
    writer.close()
    back = read_table(path)
    assert back.schema.names == columns(recognizer.classes)
    assert back.equals(expected.cast(back.schema))
    frame = ferkit.read_results(path)
    assert str(frame["frame"].dtype) == "Int64" and frame["frame"].isna().all()
    assert str(frame["face"].dtype) == "Int64" and list(frame["face"].fillna(0)) == [1, 2, 0, 0]
    assert frame["happy"].dtype == np.float64 and str(frame["path"].dtype) == "string"
    assert frame["error"].isna().sum() == 3


def test_to_pandas_on_predict_and_video_results(photos: list[Path], recognizer: EmotionRecognizer, tmp_path: Path,
                                                data_root: Path) -> None:
    faces = recognizer.predict(photos[0])
    frame = faces.to_pandas()
    assert list(frame.columns) == columns(recognizer.classes) and len(frame) == 2
    assert list(frame["label"]) == [f.label for f in faces] and (frame["path"] == str(photos[0])).all()
    assert np.allclose(frame[recognizer.classes].to_numpy(), [[f.probabilities[c] for c in recognizer.classes]
                                                              for f in faces], atol=1e-6)
    assert len(recognizer.predict(photos[1]).to_pandas()) == 1  # no face: one row, face columns empty
    assert [len(r.to_pandas()) for r in recognizer.predict_batch(photos[:2])] == [2, 1]

    face = read_gray(fer_faces(data_root, "happy")[0])
    clip = write_video(tmp_path / "clip.avi", [photo([face], [(100 + 10 * i, 80, 160, 160)], 480, 360, seed=i)
                                               for i in range(6)])
    result = VideoRecognizer(recognizer).predict(clip)
    rows = result.to_pandas()
    assert list(rows["frame"]) == [f.frame for f in result.frames] and rows["track"].notna().all()
    assert rows["raw_happy"].notna().all() and str(rows["track"].dtype) == "Int64"
    tracks = result.tracks_to_pandas()
    assert list(tracks["track"]) == [t.track for t in result.tracks]
    assert list(tracks["dominant"]) == [t.dominant for t in result.tracks]
    assert np.allclose(tracks["seconds"], [t.seconds for t in result.tracks], atol=1e-3)
    assert np.allclose(tracks[recognizer.classes].sum(axis=1), 1.0, atol=1e-5)
