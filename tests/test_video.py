"""Video with real FER-2013 faces: tracks through crossings and absences, steady labels, outputs, bad files.

Clips are written here from real faces pasted onto a background, with fresh noise in every frame;
rotation and variable frame rate are written into an OpenCV-made .mp4 by editing its boxes (the
`tkhd` matrix, the `stts` durations), as a phone or a screen recorder would write them. The
model is the one-view `ferkit-resnet-robust` (a model call per frame; $FERKIT_TEST_WEIGHTS
overrides it); the tests compare the model with itself, never with fixed emotions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from fer_photos import background, fer_faces, iou, paste, read_gray, write_video
from ferkit import cli
from ferkit.predict import EmotionRecognizer
from ferkit.tracking import FrameResult
from ferkit.video import VideoError, VideoRecognizer, VideoWarning

SIZE = 150


@pytest.fixture(scope="module")
def video_recognizer() -> EmotionRecognizer:
    from ferkit.weights import resolve_weights

    return EmotionRecognizer(resolve_weights(os.environ.get("FERKIT_TEST_WEIGHTS") or "ferkit-resnet-robust"),
                             device="cpu")


def noisy(frame: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    return np.clip(frame + rng.normal(0, sigma, frame.shape), 0, 255).astype(np.uint8)


def found_faces(recognizer: EmotionRecognizer, data_root: Path, cls: str, count: int, size: int = SIZE
                ) -> list[np.ndarray]:
    """The first `count` faces of a class that the detector finds when pasted alone at this size."""
    chosen = []
    for path in fer_faces(data_root, cls)[:40]:
        face = read_gray(path)
        canvas = paste(background(), face, (240, 160, size, size))
        if len(recognizer.find_faces(canvas)) == 1:
            chosen.append(face)
        if len(chosen) == count:
            return chosen
    pytest.fail(f"fewer than {count} {cls} faces found by the detector")


def changes(labels: list[str]) -> int:
    return sum(a != b for a, b in pairwise(labels))


# ---------------------------------------------------------------------------------------------
# Tracks


@pytest.mark.slow
def test_two_crossing_faces_keep_their_ids_and_the_one_that_leaves_gets_its_own_back(
    video_recognizer: EmotionRecognizer, data_root: Path, tmp_path: Path
) -> None:
    """a walks right, b walks left, crossing with overlapping boxes; a leaves the frame for 1 s and comes back."""
    a, b = found_faces(video_recognizer, data_root, "happy", 1)[0], found_faces(video_recognizer, data_root,
                                                                                "surprise", 1)[0]
    rng = np.random.default_rng(0)
    fps, frames, truth = 10, [], []
    for i in range(60):
        where = {"a": None if 30 <= i < 40 else (20 + 15 * min(i, 29), 40),
                 "b": (470 - 7 * i, 150)}
        canvas = background(seed=i % 3)
        for name, face in (("a", a), ("b", b)):
            at = where[name]
            if at is not None:
                paste(canvas, face, (*at, SIZE, SIZE))
        frames.append(noisy(canvas, rng))
        truth.append({name: (*at, SIZE, SIZE) for name, at in where.items() if at is not None})
    clip = write_video(tmp_path / "crossing.avi", frames, fps)
    result = VideoRecognizer(video_recognizer).predict(clip)

    ids: dict[str, list[int]] = {"a": [], "b": []}
    for frame in result.frames:  # true faces and detections paired one to one by IoU, as MOT scoring pairs them
        names = list(truth[frame.frame])
        overlaps = np.array([[iou(face.box, truth[frame.frame][name]) for face in frame.faces] for name in names])
        if overlaps.size == 0:
            continue
        for row, col in zip(*linear_sum_assignment(-overlaps), strict=True):
            track = frame.faces[col].track
            if overlaps[row, col] >= 0.3 and track is not None:
                ids[names[row]].append(track)
    assert len(ids["a"]) >= 30 and len(ids["b"]) >= 40  # the detector found most faces
    switches = changes([str(t) for t in ids["a"]]) + changes([str(t) for t in ids["b"]])
    assert switches <= 1, ids
    before, after = ids["a"][0], ids["a"][-1]
    assert after == before, "the returning face gets its old id back (it returns where it left, within 1.5 s)"
    assert not set(ids["a"]) & set(ids["b"])
    assert set(ids["a"]) | set(ids["b"]) <= {t.track for t in result.tracks}


# ---------------------------------------------------------------------------------------------
# Smoothing


def near_tie_face(recognizer: EmotionRecognizer, data_root: Path) -> np.ndarray:
    """Of 40 real faces, the one whose top two emotions are closest: where labels flicker."""
    best: tuple[float, np.ndarray] | None = None
    for cls in ("sad", "neutral", "angry", "fear"):
        for path in fer_faces(data_root, cls)[:10]:
            face = read_gray(path)
            found = recognizer.predict(paste(background(), face, (220, 140, 200, 200)))
            if len(found) == 1:
                top = sorted(found[0].probabilities.values())[-2:]
                if best is None or top[1] - top[0] < best[0]:
                    best = (top[1] - top[0], face)
    assert best is not None
    return best[1]


@pytest.mark.slow
def test_smoothing_cuts_label_changes_of_a_still_face_by_80_percent(
    video_recognizer: EmotionRecognizer, data_root: Path, tmp_path: Path
) -> None:
    face = near_tie_face(video_recognizer, data_root)
    rng = np.random.default_rng(1)
    still = paste(background(), face, (220, 140, 200, 200))
    clip = write_video(tmp_path / "still.avi", [noisy(still, rng, 10) for _ in range(100)], fps=10)  # 10 s
    frames = VideoRecognizer(video_recognizer, smooth=1.0).predict(clip).frames
    faces = [f.faces[0] for f in frames if len(f.faces) == 1]
    assert len(faces) >= 90
    raw = [max(f.raw_probabilities or {}, key=(f.raw_probabilities or {}).__getitem__) for f in faces]
    smoothed = [f.label for f in faces]
    assert changes(raw) >= 5, "this face should flicker without smoothing"
    assert changes(smoothed) <= 0.2 * changes(raw), (changes(raw), changes(smoothed))
    # --smooth 0 labels are the raw ones.
    unsmoothed = VideoRecognizer(video_recognizer, smooth=0).predict(clip, every=10).frames
    assert [f.faces[0].label for f in unsmoothed if f.faces] == [raw[i] for i in range(0, 100, 10)
                                                                 if len(frames[i].faces) == 1]


@pytest.mark.slow
def test_smoothed_labels_follow_a_change_of_expression_within_the_window(
    video_recognizer: EmotionRecognizer, data_root: Path, tmp_path: Path
) -> None:
    happy = found_faces(video_recognizer, data_root, "happy", 1, 200)[0]
    surprise = found_faces(video_recognizer, data_root, "surprise", 1, 200)[0]
    rng = np.random.default_rng(2)
    stills = [paste(background(), face, (220, 140, 200, 200)) for face in (happy, surprise)]
    clip = write_video(tmp_path / "change.avi", [noisy(stills[i >= 50], rng) for i in range(100)], fps=10)
    smooth = 1.0
    frames = [f for f in VideoRecognizer(video_recognizer, smooth=smooth).predict(clip).frames if len(f.faces) == 1]
    # What the model says of each face: the argmax of its mean raw probabilities over its 5 s.
    labels = []
    for part in ([f for f in frames if f.time < 5], [f for f in frames if f.time >= 5]):
        mean = {k: np.mean([(f.faces[0].raw_probabilities or {})[k] for f in part]) for k in video_recognizer.classes}
        labels.append(max(mean, key=mean.__getitem__))
    assert labels[0] != labels[1], labels
    assert all(f.faces[0].label == labels[0] for f in frames if 1 <= f.time < 5)
    switched = next(f.time for f in frames if f.time >= 5 and f.faces[0].label == labels[1])
    assert switched - 5.0 <= smooth
    assert all(f.faces[0].label == labels[1] for f in frames if f.time >= 5 + smooth)


# ---------------------------------------------------------------------------------------------
# Outputs


@pytest.fixture(scope="module")
def two_faces_clip(tmp_path_factory: pytest.TempPathFactory, video_recognizer: EmotionRecognizer,
                   data_root: Path) -> Path:
    """3 s at 10 fps: a happy face still on the left, a surprised one drifting on the right."""
    happy = found_faces(video_recognizer, data_root, "happy", 1)[0]
    surprise = found_faces(video_recognizer, data_root, "surprise", 1)[0]
    rng = np.random.default_rng(3)
    frames = []
    for i in range(30):
        canvas = paste(background(), happy, (40, 150, SIZE, SIZE))
        frames.append(noisy(paste(canvas, surprise, (400 + 2 * i, 160, SIZE, SIZE)), rng))
    return write_video(tmp_path_factory.mktemp("clips") / "two.avi", frames, fps=10)


def _run(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(["predict", "--no-progress", *arguments])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_csv_and_table_carry_tracks_summaries_and_the_timeline(
    two_faces_clip: Path, video_recognizer: EmotionRecognizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = ["--weights", str(video_recognizer.backend.path)]
    timeline = tmp_path / "timeline.png"
    status, out, err = _run(["--json", "--every", "2", "--timeline", str(timeline), *weights, str(two_faces_clip)],
                            capsys)
    assert status == 0, err
    [record] = json.loads(out)
    assert record["timeline"] == str(timeline)
    image = cv2.imread(str(timeline))
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 600
    assert record["sampled_frames"] == list(range(0, 30, 2)) and record["warnings"] == []
    for face in record["faces"]:
        assert {"frame", "time", "track", "box", "label", "probabilities", "raw_probabilities"} <= set(face)
        assert face["label"] == max(face["probabilities"], key=face["probabilities"].get)
        assert face["time"] == pytest.approx(face["frame"] / 10)
    by_track: dict[int, list[int]] = {}
    for face in record["faces"]:
        by_track.setdefault(face["track"], []).append(face["box"][0])
    assert len(by_track) == 2 and {min(xs) < 320 for xs in by_track.values()} == {True, False}
    tracks = {t["track"]: t for t in record["tracks"]}
    assert set(tracks) == set(by_track)
    for track, summary in tracks.items():
        labels = [f["label"] for f in record["faces"] if f["track"] == track]
        assert summary["frames"] == len(labels)
        assert summary["dominant"] == max(set(labels), key=labels.count)
        assert sum(summary["shares"].values()) == pytest.approx(1, abs=1e-3)
        assert summary["first_seen"] <= summary["last_seen"] <= 2.8

    status, out, _ = _run(["--csv", "--every", "2", *weights, str(two_faces_clip)], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    faces = [r for r in rows if r["face"] != "summary"]
    summaries = [r for r in rows if r["face"] == "summary"]
    assert [r["track"] for r in faces] == [str(f["track"]) for f in record["faces"]]
    assert {r["track"]: r["label"] for r in summaries} == {str(k): t["dominant"] for k, t in tracks.items()}
    assert all(float(r["first_seen"]) == tracks[int(r["track"])]["first_seen"] for r in summaries)

    status, out, _ = _run(["--every", "2", *weights, str(two_faces_clip)], capsys)
    header = next(line for line in out.splitlines() if "dominant" in line)
    assert header.split()[:8] == ["track", "first", "s", "last", "s", "seen", "s", "dominant"]
    assert sum(line.split()[0] in {str(k) for k in tracks} and "." in line for line in
               out.splitlines()[out.splitlines().index(header):]) == 2


def test_annotated_video_shows_track_ids_and_smoothed_labels(
    two_faces_clip: Path, video_recognizer: EmotionRecognizer, tmp_path: Path
) -> None:
    out = tmp_path / "annotated.avi"
    result = VideoRecognizer(video_recognizer).predict(two_faces_clip, every=3, annotate=out)
    capture = cv2.VideoCapture(str(out))
    original = cv2.VideoCapture(str(two_faces_clip))
    ok, drawn = capture.read()
    _, plain = original.read()
    assert ok and drawn.shape == plain.shape
    # The label's filled box sits above each face box, in the colour of its smoothed label.
    for face in result.frames[0].faces:
        x, y, w, _ = face.box
        patch = drawn[max(y - 12, 0) : y - 2, x + w - 8 : x + w - 2].reshape(-1, 3).astype(int)
        assert np.abs(patch - plain[max(y - 12, 0) : y - 2, x + w - 8 : x + w - 2].reshape(-1, 3)).mean() > 20


def test_stream_api_tracks_frames_given_one_at_a_time(two_faces_clip: Path, video_recognizer: EmotionRecognizer
                                                      ) -> None:
    stream = VideoRecognizer(video_recognizer).stream()
    capture = cv2.VideoCapture(str(two_faces_clip))
    tracks = []
    for i in range(10):
        ok, frame = capture.read()
        assert ok
        tracks.append(sorted(f.track for f in stream.update(frame, i / 10, color_order="bgr")))
    assert tracks[-1] == tracks[-2] and len({t for ids in tracks for t in ids}) <= 3


# ---------------------------------------------------------------------------------------------
# Bad video


def faceless_clip(path: Path, count: int = 60) -> Path:
    rng = np.random.default_rng(4)
    return write_video(path, [noisy(background(320, 240), rng) for _ in range(count)], fps=10)


def test_a_corrupt_or_truncated_file_gives_the_frames_read_and_says_n_of_m(
    video_recognizer: EmotionRecognizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mp4 = faceless_clip(tmp_path / "clip.mp4")
    data = bytearray(mp4.read_bytes())
    at, span = int(len(data) * 0.3), len(data) // 60  # a frame's worth of zeros, about frame 19: it no longer decodes
    data[at : at + span] = bytes(span)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(data)
    avi = faceless_clip(tmp_path / "clip.avi")
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(avi.read_bytes()[: avi.stat().st_size // 2])

    video = VideoRecognizer(video_recognizer)
    with pytest.warns(VideoWarning, match=r"truncated.avi: \d+ of 60 frames read \(it stops decoding after frame"):
        result = video.predict(truncated)
    read = len(result.frames)
    assert 10 < read < 60 and [f.frame for f in result.frames] == list(range(read))
    assert result.warnings == [f"{truncated}: {read} of 60 frames read (it stops decoding after frame {read - 1})"]

    status, out, err = _run(["--json", "--weights", str(video_recognizer.backend.path), str(corrupt)], capsys)
    [record] = json.loads(out)
    assert status == 0 and record["error"] is None
    missing = sorted(set(range(60)) - set(record["sampled_frames"]))
    assert 1 <= len(missing) <= 3 and record["sampled_frames"][-1] == 59  # frames after the bad one still read
    warning = f"{corrupt}: {60 - len(missing)} of 60 frames read ({len(missing)} did not decode)"
    assert record["warnings"] == [warning] and f"ferkit: warning: {warning}" in err


def test_empty_audio_only_and_unreadable_files_are_clear_errors(video_recognizer: EmotionRecognizer,
                                                                 tmp_path: Path) -> None:
    video = VideoRecognizer(video_recognizer)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty.mp4: empty file \(0 bytes\)"):
        video.predict(tmp_path / "empty.mp4")
    # An .mp4 whose one track is audio: the video track's handler says 'soun'.
    data = bytearray(faceless_clip(tmp_path / "clip.mp4", 5).read_bytes())
    handler = data.find(b"hdlr")
    kind = data.find(b"vide", handler)
    data[kind : kind + 4] = b"soun"
    (tmp_path / "audio.mp4").write_bytes(data)
    with pytest.raises(VideoError, match=r"audio\.mp4: cannot be opened as a video: no video stream"):
        video.predict(tmp_path / "audio.mp4")


def _box_path(data: bytes | bytearray, names: list[str]) -> list[int]:
    """Offsets of nested MP4 boxes, each looked for inside the one before."""
    offsets, pos, end = [], 0, len(data)
    for name in names:
        while pos < end:
            size, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == name.encode():
                offsets.append(pos)
                pos, end = pos + 8, pos + size
                break
            pos += size
        else:
            raise KeyError(name)
    return offsets


def test_a_rotated_phone_video_is_read_upright(video_recognizer: EmotionRecognizer, data_root: Path,
                                               tmp_path: Path) -> None:
    face = found_faces(video_recognizer, data_root, "happy", 1, 200)[0]
    upright = paste(background(480, 640), face, (140, 200, 200, 200))  # portrait 480 x 640
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # a phone stores it on its side, 640 x 480 ...
    data = bytearray(write_video(tmp_path / "phone.mp4", [stored] * 5, fps=10).read_bytes())
    tkhd = _box_path(data, ["moov", "trak", "tkhd"])[-1]
    matrix = tkhd + 8 + 4 + 20 + 8 + 8  # header, version and flags, v0 times and ids, reserved, layer..volume
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)  # ... and says "turn 90°"
    (tmp_path / "phone.mp4").write_bytes(data)
    frames = VideoRecognizer(video_recognizer).predict(tmp_path / "phone.mp4").frames
    assert len(frames) == 5
    assert all(len(f.faces) == 1 and iou(f.faces[0].box, (140, 200, 200, 200)) >= 0.5 for f in frames)


def test_variable_frame_rate_times_come_from_the_file(video_recognizer: EmotionRecognizer, tmp_path: Path) -> None:
    data = bytearray(faceless_clip(tmp_path / "clip.mp4", 20).read_bytes())
    path = _box_path(data, ["moov", "trak", "mdia", "minf", "stbl", "stts"])
    (old_size,) = struct.unpack(">I", data[path[-1] : path[-1] + 4])
    (count, delta) = struct.unpack(">II", data[path[-1] + 16 : path[-1] + 24])
    assert count == 20
    # 10 frames at twice the rate, 10 at two thirds of it: the same length in all.
    entries = [(10, delta // 2), (10, delta * 3 // 2)]
    stts = struct.pack(">I4sII", 16 + 8 * len(entries), b"stts", 0, len(entries))
    stts += b"".join(struct.pack(">II", *e) for e in entries)
    for parent in path[:-1]:  # moov comes after the frames here, so no chunk offset moves
        (size,) = struct.unpack(">I", data[parent : parent + 4])
        data[parent : parent + 4] = struct.pack(">I", size + len(stts) - old_size)
    data[path[-1] : path[-1] + old_size] = stts
    (tmp_path / "vfr.mp4").write_bytes(data)
    frames = VideoRecognizer(video_recognizer).predict(tmp_path / "vfr.mp4").frames
    expected = [i * 0.05 for i in range(10)] + [0.5 + i * 0.15 for i in range(10)]
    assert [f.time for f in frames] == pytest.approx(expected, abs=1e-3)


def test_every_and_smooth_options_are_checked(video_recognizer: EmotionRecognizer, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    clip = faceless_clip(tmp_path / "clip.avi", 3)
    status, _, err = _run(["--smooth", "-1", "--weights", str(video_recognizer.backend.path), str(clip)], capsys)
    assert status == 2 and "--smooth must be 0 (off) or more seconds" in err
    with pytest.raises(ValueError, match="smooth must be 0"):
        VideoRecognizer(video_recognizer, smooth=-0.5)
    assert isinstance(VideoRecognizer(video_recognizer).predict(clip).frames[0], FrameResult)


# ---------------------------------------------------------------------------------------------
# The service's streams (what the webcam page sends)


def test_the_service_tracks_and_smooths_the_frames_of_a_stream(two_faces_clip: Path,
                                                                video_recognizer: EmotionRecognizer) -> None:
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    import httpx

    from ferkit.serve import ServeConfig, create_app
    from serve_live import live_server

    capture = cv2.VideoCapture(str(two_faces_clip))
    jpegs = []
    for _ in range(6):
        ok, frame = capture.read()
        assert ok
        jpegs.append(cv2.imencode(".jpg", frame)[1].tobytes())
    offline = VideoRecognizer(video_recognizer).stream()
    # A client that keeps the session cookie (as a browser does): its own stream names are scoped to it.
    with live_server(create_app(ServeConfig(), video_recognizer)) as base, httpx.Client() as session:
        def send(stream: str, i: int, extra: str = "") -> Any:
            return session.post(f"{base}/v1/predict?stream={stream}&time={i / 10}{extra}",
                                files={"files": (f"{i}.jpg", jpegs[i])}, timeout=60)

        records = [send("cam-1", i).json()[0] for i in range(6)]
        assert send("other", 0).json()[0]["faces"][0]["track"] == 1  # each stream has its own tracks
        refused = httpx.post(f"{base}/v1/predict?stream=cam-1", timeout=60,
                             files=[("files", ("a.jpg", jpegs[0])), ("files", ("b.jpg", jpegs[1]))])
        assert refused.status_code == 422 and "one frame a request" in refused.json()["error"]
        assert httpx.post(f"{base}/v1/predict?stream=bad id!", files={"files": ("a.jpg", jpegs[0])},
                          timeout=60).status_code == 422
        plain = httpx.post(f"{base}/v1/predict", files={"files": ("a.jpg", jpegs[0])}, timeout=60).json()[0]
    assert all("track" not in face for face in plain["faces"])  # photos: no tracks, no smoothing
    for i, record in enumerate(records):
        # The same tracks and smoothed labels as the Python API's stream on the same decoded frames.
        image = cv2.imdecode(np.frombuffer(jpegs[i], np.uint8), cv2.IMREAD_COLOR)
        expected = offline.update(image, i / 10, color_order="bgr")
        assert [(f["track"], f["label"]) for f in record["faces"]] == [(f.track, f.label) for f in expected]
        for face, mine in zip(record["faces"], expected, strict=True):
            assert face["probabilities"] == pytest.approx(mine.probabilities, abs=1e-5)
            assert face["raw_probabilities"] == pytest.approx(mine.raw_probabilities, abs=1e-5)
