"""Read one measured series from a CSV file with columns ``timestamp,value``.

Timestamps must be ISO 8601 with a zone (offset or Z): local times without one are
ambiguous at daylight-saving changes and are refused. Problems name the file, the row
(1-based, header = row 1) and the value. Unreadable numbers are errors; empty values
are kept as gaps (the forecaster warns about them); infinite values are errors.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from derms.errors import InputError

_ZONE = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")


def _read_strings(path: Path, what: str) -> pd.DataFrame:
    """The CSV at ``path`` as strings (empty cells stay ""); InputError naming the file."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} file {path}: not a readable CSV ({exc})") from None


def read_series_csv(path: Path) -> pd.Series:
    """Read ``path`` into a float Series indexed by UTC timestamps (InputError on problems)."""
    df = _read_strings(path, "series")
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = {"timestamp", "value"} - set(df.columns)
    if missing:
        raise InputError(f"series file {path}: missing column(s) {', '.join(sorted(missing))} "
                         f"(columns: {', '.join(df.columns[:5])})")
    return read_series_csv_frame(path, df)


def read_weather_csv(path: Path) -> pd.DataFrame:
    """Read a weather file: ``timestamp`` (ISO 8601 with zone) + one numeric column per variable.

    Returns a DataFrame indexed by UTC timestamps; InputError naming the file, row and
    column on any problem.
    """
    df = _read_strings(path, "weather")
    df.columns = [str(c).strip() for c in df.columns]
    if "timestamp" not in df.columns or len(df.columns) < 2:
        raise InputError(f"weather file {path}: expected a 'timestamp' column and at least "
                         "one variable column")
    out = {}
    for col in df.columns.drop("timestamp"):
        one = read_series_csv_frame(path, df[["timestamp", col]].rename(columns={col: "value"}),
                                    f"column {col!r}")
        if one.isna().all():
            raise InputError(f"weather file {path}: column {col!r} has no values")
        out[col] = one
    return pd.DataFrame(out)


def duplicate_times_note(frame: pd.DataFrame | pd.Series, path: Path) -> str | None:
    """A warning naming the first repeated timestamp of ``frame`` (the forecaster
    averages repeated rows), or None."""
    dup = frame.index.duplicated()
    if not dup.any():
        return None
    return (f"{path}: {int(dup.sum())} repeated timestamp(s), first "
            f"{frame.index[dup][0].isoformat()}: their values are averaged")


def read_series_csv_frame(path: Path, df: pd.DataFrame, what: str = "") -> pd.Series:
    """Validate a ``timestamp,value`` frame of strings (shared by both readers)."""
    where = f"{path}{' ' + what if what else ''}"
    if df.empty:
        raise InputError(f"file {where}: no rows")
    stamps = df["timestamp"].str.strip()
    no_zone = ~stamps.str.contains(_ZONE)
    if no_zone.any():
        row = int(np.flatnonzero(no_zone.to_numpy())[0])
        text = stamps.iloc[row]
        naive = pd.to_datetime(pd.Series([text]), format="ISO8601", errors="coerce")
        why = ("has no time zone" if naive.notna().all() else
               "is not an ISO 8601 timestamp with an offset (zone names such as CET or "
               "Europe/Paris are not read)")  # (it said "no time zone" for any text)
        raise InputError(f"file {where}: row {row + 2}: timestamp {text!r} {why} (write "
                         "e.g. 2024-03-01T00:00:00+01:00, or Z for UTC)")
    try:
        t = pd.to_datetime(stamps, utc=True, format="ISO8601")
    except (ValueError, TypeError):
        bad = pd.to_datetime(stamps, utc=True, format="ISO8601", errors="coerce").isna()
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"file {where}: row {row + 2}: bad timestamp "
                         f"{stamps.iloc[row]!r}") from None
    raw = df["value"].str.strip()
    num = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
    bad = num.isna() & (raw != "") & ~raw.str.lower().isin(["nan", "na", "null"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"file {where}: row {row + 2}: value {raw.iloc[row]!r} is not "
                         "a number")
    inf = np.isinf(num.to_numpy(float))
    if inf.any():
        row = int(np.flatnonzero(inf)[0])
        raise InputError(f"file {where}: row {row + 2}: value {raw.iloc[row]!r} is not "
                         "finite")
    return pd.Series(num.to_numpy(float), index=pd.DatetimeIndex(t), name="value")
