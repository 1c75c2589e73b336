"""Read per-element profiles from a CSV file: ``timestamp`` column + one column per element.

Timestamps are ISO 8601 with a zone (UTC assumed when none is given); values are
multipliers of each element's base (see :mod:`derms.powerflow.profiles`). Every problem is
reported with the file name, and the column or row at fault.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from derms.errors import InputError
from derms.powerflow.profiles import Profiles


def read_profiles_csv(path: Path) -> Profiles:
    """Read ``path`` into :class:`Profiles` (InputError naming the file on any problem)."""
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(f"profiles file not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"profiles file {path}: not a readable CSV ({exc})") from None
    cols = [str(c).strip() for c in df.columns]
    n_of = Counter(c.lower() for c in cols)
    twice = sorted({c for c in cols if n_of[c.lower()] > 1})
    if twice:  # (element names are case-insensitive; a TypeError before)
        raise InputError(f"profiles file {path}: column {twice[0]!r} appears more than once "
                         "(names are compared without surrounding spaces and case)")
    df.columns = cols
    if "timestamp" not in cols:
        raise InputError(f"profiles file {path}: no 'timestamp' column (columns: "
                         f"{', '.join(cols[:5])})")
    if len(cols) < 2:
        raise InputError(f"profiles file {path}: no element columns besides 'timestamp'")
    try:
        t = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise InputError(f"profiles file {path}: bad timestamp ({exc})") from None
    values = df.drop(columns="timestamp")
    for col in values.columns:
        num = pd.to_numeric(values[col], errors="coerce")
        bad = num.isna() & values[col].notna() | values[col].isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"profiles file {path}: column {col!r} row {row + 2}: "
                             f"{values[col].iloc[row]!r} is not a number")
        values[col] = num
    try:
        return Profiles.from_frame(values.set_index(pd.DatetimeIndex(t)))
    except InputError as exc:
        raise InputError(f"profiles file {path}: {exc}") from None
