"""Face records as table rows: the one schema that every writer, both engines and `.to_pandas()` share.

The contract (the local engine, the Ray engine and the Python API all build their rows here, so their
tables are the same by construction):

- A row is a `dict[str, Any]` keyed by `columns(classes)`; `schema(classes)` is its pyarrow schema and
  `to_table(rows, classes)` the rows as a pyarrow Table of that schema (missing keys are null).
- The face table has one row per face (per face per sampled frame for a video). An input with an error,
  a photo without a face and a sampled frame without a face are each one row whose face columns are null.
  Columns, in order: `path` (the input as given or found in a folder: the table's key), `frame`, `time`
  (null for photos), `track` (video), `face` (1, 2, ... within its photo or frame; null on a row without a
  face), `x, y, w, h`, `label`, `probability` (the label's), `score` (the detector's), one column per
  emotion (smoothed for video, as `label`), `error`, `raw_<emotion>` per emotion (video: this frame's own
  probabilities; null for photos), the five landmarks as `<name>_x, <name>_y` (`ferkit.faces.LANDMARKS`),
  then the input's identity: `file_size` (bytes) and `file_mtime_ns` (modification time), which resume
  compares to know an input already done. Probabilities are float64, pixel and count columns int64.
- Video track summaries are their own table (`summary_columns`, `summary_schema`, `summary_rows`): one
  row per track with `path, track, first_seen, last_seen, frames, seconds, dominant`, each emotion's
  share of the time, and the identity columns.
- `Identity` names an input in the table (path, size, mtime); `identify(path)` stats a file for it.

Processing a batch of photos into these rows is `ferkit.batches.image_rows` (what the Ray actor calls);
writing them to a file by suffix is `ferkit.writers`; reading a table back is `ferkit.read_results`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .faces import LANDMARKS

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

Row = dict[str, Any]


# What rows are built from, by shape: `ferkit.predict.FaceResult`, `ferkit.tracking.FrameResult` and
# `TrackSummary` (records sit below them, so that their `.to_pandas()` can build rows here).
class FaceResult(Protocol):
    @property
    def box(self) -> tuple[int, int, int, int]: ...
    @property
    def probabilities(self) -> dict[str, float]: ...
    @property
    def label(self) -> str: ...
    @property
    def score(self) -> float | None: ...
    @property
    def track(self) -> int | None: ...
    @property
    def raw_probabilities(self) -> dict[str, float] | None: ...
    @property
    def landmarks(self) -> dict[str, tuple[float, float]] | None: ...


class FrameResult(Protocol):
    @property
    def frame(self) -> int: ...
    @property
    def time(self) -> float: ...
    @property
    def faces(self) -> Sequence[FaceResult]: ...


class TrackSummary(Protocol):
    @property
    def track(self) -> int: ...
    @property
    def first_seen(self) -> float: ...
    @property
    def last_seen(self) -> float: ...
    @property
    def frames(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def shares(self) -> dict[str, float]: ...
    @property
    def dominant(self) -> str: ...

PROBABILITY_DIGITS = 6
"""Probabilities in rows are rounded to this many digits, as in the CSV and JSON before tables."""

HEAD = ("path", "frame", "time", "track", "face", "x", "y", "w", "h", "label", "probability", "score")
IDENTITY = ("file_size", "file_mtime_ns")
LANDMARK_COLUMNS = tuple(f"{name}_{axis}" for name in LANDMARKS for axis in ("x", "y"))
_INTS = frozenset({"frame", "track", "face", "x", "y", "w", "h", "file_size", "file_mtime_ns", "frames"})
_STRINGS = frozenset({"path", "label", "error", "dominant"})


@dataclass(frozen=True)
class Identity:
    """An input as the table knows it: its path (as given), and its file's size and mtime (None if unreadable)."""

    path: str | None
    size: int | None = None
    mtime_ns: int | None = None

    def columns(self) -> Row:
        return {"path": self.path, "file_size": self.size, "file_mtime_ns": self.mtime_ns}


def identify(path: str | os.PathLike[str], display: str | None = None) -> Identity:
    """The identity of a file: `display` (default: `path` as a string), its size and mtime; None ones if unstat-able."""
    try:
        info = os.stat(path)
    except OSError:
        return Identity(display if display is not None else str(path))
    return Identity(display if display is not None else str(path), info.st_size, info.st_mtime_ns)


def columns(classes: Sequence[str]) -> list[str]:
    """The face table's columns in order (see the module)."""
    return [*HEAD, *classes, "error", *(f"raw_{c}" for c in classes), *LANDMARK_COLUMNS, *IDENTITY]


def summary_columns(classes: Sequence[str]) -> list[str]:
    """The track summary table's columns in order."""
    return ["path", "track", "first_seen", "last_seen", "frames", "seconds", "dominant", *classes, *IDENTITY]


def _arrow_schema(names: Sequence[str], classes: Sequence[str]) -> pa.Schema:
    import pyarrow as pa

    def kind(name: str) -> pa.DataType:
        return pa.int64() if name in _INTS else pa.string() if name in _STRINGS else pa.float64()

    return pa.schema([pa.field(name, kind(name)) for name in names], metadata={"ferkit.classes": ",".join(classes)})


def schema(classes: Sequence[str]) -> pa.Schema:
    """The face table's pyarrow schema; its metadata names the classes (`ferkit.classes`)."""
    return _arrow_schema(columns(classes), classes)


def summary_schema(classes: Sequence[str]) -> pa.Schema:
    """The track summary table's pyarrow schema."""
    return _arrow_schema(summary_columns(classes), classes)


def classes_of(names: Sequence[str]) -> list[str]:
    """The emotion classes of a table from its column names (those between `score`/`dominant` and what follows)."""
    names = list(names)
    if "score" in names and "error" in names:
        return names[names.index("score") + 1 : names.index("error")]
    if "dominant" in names and "file_size" in names:
        return names[names.index("dominant") + 1 : names.index("file_size")]
    raise ValueError(f"not a ferkit results table: columns {names[:8]}...")


def _round(value: float) -> float:
    return round(float(value), PROBABILITY_DIGITS)


def face_row(identity: Identity, face: FaceResult | None, number: int | None = None, frame: int | None = None,
             time: float | None = None, error: str | None = None) -> Row:
    """One row: a face (with its number in its photo or frame), or None for a row without a face."""
    row: Row = {**identity.columns(), "frame": frame, "time": None if time is None else round(time, 3),
                "error": error}
    if face is None:
        return row
    row.update(face=number, x=face.box[0], y=face.box[1], w=face.box[2], h=face.box[3], label=face.label,
               probability=_round(face.probabilities[face.label]), score=face.score, track=face.track)
    row.update({c: _round(p) for c, p in face.probabilities.items()})
    if face.raw_probabilities is not None:
        row.update({f"raw_{c}": _round(p) for c, p in face.raw_probabilities.items()})
    for name, (x, y) in (face.landmarks or {}).items():
        row[f"{name}_x"], row[f"{name}_y"] = float(x), float(y)
    return row


def face_rows(identity: Identity, faces: Sequence[FaceResult], frame: int | None = None, time: float | None = None
              ) -> list[Row]:
    """The rows of one photo or sampled frame: one per face, or one without a face when it has none."""
    if not faces:
        return [face_row(identity, None, frame=frame, time=time)]
    return [face_row(identity, face, n, frame, time) for n, face in enumerate(faces, start=1)]


def error_row(identity: Identity, error: str) -> Row:
    """The one row of an input that failed."""
    return face_row(identity, None, error=error)


def frame_rows(identity: Identity, frames: Iterable[FrameResult]) -> list[Row]:
    """The rows of a video's sampled frames (tracked: `track` and `raw_*` set)."""
    return [row for frame in frames for row in face_rows(identity, frame.faces, frame.frame, frame.time)]


def summary_rows(identity: Identity, tracks: Iterable[TrackSummary]) -> list[Row]:
    """One row per track summary of a video."""
    return [{**identity.columns(), "track": t.track, "first_seen": round(t.first_seen, 3),
             "last_seen": round(t.last_seen, 3), "frames": t.frames, "seconds": round(t.seconds, 3),
             "dominant": t.dominant, **{c: _round(p) for c, p in t.shares.items()}} for t in tracks]


def to_table(rows: Sequence[Row], classes: Sequence[str], summary: bool = False) -> pa.Table:
    """Rows as a pyarrow Table of the face (or summary) schema; keys a row lacks are null."""
    import pyarrow as pa

    return pa.Table.from_pylist(list(rows), schema=summary_schema(classes) if summary else schema(classes))


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """A results table as pandas with the dtypes `read_results` promises: int64 columns as nullable Int64
    (a photo has no frame), strings as pandas' string dtype, probabilities and times as float64."""
    import pandas as pd
    import pyarrow as pa

    mapping = {pa.int64(): pd.Int64Dtype(), pa.string(): pd.StringDtype(), pa.large_string(): pd.StringDtype()}
    return table.to_pandas(types_mapper=mapping.get)


def rows_frame(rows: Sequence[Row], classes: Sequence[str], summary: bool = False) -> pd.DataFrame:
    """Rows straight to a DataFrame (what `.to_pandas()` on results returns)."""
    return to_pandas(to_table(rows, classes, summary))


def path_identity(source: object) -> Identity:
    """The identity of a predict call's input: a file path's, else one without a path (an array, a PIL image)."""
    if isinstance(source, (str, os.PathLike)):
        return identify(Path(source), str(source))
    return Identity(None)
