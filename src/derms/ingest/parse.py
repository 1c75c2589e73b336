"""Parse and validate batches of readings (JSON or CSV) with row-level errors.

Accepted shapes
---------------
* JSON rows: ``[{"series": "inv-17", "quantity": "p", "unit": "kW",
  "t": "2026-11-25T10:00:00Z", "value": 3.2}, ...]`` (``series`` may be called ``device``
  or ``meter``; ``quality`` optional, default 0), or ``{"readings": [...]}``.
* JSON columns: ``{"series": [...], "quantity": [...], "unit": [...], "t": [...],
  "value": [...]}`` — same fields, one list each (fastest).
* CSV: a header with ``series`` (or ``device``/``meter``), ``quantity``, ``unit``, ``t``
  (or ``timestamp``), ``value`` and optional ``quality``.

Rule for a bad batch: **all or nothing**. If any row is invalid, nothing of the batch is
accepted and every invalid row is reported (row number from 0 in the batch, field, reason);
the client fixes and resends (resending is safe: storage is idempotent). Timestamps must
carry a zone (``Z`` or ``±hh:mm``); values must be finite; quantity/unit pairs must be known
(:mod:`derms.ingest.units`); unknown series ids are rejected when a set of known ids is given.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from derms.errors import InputError
from derms.ingest.units import QUANTITIES, canonical

MAX_ROWS = 1_000_000
KnownSeries = Collection[str] | Callable[[np.ndarray], np.ndarray] | None
"""Ids a batch may name: a collection, or a function giving a mask of the known ids."""
_ZONE = r"(?:Z|z|[+-]\d{2}:?\d{2})$"
_ALIASES = {"device": "series", "meter": "series", "series_id": "series", "timestamp": "t",
            "time": "t"}
_REQUIRED = ("series", "quantity", "t", "value")


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem in a batch: row (0-based), field, and why."""

    row: int
    field: str
    detail: str


@dataclass(frozen=True)
class ReadingBatch:
    """Validated readings as columns. ``t_us`` is microseconds since the Unix epoch (UTC);
    ``value`` is in the unit that ``quantity``'s name says."""

    series: np.ndarray
    quantity: np.ndarray
    t_us: np.ndarray
    value: np.ndarray
    quality: np.ndarray
    source: str = "api"

    def __len__(self) -> int:
        return len(self.value)

    @property
    def t(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(pd.to_datetime(self.t_us, unit="us", utc=True))


class BatchError(InputError):
    """A batch with invalid rows; ``errors`` lists every one."""

    def __init__(self, errors: list[RowError], n_rows: int) -> None:
        self.errors, self.n_rows = errors, n_rows
        first = errors[0]
        super().__init__(f"{len(errors)} invalid row(s) of {n_rows}; first: row {first.row} "
                         f"{first.field}: {first.detail}")


@dataclass
class _Checker:
    errors: list[RowError] = field(default_factory=list)

    def flag(self, mask: np.ndarray, name: str, detail_of) -> None:
        for r in np.flatnonzero(mask)[:1000]:
            self.errors.append(RowError(int(r), name, detail_of(int(r))))


def parse_json(body: bytes | str, *, source: str = "api",
               known_series: KnownSeries = None) -> ReadingBatch:
    """Parse a JSON batch (rows or columns); raises :class:`BatchError` / InputError."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and "readings" in doc:
        doc = doc["readings"]
    if isinstance(doc, dict):
        lengths = {len(v) if isinstance(v, list) else -1 for v in doc.values()}
        if -1 in lengths or len(lengths) != 1:
            raise InputError("column-form JSON needs lists of equal length for every field")
        frame = pd.DataFrame(doc)
    elif isinstance(doc, list):
        if doc and not all(isinstance(r, dict) for r in doc):
            bad = next(i for i, r in enumerate(doc) if not isinstance(r, dict))
            raise BatchError([RowError(bad, "*", "row is not a JSON object")], len(doc))
        frame = pd.DataFrame.from_records(doc)
    else:
        raise InputError("JSON body must be a list of readings or an object of columns")
    return validate(frame, source=source, known_series=known_series)


def parse_csv(text: str | bytes, *, source: str = "api",
              known_series: KnownSeries = None) -> ReadingBatch:
    """Parse a CSV batch (header required); raises :class:`BatchError` / InputError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("CSV body is not UTF-8") from None
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                            skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"body is not readable CSV: {exc}") from None
    return validate(frame, source=source, known_series=known_series)


def validate(frame: pd.DataFrame, *, source: str = "api",
             known_series: KnownSeries = None) -> ReadingBatch:
    """Validate a frame of raw readings into a :class:`ReadingBatch` (all or nothing)."""
    frame = frame.rename(columns={c: _ALIASES.get(str(c).strip().lower(), str(c).strip().lower())
                                  for c in frame.columns})
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(f"missing field(s): {', '.join(missing)}")
    n = len(frame)
    if n > MAX_ROWS:
        raise InputError(f"batch has {n} rows; at most {MAX_ROWS} per request")
    chk = _Checker()
    series = frame["series"].astype(str).str.strip().to_numpy(dtype=object)
    blank = (frame["series"].isna() | (frame["series"].astype(str).str.strip() == "")).to_numpy()
    chk.flag(blank, "series", lambda r: "missing series id")
    if callable(known_series):
        known = np.asarray(known_series(series), dtype=bool)
    elif known_series is not None:
        known = pd.Series(series).isin(known_series).to_numpy()  # hashed, not np.isin
    if known_series is not None:
        chk.flag(~known & ~blank, "series", lambda r: f"unknown series id {series[r]!r}")

    unit = frame["unit"] if "unit" in frame.columns else pd.Series([""] * n, index=frame.index)
    q_raw = frame["quantity"].astype(str).to_numpy(dtype=object)
    u_raw = unit.fillna("").astype(str).to_numpy(dtype=object)
    codes, uniq = pd.factorize(pd.Series(q_raw, dtype=object) + "\x1f" +
                               pd.Series(u_raw, dtype=object))  # one lookup per distinct pair
    names, factors = np.empty(len(uniq), dtype=object), np.full(len(uniq), np.nan)
    for i, key in enumerate(uniq):
        try:
            names[i], factors[i] = canonical(*str(key).split("\x1f", 1))
        except InputError:
            names[i] = ""
    quantity, factor = names[codes], factors[codes]
    bad_q = np.isnan(factor)
    chk.flag(bad_q, "unit", lambda r: f"unknown quantity/unit {q_raw[r]!r}/{u_raw[r]!r}")

    raw_v = pd.to_numeric(frame["value"], errors="coerce").to_numpy(dtype=float)
    bad_v = ~np.isfinite(raw_v)
    chk.flag(bad_v, "value", lambda r: f"{frame['value'].iloc[r]!r} is not a finite number")
    value = raw_v * factor

    t_str = frame["t"].astype(str).str.strip()
    no_zone = ~t_str.str.contains(_ZONE, regex=True).to_numpy()
    chk.flag(no_zone, "t", lambda r: f"timestamp {t_str.iloc[r]!r} has no zone (use Z or ±hh:mm)")
    t = pd.to_datetime(t_str.where(~no_zone, None), utc=True, errors="coerce", format="ISO8601")
    bad_t = t.isna().to_numpy() & ~no_zone
    chk.flag(bad_t, "t", lambda r: f"timestamp {t_str.iloc[r]!r} is not ISO 8601")
    t_us = t.dt.tz_convert(None).to_numpy().astype("datetime64[us]").astype(np.int64)

    if "quality" in frame.columns:
        raw_q = frame["quality"]
        absent = (raw_q.isna() | (raw_q.astype(str).str.strip() == "")).to_numpy()
        qual = pd.to_numeric(raw_q.where(~absent, 0), errors="coerce").to_numpy(dtype=float)
        bad_qual = ~np.isfinite(qual) | (qual < 0) | (qual > 32767) | (qual != np.round(qual))
        chk.flag(bad_qual, "quality", lambda r: "quality must be an integer 0..32767")
        quality = np.nan_to_num(qual).astype(np.int16)
    else:
        quality = np.zeros(n, dtype=np.int16)

    if chk.errors:
        raise BatchError(sorted(chk.errors, key=lambda e: (e.row, e.field)), n)
    return ReadingBatch(series=series, quantity=quantity, t_us=t_us, value=value,
                        quality=quality, source=source)


__all__ = ["QUANTITIES", "BatchError", "ReadingBatch", "RowError", "parse_csv", "parse_json",
           "validate"]
