"""Column types and time helpers shared by the store: UTC timestamps at the boundary.

Times are timezone-aware UTC datetimes in Python. PostgreSQL stores them as
``timestamptz``; SQLite stores them as integer microseconds since 1970-01-01 UTC (SQLite
has no time type: SQLAlchemy's ``DateTime`` comes back naive there, and integers keep
time-range queries and bucketing exact and fast). Naive datetimes are rejected with
:class:`~derms.errors.InputError`, never guessed to be UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import BigInteger, DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from derms.errors import InputError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ensure_utc(value: datetime, name: str = "time") -> datetime:
    """Return ``value`` converted to UTC; raise InputError if it is naive or not a datetime."""
    if not isinstance(value, datetime):
        raise InputError(f"{name}: expected a timezone-aware datetime, got {value!r}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise InputError(f"{name}: naive datetime {value.isoformat()}; give a timezone-aware time (UTC)")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it
        raise InputError(f"{name}: {value.isoformat()} is out of range in UTC") from None


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def to_epoch_us(value: datetime, name: str = "time") -> int:
    """Microseconds since 1970-01-01 UTC of an aware datetime (exact, integer arithmetic)."""
    delta = ensure_utc(value, name) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_epoch_us(us: int) -> datetime:
    """Aware UTC datetime of microseconds since 1970-01-01 UTC."""
    return EPOCH + timedelta(microseconds=int(us))


def times_to_epoch_us(t: Any, name: str = "t") -> np.ndarray:
    """Vector of aware times (pandas tz-aware index/series, or a sequence of aware datetimes)
    → int64 microseconds since the epoch. Naive times (including numpy ``datetime64``) raise
    InputError. Sub-microsecond parts are truncated."""
    if isinstance(t, np.ndarray) and np.issubdtype(t.dtype, np.datetime64):
        raise InputError(f"{name}: numpy datetime64 values are naive; pass tz-aware pandas times")
    try:
        idx = pd.DatetimeIndex(t)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot read times ({exc})") from exc
    if idx.tz is None:
        raise InputError(f"{name}: naive datetimes; give timezone-aware times (UTC)")
    if idx.hasnans:
        raise InputError(f"{name}: missing times (NaT)")
    return idx.tz_convert("UTC").as_unit("us").asi8.astype(np.int64, copy=False)


def epoch_us_to_index(us: np.ndarray) -> pd.DatetimeIndex:
    """int64 microseconds since the epoch → tz-aware UTC DatetimeIndex."""
    return pd.DatetimeIndex(pd.to_datetime(np.asarray(us, dtype=np.int64), unit="us", utc=True))


class UTCTimestamp(TypeDecorator[datetime]):
    """Aware UTC datetime column: ``timestamptz`` on PostgreSQL, int64 µs on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return to_epoch_us(value)
        return ensure_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return from_epoch_us(value)
        return value.astimezone(UTC)
