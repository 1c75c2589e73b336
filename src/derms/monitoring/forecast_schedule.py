"""The forecast schedule: one background thread that re-issues and retrains forecasts.

Periods come from settings (``DERMS_FORECAST_PERIOD_S``, ``DERMS_FORECAST_RETRAIN_PERIOD_S``;
0 = off); the work is done by :class:`derms.monitoring.forecasting.ForecastService`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy.engine import Engine

from derms.config import Settings
from derms.forecast.forecaster import ForecastSpec
from derms.monitoring.background import BackgroundLoop
from derms.monitoring.forecasting import (
    ForecastService,
    ForecastTarget,
    _targets,
    floor_time,
)
from derms.store.forecasts import latest_model
from derms.store.types import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CycleError:
    t: datetime
    action: str
    error: str


class ForecastSchedule(BackgroundLoop):
    """Re-issues every ``issue_period_s`` and retrains every ``retrain_period_s`` (0 = never)
    in one background thread, one model per kind of target (named ``<prefix>-<kind>``).

    The first cycle runs at once; a model that does not exist yet is trained before its first
    issue. Errors are logged and counted (``errors``, ``last_error``), never fatal. An issue
    whose origin was already issued by this schedule is skipped.
    """

    thread_name = "derms-forecast"

    def __init__(self, service: ForecastService, targets: Sequence[ForecastTarget | str], *,
                 issue_period_s: float, retrain_period_s: float = 0.0,
                 specs: dict[str, ForecastSpec] | None = None, step: timedelta | None = None,
                 prefix: str = "auto", history_days: int | None = None) -> None:
        self.service = service
        tlist = _targets(targets)
        self.groups: dict[str, list[ForecastTarget]] = {}
        for t in tlist:
            self.groups.setdefault(t.kind, []).append(t)
        self.specs = {k: (specs or {}).get(k) or ForecastSpec(kind=k) for k in self.groups}
        self.step = step or timedelta(seconds=service.settings.forecast_step_s)
        self.issue_period_s = float(issue_period_s)
        self.retrain_period_s = float(retrain_period_s)
        self.prefix = prefix
        self.history_days = history_days
        self.issues = self.retrains = self.errors = 0
        self.last_error: CycleError | None = None
        self._last_origin: dict[str, datetime] = {}
        super().__init__()

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine,
                      service: ForecastService | None = None) -> ForecastSchedule | None:
        """The schedule ``settings`` ask for, or None when ``forecast_period_s`` is 0 or there
        are no ``forecast_targets``."""
        if settings.forecast_period_s <= 0 or not settings.forecast_targets:
            return None
        service = service or ForecastService(settings, engine)
        targets = _targets(settings.forecast_targets)
        specs = {t.kind: ForecastSpec(
            kind=t.kind, horizon=pd.Timedelta(seconds=settings.forecast_horizon_s),
            n_rounds=settings.forecast_n_rounds, tz=settings.forecast_tz,
            latitude=settings.forecast_latitude, longitude=settings.forecast_longitude)
            for t in targets}
        return cls(service, targets, issue_period_s=settings.forecast_period_s,
                   retrain_period_s=settings.forecast_retrain_period_s, specs=specs,
                   step=timedelta(seconds=settings.forecast_step_s),
                   prefix=settings.forecast_model_prefix)

    def model_name(self, kind: str) -> str:
        return f"{self.prefix}-{kind}"

    # -- one cycle ------------------------------------------------------------------------
    def _guard(self, action: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a failed cycle must not end the thread
            log.exception("forecast_cycle_failed action=%s", action)
            with self._cond:
                self.errors += 1
                self.last_error = CycleError(utcnow(), action, f"{type(exc).__name__}: {exc}")
                self._cond.notify_all()
            return None

    def _usable(self, targets: list[ForecastTarget]) -> list[ForecastTarget]:
        """The targets whose series resolve now; each one that does not is an error of
        this cycle (logged and counted) and is left out, so one unknown or ambiguous
        series no longer stops every forecast of its kind."""
        ok = []
        for t in targets:
            if self._guard(f"resolve {t.key}", lambda t=t: self.service.resolve([t])) \
                    is not None:
                ok.append(t)
        return ok

    def retrain_all(self) -> None:
        """Retrain every kind's model now (in the calling thread)."""
        for kind, targets in self.groups.items():
            self._retrain_one(kind, targets)

    def _retrain_one(self, kind: str, targets: list[ForecastTarget]) -> None:
        name = self.model_name(kind)
        targets = self._usable(targets)
        if not targets:
            return
        res = self._guard(f"retrain {name}", lambda: self.service.retrain(
            name, targets, self.specs[kind], step=self.step, history_days=self.history_days))
        if res is not None:
            with self._cond:
                self.retrains += 1
                self._cond.notify_all()

    def issue_all(self) -> None:
        """Issue every kind's forecast now (in the calling thread); trains missing models."""
        for kind, targets in self.groups.items():
            name = self.model_name(kind)
            if latest_model(self.service.engine, name) is None:
                log.info("forecast_model_missing name=%s: training it first", name)
                self._retrain_one(kind, targets)
            origin = floor_time(self.service.clock(), self.step)
            if self._last_origin.get(name) == origin:
                continue
            targets = self._usable(targets)
            if not targets:
                continue
            res = self._guard(f"issue {name}", lambda n=name, t=targets, o=origin:
                              self.service.issue(n, o, t))
            if res is not None:
                self._last_origin[name] = origin
            with self._cond:
                if res is not None:
                    self.issues += 1
                self._cond.notify_all()

    # -- thread ---------------------------------------------------------------------------
    def wait_for(self, *, issues: int = 0, retrains: int = 0, errors: int = 0,
                 timeout: float = 30.0) -> bool:
        """Block until the counters reach the given values (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.issues >= issues and
                                       self.retrains >= retrains and self.errors >= errors,
                                       timeout)

    def _run(self) -> None:
        next_issue = next_retrain = time.monotonic()
        retrain_on = self.retrain_period_s > 0
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    if now >= next_issue or (retrain_on and now >= next_retrain):
                        break
                    wake = min(next_issue, next_retrain) if retrain_on else next_issue
                    self._cond.wait(max(wake - now, 0.01))
                if self._stop:
                    return
            now = time.monotonic()
            if retrain_on and now >= next_retrain:
                next_retrain = now + self.retrain_period_s
                self.retrain_all()
            if time.monotonic() >= next_issue:
                next_issue = time.monotonic() + self.issue_period_s
                self.issue_all()
