"""A dispatch study end to end (scenario → baselines → plan → AC check → ledger) and its files.

:func:`run_dispatch_study` is what ``derms dispatch`` and ``POST /v1/dispatch/plan`` run:
compile the feeder, draw the seeded scenario, simulate (full AC QSTS, OpenDSS) the
uncontrolled schedule, the rule-based peak-shaving baseline and the optimised plan,
and build the ledger. Every case is simulated from the same regulator/capacitor state
(taps carry over between runs of one engine), the state the OpenDSS replay set starts
from, so the exported folder reproduces the numbers reported here.

:func:`write_dispatch_outputs` writes ``summary.json``, ``ders.csv``, ``schedule*.csv``,
``head.csv``, ``ledger_*.csv``, ``README.md`` and ``report.html``.

Sign convention (DESIGN.md): at a connection point and at the substation import
(consumption) is positive [kW, kvar]; a PV exporting 5 kW has ``p_kw = -5``. Times are
UTC; a timestamp is the start of its interval ``[t, t + step)``.
"""

from __future__ import annotations

import json
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
from derms.dispatch import baselines
from derms.dispatch.ledger import Ledger, build_ledger
from derms.dispatch.plan import ObjectiveConfig, Schedule, uncontrolled_schedule
from derms.dispatch.verify import VerifiedPlan, plan_and_verify
from derms.errors import InputError
from derms.powerflow.qsts import QSTSResult
from derms.studies.dispatch_scenario import DispatchScenario, ScenarioConfig, open_dispatch_case
from derms.timeutil import parse_duration

log = logging.getLogger(__name__)
Forecast = Literal["noisy", "model", "perfect"]
RULE_BASED_THRESHOLD_FRAC = 0.9  # rule-based baseline discharges above 90 % of the peak
MAX_STEPS = 7 * 96


def parse_horizon(horizon: str, step: str) -> tuple[timedelta, int]:
    """``("24h", "15min")`` -> (step, n_steps); InputError unless the horizon is a whole
    number (1 … 672) of steps."""
    h, s = parse_duration(horizon, "--horizon"), parse_duration(step, "--step")
    if s <= timedelta(0) or h <= timedelta(0):
        raise InputError(f"--horizon {horizon!r} and --step {step!r} must be positive")
    n = h / s
    if abs(n - round(n)) > 1e-9:
        raise InputError(f"--horizon {horizon!r} is not a whole number of --step {step!r}")
    if not 1 <= round(n) <= MAX_STEPS:
        raise InputError(f"--horizon {horizon!r} / --step {step!r} gives {round(n)} intervals;"
                         f" expected 1 to {MAX_STEPS}")
    return s, round(n)


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


def _case(ac, sched: Schedule, state) -> CaseResult:
    from derms.reports.dispatch_opendss import restore_control_state

    restore_control_state(ac.engine, state)
    res = ac.simulate(sched.p_kw, sched.q_kvar)
    return CaseResult(sched, res, ac.violations(res))


def _rebase(ac, state) -> None:
    """Re-simulate the base case (no DER) from ``state`` and re-derive the limits held for
    pre-existing violations from it. Workaround: :class:`~derms.dispatch.verify.ACNetwork`
    simulates its base from the taps of its set-up snapshot and every later simulation
    from the taps the previous one left (measured on IEEE 123: the same schedule
    simulated twice differs by up to 10 kW at the head), so base and cases would not
    share a starting point. Remove when ACNetwork restores its control state itself."""
    from derms.dispatch.network import network_limits
    from derms.reports.dispatch_opendss import restore_control_state

    restore_control_state(ac.engine, state)
    h = ac.fleet.horizon
    zero = np.zeros((h.n_steps, len(ac.fleet.ders)))
    ac.base_result = ac.simulate(zero, zero)
    ac.base = ac._reference(ac.base_result, zero, zero)
    ac.net_limits = network_limits(ac.base, ac.index.node_phase, ac.index.branch_norm_a,
                                   ac.limits)


def _rolling(path: Path, cfg: ScenarioConfig, objective: ObjectiveConfig, seed: int,
             forecast: str = "noisy") -> tuple[float, str, dict[str, Any]]:
    """Rolling hourly re-plans with noisy forecasts over the study horizon.

    Runs on the same scenario drawn over twice the horizon (the second half is the
    lookahead of the last re-plans; the first half is the study's horizon, same draws).
    Returns the executed peak, the mode name and a summary block (its own uncontrolled
    and perfect-foresight peaks over the same window, the reduction ratio, violations of
    the executed schedule from the AC simulation, re-plan times).
    """
    from derms.dispatch.rolling import run_rolling

    horizon = cfg.step * cfg.n_steps
    long_cfg = replace(cfg, n_steps=2 * cfg.n_steps)
    engine, scenario, ac = open_dispatch_case(path, long_cfg)
    try:
        fc: Any = forecast
        if forecast == "model":
            from derms.grid.opendss_import import read_feeder
            from derms.studies.dispatch_forecast import model_forecast

            fc = model_forecast(read_feeder(engine.ctx, engine.source_master), long_cfg,
                                lookahead=horizon)
        r = run_rolling(ac, scenario, objective, forecast=fc, replan_every="1h",
                        days=horizon / pd.Timedelta(days=1), lookahead=horizon, seed=seed)
    finally:
        engine.close()
    label = {"noisy": "noisy (AR(1) relative errors, see derms.dispatch.rolling)",
             "model": "derms.forecast LightGBM load forecast re-issued at each re-plan "
                      "(see derms.studies.dispatch_forecast)"}[forecast]
    info = {"forecast": label,
            "replan_every": "1h", "n_replans": r.n_replans,
            "peak_executed_kw": float(r.peak_kw), "peak_perfect_foresight_kw":
            float(r.peak_perfect_kw), "peak_uncontrolled_kw": float(r.peak_uncontrolled_kw),
            "peak_rule_based_kw": float(r.peak_rule_based_kw),
            "reduction_ratio": float(r.reduction_ratio),
            "violations_executed": int(r.violations.get("violations_voltage", 0)
                                       + r.violations.get("violations_thermal", 0)),
            "replan_s_median": float(np.median(r.replan_s)) if r.replan_s else None}
    return float(r.peak_kw), f"rolling_{forecast}_forecast", info


def run_dispatch_study(master: str | Path, scenario_config: ScenarioConfig,
                       objective: ObjectiveConfig, *, forecast: Forecast = "perfect",
                       opendss_dir: Path | None = None,
                       on_stage: Callable[[str], None] | None = None) -> DispatchStudy:
    """Run a dispatch study on ``master`` (a path or bundled name; see module docstring).

    ``opendss_dir``: where to write the OpenDSS replay set (None: not written).
    ``on_stage(name)`` is called before each stage (progress display). Raises
    :class:`~derms.errors.InfeasibleError` (with the binding constraints) when no plan
    meets the constraints, :class:`~derms.errors.InputError` on bad input.
    """
    from derms.grid.bundled import resolve_master
    from derms.reports.dispatch_opendss import capture_control_state, write_opendss_replay

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)

    t_start = time.perf_counter()
    path = resolve_master(master)
    stage("compile feeder and draw scenario")
    t0 = time.perf_counter()
    engine, scenario, ac = open_dispatch_case(path, scenario_config)
    setup_s = time.perf_counter() - t0
    try:
        fleet = scenario.fleet
        if not fleet.ders:
            raise InputError(f"the penetrations place no DER on {path.name}: nothing to "
                             "dispatch (raise --pv, --battery or --ev)")
        state = capture_control_state(engine)
        _rebase(ac, state)
        stage("simulate uncontrolled")
        unc = _case(ac, uncontrolled_schedule(fleet), state)
        stage("simulate rule-based baseline")
        head = unc.head_kw
        rb_sched = baselines.rule_based_peak_shaving(fleet, head,
                                                     RULE_BASED_THRESHOLD_FRAC * head.max())
        rb = _case(ac, rb_sched, state)
        stage("plan and verify on the AC model")
        vp = plan_and_verify(ac, objective,
                             uncontrolled=ac.reference(unc.schedule, unc.result))
        opt = _case(ac, vp.schedule, state)
        stage("ledger")
        ledger = build_ledger(vp.planner, vp.schedule, unc.schedule, opt.result)
        rolling_peak, mode, rolling_info = None, "perfect_foresight", None
        if forecast in ("noisy", "model"):
            stage("rolling re-plan with forecasts")
            rolling_peak, mode, rolling_info = _rolling(path, scenario_config, objective,
                                                        scenario_config.seed, forecast)
        paths: dict[str, Path] = {}
        if opendss_dir is not None:
            stage("write OpenDSS replay set")
            paths = write_opendss_replay(
                opendss_dir, engine, fleet, scenario.customer_profiles, state,
                uncontrolled=(unc.schedule.p_kw, unc.schedule.q_kvar),
                optimised=(opt.schedule.p_kw, opt.schedule.q_kvar),
                rule_based=(rb.schedule.p_kw, rb.schedule.q_kvar),
                control_mode=ac.control_mode, source=ac.index.source)
        feeder = engine.circuit.Name
    finally:
        engine.close()
    summary = _summary(feeder, scenario, scenario_config, objective, unc, rb, opt, vp,
                       rolling_peak, mode, forecast)
    if rolling_info is not None:
        summary["rolling"] = rolling_info
    summary["master"] = str(master)
    summary["setup_s"] = setup_s
    summary["runtime_s"] = time.perf_counter() - t_start
    return DispatchStudy(feeder, scenario, objective, unc, rb, opt, vp, ledger, summary, paths)


def _summary(feeder: str, scenario: DispatchScenario, cfg: ScenarioConfig,
             objective: ObjectiveConfig, unc: CaseResult, rb: CaseResult, opt: CaseResult,
             vp: VerifiedPlan, rolling_peak: float | None, mode: str,
             forecast: Forecast) -> dict[str, Any]:
    f = scenario.fleet
    h = f.horizon
    dt = h.dt_h
    t = pd.date_range(h.start, periods=h.n_steps, freq=h.step)
    pf_peak = float(opt.head_kw.max())
    curtailed = float(opt.schedule.curtail_kw.sum() * dt)
    avail = float(sum(p.p_avail_kw.sum() for p in f.pv) * dt)
    plan_counts = vp.violations.counts
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
        "violations_in_verify_loop": int(plan_counts["violations_voltage"]
                                         + plan_counts["violations_thermal"]),
        "pre_existing_voltage": int(opt.violations.counts["pre_existing_voltage"]),
        "pre_existing_thermal": int(opt.violations.counts["pre_existing_thermal"]),
        "solve_s": float(vp.timing_s.get("solve_s", math.nan)),
        "ac_verify_s": float(vp.timing_s.get("ac_verify_s", math.nan)),
        "build_s": float(vp.timing_s.get("build_s", math.nan)),
        "plan_total_s": float(vp.timing_s.get("total_s", math.nan)),
        "ac_rounds": int(vp.rounds),
        "n_controllable_ders": len(f.ders),
        "n_pv": len(f.pv), "n_battery": len(f.batteries), "n_ev": len(f.evs),
        "n_flex": len(f.flex), "n_generator": len(f.generators),
        "pv_available_kwh": avail,
        "pv_curtailed_kwh": curtailed,
        "energy_uncontrolled_kwh": float(unc.head_kw.sum() * dt),
        "energy_optimised_kwh": float(opt.head_kw.sum() * dt),
        "violation_definition": "node-phase or branch-conductor x interval pairs outside "
                                "[0.95, 1.05] pu (tol 0.001) or above 100 % of normal rating "
                                "(tol 1 %), pre-existing held to the base case (no DER)",
    }
    if mode == "perfect_foresight":
        s["optimised_note"] = ("peak_optimised_kw is the perfect-knowledge plan, the one in "
                               "schedule.csv and opendss/ (run with --forecast noisy or "
                               "model for a rolling re-plan with forecasts)")
    else:
        s["optimised_note"] = ("peak_optimised_kw is the executed peak of hourly re-plans "
                               "with forecasts (block 'rolling'); schedule.csv, "
                               "violations_optimised and opendss/ are the perfect-knowledge "
                               "plan, whose peak is peak_perfect_foresight_kw")
    return s


def _iso(t) -> str:
    return pd.Timestamp(t).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_index(t: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Vectorised UTC ISO 8601 strings with a trailing Z."""
    idx = pd.DatetimeIndex(t).tz_convert("UTC")
    return np.asarray(idx.strftime("%Y-%m-%dT%H:%M:%SZ"), dtype=object)


# -- tables ------------------------------------------------------------------------------

def ders_table(scenario: DispatchScenario) -> pd.DataFrame:
    """Every DER of the scenario, one row each (units in the column names; NaN where a
    field does not apply). ``p_max_kw``: PV nameplate (pmpp), battery charge/discharge
    limit, EV charger rate, flexible load's added peak, generator maximum."""
    from derms.reports.dispatch_opendss import der_load_name

    f = scenario.fleet
    size = dict(zip(scenario.placements["der_id"], scenario.placements["size_kw"]))
    cust = dict(zip(scenario.placements["der_id"], scenario.placements["load"]))
    nan = math.nan
    rows = []
    for d, kind in zip(f.ders, f.kinds):
        c = d.connection
        r = {"der_id": d.der_id, "kind": kind, "bus": c.bus,
             "phases": c.phases, "nodes": " ".join(str(int(n)) for n in c.nodes),
             "kv": c.kv, "conn": c.conn, "customer_load": cust.get(d.der_id, ""),
             "p_max_kw": nan, "s_kva": nan, "e_max_kwh": nan, "soc0_frac": nan,
             "soc_min_frac": nan, "soc_max_frac": nan, "eta_charge": nan,
             "eta_discharge": nan, "e_needed_kwh": nan, "arrival": "", "departure": "",
             "p_avail_max_kw": nan, "pv_available_kwh": nan,
             "opendss_load": f"load.{der_load_name(d.der_id)}"}
        if kind == "pv":
            r.update(p_max_kw=size.get(d.der_id, nan), s_kva=d.s_kva,
                     p_avail_max_kw=float(d.p_avail_kw.max()),
                     pv_available_kwh=float(d.p_avail_kw.sum() * f.horizon.dt_h))
        elif kind == "battery":
            r.update(p_max_kw=d.p_max_kw, e_max_kwh=d.e_max_kwh, soc0_frac=d.soc0_frac,
                     soc_min_frac=max(d.soc_min_frac, d.reserve_frac),
                     soc_max_frac=d.soc_max_frac, eta_charge=d.eta_charge,
                     eta_discharge=d.eta_discharge)
        elif kind == "ev":
            r.update(p_max_kw=d.p_max_kw, e_needed_kwh=d.e_needed_kwh, eta_charge=d.eta_charge,
                     arrival=_iso(d.arrival), departure=_iso(d.departure))
        elif kind == "flex":
            r.update(p_max_kw=float(d.p_base_kw.max()))
        else:
            r.update(p_max_kw=d.p_max_kw)
        rows.append(r)
    return pd.DataFrame(rows)


def schedule_table(sched: Schedule) -> pd.DataFrame:
    """``der_id, kind, timestamp, p_kw, q_kvar, soc_frac, curtail_kw`` for every DER and
    interval (net import, consumption positive; SOC at the end of the interval)."""
    long = sched.long()
    return pd.DataFrame({"der_id": long["der_id"], "kind": long["kind"],
                         "timestamp": _iso_index(long["t"]), "p_kw": long["p_kw"],
                         "q_kvar": long["q_kvar"], "soc_frac": long["soc_frac"],
                         "curtail_kw": long["curtail_kw"]})


def head_table(study: DispatchStudy) -> pd.DataFrame:
    """Substation import per interval [kW, kvar] of the three simulated cases."""
    r = study.uncontrolled.result
    out = {"timestamp": _iso_index(r.t)}
    for name, case in (("uncontrolled", study.uncontrolled), ("rule_based", study.rule_based),
                       ("optimised", study.optimised)):
        out[f"p_{name}_kw"] = case.head_kw
        out[f"q_{name}_kvar"] = case.result.head_q_kvar.sum(axis=1)
    return pd.DataFrame(out)


def ledger_tables(ledger: Ledger) -> dict[str, pd.DataFrame]:
    """The ledger's three tables with ISO UTC timestamps (``t`` → ``timestamp``)."""
    out = {}
    for name in ("binding", "moves", "curtailment"):
        frame = getattr(ledger, name).copy()
        ts = _iso_index(frame["t"]) if len(frame) else np.zeros(0, dtype=object)
        frame.insert(0, "timestamp", ts)
        out[name] = frame.drop(columns="t")
    return out


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


def write_dispatch_outputs(study: DispatchStudy, out: Path) -> dict[str, Path]:
    """Write every file of the study to ``out`` (created); returns their paths."""
    from derms.reports.dispatch_html import write_dispatch_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def csv(name: str, frame: pd.DataFrame) -> None:
        paths[name] = out / f"{name}.csv"
        frame.to_csv(paths[name], index=False, float_format="%.10g")

    csv("ders", ders_table(study.scenario))
    csv("schedule", schedule_table(study.optimised.schedule))
    csv("schedule_rule_based", schedule_table(study.rule_based.schedule))
    csv("schedule_uncontrolled", schedule_table(study.uncontrolled.schedule))
    csv("head", head_table(study))
    for name, frame in ledger_tables(study.ledger).items():
        csv(f"ledger_{name}", frame)
    paths["summary"] = out / "summary.json"
    summary = replace_nan(study.summary)
    paths["summary"].write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    paths["readme"] = out / "README.md"
    paths["readme"].write_text(readme_text(study))
    paths["report"] = write_dispatch_report(out / "report.html", study)
    return paths


def replace_nan(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf floats -> None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in d.items()}


def readme_text(study: DispatchStudy) -> str:
    """README.md of the output folder: files, columns, units, sign convention."""
    s = study.summary
    return f"""# derms dispatch — {study.feeder}

Horizon: {s['n_steps']} intervals of {s['step_s']:g} s from {s['horizon_start']}.
Seed {s['seed']}; penetrations PV {s['pv_penetration']}, battery {s['battery_penetration']},
EV {s['ev_penetration']}; curtailment policy `{s['curtailment_policy']}`, export limit
{s['export_limit_kw']} kW.

## Conventions
- **Sign** (DESIGN.md): at a connection point and at the substation,
  **import (consumption) is positive**. A DER's `p_kw`/`q_kvar` is its net import: a PV
  exporting 5 kW has `p_kw = -5`, a charging battery or EV is positive, a discharging
  battery negative.
- **Time**: `timestamp` is UTC ISO 8601 (`Z`), the start of the interval `[t, t + step)`.
- **Units** are in the column names: kW, kvar, kWh, kV, pu; `*_frac` are fractions (0–1).
- **Violations** (`violations_*` in summary.json): (node-phase or branch-conductor ×
  interval) pairs from the full AC simulation (OpenDSS QSTS) outside [0.95, 1.05] pu
  (tolerance 0.001 pu) or above 100 % of the normal rating (tolerance 1 %); elements that
  already break a limit without DERs are held to that base-case value (`pre_existing_*`).

## Files
| file | content |
|---|---|
| `summary.json` | key figures: peaks [kW] (`peak_uncontrolled_kw`, `peak_rule_based_kw`, `peak_optimised_kw`, `peak_perfect_foresight_kw`), violation counts, timings [s] (`solve_s` LP solves, `ac_verify_s` AC simulations of plans), DER counts; `optimised_mode` says whether `peak_optimised_kw` comes from a rolling re-plan with forecasts or the perfect-knowledge plan |
| `ders.csv` | every DER: `der_id, kind (pv, battery, ev, flex, generator), bus, phases` (count), `nodes` (OpenDSS conductor numbers, space-separated, 0 = ground), `kv` (line-to-line for 3-phase and delta, line-to-neutral for 1-phase wye), `conn, customer_load, p_max_kw, s_kva, e_max_kwh, soc0_frac, soc_min_frac (incl. reserve), soc_max_frac, eta_charge, eta_discharge, e_needed_kwh, arrival, departure, p_avail_max_kw, pv_available_kwh, opendss_load` (empty where not applicable) |
| `schedule.csv` | optimised plan: `der_id, kind, timestamp, p_kw, q_kvar, soc_frac` (batteries, at the end of the interval), `curtail_kw` (PV: available − output) |
| `schedule_rule_based.csv`, `schedule_uncontrolled.csv` | the same for the rule-based peak-shaving baseline (batteries discharge above {RULE_BASED_THRESHOLD_FRAC:.0%} of the uncontrolled peak) and the uncontrolled case (PV at available power, batteries idle, EVs charge at once) |
| `head.csv` | substation import per interval: `p_<case>_kw`, `q_<case>_kvar` for uncontrolled, rule_based, optimised (AC) |
| `ledger_binding.csv` | per interval the constraints that bind in the plan: `timestamp, kind (v_max, v_min [pu]; i_max [A]; peak, export_limit [kW]), element, limit, value (AC), dual` |
| `ledger_moves.csv` | every DER moved against the uncontrolled schedule: `timestamp, der_id, kind, p_uncontrolled_kw, p_plan_kw, delta_kw, reason` (the binding constraint it serves most, `shift for …` for energy moved to serve a constraint elsewhere in the horizon, or `objective`) |
| `ledger_curtailment.csv` | `timestamp, der_id, curtailed_kwh_cum, share_cum`: cumulative curtailed energy per PV and its share of all curtailment so far |
| `report.html` | self-contained report (opens offline) |
| `opendss/` | OpenDSS replay set (below) |

## Replaying in plain OpenDSS
`opendss/run_uncontrolled.dss`, `run_rule_based.dss` and `run_optimised.dss` compile the
copied feeder, add one constant-P/Q `Load` per DER (`der_<der_id>`, its yearly shape
holding its net import per interval), the feeder loads' shapes, the solver settings and
the initial regulator taps and capacitor states, then solve {s['n_steps']} yearly steps.
Substation import = minus the P channels of monitor `derms_head` (`Export monitors
derms_head`). Paths are relative; the folder can be zipped. PVSystem/Storage elements
are not used on purpose: their defaults (%reserve, idling losses, efficiencies) would
change the powers; the plan's battery model is already inside the net-import schedule.
"""
