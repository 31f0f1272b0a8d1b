"""`ferkit.tracking` on rows alone: track ids, time-based smoothing, hysteresis and per-track summaries.

Boxes and probabilities are made here, so these tests run no model; `test_video.py` runs the same
code on videos of real faces.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from ferkit.labels import EMOTIONS
from ferkit.predict import FaceResult
from ferkit.tracking import FaceTracker, FrameResult, Smoother, Streams, Tracking, summarize_tracks, track_frames


def face(box: tuple[int, int, int, int], probabilities: np.ndarray) -> FaceResult:
    p = dict(zip(EMOTIONS, map(float, probabilities), strict=True))
    return FaceResult(box, p, max(p, key=lambda k: p[k]), 1.0)


def onehot(k: int, p: float = 0.9) -> np.ndarray:
    out = np.full(len(EMOTIONS), (1 - p) / (len(EMOTIONS) - 1))
    out[k] = p
    return out


def test_crossing_faces_keep_their_ids_and_a_returning_face_gets_its_own_back() -> None:
    rng = np.random.default_rng(0)
    tracker = FaceTracker(keep=1.5)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for i in range(60):  # 10 frames a second
        # a walks right for 3 s, is gone for 1 s, and comes back where it left; b walks left all along.
        # They cross at about frame 24, their boxes overlapping.
        positions = {"a": None if 30 <= i < 40 else (30 + 12 * min(i, 29), 60), "b": (600 - 12 * i, 150)}
        names = [name for name, at in positions.items() if at is not None]
        boxes = [(x + int(rng.integers(-3, 4)), y + int(rng.integers(-3, 4)), 120, 120)
                 for x, y in (positions[name] or (0, 0) for name in names)]
        for name, track in zip(names, tracker.update(i / 10, boxes), strict=True):
            seen[name].append(track)
    assert set(seen["a"]) == {1} and set(seen["b"]) == {2}


def test_a_face_gone_too_long_or_back_elsewhere_gets_a_new_id_and_ids_are_never_reused() -> None:
    tracker = FaceTracker(keep=1.0)
    assert tracker.update(0.0, [(100, 100, 100, 100)]) == [1]
    assert tracker.update(1.5, [(100, 100, 100, 100)]) == [2]  # unseen for 1.5 s > keep
    assert tracker.update(1.6, [(400, 300, 100, 100)]) == [3]  # elsewhere: someone else, maybe
    assert tracker.update(1.7, [(100, 100, 100, 100), (400, 300, 100, 100)]) == [2, 3]
    assert tracker.update(1.8, [(105, 100, 100, 100), (100, 300, 300, 300)]) == [2, 4]  # a different size
    assert tracker.update(5.0, []) == []
    assert tracker.update(5.1, [(100, 100, 100, 100)]) == [5]


def test_smoothing_is_the_mean_over_the_last_seconds_whatever_the_frame_rate() -> None:
    rng = np.random.default_rng(1)
    for fps in (5, 10, 25):
        smoother = Smoother(1.0)
        times = np.arange(0, 4, 1 / fps)
        history = [rng.dirichlet(np.ones(len(EMOTIONS))) for _ in times]
        for i, t in enumerate(times):
            expected = np.mean([h for s, h in zip(times, history, strict=True) if t - 1.0 < s <= t], axis=0)
            np.testing.assert_allclose(smoother.update(7, float(t), history[i]), expected)
    with pytest.raises(ValueError, match="0 \\(off\\) or more seconds"):
        Smoother(-1)


@pytest.mark.parametrize("fps", [5, 10, 30])
def test_a_change_of_expression_shows_within_the_window(fps: int) -> None:
    """Happy for 5 s, then surprise: the smoothed label follows within `smooth` seconds, at any frame rate."""
    happy, surprise = EMOTIONS.index("happy"), EMOTIONS.index("surprise")
    frames = [FrameResult(i, i / fps, [face((100, 100, 120, 120), onehot(happy if i / fps < 5 else surprise))])
              for i in range(10 * fps)]
    for smooth in (0.5, 1.0, 2.0):
        tracked = track_frames(frames, EMOTIONS, smooth=smooth)
        switched = next(f.time for f in tracked if f.faces[0].label == "surprise")
        assert 5.0 <= switched <= 5.0 + smooth
        after = [f for f in tracked if f.time >= 5.0 + smooth]
        assert all(f.faces[0].label == "surprise" for f in after)
        np.testing.assert_allclose([f.faces[0].probabilities["surprise"] for f in after], 0.9)


def test_hysteresis_stops_a_tie_from_flickering_and_raw_probabilities_are_kept() -> None:
    rng = np.random.default_rng(2)
    sad, neutral = EMOTIONS.index("sad"), EMOTIONS.index("neutral")
    frames = []
    for i in range(100):
        p = np.full(len(EMOTIONS), 0.02)
        p[sad] = p[neutral] = 0.45
        p[[sad, neutral]] += rng.normal(0, 0.05) * np.array([1, -1])
        frames.append(FrameResult(i, i / 10, [face((50, 50, 100, 100), p)]))

    def changes(tracked: list[FrameResult]) -> int:
        labels = [f.faces[0].label for f in tracked]
        return sum(a != b for a, b in pairwise(labels))

    raw = track_frames(frames, EMOTIONS, smooth=0)
    assert changes(raw) >= 20
    assert [f.faces[0].probabilities for f in raw] == [f.faces[0].raw_probabilities for f in raw]
    smoothed = track_frames(frames, EMOTIONS, smooth=1.0)
    assert changes(smoothed) <= 0.2 * changes(raw)
    assert [f.faces[0].raw_probabilities for f in smoothed] == [f.faces[0].probabilities for f in frames]


def test_summaries_weight_each_frame_by_its_time_and_name_the_dominant_emotion() -> None:
    happy, sad = EMOTIONS.index("happy"), EMOTIONS.index("sad")
    # Variable frame rate: 1 s of happy in 10 frames, then 3 s of sad in 6 frames.
    times = [i / 10 for i in range(10)] + [1.0 + i / 2 for i in range(6)]
    frames = [FrameResult(i, t, [face((10, 10, 80, 80), onehot(happy if t < 1 else sad))])
              for i, t in enumerate(times)]
    frames.append(FrameResult(16, 4.0, []))
    [summary] = summarize_tracks(track_frames(frames, EMOTIONS, smooth=0), EMOTIONS)
    assert (summary.track, summary.first_seen, summary.last_seen, summary.frames) == (1, 0.0, 3.5, 16)
    assert summary.seconds == pytest.approx(4.0)
    assert summary.shares["happy"] == pytest.approx(0.25) and summary.shares["sad"] == pytest.approx(0.75)
    assert summary.dominant == "sad" and sum(summary.shares.values()) == pytest.approx(1.0)
    assert summary.to_dict()["shares"]["sad"] == 0.75


def test_time_going_back_starts_over_with_new_ids() -> None:
    tracking = Tracking(EMOTIONS, smooth=1.0)
    first = tracking.update(10.0, [face((0, 0, 50, 50), onehot(0))])
    again = tracking.update(0.0, [face((0, 0, 50, 50), onehot(3))])
    assert (first[0].track, again[0].track) == (1, 2)
    assert again[0].label == EMOTIONS[3]  # no probabilities carried over from the old stream


def test_streams_keep_their_own_tracks_and_are_forgotten_when_idle_or_too_many() -> None:
    now = [0.0]
    streams = Streams(EMOTIONS, capacity=2, idle=60.0, clock=lambda: now[0])
    one = [face((10, 10, 80, 80), onehot(3))]
    assert streams.update("a", one, 0.0)[0].track == 1
    assert streams.update("b", one)[0].track == 1  # its own tracks
    now[0] = 1.0
    assert streams.update("a", one, 1.0)[0].track == 1
    assert streams.update("c", one)[0].track == 1  # a third stream: "b", the least recently used, goes
    assert list(streams.streams) == ["a", "c"]
    now[0] = 100.0  # both idle for more than 60 s
    streams.update("d", one)
    assert list(streams.streams) == ["d"]
