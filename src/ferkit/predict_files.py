"""`ferkit predict` over many inputs to stdout: one result or error per input, as a table, CSV or a JSON array.

Inputs are found by `ferkit.sources` (folders searched recursively, globs expanded). An input that fails
(no such file, not an image, corrupt, over the pixel limit, an empty folder, a glob matching nothing)
becomes a result with an error and the rest go on; a photo without faces is a result with no faces, not
an error. Results come out in input order, streamed as they are ready. (`--output FILE` writes a results
table instead: `ferkit.local`.)

A video's faces carry their frame, time and track id (`ferkit.tracking`), its labels are smoothed,
and each of its tracks is summed up: in the JSON under "tracks", in the CSV as one row per track
after the video's faces (`face` "summary", with `first_seen`, `last_seen` and `seconds`; `label`
the dominant emotion and the emotion columns each one's share of the time), and as a table.
A video read only in part (frames that do not decode) is reported with a warning, not an error.
With `tracks_only`, a video gives only its track summaries (table and CSV), not a row per frame.

An --annotate folder holds a marker file (`ferkit.sources.ANNOTATED_MARKER`), so that a folder search skips
annotated copies written inside an input folder on the next run.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np
from tqdm.auto import tqdm

from .annotate import annotated_image_path, write_annotated_image
from .errors import UsageError
from .faces import Face
from .images import ImageError
from .predict import EmotionRecognizer, FaceResult
from .sources import ANNOTATED_MARKER, InputItem, expand_inputs
from .tracking import DEFAULT_SMOOTH, FrameResult, TrackSummary, summarize_tracks
from .video import VideoError, annotated_video_path, open_video, predict_video

BOX_WIDTH = 25
"""The table's box column: room for 5-digit x and y (an 8000x6000 photo's boxes), then a space before the label."""
CHUNK = 256
"""Images whose faces go through the model together."""
PROBABILITY_DIGITS = 6
INPUT_ERRORS = (ImageError, VideoError, OSError, ValueError, cv2.error, MemoryError)
"""What one input may raise without stopping the others."""


@dataclass
class InputResult:
    """What came of one input: faces (each with its frame for a video) or an error."""

    item: InputItem
    faces: list[FaceResult] = field(default_factory=list)
    frames: list[FrameResult] | None = None
    size: tuple[int, int] | None = None  # width, height
    fps: float | None = None
    error: str | None = None
    annotated: Path | None = None
    tracks: list[TrackSummary] | None = None
    warnings: list[str] = field(default_factory=list)
    timeline: Path | None = None


class _Annotations:
    """Where annotated copies go: DIR/<relative path>, never over an input, never twice the same name."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.used: set[Path] = set()

    def target(self, item: InputItem, suffixer: Callable[[Path], Path]) -> Path | None:
        if self.folder is None or item.path is None:
            return None
        base = suffixer(self.folder / (item.relative or Path(item.path.name)))
        out, n = base, 1
        while out in self.used:
            n += 1
            out = base.with_name(f"{base.stem}-{n}{base.suffix}")
        if out.resolve() == item.path.resolve():
            raise UsageError(f"{item.display}: its annotated copy would overwrite it; choose another --annotate folder")
        self.used.add(out)
        return out


def run_inputs(
    recognizer: EmotionRecognizer,
    items: Sequence[InputItem],
    every: int = 1,
    annotate: str | Path | None = None,
    progress: bool = False,
    smooth: float = DEFAULT_SMOOTH,
    timeline: str | Path | None = None,
) -> Iterator[InputResult]:
    """Predict on every input, yielding results in input order; failures become results with an error.

    `timeline`: where each video's timeline PNG goes; with several videos, their names are added to it.
    """
    videos = sum(item.kind == "video" and item.error is None for item in items)
    annotations = _Annotations(Path(annotate) if annotate is not None else None)
    # Faces of up to CHUNK images go through the model together; an annotating run keeps each
    # image only until its faces are classified.
    chunk = 1 if annotate is not None else CHUNK
    pending: list[tuple[InputResult, list[Face], np.ndarray | None]] = []

    def flush() -> Iterator[InputResult]:
        classified = iter(recognizer.classify([face for _, faces, _ in pending for face in faces]))
        for result, faces, image in pending:
            if result.error is None:
                result.faces = [next(classified) for _ in faces]
                if image is not None:
                    try:
                        target = annotations.target(result.item, annotated_image_path)
                        result.annotated = write_annotated_image(image, result.faces, target) if target else None
                    except INPUT_ERRORS as err:
                        result.error = _message(result.item, err)
            yield result
        pending.clear()

    bar = tqdm(total=len(items), unit="input", file=sys.stderr, disable=not progress, delay=1.0, dynamic_ncols=True)
    with bar:
        for item in items:
            if item.error is not None:
                pending.append((InputResult(item, error=item.error), [], None))
            elif item.kind == "video":
                yield from flush()
                figure = timeline_path(timeline, item, several=videos > 1) if timeline is not None else None
                yield _run_video(recognizer, item, every, annotations, progress, smooth, figure)
            else:
                result = InputResult(item)
                faces: list[Face] = []
                image = None
                try:
                    assert item.path is not None
                    image = recognizer.load(item.path)
                    result.size = (image.shape[1], image.shape[0])
                    faces = recognizer.find_faces(image)
                except INPUT_ERRORS as err:
                    result.error, image = _message(item, err), None
                pending.append((result, faces, image if annotate is not None else None))
            bar.update(1)
            if len(pending) >= chunk:
                yield from flush()
        yield from flush()


def timeline_path(timeline: str | Path, item: InputItem, several: bool) -> Path:
    """`timeline`, or with several videos `timeline`'s stem, a dash and the video's name: out-clip.png."""
    path = Path(timeline)
    path = path if path.suffix else path.with_name(path.name + ".png")
    if not several or item.path is None:
        return path
    return path.with_name(f"{path.stem}-{item.path.stem}{path.suffix}")


def _run_video(
    recognizer: EmotionRecognizer, item: InputItem, every: int, annotations: _Annotations, progress: bool,
    smooth: float = DEFAULT_SMOOTH, timeline: Path | None = None,
) -> InputResult:
    assert item.path is not None
    result = InputResult(item, frames=[])
    try:
        capture, info = open_video(item.path)
        capture.release()
        result.size, result.fps = (info.width, info.height), info.fps
        result.annotated = annotations.target(item, annotated_video_path)
        total = -(-info.frames // every) if info.frames else None
        with tqdm(total=total, unit="frame", file=sys.stderr, disable=not progress, delay=1.0, leave=False,
                  desc=item.path.name) as bar:
            for frame in predict_video(recognizer, item.path, every, result.annotated, smooth,
                                       warn=result.warnings.append):
                assert result.frames is not None
                result.frames.append(frame)
                bar.update(1)
    except INPUT_ERRORS as err:
        result.error = _message(item, err)
    if result.frames:
        result.faces = [face for frame in result.frames for face in frame.faces]
        result.tracks = summarize_tracks(result.frames, recognizer.classes)
        if timeline is not None:
            from .plots import plot_timeline

            try:
                result.timeline = plot_timeline(result.frames, recognizer.classes, timeline, title=item.path.name)
            except INPUT_ERRORS as err:
                result.error = _message(item, err)
    return result


def _message(item: InputItem, err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if text.startswith(item.display) or text.startswith(str(item.path)) else f"{item.display}: {text}"


# ---------------------------------------------------------------------------------------------
# Output


def face_record(face: FaceResult, frame: FrameResult | None = None, digits: int = PROBABILITY_DIGITS
                ) -> dict[str, Any]:
    """One face as the --json records hold it (`ferkit serve` writes the same)."""
    record = face.to_dict(digits)
    if frame is not None:
        record = {"frame": frame.frame, "time": round(frame.time, 3), **record}
    return record


def json_record(result: InputResult, digits: int = PROBABILITY_DIGITS) -> dict[str, Any]:
    """One input as the --json array holds it: path, faces, error, then what else is known."""
    if result.frames is not None:
        faces = [face_record(face, frame, digits) for frame in result.frames for face in frame.faces]
    else:
        faces = [face_record(face, digits=digits) for face in result.faces]
    record: dict[str, Any] = {"path": result.item.display, "faces": faces, "error": result.error,
                              "type": result.item.kind if result.item.path is not None else None}
    if result.size is not None:
        record["width"], record["height"] = result.size
    if result.frames is not None:
        record["fps"] = result.fps
        record["sampled_frames"] = [frame.frame for frame in result.frames]
        record["tracks"] = [summary.to_dict() for summary in result.tracks or []]
        record["warnings"] = result.warnings
    if result.annotated is not None:
        record["annotated"] = str(result.annotated)
    if result.timeline is not None:
        record["timeline"] = str(result.timeline)
    return record


def _rows(result: InputResult) -> Iterator[tuple[FrameResult | None, int, FaceResult | None]]:
    """(frame, face number, face) per face; one row with no face per image or sampled frame without any."""
    if result.error is not None:
        yield None, 0, None
        return
    groups = [(frame, frame.faces) for frame in result.frames] if result.frames is not None else [
        (None, result.faces)]
    for frame, faces in groups:
        if not faces:
            yield frame, 0, None
        for number, face in enumerate(faces, start=1):
            yield frame, number, face


class Writer:
    """Streams results to `out` as a table, CSV or a JSON array."""

    def __init__(self, out: TextIO, fmt: str, classes: Sequence[str], items: Sequence[InputItem],
                 emit: Callable[[str], None] | None = None, tracks_only: bool = False) -> None:
        self.out, self.fmt, self.classes = out, fmt, list(classes)
        self.tracks_only = tracks_only
        self.emit = emit or (lambda line: print(line, file=out))
        self.count = 0
        self.path_width = min(max([len(i.display) for i in items] + [4]), 60)
        self.has_video = any(i.kind == "video" and i.path is not None for i in items)

    def start(self) -> None:
        if self.fmt == "json":
            self.out.write("[")
        elif self.fmt == "csv":
            self.csv = csv.writer(self.out, lineterminator="\n")
            summary = ["first_seen", "last_seen", "seconds"] if self.has_video else []
            self.csv.writerow(["path", "frame", "time", "track", "face", "x", "y", "w", "h", "label", "probability",
                               "score", *self.classes, "error", *summary])
        else:
            frame = f"{'frame':>7} {'track':>5} " if self.has_video else ""
            self.emit(f"{'path':<{self.path_width}} {frame}{'face':>4}  {'box (x, y, w, h)':<{BOX_WIDTH}} {'label':<9} "
                      f"{'p':>5} {'score':>6}")

    def add(self, result: InputResult) -> None:
        if self.fmt == "json":
            text = json.dumps(json_record(result))
            self.out.write(("\n" if self.count == 0 else ",\n") + text)
            self.out.flush()
        elif self.fmt == "csv":
            for frame, number, face in self._face_rows(result):
                self.csv.writerow(self._csv_row(result, frame, number, face))
            for summary in result.tracks or []:
                self.csv.writerow(self._csv_summary(result, summary))
            self.out.flush()
        else:
            if self._summary_only(result):
                sampled = len(result.frames or [])
                self.emit(f"{self._head(result, None, None)}{'-':>4}  {sampled} frame{'s' * (sampled != 1)} read, "
                          f"{len(result.tracks or [])} track{'s' * (len(result.tracks or []) != 1)}")
            for frame, number, face in self._face_rows(result):
                self.emit(self._table_row(result, frame, number, face))
            if result.tracks:
                for line in summary_table(result.tracks, self.classes):
                    self.emit("  " + line)
        self.count += 1

    def finish(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "]\n")
            self.out.flush()

    def _summary_only(self, result: InputResult) -> bool:
        return self.tracks_only and result.frames is not None and result.error is None

    def _face_rows(self, result: InputResult) -> Iterator[tuple[FrameResult | None, int, FaceResult | None]]:
        """`_rows`, or none for a video whose track summaries alone are wanted (`tracks_only`)."""
        return iter(()) if self._summary_only(result) else _rows(result)

    def _csv_row(self, result: InputResult, frame: FrameResult | None, number: int, face: FaceResult | None
                 ) -> list[Any]:
        row: list[Any] = [result.item.display, "" if frame is None else frame.frame,
                          "" if frame is None else round(frame.time, 3),
                          "" if face is None or face.track is None else face.track]
        if face is None:
            row += [""] * (8 + len(self.classes))
        else:
            row += [number, *face.box, face.label, round(face.probabilities[face.label], PROBABILITY_DIGITS),
                    "" if face.score is None else round(face.score, PROBABILITY_DIGITS),
                    *(round(face.probabilities[c], PROBABILITY_DIGITS) for c in self.classes)]
        return [*row, result.error or "", *([""] * 3 if self.has_video else [])]

    def _csv_summary(self, result: InputResult, track: TrackSummary) -> list[Any]:
        shares = [round(track.shares[c], PROBABILITY_DIGITS) for c in self.classes]
        return [result.item.display, "", "", track.track, "summary", "", "", "", "", track.dominant,
                round(track.shares[track.dominant], PROBABILITY_DIGITS), "", *shares, "",
                round(track.first_seen, 3), round(track.last_seen, 3), round(track.seconds, 3)]

    def _head(self, result: InputResult, frame: FrameResult | None, face: FaceResult | None) -> str:
        path = result.item.display
        if len(path) > self.path_width:
            path = "..." + path[-(self.path_width - 3):]
        track = "" if face is None or face.track is None else face.track
        return f"{path:<{self.path_width}} " + (f"{'' if frame is None else frame.frame:>7} {track:>5} "
                                                if self.has_video else "")

    def _table_row(self, result: InputResult, frame: FrameResult | None, number: int, face: FaceResult | None
                   ) -> str:
        head = self._head(result, frame, face)
        if result.error is not None:
            return f"{head}{'-':>4}  error: {result.error}"
        if face is None:
            return f"{head}{'-':>4}  no face"
        box = ", ".join(map(str, face.box))
        score = "" if face.score is None else f"{face.score:.2f}"
        return (f"{head}{number:>4}  {box:<{BOX_WIDTH}} {face.label:<9} {face.probabilities[face.label]:>5.2f} "
                f"{score:>6}")


def summary_table(tracks: Sequence[TrackSummary], classes: Sequence[str]) -> list[str]:
    """Per-track summaries as text lines: seen from, until, for how long, dominant emotion, shares of time."""
    shares = " ".join(f"{c[:8]:>8}" for c in classes)
    lines = [f"{'track':>5} {'first s':>8} {'last s':>8} {'seen s':>8}  {'dominant':<9} {shares}"]
    for t in tracks:
        values = " ".join(f"{t.shares[c]:>8.2f}" for c in classes)
        lines.append(f"{t.track:>5} {t.first_seen:>8.2f} {t.last_seen:>8.2f} {t.seconds:>8.2f}  {t.dominant:<9} "
                     f"{values}")
    return lines


def predict_command(
    recognizer: EmotionRecognizer,
    arguments: Sequence[str],
    fmt: str = "table",
    every: int = 1,
    annotate: str | None = None,
    progress: bool | None = None,
    out: TextIO | None = None,
    smooth: float = DEFAULT_SMOOTH,
    timeline: str | None = None,
    tracks_only: bool = False,
) -> int:
    """`ferkit predict PATH...`: write every input's result to `out`; 1 if any input failed, else 0.

    Failures also go to stderr, one line each, when stdout is for machines (CSV, JSON); warnings
    (a video read only in part, --timeline without a video) and a hint where photos had no face found
    always do, once each.
    """
    if every < 1:
        raise UsageError(f"--every must be at least 1, not {every}")
    if smooth < 0:
        raise UsageError(f"--smooth must be 0 (off) or more seconds, not {smooth}")
    if tracks_only and fmt == "json":
        raise UsageError("--tracks-only is for the table and CSV; the JSON records always hold the tracks")
    if annotate is not None:
        prepare_annotate_folder(Path(annotate))
    out = out or sys.stdout
    items = expand_inputs(arguments)
    if timeline is not None and not any(item.kind == "video" and item.error is None for item in items):
        print("ferkit: warning: --timeline draws videos' tracks, and no input is a video: no timeline is written",
              file=sys.stderr)
    show_progress = sys.stderr.isatty() if progress is None else progress
    emit = (lambda line: tqdm.write(line, file=out)) if show_progress else None
    writer = Writer(out, fmt, recognizer.classes, items, emit, tracks_only)
    failed = faceless = 0
    writer.start()
    try:
        for result in run_inputs(recognizer, items, every, annotate, show_progress, smooth, timeline):
            writer.add(result)
            for warning in result.warnings:
                print(f"ferkit: warning: {warning}", file=sys.stderr)
            if result.error is not None:
                failed += 1
                if fmt != "table":
                    print(f"ferkit: {result.error}", file=sys.stderr)
            elif result.frames is None and not result.faces:
                faceless += 1
    finally:
        writer.finish()
    if faceless and recognizer.detector is not None:
        print(small_faces_hint(faceless, recognizer.detector), file=sys.stderr)
    if failed:
        print(f"ferkit: {failed} of {len(items)} input{'s' * (len(items) != 1)} failed", file=sys.stderr)
    return 1 if failed else 0


def prepare_annotate_folder(folder: Path) -> None:
    """Make the --annotate folder with its marker (`ANNOTATED_MARKER`), or UsageError before any work: a file
    there, or a folder that cannot be made."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--annotate {folder}: a file is there; give a folder for the annotated copies")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ANNOTATED_MARKER).touch()
    except OSError as err:
        raise UsageError(f"--annotate {folder}: cannot write there ({err.strerror or err})") from None


def small_faces_hint(faceless: int, detector: object) -> str:
    """One note for all the photos without a face: small faces are missed, and the options that find them."""
    photos = f"{faceless} photo{'s' * (faceless != 1)}"
    min_face = getattr(detector, "min_face", None)
    if min_face is None:  # a detector of the caller's own, whose settings are not ours to name
        return f"ferkit: note: no face found in {photos}"
    max_side = getattr(detector, "detect_max_side", None)
    shrink = (f" or a larger --detect-max-side (now {max_side}: photos are searched shrunk to this longer side; 0: "
              "at full size)") if max_side else ""
    return (f"ferkit: note: no face found in {photos}; if the faces are small, try a lower --min-face (now {min_face} "
            f"px: smaller faces are dropped){shrink}")
