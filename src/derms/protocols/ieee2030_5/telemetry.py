"""Where mirrored readings go: a sink the listener calls off its event loop.

:class:`StoreReadingSink` writes them into the derms historian (``derms.store.timeseries
.write_readings``: one transaction, idempotent on (series, t), so a repeated POST stores
nothing twice). :class:`MemoryReadingSink` keeps them in a list (tests, no database).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.engine import Engine

from derms.store.timeseries import ReadingRow, WriteResult, write_readings

SOURCE = "ieee2030_5"  # the series source of everything the 2030.5 listener stores


class ReadingSink(Protocol):
    """Stores readings; blocking (the listener runs it in a worker thread); returns the
    counts once they are committed."""

    def write(self, rows: Sequence[ReadingRow]) -> WriteResult: ...


class StoreReadingSink:
    """Readings into the database of ``engine`` (series created on first use; an unknown
    ``der_id`` / ``meter_id`` is an InputError and nothing is written)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._series: dict[str, int] = {}  # write_readings's series cache

    def write(self, rows: Sequence[ReadingRow]) -> WriteResult:
        return write_readings(self.engine, rows, series_cache=self._series)


class MemoryReadingSink:
    """Readings kept in memory, duplicates on (owner, quantity, source, t) dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows: dict[tuple, ReadingRow] = {}

    def write(self, rows: Sequence[ReadingRow]) -> WriteResult:
        inserted = 0
        with self._lock:
            for r in rows:
                key = (r.der_id, r.meter_id, r.quantity, r.source, r.t)
                if key not in self.rows:
                    self.rows[key] = r
                    inserted += 1
        return WriteResult(inserted, len(rows) - inserted)
