"""The local engine: inputs -> a results table on disk (`ferkit predict --output`), on every core, resumable.

Photos stream through the workers (`ferkit.pool`: decode and detect, `ferkit.batches.find`) in input
order, and their faces through the model `CHUNK` photos at a time (`classify_found`) in this thread,
while the workers go on with the next photos. A video is read ahead in a thread of its own, its frames'
faces are found by the workers, classified `FRAME_BATCH` frames at a time, then tracked and smoothed in
order (`ferkit.tracking`); its rows go to the table as they are ready and its track summaries are counted
as it goes (`TrackSummarizer`), so memory does not grow with its length. Rows go to `ferkit.parts.Staging`,
which writes them in whole parts and merges them into the output at the end; with `resume`, inputs the
table holds already (same path, size and mtime) are skipped.

A video that fails part way keeps the rows of the frames read before, and a row with its error.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import cv2
import numpy as np

from .batches import INPUT_ERRORS, Found, ImageSource, VideoRows, classify_found, error_message, find
from .faces import Face, FaceDetector
from .parts import PART_ROWS, Staging
from .pool import Workers, default_workers, prefetch, shared_detector
from .predict import EmotionRecognizer
from .progress import Progress
from .records import Identity, error_row
from .sources import InputItem
from .tracking import DEFAULT_SMOOTH
from .video import VideoReader, open_video

CHUNK = 64
"""Photos whose faces go through the model together."""
FRAME_BATCH = 16
"""A video's frames whose faces go through the model together."""

T = TypeVar("T")


@dataclass
class Counts:
    """What a run did: inputs skipped (done already), done, failed and without a face; frames and faces."""

    inputs: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    faceless: int = 0
    frames: int = 0
    faces: int = 0
    warnings: list[str] = field(default_factory=list)


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _sampled_frames(item: InputItem, every: int) -> int:
    """The frames a video will sample, by its container's count (0 when unknown or unreadable)."""
    try:
        capture, info = open_video(item.path) if item.path is not None else (None, None)
    except INPUT_ERRORS:
        return 0
    if capture is None or info is None:
        return 0
    capture.release()
    return -(-info.frames // every)


class LocalEngine:
    """One run of `predict_table`: the recognizer, the workers, the staging table, progress and counts."""

    def __init__(self, recognizer: EmotionRecognizer, staging: Staging, workers: Workers, progress: Progress,
                 every: int, smooth: float) -> None:
        self.recognizer, self.staging, self.workers, self.progress = recognizer, staging, workers, progress
        self.every, self.smooth = every, smooth
        self.counts = Counts()

    def _find(self, source: ImageSource) -> Found:
        return find(self.recognizer, source, self.workers.detector())

    def images(self, items: Iterable[tuple[InputItem, Identity]]) -> None:
        """Photos (and arguments that failed), in order: found by the workers, classified a chunk at a time."""
        sources = (ImageSource(identity, item.path, error=item.error) for item, identity in items)
        for chunk in _batched(self.workers.ordered_map(self._find, sources, window=2 * CHUNK), CHUNK):
            rows = classify_found(self.recognizer, chunk)
            faces = sum(len(found.faces) for found in chunk)
            failed = sum(found.error is not None for found in chunk)
            self.counts.faces += faces
            self.counts.failed += failed
            self.counts.faceless += sum(found.error is None and not found.faces for found in chunk)
            self.staging.add(rows, complete=[(found.source.identity, "image") for found in chunk])
            for found in chunk:
                if found.error is not None:
                    self.progress.write(f"ferkit: {found.error}")
            self.progress.update(inputs=len(chunk), faces=faces)

    def _frame_faces(self, frame: tuple[int, float, np.ndarray]) -> tuple[int, float, list[Face]]:
        index, time, rgb = frame
        return index, time, self.recognizer.find_faces(rgb, detector=self.workers.detector())

    def video(self, item: InputItem, identity: Identity) -> None:
        """One video, its frames' rows streamed to the table, its track summaries at the end."""
        assert item.path is not None
        video = VideoRows(identity, self.recognizer.classes, self.smooth)
        try:
            reader = VideoReader(item.path, self.every)
            frames = prefetch(((index, time, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)) for index, time, bgr in reader),
                              size=2 * self.workers.count)
            found = self.workers.ordered_map(self._frame_faces, frames, window=2 * FRAME_BATCH)
            for chunk in _batched(found, FRAME_BATCH):
                results = iter(self.recognizer.classify([face for _, _, faces in chunk for face in faces]))
                rows = []
                for index, time, faces in chunk:
                    rows += video.frame(index, time, [next(results) for _ in faces])
                faces_done = sum(len(faces) for _, _, faces in chunk)
                self.counts.frames += len(chunk)
                self.counts.faces += faces_done
                self.staging.add(rows)
                self.progress.update(frames=len(chunk), faces=faces_done)
            problem = reader.problem()
            if problem:
                self.counts.warnings.append(problem)
                self.progress.write(f"ferkit: warning: {problem}")
            self.staging.add([], video.summary(), complete=[(identity, "video")])
        except INPUT_ERRORS as err:
            message = error_message(item.display, err)
            self.counts.failed += 1
            self.progress.write(f"ferkit: {message}")
            self.staging.add([error_row(identity, message)], complete=[(identity, "video")])
        self.progress.update(inputs=1, work=0)


def predict_table(
    recognizer: EmotionRecognizer,
    items: Sequence[InputItem],
    output: str | os.PathLike[str],
    *,
    summary: str | os.PathLike[str] | None = None,
    resume: bool = False,
    workers: int | None = None,
    every: int = 1,
    smooth: float = DEFAULT_SMOOTH,
    make_detector: Callable[[], FaceDetector | None] | None = None,
    progress: bool | None = None,
    part_rows: int = PART_ROWS,
) -> Counts:
    """Predict on `items` into the table `output` (its suffix picks the format) and track summaries into `summary`.

    `workers`: threads that decode and detect (default: the cores); `make_detector`: each one's detector
    (default: `pool.shared_detector`); `resume`: continue the table, skipping inputs it holds already;
    `progress`: a progress line on stderr (None: when stderr is a terminal); `part_rows`: rows a part holds.
    """
    staging = Staging(output, resume, summary, part_rows)
    todo = [(item, identity) for item in items if not staging.is_done(identity := item.identity())]
    counts_work = sum(1 if item.kind == "image" or item.error else _sampled_frames(item, every) for item, _ in todo)
    detectors = make_detector or shared_detector(recognizer)
    with Workers(workers or default_workers(), detectors) as pool, Progress(len(todo), counts_work, progress) as bar:
        staging.start(recognizer.classes)
        engine = LocalEngine(recognizer, staging, pool, bar, every, smooth)
        engine.counts.inputs, engine.counts.skipped = len(items), len(items) - len(todo)
        for is_video, group in itertools.groupby(todo, key=lambda pair: pair[0].kind == "video" and not pair[0].error):
            if is_video:
                for item, identity in group:
                    engine.video(item, identity)
            else:
                engine.images(group)
        staging.finish()
    engine.counts.done = len(todo)
    return engine.counts


def report(counts: Counts, detector: object | None) -> int:
    """The run's closing lines on stderr; the exit status (1 if any input failed)."""
    from .predict_files import small_faces_hint

    if counts.faceless and detector is not None:
        print(small_faces_hint(counts.faceless, detector), file=sys.stderr)
    if counts.skipped:
        print(f"ferkit: {counts.skipped} of {counts.inputs} inputs were in the table already (--resume)",
              file=sys.stderr)
    if counts.failed:
        print(f"ferkit: {counts.failed} of {counts.inputs} input{'s' * (counts.inputs != 1)} failed", file=sys.stderr)
    return 1 if counts.failed else 0
