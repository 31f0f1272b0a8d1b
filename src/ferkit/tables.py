"""Reading a results table back: `read_results(path)` -> a pandas DataFrame with the records' dtypes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .records import to_pandas
from .writers import read_table

if TYPE_CHECKING:
    import pandas as pd


def read_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A table that `ferkit predict --output` (or `--summary`) wrote, in any of its formats, as pandas.

    Columns as `ferkit.records` describes them: int64 columns as pandas' nullable Int64 (a photo's `frame`
    is <NA>), text as the string dtype, probabilities, times and landmarks as float64.
    """
    return to_pandas(read_table(Path(path)))
