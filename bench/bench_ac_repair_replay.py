"""The last-mile AC repair replayed on a captured IEEE 8500 plan (issue 6).

The planning loop's rounds are chaotic (one tap or bank moved reshuffles the next round,
and HiGHS's time-based fallback makes them depend on the machine's load), so two full
runs of ``bench_dispatch_8500.py`` compare two trajectories, not two repairs. This script
separates them:

* ``--capture FILE``: plan and verify as ``bench_dispatch_8500.py`` does and store the
  schedule handed to :func:`~derms.dispatch.ac_repair.repair_plan` (a pickle; the case is
  rebuilt from the scenario seed, which is deterministic);
* ``--replay FILE``: rebuild the case, simulate that schedule and run only the repair on
  it; the same file gives the same input to every version of the repair.

Prints one table: violations before and after the repair, its rounds, and its time, then
the last mile in sequence after it (:func:`~derms.dispatch.realtime.correct_in_sequence`,
as ``plan_and_verify`` runs it when the repair leaves violations), each time also as a
ratio to one 96-step AC QSTS of the captured schedule measured in the same run.

    .venv/bin/python bench/bench_ac_repair_replay.py --seed 2 --group 4 --capture s2g4.pkl
    .venv/bin/python bench/bench_ac_repair_replay.py --seed 2 --group 4 --replay s2g4.pkl
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

from derms.der.aggregate import AggregationConfig
from derms.dispatch import verify
from derms.dispatch.ac_repair import RepairConfig, repair_plan
from derms.dispatch.members import MemberView
from derms.dispatch.plan import ObjectiveConfig, uncontrolled_schedule
from derms.dispatch.realtime import RealTimeConfig, correct_in_sequence
from derms.grid.bundled import resolve_master
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case


def _count(rep) -> int:
    return rep.counts["violations_voltage"] + rep.counts["violations_thermal"]


def _capture(ac, sc, path: Path, rounds: int) -> None:
    """Plan and verify; the schedule the repair is handed goes to ``path``."""
    real = verify.repair_plan

    def keep(view, sched, res, cfg=None):
        path.write_bytes(pickle.dumps(sched))
        return real(view, sched, res, cfg)

    verify.repair_plan = keep
    try:
        unc = ac.reference(uncontrolled_schedule(sc.fleet))
        vp = verify.plan_and_verify(ac, ObjectiveConfig(), uncontrolled=unc,
                                    max_ac_rounds=rounds)
    finally:
        verify.repair_plan = real
    if not path.exists():
        sys.exit(f"no repair ran (the loop left {_count(vp.violations)} violations): "
                 f"nothing captured")
    print(f"captured {path} (after the repair: {_count(vp.violations)} violations)")


def _replay(ac, path: Path, rounds: int) -> None:
    sched = pickle.loads(path.read_bytes())  # a file this script wrote
    view = MemberView(ac) if ac.agg.grouped else ac
    t = time.perf_counter()
    res = view.simulate(sched.p_kw, sched.q_kvar)
    ref_s = time.perf_counter() - t
    before = _count(view.violations(res))
    t = time.perf_counter()
    out = repair_plan(view, sched, res, RepairConfig(rounds=rounds))
    s = time.perf_counter() - t
    print(f"\nreplay of {path}; reference = one 96-step AC QSTS of it = {ref_s:.2f} s\n")
    print("| figure | value | / reference QSTS |")
    print("|---|---|---:|")
    print(f"| violations before -> after the repair | {before} -> {_count(out.report)} | |")
    print("| rounds (violations after each) | "
          + " / ".join(str(e["violations_after"]) for e in out.log) + " | |")
    print(f"| repair time | {s:.2f} s | {s / ref_s:.1f} |")
    left = _count(out.report)
    if left and verify.AC_SEQUENTIAL:
        for caps_out in (True, False):
            t = time.perf_counter()
            seq, corr = correct_in_sequence(
                view, out.schedule, float(out.result.head_p_kw.sum(axis=1).max()),
                RealTimeConfig(caps_out=caps_out))
            after = _count(view.violations(view.simulate(seq.p_kw, seq.q_kvar)))
            s = time.perf_counter() - t
            what = "capacitors kept out" if caps_out else "capacitors left alone"
            print(f"| in sequence after it ({what}): violations, intervals corrected | "
                  f"{left} -> {after}, {len(corr)} | |")
            print(f"| in-sequence time ({what}; with its QSTS check) | {s:.2f} s | "
                  f"{s / ref_s:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", type=int, default=1)
    ap.add_argument("--flex", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=8, help="the loop's AC rounds (capture)")
    ap.add_argument("--repair-rounds", type=int, default=RepairConfig.rounds)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--capture", type=Path)
    mode.add_argument("--replay", type=Path)
    args = ap.parse_args()
    agg = AggregationConfig(size=args.group) if args.group > 1 else None
    engine, sc, ac = open_dispatch_case(
        resolve_master("ieee8500"),
        ScenarioConfig(flex_penetration=args.flex, seed=args.seed), aggregation=agg)
    try:
        if args.capture:
            _capture(ac, sc, args.capture, args.rounds)
        else:
            if not args.replay.is_file():
                sys.exit(f"--replay {args.replay}: no such file (capture it first)")
            _replay(ac, args.replay, args.repair_rounds)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
