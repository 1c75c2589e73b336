"""A dispatch study end to end: scenario → baselines → plan → AC check → ledger (→ rolling).

:func:`run_dispatch_study` is what ``derms dispatch`` and ``POST /v1/dispatch/plan`` run:
compile the feeder, draw the seeded scenario, simulate (full AC QSTS, OpenDSS) the
uncontrolled schedule, the rule-based peak-shaving baseline and the optimised plan,
and build the ledger. Every case is simulated from the AC network's one starting
regulator/capacitor state (``ACNetwork.control_state``), the state the OpenDSS replay set
starts from, so the exported folder reproduces the numbers reported here. Its files are written
by :mod:`derms.reports.dispatch_outputs`.

Sign convention (DESIGN.md): at a connection point and at the substation import
(consumption) is positive [kW, kvar]; a PV exporting 5 kW has ``p_kw = -5``. Times are
UTC; a timestamp is the start of its interval ``[t, t + step)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from derms.analysis.constraints import ViolationReport
from derms.der.models import controllable_in_horizon
from derms.dispatch import baselines
from derms.dispatch.ledger import SHORT_KWH, Ledger, build_ledger
from derms.dispatch.plan import ObjectiveConfig, Schedule, uncontrolled_schedule
from derms.dispatch.verify import VerifiedPlan, export_misses, plan_and_verify
from derms.errors import InputError, input_error
from derms.powerflow.qsts import QSTSResult
from derms.studies.dispatch_scenario import DispatchScenario, ScenarioConfig, open_dispatch_case
from derms.timeutil import parse_duration

log = logging.getLogger(__name__)
Forecast = Literal["noisy", "model", "perfect"]
RULE_BASED_THRESHOLD_FRAC = 0.9  # rule-based baseline discharges above 90 % of the peak
MAX_STEPS = 7 * 96


CLI_NAMES = {"horizon": "--horizon", "step": "--step", "replan_every": "--replan-every"}


def parse_horizon(horizon: str, step: str, names: dict[str, str] | None = None
                  ) -> tuple[timedelta, int]:
    """``("24h", "15min")`` -> (step, n_steps); InputError unless the horizon is a whole
    number (1 … 672) of steps. ``names``: how messages call the inputs (default: the CLI's
    options, :data:`CLI_NAMES`); the error's ``field`` is the input at fault."""
    nm = CLI_NAMES if names is None else names
    nh, ns = nm["horizon"], nm["step"]
    try:
        s = parse_duration(step, ns)
    except InputError as exc:
        raise input_error(str(exc), "step") from None
    try:
        h = parse_duration(horizon, nh)
    except InputError as exc:
        raise input_error(str(exc), "horizon") from None
    if s <= timedelta(0):
        raise input_error(f"{ns} {step!r} must be positive", "step")
    if h <= timedelta(0):
        raise input_error(f"{nh} {horizon!r} must be positive", "horizon")
    n = h / s
    if abs(n - round(n)) > 1e-9:
        bare = " (a bare number is minutes: give a unit, e.g. 24h)" if \
            horizon.strip().replace(".", "", 1).isdigit() else ""
        raise input_error(f"{nh} {horizon!r} is not a whole number of {ns} {step!r}{bare}",
                          "horizon")
    if not 1 <= round(n) <= MAX_STEPS:
        raise input_error(f"{nh} {horizon!r} / {ns} {step!r} gives {round(n)} intervals;"
                          f" expected 1 to {MAX_STEPS}", "horizon")
    return s, round(n)


def parse_replan(replan_every: str | None, step: timedelta, name: str = "--replan-every"
                 ) -> str:
    """A rolling re-plan period: ``replan_every`` checked to be a whole number (>= 1) of
    ``step``, or (None) 15 minutes when that is a whole number of steps, else one step.
    ``name``: how messages call the input; the error's ``field`` is ``replan_every``."""
    if replan_every is None:
        q = timedelta(minutes=15) / step
        if q >= 1 and abs(q - round(q)) < 1e-9:
            return "15min"
        sec = int(step.total_seconds())  # one step, said as the step would be
        return f"{sec // 3600}h" if sec % 3600 == 0 else (
            f"{sec // 60}min" if sec % 60 == 0 else f"{sec}s")
    try:
        r = parse_duration(replan_every, name)
    except InputError as exc:
        raise input_error(str(exc), "replan_every") from None
    n = r / step
    if n < 1 or abs(n - round(n)) > 1e-9:
        raise input_error(f"{name} {replan_every!r}: expected a whole number (>= 1) "
                          f"of {step} intervals", "replan_every")
    return replan_every


@dataclass
class CaseResult:
    """One simulated schedule: DER schedule, AC result, its violations and head import."""

    schedule: Schedule
    result: QSTSResult
    violations: ViolationReport

    @property
    def head_kw(self) -> np.ndarray:
        """Substation import per interval [kW], import positive (T,)."""
        return self.result.head_p_kw.sum(axis=1)

    @property
    def n_violations(self) -> int:
        c = self.violations.counts
        return int(c["violations_voltage"] + c["violations_thermal"])


@dataclass
class DispatchStudy:
    """Everything a dispatch study produced (see module docstring)."""

    feeder: str
    scenario: DispatchScenario
    objective: ObjectiveConfig
    uncontrolled: CaseResult
    rule_based: CaseResult
    optimised: CaseResult
    plan: VerifiedPlan
    ledger: Ledger
    summary: dict[str, Any]
    opendss_paths: dict[str, Path] = field(default_factory=dict)
    rolling: Any = None  # derms.dispatch.rolling.RollingResult with --forecast noisy|model


def _case(ac, sched: Schedule) -> CaseResult:
    """Simulate a schedule (from the AC network's own starting control state)."""
    res = ac.simulate_schedule(sched)
    return CaseResult(sched, res, ac.violations(res))


def _rolling(path: Path, cfg: ScenarioConfig, objective: ObjectiveConfig, seed: int,
             forecast: str = "noisy", replan_every: str | None = None, aggregation=None,
             realtime: bool = True) -> tuple[float, str, dict[str, Any], Any]:
    """Rolling re-plans (every ``replan_every``) with forecasts over the study horizon.

    Runs on the same scenario drawn over twice the horizon (the second half is the
    lookahead of the last re-plans; the first half is the study's horizon, same draws).
    Returns the executed peak, the mode name, a summary block (its own uncontrolled
    and perfect-foresight peaks over the same window, the reduction ratio, violations of
    the executed schedule from the AC simulation, re-plan times, the real-time
    corrections when ``realtime``) and the
    :class:`~derms.dispatch.rolling.RollingResult`.
    """
    from derms.dispatch.rolling import run_rolling

    replan_every = parse_replan(replan_every, cfg.step)
    horizon = cfg.step * cfg.n_steps
    long_cfg = replace(cfg, n_steps=2 * cfg.n_steps)
    engine, scenario, ac = open_dispatch_case(path, long_cfg, aggregation=aggregation)
    try:
        fc: Any = forecast
        if forecast == "model":
            from derms.grid.opendss_import import read_feeder
            from derms.studies.dispatch_forecast import model_forecast

            fc = model_forecast(read_feeder(engine.ctx, engine.source_master), long_cfg,
                                lookahead=horizon)
        r = run_rolling(ac, scenario, objective, forecast=fc, replan_every=replan_every,
                        days=horizon / pd.Timedelta(days=1), lookahead=horizon, seed=seed,
                        realtime=realtime)
    finally:
        engine.close()
    label = {"noisy": "noisy (AR(1) relative errors, see derms.dispatch.rolling)",
             "model": "derms.forecast LightGBM load forecast re-issued at each re-plan, "
                      "corrected by its error of the last hour (see "
                      "derms.studies.dispatch_forecast)"}[forecast]
    info = {"forecast": label,
            "replan_every": replan_every, "n_replans": r.n_replans,
            "peak_executed_kw": float(r.peak_kw), "peak_perfect_foresight_kw":
            float(r.peak_perfect_kw), "peak_uncontrolled_kw": float(r.peak_uncontrolled_kw),
            "peak_rule_based_kw": float(r.peak_rule_based_kw),
            "reduction_ratio": float(r.reduction_ratio),
            "violations_executed": int(r.violations.get("violations_voltage", 0)
                                       + r.violations.get("violations_thermal", 0)),
            "replan_s_median": _median(np.asarray(r.replan_s)),
            "replan_full_s_median": _median(np.asarray(r.replan_s)[r.full_replan]),
            "replan_short_s_median": _median(np.asarray(r.replan_s)[~r.full_replan]),
            "n_full_replans": int(r.full_replan.sum()),
            "realtime_correction": ({k: (round(v, 3) if isinstance(v, float) else v)
                                     for k, v in r.realtime.items()} if realtime else None)}
    if "export_limit_missed_intervals" in r.violations:
        info["export_limit_missed_intervals"] = r.violations["export_limit_missed_intervals"]
        info["export_limit_missed_kw_max"] = round(r.violations["export_limit_missed_kw_max"],
                                                   3)
    return float(r.peak_kw), f"rolling_{forecast}_forecast", info, r


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if x.size else None


def run_dispatch_study(master: str | Path, scenario_config: ScenarioConfig,
                       objective: ObjectiveConfig, *, forecast: Forecast = "perfect",
                       replan_every: str | None = None, opendss_dir: Path | None = None,
                       on_stage: Callable[[str], None] | None = None,
                       group_size: int | None = None, realtime: bool = True
                       ) -> DispatchStudy:
    """Run a dispatch study on ``master`` (a path or bundled name; see module docstring).

    ``opendss_dir``: where to write the OpenDSS replay set (None: not written).
    ``replan_every``: re-plan period of the rolling run (``forecast`` noisy / model;
    None: :func:`parse_replan`'s default).
    ``group_size`` > 1: the plan moves DERs in groups of about that many; None (the
    default): chosen from the fleet's size (:func:`derms.der.aggregate.auto_group_size`:
    groups of 4 from 500 DERs, the size used in the summary's ``group_size``)
    (:mod:`derms.der.aggregate`: compatible, nearby DERs in fixed proportion; a smaller LP
    on large fleets); the AC check, the last-mile repair, the schedule and the ledger are
    per DER. The rolling run plans in the same groups (its executed schedule is simulated
    member by member; only its head import and peaks are reported). ``realtime``: the
    rolling run executes each interval on the AC model and corrects the ones that break a
    limit (:mod:`derms.dispatch.realtime`); False: as planned.
    ``on_stage(name)`` is called before each stage (progress display). Raises
    :class:`~derms.errors.InfeasibleError` (with the binding constraints) when no plan
    meets the constraints, :class:`~derms.errors.InputError` on bad input.
    """
    from derms.grid.bundled import resolve_master
    from derms.reports.dispatch_opendss import write_opendss_replay

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)

    t_start = time.perf_counter()
    path = resolve_master(master)
    stage("compile feeder and draw scenario")
    t0 = time.perf_counter()
    from derms.der.aggregate import AggregationConfig

    by_capacity = objective.curtailment_policy == "proportional_to_capacity"
    agg = AggregationConfig(size=group_size, pv_by_capacity=by_capacity) \
        if group_size is None or group_size > 1 else None
    engine, scenario, ac = open_dispatch_case(path, scenario_config, aggregation=agg)
    setup_s = time.perf_counter() - t0
    # the rolling run plans in the groups of this size (its longer draw could count
    # another fleet size)
    agg = AggregationConfig(size=ac.group_size, pv_by_capacity=by_capacity) \
        if ac.group_size > 1 else None
    try:
        fleet = scenario.fleet
        if not fleet.ders:
            raise InputError(f"the penetrations place no DER on {path.name}: nothing to "
                             "dispatch (raise --pv, --battery or --ev)")
        state = ac.control_state  # every case (and the replay) starts from it
        stage("simulate uncontrolled")
        unc = _case(ac, uncontrolled_schedule(fleet))
        stage("simulate rule-based baseline")
        head = unc.head_kw
        rb_sched = baselines.rule_based_peak_shaving(fleet, head,
                                                     RULE_BASED_THRESHOLD_FRAC * head.max())
        rb = _case(ac, rb_sched)
        stage("plan and verify on the AC model")
        vp = plan_and_verify(ac, objective,
                             uncontrolled=ac.reference(unc.schedule, unc.result))
        opt = _case(ac, vp.schedule)
        stage("ledger")
        ledger = build_ledger(vp.planner, vp.schedule, unc.schedule, opt.result, ac.agg)
        rolling_peak, mode, rolling_info, rolling = None, "perfect_foresight", None, None
        if forecast in ("noisy", "model"):
            stage("rolling re-plan with forecasts")
            rolling_peak, mode, rolling_info, rolling = _rolling(
                path, scenario_config, objective, scenario_config.seed, forecast, replan_every,
                agg, realtime)
        paths: dict[str, Path] = {}
        if opendss_dir is not None:
            stage("write OpenDSS replay set")
            paths = write_opendss_replay(
                opendss_dir, engine, fleet, scenario.customer_profiles, state,
                uncontrolled=(unc.schedule.p_kw, unc.schedule.q_kvar),
                optimised=(opt.schedule.p_kw, opt.schedule.q_kvar),
                rule_based=(rb.schedule.p_kw, rb.schedule.q_kvar),
                control_mode=ac.control_mode, source=ac.index.source, index=ac.index,
                limits=ac.limits)
        feeder = engine.circuit.Name
    finally:
        engine.close()
    summary = _summary(feeder, scenario, scenario_config, objective, unc, rb, opt, vp,
                       rolling_peak, mode, forecast,
                       None if rolling_info is None else rolling_info["replan_every"])
    note = peak_rise_note(unc.head_kw, opt.head_kw, vp, ledger)
    if note:
        summary["plan_notes"].append(note)
    if rolling_info is not None:
        summary["rolling"] = rolling_info
        # the executed peak's time, as peak_optimised_kw is the executed peak (it was the
        # perfect-knowledge plan's time)
        ex = rolling.executed.fleet.horizon
        summary["peak_optimised_at"] = _iso(pd.date_range(
            ex.start, periods=len(rolling.head_kw), freq=ex.step)[int(np.argmax(
                rolling.head_kw))])
        summary["rolling"]["peak_perfect_foresight_note"] = (
            "the perfect-foresight peak of the rolling run's own horizon (its days from the "
            "same start); the top-level peak_perfect_foresight_kw is the single plan's")
        summary["rolling"]["peaks_note"] = (
            "peak_uncontrolled_kw and peak_rule_based_kw here are over the rolling run's "
            "executed days, simulated with the scenario extended by the lookahead (EV "
            "sessions running past the single plan's horizon are whole, and the rule-based "
            "threshold is 0.9 x this uncontrolled peak), so they can differ from the "
            "top-level ones by a few kW; reduction_ratio uses these")
        if rolling_info.get("export_limit_missed_intervals"):
            summary["plan_notes"].append(
                f"the rolling run's executed schedule breaks the export limit in "
                f"{rolling_info['export_limit_missed_intervals']} interval(s) of its AC "
                f"simulation (by up to {rolling_info['export_limit_missed_kw_max']:.1f} kW): "
                "the execution holds the limit on an estimate of the import that the AC "
                "losses move by a few kW (corrected from the interval after), or the DERs "
                "could not absorb the PV above its forecast")
        if rolling_info["violations_executed"]:
            summary["plan_notes"].append(
                f"the rolling run's executed schedule has {rolling_info['violations_executed']} "
                "violations in its AC simulation: its re-plans are linear (not AC-verified) "
                f"and work on the {forecast} forecast"
                + ("; the real-time correction left them (rolling.realtime_correction)"
                   if realtime else "; it ran without the real-time correction")
                + "; violations_optimised is the perfect-knowledge plan's")
        if rolling.peak_kw > rolling.peak_uncontrolled_kw + 1e-6:
            summary["plan_notes"].append(
                f"the rolling run's executed peak {rolling.peak_kw:.1f} kW is above the "
                f"uncontrolled {rolling.peak_uncontrolled_kw:.1f} kW over the same days: "
                f"with the {forecast} forecast, its errors cost more than the re-plans "
                f"saved (the plan with perfect knowledge: "
                f"{rolling.peak_perfect_kw:.1f} kW)")
    summary["master"] = str(master)
    summary["group_size"] = ac.group_size
    summary["group_size_from"] = "auto" if group_size is None else "given"
    summary["setup_s"] = setup_s
    summary["runtime_s"] = time.perf_counter() - t_start
    return DispatchStudy(feeder, scenario, objective, unc, rb, opt, vp, ledger, summary, paths,
                         rolling)


def peak_rise_note(unc_head_kw: np.ndarray, opt_head_kw: np.ndarray, vp: VerifiedPlan,
                   ledger: Ledger) -> str | None:
    """Why the optimised plan's AC peak [kW] is above the uncontrolled one, if it is (more
    than 0.05 kW): the limits binding in the LP at the optimised peak's interval (the plan
    meets them before it shaves), or else the linear model's own peak against the AC's
    (what the linear model leaves out, such as losses)."""
    unc_kw, opt_kw = float(unc_head_kw.max()), float(opt_head_kw.max())
    if opt_kw <= unc_kw + 0.05:
        return None
    t_star = int(opt_head_kw.argmax())
    h = vp.planner.fleet.horizon
    when = h.start + t_star * h.step
    b = ledger.binding
    at = b[(b["t"] == pd.Timestamp(when)) & (b["kind"] != "peak")] if len(b) else b
    head = f"the optimised peak {opt_kw:.1f} kW ({_iso(when)}) is {opt_kw - unc_kw:.1f} kW " \
           f"above the uncontrolled {unc_kw:.1f} kW: "
    if len(at):
        top = at.reindex(at["dual"].abs().sort_values(ascending=False).index).head(3)
        names = ", ".join(f"{k} {e}" for k, e in zip(top["kind"], top["element"]))
        return head + f"limits bind there and come before the peak ({names})"
    lp_kw = float(vp.planner.x[vp.planner.lay.z])
    return head + (f"the linear model planned a peak of {lp_kw:.1f} kW, the AC simulation's "
                   f"is {opt_kw - lp_kw:+.1f} kW off it (losses and voltage effects the "
                   "linear model leaves out)")


def _summary(feeder: str, scenario: DispatchScenario, cfg: ScenarioConfig,
             objective: ObjectiveConfig, unc: CaseResult, rb: CaseResult, opt: CaseResult,
             vp: VerifiedPlan, rolling_peak: float | None, mode: str,
             forecast: Forecast, forecast_replan_every: str | None = None) -> dict[str, Any]:
    f = scenario.fleet
    h = f.horizon
    dt = h.dt_h
    t = pd.date_range(h.start, periods=h.n_steps, freq=h.step)
    pf_peak = float(opt.head_kw.max())
    curtailed = float(opt.schedule.curtail_kw.sum() * dt)
    curtailed = curtailed if abs(curtailed) > 1e-6 else 0.0  # solver round-off (1e-12 kWh)
    avail = float(sum(p.p_avail_kw.sum() for p in f.pv) * dt)
    plan_counts = vp.violations.counts
    short = vp.schedule.ev_short_kwh
    short = np.zeros(0) if short is None else short
    movable = controllable_in_horizon(f)
    s: dict[str, Any] = {
        "feeder": feeder,
        "horizon_start": _iso(h.start),
        "step_s": h.step.total_seconds(),
        "n_steps": h.n_steps,
        "seed": cfg.seed,
        "pv_penetration": cfg.pv_penetration,
        "battery_penetration": cfg.battery_penetration,
        "ev_penetration": cfg.ev_penetration,
        "curtailment_policy": objective.curtailment_policy,
        "export_limit_kw": objective.export_limit_kw,
        "forecast": forecast,
        "optimised_mode": mode,
        "peak_uncontrolled_kw": float(unc.head_kw.max()),
        "peak_rule_based_kw": float(rb.head_kw.max()),
        "peak_optimised_kw": rolling_peak if rolling_peak is not None else pf_peak,
        "peak_perfect_foresight_kw": pf_peak,
        "peak_uncontrolled_at": _iso(t[int(unc.head_kw.argmax())]),
        "peak_optimised_at": _iso(t[int(opt.head_kw.argmax())]),
        "min_import_optimised_kw": float(opt.head_kw.min()),
        "violations_uncontrolled": unc.n_violations,
        "violations_rule_based": rb.n_violations,
        "violations_optimised": opt.n_violations,
        "violations_optimised_voltage": int(opt.violations.counts["violations_voltage"]),
        "violations_optimised_thermal": int(opt.violations.counts["violations_thermal"]),
        **_export_missed(objective, opt.head_kw),
        "violations_in_verify_loop": int(plan_counts["violations_voltage"]
                                         + plan_counts["violations_thermal"]),
        "pre_existing_voltage": int(opt.violations.counts["pre_existing_voltage"]),
        "pre_existing_thermal": int(opt.violations.counts["pre_existing_thermal"]),
        "solve_s": float(vp.timing_s.get("solve_s", math.nan)),
        "ac_verify_s": float(vp.timing_s.get("ac_verify_s", math.nan)),
        "build_s": float(vp.timing_s.get("build_s", math.nan)),
        "plan_total_s": float(vp.timing_s.get("total_s", math.nan)),
        "ac_rounds": int(vp.rounds),
        "plan_notes": list(vp.notes),
        "n_controllable_ders": int(movable.sum()),
        "n_planned_ders": len(vp.planner.fleet.ders),  # groups when group_size > 1
        "n_ders_outside_horizon": int((~movable).sum()),
        "n_pv": len(f.pv), "n_battery": len(f.batteries), "n_ev": len(f.evs),
        "n_flex": len(f.flex), "n_generator": len(f.generators),
        "pv_available_kwh": avail,
        "pv_curtailed_kwh": curtailed,
        "ev_short_kwh": float(short.sum()),
        "n_ev_short": int((short > SHORT_KWH).sum()),
        "energy_uncontrolled_kwh": float(unc.head_kw.sum() * dt),
        "energy_optimised_kwh": float(opt.head_kw.sum() * dt),
        "violation_definition": "node-phase or branch-conductor x interval pairs outside "
                                "[0.95, 1.05] pu (tol 0.001) or above 100 % of normal rating "
                                "(tol 1 %), pre-existing held to the base case (no DER)",
        **_rating_counts(unc.result),
    }
    if mode == "perfect_foresight":
        s["optimised_note"] = ("peak_optimised_kw is the perfect-knowledge plan, the one in "
                               "schedule.csv and opendss/ (run with --forecast noisy or "
                               "model for a rolling re-plan with forecasts)")
    else:
        s["optimised_note"] = rolling_note(forecast_replan_every)
    return s


def _export_missed(objective: ObjectiveConfig, head_kw: np.ndarray) -> dict[str, Any]:
    """With an export limit: the intervals whose AC head import is below its minimum by
    more than the verify loop's tolerance and the largest shortfall (the single plan's;
    a rolling run's are in its block)."""
    if objective.export_limit_kw is None:
        return {}
    n, kw = export_misses(objective, head_kw)
    return {"export_limit_missed_intervals": n, "export_limit_missed_kw_max": kw}


def rolling_note(replan_every: str | None) -> str:
    """``optimised_note`` of a rolling run: re-planned every ``replan_every`` (the period
    the run used, e.g. "15min"; it said "hourly" whatever the period was)."""
    every = f"every {replan_every}" if replan_every else "rolling"
    return (f"peak_optimised_kw is the executed peak of re-plans with forecasts ({every}, "
            "block 'rolling'); schedule.csv, violations_optimised and opendss/ are the "
            "perfect-knowledge plan, whose peak is peak_perfect_foresight_kw")


def _rating_counts(res: QSTSResult) -> dict[str, int]:
    """How many branch conductors the thermal criterion checks and how many of them carry
    an OpenDSS default rating rather than one given in the model (DESIGN: reports say so;
    the list is ``opendss/monitored_branches.csv``)."""
    from derms.reports.dispatch_opendss import monitored_branches_table

    br = monitored_branches_table(res.index)
    return {"monitored_branch_conductors": len(br),
            "default_rating_conductors": int(br["rating_is_default"].sum())}


def _iso(t) -> str:
    return pd.Timestamp(t).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


