"""One cycle of the control loop of :mod:`derms.control.loop` (a mixin of its
:class:`~derms.control.loop.ControlLoop`): IEEE 2030.5 responses, DER telemetry with
stale handling, delivery verification, the arbiter, measurements, the fast cycle, the
cycle's state estimate kept for the API, and the cycle audited unless quiet (the loop's
docstring, steps 2-8)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from derms.control.fast_cycle import CycleReport, FleetNow
from derms.control.loop_config import assign_end_devices
from derms.control.loop_state import cycle_state
from derms.jsonutil import jsonable
from derms.monitoring.cycle import RunError
from derms.monitoring.telemetry import latest_readings, series_of
from derms.store.audit import append_audit
from derms.store.types import ensure_utc


class CycleMixin:
    """Per-cycle methods of the control loop (attributes are the loop's)."""

    def _telemetry(self, now: datetime) -> dict[str, tuple[datetime, float, float]]:
        ids = [d.der_id for d in self._ders]
        start = now - timedelta(seconds=self.config.lookback_s)
        with self.db.connect() as conn:
            ser = series_of(conn, der_ids=ids, quantities=("p_kw", "q_kvar"))
            last = latest_readings(conn, ser["series_id"].tolist(), start, now)
        last = last.merge(ser, on="series_id").sort_values("t")
        out: dict[str, tuple[datetime, float, float]] = {}
        p = last[last["quantity"] == "p_kw"].groupby("der_id").tail(1)
        q = last[last["quantity"] == "q_kvar"].groupby("der_id").tail(1).set_index("der_id")
        for r in p.itertuples(index=False):
            qv = float(q.loc[r.der_id, "value"]) if r.der_id in q.index else 0.0
            out[r.der_id] = (r.t, float(r.value), qv)
        return out

    def _fleet(self, now: datetime, tel: dict, scores: np.ndarray, escalated: set[str]
               ) -> tuple[FleetNow, list[str]]:
        n = len(self._ders)
        p, q = np.zeros(n), np.zeros(n)
        lo, hi, fixed = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
        stale = []
        for j, d in enumerate(self._ders):
            m = tel.get(d.der_id)
            if m is not None:
                p[j], q[j] = m[1], m[2]
            if m is None or (now - m[0]).total_seconds() > self.config.stale_after_s:
                stale.append(d.der_id)
                fixed[j] = True
            if not d.active or d.der_id in escalated:
                fixed[j] = True
            if d.kind in ("pv", "wind"):
                lo[j], hi[j] = min(p[j], 0.0), 0.0
            elif d.kind == "battery":
                lo[j], hi[j] = -d.p_gen_max_kw, d.p_charge_max_kw
            elif d.kind in ("ev", "flexible_load"):
                lo[j], hi[j] = 0.0, max(p[j], 0.0)
            elif d.kind == "generator":
                lo[j], hi[j] = -d.p_gen_max_kw, 0.0
            else:
                lo[j] = hi[j] = p[j]
        lo, hi = np.minimum(lo, p), np.maximum(hi, p)
        return FleetNow(p, q, lo, hi, q.copy(), q.copy(), scores, fixed=fixed), stale

    def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """One cycle at ``now`` (module docstring); returns its summary (also kept in
        :attr:`last_summary`)."""
        now = ensure_utc(now or self.clock(), "now")
        t0 = time.perf_counter()
        reload = self.build(now) if self._build_outdated(now) else None
        acks = 0
        if self.repo is not None:
            if self.repo.version != self._repo_version:
                assign_end_devices(self.repo, self.fsa_id)
                self._repo_version = self.repo.version
            acks = self.tracker.take_responses(self.repo, now)
        tel = self._telemetry(now)
        ids = [d.der_id for d in self._ders]
        ratings = {d.der_id: d.rating_kw for d in self._ders}
        verdicts = self.tracker.verify(now, {k: (v[0], v[1]) for k, v in tel.items()}, ratings)
        scores = self.tracker.scores(ids)
        escalated = self.tracker.escalated(ids, now)
        fleet, stale = self._fleet(now, tel, scores, escalated)
        self.control_state.refresh(now)
        self._cycle.arbiter = self.control_state.arbiter
        notes: list[str] = []
        if stale:
            notes.append(f"{len(stale)} DER(s) with stale or no telemetry (older than "
                         f"{self.config.stale_after_s:.0f} s): held at their last value, "
                         f"not commanded: {stale[:20]}")
        if escalated:
            notes.append(f"{len(escalated)} DER(s) escalated (did not deliver): held at their "
                         f"measured output, others relied upon: {sorted(escalated)[:20]}")
        if self._skipped:
            notes.append(f"DERs not on the model (no bus/phase node): {self._skipped[:20]}")
        meas = self._meas.measurements(now, notes)
        fresh = len(stale) < len(self._ders)
        summary: dict[str, Any] = {
            "feeder_id": self.feeder_id, "t": now.isoformat(), "n_ders": len(self._ders),
            "stale": stale, "escalated": sorted(escalated), "acknowledged": acks,
            "verified": _count(v.state for v in verdicts),
            # scores of the DERs with a delivery history (the others are at the prior)
            "scores": {d: round(float(s), 4) for d, s in zip(ids, scores)
                       if s != self.tracker.config.prior_score},
            "topology_reloaded": reload}
        if meas is None and not fresh:
            notes.append("no fresh telemetry on the feeder (meters or DERs): no action")
            summary.update(cycle_id=None, status="no_telemetry", commands=0, command_ids=[],
                           violations={}, imminent=0, n_rows=0, n_fixed=int(fleet.fixed.sum()),
                           timings={"total_s": time.perf_counter() - t0}, estimation={},
                           ac_check={})
            self.last_report = None
            self.state_error = RunError(now, "no fresh telemetry on the feeder: no estimate")
        else:
            rep = self._cycle.run(now, fleet, measurements=meas)
            self.last_report = rep
            notes += rep.notes
            authority = sum(c.reason.startswith("authority") for c in rep.commands)
            summary.update(
                # dispatch decided by the DERMS; the operator's and ADMS's decisions
                # carried out (setpoints, limits, releases of blocked DERs) apart
                cycle_id=rep.cycle_id, status=rep.status,
                commands=len(rep.commands) - authority, authority_commands=authority,
                command_ids=[c.command_id for c in rep.commands], violations=rep.violations,
                imminent=rep.imminent, violated_rows=rep.violated_rows[:20], n_rows=rep.n_rows,
                n_fixed=rep.n_fixed, timings={**rep.timings,
                                              "loop_total_s": time.perf_counter() - t0},
                estimation=jsonable(rep.estimation), ac_check=jsonable(rep.ac_check))
            self._keep_state(now, rep, tel, summary, notes)
        summary["notes"] = notes
        self._audit_cycle(now, summary, verdicts)
        self.cycles += 1
        self.last_summary = summary
        return summary

    def _keep_state(self, now: datetime, rep: CycleReport, tel: dict, summary: dict,
                    notes: list[str]) -> None:
        """The cycle's estimate as the feeder's state for the API (module docstring)."""
        if rep.v_pu is None or rep.branch_loading_pct is None:
            return
        d = self._ders
        self.state = cycle_state(
            self.feeder_id, now, index=self._cycle.index,
            node_names=self._cycle.node_names.tolist(), v_pu=rep.v_pu,
            branch_loading_pct=rep.branch_loading_pct, limits=self.fast_config.limits,
            der_ids=[x.der_id for x in d], active=[x.active for x in d],
            p_gen_max_kw=[x.p_gen_max_kw for x in d],
            p_charge_max_kw=[x.p_charge_max_kw for x in d], telemetry=tel,
            thresholds=self.config.monitor.availability, estimation=summary["estimation"],
            control={k: summary[k] for k in ("cycle_id", "status", "violations", "imminent",
                                             "commands")},
            topology=self._meas.topology, notes=notes)
        self.state_error = None

    def _audit_cycle(self, now: datetime, summary: dict, verdicts) -> None:
        key = (summary["status"], tuple(summary["stale"]), tuple(summary["escalated"]))
        quiet = (summary["status"] == "clear" and not summary["commands"]
                 and not summary.get("authority_commands") and not verdicts
                 and not summary["acknowledged"] and not summary["topology_reloaded"])
        if quiet and key == self._last_quiet:
            return
        self._last_quiet = key if quiet else None
        detail = {k: v for k, v in summary.items() if k != "scores"}
        with self.sessions.begin() as s:
            append_audit(s, actor=self.actor, action="control_cycle", entity="feeder",
                         entity_id=self.feeder_id, detail=jsonable(detail), t=now)



def _count(states) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in states:
        out[s] = out.get(s, 0) + 1
    return out


__all__ = ["CycleMixin"]
