"""Time-series write and read: telemetry and AMI readings, in bulk, idempotent.

A *series* is (device or meter, quantity, source); a *reading* is (series, t) → value with
quality flags. The natural key (device or meter id, quantity, source, t) is unique: writing
the same reading twice stores it once and counts the second as a duplicate (the first value
wins); late and out-of-order readings are accepted like any other.

Bulk paths (never per-row ORM): PostgreSQL — binary ``COPY`` of a numpy-built buffer into a
temporary (unlogged) staging table, then ``INSERT … SELECT … ON CONFLICT DO NOTHING``;
SQLite — ``INSERT OR IGNORE`` by ``executemany`` in one transaction.

Quantities are short names ending in their unit (``p_kw``, ``q_kvar``, ``v_pu``, ``v_v``,
``e_kwh``, ``soc_frac``; ``pf`` is the one unitless name); power sign as in DESIGN.md (import at a connection point positive;
a DER's own output ``p_gen_kw >= 0``). Times are timezone-aware (naive → InputError) and
stored to the microsecond; intervals are ``[start, end)``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import bindparam, or_, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from derms.errors import InputError
from derms.store.db import upsert_insert
from derms.store.models import Series
from derms.store.types import epoch_us_to_index, from_epoch_us, times_to_epoch_us, to_epoch_us

UNITS = ("kw", "kvar", "kva", "kwh", "kvarh", "pu", "v", "a", "hz", "frac", "pct", "degc", "s")
_QUANTITY = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*_(" + "|".join(UNITS) + r")$")
UNITLESS = ("pf",)  # power factor
SOURCE_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_.:\-]{0,31}\Z"  # a reading's source (1-32 chars)
_SOURCE = re.compile(SOURCE_PATTERN)
_PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 (PostgreSQL's epoch) − 1970-01-01
_PG_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_PG_ROW = np.dtype([
    ("nfields", ">i2"), ("l_sid", ">i4"), ("sid", ">i4"), ("l_t", ">i4"), ("t", ">i8"),
    ("l_v", ">i4"), ("v", ">f8"), ("l_q", ">i4"), ("q", ">i2"),
])
_COPY_CHUNK_ROWS = 250_000


class Quality(enum.IntFlag):
    """Quality bits of a reading (``readings.quality``, a small int; 0 = good).

    GAP: filled in for a missing interval; STUCK: value unchanged for longer than plausible;
    OUT_OF_RANGE: outside the physical or nameplate range; SPIKE: an isolated jump;
    ESTIMATED: computed (state estimation, AMI VEE), not measured.
    """

    GOOD = 0
    GAP = 1
    STUCK = 2
    OUT_OF_RANGE = 4
    SPIKE = 8
    ESTIMATED = 16


@dataclass(frozen=True, slots=True)
class ReadingRow:
    """One reading; exactly one of ``der_id`` / ``meter_id``."""

    quantity: str
    t: datetime
    value: float
    der_id: str | None = None
    meter_id: str | None = None
    source: str = "telemetry"
    quality: int = 0


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Counts of a bulk write: rows stored, rows dropped as already present (or repeated)."""

    inserted: int
    duplicates: int

    @property
    def total(self) -> int:
        return self.inserted + self.duplicates


def check_quantity(quantity: str) -> str:
    """Return ``quantity`` if it is a short name ending in a known unit, else InputError."""
    if quantity in UNITLESS:
        return quantity
    if not isinstance(quantity, str) or len(quantity) > 32 or not _QUANTITY.match(quantity):
        raise InputError(f"quantity {quantity!r}: expected a name ending in a unit "
                         f"({', '.join(UNITS)}), e.g. 'p_kw'")
    return quantity


def _check_source(source: str) -> str:
    if not isinstance(source, str) or not _SOURCE.match(source):
        raise InputError(f"source {source!r}: expected 1-32 characters [A-Za-z0-9_.:-]")
    return source


def _owner(der_id: str | None, meter_id: str | None) -> tuple[str, str]:
    if (der_id is None) == (meter_id is None):
        raise InputError(f"reading owner: give exactly one of der_id ({der_id!r}) "
                         f"and meter_id ({meter_id!r})")
    return ("der", der_id) if der_id is not None else ("meter", meter_id)  # type: ignore[return-value]


# --- series ----------------------------------------------------------------------------------

def resolve_series(conn: Connection, keys: Sequence[tuple[str, str, str, str]],
                   create: bool = True) -> dict[tuple[str, str, str, str], int]:
    """Series ids of ``(owner_kind, owner_id, quantity, source)`` keys, ``owner_kind`` being
    ``"der"`` or ``"meter"``; missing series are created when ``create`` (an unknown device
    or meter raises InputError), else left out."""
    keys = list(dict.fromkeys(keys))
    found = _select_series(conn, keys)
    missing = [k for k in keys if k not in found]
    if missing and create:
        for kind, owner, quantity, source in missing:
            check_quantity(quantity)
            _check_source(source)
        rows = [{"der_id": o if k == "der" else None, "meter_id": o if k == "meter" else None,
                 "quantity": q, "source": s} for k, o, q, s in missing]
        try:
            conn.execute(upsert_insert(conn, Series).on_conflict_do_nothing(), rows)
        except IntegrityError as exc:
            owners = sorted({f"{k} {o}" for k, o, _, _ in missing})
            raise InputError(f"readings for unknown device or meter among {owners[:10]}") from exc
        found.update(_select_series(conn, missing))
    return found


def _select_series(conn: Connection, keys: Sequence[tuple[str, str, str, str]]) -> dict:
    ders = {o for k, o, _, _ in keys if k == "der"}
    meters = {o for k, o, _, _ in keys if k == "meter"}
    if not keys:
        return {}
    stmt = select(Series.series_id, Series.der_id, Series.meter_id, Series.quantity,
                  Series.source).where(or_(Series.der_id.in_(ders), Series.meter_id.in_(meters)))
    wanted = set(keys)
    out = {}
    for sid, der, meter, q, s in conn.execute(stmt):
        key = ("der", der, q, s) if der is not None else ("meter", meter, q, s)
        if key in wanted:
            out[key] = sid
    return out


# --- write -----------------------------------------------------------------------------------

def write_series(engine: Engine, t: Any, value: Any, *, quantity: str,
                 der_id: str | None = None, meter_id: str | None = None,
                 source: str = "telemetry", quality: Any = None) -> WriteResult:
    """Write one series from arrays: ``t`` tz-aware times (pandas index/series or aware
    datetimes), ``value`` floats in the unit ``quantity`` names, ``quality`` optional
    :class:`Quality` flags (scalar or array). Duplicates are dropped and counted."""
    kind, owner = _owner(der_id, meter_id)
    t_us = times_to_epoch_us(t)
    v = _values(value, len(t_us))
    q = _qualities(quality, len(t_us))
    with engine.begin() as conn:
        sid = resolve_series(conn, [(kind, owner, check_quantity(quantity), _check_source(source))])
        ids = np.full(len(t_us), next(iter(sid.values())), dtype=np.int32)
        return _write_arrays(conn, ids, t_us, v, q)


def write_readings(engine: Engine, readings: pd.DataFrame | Iterable[ReadingRow],
                   series_cache: dict[str, int] | None = None
                   ) -> WriteResult:
    """Write many series at once from ReadingRow objects or a tidy DataFrame with columns
    ``t`` (tz-aware), ``value``, ``quantity``, ``der_id`` and/or ``meter_id`` (exactly one
    set per row), optional ``source`` (default "telemetry") and ``quality`` (default 0).

    ``series_cache`` (owned by a long-lived writer, opaque to it) maps series keys to ids; keys it lacks
    are resolved (and created) in the write's transaction and added after the commit.
    Series ids never change, so the cache stays valid unless series are deleted."""
    frame = readings if isinstance(readings, pd.DataFrame) else _rows_frame(readings)
    n = len(frame)
    if n == 0:
        return WriteResult(0, 0)
    for col in ("t", "value", "quantity"):
        if col not in frame.columns:
            raise InputError(f"readings: missing column {col!r}")
    der = frame["der_id"] if "der_id" in frame.columns else pd.Series([None] * n, index=frame.index)
    met = frame["meter_id"] if "meter_id" in frame.columns else pd.Series([None] * n, index=frame.index)
    has_der, has_met = der.notna().to_numpy(), met.notna().to_numpy()
    if (has_der == has_met).any():
        i = int(np.flatnonzero(has_der == has_met)[0])
        raise InputError(f"readings row {i}: give exactly one of der_id and meter_id")
    codes, ukeys = _series_keys(frame, der, met, has_der)
    t_us = times_to_epoch_us(frame["t"])
    v = _values(frame["value"].to_numpy(), n)
    q = _qualities(frame["quality"].to_numpy() if "quality" in frame.columns else None, n)
    cached = series_cache if series_cache is not None else {}
    lut = np.fromiter((cached.get(k, -1) for k in ukeys), dtype=np.int64, count=len(ukeys))
    missing = np.flatnonzero(lut < 0)
    with engine.begin() as conn:
        if missing.size:
            wanted = [_key_tuple(ukeys[i]) for i in missing]
            found = resolve_series(conn, wanted)
            lut[missing] = [found[k] for k in wanted]
        result = _write_arrays(conn, lut.astype(np.int32)[codes], t_us, v, q)
    if series_cache is not None:  # only after the commit: never an id that was rolled back
        series_cache.update(zip(ukeys[missing].tolist(), lut[missing].tolist(), strict=True))
    return result


def _factorize(column: Any) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(np.asarray(column, dtype=object))
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _series_keys(frame: pd.DataFrame, der: pd.Series, met: pd.Series, has_der: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the index of its series key; and the distinct keys as text
    ``kind␟owner␟quantity␟source`` (:func:`_key_tuple` gives the tuple), built and
    factorised column-wise: a batch of 10,000 devices has 40,000 of them, and a Python loop
    over them cost more than the rest of the write."""
    n = len(frame)
    owner = pd.Series(np.where(has_der, der.to_numpy(dtype=object), met.to_numpy(dtype=object)),
                      dtype=object)
    q = frame["quantity"].to_numpy(dtype=object)
    src = (frame["source"].to_numpy(dtype=object) if "source" in frame.columns
           else np.full(n, "telemetry", dtype=object))
    if pd.isna(q).any() or pd.isna(src).any():
        raise InputError("readings: missing quantity or source")
    for name, col in (("quantity", q), ("source", src)):  # few distinct values
        bad = [v for v in pd.unique(col) if "\x1f" in str(v)]
        if bad:  # the key's separator: it would name another series
            raise InputError(f"readings: {name} {bad[0]!r} is not a {name}")
    kind = pd.Series(np.where(has_der, "der\x1f", "meter\x1f"), dtype=object)
    text = (kind + owner.astype(str) + "\x1f" + pd.Series(q, dtype=object).astype(str) + "\x1f"
            + pd.Series(src, dtype=object).astype(str))
    codes, uniq = pd.factorize(text.to_numpy(dtype=object))
    return codes.astype(np.int64), np.asarray(uniq, dtype=object)


def _key_tuple(key: str) -> tuple[str, str, str, str]:
    """``(owner_kind, owner_id, quantity, source)`` of a text key (quantity and source hold
    no separator; an owner id may)."""
    kind, rest = key.split("\x1f", 1)
    owner, quantity, source = rest.rsplit("\x1f", 2)
    return kind, owner, quantity, source


def _rows_frame(rows: Iterable[ReadingRow]) -> pd.DataFrame:
    rows = list(rows)
    return pd.DataFrame({
        "t": pd.Series([r.t for r in rows], dtype=object),
        "value": [r.value for r in rows], "quantity": [r.quantity for r in rows],
        "der_id": [r.der_id for r in rows], "meter_id": [r.meter_id for r in rows],
        "source": [r.source for r in rows], "quality": [r.quality for r in rows],
    })


def _values(value: Any, n: int) -> np.ndarray:
    try:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"values: not numbers ({exc})") from exc
    if len(v) != n:
        raise InputError(f"values: {len(v)} values for {n} times")
    if not np.isfinite(v).all():
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise InputError(f"values: non-finite value {v[i]} at row {i} (flag gaps with quality)")
    return v


def _qualities(quality: Any, n: int) -> np.ndarray:
    if quality is None:
        return np.zeros(n, dtype=np.int16)
    q = np.broadcast_to(np.asarray(quality, dtype=np.int64), (n,))
    if ((q < 0) | (q > 0x7FFF)).any():
        raise InputError("quality: flags must be within 0..32767")
    return q.astype(np.int16)


def _write_arrays(conn: Connection, sid: np.ndarray, t_us: np.ndarray, v: np.ndarray,
                  q: np.ndarray) -> WriteResult:
    order = np.lexsort((t_us, sid))  # (series, t) order: index-friendly inserts
    sid, t_us, v, q = sid[order], t_us[order], v[order], q[order]
    if conn.dialect.name == "postgresql":
        inserted = _write_postgresql(conn, sid, t_us, v, q)
    else:
        inserted = _write_sqlite(conn, sid, t_us, v, q)
    return WriteResult(inserted=inserted, duplicates=len(sid) - inserted)


def _write_sqlite(conn: Connection, sid, t_us, v, q) -> int:  # type: ignore[no-untyped-def]
    raw = conn.connection.driver_connection
    before = raw.total_changes
    raw.executemany("INSERT OR IGNORE INTO readings (series_id, t, value, quality) "
                    "VALUES (?, ?, ?, ?)", zip(sid.tolist(), t_us.tolist(), v.tolist(), q.tolist()))
    return raw.total_changes - before


def _write_postgresql(conn: Connection, sid, t_us, v, q) -> int:  # type: ignore[no-untyped-def]
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS derms_readings_stage "
                    "(series_id int4, t timestamptz, value float8, quality int2) ON COMMIT DELETE ROWS")
        cur.execute("TRUNCATE derms_readings_stage")
        with cur.copy("COPY derms_readings_stage (series_id, t, value, quality) "
                      "FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(_PG_COPY_HEADER)
            for lo in range(0, len(sid), _COPY_CHUNK_ROWS):
                hi = min(lo + _COPY_CHUNK_ROWS, len(sid))
                buf = np.empty(hi - lo, dtype=_PG_ROW)
                buf["nfields"], buf["l_sid"], buf["l_t"], buf["l_v"], buf["l_q"] = 4, 4, 8, 8, 2
                buf["sid"], buf["t"] = sid[lo:hi], t_us[lo:hi] - _PG_EPOCH_OFFSET_US
                buf["v"], buf["q"] = v[lo:hi], q[lo:hi]
                copy.write(buf.tobytes())
            copy.write(b"\xff\xff")
        cur.execute("INSERT INTO readings (series_id, t, value, quality) "
                    "SELECT series_id, t, value, quality FROM derms_readings_stage "
                    "ON CONFLICT DO NOTHING")
        inserted = cur.rowcount
        cur.execute("TRUNCATE derms_readings_stage")
    return int(inserted)


# --- read ------------------------------------------------------------------------------------

def read_readings(engine: Engine, *, quantity: str, start: datetime, end: datetime,
                  der_id: str | None = None, meter_id: str | None = None,
                  source: str | None = None, bucket: timedelta | None = None) -> pd.DataFrame:
    """Readings of one device or meter and quantity in ``[start, end)``, every source unless
    ``source`` is given.

    Returns a DataFrame sorted by (source, t): columns ``source``, ``t`` (tz-aware UTC),
    ``value``, ``quality``. With ``bucket``, one row per non-empty bucket: ``t`` is the
    bucket start (buckets aligned to 1970-01-01 UTC, so whole days start at midnight UTC),
    ``value`` the mean, ``n`` the number of readings.
    """
    kind, owner = _owner(der_id, meter_id)
    t0, t1 = to_epoch_us(start, "start"), to_epoch_us(end, "end")
    b_us = None
    if bucket is not None:
        b_us = bucket // timedelta(microseconds=1)
        if b_us <= 0:
            raise InputError(f"bucket {bucket}: must be positive")
    stmt = select(Series.series_id, Series.source).where(Series.quantity == quantity)
    stmt = stmt.where(Series.der_id == owner if kind == "der" else Series.meter_id == owner)
    if source is not None:
        stmt = stmt.where(Series.source == source)
    with engine.connect() as conn:
        sources = dict(conn.execute(stmt).all())
        rows = _query(conn, list(sources), t0, t1, b_us) if sources else []
    last = "quality" if b_us is None else "n"
    if not rows:
        return pd.DataFrame({"source": pd.Series([], dtype=object), "t": epoch_us_to_index([]),
                             "value": pd.Series([], dtype=np.float64),
                             last: pd.Series([], dtype=np.int64)})
    sid, t, val, extra = (np.asarray(c) for c in zip(*rows))
    frame = pd.DataFrame({
        "source": pd.Series(sid).map(sources).to_numpy(dtype=object),
        "t": epoch_us_to_index(t.astype(np.int64)),
        "value": val.astype(np.float64),
        last: extra.astype(np.int64),
    })
    return frame.sort_values(["source", "t"], kind="stable", ignore_index=True)


# A bucket's mean without overflow: PostgreSQL's avg(float8) also sums the squares (a stored
# 1e308 made every bucketed read of its window fail "value out of range: overflow", a 422),
# SQLite's avg of two 1e308 is Inf. The sum scaled by 2**-64 (exact: a power of two) holds
# 2**64 readings of the largest float; only magnitudes below ~1e-289 lose bits.
_MEAN = "sum(value * :lo) / count(*) * :hi"


def _query(conn: Connection, ids: list[int], t0: int, t1: int, b_us: int | None) -> list:
    pg = conn.dialect.name == "postgresql"
    t_col = "(extract(epoch from t) * 1000000)::int8" if pg else "t"
    where = "series_id IN :ids AND t >= :t0 AND t < :t1"
    if b_us is None:
        sql = f"SELECT series_id, {t_col}, value, quality FROM readings WHERE {where}"
    elif pg:
        tb = ("(extract(epoch from date_bin(:b * interval '1 microsecond', t, to_timestamp(0)))"
              " * 1000000)::int8")
        sql = (f"SELECT series_id, {tb} AS tb, {_MEAN}, count(*) FROM readings "
               f"WHERE {where} GROUP BY series_id, tb")
    else:
        tb = "(t - (((t % :b) + :b) % :b))"
        sql = (f"SELECT series_id, {tb} AS tb, {_MEAN}, count(*) FROM readings "
               f"WHERE {where} GROUP BY series_id, tb")
    params: dict[str, Any] = {"ids": ids, "t0": t0, "t1": t1}
    if pg:  # timestamptz parameters (exact), not arithmetic on microseconds
        params["t0"], params["t1"] = from_epoch_us(t0), from_epoch_us(t1)
    if b_us is not None:
        params.update(b=b_us, lo=math.ldexp(1.0, -64), hi=math.ldexp(1.0, 64))
    stmt = text(sql).bindparams(bindparam("ids", expanding=True))
    return conn.execute(stmt, params).all()
