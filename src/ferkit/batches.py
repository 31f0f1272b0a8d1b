"""A batch of photos -> their table rows: read and detect each (`find`), then one model call for all (`classify_found`).

`image_rows(recognizer, sources)` is the whole step; the local engine runs `find` in a pool of workers and
`classify_found` on batches of what they found, and the Ray engine's actor calls `image_rows` in its
`__call__`, so both write the rows `ferkit.records` builds, from the same code. A photo that cannot be
read becomes one row with its error; the others go on. A video's frames become rows through `VideoRows`,
in both engines alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2

from .faces import Face, FaceDetector
from .images import ImageError, decode_image_bytes
from .predict import EmotionRecognizer, FaceResult
from .records import Identity, Row, error_row, face_rows, summary_rows
from .tracking import FrameResult, Tracking, TrackSummarizer
from .video import VideoError

INPUT_ERRORS = (ImageError, VideoError, OSError, ValueError, cv2.error, MemoryError)
"""What one input may raise without stopping the others."""


@dataclass(frozen=True)
class ImageSource:
    """A photo to read: its identity in the table, and its file or its bytes (`error`: an argument that failed)."""

    identity: Identity
    file: str | os.PathLike[str] | None = None
    data: bytes | None = None
    error: str | None = None


@dataclass
class Found:
    """A photo read and searched: its faces (crops ready for the model) and its size, or its error."""

    source: ImageSource
    faces: list[Face] = field(default_factory=list)
    size: tuple[int, int] | None = None  # width, height
    error: str | None = None


def error_message(where: str | None, err: BaseException) -> str:
    """An input's error as one line that starts with the input's name."""
    text = str(err) or type(err).__name__
    return text if where is None or text.startswith(where) else f"{where}: {text}"


def find(recognizer: EmotionRecognizer, source: ImageSource, detector: FaceDetector | None = None) -> Found:
    """Decode a photo and find its faces; errors are kept in the result, never raised.

    `detector`: the calling worker's own (a detector serves one thread at a time); None: the recognizer's.
    """
    if source.error is not None:
        return Found(source, error=source.error)
    try:
        if source.data is not None:
            image = decode_image_bytes(source.data, source.identity.path or "<bytes>", recognizer.max_pixels)[0]
        else:
            assert source.file is not None, "an ImageSource needs a file or data"
            image = recognizer.load(source.file)
        return Found(source, recognizer.find_faces(image, detector=detector), (image.shape[1], image.shape[0]))
    except INPUT_ERRORS as err:
        return Found(source, error=error_message(source.identity.path, err))


def classify_found(recognizer: EmotionRecognizer, found: Sequence[Found]) -> list[Row]:
    """The rows of photos already searched, their faces through the model in one call, in their order."""
    results = iter(recognizer.classify([face for item in found for face in item.faces]))
    rows: list[Row] = []
    for item in found:
        if item.error is not None:
            rows.append(error_row(item.source.identity, item.error))
        else:
            rows += face_rows(item.source.identity, [next(results) for _ in item.faces])
    return rows


def image_rows(recognizer: EmotionRecognizer, sources: Sequence[ImageSource], detector: FaceDetector | None = None
               ) -> list[Row]:
    """The rows of a batch of photos, in their order: each decoded and searched, then one model call for all."""
    return classify_found(recognizer, [find(recognizer, source, detector) for source in sources])


class VideoRows:
    """One video's classified frames -> its rows, in frame order: faces tracked and smoothed, and each track's
    summary counted as it goes (`summary()` at the end), so neither engine keeps a video's frames."""

    def __init__(self, identity: Identity, classes: Sequence[str], smooth: float) -> None:
        self.identity = identity
        self.tracking = Tracking(list(classes), smooth)
        self.summarizer = TrackSummarizer(list(classes))

    def frame(self, index: int, time: float, faces: Sequence[FaceResult]) -> list[Row]:
        """The rows of one frame's faces (one row without a face where it has none)."""
        tracked = self.tracking.update(time, list(faces))
        self.summarizer.add(FrameResult(index, time, tracked))
        return face_rows(self.identity, tracked, index, time)

    def summary(self) -> list[Row]:
        """One row per track: when it was seen and each emotion's share of its time."""
        return summary_rows(self.identity, self.summarizer.summaries())
