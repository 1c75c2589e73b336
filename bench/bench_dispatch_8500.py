"""Day-ahead dispatch on IEEE 8500 (issue 6): 30 % PV, 25 % battery, 20 % EV, seed 0
(``--flex 0.1`` adds flexible loads at 10 % of the customers: 1,000 DERs).

Prints one table: uncontrolled vs optimised violations (DESIGN.md definitions, from the
full AC QSTS with regulators and capacitors acting), LP rows x columns (and nonzeros),
build / solve / AC-verify times, AC rounds, peaks, and a warm re-plan (same HiGHS model,
PV forecast -10 %, SOCs moved). Every time is also given as a ratio to one reference
measured in the same run: one 96-step AC QSTS of the uncontrolled schedule.

The feeder is compiled and the AC network prepared (linear model, DER sensitivities, base
case) before timing, as in ``bench_dispatch.py``.

    .venv/bin/python bench/bench_dispatch_8500.py [--rounds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from derms.der.aggregate import AggregationConfig
from derms.dispatch.plan import ObjectiveConfig, uncontrolled_schedule
from derms.dispatch.verify import plan_and_verify
from derms.grid.bundled import resolve_master
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case

SHARED = Path("/work/shared/feeders/IEEETestCases/8500-Node/Master.dss")


def _viol(rep) -> int:
    return rep.counts["violations_voltage"] + rep.counts["violations_thermal"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8, help="max AC verification rounds")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="scenario seed")
    ap.add_argument("--flex", type=float, default=0.0,
                    help="flexible-load penetration added to the scenario (0.1 takes the "
                         "fleet from 882 to 1,000 DERs, the issue's speed case)")
    ap.add_argument("--group", type=int, default=1,
                    help="plan DERs in groups of about this many moving in fixed proportion "
                         "(derms.der.aggregate); 1 = every DER on its own")
    ap.add_argument("--spread", type=float, default=AggregationConfig.spread,
                    help="largest relative distance of two members' sensitivities")
    ap.add_argument("--ratio-step", type=float, default=AggregationConfig.ratio_step)
    ap.add_argument("--no-warm", action="store_true", help="skip the warm re-plan")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every AC round")
    ap.add_argument("--events", action="store_true",
                    help="print the violations the optimised plan still has (stderr)")
    args = ap.parse_args()
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(message)s")
    master = resolve_master("ieee8500")
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    out: dict = {}
    t0 = time.perf_counter()
    agg = AggregationConfig(size=args.group, spread=args.spread,
                            ratio_step=args.ratio_step) if args.group > 1 else None
    engine, sc, ac = open_dispatch_case(master, ScenarioConfig(flex_penetration=args.flex,
                                                                  seed=args.seed),
                                        aggregation=agg)
    out["setup_s"] = time.perf_counter() - t0
    f = sc.fleet
    out["n_pv"], out["n_battery"], out["n_ev"] = len(f.pv), len(f.batteries), len(f.evs)
    out["n_flex"] = len(f.flex)
    out["n_der"] = len(f.ders)
    out["n_planned"] = len(ac.fleet.ders)
    t = time.perf_counter()
    unc = ac.reference(uncontrolled_schedule(f))
    ref_s = out["reference_qsts_s"] = time.perf_counter() - t
    rep_u = ac.violations(unc[1])
    out["violations_uncontrolled"] = _viol(rep_u)
    out["uncontrolled_counts"] = rep_u.counts
    out["peak_uncontrolled_kw"] = float(unc[1].head_p_kw.sum(axis=1).max())
    t = time.perf_counter()
    vp = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=unc, max_ac_rounds=args.rounds)
    out["plan_and_verify_s"] = time.perf_counter() - t
    out["timing_s"] = vp.timing_s
    out["ac_rounds"] = vp.rounds
    lp = vp.planner.lp
    out["lp_rows"], out["lp_cols"], out["lp_nnz"] = lp.n_rows, lp.h.getNumCol(), lp.h.getNumNz()
    out["network_rows"] = int(sum((r >= 0).sum() for r in vp.planner.net.row.values()))
    out["lp_solves"] = lp.n_solves
    out["violations_optimised"] = _viol(vp.violations)
    out["optimised_counts"] = vp.violations.counts
    out["peak_optimised_kw"] = float(vp.result.head_p_kw.sum(axis=1).max())
    out["rounds_log"] = getattr(vp, "rounds_log", [])
    out["repair_log"] = getattr(vp, "repair_log", [])
    if args.events:
        ev = vp.violations.events
        print(ev[~ev["pre_existing"]].to_string(), file=sys.stderr)
    if not args.no_warm:
        pl = vp.planner
        fp = ac.fleet  # the planned DERs (groups when aggregated)
        f2 = fp.with_horizon(fp.horizon, pv_avail_kw=0.9 * np.column_stack(
            [p.p_avail_kw for p in fp.pv]), soc0_frac=np.full(len(fp.batteries), 0.6))
        t = time.perf_counter()
        pl.update(f2)
        pl.solve_linear()
        out["warm_replan_lp_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res2 = ac.reference(pl.schedule())[1]
        out["warm_replan_ac_check_s"] = time.perf_counter() - t
        out["warm_replan_violations"] = _viol(ac.violations(res2))
        # the same re-plan from no basis (HiGHS's own cold start) for comparison
        pl.update(f2)
        pl.lp.h.clearSolver()
        t = time.perf_counter()
        pl.solve_linear()
        out["cold_replan_lp_s"] = time.perf_counter() - t
    engine.close()
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
    tm = vp.timing_s

    def row(name, v, ratio=None):
        r = "" if ratio is None else f"{ratio:.1f}"
        print(f"| {name} | {v} | {r} |")

    print(f"\nIEEE 8500, {out['n_der']} DERs planned as {out['n_planned']} ({out['n_pv']} PV, "
          f"{out['n_battery']} batteries, "
          f"{out['n_ev']} EVs, {out['n_flex']} flexible loads), 96 x 15 min; reference = "
          f"one 96-step AC QSTS of the uncontrolled case = {ref_s:.2f} s\n")
    print("| figure | value | / reference QSTS |")
    print("|---|---|---:|")
    row("violations uncontrolled -> optimised (AC)",
        f"{out['violations_uncontrolled']} -> {out['violations_optimised']}")
    row("LP rows x columns (nonzeros)", f"{out['lp_rows']:,} x {out['lp_cols']:,} "
        f"({out['lp_nnz']:,}); network rows {out['network_rows']:,}")
    row("AC rounds / LP solves", f"{out['ac_rounds']} / {out['lp_solves']}")
    for k in ("uncontrolled_ac_s", "build_s", "solve_s", "ac_verify_s", "ac_repair_s"):
        row(k, f"{tm.get(k, float('nan')):.2f} s", tm.get(k, float("nan")) / ref_s)
    row("plan + verify, total", f"{out['plan_and_verify_s']:.2f} s",
        out["plan_and_verify_s"] / ref_s)
    if not args.no_warm:
        row("warm re-plan LP", f"{out['warm_replan_lp_s']:.2f} s", out["warm_replan_lp_s"] / ref_s)
        row("same re-plan from no basis, LP", f"{out['cold_replan_lp_s']:.2f} s",
            out["cold_replan_lp_s"] / ref_s)
        row("warm re-plan AC check", f"{out['warm_replan_ac_check_s']:.2f} s "
            f"({out['warm_replan_violations']} violations)",
            out["warm_replan_ac_check_s"] / ref_s)
    row("peak uncontrolled / optimised", f"{out['peak_uncontrolled_kw']:.0f} / "
        f"{out['peak_optimised_kw']:.0f} kW")
    print("\n| AC round | violations (voltage / thermal) | LP rows | network rows | LP solves "
          "(cum.) | LP s (cum.) | AC s (cum.) | elapsed s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in out["rounds_log"]:
        print(f"| {r['round']} | {r['violations_voltage'] + r['violations_thermal']} "
              f"({r['violations_voltage']} / {r['violations_thermal']}) | {r['lp_rows']:,} | "
              f"{r['network_rows']:,} | {r.get('lp_solves', '')} | "
              f"{r.get('lp_solve_s', float('nan')):.1f} | {r.get('ac_s', float('nan')):.1f} | "
              f"{r['elapsed_s']:.1f} |")
    if out["repair_log"]:
        print("\n| AC repair round | intervals corrected | kW (PV, EV) / kvar moved | violations "
              "before -> after | s |")
        print("|---:|---:|---|---|---:|")
        for r in out["repair_log"]:
            print(f"| {r['round']} | {len(r['intervals'])} | {r['kw_moved']:.0f} / "
                  f"{r['kvar_moved']:.0f} | {r['violations_before']} -> "
                  f"{r['violations_after']} | {r['s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
