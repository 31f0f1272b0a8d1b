"""Video files and cameras: emotions per sampled frame, annotated video, the live camera window.

Frames are read with OpenCV (its wheel bundles FFmpeg). Every `every`-th frame (0, every, 2 x every,
...) is run through the recognizer. An annotated video keeps every frame, the input's size and frame
rate, with the latest sampled frame's boxes drawn; it is written as MJPG in .avi or mp4v in .mp4.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2

from .annotate import draw_results
from .outputs import check_output_file
from .predict import EmotionRecognizer, FaceResult

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
FOURCC = {".avi": "MJPG", ".mp4": "mp4v"}


class VideoError(ValueError):
    """A video or camera that cannot be read, or an annotated video that cannot be written."""


@dataclass(frozen=True)
class FrameResult:
    """The faces of one sampled frame; `time` in seconds from the start (frame / fps)."""

    frame: int
    time: float
    faces: list[FaceResult]


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int  # as the container says; 0 when unknown


def open_video(source: str | os.PathLike[str] | int) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video file or camera index, or raise VideoError naming it."""
    if not isinstance(source, int) and not Path(source).is_file():
        raise VideoError(f"{source}: no such file")
    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else str(source)
        raise VideoError(f"{what}: cannot be opened as a video")
    fps = capture.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     fps if fps and fps > 0 else 25.0, max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0))
    return capture, info


def annotated_video_path(out: str | os.PathLike[str]) -> Path:
    """`out` if .avi or .mp4, else `out` with .avi appended."""
    out = Path(out)
    return out if out.suffix.lower() in FOURCC else out.with_name(out.name + ".avi")


def predict_video(
    recognizer: EmotionRecognizer,
    path: str | os.PathLike[str],
    every: int = 1,
    annotate: str | os.PathLike[str] | None = None,
) -> Iterator[FrameResult]:
    """Results for frames 0, every, 2 x every, ... of a video file; writes the annotated video if asked."""
    if every < 1:
        raise ValueError(f"every must be at least 1, not {every}")
    capture, info = open_video(path)
    writer = None
    latest: list[FaceResult] = []
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                latest = recognizer.predict(frame, color_order="bgr")
                yield FrameResult(index, index / info.fps, latest)
            if annotate is not None:
                if writer is None:
                    writer = _open_writer(annotate, info.fps, frame.shape[1], frame.shape[0])
                writer.write(draw_results(frame, latest))
            index += 1
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if index == 0:
        raise VideoError(f"{path}: no frame could be decoded (not a video, or a codec this OpenCV lacks)")


def _open_writer(out: str | os.PathLike[str], fps: float, width: int, height: int) -> cv2.VideoWriter:
    path = check_output_file(annotated_video_path(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*FOURCC[path.suffix.lower()]), fps, (width, height))
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write this video")
    return writer


def display_problem() -> str | None:
    """Why no window can be shown here, or None when one can."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY / WAYLAND_DISPLAY are unset)"
    if re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
        return ("this OpenCV has no GUI (opencv-python-headless, ferkit's default); "
                "`pip install opencv-python` for the live window")
    return None


def run_camera(recognizer: EmotionRecognizer, index: int = 0, every: int = 1, window: str = "ferkit") -> int:
    """Show camera `index` live with boxes and labels until q or Esc; returns the frames shown."""
    problem = display_problem()
    if problem:
        raise VideoError(f"camera {index}: cannot show a live window: {problem}")
    capture, _ = open_video(index)
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
                latest = recognizer.predict(frame, color_order="bgr")
            cv2.imshow(window, draw_results(frame, latest))
            shown += 1
            key = cv2.waitKey(1) & 0xFF
            if key in (ord("q"), 27) or cv2.getWindowProperty(window, cv2.WND_PROP_VISIBLE) < 1:
                break
    finally:
        capture.release()
        cv2.destroyAllWindows()
    return shown
