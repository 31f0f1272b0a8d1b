"""Results tables to files and back, by suffix: `.parquet` (pyarrow), `.csv`, `.jsonl` and `.json`.

`WRITERS` maps a suffix to a streaming writer: `write(table)` adds a bounded part (a Parquet row group, a
block of CSV or JSON lines) and `close()` ends the file, so a table of any length is written with the
memory of one part. `.json` is one JSON array of row objects, `.jsonl` one object a line; both hold the
columns of `ferkit.records`. `READERS` read a whole file back as a pyarrow Table, and `read_table` casts it
to the records' schema (by the classes found between `score` and `error`), so every format comes back with
the same dtypes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from .errors import UsageError
from .records import classes_of, schema, summary_schema

if TYPE_CHECKING:
    import pyarrow as pa


class TableWriter(Protocol):
    """Writes a table to one file in parts: `write` each part as it is ready, `close` once at the end."""

    def write(self, table: pa.Table) -> None: ...

    def close(self) -> None: ...


class ParquetWriter:
    """One row group per part (zstd)."""

    def __init__(self, path: Path, table_schema: pa.Schema) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(path, table_schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()


class CsvWriter:
    """A header, then each part's rows; nulls are empty fields."""

    def __init__(self, path: Path, table_schema: pa.Schema) -> None:
        import pyarrow.csv as pcsv

        self.writer = pcsv.CSVWriter(str(path), table_schema)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class JsonLinesWriter:
    """One JSON object a row, a line each."""

    def __init__(self, path: Path, table_schema: pa.Schema) -> None:
        self.file: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.count = 0

    def _lines(self, table: pa.Table) -> str:
        return "".join(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n" for row in table.to_pylist())

    def write(self, table: pa.Table) -> None:
        self.file.write(self._lines(table))
        self.count += table.num_rows

    def close(self) -> None:
        self.file.close()


class JsonArrayWriter(JsonLinesWriter):
    """One JSON array of row objects (what `pandas.read_json(path)` reads)."""

    def __init__(self, path: Path, table_schema: pa.Schema) -> None:
        super().__init__(path, table_schema)
        self.file.write("[")

    def write(self, table: pa.Table) -> None:
        for line in self._lines(table).splitlines():
            self.file.write(("\n" if self.count == 0 else ",\n") + line)
            self.count += 1

    def close(self) -> None:
        self.file.write("\n]\n" if self.count else "]\n")
        self.file.close()


WRITERS: dict[str, Callable[[Path, pa.Schema], TableWriter]] = {
    ".parquet": ParquetWriter, ".csv": CsvWriter, ".jsonl": JsonLinesWriter, ".json": JsonArrayWriter,
}
"""Table writers by file suffix."""


def table_format(path: str | Path) -> str:
    """The suffix that picks `path`'s format; UsageError naming the ones there are for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITERS:
        raise UsageError(f"{path}: a results table ends in {', '.join(WRITERS)} (the suffix picks the format)")
    return suffix


def open_writer(path: Path, table_schema: pa.Schema, suffix: str | None = None) -> TableWriter:
    """A writer of `path`'s format (or `suffix`'s, for a temporary name)."""
    return WRITERS[suffix or table_format(path)](path, table_schema)


def _read_parquet(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _header(path: Path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _target_schema(names: list[str]) -> pa.Schema:
    classes = classes_of(names)
    return summary_schema(classes) if "dominant" in names else schema(classes)


def _read_csv(path: Path) -> pa.Table:
    import pyarrow.csv as pcsv

    wanted = _target_schema(_header(path))
    options = pcsv.ConvertOptions(column_types={f.name: f.type for f in wanted}, strings_can_be_null=True)
    return pcsv.read_csv(path, convert_options=options)


def _rows_table(rows: list[dict[str, Any]], path: Path) -> pa.Table:
    import pyarrow as pa

    if not rows:
        raise UsageError(f"{path}: holds no rows: a results table has at least one row per input")
    return pa.Table.from_pylist(rows, schema=_target_schema(list(rows[0])))


def _read_jsonl(path: Path) -> pa.Table:
    with open(path, encoding="utf-8") as f:
        return _rows_table([json.loads(line) for line in f if line.strip()], path)


def _read_json(path: Path) -> pa.Table:
    with open(path, encoding="utf-8") as f:
        return _rows_table(json.load(f), path)


READERS: dict[str, Callable[[Path], pa.Table]] = {
    ".parquet": _read_parquet, ".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json,
}
"""Whole-file readers by suffix, each giving a pyarrow Table."""


def read_column_names(path: str | Path) -> list[str]:
    """The columns of a results file, without reading its rows (JSON: the first row's keys)."""
    path = Path(path)
    suffix = table_format(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if suffix == ".csv":
        return _header(path)
    return next(iter_batches(path)).schema.names


BATCH_ROWS = 65536


def iter_batches(path: str | Path, names: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """A results file in tables of at most `BATCH_ROWS` rows with the records' dtypes (only `names`, if given);
    memory bounded by a batch, except for `.json` (one array, read whole)."""
    import pyarrow as pa

    path = Path(path)
    suffix = table_format(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        wanted = _target_schema(file.schema_arrow.names)
        for batch in file.iter_batches(BATCH_ROWS, columns=list(names) if names else None):
            yield _cast(pa.Table.from_batches([batch]), wanted)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        wanted = _target_schema(_header(path))
        options = pcsv.ConvertOptions(column_types={f.name: f.type for f in wanted}, strings_can_be_null=True,
                                      include_columns=list(names) if names else None)
        with pcsv.open_csv(path, convert_options=options) as reader:
            for batch in reader:
                yield _cast(pa.Table.from_batches([batch]), wanted)
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows: list[dict[str, Any]] = []
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) >= BATCH_ROWS:
                    yield _rows_table(rows, path).select(list(names) if names else list(rows[0]))
                    rows = []
            if rows:
                yield _rows_table(rows, path).select(list(names) if names else list(rows[0]))
    else:
        table = read_table(path)
        yield table.select(list(names)) if names else table


def _cast(table: pa.Table, wanted: pa.Schema) -> pa.Table:
    return table.cast(pa_schema_subset(wanted, table.schema.names))


def pa_schema_subset(wanted: pa.Schema, names: Sequence[str]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([wanted.field(name) for name in names])


def read_table(path: str | Path) -> pa.Table:
    """A results file (faces or track summaries) as a pyarrow Table of the records' schema."""
    path = Path(path)
    table = READERS[table_format(path)](path)
    return table.select(table.schema.names).cast(_target_schema(table.schema.names))
