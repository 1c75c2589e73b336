"""Monitoring of one feeder: state estimate from the latest telemetry, AMI and the grid model;
limit violations; DER availability; alarms in the store.

Inputs read from the store at each :meth:`FeederMonitor.run_once`:

* **AMI voltages**: the feeder's meters (``Meter.feeder_id``), quantity ``v_pu`` (preferred)
  or ``v_v``, the latest good reading within ``meter_window_s`` before ``now`` (any
  source). A meter maps to model nodes by ``Meter.bus`` (lower-cased, the OpenDSS bus name)
  and ``Meter.phase``: ``a``/``b``/``c`` → nodes ``bus.1``/``bus.2``/``bus.3``. A
  single-phase meter reports ``v_pu`` or ``v_v`` (or the per-phase name below); a
  multi-phase meter (``ab``, ``bc``, ``ca``, ``abc``) reports one line-to-neutral magnitude
  per phase, ``v_a_pu``/``v_b_pu``/``v_c_pu`` (or ``v_a_v``, ...); a plain ``v_pu`` from a
  multi-phase meter is ambiguous on an unbalanced feeder and is not used. ``v_v`` is divided by the node's
  line-to-neutral voltage base from the model (so a meter on a primary bus reports primary
  volts). A meter without bus or phase, or at a bus the model does not have, is skipped
  with a logged warning; several readings on one node are averaged (sigma / sqrt(n)).
* **Feeder head (SCADA)**: the meter with id ``<feeder_id>-head`` (:func:`head_meter_id`):
  per-phase ``p_a_kw``, ``p_b_kw``, ``p_c_kw``, ``q_a_kvar``, ``q_b_kvar``, ``q_c_kvar``
  (power the feeder draws from the substation, **import positive**), used only when all
  phases of the source are present and fresh; its ``v_pu``/``v_v`` with bus and phase is an
  ordinary voltage measurement.
* **AMI power**: a meter's latest good ``p_kw`` (and ``q_kvar``) within the window — the
  interval's average power, consumption positive — measures the load at the meter's bus
  when exactly one load of the model sits there (as on IEEE 8500's service buses); with
  several loads at the bus the reading is ambiguous and not used (noted). Sigma
  ``ami_p_sigma_frac`` of the value (at least ``ami_p_sigma_min_kw``): meter class plus
  the gap between an interval average and the instant estimated.
* **Pseudo-measurements**: every load of the model at its base kW/kvar × ``load_multiplier``
  (a number or a function of time, e.g. a profile), sigma ``pseudo_sigma_frac`` of the value,
  scaled by what the estimates so far say of the loads' real spread (the estimator's
  ``prior_scale="auto"`` started from the last cycle's posterior,
  :class:`~derms.analysis.se_prior.ScaleTracker`; only a converged estimate without bad
  data informs later ones; where a cycle cannot calibrate, e.g. with AMI power rows, the
  tracked scale is used as it stands; the state reports the scale used and how many cycles
  informed it).
* **Topology**: the latest ``TopologyEvent`` per switch (``t <= now``) is applied to the
  engine (``open``/``close`` of the switch's line, terminal 1) before estimating.
* **DER devices**: devices of the sites on the feeder (``DerSite.feeder_id``) with their
  latest ``p_kw`` (import positive at the device, see :mod:`.availability`).

Regulator taps and capacitor states are those of the model's base-case solve, then frozen
(OpenDSS ``controlmode=off``): the estimator needs them known (SCADA would supply them).
Limits are absolute (:class:`~derms.analysis.constraints.Limits`): a feeder that breaks a
limit in its base case keeps an alarm open for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from derms.analysis.constraints import Limits, detect_violations
from derms.analysis.se_posterior import describe_possible, possible_overloads
from derms.analysis.se_prior import ScaleTracker
from derms.analysis.state_estimation import Measurements, estimate_state
from derms.errors import ConvergenceError, ModelError
from derms.grid.elements import PHASE_NODES, bus_of
from derms.monitoring.alarms import AlarmCondition, sync_alarms
from derms.monitoring.availability import (
    OFFLINE,
    ONLINE,
    AvailabilityThresholds,
    classify_availability,
)
from derms.monitoring.state import FeederState
from derms.monitoring.telemetry import latest_readings, series_of
from derms.powerflow.collect import StepCollector, build_index
from derms.powerflow.control_state import (
    capture_control_state,
    regulated_transformers,
    restore_control_state,
)
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from derms.powerflow.linear_branches import branch_current_matrix
from derms.store.db import make_session_factory
from derms.store.models import (
    DerDevice,
    DerSite,
    DeviceStatus,
    Meter,
    Severity,
    SwitchState,
    TopologyEvent,
)
from derms.store.types import ensure_utc

log = logging.getLogger(__name__)

PHASE_NODE = PHASE_NODES  # phase letter -> OpenDSS node (derms.grid.elements)
HEAD_P = ("p_a_kw", "p_b_kw", "p_c_kw")
HEAD_Q = ("q_a_kvar", "q_b_kvar", "q_c_kvar")
VOLTAGE_QUANTITIES = ("v_pu", "v_v")  # single-phase meters
POWER_QUANTITIES = ("p_kw", "q_kvar")  # AMI interval-average power of a service point
PHASE_VOLTAGE_QUANTITIES = tuple(f"v_{p}_{u}" for p in "abc" for u in ("pu", "v"))


def head_meter_id(feeder_id: str) -> str:
    """Id of the meter that carries a feeder's head SCADA (``<feeder_id>-head``)."""
    return f"{feeder_id}-head"


@dataclass(frozen=True)
class MonitorConfig:
    """Settings of a feeder monitor (units in the names; sigmas are standard deviations)."""

    meter_window_s: float = 900.0  # AMI readings older than this are not used (and alarm)
    v_sigma_pu: float = 0.01
    head_sigma_frac: float = 0.01
    head_sigma_min_kw: float = 1.0
    pseudo_sigma_frac: float = 0.3  # profile uncertainty (state_estimation default)
    pseudo_sigma_min_kw: float = 0.1
    ami_p_sigma_frac: float = 0.05
    ami_p_sigma_min_kw: float = 0.05
    load_multiplier: float | Callable[[datetime], float] = 1.0
    limits: Limits = field(default_factory=Limits)
    availability: AvailabilityThresholds = field(default_factory=AvailabilityThresholds)
    critical_v_low_pu: float = 0.90  # beyond these an alarm is critical, else warning
    critical_v_high_pu: float = 1.10
    critical_loading_pct: float = 120.0
    alarms: bool = True
    # branches estimated at or above this loading get the estimate's posterior spread;
    # those over their rating with at least this probability are reported as possible
    # overloads (the estimate alone says "clear" where unmetered load hides one)
    possible_from_pct: float = 80.0
    possible_probability: float = 0.1
    # let the regulators and switched capacitors act at the estimated loads, freeze them
    # there and re-estimate, up to this many times (0: frozen at the base case)
    settle_controls: int = 3
    # largest-normalised-residual elimination: AMI voltage rows flagged as bad data are
    # left out and the estimate repeated, at most this many times per run
    bad_data_removals: int = 3

    def multiplier(self, now: datetime) -> float:
        m = self.load_multiplier
        return float(m(now) if callable(m) else m)


class FeederMonitor:
    """Monitor of one feeder: an OpenDSS engine of its model and the network index.

    Parameters
    ----------
    feeder_id : str
        The feeder's id in the store.
    master : path
        The feeder's OpenDSS master file (compiled from a private copy).
    db : sqlalchemy Engine
        The store.
    config : MonitorConfig
    """

    def __init__(self, feeder_id: str, master: str | Path, db: Engine,
                 config: MonitorConfig | None = None) -> None:
        self.feeder_id = feeder_id
        self.master = Path(master).resolve()
        self.model_version: int | None = None  # the registered version, when built from one
        self.db = db
        self.sessions = make_session_factory(db)
        self.config = config or MonitorConfig()
        self.engine = OpenDSSEngine(master, SolveSettings(tolerance=1e-6))
        self.engine.solve_snapshot()  # controls settle once on the base case, then freeze
        self.engine.set_control_mode("off")
        self.engine.solve_snapshot()
        self.index = build_index(self.engine)
        self.node_names = self.engine.node_names()
        self._node_pos = {s: i for i, s in enumerate(self.node_names)}
        self._node_base_v = node_base_v(self.index)
        self.branch_names = [f"{e}.{p}" for e, p in
                             zip(self.index.branch_element, self.index.branch_phase)]
        self.load_names, self.base_p_kw, self.base_q_kvar = _load_table(self.engine)
        self._loads_at_bus, self._load_nodes = _loads_by_bus(self.engine, self.load_names)
        self.topology: dict[str, str] = {}
        # what successive estimates say of the loads' spread around the pseudo-loads
        self.scale_tracker = ScaleTracker()
        self._regulated = regulated_transformers(self.engine)

    def close(self) -> None:
        self.engine.close()

    # -- one cycle ------------------------------------------------------------------------
    def run_once(self, now: datetime) -> FeederState:
        """Estimate, check limits and availability at ``now``; sync alarms; return the state."""
        now = ensure_utc(now, "now")
        t0 = time.perf_counter()
        cfg = self.config
        notes: list[str] = []
        unapplied = self._apply_topology(now, notes)
        with self.db.connect() as conn:
            meters, m_series, m_last = self.read_meters(conn, now)
            taps = self.read_taps(conn, now)
        telemetered = self._apply_taps(taps, notes)  # RegControl -> tap held at its reading
        with self.db.connect() as conn:
            devices = conn.execute(
                select(DerDevice.der_id, DerDevice.status, DerDevice.p_gen_max_kw,
                       DerDevice.p_charge_max_kw, DerSite.bus)
                .join(DerSite, DerDevice.site_id == DerSite.site_id)
                .where(DerSite.feeder_id == self.feeder_id).order_by(DerDevice.der_id)).all()
            d_series = series_of(conn, der_ids=[d.der_id for d in devices], quantities=("p_kw",))
            d_last = latest_readings(conn, d_series["series_id"].tolist(),
                                     now - timedelta(seconds=cfg.availability.offline_after_s),
                                     now)
        d_last = d_last.merge(d_series, on="series_id")
        meas, stale_meters, estimation = self.build_measurements(meters, m_series, m_last,
                                                                 now, notes)
        failed = None
        if meas is not None:
            try:
                est = self._estimate_without_bad_data(meas, notes, telemetered)
            except (ConvergenceError, ModelError) as exc:  # the cycle goes on: the
                # availability and alarms below do not depend on the estimate
                log.warning("monitor_estimation_failed feeder=%s error=%s", self.feeder_id,
                            exc)
                failed, meas = str(exc), None
                notes.append(f"state estimation failed ({exc}): power flow of the "
                             "pseudo-measurements instead")
        if meas is not None:
            if (est.prior_log_scale_post is not None and est.converged
                    and not est.bad_data):  # only a clean estimate informs the next ones
                self.scale_tracker.update(*est.prior_log_scale_post)
            v_est, loading = est.v_pu, est.branch_loading_pct
            estimation.update(
                method="wls", converged=est.converged, iterations=est.iterations,
                chi2=est.chi2, chi2_dof=est.chi2_dof, chi2_threshold=est.chi2_threshold,
                bad_data=est.bad_data, largest_nr_row=est.largest_nr_label,
                prior_scale=est.prior_scale, load_level=list(est.load_level),
                estimator_notes=list(est.notes),
                prior_scale_snapshots=self.scale_tracker.n_updates,
                head_p_kw=[float(x) for x in est.head_p_kw])
            estimation["possible_overloads"] = self._possible_overloads(est, loading, notes)
        else:
            if failed is None:
                notes.append("no fresh telemetry: power flow of the pseudo-measurements only")
            mult = estimation["load_multiplier"]
            v_est, loading, head_p = self._pseudo_flow(self.base_p_kw * mult,
                                                       self.base_q_kvar * mult)
            estimation.update(method="pseudo_power_flow", converged=failed is None,
                              iterations=0, head_p_kw=[float(x) for x in head_p],
                              estimation_error=failed)

        report = detect_violations(
            pd.DatetimeIndex([now]), 0.0, v_pu=v_est[None, :], node_names=self.index.node_bus,
            node_phases=self.index.node_phase, loading_pct=loading[None, :],
            branch_names=self.index.branch_element, branch_phases=self.index.branch_phase,
            limits=cfg.limits)
        avail = self._availability(devices, d_last, now)
        avail = self._isolated(avail, devices, v_est, notes)

        alarm_info: dict[str, Any] = {}
        if cfg.alarms:
            conds = self._conditions(report.events, avail, devices, stale_meters,
                                     model_only=estimation["method"] == "pseudo_power_flow",
                                     failed=failed, unapplied=unapplied)
            with self.sessions.begin() as session:
                sync = sync_alarms(session, self.feeder_id, conds, now)
            alarm_info = {"raised": sync.raised, "cleared": sync.cleared, "open": sync.open}
        estimation["duration_s"] = time.perf_counter() - t0
        return FeederState(
            feeder_id=self.feeder_id, t=now, node_names=list(self.node_names), v_pu=v_est,
            branch_names=self.branch_names, branch_loading_pct=loading,
            violations=report.events, availability=avail, estimation=estimation,
            alarms=alarm_info, topology=dict(self.topology), notes=notes)

    def _possible_overloads(self, est, loading: np.ndarray, notes: list[str]) -> list[dict]:
        """Branches within the estimate's uncertainty of their rating (module
        :mod:`derms.analysis.se_posterior`): the probability that each one estimated at
        ``possible_from_pct`` or more, but not over the limit, is over it in truth."""
        cfg, lim = self.config, self.config.limits
        limit = lim.thermal_count_pct
        ix = self.index
        cand = np.flatnonzero(np.isfinite(loading) & (loading >= cfg.possible_from_pct)
                              & (loading <= limit) & (ix.branch_norm_a > 0))
        if not cand.size or est.posterior is None:
            return []
        m_y = branch_current_matrix(self.engine, ix, y_order=True)[0][cand]
        rows, _, _ = possible_overloads(est.posterior, m_y, loading[cand], ix.branch_norm_a[cand],
                                        limit, (ix.branch_element[cand],
                                                ix.branch_phase[cand]),
                                        cfg.possible_probability)
        if rows:
            notes.append(describe_possible(rows, "branch conductor(s)"))
        return rows

    def _estimate(self, meas: Measurements, notes: list[str],
                  taps: dict[str, float] | None = None):
        """Estimate with the controls where the feeder's own would be: the regulators
        and switched capacitors of the model are frozen in the estimate (its Jacobian is
        for fixed taps), so after each estimate they act once at the estimated loads (as
        the real ones do at the real loads) and, where a tap or capacitor moved, the
        estimate is repeated at the new positions (``settle_controls`` times at most),
        kept only if it fits the measurements better (lower chi-square), else the
        positions go back. Taps stay where they settled: the next cycle starts from them. IEEE 34 with its
        regulators 1-3 steps from the base case: 0.023 pu off with the taps frozen there
        (bench/README.md). Telemetered taps (``taps``: RegControl -> tap [pu]) are held at
        their readings; the other regulators and the capacitors settle."""
        est = estimate_state(self.engine, meas, index=self.index, restore=True,
                             prior_log_scale=self.scale_tracker.prior())
        moves = 0
        for _ in range(self.config.settle_controls):
            if not est.converged:  # (bad data is no reason to stop: taps that are off
                break              # look like bad data)
            kept = capture_control_state(self.engine, self._regulated)
            again = None
            try:  # a failure here costs the settling, never the estimate in hand
                if not self._settle_controls(est, taps):
                    break
                again = estimate_state(self.engine, meas, index=self.index, restore=True,
                                       prior_log_scale=self.scale_tracker.prior())
            except (ConvergenceError, ModelError) as exc:
                log.warning("monitor_settle_failed feeder=%s error=%s", self.feeder_id, exc)
            if again is None or not again.converged or again.chi2 >= est.chi2:
                # the meters fit the positions before no worse: those stand (a regulator
                # held by its operator, or a band the truth has not left)
                restore_control_state(self.engine, kept)
                self.engine.solve()
                break
            est, moves = again, moves + 1
        if moves:
            notes.append(f"regulators/capacitors moved at the estimated loads and fit the "
                         f"meters better there; re-estimated at their new positions "
                         f"({moves} time(s))")
        return est

    def _estimate_without_bad_data(self, meas: Measurements, notes: list[str],
                                   taps: dict[str, float] | None = None):
        """:meth:`_estimate`, then largest-normalised-residual elimination: while the
        estimate flags bad data on an AMI voltage row, that node's voltage is left out and
        the estimate repeated (``bad_data_removals`` times at most; a note names each).
        One meter reading 0 V (or volts sent as pu) on an energised node otherwise pulled
        the loads around it: on the European LV feeder one 0 V reading of 55 took the
        largest voltage error from 0.0015 to 0.0098 pu, one 120 pu reading to 0.41 pu
        with 1,713 limit alarms.

        Each repeat starts from the controls' positions before the first estimate: those
        settled at the estimate that fitted the bad reading are its work, not the
        feeder's (IEEE 13, one 1.3 pu reading: taps moved two steps, a good reading was
        then left out as well and the estimate was 0.042 pu off). An estimate the bad
        reading kept from converging is treated the same (a 0 V reading: 0.38 pu off)."""
        start = capture_control_state(self.engine, self._regulated)
        est = self._estimate(meas, notes, taps)
        removed = []
        for _ in range(self.config.bad_data_removals):
            label = est.largest_nr_label
            if not (est.bad_data and label.startswith("v:")):
                break
            node = label[2:].lower()
            keep = np.array([str(n).lower() != node for n in meas.v_nodes], dtype=bool)
            if keep.all() or not keep.any():
                break
            trial = replace(meas, v_nodes=[n for n, k in zip(meas.v_nodes, keep) if k],
                            v_pu=np.asarray(meas.v_pu)[keep],
                            v_sigma_pu=np.asarray(meas.v_sigma_pu)[keep])
            settled = capture_control_state(self.engine, self._regulated)
            try:
                restore_control_state(self.engine, start)
                again = self._estimate(trial, notes, taps)
            except (ConvergenceError, ModelError) as exc:
                log.warning("monitor_bad_data_removal_failed feeder=%s node=%s error=%s",
                            self.feeder_id, node, exc)
                again = None
            if again is None or (est.converged and not again.converged):
                restore_control_state(self.engine, settled)  # the estimate in hand stands
                self.engine.solve()
                break
            nr = float(est.normalised_residual[est.largest_nr_row])
            removed.append(f"{node} (normalised residual {nr:.1f})")
            meas, est = trial, again
        if removed:
            notes.append("bad data: voltage reading(s) left out of the estimate: "
                         + ", ".join(removed))
        notes[:] = list(dict.fromkeys(notes))  # each repeat says the same of the controls
        return est

    def _settle_controls(self, est, taps: dict[str, float] | None = None) -> bool:
        """Let the controls act at the estimated loads, then freeze them there (loads back
        at base; telemetered ``taps`` set back to their readings); True when a tap or
        capacitor step moved."""
        n_reg = len(self._regulated)
        if (not n_reg or len(taps or {}) >= n_reg) and not self.engine.circuit.CapControls.Count:
            return False
        pos = {n: i for i, n in enumerate(self.load_names)}
        p, q = self.base_p_kw.copy(), self.base_q_kvar.copy()
        for n, pk, qk in zip(est.load_names, est.load_p_kw, est.load_q_kvar, strict=True):
            i = pos.get(str(n).lower())
            if i is not None:
                p[i], q[i] = pk, qk
        before = capture_control_state(self.engine, self._regulated)
        loads = self.engine.circuit.Loads
        try:
            _set_loads(loads, p, q)
            self.engine.set_control_mode("static")
            self.engine.solve()
        finally:
            self.engine.set_control_mode("off")
            _set_loads(loads, self.base_p_kw, self.base_q_kvar)
            self._set_taps(taps or {})
            self.engine.solve()
        return capture_control_state(self.engine, self._regulated) != before

    # -- measurements (shared with the control loop) ----------------------------------------
    def read_meters(self, conn, now: datetime):
        """``(meters, m_series, m_last)``: the feeder's meters, their series and the latest
        good reading of each within ``meter_window_s`` before ``now`` (merged)."""
        reg = self.regulator_meter_prefix
        meters = [m for m in conn.execute(select(Meter.meter_id, Meter.bus, Meter.phase).where(
            Meter.feeder_id == self.feeder_id)).all() if not m.meter_id.startswith(reg)]
        m_series = series_of(conn, meter_ids=[m.meter_id for m in meters],
                             quantities=VOLTAGE_QUANTITIES + PHASE_VOLTAGE_QUANTITIES
                             + HEAD_P + HEAD_Q + POWER_QUANTITIES)
        m_last = latest_readings(conn, m_series["series_id"].tolist(),
                                 now - timedelta(seconds=self.config.meter_window_s), now)
        return meters, m_series, m_last.merge(m_series, on="series_id")

    @property
    def regulator_meter_prefix(self) -> str:
        """Meter id prefix of regulator tap telemetry: ``<feeder_id>-reg-<regcontrol>``."""
        return f"{self.feeder_id}-reg-"

    def read_taps(self, conn, now: datetime) -> dict[str, float]:
        """RegControl name -> its winding's latest tap ratio [pu] within ``meter_window_s``
        (quantity ``tap_pu`` of meter ``<feeder_id>-reg-<regcontrol>``)."""
        reg = self.regulator_meter_prefix
        ids = conn.execute(select(Meter.meter_id).where(
            Meter.feeder_id == self.feeder_id, Meter.meter_id.startswith(reg))).scalars().all()
        if not ids:
            return {}
        ser = series_of(conn, meter_ids=list(ids), quantities=("tap_pu",))
        last = latest_readings(conn, ser["series_id"].tolist(),
                               now - timedelta(seconds=self.config.meter_window_s), now)
        last = last.merge(ser, on="series_id").sort_values("t")
        return {str(m)[len(reg):].lower(): float(v)
                for m, v in zip(last["meter_id"], last["value"], strict=True)}

    def _apply_taps(self, taps: dict[str, float], notes: list[str]) -> dict[str, float]:
        """Set the regulators' taps from telemetry (controls stay frozen); returns the
        telemetered taps of the model's regulators (RegControl -> tap [pu])."""
        if not taps:
            return {}
        rc = self.engine.circuit.RegControls
        known = {}
        k = rc.First
        while k > 0:
            known[rc.Name.lower()] = (rc.Transformer, int(rc.Winding))
            k = rc.Next
        unknown = sorted(set(taps) - set(known))
        if unknown:
            notes.append(f"tap telemetry for unknown regulator(s) ignored: {unknown[:5]}")
        used = {n: t for n, t in taps.items() if n in known}
        if used:
            self._set_taps(used)
            try:
                self.engine.solve()
            except ConvergenceError as exc:  # the estimate reports its own failure
                notes.append(f"solve at the telemetered taps failed: {exc}")
            notes.append(f"regulator taps from telemetry: {len(used)} of {len(known)}")
        return used

    def _set_taps(self, taps: dict[str, float]) -> None:
        """Set the tap [pu] of each named RegControl's winding (no solve)."""
        rc, tr = self.engine.circuit.RegControls, self.engine.circuit.Transformers
        for name, tap in taps.items():
            rc.Name = name
            tr.Name = rc.Transformer
            tr.Wdg = int(rc.Winding)
            tr.Tap = tap

    def build_measurements(self, meters, m_series, m_last, now: datetime, notes: list[str]
                           ) -> tuple[Measurements | None, list, dict[str, Any]]:
        """The estimator's measurements from the meters' latest readings (module docstring):
        ``(measurements or None without any fresh voltage, head or AMI power reading,
        stale meters, counts)``; the pseudo-measurements are the loads at their base x the
        configured multiplier."""
        cfg = self.config
        v_nodes, v_pu, v_sigma, stale_meters = self._voltage_rows(meters, m_series, m_last, notes)
        head = self._head_rows(m_last, notes)
        head_id = head_meter_id(self.feeder_id)
        if head is None and head_id not in set(m_last["meter_id"]) and (
                (m_series["meter_id"] == head_id) & m_series["quantity"].isin(
                    HEAD_P + HEAD_Q)).any():
            # the head's SCADA has reported before and is silent now: the estimate loses
            # its only power measurement; as stale as a silent AMI meter, and said so
            stale_meters = [*stale_meters, head_id]
            notes.append(f"head SCADA ({head_id}): no reading in the last "
                         f"{cfg.meter_window_s:.0f} s: not used")
        ami = self._power_rows(meters, m_last, notes)
        mult = cfg.multiplier(now)
        info: dict[str, Any] = {"load_multiplier": mult, "n_voltage": len(v_nodes),
                                "n_head": 0 if head is None else len(head[0]),
                                "n_ami_p": len(ami["ami_p_loads"]),
                                "n_ami_q": len(ami["ami_q_loads"])}
        if not len(v_nodes) and head is None and not len(ami["ami_p_loads"]):
            return None, stale_meters, info
        xp, xq = self.base_p_kw * mult, self.base_q_kvar * mult
        meas = Measurements(
            v_nodes=v_nodes, v_pu=v_pu, v_sigma_pu=v_sigma, load_names=self.load_names,
            load_p_kw=xp, load_q_kvar=xq,
            load_p_sigma_kw=np.maximum(cfg.pseudo_sigma_frac * np.abs(xp),
                                       cfg.pseudo_sigma_min_kw),
            load_q_sigma_kvar=np.maximum(cfg.pseudo_sigma_frac * np.abs(xq),
                                         cfg.pseudo_sigma_min_kw),
            **ami, **({} if head is None else {
                "head_p_kw": head[0], "head_q_kvar": head[1],
                "head_p_sigma_kw": head[2], "head_q_sigma_kvar": head[3]}))
        return meas, stale_meters, info

    # -- pieces ---------------------------------------------------------------------------
    def _apply_topology(self, now: datetime, notes: list[str]) -> dict[str, str]:
        """Apply the latest switch state of each switch (events with ``t <= now``). Closing
        also enables the element: a tie switch a model leaves disabled (EPRI ckt7's
        line.175012) was reported closed and stayed out of the circuit. Returns the
        switches the model could not take (name -> engine message): retried every run,
        each an alarm until then."""
        last = (select(TopologyEvent.switch, func.max(TopologyEvent.t).label("t"))
                .where(TopologyEvent.feeder_id == self.feeder_id, TopologyEvent.t <= now)
                .group_by(TopologyEvent.switch).subquery())
        stmt = (select(TopologyEvent.switch, TopologyEvent.state, TopologyEvent.id)
                .join(last, (TopologyEvent.switch == last.c.switch) & (TopologyEvent.t == last.c.t))
                .where(TopologyEvent.feeder_id == self.feeder_id).order_by(TopologyEvent.id))
        with self.db.connect() as conn:
            latest = {r.switch.lower(): r.state for r in conn.execute(stmt)}
        changed = False
        unapplied: dict[str, str] = {}
        for switch, state in latest.items():
            state = SwitchState(state)
            if self.topology.get(switch) == state.value:
                continue
            verb = "open" if state == SwitchState.OPEN else "close"
            element = switch if "." in switch else f"line.{switch}"
            try:
                if verb == "close":  # a tie the model leaves disabled (normally open)
                    self.engine.command(f"enable {element}")
                self.engine.command(f"{verb} {element} term=1")
            except ModelError as exc:
                log.warning("monitor_topology feeder=%s switch=%s error=%s",
                            self.feeder_id, switch, exc)
                notes.append(f"switch {switch!r} not applied: {exc}")
                unapplied[switch] = str(exc)
                continue
            self.topology[switch] = state.value
            changed = True
        if changed:
            self.engine.solve()  # energised nodes of the new topology (meters on dead ones skip)
        return unapplied

    def _voltage_rows(self, meters, m_series: pd.DataFrame, m_last: pd.DataFrame,
                      notes: list[str]):
        """AMI voltage measurements per node, and the meters with a voltage series but no
        fresh reading (see the module docstring for the mapping)."""
        is_v = m_last["quantity"].isin(VOLTAGE_QUANTITIES + PHASE_VOLTAGE_QUANTITIES)
        last = {(r.meter_id, r.quantity): float(r.value)
                for r in m_last[is_v].sort_values("t").itertuples(index=False)}
        has_series = set(m_series.loc[m_series["quantity"].isin(
            VOLTAGE_QUANTITIES + PHASE_VOLTAGE_QUANTITIES), "meter_id"])
        fresh = {m for m, _ in last}
        live = self.engine.node_voltages_pu() >= 0.1  # de-energised nodes cannot be metered
        rows: dict[str, list[float]] = {}
        skipped, stale = [], []
        for m in meters:
            if m.meter_id not in fresh:
                if m.meter_id in has_series:
                    stale.append(m.meter_id)
                continue
            if not m.bus or m.phase is None:
                log.warning("monitor_meter_skipped feeder=%s meter=%s reason=no_bus_or_phase",
                            self.feeder_id, m.meter_id)
                skipped.append(m.meter_id)
                continue
            phase = str(getattr(m.phase, "value", m.phase))
            bus = bus_of(m.bus)  # node suffixes ("671.1") name the bus's nodes
            letters = phase
            ll = self._line_to_line_node(bus, phase)
            if ll is not None and not any((m.meter_id, f"v_{x}_{u}") in last
                                          for x in phase for u in ("pu", "v")):
                letters = phase[0]  # one line-to-line value: the node measured across
            for letter in letters:
                name = f"{bus}.{PHASE_NODE[letter]}"
                wanted = (f"v_{letter}_pu", f"v_{letter}_v")
                if len(letters) == 1:
                    wanted = ("v_pu", "v_v", *wanted)
                q = next((q for q in wanted if (m.meter_id, q) in last), None)
                if q is None:
                    log.warning("monitor_meter_skipped feeder=%s meter=%s node=%s "
                                "reason=no_phase_voltage", self.feeder_id, m.meter_id, name)
                    skipped.append(m.meter_id)
                    continue
                i = self._node_pos.get(name)
                if i is None or not live[i]:
                    log.warning("monitor_meter_skipped feeder=%s meter=%s node=%s reason=%s",
                                self.feeder_id, m.meter_id, name,
                                "unknown_node" if i is None else "de_energised")
                    skipped.append(m.meter_id)
                    continue
                v = last[(m.meter_id, q)]
                rows.setdefault(name, []).append(v if q.endswith("_pu")
                                                 else v / self._node_base_v[i])
        if skipped:
            notes.append(f"meters skipped (no bus/phase, no per-phase value, unknown or dead "
                         f"node): {sorted(set(skipped))[:20]}")
        names = list(rows)
        v = np.array([np.mean(rows[s]) for s in names])
        sig = np.array([self.config.v_sigma_pu / np.sqrt(len(rows[s])) for s in names])
        return names, v, sig, stale

    def _line_to_line_node(self, bus: str, phase: str) -> int | None:
        """Index of node ``bus.<phase[0]>`` where a two-phase meter (``ab``, ``bc``,
        ``ca``) reads what that node measures: the line-to-line voltage to its pair on
        an ungrounded area; None elsewhere."""
        pair = self.index.v_pair
        if len(phase) != 2 or pair is None:
            return None
        i = self._node_pos.get(f"{bus}.{PHASE_NODE[phase[0]]}")
        j = self._node_pos.get(f"{bus}.{PHASE_NODE[phase[1]]}")
        return i if i is not None and j is not None and pair[i] == j else None

    def _power_rows(self, meters, m_last: pd.DataFrame, notes: list[str]) -> dict[str, Any]:
        """AMI p_kw / q_kvar as measurements of the single load at each meter's bus, or of
        the one on the meter's phases where the bus has several (one per phase)."""
        cfg = self.config
        last = m_last[m_last["quantity"].isin(POWER_QUANTITIES)].sort_values("t")
        latest = last.groupby(["meter_id", "quantity"])["value"].last()
        out: dict[str, Any] = {"ami_p_loads": [], "ami_q_loads": []}
        vals: dict[str, list[float]] = {"p": [], "q": []}
        ambiguous = []
        for m in meters:
            if not m.bus:
                continue
            load = _meter_load(self._loads_at_bus.get(bus_of(m.bus), []),
                               self._load_nodes, m.phase)
            for kind, q in (("p", "p_kw"), ("q", "q_kvar")):
                if (m.meter_id, q) not in latest.index:
                    continue
                if load is None:
                    ambiguous.append(m.meter_id)
                    continue
                if load in out[f"ami_{kind}_loads"]:
                    continue  # two meters on one load: the first one
                out[f"ami_{kind}_loads"].append(load)
                vals[kind].append(float(latest[(m.meter_id, q)]))
        if ambiguous:
            notes.append(f"AMI power not used (no single load at the meter's bus and "
                         f"phase): "
                         f"{sorted(set(ambiguous))[:20]}")
        for kind, unit in (("p", "kw"), ("q", "kvar")):
            if not out[f"ami_{kind}_loads"]:
                del out[f"ami_{kind}_loads"]
                continue
            z = np.asarray(vals[kind])
            out[f"ami_{kind}_{unit}"] = z
            out[f"ami_{kind}_sigma_{unit}"] = np.maximum(cfg.ami_p_sigma_frac * np.abs(z),
                                                         cfg.ami_p_sigma_min_kw)
        out.setdefault("ami_p_loads", [])
        out.setdefault("ami_q_loads", [])
        return out

    def _head_rows(self, m_last: pd.DataFrame, notes: list[str]):
        nph = self.index.source_phases
        head = m_last[m_last["meter_id"] == head_meter_id(self.feeder_id)]
        latest = head.sort_values("t").groupby("quantity")["value"].last()
        want = HEAD_P[:nph] + HEAD_Q[:nph]
        if head.empty:
            return None
        if not all(q in latest.index for q in want):
            notes.append(f"head SCADA incomplete (need {', '.join(want)}): not used")
            return None
        p = latest[list(HEAD_P[:nph])].to_numpy(float)
        q = latest[list(HEAD_Q[:nph])].to_numpy(float)
        cfg = self.config
        sp = np.maximum(cfg.head_sigma_frac * np.abs(p), cfg.head_sigma_min_kw)
        sq = np.maximum(cfg.head_sigma_frac * np.abs(q), cfg.head_sigma_min_kw)
        return p, q, sp, sq

    def _pseudo_flow(self, p: np.ndarray, q: np.ndarray):
        loads = self.engine.circuit.Loads
        try:
            _set_loads(loads, p, q)
            self.engine.solve()
            col = StepCollector(self.engine, self.index, 1)
            col.collect(0)
            with np.errstate(divide="ignore", invalid="ignore"):
                loading = np.where(self.index.branch_norm_a > 0,
                                   100 * col.i_a[0] / self.index.branch_norm_a, np.nan)
            return col.v_pu[0].astype(float), loading, col.head_p_kw[0].astype(float)
        finally:
            _set_loads(loads, self.base_p_kw, self.base_q_kvar)
            self.engine.solve()

    def _availability(self, devices, d_last: pd.DataFrame, now: datetime) -> pd.DataFrame:
        last = d_last.sort_values("t").groupby("der_id").tail(1).set_index("der_id")
        ids = [d.der_id for d in devices]
        t_last = last["t"].reindex(ids)
        age = np.array([(now - t).total_seconds() if isinstance(t, datetime) else np.nan
                        for t in t_last], dtype=float)
        return classify_availability(
            ids, active=[DeviceStatus(d.status) == DeviceStatus.ACTIVE for d in devices],
            p_gen_max_kw=[d.p_gen_max_kw for d in devices],
            p_charge_max_kw=[d.p_charge_max_kw for d in devices],
            age_s=age, p_kw=last["value"].reindex(ids).to_numpy(float),
            thresholds=self.config.availability)

    def _isolated(self, avail: pd.DataFrame, devices, v_pu: np.ndarray, notes: list[str]
                  ) -> pd.DataFrame:
        """A device whose site bus is de-energised in the estimate (every node below the
        energised threshold) can deliver nothing: its headroom is 0 and ``energised``
        false, whatever its telemetry says (it reported "online" with 60 kW of headroom
        behind an open switch). Devices without a known bus count as energised."""
        bus_of_der = {d.der_id: bus_of(d.bus or "") for d in devices}
        live = pd.Series(np.asarray(v_pu) >= self.config.limits.energised_min_pu).groupby(
            self.index.node_bus).any()
        energised = live.reindex([bus_of_der[i] for i in avail["der_id"]],
                                 fill_value=True).to_numpy(dtype=bool)
        out = avail.assign(energised=energised)
        out.loc[~energised, ["headroom_up_kw", "headroom_down_kw"]] = 0.0
        if (~energised).any():
            notes.append(f"{int((~energised).sum())} device(s) on de-energised buses: no "
                         "headroom (" + ", ".join(out.loc[~energised, "der_id"][:5]) + ")")
        return out

    def _conditions(self, events: pd.DataFrame, avail: pd.DataFrame, devices,
                    stale_meters: list[str], *, model_only: bool = False,
                    failed: str | None = None, unapplied: dict[str, str] | None = None
                    ) -> list[AlarmCondition]:
        """Alarm conditions of one run. ``model_only``: the voltages and loadings come from
        the pseudo-measurements alone (no telemetry, or the estimate failed), which the
        messages say; ``failed``: the estimator's error (an ``estimation_failed`` alarm);
        ``unapplied``: switch states the model could not take (a ``topology_not_applied``
        alarm each: an ADMS switching of an element the model does not have was accepted
        and only noted)."""
        cfg = self.config
        out = []
        basis = " (model only: no telemetry in the estimate)" if model_only else ""
        for e in events.itertuples(index=False):
            worst = float(e.worst)
            if e.kind in ("undervoltage", "overvoltage"):
                crit = worst < cfg.critical_v_low_pu or worst > cfg.critical_v_high_pu
                msg = (f"{e.kind} at {e.element}.{e.phase}: {worst:.4f} pu (limit {e.limit} "
                       f"pu){basis}")
            else:
                crit = worst > cfg.critical_loading_pct
                msg = (f"{e.kind} on {e.element} phase {e.phase}: {worst:.1f} % (limit "
                       f"{e.limit} %){basis}")
            out.append(AlarmCondition(
                kind=f"{e.kind}:{e.element}.{e.phase}",
                severity=Severity.CRITICAL if crit else Severity.WARNING, message=msg))
        active = {d.der_id for d in devices if DeviceStatus(d.status) == DeviceStatus.ACTIVE}
        for r in avail.itertuples(index=False):
            if r.der_id in active and r.state != ONLINE:
                age = "no reading" if np.isnan(r.age_s) else f"last reading {r.age_s:.0f} s ago"
                out.append(AlarmCondition(
                    kind="telemetry_stale", der_id=r.der_id,
                    severity=Severity.CRITICAL if r.state == OFFLINE else Severity.WARNING,
                    message=f"device {r.der_id} telemetry {r.state}: {age}"))
        head_id = head_meter_id(self.feeder_id)
        for m in stale_meters:
            what = "head P/Q" if m == head_id else "voltage"
            out.append(AlarmCondition(
                kind="telemetry_stale", meter_id=m, severity=Severity.WARNING,
                message=f"meter {m}: no {what} reading in the last {cfg.meter_window_s:.0f} s"))
        for switch, err in (unapplied or {}).items():
            out.append(AlarmCondition(
                kind=f"topology_not_applied:{switch}"[:64], severity=Severity.WARNING,
                message=f"switch {switch}: its reported state is not in the estimate "
                        f"({err[:200]})"))
        if failed is not None:
            out.append(AlarmCondition(
                kind="estimation_failed", severity=Severity.WARNING,
                message=f"state estimation failed: {failed[:300]}; voltages and loadings are "
                        "from the pseudo-measurements"))
        return out


def _load_table(engine: OpenDSSEngine) -> tuple[list[str], np.ndarray, np.ndarray]:
    loads = engine.circuit.Loads
    names = [s.lower() for s in loads.AllNames]
    if names == ["none"]:
        return [], np.zeros(0), np.zeros(0)
    p, q = np.empty(len(names)), np.empty(len(names))
    for i in range(len(names)):
        loads.idx = i + 1
        p[i], q[i] = loads.kW, loads.kvar
    return names, p, q


def _loads_by_bus(engine: OpenDSSEngine, names: list[str]
                  ) -> tuple[dict[str, list[str]], dict[str, frozenset[int]]]:
    """Bus (lower case, no nodes) -> names of the loads connected there; load name -> its
    phase nodes (1-3; all three where the bus name gives none)."""
    c = engine.circuit
    out: dict[str, list[str]] = {}
    nodes: dict[str, frozenset[int]] = {}
    for name in names:
        c.SetActiveElement(f"load.{name}")
        bus, *given = c.ActiveCktElement.BusNames[0].lower().split(".")
        out.setdefault(bus, []).append(name)
        ph = frozenset(int(n) for n in given if n.isdigit() and 1 <= int(n) <= 3)
        nodes[name] = ph or frozenset({1, 2, 3})
    return out, nodes


def node_base_v(index) -> np.ndarray:
    """Base [V] of each node's measured voltage: line to neutral, or line to line (x sqrt 3)
    on ungrounded areas, where ``v_pu`` is ``|V_a - V_b| / (sqrt 3 V_base_ln)``; a meter's
    ``v_v`` there is the line-to-line volts (divided by the line-to-neutral base it read
    sqrt 3 too high)."""
    base = index.node_kv_base_ln * 1000.0
    if index.v_pair is not None:
        base = base * np.where(index.v_pair >= 0, np.sqrt(3.0), 1.0)
    return base


def _meter_load(loads: list[str], load_nodes: dict[str, frozenset[int]], phase) -> str | None:
    """The one load at a meter's bus: the only one there, or the only one on exactly the
    meter's phases (a bus with a load per phase); None when that does not single one out."""
    if len(loads) == 1:
        return loads[0]
    if not phase:
        return None
    want = frozenset(PHASE_NODE[ch] for ch in str(getattr(phase, "value", phase)))
    same = [ld for ld in loads if load_nodes.get(ld) == want]
    return same[0] if len(same) == 1 else None


def _set_loads(loads, p: np.ndarray, q: np.ndarray) -> None:
    for i in range(p.size):
        loads.idx = i + 1
        loads.kW = float(p[i])  # kW first: setting kW re-derives kvar from the pf
        loads.kvar = float(q[i])


__all__ = ["FeederMonitor", "FeederState", "MonitorConfig", "head_meter_id"]
