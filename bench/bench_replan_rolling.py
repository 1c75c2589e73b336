"""Warm re-plans as the rolling loop makes them (issue 6: "rolling re-plans every 5-15 min,
warm-started"; "a warm re-plan in <= 2 s"), on any feeder, IEEE 8500 by default.

What is timed is one re-plan of :func:`derms.dispatch.rolling.run_rolling`: the 24-h
window moves on by ``--shift`` intervals, the load and PV forecasts are drawn again
(``--forecast noisy``: the rolling loop's AR(1) forecast, a fresh path per origin;
``perfect``: the truth, so only the window moves), the same HiGHS model gets the new
bounds and costs (:meth:`~derms.dispatch.plan.Planner.update`) and is solved warm from its
last basis with the lazy network rows the loop adds (``solve_linear``). ``--cold``
clears the solver before each re-plan instead (HiGHS from no basis, presolve on): the
comparison a warm start has to win. No AC verification (the rolling loop's re-plans are
linear; the executed schedule is simulated at the end of a rolling run).

The table gives, per re-plan: wall time, LP solves (lazy rounds), rows added, simplex
iterations, each time also as a ratio to one reference measured in the same run: one
QSTS of the uncontrolled schedule over the scenario horizon. The feeder is compiled and
the AC network prepared before timing.

    .venv/bin/python bench/bench_replan_rolling.py [ieee8500] [--group 4] [--seed 1]
        [--replans 3] [--forecast noisy|perfect] [--window 96] [--cold]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from _setup import prepare

prepare(1)

import numpy as np

from derms.der.aggregate import AggregationConfig
from derms.der.models import fleet_arrays
from derms.dispatch.lp import HighsLP
from derms.dispatch.plan import ObjectiveConfig, Planner, uncontrolled_schedule
from derms.dispatch.rolling import (
    NoisyForecast,
    _slice_limits,
    _slice_ref,
    _window_fleet,
)
from derms.grid.bundled import resolve_master
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case


class _Count:
    """Counts the LP solves and simplex iterations of one re-plan."""

    def __init__(self) -> None:
        self.solves = self.iterations = 0
        orig = HighsLP.solve

        def solve(lp, *a, **k):
            try:
                return orig(lp, *a, **k)
            finally:
                self.solves += 1
                self.iterations += max(lp.h.getInfo().simplex_iteration_count, 0)
        HighsLP.solve = solve

    def reset(self) -> None:
        self.solves = self.iterations = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("feeder", nargs="?", default="ieee8500")
    ap.add_argument("--group", type=int, default=4, help="plan DERs in groups of about N "
                    "(1 = every DER on its own)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replans", type=int, default=3)
    ap.add_argument("--shift", type=int, default=1, help="intervals between re-plans")
    ap.add_argument("--forecast", choices=("noisy", "perfect"), default="noisy")
    ap.add_argument("--window", type=int, default=96, help="intervals planned (96: 24 h "
                    "of 15 min)")
    ap.add_argument("--cold", action="store_true", help="clear the solver before each "
                    "re-plan (HiGHS from no basis)")
    args = ap.parse_args()
    W = args.window
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    agg = AggregationConfig(size=args.group) if args.group > 1 else None
    engine, _sc, ac = open_dispatch_case(
        resolve_master(args.feeder),
        ScenarioConfig(seed=args.seed, n_steps=W + args.shift * args.replans),
        aggregation=agg)
    fleet = ac.fleet
    unc = uncontrolled_schedule(fleet)
    t = time.perf_counter()
    ref_u, _res = ac.reference(unc)
    ref_s = time.perf_counter() - t
    a = fleet_arrays(fleet)
    head0 = ref_u.head_kw - unc.p_kw.sum(axis=1)
    noise = NoisyForecast()
    e_kwh = a.bat_e0_kwh.copy()
    need = np.array([e.e_needed_kwh for e in fleet.evs])

    def window(k0: int):
        h0, pv = head0[k0:k0 + W], a.pv_avail_kw[k0:k0 + W]
        if args.forecast == "noisy":
            rng = np.random.default_rng([args.seed, k0])
            h0 = h0 * (1 + noise.path(rng, W, noise.load_sigma))
            pv = np.clip(pv * (1 + noise.path(rng, W, noise.pv_sigma))[:, None], 0.0,
                         a.pv_s_kva[None, :])
        return (_window_fleet(fleet, k0, W, pv, e_kwh, need), _slice_ref(ref_u, k0, W, h0),
                _slice_limits(ac.net_limits, k0, W))

    count = _Count()
    fw, rw, lw = window(0)
    grid = replace(ac.grid_context(ref_u), limits=lw, uncontrolled=rw)
    t = time.perf_counter()
    pl = Planner(fw, grid, ObjectiveConfig())
    pl.solve_linear()
    first = (time.perf_counter() - t, count.solves, count.iterations)
    rows = [("first plan (cold)", *first, pl.lp.n_rows)]
    for r in range(1, args.replans + 1):
        fw, rw, lw = window(r * args.shift)
        count.reset()
        n0 = pl.lp.n_rows
        t = time.perf_counter()
        pl.update(fw, rw, limits=lw)
        if args.cold:
            pl.lp.h.clearSolver()
        pl.solve_linear()
        rows.append((f"re-plan {r} ({'cold' if args.cold else 'warm'})",
                     time.perf_counter() - t, count.solves, count.iterations,
                     pl.lp.n_rows - n0))
    engine.close()
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
    print(f"\n{args.feeder}, seed {args.seed}, {len(fleet.ders)} planned DERs"
          f"{f' (groups of {args.group})' if agg else ''}, forecast {args.forecast}, "
          f"window {W} intervals moved {args.shift} per re-plan; LP at the end "
          f"{pl.lp.n_rows:,} x {pl.lp.h.getNumCol():,}, {pl.lp.h.getNumNz():,} nonzeros; "
          f"reference QSTS {ref_s:.2f} s\n")
    print("| step | wall s | / reference | LP solves | simplex iterations | rows (added) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, solves, its, nrows in rows:
        print(f"| {name} | {wall:.2f} | {wall / ref_s:.1f} | {solves} | {its:,} | {nrows:,} |")


if __name__ == "__main__":
    main()
