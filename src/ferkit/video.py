"""Video files and cameras: tracked faces with steady labels per sampled frame, annotated video, live camera.

Frames are read with OpenCV (its wheel bundles FFmpeg), which honours a phone video's rotation
metadata. Every `every`-th frame (0, every, 2 x every, ...) is run through the recognizer, and its
faces through `ferkit.tracking.Tracking`: a track id per face, probabilities smoothed over the
last `smooth` seconds. A frame's time is its timestamp in the file (so a variable frame rate is
right), else frame / fps. Frames that do not decode are skipped and counted; a file that stops
decoding part way gives the frames read and a warning saying how many of how many. An annotated
video keeps every frame, the input's size and frame rate, with the latest sampled frame's boxes,
track ids and smoothed labels drawn; it is written as MJPG in .avi or mp4v in .mp4.
"""

from __future__ import annotations

import os
import re
import sys
import time as clock
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .annotate import draw_results
from .errors import InputError, UsageError
from .images import ColorOrder, ImageInput
from .outputs import check_output_file
from .predict import EmotionRecognizer, FaceResult
from .tracking import DEFAULT_KEEP, DEFAULT_SMOOTH, FrameResult, Tracking, TrackSummary, summarize_tracks

# FFmpeg (inside OpenCV) prints its own messages about files it cannot read ("moov atom not found") straight to
# stderr; ferkit reports those files itself, one line each. OpenCV reads this when it first opens a video.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
FOURCC = {".avi": "MJPG", ".mp4": "mp4v"}
MAX_BAD_FRAMES_IN_A_ROW = 50
"""Undecodable frames skipped in a row before a file counts as ending there."""
COUNT_SLACK = 2
"""Frames a file may end short of its container's count unreported: some formats (MKV, WebM) only estimate it."""

__all__ = ["FaceStream", "FrameResult", "VideoError", "VideoReader", "VideoRecognizer", "VideoResult", "VideoWarning",
           "predict_video"]


class VideoError(InputError):
    """A video or camera that cannot be read, or an annotated video that cannot be written."""


class VideoWarning(UserWarning):
    """A video read only in part: frames that did not decode, or a file that stops part way."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int  # as the container says; 0 when unknown


def open_video(source: str | os.PathLike[str] | int) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video file or camera index, or raise VideoError naming it."""
    if not isinstance(source, int):
        if not Path(source).is_file():
            raise VideoError(f"{source}: no such file")
        if Path(source).stat().st_size == 0:
            raise VideoError(f"{source}: empty file (0 bytes)")
    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else str(source)
        raise VideoError(f"{what}: cannot be opened as a video: no video stream OpenCV can decode (not a video, "
                         "audio only, truncated, or a codec this OpenCV lacks)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     fps if fps and fps > 0 else 25.0, max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0))
    if not isinstance(source, int) and (info.width <= 0 or info.height <= 0):
        capture.release()
        raise VideoError(f"{source}: has no video stream (audio only?)")
    return capture, info


class VideoReader:
    """The decodable frames of a video file with their index and time; counts what it could not decode.

    Only frames 0, `every`, 2 x `every`, ... are yielded; the others are decoded (to count them and
    keep time) but not converted to BGR pixels, which is most of what `--every` saves on decoding.
    The array yielded is reused for the next frame: copy it to keep it.
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1) -> None:
        self.path, self.every = path, every
        self.capture, self.info = open_video(path)
        self.read = 0  # frames decoded
        self.bad = 0  # frames skipped because they did not decode
        self.attempts = 0
        self.last_index = -1  # of the last frame read

    def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
        frame: np.ndarray | None = None
        last_time, in_a_row = -1.0, 0
        try:
            while in_a_row < MAX_BAD_FRAMES_IN_A_ROW:
                wanted = self.attempts % self.every == 0
                ok = self.capture.grab()
                if ok and wanted:
                    ok, frame = self.capture.retrieve(frame)  # the same buffer every frame
                self.attempts += 1
                if not ok:
                    # A bad frame inside the file is skipped; past the container's count the file has ended.
                    if self.attempts > self.info.frames:
                        break
                    self.bad, in_a_row = self.bad + 1, in_a_row + 1
                    continue
                in_a_row = 0
                index = self.attempts - 1
                stamp = self.capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
                last_time = stamp if stamp > last_time else max(index / self.info.fps, last_time + 1e-3)
                self.read, self.last_index = self.read + 1, index
                if wanted:
                    assert frame is not None
                    yield index, last_time, frame
        finally:
            self.capture.release()
        if self.read == 0:
            raise VideoError(f"{self.path}: no frame could be decoded (not a video, or a codec this OpenCV lacks)")

    def problem(self) -> str | None:
        """What was lost, or None: "N of M frames read" when fewer were read than the container holds."""
        expected = self.info.frames
        if not expected or self.read >= expected:
            return None
        tail = expected - (self.last_index + 1)  # frames after the last one read
        inside = self.bad - (min(self.attempts, expected) - (self.last_index + 1))  # bad frames before it
        if inside <= 0 and tail <= COUNT_SLACK:
            return None
        reasons = [f"{inside} did not decode"] if inside > 0 else []
        if tail > 0:
            reasons.append(f"it stops decoding after frame {self.last_index}")
        return f"{self.path}: {self.read} of {expected} frames read ({', '.join(reasons)})"


def annotated_video_path(out: str | os.PathLike[str]) -> Path:
    """`out` if .avi or .mp4, else `out` with .avi appended."""
    out = Path(out)
    return out if out.suffix.lower() in FOURCC else out.with_name(out.name + ".avi")


def _warn(message: str) -> None:
    warnings.warn(message, VideoWarning, stacklevel=3)


def predict_video(
    recognizer: EmotionRecognizer,
    path: str | os.PathLike[str],
    every: int = 1,
    annotate: str | os.PathLike[str] | None = None,
    smooth: float = DEFAULT_SMOOTH,
    keep: float = DEFAULT_KEEP,
    warn: Callable[[str], None] = _warn,
) -> Iterator[FrameResult]:
    """Tracked, smoothed results for frames 0, every, 2 x every, ... of a video file.

    Writes the annotated video if asked. A file read only in part calls `warn` with what was lost
    (by default a `VideoWarning`) after its last frame.
    """
    if every < 1:
        raise UsageError(f"every must be at least 1, not {every}")
    reader = VideoReader(path, 1 if annotate is not None else every)
    tracking = Tracking(recognizer.classes, smooth, keep)
    writer = None
    latest: list[FaceResult] = []
    rgb: np.ndarray | None = None
    try:
        for index, time, frame in reader:
            if index % every == 0:
                # What `recognizer.predict(frame, color_order="bgr")` does, into one reused RGB buffer.
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB, dst=rgb)
                latest = tracking.update(time, recognizer.classify(recognizer.find_faces(rgb)))
                yield FrameResult(index, time, latest)
            if annotate is not None:
                if writer is None:
                    writer = _open_writer(annotate, reader.info.fps, frame.shape[1], frame.shape[0])
                writer.write(draw_results(frame, latest))
    finally:
        if writer is not None:
            writer.release()
    problem = reader.problem()
    if problem:
        warn(problem)


def _open_writer(out: str | os.PathLike[str], fps: float, width: int, height: int) -> cv2.VideoWriter:
    path = check_output_file(annotated_video_path(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*FOURCC[path.suffix.lower()]), fps, (width, height))
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write this video")
    return writer


@dataclass
class VideoResult:
    """A whole video: its tracked frames, a summary per track, and warnings about frames lost."""

    frames: list[FrameResult]
    tracks: list[TrackSummary]
    warnings: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    path: str | None = None

    def to_pandas(self) -> Any:
        """The frames as a pandas DataFrame: one row per face per sampled frame (`ferkit.records`' columns)."""
        from .records import frame_rows, path_identity, rows_frame

        return rows_frame(frame_rows(path_identity(self.path), self.frames), self.classes)

    def tracks_to_pandas(self) -> Any:
        """The track summaries as a pandas DataFrame, one row per track."""
        from .records import path_identity, rows_frame, summary_rows

        return rows_frame(summary_rows(path_identity(self.path), self.tracks), self.classes, summary=True)


class FaceStream:
    """Frames of a live stream (a camera, a video call) one at a time, tracked and smoothed."""

    def __init__(self, recognizer: EmotionRecognizer, smooth: float = DEFAULT_SMOOTH, keep: float = DEFAULT_KEEP
                 ) -> None:
        self.recognizer = recognizer
        self.tracking = Tracking(recognizer.classes, smooth, keep)
        self.start = clock.monotonic()

    def update(self, image: ImageInput, time: float | None = None, *, color_order: ColorOrder = "rgb"
               ) -> list[FaceResult]:
        """The faces of the next frame; `time` in seconds (default: since the stream began)."""
        time = clock.monotonic() - self.start if time is None else time
        return self.tracking.update(time, self.recognizer.predict(image, color_order=color_order))


class VideoRecognizer:
    """Tracked faces with steady labels in video files and live streams, beside `EmotionRecognizer`.

    >>> video = VideoRecognizer(smooth=1.0)                 # doctest: +SKIP
    >>> result = video.predict("interview.mp4", every=2)    # doctest: +SKIP
    >>> for track in result.tracks:                         # doctest: +SKIP
    ...     print(track.track, track.first_seen, track.last_seen, track.dominant)
    >>> stream = video.stream()                             # doctest: +SKIP
    >>> faces = stream.update(frame_bgr, color_order="bgr") # doctest: +SKIP

    `recognizer`: an `EmotionRecognizer` to share (its model and detector are used as they are);
    otherwise one is built from `recognizer_options`. `smooth`: seconds of probabilities averaged
    per track (0: off); `keep`: seconds a track waits for its face to come back.
    """

    def __init__(self, recognizer: EmotionRecognizer | None = None, *, smooth: float = DEFAULT_SMOOTH,
                 keep: float = DEFAULT_KEEP, **recognizer_options: Any) -> None:
        if smooth < 0:
            raise UsageError(f"smooth must be 0 (off) or more seconds, not {smooth}")
        self.recognizer = recognizer if recognizer is not None else EmotionRecognizer(**recognizer_options)
        self.classes = self.recognizer.classes
        self.smooth, self.keep = smooth, keep

    def frames(self, path: str | os.PathLike[str], every: int = 1, annotate: str | os.PathLike[str] | None = None,
               warn: Callable[[str], None] = _warn) -> Iterator[FrameResult]:
        """The tracked frames of a file as they are read (see `predict_video`)."""
        return predict_video(self.recognizer, path, every, annotate, self.smooth, self.keep, warn)

    def predict(self, path: str | os.PathLike[str], every: int = 1,
                annotate: str | os.PathLike[str] | None = None) -> VideoResult:
        """A whole file: frames, per-track summaries and warnings (also issued as `VideoWarning`)."""
        lost: list[str] = []

        def warn(message: str) -> None:
            lost.append(message)
            _warn(message)

        frames = list(self.frames(path, every, annotate, warn))
        return VideoResult(frames, summarize_tracks(frames, self.classes), lost, list(self.classes), str(path))

    def stream(self) -> FaceStream:
        """A new live stream with its own tracks."""
        return FaceStream(self.recognizer, self.smooth, self.keep)


def display_problem() -> str | None:
    """Why no window can be shown here, or None when one can."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY / WAYLAND_DISPLAY are unset)"
    if re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
        return ("this OpenCV has no GUI (opencv-python-headless, ferkit's default); "
                "`pip install opencv-python` for the live window")
    return None


def run_camera(recognizer: EmotionRecognizer, index: int = 0, every: int = 1, window: str = "ferkit",
               smooth: float = DEFAULT_SMOOTH) -> int:
    """Show camera `index` live with tracked boxes and smoothed labels until q or Esc; returns the frames shown."""
    problem = display_problem()
    if problem:
        raise VideoError(f"camera {index}: cannot show a live window: {problem}")
    capture, _ = open_video(index)
    stream = FaceStream(recognizer, smooth)
    latest: list[FaceResult] = []
    shown = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                if shown == 0:
                    raise VideoError(f"camera {index}: gives no frames")
                break
            if shown % max(every, 1) == 0:
                latest = stream.update(frame, color_order="bgr")
            cv2.imshow(window, draw_results(frame, latest))
            shown += 1
            key = cv2.waitKey(1) & 0xFF
            if key in (ord("q"), 27) or cv2.getWindowProperty(window, cv2.WND_PROP_VISIBLE) < 1:
                break
    finally:
        capture.release()
        cv2.destroyAllWindows()
    return shown
