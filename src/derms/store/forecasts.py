"""Forecasts in the historian: trained-model records, forecast runs and their quantile values.

A *model record* names a saved global forecast model (``forecast_models``: name, kind,
content-hash version, folder). A *run* is one series forecast from one origin by one model
(``forecast_runs``; ``issued_at`` is the origin, UTC); its *values* are one row per interval
``[t, t + step_s)`` with the 10/50/90 % quantiles in the series' unit (``forecast_values``).

Values are written in bulk, never per-row ORM: PostgreSQL — binary ``COPY`` straight into
``forecast_values`` (a run's rows are new by construction: the run id was just created);
SQLite — ``executemany`` in the same transaction. Runs of one issue are inserted with one
``INSERT … RETURNING``. ``forecast_values`` has no foreign key (row-by-row checks made the
COPY 4x slower): delete runs only with :func:`delete_runs`. Times are timezone-aware UTC
(naive → InputError).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from derms.errors import InputError
from derms.store.db import upsert_insert
from derms.store.models import DerDevice, ForecastModel, ForecastRun, ForecastValue, Series
from derms.store.types import (
    ensure_utc,
    epoch_us_to_index,
    from_epoch_us,
    times_to_epoch_us,
    to_epoch_us,
    utcnow,
)

QUANTILE_COLUMNS = ("p10", "p50", "p90")
_PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 (PostgreSQL's epoch) − 1970-01-01
_PG_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_PG_ROW = np.dtype([
    ("nfields", ">i2"), ("l_run", ">i4"), ("run", ">i8"), ("l_t", ">i4"), ("t", ">i8"),
    ("l_p10", ">i4"), ("p10", ">f8"), ("l_p50", ">i4"), ("p50", ">f8"),
    ("l_p90", ">i4"), ("p90", ">f8"),
])


class UnknownSeriesError(InputError):
    """No series of that device or meter and quantity (the API answers 404)."""


# --- series ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SeriesRef:
    """A resolved series: id, owner (device or meter id), quantity, reading source."""

    series_id: int
    owner: str
    quantity: str
    source: str
    is_der: bool

    @property
    def owner_kwargs(self) -> dict[str, str]:
        """``{"der_id": owner}`` or ``{"meter_id": owner}`` (for ``read_readings``)."""
        return {"der_id": self.owner} if self.is_der else {"meter_id": self.owner}


def find_series(engine: Engine | Connection, owner: str, quantity: str,
                source: str | None = None) -> SeriesRef:
    """The series of device-or-meter ``owner`` and ``quantity`` (and reading ``source``).

    Raises :class:`UnknownSeriesError` when there is none, :class:`InputError` when several
    sources match and ``source`` was not given (the message lists them).
    """
    stmt = select(Series.series_id, Series.der_id, Series.meter_id, Series.source).where(
        Series.quantity == quantity, (Series.der_id == owner) | (Series.meter_id == owner))
    if source is not None:
        stmt = stmt.where(Series.source == source)
    rows = _rows(engine, stmt)
    if not rows:
        where = f" source {source!r}" if source else ""
        raise UnknownSeriesError(f"series {owner!r} quantity {quantity!r}{where}: unknown "
                                 "(no readings stored for it)")
    if len(rows) > 1:
        raise InputError(f"series {owner!r} quantity {quantity!r}: several sources "
                         f"{sorted(r[3] for r in rows)}; name one with source")
    sid, der, _meter, src = rows[0]
    return SeriesRef(int(sid), owner, quantity, str(src), der is not None)


def series_by_id(engine: Engine, ids: Sequence[int]) -> dict[int, SeriesRef]:
    """Resolved series of ``ids`` (missing ids are left out)."""
    stmt = select(Series.series_id, Series.der_id, Series.meter_id, Series.quantity,
                  Series.source).where(Series.series_id.in_(list(ids)))
    return {int(sid): SeriesRef(int(sid), der if der is not None else met, q, s, der is not None)
            for sid, der, met, q, s in _rows(engine, stmt)}


def pv_capacity_kw(engine: Engine, der_ids: Sequence[str]) -> dict[str, float]:
    """Nameplate ``p_gen_max_kw`` (> 0) of devices, for PV forecast scaling."""
    stmt = select(DerDevice.der_id, DerDevice.p_gen_max_kw).where(
        DerDevice.der_id.in_(list(der_ids)), DerDevice.p_gen_max_kw > 0)
    return {d: float(p) for d, p in _rows(engine, stmt)}


def _rows(engine: Engine | Connection, stmt: Any) -> list:
    if isinstance(engine, Connection):
        return list(engine.execute(stmt).all())
    with engine.connect() as conn:
        return list(conn.execute(stmt).all())


# --- model records ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A row of ``forecast_models``."""

    id: int
    name: str
    kind: str
    version: str
    trained_at: datetime
    train_end: datetime
    n_series: int
    path: str
    spec: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (times ISO 8601 UTC)."""
        return {"id": self.id, "name": self.name, "kind": self.kind, "version": self.version,
                "trained_at": self.trained_at.isoformat(), "train_end": self.train_end.isoformat(),
                "n_series": self.n_series, "path": self.path, "spec": self.spec,
                "metrics": self.metrics, "created_at": self.created_at.isoformat()}


def _model_info(m: ForecastModel) -> ModelInfo:
    return ModelInfo(m.id, m.name, m.kind, m.version, m.trained_at, m.train_end, m.n_series,
                     m.path, dict(m.spec or {}), dict(m.metrics or {}), m.created_at)


def save_model_record(engine: Engine, *, name: str, kind: str, version: str,
                      trained_at: datetime, train_end: datetime, n_series: int, path: str,
                      spec: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None
                      ) -> tuple[ModelInfo, bool]:
    """Record a saved model; returns (record, created).

    The same (name, version) — the same boosters, e.g. a retrain on unchanged data with the
    same seed — is not recorded twice: its ``trained_at``, ``train_end`` and ``metrics`` are
    refreshed (so it becomes the latest of its name again) and ``created`` is False. The
    insert skips a (name, version) already there (``ON CONFLICT DO NOTHING``): two retrains
    recording the same version at once had both read "not there" and the second insert's
    uniqueness error was answered 500; now the second refreshes the first's record.
    """
    if kind not in ("load", "pv"):
        raise InputError(f"kind {kind!r}: expected load or pv")
    trained_at, train_end = ensure_utc(trained_at, "trained_at"), ensure_utc(train_end, "train_end")
    cols = ForecastModel.__table__.c
    with engine.begin() as conn:
        new = conn.execute(upsert_insert(conn, ForecastModel).on_conflict_do_nothing(
            index_elements=[cols.name, cols.version]).returning(cols.id), {
            "name": name, "kind": kind, "version": version, "trained_at": trained_at,
            "train_end": train_end, "n_series": int(n_series), "path": path,
            "spec": spec or {}, "metrics": metrics or {}, "created_at": utcnow()}).scalar()
        created = new is not None
        if created:
            mid = int(new)
        else:
            mid = int(conn.execute(select(cols.id).where(
                cols.name == name, cols.version == version)).scalar_one())
            conn.execute(update(ForecastModel).where(cols.id == mid).values(
                trained_at=trained_at, train_end=train_end, metrics=metrics or {}))
    info = get_model(engine, mid)
    assert info is not None
    return info, created


def get_model(engine: Engine, model_id: int) -> ModelInfo | None:
    """The model record ``model_id`` (None if unknown)."""
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        m = s.get(ForecastModel, model_id)
        return None if m is None else _model_info(m)


def latest_model(engine: Engine, name: str) -> ModelInfo | None:
    """The most recently trained model of ``name`` (None if there is none)."""
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        m = s.scalars(select(ForecastModel).where(ForecastModel.name == name)
                      .order_by(ForecastModel.trained_at.desc(), ForecastModel.id.desc())
                      .limit(1)).first()
        return None if m is None else _model_info(m)


def list_models(engine: Engine, name: str | None = None, limit: int = 100, offset: int = 0
                ) -> tuple[int, list[ModelInfo]]:
    """(total, page) of model records, most recently trained first."""
    from sqlalchemy.orm import Session

    where = [] if name is None else [ForecastModel.name == name]
    with Session(engine) as s:
        total = int(s.scalar(select(func.count()).select_from(ForecastModel).where(*where)) or 0)
        rows = s.scalars(select(ForecastModel).where(*where)
                         .order_by(ForecastModel.trained_at.desc(), ForecastModel.id.desc())
                         .limit(limit).offset(offset)).all()
        return total, [_model_info(m) for m in rows]


# --- runs ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RunIn:
    """A run to write: series, model, origin (aware; stored UTC), horizon and step in s."""

    series_id: int
    model_id: int
    issued_at: datetime
    horizon_s: int
    step_s: int


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A stored run, with its model's name and version."""

    id: int
    series_id: int
    model_id: int
    model_name: str
    model_version: str
    issued_at: datetime
    horizon_s: int
    step_s: int
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "series_id": self.series_id, "model_id": self.model_id,
                "model_name": self.model_name, "model_version": self.model_version,
                "issued_at": self.issued_at.isoformat(), "horizon_s": self.horizon_s,
                "step_s": self.step_s, "created_at": self.created_at.isoformat()}


@dataclass(frozen=True, slots=True)
class StoredForecast:
    """A run and its values: DataFrame ``t`` (aware UTC), ``p10``, ``p50``, ``p90``."""

    run: RunInfo
    values: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the run and its values as columns (``t`` ISO 8601 UTC)."""
        v = self.values
        return {"run": self.run.to_dict(), "rows": len(v),
                "t": [t.isoformat() for t in v["t"]],
                **{c: v[c].astype(float).tolist() for c in QUANTILE_COLUMNS}}


def write_forecast(engine: Engine, run: RunIn, values: pd.DataFrame) -> int:
    """Write one run and its values (columns ``t`` aware, ``p10``, ``p50``, ``p90``);
    returns the run id."""
    return write_forecasts(engine, [(run, values)])[0]


def write_forecasts(engine: Engine, items: Sequence[tuple[RunIn, pd.DataFrame]]) -> list[int]:
    """Write many runs and their values in one transaction; returns the run ids in order."""
    if not items:
        return []
    rows, arrays = [], []
    for run, values in items:
        rows.append({"series_id": int(run.series_id), "model_id": int(run.model_id),
                     "issued_at": ensure_utc(run.issued_at, "issued_at"),
                     "horizon_s": int(run.horizon_s), "step_s": int(run.step_s),
                     "created_at": utcnow()})
        arrays.append(_value_arrays(values))
    cols = ForecastRun.__table__.c
    with engine.begin() as conn:
        result = conn.execute(insert(ForecastRun).returning(cols.id, sort_by_parameter_order=True),
                              rows)
        ids = [int(r[0]) for r in result.all()]
        run_col = np.concatenate([np.full(len(a[0]), rid, np.int64) for rid, a in zip(ids, arrays)])
        t_us = np.concatenate([a[0] for a in arrays])
        q = [np.concatenate([a[1][i] for a in arrays]) for i in range(3)]
        if conn.dialect.name == "postgresql":
            _copy_postgresql(conn, run_col, t_us, q)
        else:
            conn.connection.driver_connection.executemany(
                "INSERT INTO forecast_values (run_id, t, p10, p50, p90) VALUES (?, ?, ?, ?, ?)",
                zip(run_col.tolist(), t_us.tolist(), q[0].tolist(), q[1].tolist(), q[2].tolist()))
    return ids


def delete_runs(engine: Engine, *, run_ids: Sequence[int] | None = None,
                issued_before: datetime | None = None) -> int:
    """Delete runs (by id, or every run issued before a time: retention) and their values,
    in one transaction; returns the number of runs deleted."""
    if (run_ids is None) == (issued_before is None):
        raise InputError("delete_runs: give exactly one of run_ids and issued_before")
    r = ForecastRun.__table__.c
    v = ForecastValue.__table__.c
    with engine.begin() as conn:
        if run_ids is not None:
            ids = [int(i) for i in run_ids]
        else:
            cut = ensure_utc(issued_before, "issued_before")
            ids = [int(i) for i in conn.execute(select(r.id).where(r.issued_at < cut)).scalars()]
        if not ids:
            return 0
        conn.execute(delete(ForecastValue).where(v.run_id.in_(ids)))
        return int(conn.execute(delete(ForecastRun).where(r.id.in_(ids))).rowcount)


def _value_arrays(values: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    missing = [c for c in ("t", *QUANTILE_COLUMNS) if c not in values.columns]
    if missing:
        raise InputError(f"forecast values: missing columns {missing}")
    t_us = times_to_epoch_us(values["t"], "forecast values t")
    if len(np.unique(t_us)) != len(t_us):
        raise InputError("forecast values: repeated times t")
    q = [np.asarray(values[c], dtype=np.float64) for c in QUANTILE_COLUMNS]
    for c, v in zip(QUANTILE_COLUMNS, q):
        if not np.isfinite(v).all():
            raise InputError(f"forecast values: non-finite {c}")
    return t_us, q


def _copy_postgresql(conn: Connection, run: np.ndarray, t_us: np.ndarray,
                     q: list[np.ndarray]) -> None:
    buf = np.empty(len(run), dtype=_PG_ROW)
    buf["nfields"] = 5
    buf["l_run"] = buf["l_t"] = buf["l_p10"] = buf["l_p50"] = buf["l_p90"] = 8
    buf["run"], buf["t"] = run, t_us - _PG_EPOCH_OFFSET_US
    buf["p10"], buf["p50"], buf["p90"] = q
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(
            "COPY forecast_values (run_id, t, p10, p50, p90) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(_PG_COPY_HEADER + buf.tobytes() + b"\xff\xff")


def _run_select():
    r, m = ForecastRun.__table__.c, ForecastModel.__table__.c
    return (select(r.id, r.series_id, r.model_id, m.name, m.version, r.issued_at, r.horizon_s,
                   r.step_s, r.created_at).join_from(ForecastRun, ForecastModel,
                                                     r.model_id == m.id))


def _run_info(row: Any) -> RunInfo:
    return RunInfo(int(row[0]), int(row[1]), int(row[2]), row[3], row[4], row[5], int(row[6]),
                   int(row[7]), row[8])


def latest_forecast(engine: Engine, series_id: int, at: datetime | None = None
                    ) -> StoredForecast | None:
    """The latest run of a series issued at or before ``at`` (default: any), with values."""
    r = ForecastRun.__table__.c
    stmt = _run_select().where(r.series_id == series_id)
    if at is not None:
        stmt = stmt.where(r.issued_at <= ensure_utc(at, "at"))
    stmt = stmt.order_by(r.issued_at.desc(), r.id.desc()).limit(1)
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
        if row is None:
            return None
        run = _run_info(row)
        frame = _values(conn, [run.id], None, None)
    return StoredForecast(run, frame.drop(columns="run_id"))


def list_runs(engine: Engine, series_id: int, since: datetime | None = None,
              until: datetime | None = None, limit: int = 100, offset: int = 0
              ) -> tuple[int, list[RunInfo]]:
    """(total, page) of a series' runs issued in ``[since, until)``, newest first."""
    r = ForecastRun.__table__.c
    where = [r.series_id == series_id]
    if since is not None:
        where.append(r.issued_at >= ensure_utc(since, "since"))
    if until is not None:
        where.append(r.issued_at < ensure_utc(until, "until"))
    with engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(ForecastRun).where(*where))
                    .scalar() or 0)
        rows = conn.execute(_run_select().where(*where)
                            .order_by(r.issued_at.desc(), r.id.desc()).limit(limit)
                            .offset(offset)).all()
    return total, [_run_info(x) for x in rows]


def run_values(engine: Engine, run_ids: Sequence[int]) -> pd.DataFrame:
    """Values of runs: columns ``run_id``, ``t`` (aware UTC), ``p10``, ``p50``, ``p90``."""
    with engine.connect() as conn:
        return _values(conn, list(run_ids), None, None)


def forecast_range(engine: Engine, series_id: int, start: datetime, end: datetime, *,
                   issued_since: datetime | None = None, issued_until: datetime | None = None
                   ) -> pd.DataFrame:
    """Every forecast value of a series for intervals ``t`` in ``[start, end)``, from runs
    issued in ``[issued_since, issued_until)`` (default: all).

    Returns columns ``run_id``, ``issued_at``, ``t`` (aware UTC), ``p10``, ``p50``, ``p90``,
    sorted by (issued_at, t). Pick one value per ``t`` (e.g. the latest issue before ``t``)
    with pandas: ``frame[frame.issued_at <= frame.t].groupby("t").last()``.
    """
    r = ForecastRun.__table__.c
    where = [r.series_id == series_id]
    if issued_since is not None:
        where.append(r.issued_at >= ensure_utc(issued_since, "issued_since"))
    if issued_until is not None:
        where.append(r.issued_at < ensure_utc(issued_until, "issued_until"))
    t0, t1 = to_epoch_us(start, "start"), to_epoch_us(end, "end")
    with engine.connect() as conn:
        runs = conn.execute(select(r.id, r.issued_at).where(*where)).all()
        frame = _values(conn, [int(x[0]) for x in runs], t0, t1) if runs else _values(
            conn, [], t0, t1)
    issued = {int(x[0]): x[1] for x in runs}
    frame.insert(1, "issued_at", pd.DatetimeIndex(
        [issued[i] for i in frame["run_id"]], tz="UTC") if len(frame) else
        pd.DatetimeIndex([], tz="UTC"))
    return frame.sort_values(["issued_at", "t"], kind="stable", ignore_index=True)


def _values(conn: Connection, run_ids: list[int], t0: int | None, t1: int | None
            ) -> pd.DataFrame:
    empty = pd.DataFrame({"run_id": pd.Series([], dtype=np.int64), "t": epoch_us_to_index([]),
                          **{c: pd.Series([], dtype=np.float64) for c in QUANTILE_COLUMNS}})
    if not run_ids:
        return empty
    pg = conn.dialect.name == "postgresql"
    t_col = "(extract(epoch from t) * 1000000)::int8" if pg else "t"
    sql = f"SELECT run_id, {t_col}, p10, p50, p90 FROM forecast_values WHERE run_id IN :ids"
    params: dict[str, Any] = {"ids": run_ids}
    if t0 is not None and t1 is not None:
        sql += " AND t >= :t0 AND t < :t1"
        params["t0"], params["t1"] = (from_epoch_us(t0), from_epoch_us(t1)) if pg else (t0, t1)
    from sqlalchemy import bindparam

    rows = conn.execute(text(sql).bindparams(bindparam("ids", expanding=True)), params).all()
    if not rows:
        return empty
    run, t, p10, p50, p90 = (np.asarray(c) for c in zip(*rows))
    frame = pd.DataFrame({"run_id": run.astype(np.int64), "t": epoch_us_to_index(t.astype(np.int64)),
                          "p10": p10.astype(float), "p50": p50.astype(float),
                          "p90": p90.astype(float)})
    return frame.sort_values(["run_id", "t"], kind="stable", ignore_index=True)


__all__ = ["QUANTILE_COLUMNS", "ModelInfo", "RunIn", "RunInfo", "SeriesRef", "StoredForecast",
           "UnknownSeriesError", "delete_runs", "find_series", "forecast_range", "get_model", "latest_forecast",
           "latest_model", "list_models", "list_runs", "pv_capacity_kw", "run_values",
           "save_model_record", "series_by_id", "write_forecast", "write_forecasts"]
