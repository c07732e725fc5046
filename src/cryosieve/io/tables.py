"""Plain tables as CSV files: one header line, then one line a row, ``\\n`` line ends."""

from __future__ import annotations

import os

import pandas as pd


def write_csv_to(path: str | os.PathLike[str], frame: pd.DataFrame, *, float_format: str | None = None) -> None:
    """Write ``frame`` as CSV to ``path`` directly (callers handle atomicity).

    Columns as named in ``frame``, no index column; floats in the shortest text that reads
    back to the same value, or as ``float_format`` (e.g. ``"%.6g"``) when given; booleans as
    ``True``/``False``. The same table always gives the same bytes.
    """
    frame.to_csv(path, index=False, float_format=float_format, lineterminator="\n")
