"""Latest readings of many series at once, from the store (one query, any backend).

Readings whose quality has any of :data:`BAD_QUALITY` (gap fill, stuck, out of range, spike)
are ignored; ``ESTIMATED`` readings are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pandas as pd
from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Connection

from derms.store.models import Reading, Series
from derms.store.timeseries import Quality

BAD_QUALITY = int(Quality.GAP | Quality.STUCK | Quality.OUT_OF_RANGE | Quality.SPIKE)


def series_of(conn: Connection, *, der_ids: Sequence[str] = (),
              meter_ids: Sequence[str] = (), quantities: Sequence[str]) -> pd.DataFrame:
    """Series rows (``series_id``, ``der_id``, ``meter_id``, ``quantity``, ``source``)."""
    cols = ["series_id", "der_id", "meter_id", "quantity", "source"]
    if not der_ids and not meter_ids:
        return pd.DataFrame(columns=cols)
    owner = []
    if der_ids:
        owner.append(Series.der_id.in_(list(der_ids)))
    if meter_ids:
        owner.append(Series.meter_id.in_(list(meter_ids)))
    stmt = select(Series.series_id, Series.der_id, Series.meter_id, Series.quantity,
                  Series.source).where(or_(*owner), Series.quantity.in_(list(quantities)))
    return pd.DataFrame(conn.execute(stmt).all(), columns=cols)


def latest_readings(conn: Connection, series_ids: Sequence[int], start: datetime,
                    end: datetime) -> pd.DataFrame:
    """The latest good reading of each series with ``start <= t <= end``: columns
    ``series_id``, ``t`` (aware UTC), ``value``, ``quality`` (series with none left out)."""
    cols = ["series_id", "t", "value", "quality"]
    ids = [int(s) for s in series_ids]
    if not ids:
        return pd.DataFrame(columns=cols)
    good = and_(Reading.series_id.in_(ids), Reading.t >= start, Reading.t <= end,
                Reading.quality.op("&")(BAD_QUALITY) == 0)
    last = (select(Reading.series_id.label("sid"), func.max(Reading.t).label("tmax"))
            .where(good).group_by(Reading.series_id).subquery())
    stmt = select(Reading.series_id, Reading.t, Reading.value, Reading.quality).join(
        last, and_(Reading.series_id == last.c.sid, Reading.t == last.c.tmax))
    return pd.DataFrame(conn.execute(stmt).all(), columns=cols)


__all__ = ["BAD_QUALITY", "latest_readings", "series_of"]
