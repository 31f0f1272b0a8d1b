"""Faces over time: track ids, time-based smoothing and per-track summaries, as functions of rows.

A row is one face in one sampled frame, keyed by (frame, time, track); `FrameResult` holds the faces
of one frame. The CLI, the Python API and the service's webcam page all run the same `Tracking`
over their frames, so a track id and a smoothed label mean the same everywhere.

- Tracks (`FaceTracker`): each frame's boxes are matched to the live tracks with the Hungarian
  algorithm (scipy's `linear_sum_assignment`). A box matches a track whose predicted box (its last
  box moved by its velocity) overlaps it (IoU >= `min_iou`), or, failing that, a track whose last
  box is within `reach` face sides of it and of a similar size: a face that turns away or leaves the
  frame and comes back where it left within `keep` seconds gets its old id back. Later, or elsewhere,
  it gets a new id: without an appearance model, a face far from where it vanished could as well be
  someone else, and a new id is the honest answer. Ids start at 1 and are never reused.
  (Why not a library: norfair pins numpy < 2; supervision's ByteTrack brings PyAV, requests and
  PyYAML along and expects detector scores in [0, 1], which Haar's are not.)
- Smoothing (`Smoother`): a face's smoothed probabilities are the mean of its track's probabilities
  over the last `smooth` seconds (frames in (t - smooth, t]). Being in seconds, it behaves the same
  at any `--every` or frame rate, and a real change of expression is fully in the smoothed
  probabilities `smooth` seconds later, never later. The label is the smoothed one, with a little
  hysteresis: it moves to another emotion once that emotion's smoothed probability passes the
  current label's by `HYSTERESIS`, so a face whose probabilities sit at a tie between two emotions
  does not flicker between them. The raw probabilities stay in `raw_probabilities`. `smooth=0`
  turns all of this off.
- Summaries (`summarize_tracks`): per track, first and last seen, the time seen, each emotion's
  share of that time (by smoothed label) and the dominant emotion. Each sampled frame stands for
  the time until the next sampled frame, so a variable frame rate is weighted right.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

import numpy as np

from .errors import UsageError
from .faces import Box
from .predict import FaceResult

DEFAULT_SMOOTH = 1.0
"""Seconds of probabilities averaged per track for video and cameras (photos are never smoothed)."""
DEFAULT_KEEP = 1.5
"""Seconds a track waits, unseen, for its face to come back before it ends."""
HYSTERESIS = 0.05
"""How far another emotion's smoothed probability must pass the current label's to take its place."""


@dataclass(frozen=True)
class FrameResult:
    """The faces of one sampled frame; `time` in seconds from the start."""

    frame: int
    time: float
    faces: list[FaceResult]


@dataclass
class _Track:
    id: int
    box: Box
    time: float  # last seen
    velocity: tuple[float, float] = (0.0, 0.0)  # of the box's centre, pixels a second


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _centre(box: Box) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


class FaceTracker:
    """Gives each face box a track id that follows the same face from frame to frame (see the module)."""

    def __init__(self, keep: float = DEFAULT_KEEP, min_iou: float = 0.2, reach: float = 1.0,
                 max_size_ratio: float = 1.6) -> None:
        self.keep, self.min_iou, self.reach, self.max_size_ratio = keep, min_iou, reach, max_size_ratio
        self.tracks: list[_Track] = []
        self.next_id = 1

    def _predicted(self, track: _Track, time: float) -> Box:
        # Extrapolate at most a second: a face gone longer has not kept walking in a straight line.
        dt = min(time - track.time, 1.0)
        x, y, w, h = track.box
        return round(x + track.velocity[0] * dt), round(y + track.velocity[1] * dt), w, h

    def _cost(self, track: _Track, box: Box, time: float) -> float:
        overlap = max(iou(self._predicted(track, time), box), iou(track.box, box))
        if overlap >= self.min_iou:
            return 1.0 - overlap  # in [0, 1): any overlap beats a match by distance
        (tx, ty), (bx, by) = _centre(track.box), _centre(box)
        side = max(track.box[2], track.box[3], 1)
        ratio = max(box[2], 1) / max(track.box[2], 1)
        distance = float(np.hypot(bx - tx, by - ty)) / side
        if distance <= self.reach and 1 / self.max_size_ratio <= ratio <= self.max_size_ratio:
            return 1.0 + distance
        return np.inf

    def update(self, time: float, boxes: Sequence[Box]) -> list[int]:
        """Track ids for the boxes of the frame at `time` (seconds), in the boxes' order."""
        from scipy.optimize import linear_sum_assignment

        self.tracks = [t for t in self.tracks if time - t.time <= self.keep]
        cost = np.array([[self._cost(t, b, time) for b in boxes] for t in self.tracks]).reshape(len(self.tracks),
                                                                                                len(boxes))
        ids: list[int | None] = [None] * len(boxes)
        finite = np.where(np.isfinite(cost), cost, 1e6)
        for row, col in zip(*linear_sum_assignment(finite), strict=True):
            if np.isfinite(cost[row, col]):
                self._move(self.tracks[row], boxes[col], time, by_overlap=cost[row, col] < 1.0)
                ids[col] = self.tracks[row].id
        for col, box in enumerate(boxes):
            if ids[col] is None:
                self.tracks.append(_Track(self.next_id, box, time))
                ids[col] = self.next_id
                self.next_id += 1
        return [i for i in ids if i is not None]

    @staticmethod
    def _move(track: _Track, box: Box, time: float, by_overlap: bool) -> None:
        dt = time - track.time
        if by_overlap and dt > 0:
            (tx, ty), (bx, by) = _centre(track.box), _centre(box)
            # A running mean of the velocity: a detector's box jitters by a few pixels a frame.
            vx, vy = (bx - tx) / dt, (by - ty) / dt
            track.velocity = (0.5 * track.velocity[0] + 0.5 * vx, 0.5 * track.velocity[1] + 0.5 * vy)
        else:
            track.velocity = (0.0, 0.0)
        track.box, track.time = box, time

    def live(self) -> set[int]:
        """The ids of the tracks still waiting for their face."""
        return {t.id for t in self.tracks}


class Smoother:
    """Per-track mean of the probabilities over the last `seconds` seconds."""

    def __init__(self, seconds: float = DEFAULT_SMOOTH) -> None:
        if seconds < 0:
            raise UsageError(f"smoothing must be 0 (off) or more seconds, not {seconds}")
        self.seconds = seconds
        self.history: dict[int, deque[tuple[float, np.ndarray]]] = {}
        self.sums: dict[int, np.ndarray] = {}  # of each track's history: a mean costs the same for any window

    def update(self, track: int, time: float, probabilities: np.ndarray) -> np.ndarray:
        """The smoothed probabilities of `track` at `time`, this frame's `probabilities` included."""
        if self.seconds == 0:
            return probabilities
        history = self.history.setdefault(track, deque())
        total = self.sums.setdefault(track, np.zeros_like(probabilities, dtype=np.float64))
        history.append((time, probabilities))
        total += probabilities
        while history[0][0] <= time - self.seconds:
            total -= history.popleft()[1]
        return total / len(history)

    def keep_only(self, tracks: Iterable[int]) -> None:
        live = set(tracks)
        self.history = {k: v for k, v in self.history.items() if k in live}
        self.sums = {k: v for k, v in self.sums.items() if k in live}


@dataclass
class Tracking:
    """Tracks and smoothing for one stream of frames: what `ferkit predict` runs on a video and the page on a webcam.

    Times must not go back; a time earlier than the last one starts the stream over (a camera
    restarted, a looped file), with new track ids.
    """

    classes: Sequence[str]
    smooth: float = DEFAULT_SMOOTH
    keep: float = DEFAULT_KEEP
    hysteresis: float = HYSTERESIS
    tracker: FaceTracker = field(init=False)
    smoother: Smoother = field(init=False)
    labels: dict[int, int] = field(init=False)  # each track's current label
    last_time: float = field(init=False, default=-np.inf)

    def __post_init__(self) -> None:
        self.tracker = FaceTracker(self.keep)
        self.smoother = Smoother(self.smooth)
        self.labels = {}

    def update(self, time: float, faces: Sequence[FaceResult]) -> list[FaceResult]:
        """`faces` (one frame's, raw) with their track ids, smoothed probabilities and label."""
        if time < self.last_time:
            next_id = self.tracker.next_id
            self.__post_init__()
            self.tracker.next_id = next_id
        self.last_time = time
        ids = self.tracker.update(time, [face.box for face in faces])
        tracked = [self._smoothed(face, track, time) for face, track in zip(faces, ids, strict=True)]
        live = self.tracker.live()
        self.smoother.keep_only(live)
        self.labels = {k: v for k, v in self.labels.items() if k in live}
        return tracked

    def _smoothed(self, face: FaceResult, track: int, time: float) -> FaceResult:
        raw = np.array([face.probabilities[c] for c in self.classes], dtype=np.float64)
        smoothed = self.smoother.update(track, time, raw)
        if self.smooth == 0:
            return replace(face, track=track, raw_probabilities=face.probabilities)
        top, current = int(np.argmax(smoothed)), self.labels.get(track)
        label = current if current is not None and smoothed[top] - smoothed[current] < self.hysteresis else top
        self.labels[track] = label
        probabilities = dict(zip(self.classes, map(float, smoothed), strict=True))
        return replace(face, track=track, probabilities=probabilities, label=self.classes[label],
                       raw_probabilities=face.probabilities)

    def frame(self, frame: FrameResult) -> FrameResult:
        return FrameResult(frame.frame, frame.time, self.update(frame.time, frame.faces))


def track_frames(frames: Iterable[FrameResult], classes: Sequence[str], smooth: float = DEFAULT_SMOOTH,
                 keep: float = DEFAULT_KEEP, hysteresis: float = HYSTERESIS) -> list[FrameResult]:
    """Untracked frames (in time order) -> the same frames with track ids and smoothed labels."""
    tracking = Tracking(classes, smooth, keep, hysteresis)
    return [tracking.frame(frame) for frame in frames]


# ---------------------------------------------------------------------------------------------
# Summaries


@dataclass(frozen=True)
class TrackSummary:
    """One track over a video: when it was seen, for how long, and its emotions' shares of that time."""

    track: int
    first_seen: float
    last_seen: float
    frames: int
    seconds: float
    shares: dict[str, float]
    dominant: str

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        return {"track": self.track, "first_seen": round(self.first_seen, 3), "last_seen": round(self.last_seen, 3),
                "frames": self.frames, "seconds": round(self.seconds, 3), "dominant": self.dominant,
                "shares": {k: round(v, digits) for k, v in self.shares.items()}}


def frame_durations(frames: Sequence[FrameResult]) -> list[float]:
    """Seconds each sampled frame stands for: until the next one (the last: as long as the one before)."""
    times = [frame.time for frame in frames]
    gaps = [max(b - a, 0.0) for a, b in pairwise(times)]
    return [*gaps, gaps[-1]] if gaps else [0.0] * len(times)


def summarize_tracks(frames: Sequence[FrameResult], classes: Sequence[str]) -> list[TrackSummary]:
    """Per-track summaries of tracked frames, by track id."""
    summarizer = TrackSummarizer(classes)
    for frame in frames:
        summarizer.add(frame)
    return summarizer.summaries()


@dataclass
class _Seen:
    first: float
    last: float
    frames: int = 0
    seconds: float = 0.0
    label_seconds: dict[str, float] = field(default_factory=dict)
    label_frames: dict[str, int] = field(default_factory=dict)


class TrackSummarizer:
    """`summarize_tracks` one frame at a time, in memory per track rather than per frame (a long video streams).

    A frame stands for the time until the next one, so each frame is counted when the next arrives; the
    last one, in `summaries`, for as long as the one before it (`frame_durations`).
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.seen: dict[int, _Seen] = {}
        self.pending: FrameResult | None = None
        self.last_gap: float | None = None

    def add(self, frame: FrameResult) -> None:
        if self.pending is not None:
            self.last_gap = max(frame.time - self.pending.time, 0.0)
            self._count(self.pending, self.last_gap)
        self.pending = frame

    def _count(self, frame: FrameResult, duration: float) -> None:
        for face in frame.faces:
            if face.track is None:
                continue
            seen = self.seen.setdefault(face.track, _Seen(frame.time, frame.time))
            seen.last, seen.frames, seen.seconds = frame.time, seen.frames + 1, seen.seconds + duration
            seen.label_seconds[face.label] = seen.label_seconds.get(face.label, 0.0) + duration
            seen.label_frames[face.label] = seen.label_frames.get(face.label, 0) + 1

    def summaries(self) -> list[TrackSummary]:
        """The summaries of the frames added so far, by track id (the last frame counted once, here)."""
        seen = self.seen
        if self.pending is not None:
            saved = {k: replace(v, label_seconds=dict(v.label_seconds), label_frames=dict(v.label_frames))
                     for k, v in seen.items()}
            self._count(self.pending, self.last_gap or 0.0)
            seen, self.seen = self.seen, saved
        result = []
        for track, s in sorted(seen.items()):
            by_time = s.seconds > 0
            total = s.seconds if by_time else s.frames
            shares = {c: (s.label_seconds.get(c, 0.0) if by_time else s.label_frames.get(c, 0)) / total
                      for c in self.classes}
            result.append(TrackSummary(track, s.first, s.last, s.frames, s.seconds, shares,
                                       max(self.classes, key=lambda c: shares[c])))
        return result


class Streams:
    """Live streams' `Tracking` by stream id, for a server: at most `capacity`, each dropped after `idle` s unused.

    A stream's times are the caller's (seconds, say, since its camera started), else this clock's
    since the stream's first frame.
    """

    def __init__(self, classes: Sequence[str], smooth: float = DEFAULT_SMOOTH, capacity: int = 64,
                 idle: float = 60.0, clock: Any = None) -> None:
        import time

        self.classes, self.smooth, self.capacity, self.idle = classes, smooth, capacity, idle
        self.clock = clock or time.monotonic
        self.streams: OrderedDict[str, tuple[Tracking, float, float]] = OrderedDict()  # tracking, start, last use

    def update(self, stream: str, faces: Sequence[FaceResult], time: float | None = None) -> list[FaceResult]:
        """One frame's faces of `stream`, tracked and smoothed."""
        now = self.clock()
        while self.streams and next(iter(self.streams.values()))[2] < now - self.idle:
            self.streams.popitem(last=False)
        tracking, start, _ = self.streams.pop(stream) if stream in self.streams else (
            Tracking(self.classes, self.smooth), now, now)
        self.streams[stream] = (tracking, start, now)
        if len(self.streams) > self.capacity:
            self.streams.popitem(last=False)
        return tracking.update(now - start if time is None else time, faces)
