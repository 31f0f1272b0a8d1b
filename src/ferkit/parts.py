"""A results table written in parts while it runs, resumable after any kill, merged into one file at the end.

While `ferkit predict --output OUT` runs, rows go to `OUT.parts/`, a folder of Parquet files each written to
a temporary name and renamed, so a part on disk is always whole (a kill leaves at most a temporary file,
which is discarded). Each part records, in its metadata, the inputs it completes (path, size, mtime): a
photo's rows and its completion are always in the same part; a video's rows may span several parts and
count only once a part of the same run marks it complete. At the end the parts are merged, streaming, into
OUT (its suffix picks the format; atomically, by rename) and the folder is removed.

Resume (`Staging(..., resume=True)`): inputs complete in OUT or in whole parts, with the same size and
mtime, are skipped; one whose file changed is done again, and its earlier rows are dropped (the run's
`run-R.json` lists it). Each input's rows come from one place only, so the merged table holds every input
exactly once. A crash between the final rename and the folder's removal is recognised by the renamed
file's inode (`merged.json`) and not merged twice. `whole_tables` reads what an unfinished run has done so
far (what `ferkit.read_results` shows for it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .outputs import atomic_write, check_output_file, write_text_atomic
from .records import Identity, Row, schema, summary_schema, to_table
from .writers import iter_batches, open_writer, table_format

if TYPE_CHECKING:
    import pyarrow as pa

PART_ROWS = 4096
"""Rows buffered before a part is written."""
PART_SECONDS = 20.0
"""...or seconds since the last part: what a kill can cost is bounded in time too."""
DONE_KEY = b"ferkit.done"
PART = re.compile(r"^(faces|tracks)-(\d{4})-(\d{6})\.parquet$")


def parts_folder(output: str | os.PathLike[str]) -> Path:
    """Where `output`'s parts go while a run writes it."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


@dataclass
class _Part:
    path: Path
    kind: str  # "faces" or "tracks"
    run: int
    done: list[tuple[str, int | None, int | None, str]] = field(default_factory=list)  # path, size, mtime, kind


def _parts(folder: Path) -> list[_Part]:
    import pyarrow.parquet as pq

    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = PART.match(path.name)
        if match:
            metadata = pq.read_schema(path).metadata or {}
            done = [tuple(entry) for entry in json.loads(metadata.get(DONE_KEY, b"[]"))]
            found.append(_Part(path, match[1], int(match[2]), done))
    return found


def _redone(folder: Path) -> dict[int, set[str]]:
    """Each run's inputs done again because their file changed since an earlier run completed them."""
    runs = {}
    for path in folder.glob("run-*.json"):
        try:
            runs[int(path.stem[4:])] = set(json.loads(path.read_text())["redo"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue  # a torn run file: its run wrote no part yet (it is written before any)
    return runs


class _Plan:
    """Which rows of which source belong to the merged table (see the module)."""

    def __init__(self, folder: Path) -> None:
        self.parts = _parts(folder)
        self.redone = _redone(folder)
        self.videos_done: dict[int, set[str]] = {}
        for part in self.parts:
            if part.kind == "faces":
                self.videos_done.setdefault(part.run, set()).update(p for p, _, _, kind in part.done if kind == "video")

    def dropped_later(self, run: int) -> set[str]:
        """Paths whose rows from `run` (0: the existing OUT) a later run replaces."""
        return set().union(*(paths for r, paths in self.redone.items() if r > run))

    def done_paths(self) -> set[str]:
        return {p for part in self.parts for p, *_ in part.done}

    def keep(self, part: _Part) -> set[str]:
        later = self.dropped_later(part.run)
        own = {p for p, *_ in part.done} if part.kind == "faces" else set()
        return (own | self.videos_done.get(part.run, set())) - later

    def tables(self, kind: str) -> Iterator[pa.Table]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for part in self.parts:
            if part.kind == kind:
                table = pq.read_table(part.path)
                yield table.filter(pc.is_in(table["path"], value_set=_string_array(self.keep(part))))


def _string_array(values: set[str]) -> pa.Array:
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())


def _merged_already(folder: Path, output: Path) -> bool:
    """Whether the run in `folder` was merged into `output` and only the folder's removal was cut short."""
    try:
        marker = json.loads((folder / "merged.json").read_text())
        info = output.stat()
    except (OSError, ValueError):
        return False
    return bool(marker.get("inode") == info.st_ino and marker.get("size") == info.st_size)


def _old_rows(path: Path | None, drop: set[str]) -> Iterator[pa.Table]:
    """A finished table's rows in batches, without the paths in `drop`."""
    import pyarrow.compute as pc

    if path is None or not path.is_file():
        return
    for batch in iter_batches(path):
        yield batch.filter(pc.invert(pc.is_in(batch["path"], value_set=_string_array(drop)))) if drop else batch


def _keeps_output(folder: Path) -> bool:
    """Whether the run in `folder` continues the table already in its output (a resumed run) or replaces it."""
    try:
        return bool(json.loads((folder / "table.json").read_text()).get("keeps_output"))
    except (OSError, ValueError):
        return False


def whole_tables(output: Path) -> Iterator[pa.Table]:
    """The rows of table `output` and, while a run writes it (or was killed), of the whole inputs in its parts."""
    folder = parts_folder(output)
    if not folder.is_dir() or _merged_already(folder, output):
        yield from _old_rows(output, set())
        return
    plan = _Plan(folder)
    if _keeps_output(folder):
        yield from _old_rows(output, plan.done_paths() | plan.dropped_later(0))
    yield from plan.tables("faces")


class Staging:
    """One run's parts of `output` (and of its track summaries): what is done, rows as they come, the merge."""

    def __init__(self, output: str | os.PathLike[str], resume: bool = False,
                 summary: str | os.PathLike[str] | None = None, part_rows: int = PART_ROWS) -> None:
        self.output = check_output_file(output)
        table_format(self.output)
        self.summary = check_output_file(summary) if summary is not None else None
        if self.summary is not None:
            table_format(self.summary)
            if self.summary.resolve() == self.output.resolve():
                raise UsageError(f"{summary}: --summary and --output must be two files")
        self.part_rows, self.resume = part_rows, resume
        self.folder = parts_folder(self.output)
        if self.folder.exists() and not resume:
            raise UsageError(f"{self.folder}: an interrupted run of {self.output} is there; add --resume to continue "
                             "it, or delete that folder to start over")
        if self.folder.is_dir() and _merged_already(self.folder, self.output):
            shutil.rmtree(self.folder)
        if self.folder.is_dir():
            for stale in self.folder.iterdir():
                if stale.name.startswith("."):  # a part or run file a kill left half-written
                    stale.unlink()
        self.keeps_output = _keeps_output(self.folder) if self.folder.is_dir() else resume and self.output.is_file()
        plan = _Plan(self.folder)
        self.run = max([part.run for part in plan.parts] + list(plan.redone) + [0]) + 1
        self.done = self._done(plan)
        self.classes: list[str] | None = None
        self.rows: list[Row] = []
        self.tracks: list[Row] = []
        self.completed: list[tuple[str, int | None, int | None, str]] = []
        self.count = 0
        self.last_write = time.monotonic()
        self.run_file_written = False
        self.redo: list[str] = []

    def start(self, classes: Sequence[str]) -> None:
        """Begin writing rows of these classes (the model's): the parts folder is made, or checked against them."""
        self.classes = list(classes)
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            _write_json(self.folder / "table.json", {"classes": self.classes, "keeps_output": self.keeps_output})
        written = json.loads((self.folder / "table.json").read_text()).get("classes")
        if written != self.classes:
            raise UsageError(f"{self.output}: its parts hold the classes {written}, this model's are "
                             f"{self.classes}: resume with the same --weights")
        if self.keeps_output:
            from .writers import read_column_names

            if read_column_names(self.output) != list(schema(self.classes).names):
                raise UsageError(f"{self.output}: not a table of this model's classes ({', '.join(self.classes)}); "
                                 "resume with the same --weights, or write another --output")

    def _done(self, plan: _Plan) -> dict[str, Identity]:
        done: dict[str, Identity] = {}
        if self.keeps_output:
            for batch in iter_batches(self.output, ["path", "file_size", "file_mtime_ns"]):
                for path, size, mtime in zip(*(batch[c].to_pylist() for c in batch.schema.names), strict=True):
                    done[path] = Identity(path, size, mtime)
        for part in sorted(plan.parts, key=lambda p: p.run):
            for path, size, mtime, _ in part.done:
                done[path] = Identity(path, size, mtime)
        return done

    def is_done(self, identity: Identity) -> bool:
        """Whether `identity` is complete already (same path, size and mtime); notes a changed file for redoing."""
        if identity.path is None or identity.path not in self.done:
            return False
        if self.done[identity.path] == identity:
            return True
        self.redo.append(identity.path)
        return False

    def add(self, rows: Sequence[Row], tracks: Sequence[Row] = (), complete: Sequence[tuple[Identity, str]] = ()
            ) -> None:
        """Rows of one input (all, or a video's next frames), its track summaries, and the inputs now complete."""
        self.rows.extend(rows)
        self.tracks.extend(tracks)
        self.completed += [(i.path or "", i.size, i.mtime_ns, kind) for i, kind in complete]
        if len(self.rows) >= self.part_rows or time.monotonic() - self.last_write >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        """The rows held so far as whole parts: track summaries first, then the faces that complete them."""
        assert self.classes is not None, "Staging.start(classes) comes first"
        if not self.run_file_written:
            _write_json(self.folder / f"run-{self.run:04d}.json", {"redo": self.redo})
            self.run_file_written = True
        if self.tracks:
            self._write("tracks", to_table(self.tracks, self.classes, summary=True), [])
        if self.rows or self.completed:
            self._write("faces", to_table(self.rows, self.classes), self.completed)
        self.rows, self.tracks, self.completed = [], [], []
        self.last_write = time.monotonic()

    def _write(self, kind: str, table: pa.Table, done: list[Any]) -> None:
        """One part, whole: written to a temporary name, then renamed."""
        import pyarrow.parquet as pq

        self.count += 1
        name = f"{kind}-{self.run:04d}-{self.count:06d}.parquet"
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), DONE_KEY: json.dumps(done).encode()})
        with atomic_write(self.folder / name) as tmp:
            pq.write_table(table, tmp, compression="zstd")

    def finish(self) -> None:
        """Merge everything into the output (and the summary file), then remove the parts."""
        self.flush()
        assert self.classes is not None
        # The summaries first: the faces' rename marks the run merged (`merged.json`), after which a resume
        # removes the parts.
        if self.summary is not None:
            self._merge(self.summary, "tracks", summary_schema(self.classes), self.keeps_output)
        self._merge(self.output, "faces", schema(self.classes), self.keeps_output)
        shutil.rmtree(self.folder)

    def _merge(self, target: Path, kind: str, table_schema: pa.Schema, keep_old: bool) -> None:
        """Stream the whole rows of the table being continued and of the parts into `target`, by rename."""
        plan = _Plan(self.folder)
        drop = plan.done_paths() | plan.dropped_later(0)
        with atomic_write(target) as tmp:
            writer = open_writer(tmp, table_schema, table_format(target))
            try:
                for table in _old_rows(target if keep_old else None, drop):
                    writer.write(table.cast(table_schema))
                for table in plan.tables(kind):
                    writer.write(table.cast(table_schema))
            finally:
                writer.close()
            if kind == "faces":
                info = tmp.stat()
                _write_json(self.folder / "merged.json", {"inode": info.st_ino, "size": info.st_size})


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value))
