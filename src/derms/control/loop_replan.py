"""The control loop's slow re-plan (:mod:`derms.control.replan`) as a mixin of
:class:`~derms.control.loop.ControlLoop`: its own engine with the loop's switch states,
the loop's DERs (held ones left out), SOC telemetry and the load forecast
(:mod:`derms.control.load_forecast`); the plan's commands go through the loop's sink and
issuer, the summary is kept and audited."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select

from derms.control.loop_measurements import StoreMeasurements
from derms.control.replan import ReplanConfig, ReplanDer, Replanner
from derms.errors import DermsError
from derms.jsonutil import jsonable
from derms.monitoring.telemetry import latest_readings, series_of
from derms.powerflow.engine import OpenDSSEngine
from derms.store.audit import append_audit
from derms.store.models import DerDevice
from derms.store.types import ensure_utc, utcnow

log = logging.getLogger("derms.control.loop")


class ReplanMixin:
    """Re-plan methods of the control loop (attributes are the loop's)."""

    def _open_plan_engine(self, now: datetime) -> OpenDSSEngine:
        """A fresh engine of the feeder for the re-plan's ACNetwork, with the loop's
        switch states applied (built and closed on the calling thread)."""
        engine = OpenDSSEngine(self._master_path(now))
        try:
            notes: list[str] = []
            StoreMeasurements(self.feeder_id, engine, self.db,
                               self.config.monitor)._apply_topology(now, notes)
        except BaseException:
            engine.close()
            raise
        return engine

    def _soc(self, now: datetime, ids: list[str]) -> dict[str, float]:
        start = now - timedelta(seconds=self.config.lookback_s)
        with self.db.connect() as conn:
            ser = series_of(conn, der_ids=ids, quantities=("soc_frac",))
            if not len(ser):
                return {}
            last = latest_readings(conn, ser["series_id"].tolist(), start, now)
        last = last.merge(ser, on="series_id").sort_values("t").groupby("der_id").tail(1)
        return {str(r.der_id): float(r.value) for r in last.itertuples(index=False)}

    def _load_forecast(self, now: datetime) -> tuple[Callable[[datetime], float] | None,
                                                     dict[str, Any]]:
        """The re-plan's load multiplier from the stored head forecast
        (:func:`derms.control.load_forecast.head_load_multiplier`), else (None, info)."""
        from derms.control.load_forecast import head_load_multiplier

        base_kw = float(np.sum(self._meas.base_p_kw)) if self._meas is not None else 0.0
        return head_load_multiplier(self.db, self.feeder_id, base_kw,
                                    self.config.monitor.multiplier, now)

    def run_replan(self, now: datetime | None = None) -> dict[str, Any]:
        """One re-plan at ``now`` (:mod:`derms.control.replan`): the loop's DERs (held ones
        left out: inactive, stale telemetry, escalated), SOC telemetry, the load forecast
        (:meth:`_load_forecast`, else the monitor's load multiplier); commands through the
        loop's tracking sink and issuer. Its summary is kept in :attr:`last_replan` and
        audited (``action="control_replan"``)."""
        now = ensure_utc(now or self.clock(), "now")
        cfg = self.config.replan or (self.replanner.config if self.replanner is not None
                                     else ReplanConfig())
        if self._cycle is None:
            self.build(now)
        if self.replanner is None or self.replanner.config is not cfg:
            self.replanner = Replanner(self._open_plan_engine, self.sink, self._issuer,
                                       config=cfg, loop_period_s=self.config.period_s,
                                       feeder_id=self.feeder_id,
                                       load_multiplier=self.config.monitor.load_multiplier,
                                       tag=f"{self.run_tag}-")
        ids = [d.der_id for d in self._ders]
        with self.db.connect() as conn:
            extra = {r[0]: (r[1], r[2]) for r in conn.execute(
                select(DerDevice.der_id, DerDevice.e_max_kwh, DerDevice.s_max_kva)
                .where(DerDevice.der_id.in_(ids)))}
        tel = self._telemetry(now)
        held: dict[str, str] = {}
        for d in self._ders:
            m = tel.get(d.der_id)
            if not d.active:
                held[d.der_id] = "not active"
            elif m is None or (now - m[0]).total_seconds() > self.config.stale_after_s:
                held[d.der_id] = "stale or no telemetry"
        for d in self.tracker.escalated(ids, now):
            held.setdefault(d, "escalated (did not deliver)")
        ders = [ReplanDer(d.der_id, d.kind, d.nodes, d.p_gen_max_kw, d.p_charge_max_kw,
                          extra.get(d.der_id, (None, None))[0],
                          extra.get(d.der_id, (None, None))[1]) for d in self._ders]
        mult, load_info = self._load_forecast(now)
        res = self.replanner.run(now, ders, soc_frac=self._soc(now, ids), held=held,
                                 load_multiplier=mult)
        summary = {"feeder_id": self.feeder_id, **res.summary(), "load_forecast": load_info}
        with self.sessions.begin() as s:
            append_audit(s, actor=self.actor, action="control_replan", entity="feeder",
                         entity_id=self.feeder_id, detail=jsonable(summary), t=now)
        self.replans += 1
        self.last_replan, self.last_replan_result = summary, res
        return summary

    def _replan_guarded(self) -> None:
        try:
            self.run_replan()
        except Exception as exc:  # a failed re-plan must not stop the fast cycle
            error = (f"{type(exc).__name__}: {exc}" if isinstance(exc, DermsError)
                     else type(exc).__name__)
            log.exception("control_replan_failed feeder=%s", self.feeder_id)
            self.last_replan = {"feeder_id": self.feeder_id, "t": utcnow().isoformat(),
                                "status": "failed", "error": error}


