"""Operational forecasting: train global models on the historian, issue forecasts into it,
and keep both going on a schedule.

:class:`ForecastService` is the use case behind the API and the schedule:

* ``retrain(name, targets, spec)`` reads each target series' history from the historian
  (``read_readings`` bucketed to the step: the mean per interval), fits one global
  :class:`~derms.forecast.forecaster.GlobalForecaster`, saves it under
  ``<data_dir>/models/<name>/<version>`` (the version is the boosters' content hash, so the
  same data and seed give the same version and no new record) and records it.
* ``issue(name, origin)`` loads the latest model of that name (no refit), builds the panel
  from the last :data:`ISSUE_HISTORY` of history before the origin and writes one run per
  series (``forecast_runs`` + ``forecast_values``).

:class:`~derms.monitoring.forecast_schedule.ForecastSchedule` runs ``issue`` every ``forecast_period_s`` and ``retrain`` every
``forecast_retrain_period_s`` in one background thread (like
:class:`derms.monitoring.cycle.MonitorLoop`); an error in one cycle is logged and counted and
never ends the thread.

Targets are ``owner:quantity:kind[:source]``: a device or meter id, the quantity with its
unit (``p_kw``, import positive as stored: a PV device's ``p_kw`` is negative while it
generates), ``load`` or ``pv``, and optionally the reading source when the series has
several. Forecasts are in the series' own unit and sign (a PV device's model is fitted on
its output, ``-p_kw``, and its forecasts turned back).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from derms.config import Settings
from derms.errors import InputError
from derms.forecast.api import panel_from_series
from derms.forecast.forecaster import LOOKBACK_DAYS, MIN_TRAIN, ForecastSpec, GlobalForecaster
from derms.forecast.model import QuantileModel
from derms.forecast.series import CleanSeries, clean_series
from derms.store.forecasts import (
    ModelInfo,
    RunIn,
    SeriesRef,
    find_series,
    latest_model,
    pv_capacity_kw,
    save_model_record,
    write_forecasts,
)
from derms.store.timeseries import read_readings
from derms.store.types import ensure_utc, utcnow

log = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)  # the historian stores p10/p50/p90
ISSUE_HISTORY = timedelta(days=28)  # read before an origin: 14-day PV envelope + 8-day lags
TRAIN_NEEDS = MIN_TRAIN + pd.Timedelta(days=LOOKBACK_DAYS)  # shortest history a model fits on
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class UnknownModelError(InputError):
    """No trained model of that name (the API answers 404)."""


@dataclass(frozen=True, slots=True)
class ForecastTarget:
    """A series to forecast: device or meter id, quantity, ``load``/``pv``, optional source."""

    owner: str
    quantity: str
    kind: str
    source: str | None = None

    @classmethod
    def parse(cls, text: str) -> ForecastTarget:
        """``owner:quantity:kind`` or ``owner:quantity:kind:source``."""
        parts = [p.strip() for p in str(text).split(":")]
        if len(parts) not in (3, 4) or not all(parts):
            raise InputError(f"target {text!r}: expected owner:quantity:kind[:source], e.g. "
                             "meter-12:p_kw:load")
        if parts[2] not in ("load", "pv"):
            raise InputError(f"target {text!r}: kind {parts[2]!r}, expected load or pv")
        return cls(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None)

    @property
    def key(self) -> str:
        """The target as text (also the series id inside the model's panel)."""
        return ":".join([self.owner, self.quantity, self.kind] +
                        ([self.source] if self.source else []))


def _targets(targets: Sequence[ForecastTarget | str]) -> list[ForecastTarget]:
    out = [t if isinstance(t, ForecastTarget) else ForecastTarget.parse(t) for t in targets]
    if not out:
        raise InputError("targets: give at least one series (owner:quantity:kind)")
    return list(dict.fromkeys(out))


def spec_to_dict(spec: ForecastSpec) -> dict[str, Any]:
    """JSON-ready form of a spec (durations in seconds)."""
    d = asdict(spec)
    d["horizon_s"] = int(pd.Timedelta(d.pop("horizon")).total_seconds())
    d["train_origin_every_s"] = int(pd.Timedelta(d.pop("train_origin_every")).total_seconds())
    d["quantiles"] = list(spec.quantiles)
    return d


def spec_from_dict(d: dict[str, Any]) -> ForecastSpec:
    """Inverse of :func:`spec_to_dict` (unknown keys ignored)."""
    known = set(ForecastSpec.__dataclass_fields__)
    kw = {k: v for k, v in d.items() if k in known}
    kw["horizon"] = pd.Timedelta(seconds=d["horizon_s"])
    kw["train_origin_every"] = pd.Timedelta(seconds=d.get("train_origin_every_s", 6 * 3600))
    kw["quantiles"] = tuple(d.get("quantiles", QUANTILES))
    return ForecastSpec(**kw)


def floor_time(t: datetime, step: timedelta) -> datetime:
    """``t`` (aware) floored to a multiple of ``step`` since 1970-01-01 UTC."""
    return pd.Timestamp(ensure_utc(t, "time")).floor(pd.Timedelta(step)).to_pydatetime()


@dataclass(frozen=True)
class RetrainResult:
    """A retrain: the model record, whether it is a new version, figures and warnings."""

    model: ModelInfo
    created: bool
    n_series: int
    read_s: float
    fit_s: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "created": self.created,
                "n_series": self.n_series, "read_s": round(self.read_s, 3),
                "fit_s": round(self.fit_s, 3), "warnings": self.warnings}


@dataclass(frozen=True)
class IssuedRun:
    """One run written by an issue."""

    run_id: int
    target: str
    series_id: int


@dataclass(frozen=True)
class IssueResult:
    """An issue: the model used, the origin, the runs written and the series that failed."""

    model: ModelInfo
    origin: datetime
    runs: list[IssuedRun]
    failed: dict[str, str]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model.id, "model_name": self.model.name,
                "model_version": self.model.version, "origin": self.origin.isoformat(),
                "runs": [asdict(r) for r in self.runs], "failed": self.failed,
                "seconds": round(self.seconds, 3), "warnings": self.warnings}


class ForecastService:
    """Retrain and issue forecasts on the historian (see module docstring).

    ``clock`` returns the aware UTC time that default origins and training ends are floored
    from (tests pass their own). Retrains are serialised (one at a time per service).
    """

    def __init__(self, settings: Settings, engine: Engine, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self._fit_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._loaded: dict[tuple[int, str], QuantileModel] = {}

    @property
    def models_dir(self) -> Path:
        return Path(self.settings.data_dir) / "models"

    # -- history --------------------------------------------------------------------------
    def _history(self, refs: dict[str, SeriesRef], start: datetime, end: datetime,
                 step: timedelta, flip: frozenset[str] = frozenset()
                 ) -> tuple[dict[str, CleanSeries], dict[str, str], list[str]]:
        """Per target key, the series' interval means on the step grid in [start, end)
        (negated for the keys in ``flip``: a PV device's import-positive power, so the model
        sees its output); targets without readings go to the second dict (key → reason)."""
        out, failed, warnings = {}, {}, []
        for key, ref in refs.items():
            frame = read_readings(self.engine, quantity=ref.quantity, start=start, end=end,
                                  source=ref.source, bucket=step, **ref.owner_kwargs)
            if frame.empty:
                failed[key] = (f"series {key}: no readings in [{start.isoformat()}, "
                               f"{end.isoformat()})")
                continue
            sign = -1.0 if key in flip else 1.0
            values = pd.Series(sign * frame["value"].to_numpy(float),
                               index=pd.DatetimeIndex(frame["t"]))
            values, note = _hold_coarse(values, step, key)
            if note:
                warnings.append(note)
            clean = clean_series(values, key, step=pd.Timedelta(step))
            out[key] = clean
            warnings.extend(clean.warnings)
        return out, failed, warnings

    @staticmethod
    def _generation(spec: ForecastSpec, refs: dict[str, SeriesRef]) -> frozenset[str]:
        """Keys of PV targets stored import-positive (a DER's own ``p_kw``: generating is
        negative): the model is fitted and predicts their output (>= 0), and the forecasts
        go back to the series' sign. Without this a PV device's forecast was all 0 (the PV
        model clips at 0)."""
        if spec.kind != "pv":
            return frozenset()
        return frozenset(k for k, r in refs.items()
                         if r.is_der and r.quantity.startswith("p_") and r.quantity.endswith("_kw"))

    def resolve(self, targets: list[ForecastTarget]) -> dict[str, SeriesRef]:
        """Each target's series (UnknownSeriesError / InputError for one that does not
        resolve)."""
        return {t.key: find_series(self.engine, t.owner, t.quantity, t.source) for t in targets}

    def _capacity(self, spec: ForecastSpec, refs: dict[str, SeriesRef]) -> dict[str, float] | None:
        if spec.kind != "pv":
            return None
        cap = pv_capacity_kw(self.engine, [r.owner for r in refs.values() if r.is_der])
        return {k: cap[r.owner] for k, r in refs.items() if r.is_der and r.owner in cap}

    # -- retrain --------------------------------------------------------------------------
    def retrain(self, name: str, targets: Sequence[ForecastTarget | str], spec: ForecastSpec,
                *, step: timedelta | None = None, train_end: datetime | None = None,
                history_days: int | None = None) -> RetrainResult:
        """Fit one global model of ``spec.kind`` on the targets' history before ``train_end``
        (default: now floored to the step), save and record it.

        Series with less than :data:`TRAIN_NEEDS` of history are left out with a warning;
        if none is long enough, :class:`InputError` names them. Unknown series raise
        :class:`~derms.store.forecasts.UnknownSeriesError`.
        """
        if not _NAME.match(name or ""):
            raise InputError(f"name {name!r}: expected 1-64 characters [A-Za-z0-9_.-], "
                             "starting with a letter or digit")
        tlist = _targets(targets)
        wrong = [t.key for t in tlist if t.kind != spec.kind]
        if wrong:
            raise InputError(f"targets {wrong}: kind differs from the model's kind {spec.kind!r}")
        if tuple(spec.quantiles) != QUANTILES:
            raise InputError(f"quantiles {spec.quantiles!r}: the historian stores {QUANTILES}")
        step = step or timedelta(seconds=self.settings.forecast_step_s)
        _check_step(step, spec)
        end = floor_time(train_end or self.clock(), step)
        days = history_days or self.settings.forecast_history_days
        refs = self.resolve(tlist)
        t0 = time.perf_counter()
        series, failed, warnings = self._history(refs, end - timedelta(days=days), end, step,
                                                 self._generation(spec, refs))
        short = dict(failed)
        for key, clean in list(series.items()):
            span = clean.values.index[-1] - clean.values.index[0] + clean.step
            if span < TRAIN_NEEDS:
                short[key] = f"series {key}: history spans {span}, training needs {TRAIN_NEEDS}"
                del series[key]
        if not series:
            raise InputError("history too short to train: " + "; ".join(short.values()))
        warnings.extend(f"left out of training: {why}" for why in short.values())
        read_s = time.perf_counter() - t0
        with self._fit_lock:
            t1 = time.perf_counter()
            end_ts = pd.Timestamp(end)
            panel = panel_from_series(series, spec, capacity=self._capacity(spec, refs),
                                      train_end=end_ts, extend_to=end_ts)
            cut = int(panel.times.searchsorted(end_ts))
            forecaster = GlobalForecaster(spec).fit(panel, train_end=cut)
            model = forecaster.model
            assert model is not None
            fit_s = time.perf_counter() - t1
            meta = {"name": name, "spec": spec_to_dict(spec), "step_s": int(step.total_seconds()),
                    "train_end": end.isoformat(), "targets": [t.key for t in tlist],
                    "trained_on": sorted(series)}
            version, path = self._save(name, model, meta)
        metrics = {"n_train_rows": model.n_train_rows,
                   "offsets": {str(q): c for q, c in model.offsets.items()},
                   "fit_s": round(fit_s, 3), "read_s": round(read_s, 3),
                   "trained_on": sorted(series), "left_out": sorted(short)}
        info, created = save_model_record(
            self.engine, name=name, kind=spec.kind, version=version,
            trained_at=datetime.fromisoformat(model.trained_at), train_end=end,
            n_series=len(series), path=str(path),
            spec={**spec_to_dict(spec), "step_s": int(step.total_seconds()),
                  "history_days": days, "targets": [t.key for t in tlist]},
            metrics=metrics)
        log.info("forecast_retrained name=%s version=%s created=%s n_series=%d read_s=%.2f "
                 "fit_s=%.2f", name, version, created, len(series), read_s, fit_s)
        return RetrainResult(info, created, len(series), read_s, fit_s, warnings)

    def _save(self, name: str, model: QuantileModel, meta: dict[str, Any]) -> tuple[str, Path]:
        """Save into a temporary folder, then move it to ``<name>/<version>`` (kept if that
        version exists already)."""
        base = self.models_dir / name
        tmp = base / f".tmp-{uuid.uuid4().hex}"
        try:
            version = model.save(tmp, meta)
            final = base / version
            if final.exists():
                shutil.rmtree(tmp)
            else:
                tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return version, final.resolve()

    # -- issue ----------------------------------------------------------------------------
    def load(self, info: ModelInfo) -> QuantileModel:
        """The saved model of a record (cached by id and version)."""
        key = (info.id, info.version)
        with self._cache_lock:
            if key in self._loaded:
                return self._loaded[key]
        model, _meta = QuantileModel.load(Path(info.path))
        with self._cache_lock:
            self._loaded = {k: v for k, v in self._loaded.items() if k[0] != info.id}
            self._loaded[key] = model
        return model

    def issue(self, name: str, origin: datetime | None = None,
              targets: Sequence[ForecastTarget | str] | None = None) -> IssueResult:
        """Forecast every target of the latest model ``name`` (or ``targets``) from
        ``origin`` (default: now floored to the model's step) and write one run per series.

        A series with no reading in the :data:`LOOKBACK_DAYS` days before the origin is
        skipped and listed in ``failed``; if every series fails, :class:`InputError`.
        """
        t0 = time.perf_counter()
        info = latest_model(self.engine, name)
        if info is None:
            raise UnknownModelError(f"forecast model {name!r}: unknown (retrain it first)")
        spec = spec_from_dict(info.spec)
        step = timedelta(seconds=int(info.spec["step_s"]))
        if origin is None:
            origin = floor_time(self.clock(), step)
        origin = ensure_utc(origin, "origin")
        if floor_time(origin, step) != origin:
            raise InputError(f"origin {origin.isoformat()}: not on the model's {step} grid")
        tlist = _targets(targets) if targets is not None else _targets(info.spec["targets"])
        wrong = [t.key for t in tlist if t.kind != spec.kind]
        if wrong:
            raise InputError(f"targets {wrong}: kind differs from the model's kind {spec.kind!r}")
        refs = self.resolve(tlist)
        flip = self._generation(spec, refs)
        series, failed, warnings = self._history(refs, origin - ISSUE_HISTORY, origin, step,
                                                 flip)
        recent = pd.Timestamp(origin) - pd.Timedelta(days=LOOKBACK_DAYS)
        for key, clean in list(series.items()):
            if not clean.values[clean.values.index >= recent].notna().any():
                failed[key] = (f"series {key}: no reading in the {LOOKBACK_DAYS} days before "
                               f"{origin.isoformat()}")
                del series[key]
        if not series:
            raise InputError("no series to forecast: " + "; ".join(failed.values()))
        model = self.load(info)
        forecaster = GlobalForecaster(spec, model=model)
        o_ts = pd.Timestamp(origin)
        panel = panel_from_series(series, spec, capacity=self._capacity(spec, refs),
                                  train_end=o_ts, extend_to=o_ts + spec.horizon)
        o = int(panel.times.searchsorted(o_ts))
        table = forecaster.predict(panel, np.array([o]))
        items, keys = [], []
        horizon_s, step_s = int(spec.horizon.total_seconds()), int(step.total_seconds())
        for key, part in table.groupby("series_id", sort=False):
            q = {c: part[c].to_numpy(float) for c in ("p10", "p50", "p90")}
            if key in flip:  # back to import-positive: the output's P90 is the import's P10
                q = {"p10": -q["p90"], "p50": -q["p50"], "p90": -q["p10"]}
            values = pd.DataFrame({"t": pd.DatetimeIndex(part["timestamp"]), **q})
            items.append((RunIn(refs[key].series_id, info.id, origin, horizon_s, step_s), values))
            keys.append(key)
        run_ids = write_forecasts(self.engine, items)
        runs = [IssuedRun(rid, k, refs[k].series_id) for rid, k in zip(run_ids, keys)]
        seconds = time.perf_counter() - t0
        log.info("forecast_issued name=%s version=%s origin=%s runs=%d failed=%d seconds=%.2f",
                 name, info.version, origin.isoformat(), len(runs), len(failed), seconds)
        return IssueResult(info, origin, runs, failed, seconds, warnings)


def _hold_coarse(values: pd.Series, step: timedelta, key: str) -> tuple[pd.Series, str]:
    """A series read at a coarser resolution than the model's step (hourly readings in a
    15-min model: three of four intervals empty, taken as gaps, and a sawtooth forecast,
    MAE 79 against 24 for an hourly model) is held over the steps of each reading's
    interval; returns the series and a warning ('' when nothing was done)."""
    if len(values) < 3:
        return values, ""
    st = pd.Timedelta(step)
    k = round(pd.Series(values.index).diff().median() / st)  # readings a few
    if k < 2:                                                        # seconds off count
        return values, ""
    native = k * st
    # on the step grid first (readings a few seconds off it were dropped by a reindex)
    on_grid = values.resample(st).mean()
    grid = pd.date_range(on_grid.index[0], on_grid.index[-1] + native - st, freq=st)
    held = on_grid.reindex(grid).ffill(limit=k - 1)
    return held, (f"series {key}: readings every {native} held over the model's {st} "
                  f"steps (a model at the series' own step forecasts it better)")


def _check_step(step: timedelta, spec: ForecastSpec) -> None:
    if step <= timedelta(0) or timedelta(days=1) % step != timedelta(0):
        raise InputError(f"step_s {step.total_seconds():g}: must divide a day (e.g. 900, 3600)")
    if pd.Timedelta(spec.horizon) % pd.Timedelta(step) != pd.Timedelta(0):
        raise InputError(f"horizon_s {spec.horizon.total_seconds():g}: not a multiple of the "
                         f"step {step.total_seconds():g} s")


__all__ = ["ISSUE_HISTORY", "QUANTILES", "TRAIN_NEEDS", "ForecastService", "ForecastTarget",
           "IssueResult", "IssuedRun", "RetrainResult", "UnknownModelError", "floor_time",
           "spec_from_dict", "spec_to_dict"]
