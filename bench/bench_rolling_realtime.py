"""The rolling loop's executed schedule with and without the real-time AC correction
(:mod:`derms.dispatch.realtime`), on any feeder.

``run_rolling`` over ``--days`` days (15-min re-plans, two levels), once executing the
schedule as planned (``realtime=False``: simulated on the AC model at the end) and once
executing each interval on the AC model as it comes and correcting the intervals that
break a limit (``realtime=True``, the default). Printed per run: the executed peak and
its reduction ratio to perfect foresight, the executed schedule's violations from the
final AC simulation (DESIGN.md counts), the uncontrolled ones, the corrections (intervals,
rows beyond a limit before and after, kW and kvar moved, their time) and the run's wall
time, also as a ratio to one QSTS of the uncontrolled schedule measured in the same run.

    .venv/bin/python bench/bench_rolling_realtime.py [ieee123] [--seed 1] [--days 1]
        [--forecast noisy|perfect] [--group 4] [--only on|off]
"""

from __future__ import annotations

import argparse
import sys
import time

from _setup import prepare

prepare(1)

from derms.der.aggregate import AggregationConfig
from derms.dispatch.plan import ObjectiveConfig, uncontrolled_schedule
from derms.dispatch.rolling import run_rolling
from derms.grid.bundled import resolve_master
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("feeder", nargs="?", default="ieee123")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--days", type=float, default=1.0)
    ap.add_argument("--forecast", default="noisy", choices=("noisy", "perfect"))
    ap.add_argument("--group", type=int, default=1)
    ap.add_argument("--only", choices=("on", "off"), default=None)
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print each correction (interval, rows, moves, head import)")
    args = ap.parse_args(argv)
    agg = AggregationConfig(size=args.group) if args.group > 1 else None
    cfg = ScenarioConfig(seed=args.seed, n_steps=int(96 * (args.days + 1)))
    engine, sc, ac = open_dispatch_case(resolve_master(args.feeder), cfg, aggregation=agg)
    unc = uncontrolled_schedule(ac.members)
    t0 = time.perf_counter()
    ac.simulate_schedule(unc)
    ref_s = time.perf_counter() - t0
    print(f"{args.feeder} seed {args.seed}, {len(ac.members.ders)} DERs "
          f"({len(ac.fleet.ders)} planned), {args.days:g} d, forecast {args.forecast}; "
          f"reference QSTS ({cfg.n_steps} steps) {ref_s:.2f} s")
    print(f"{'real-time':9s} {'ratio':>6s} {'peak kW':>9s} {'unc kW':>9s} {'pf kW':>9s} "
          f"{'viol':>6s} {'unc viol':>8s} {'corr int':>8s} {'rows b/a':>11s} {'kW mv':>8s} "
          f"{'kvar mv':>8s} {'corr s':>7s} {'wall s':>8s} {'/ref':>6s}")
    modes = {"on": (True,), "off": (False,), None: (False, True)}[args.only]
    for rt in modes:
        t0 = time.perf_counter()
        r = run_rolling(ac, sc, ObjectiveConfig(), forecast=args.forecast, days=args.days,
                        lookahead="24h", seed=args.seed, realtime=rt)
        wall = time.perf_counter() - t0
        v = r.violations["violations_voltage"] + r.violations["violations_thermal"]
        vu = (r.violations_uncontrolled["violations_voltage"]
              + r.violations_uncontrolled["violations_thermal"])
        c = r.realtime
        print(f"{'on' if rt else 'off':9s} {r.reduction_ratio:6.3f} {r.peak_kw:9.1f} "
              f"{r.peak_uncontrolled_kw:9.1f} {r.peak_perfect_kw:9.1f} {v:6d} {vu:8d} "
              f"{c['intervals_corrected']:8d} "
              f"{c['rows_beyond_before']:5d}/{c['rows_beyond_after']:<5d} {c['kw_moved']:8.1f} "
              f"{c['kvar_moved']:8.1f} {c['s']:7.1f} {wall:8.1f} {wall / ref_s:6.1f}",
              flush=True)
        if args.verbose:
            for x in r.corrections:
                print(f"  t={x.t:3d} rows {x.rows_before:4d} -> {x.rows_after:<4d} "
                      f"{x.kw_moved:8.1f} kW {x.kvar_moved:8.1f} kvar  head "
                      f"{x.head_before_kw:8.1f} -> {x.head_after_kw:8.1f} kW  {x.status} "
                      f"{x.s:.2f} s  target {r.target_kw_at_replan[x.t * r.n_replans // len(r.head_kw)]:.1f}")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
