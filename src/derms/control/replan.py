"""The slow re-plan of the control loop (issue 9): every ``period_s`` (default 900 s) plan
the next hours with the network-constrained dispatch optimiser and turn the plan's present
interval into commands.

One :meth:`Replanner.run` at ``now``:

1. **Case** (:func:`build_replan_case`). Horizon: ``horizon_h`` hours of ``step_s`` from
   ``now`` rounded down to the step, so interval 0 contains ``now``. Fleet from the loop's
   DER registry: batteries (``p_max_kw`` = the smaller non-zero of ``p_gen_max_kw`` /
   ``p_charge_max_kw``, ``e_max_kwh``, SOC from the latest ``soc_frac`` telemetry or
   ``soc_default_frac`` without one, bounds ``soc_min_frac``/``reserve_frac``, ending the
   horizon at least at its initial SOC unless ``soc_end_frac`` says otherwise); PV
   (available power = the clear-sky shape of
   :func:`derms.studies.profiles_library.clear_sky_pv` at ``latitude_deg``/
   ``longitude_deg`` × ``p_gen_max_kw`` × ``pv_derate``, curtailable, inverter
   ``s_max_kva``). Not in this increment: EV chargers and flexible loads (their sessions
   and baselines are not known to the loop), generators and wind; DERs the loop holds
   (inactive, stale telemetry, escalated) and batteries without ``e_max_kwh`` — all listed
   in the notes; they stay at zero in the forecast. Customer load forecast: every load of
   the model at its base kW × a load multiplier taken at each interval's midpoint: the
   loop passes the forecast service's latest head forecast where one is stored (see
   :meth:`derms.control.loop.ControlLoop.run_replan`), else its monitor's
   ``MonitorConfig.load_multiplier`` (a number or a function of time).
2. **Plan**: an :class:`~derms.dispatch.verify.ACNetwork` on a freshly compiled engine of
   the feeder (the loop's switch states applied; compiled, used and closed on the loop's
   thread within the run), :func:`~derms.dispatch.verify.plan_and_verify` with
   ``objective`` (default: peak shaving at the head, the ``ObjectiveConfig`` defaults,
   reactive power off because commands do not carry it), regulators and capacitors
   acting (``control_mode="static"``). The network limits are DESIGN.md's
   (``Limits()``); when that plan is infeasible it is tried once more with the limits at
   the violation edge (:func:`edge_limits`): an element whose base case is beyond its
   nominal limit but within the tolerance (IEEE 123: lines at 100-101 % of their rating,
   nodes just above 1.05 pu) is not pre-existing, so the LP must bring it under the
   nominal limit, which no DER may be able to do (measured: a flat forecast at night on
   IEEE 123 was infeasible by 0.1 A on line l7). When both fail, the
   :class:`~derms.errors.InfeasibleError` is reported (status ``infeasible``), no command.
3. **Commands** for interval 0, valid ``[now, interval end)``: each battery's planned net
   import as a ``p_setpoint``; each PV curtailed by more than ``min_curtail_kw`` as an
   ``export_limit`` at its planned output (and a lifting ``export_limit`` at its rating
   where an earlier re-plan's limit still stands and the plan no longer curtails). The
   reason names the binding constraint the plan's ledger gives the DER's move at that
   interval (else "peak shaving"). They go through the loop's sink (tracked, audited,
   IEEE 2030.5) and the loop's :class:`~derms.control.commands.CommandIssuer` (its
   ``last`` command per DER), so a fast-cycle command issued later for the same DER is a
   newer overlapping event of the same program and supersedes the plan's (IEEE 2030.5).

**Precedence** (fast cycle over plan): a DER whose last command came from the fast cycle
(cycle id ``fc-…``) gets no plan command while that command is valid or was issued less
than ``protect_cycles`` × the loop period ago — the fast cycle acts on present violations
and the plan must not undo it within the interval. Such DERs are still in the plan's
optimisation (as if they followed it) and are listed in ``protected``. A plan command
equal (``deadband_kw``) to the DER's standing plan command over the same interval is not
re-issued (one decision, one command).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits
from derms.control.commands import (
    CommandIssuer,
    CommandMode,
    CommandSink,
    DeviceCommand,
    command_id,
)
from derms.der.models import Battery, Connection, Fleet, Horizon, PVInverter
from derms.dispatch.plan import ObjectiveConfig, uncontrolled_schedule
from derms.errors import InfeasibleError, InputError
from derms.powerflow.profiles import Profiles
from derms.store.types import ensure_utc

log = logging.getLogger(__name__)
PLAN_PREFIX = "rp-"


@dataclass(frozen=True)
class ReplanConfig:
    """Settings of the re-plan (module docstring); units in the names."""

    period_s: float = 900.0
    horizon_h: float = 6.0
    step_s: float = 900.0
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(
        allow_pv_q=False))
    max_ac_rounds: int = 4
    control_mode: str = "static"  # regulators/capacitors in the plan's AC model
    network_limits: Limits | None = None  # None: Limits(), then edge_limits if infeasible
    soc_default_frac: float = 0.5
    soc_min_frac: float = 0.1
    reserve_frac: float = 0.1
    soc_end_frac: float | None = None  # None: at least the initial SOC at the horizon end
    latitude_deg: float = 37.0
    longitude_deg: float = -120.0
    pv_derate: float = 0.9
    min_curtail_kw: float = 0.1
    deadband_kw: float = 0.1
    protect_cycles: int = 3

    def __post_init__(self) -> None:
        if not self.period_s >= 60:
            raise InputError(f"re-plan period_s must be at least 60 s, got {self.period_s}")
        if not self.horizon_h > 0:
            raise InputError(f"re-plan horizon_h must be positive, got {self.horizon_h}")
        if not 60 <= self.step_s <= 3600:
            raise InputError(f"re-plan step_s must be in [60, 3600] s, got {self.step_s}")
        if self.n_steps < 1:
            raise InputError(f"re-plan horizon {self.horizon_h} h is shorter than one step "
                             f"({self.step_s} s)")
        if not 0 <= self.soc_min_frac <= 1 or not 0 <= self.reserve_frac <= 1:
            raise InputError("re-plan soc_min_frac and reserve_frac must be in [0, 1]")
        if self.protect_cycles < 0 or self.max_ac_rounds < 1:
            raise InputError("re-plan protect_cycles >= 0 and max_ac_rounds >= 1")

    @property
    def step(self) -> timedelta:
        return timedelta(seconds=self.step_s)

    @property
    def n_steps(self) -> int:
        return int(math.floor(self.horizon_h * 3600 / self.step_s + 1e-9))


@dataclass(frozen=True)
class ReplanDer:
    """A DER of the loop's registry as the re-plan sees it (nameplate, kW / kWh)."""

    der_id: str
    kind: str  # "pv", "battery", "ev", "flexible_load", ...
    nodes: tuple[str, ...]  # "bus.n" injection nodes of the model
    p_gen_max_kw: float = 0.0
    p_charge_max_kw: float = 0.0
    e_max_kwh: float | None = None
    s_max_kva: float | None = None


@dataclass(frozen=True)
class ReplanCase:
    fleet: Fleet
    profiles: Profiles
    notes: list[str]
    left_out: dict[str, str]  # der_id -> why


def edge_limits(limits: Limits) -> Limits:
    """``limits`` moved to the edge DESIGN.md counts a violation at (limit + tolerance),
    keeping a fifth of the tolerance: an element already beyond its nominal limit but
    within the tolerance in the base case is then not infeasible to hold."""
    return Limits(v_min_pu=limits.v_min_pu - 0.8 * limits.v_tol_pu,
                  v_max_pu=limits.v_max_pu + 0.8 * limits.v_tol_pu,
                  v_tol_pu=0.2 * limits.v_tol_pu,
                  thermal_pct=limits.thermal_pct + 0.8 * limits.thermal_tol_pct,
                  thermal_tol_pct=0.2 * limits.thermal_tol_pct,
                  reverse_power_kw=limits.reverse_power_kw,
                  energised_min_pu=limits.energised_min_pu)


def horizon_at(now: datetime, config: ReplanConfig) -> Horizon:
    """The re-plan horizon: ``now`` rounded down to the step (UTC epoch grid)."""
    now = ensure_utc(now, "now")
    s = int(config.step_s)
    start = datetime.fromtimestamp(int(now.timestamp()) // s * s, tz=now.tzinfo)
    return Horizon(start, config.step, config.n_steps)


def _connection(engine, terms: tuple[str, ...]) -> Connection:
    """The DER connection of a registry point: phase nodes "bus.n" (wye), or the node
    pairs "bus.a.b" of a DER on an ungrounded bus (delta: one pair is a 1-phase element
    between two phases, more pairs a 3-phase delta)."""
    bus = terms[0].split(".")[0]
    ckt = engine.circuit
    ckt.SetActiveBus(bus)
    kv_ln = float(ckt.ActiveBus.kVBase) or 1.0
    ends = [tuple(int(x) for x in t.split(".")[1:]) for t in terms]
    if any(len(e) == 2 for e in ends):
        nums = tuple(dict.fromkeys(n for e in ends for n in e))
        phases = 1 if len(ends) == 1 else len(nums)
        return Connection(bus, nums, phases, round(kv_ln * math.sqrt(3.0), 6), "delta")
    nums = tuple(e[0] for e in ends)
    kv = kv_ln if len(nums) == 1 else kv_ln * math.sqrt(3.0)
    return Connection(bus, nums, len(nums), round(kv, 6), "wye")


def build_replan_case(engine, ders: Sequence[ReplanDer], now: datetime,
                      config: ReplanConfig, *, soc_frac: Mapping[str, float] | None = None,
                      load_multiplier: float | Callable[[datetime], float] = 1.0,
                      held: Mapping[str, str] | None = None) -> ReplanCase:
    """The fleet and customer load forecast of a re-plan at ``now`` (module docstring).

    ``engine``: the compiled feeder the plan will run on (its loads and bus voltages are
    read); ``soc_frac``: latest measured SOC per battery; ``held``: DERs to leave out
    with the reason (inactive, stale, escalated)."""
    from derms.studies.profiles_library import clear_sky_pv

    h = horizon_at(now, config)
    times = pd.date_range(h.start, periods=h.n_steps, freq=h.step)
    soc_frac, held = soc_frac or {}, held or {}
    left: dict[str, str] = {}
    notes: list[str] = []
    pv_shape = clear_sky_pv(times, h.dt_h, config.latitude_deg, config.longitude_deg)
    pv, bat = [], []
    lo = max(config.soc_min_frac, config.reserve_frac)
    for d in ders:
        if d.der_id in held:
            left[d.der_id] = held[d.der_id]
            continue
        if d.kind == "battery":
            p = [x for x in (d.p_gen_max_kw, d.p_charge_max_kw) if x and x > 0]
            if not p or not d.e_max_kwh or d.e_max_kwh <= 0:
                left[d.der_id] = "battery without p_gen_max_kw/p_charge_max_kw or e_max_kwh"
                continue
            soc = soc_frac.get(d.der_id)
            if soc is None or not np.isfinite(soc):
                soc = config.soc_default_frac
            soc = float(np.clip(soc, lo, 1.0))
            end = None if config.soc_end_frac is None else float(
                np.clip(config.soc_end_frac, lo, 1.0))
            bat.append(Battery(d.der_id, _connection(engine, d.nodes), float(min(p)),
                               float(d.e_max_kwh), soc0_frac=soc,
                               soc_min_frac=config.soc_min_frac,
                               reserve_frac=config.reserve_frac, soc_end_min_frac=end))
        elif d.kind == "pv":
            if d.p_gen_max_kw <= 0:
                left[d.der_id] = "PV without p_gen_max_kw"
                continue
            s = float(d.s_max_kva or 1.1 * d.p_gen_max_kw)
            pv.append(PVInverter(d.der_id, _connection(engine, d.nodes),
                                 max(s, d.p_gen_max_kw),
                                 pv_shape * d.p_gen_max_kw * config.pv_derate))
        else:
            left[d.der_id] = f"{d.kind}: not planned in this increment (no session/baseline)"
    if left:
        notes.append(f"{len(left)} DER(s) left out of the re-plan (at zero in the forecast): "
                     + "; ".join(f"{k}: {v}" for k, v in list(left.items())[:20]))
    fleet = Fleet(h, tuple(pv), tuple(bat))
    names = [f"load.{n.lower()}" for n in engine.circuit.Loads.AllNames]
    if names == ["load.none"]:
        names = []
    mid = times + h.step / 2
    m = load_multiplier
    mult = np.array([float(m(t.to_pydatetime()) if callable(m) else m) for t in mid])
    if not np.isfinite(mult).all() or (mult < 0).any():
        raise InputError(f"re-plan load multiplier must be finite and >= 0, got {mult}")
    profiles = Profiles(start=h.start, step=h.step, elements=tuple(names),
                        p_mult=np.repeat(mult[:, None], len(names), axis=1))
    return ReplanCase(fleet, profiles, notes, left)


@dataclass
class ReplanResult:
    """One re-plan: its id and time, the horizon, what the plan gives (AC-checked peaks
    at the head [kW, import positive], violation counts of the plan on the AC model),
    the commands issued, DERs left to the fast cycle, timings [s], notes."""

    replan_id: str
    t: datetime
    status: str  # planned | infeasible | no_ders
    horizon: dict[str, Any]
    commands: list[DeviceCommand]
    protected: list[str]
    peak_before_kw: float | None = None
    peak_after_kw: float | None = None
    violations: dict[str, int] = field(default_factory=dict)
    violations_uncontrolled: dict[str, int] = field(default_factory=dict)
    ac_rounds: int = 0
    n_batteries: int = 0
    n_pv: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schedule: Any = None  # the plan's Schedule (not in the summary)

    def summary(self) -> dict[str, Any]:
        def r(x):
            return None if x is None or not np.isfinite(x) else round(float(x), 3)

        return {"replan_id": self.replan_id, "t": self.t.isoformat(), "status": self.status,
                "horizon": self.horizon, "n_batteries": self.n_batteries, "n_pv": self.n_pv,
                "peak_before_kw": r(self.peak_before_kw), "peak_after_kw": r(self.peak_after_kw),
                "violations": self.violations,
                "violations_uncontrolled": self.violations_uncontrolled,
                "ac_rounds": self.ac_rounds, "commands": len(self.commands),
                "command_ids": [c.command_id for c in self.commands],
                "protected": self.protected,
                "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
                "notes": self.notes}


class Replanner:
    """The re-plan of one feeder (module docstring).

    Parameters
    ----------
    open_engine : callable(now) -> OpenDSSEngine
        A freshly compiled engine of the feeder at ``now`` (topology applied); closed by
        the run.
    sink, issuer : the loop's command sink (tracking) and issuer (last command per DER)
    config : ReplanConfig
    loop_period_s : the fast cycle's period (for ``protect_cycles``)
    """

    def __init__(self, open_engine: Callable[[datetime], Any], sink: CommandSink,
                 issuer: CommandIssuer, *, config: ReplanConfig | None = None,
                 loop_period_s: float = 5.0, feeder_id: str = "feeder",
                 load_multiplier: float | Callable[[datetime], float] = 1.0,
                 tag: str = "") -> None:
        self.open_engine, self.sink, self.issuer = open_engine, sink, issuer
        self.config = config or ReplanConfig()
        self.loop_period_s, self.feeder_id = loop_period_s, feeder_id
        self.load_multiplier, self.tag = load_multiplier, tag
        self._n = 0

    def protected(self, now: datetime, der_ids: Sequence[str]) -> list[str]:
        """DERs left to the fast cycle at ``now`` (module docstring, precedence)."""
        window = timedelta(seconds=self.config.protect_cycles * self.loop_period_s)
        out = []
        for d in der_ids:
            c = self.issuer.last.get(d)
            if c is not None and not c.cycle_id.startswith(PLAN_PREFIX) and (
                    c.valid_until > now or now - c.valid_from < window):
                out.append(d)
        return out

    def run(self, now: datetime, ders: Sequence[ReplanDer], *,
            soc_frac: Mapping[str, float] | None = None,
            held: Mapping[str, str] | None = None,
            load_multiplier: float | Callable[[datetime], float] | None = None
            ) -> ReplanResult:
        """One re-plan at ``now`` (module docstring); ``load_multiplier`` overrides the
        one given at construction for this run (e.g. from a stored load forecast)."""
        from derms.dispatch.ledger import build_ledger
        from derms.dispatch.verify import ACNetwork, plan_and_verify

        now = ensure_utc(now, "now")
        cfg = self.config
        t0 = time.perf_counter()
        self._n += 1
        rid = f"{PLAN_PREFIX}{self.feeder_id}-{now.strftime('%Y%m%dT%H%M%S')}-{self.tag}{self._n}"
        tm: dict[str, float] = {}
        h = horizon_at(now, cfg)
        hz = {"start": h.start.isoformat(), "step_s": cfg.step_s, "n_steps": h.n_steps,
              "interval_end": (h.start + h.step).isoformat()}
        engines = [self.open_engine(now)]
        tm["compile_s"] = time.perf_counter() - t0
        try:
            t1 = time.perf_counter()
            case = build_replan_case(engines[0], ders, now, cfg, soc_frac=soc_frac,
                                     load_multiplier=self.load_multiplier
                                     if load_multiplier is None else load_multiplier,
                                     held=held)
            fleet, notes = case.fleet, list(case.notes)
            out = ReplanResult(rid, now, "no_ders", hz, [], [], notes=notes,
                               n_batteries=len(fleet.batteries), n_pv=len(fleet.pv))
            tm["case_s"] = time.perf_counter() - t1
            if not fleet.ders:
                notes.append("no battery or PV to plan: no re-plan")
                out.timings = {**tm, "total_s": time.perf_counter() - t0}
                return out
            unc_sched = uncontrolled_schedule(fleet)
            tries = [cfg.network_limits] if cfg.network_limits is not None else [
                Limits(), edge_limits(Limits())]
            vp = None
            for k, limits in enumerate(tries):
                if k:
                    t1 = time.perf_counter()
                    engines.append(self.open_engine(now))
                    tm["compile_s"] += time.perf_counter() - t1
                t2 = time.perf_counter()
                ac = ACNetwork(engines[-1], fleet, case.profiles,
                               control_mode=cfg.control_mode,  # type: ignore[arg-type]
                               limits=limits)
                unc = ac.reference(unc_sched)
                tm["ac_network_s"] = tm.get("ac_network_s", 0.0) + time.perf_counter() - t2
                out.peak_before_kw = float(np.max(unc[0].head_kw))
                out.violations_uncontrolled = dict(ac.violations(unc[1]).counts)
                t3 = time.perf_counter()
                try:
                    vp = plan_and_verify(ac, cfg.objective, uncontrolled=unc,
                                         max_ac_rounds=cfg.max_ac_rounds)
                except InfeasibleError as exc:
                    edge = " (limits at the violation edge)" if k else ""
                    notes.append(f"re-plan infeasible{edge}: {str(exc)[:600]}")
                    continue
                finally:
                    tm["plan_s"] = tm.get("plan_s", 0.0) + time.perf_counter() - t3
                if k:
                    notes.append("planned with the network limits at the violation edge "
                                 "(limit + DESIGN.md tolerance): with the nominal limits, rows "
                                 "already within the tolerance band in the base case made the "
                                 "plan infeasible")
                break
            if vp is None:
                out.status = "infeasible"
                out.timings = {**tm, "total_s": time.perf_counter() - t0}
                return out
            tm.update({f"plan_{k}": v for k, v in vp.timing_s.items()})
            out.status, out.schedule, out.ac_rounds = "planned", vp.schedule, vp.rounds
            out.peak_after_kw = float(np.max(vp.result.head_p_kw.sum(axis=1)))
            out.violations = dict(vp.violations.counts)
            if not vp.clean:
                notes.append(f"the plan still violates on the AC model: {vp.violations.counts}")
            t4 = time.perf_counter()
            reasons: dict[str, str] = {}
            try:
                led = build_ledger(vp.planner, vp.schedule, unc_sched, vp.result)
                mv = led.moves
                if len(mv):
                    at0 = mv[pd.to_datetime(mv["t"], utc=True) == pd.Timestamp(h.start)]
                    reasons = {str(d): str(w) for d, w in zip(at0["der_id"], at0["reason"])}
            except Exception as exc:  # the explanation must not cost the commands
                log.warning("replan_ledger_failed feeder=%s error=%s", self.feeder_id, exc)
            tm["ledger_s"] = time.perf_counter() - t4
            t5 = time.perf_counter()
            out.protected = self.protected(now, fleet.der_ids)
            out.commands = self._commands(now, h, fleet, vp.schedule, rid, reasons,
                                          set(out.protected))
            if out.commands:
                self.sink.send(out.commands)
            if out.protected:
                notes.append(f"{len(out.protected)} DER(s) left to the fast cycle (its "
                             f"command stands): {out.protected[:20]}")
            tm["commands_s"] = time.perf_counter() - t5
        finally:
            for e in engines:
                e.close()
        out.timings = {**tm, "total_s": time.perf_counter() - t0}
        log.info("event=control_replan feeder=%s id=%s status=%s peak_before=%.1f "
                 "peak_after=%.1f commands=%d total_s=%.2f", self.feeder_id, rid, out.status,
                 out.peak_before_kw or float("nan"), out.peak_after_kw or float("nan"),
                 len(out.commands), out.timings["total_s"])
        return out

    def _commands(self, now: datetime, h: Horizon, fleet: Fleet, sched, rid: str,
                  reasons: Mapping[str, str], protected: set[str]) -> list[DeviceCommand]:
        cfg = self.config
        end = h.start + h.step
        if end <= now:
            return []
        ids = fleet.der_ids
        todo: list[tuple[str, CommandMode, float, str]] = []
        n_pv = len(fleet.pv)
        for j, b in enumerate(fleet.batteries):
            p = float(sched.p_kw[0, n_pv + j])
            todo.append((b.der_id, CommandMode.P_SETPOINT, p,
                         reasons.get(b.der_id, "peak shaving")))
        for j, pv in enumerate(fleet.pv):
            curt = float(sched.curtail_kw[0, j])
            old = self.issuer.last.get(pv.der_id)
            if curt > cfg.min_curtail_kw:
                todo.append((pv.der_id, CommandMode.EXPORT_LIMIT,
                             min(-float(sched.pv_kw[0, j]), 0.0),
                             reasons.get(pv.der_id, "curtailment")))
            elif (old is not None and old.cycle_id.startswith(PLAN_PREFIX)
                  and old.active_at(now) and old.mode is CommandMode.EXPORT_LIMIT
                  and old.p_kw > -pv.s_kva + cfg.deadband_kw):
                todo.append((pv.der_id, CommandMode.EXPORT_LIMIT, -float(pv.s_kva),
                             "no curtailment planned: limit lifted"))
        out = []
        for der, mode, p, why in todo:
            if der in protected or der not in ids:
                continue
            old = self.issuer.last.get(der)
            if (old is not None and old.cycle_id.startswith(PLAN_PREFIX) and old.mode is mode
                    and abs(old.p_kw - p) < cfg.deadband_kw and old.valid_until >= end
                    and old.active_at(now)):
                continue
            cmd = DeviceCommand(command_id(rid, der), der, rid, mode, round(p, 4), now, end,
                                f"re-plan {rid}: {why}")
            self.issuer.last[der] = cmd
            out.append(cmd)
        return out


__all__ = ["PLAN_PREFIX", "ReplanCase", "ReplanConfig", "ReplanDer", "ReplanResult",
           "Replanner", "build_replan_case", "edge_limits", "horizon_at"]
