"""Operating-envelope sets in the store: save one computation's envelopes, list sets, read
a set's values back (``envelopes.csv`` columns of docs/data-formats.md, times aware UTC).

Values are written in one ``executemany`` (one statement, many parameter rows; 288,000 rows
for 1,000 connection points x 288 intervals), never per-row ORM objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Engine

from derms.errors import InputError
from derms.store.models import EnvelopeSet, EnvelopeValue
from derms.store.types import ensure_utc, utcnow

VALUE_COLUMNS = ["connection_point", "timestamp", "export_limit_kw", "import_limit_kw"]


def save_envelope_set(engine: Engine, *, feeder: str, policy: str, table: pd.DataFrame,
                      summary: dict[str, Any]) -> int:
    """Store a set (``table``: the envelope table, ``EnvelopeResult.table()``); its id."""
    missing = [c for c in VALUE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"envelope table: missing columns {missing}")
    if table.empty:
        raise InputError("envelope table: no rows")
    t = pd.DatetimeIndex(pd.to_datetime(table["timestamp"], utc=True))
    times = t.unique().sort_values()
    step = int((times[1] - times[0]).total_seconds()) if len(times) > 1 else 0
    cps = table["connection_point"].astype(str)
    with engine.begin() as conn:
        sid = int(conn.execute(insert(EnvelopeSet).returning(EnvelopeSet.__table__.c.id), {
            "feeder": str(feeder), "policy": str(policy),
            "start": ensure_utc(times[0].to_pydatetime(), "start"), "step_s": step,
            "n_intervals": len(times), "n_connection_points": int(cps.nunique()),
            "summary": summary, "created_at": utcnow()}).scalar_one())
        exp = table["export_limit_kw"].to_numpy(dtype=float)
        imp = table["import_limit_kw"].to_numpy(dtype=float)
        rows = [{"set_id": sid, "connection_point": c, "t": ts, "export_limit_kw": e,
                 "import_limit_kw": i}
                for c, ts, e, i in zip(cps.tolist(), t.to_pydatetime().tolist(),
                                       np.where(np.isnan(exp), None, exp).tolist(),
                                       np.where(np.isnan(imp), None, imp).tolist())]
        conn.execute(insert(EnvelopeValue), rows)
    return sid


def list_envelope_sets(engine: Engine, feeder: str | None = None, limit: int = 100,
                       offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
    """(total, sets newest first) as JSON-ready dicts (without their summaries)."""
    c = EnvelopeSet.__table__.c
    where = [] if feeder is None else [c.feeder == feeder]
    with engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(EnvelopeSet).where(*where))
                    .scalar_one())
        rows = conn.execute(select(c.id, c.feeder, c.policy, c.start, c.step_s, c.n_intervals,
                                   c.n_connection_points, c.created_at).where(*where)
                            .order_by(c.id.desc()).limit(limit).offset(offset)).all()
    return total, [{"id": r.id, "feeder": r.feeder, "policy": r.policy,
                    "start": ensure_utc(r.start, "start").isoformat(), "step_s": r.step_s,
                    "n_intervals": r.n_intervals,
                    "n_connection_points": r.n_connection_points,
                    "created_at": ensure_utc(r.created_at, "created_at").isoformat()}
                   for r in rows]


def envelope_set(engine: Engine, set_id: int) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """(the set with its summary, its values as ``VALUE_COLUMNS``) or None if unknown."""
    c = EnvelopeSet.__table__.c
    v = EnvelopeValue.__table__.c
    with engine.connect() as conn:
        head = conn.execute(select(EnvelopeSet.__table__).where(c.id == int(set_id))).first()
        if head is None:
            return None
        vals = conn.execute(select(v.connection_point, v.t, v.export_limit_kw,
                                   v.import_limit_kw).where(v.set_id == int(set_id))
                            .order_by(v.t, v.connection_point)).all()
    frame = pd.DataFrame(vals, columns=VALUE_COLUMNS)
    frame["timestamp"] = pd.to_datetime([ensure_utc(x, "t") for x in frame["timestamp"]],
                                        utc=True)
    for col in ("export_limit_kw", "import_limit_kw"):
        frame[col] = frame[col].astype(float)
    info = {"id": head.id, "feeder": head.feeder, "policy": head.policy,
            "start": ensure_utc(head.start, "start").isoformat(), "step_s": head.step_s,
            "n_intervals": head.n_intervals, "n_connection_points": head.n_connection_points,
            "summary": head.summary}
    return info, frame


def delete_envelope_set(engine: Engine, set_id: int) -> bool:
    """Delete a set and its values; False if it did not exist."""
    with engine.begin() as conn:
        conn.execute(delete(EnvelopeValue).where(EnvelopeValue.__table__.c.set_id == set_id))
        n = conn.execute(delete(EnvelopeSet).where(EnvelopeSet.__table__.c.id == set_id))
        return bool(n.rowcount)
