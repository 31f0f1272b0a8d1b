"""Reading a results table back: `read_results(path)` -> a pandas DataFrame with the records' dtypes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .parts import parts_folder, whole_tables
from .records import classes_of, schema, to_pandas
from .writers import read_table

if TYPE_CHECKING:
    import pandas as pd


def read_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A table that `ferkit predict --output` (or `--summary`) wrote, in any of its formats, as pandas.

    Columns as `ferkit.records` describes them: int64 columns as pandas' nullable Int64 (a photo's `frame`
    is <NA>), text as the string dtype, probabilities, times and landmarks as float64. While a run writes
    `path`, or after one was killed, the whole inputs done so far are read from its parts (`PATH.parts/`).
    """
    path = Path(path)
    if path.is_dir():  # the Ray engine's folder output: write_parquet's parts (`ferkit.scale`)
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return to_pandas(table.select(schema(classes_of(table.schema.names)).names).cast(
            schema(classes_of(table.schema.names))))
    folder = parts_folder(path)
    if not folder.is_dir():
        if not path.is_file():
            raise UsageError(f"{path}: no such results table")
        return to_pandas(read_table(path))
    import pyarrow as pa

    classes = json.loads((folder / "table.json").read_text())["classes"]
    wanted = schema(classes)
    tables = [table.cast(wanted) for table in whole_tables(path)]
    return to_pandas(pa.concat_tables(tables) if tables else wanted.empty_table())
