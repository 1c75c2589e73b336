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
        [--replans 3] [--flex 0.1] [--forecast noisy|perfect] [--window 96] [--cold] [--short 16]

``--short N``: the first plan covers the window, the re-plans after it cover N intervals
anchored to it (battery energy and EV energy at the short window's end from the first
plan: ``run_rolling(anchor_every=..., short_window=...)``); the short model is built at
the first re-plan (its row "built") and updated warm after.
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
    _Anchor,
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
    ap.add_argument("--flex", type=float, default=0.0, help="flexible-load penetration "
                    "(IEEE 8500: 0.1 takes the scenario from 882 to 1,000 DERs)")
    ap.add_argument("--replans", type=int, default=3)
    ap.add_argument("--shift", type=int, default=1, help="intervals between re-plans")
    ap.add_argument("--forecast", choices=("noisy", "perfect"), default="noisy")
    ap.add_argument("--window", type=int, default=96, help="intervals planned (96: 24 h "
                    "of 15 min)")
    ap.add_argument("--cold", action="store_true", help="clear the solver before each "
                    "re-plan (HiGHS from no basis)")
    ap.add_argument("--short", type=int, default=0, help="re-plans over this many intervals "
                    "anchored to the first (full) plan, as run_rolling(anchor_every=...) "
                    "makes them between its full re-plans; 0: every re-plan is full")
    args = ap.parse_args()
    W = args.window
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    agg = AggregationConfig(size=args.group) if args.group > 1 else None
    engine, _sc, ac = open_dispatch_case(
        resolve_master(args.feeder),
        ScenarioConfig(seed=args.seed, n_steps=W + args.shift * args.replans,
                       flex_penetration=args.flex),
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

    h = fleet.horizon
    ev_arr = np.array([h.step_at(e.arrival, ceil=True) for e in fleet.evs], dtype=int)
    ev_dep = np.array([h.step_at(e.departure, ceil=False) for e in fleet.evs], dtype=int)
    done = np.zeros(len(fleet.evs))

    def window(k0: int, n: int = W, anchor: _Anchor | None = None):
        h0, pv = head0[k0:k0 + n], a.pv_avail_kw[k0:k0 + n]
        if args.forecast == "noisy":
            rng = np.random.default_rng([args.seed, k0])
            h0 = h0 * (1 + noise.path(rng, n, noise.load_sigma))
            pv = np.clip(pv * (1 + noise.path(rng, n, noise.pv_sigma))[:, None], 0.0,
                         a.pv_s_kva[None, :])
        e_end, need_w = (anchor.terminal(k0, n, e_kwh, done, need, fleet, a, ev_arr, ev_dep)
                         if anchor is not None else (None, need))
        return (_window_fleet(fleet, k0, n, pv, e_kwh, need_w, e_end),
                _slice_ref(ref_u, k0, n, h0), _slice_limits(ac.net_limits, k0, n))

    count = _Count()
    fw, rw, lw = window(0)
    grid = replace(ac.grid_context(ref_u), limits=lw, uncontrolled=rw)
    t = time.perf_counter()
    pl = Planner(fw, grid, ObjectiveConfig())
    pl.solve_linear()
    first = (time.perf_counter() - t, count.solves, count.iterations)
    rows = [("first plan (cold)", *first, pl.lp.n_rows)]
    anchor = _Anchor.of(0, pl.schedule(), e_kwh, done, a, h.dt_h) if args.short else None
    short: Planner | None = None
    for r in range(1, args.replans + 1):
        k0 = r * args.shift
        fw, rw, lw = window(k0, args.short or W, anchor)
        count.reset()
        t = time.perf_counter()
        if args.short and short is None:   # the short window's model, built once
            short = Planner(fw, replace(grid, limits=lw, uncontrolled=rw), ObjectiveConfig())
            n0, kind = 0, "short, built"
        else:
            p = short if args.short else pl
            n0, kind = p.lp.n_rows, ("short, " if args.short else "") + (
                "cold" if args.cold else "warm")
            p.update(fw, rw, limits=lw)
            if args.cold:
                p.lp.h.clearSolver()
        p = short if args.short else pl
        p.solve_linear()
        rows.append((f"re-plan {r} ({kind})", time.perf_counter() - t, count.solves,
                     count.iterations, p.lp.n_rows - n0))
    engine.close()
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
    print(f"\n{args.feeder}, seed {args.seed}, {len(fleet.ders)} planned DERs"
          f"{f' (groups of {args.group})' if agg else ''} of {len(_sc.fleet.ders)}, "
          f"forecast {args.forecast}, "
          f"window {W} intervals moved {args.shift} per re-plan"
          f"{f', re-plans over {args.short} anchored to it' if args.short else ''}; "
          "full LP at the end "
          f"{pl.lp.n_rows:,} x {pl.lp.h.getNumCol():,}, {pl.lp.h.getNumNz():,} nonzeros; "
          f"reference QSTS {ref_s:.2f} s\n")
    print("| step | wall s | / reference | LP solves | simplex iterations | rows (added) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, solves, its, nrows in rows:
        print(f"| {name} | {wall:.2f} | {wall / ref_s:.1f} | {solves} | {its:,} | {nrows:,} |")


if __name__ == "__main__":
    main()
