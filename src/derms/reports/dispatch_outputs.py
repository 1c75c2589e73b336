"""The files of a dispatch study (:mod:`derms.reports.dispatch_study`).

:func:`write_dispatch_outputs` writes ``summary.json``, ``ders.csv``, ``schedule*.csv``,
``head.csv``, ``ledger_*.csv``, ``README.md`` and ``report.html``.

Sign convention (DESIGN.md): at a connection point and at the substation import
(consumption) is positive [kW, kvar]; a PV exporting 5 kW has ``p_kw = -5``. Times are
UTC; a timestamp is the start of its interval ``[t, t + step)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from derms.dispatch.ledger import Ledger
from derms.dispatch.plan import Schedule
from derms.reports.dispatch_study import (  # re-exported: the CLI and API import them here
    RULE_BASED_THRESHOLD_FRAC,
    DispatchStudy,
    _iso,
    parse_horizon,
    parse_replan,
    run_dispatch_study,
)
from derms.studies.dispatch_scenario import DispatchScenario

__all__ = ["DispatchStudy", "ders_table", "head_table", "ledger_tables", "parse_horizon",
           "parse_replan", "readme_text", "replace_nan", "run_dispatch_study", "schedule_table",
           "write_dispatch_outputs"]

Forecast = Literal["noisy", "model", "perfect"]
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


def violations_table(study: DispatchStudy) -> pd.DataFrame:
    """Every violation event of the three cases: ``case`` (uncontrolled, rule_based,
    optimised), then the columns of ``derms study``'s violations.csv (``start``/``end``
    UTC). Pre-existing runs are listed with ``pre_existing`` and count only where
    ``worsened``; the summary gave counts only, so what the AC check left was unnamed."""
    from derms.analysis.constraints import VIOLATION_COLUMNS

    frames = []
    for name, case in (("uncontrolled", study.uncontrolled),
                       ("rule_based", study.rule_based), ("optimised", study.optimised)):
        ev = case.violations.events
        if len(ev):
            ev = ev[VIOLATION_COLUMNS].copy()
            ev["start"], ev["end"] = _iso_index(ev["start"]), _iso_index(ev["end"])
            frames.append(ev.assign(case=name))
    cols = ["case", *VIOLATION_COLUMNS]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    return pd.concat(frames, ignore_index=True)[cols]


def ledger_tables(ledger: Ledger) -> dict[str, pd.DataFrame]:
    """The ledger's three tables with ISO UTC timestamps (``t`` → ``timestamp``)."""
    out = {}
    for name in ("binding", "moves", "curtailment"):
        frame = getattr(ledger, name).copy()
        ts = _iso_index(frame["t"]) if len(frame) else np.zeros(0, dtype=object)
        frame.insert(0, "timestamp", ts)
        out[name] = frame.drop(columns="t")
    out["ev_shortfalls"] = ledger.ev_shortfalls
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
    csv("violations", violations_table(study))
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
| `summary.json` | key figures: peaks [kW] (`peak_uncontrolled_kw`, `peak_rule_based_kw`, `peak_optimised_kw`, `peak_perfect_foresight_kw`), violation counts, `default_rating_conductors` (of `monitored_branch_conductors` checked for overload, those with an OpenDSS default rating), timings [s] (`solve_s` LP solves, `ac_verify_s` AC simulations of plans), DER counts (`n_planned_ders`: groups of about `group_size` DERs when that is above 1, `group_size_from` auto or given); `optimised_mode` says whether `peak_optimised_kw` comes from a rolling re-plan with forecasts or the perfect-knowledge plan |
| `ders.csv` | every DER: `der_id, kind (pv, battery, ev, flex, generator), bus, phases` (count), `nodes` (OpenDSS conductor numbers, space-separated, 0 = ground), `kv` (line-to-line for 3-phase and delta, line-to-neutral for 1-phase wye), `conn, customer_load, p_max_kw, s_kva, e_max_kwh, soc0_frac, soc_min_frac (incl. reserve), soc_max_frac, eta_charge, eta_discharge, e_needed_kwh, arrival, departure, p_avail_max_kw, pv_available_kwh, opendss_load` (empty where not applicable) |
| `schedule.csv` | optimised plan: `der_id, kind, timestamp, p_kw, q_kvar, soc_frac` (batteries, at the end of the interval), `curtail_kw` (PV: available − output) |
| `schedule_rule_based.csv`, `schedule_uncontrolled.csv` | the same for the rule-based peak-shaving baseline (batteries discharge above {RULE_BASED_THRESHOLD_FRAC:.0%} of the uncontrolled peak) and the uncontrolled case (PV at available power, batteries idle, EVs charge at once) |
| `head.csv` | substation import per interval: `p_<case>_kw`, `q_<case>_kvar` for uncontrolled, rule_based, optimised (AC) |
| `violations.csv` | every violation event (a run of intervals) of the AC simulations: `case` (uncontrolled, rule_based, optimised), `kind, element, phase, start, end, duration_h, n_steps, worst, limit, pre_existing, worsened` (a pre-existing run counts only where it got worse) |
| `ledger_binding.csv` | per interval the constraints that bind in the plan: `timestamp, kind (v_max, v_min [pu]; i_max [A]; peak, export_limit [kW]), element, limit, value (AC), dual` |
| `ledger_moves.csv` | every DER moved against the uncontrolled schedule: `timestamp, der_id, kind, p_uncontrolled_kw, p_plan_kw, delta_kw, reason` (the binding constraint it serves most, `shift for …` for energy moved to serve a constraint elsewhere in the horizon, or `objective`) |
| `ledger_curtailment.csv` | `timestamp, der_id, curtailed_kwh_cum, share_cum`: cumulative curtailed energy per PV and its share of all curtailment so far |
| `ledger_ev_shortfalls.csv` | EV sessions that end short of their energy because a network limit left no other way: `der_id, need_kwh, delivered_kwh, short_kwh, reason` (the binding constraint in the plug-in window that weighs most on the session's charging) |
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

`run_base.dss` is the base case (every DER at zero), the reference of the pre-existing
rule. Each `run_<case>.dss` is `Redirect case_<case>.dss` plus one `Solve` of every
interval; `case_<case>.dss` only sets the case up (yearly mode, one interval per
`Solve`) so results can be read interval by interval.

## Counting the violations in plain OpenDSS
For each case and the base: compile `case_<case>.dss`, `Solve` {s['n_steps']} times and
after each read the voltage [pu] of the nodes in `opendss/monitored_nodes.csv` and the
current of the conductors in `opendss/monitored_branches.csv` (loading = 100 × I /
`norm_amps`; `rating_is_default` marks OpenDSS default ratings). A pair is in violation
when v < v_min − tol, v > v_max + tol or loading > 100 % + tol (`opendss/limits.json`);
when the base case breaks the same limit in the same interval it is pre-existing and
counts only if worse than the base value by more than the tolerance. The sums are
`violations_uncontrolled`, `violations_rule_based` and `violations_optimised`
(docs/data-formats.md has the full rule).
"""
