"""Linearised model benchmark: build time and linearisation error against OpenDSS.

Per feeder (IEEE 123, IEEE 8500), with the feeder compiled and solved once, controls then
frozen (``controlmode=off``) at that operating point:

* **build s**: wall time of ``build_linear_model(engine, nodes)`` for 10 % of the nodes
  (min of 3; the median and the CPU time are in the notes), everything the caller waits for.
* **max err pu**: linearisation error (DESIGN.md): per draw, 10 % of the nodes (seeded,
  not the source bus, not ungrounded), totals up to ±``share`` of the feeder's total load
  in P and Q; the largest node |V| difference between ``LinearModel.predict_v_pu`` and the
  AC solve with the injections added as constant-PQ node-to-ground loads (tolerance 1e-8).
  *same-sign*: every node pushes the same way, the net total is the drawn share;
  *mixed*: each node has its own random sign, the sum of magnitudes is the drawn share.
  ``|V0|+u`` is the error of the plain first-order readout, for comparison.
* **mirror / bound** (notes; off with ``--no-mirror``): each draw is solved again with every
  sign flipped (an equally likely draw), and :func:`~derms.powerflow.linear_check.mirror_floor`
  gives the least error *any* model linear in ``|V|^2`` and exact at zero injection (the
  form the optimisers use) must make on one of the two: the curvature of the AC solution.
* **readout k** (``--k 2,1,0``; notes table): the same sensitivities read out as a model
  linear in ``f_k(|V|) = (|V|^k - 1) / k`` (``log |V|`` for k = 0;
  :func:`~derms.powerflow.linear_check.readout_v_pu`): per k the max error on the draws,
  on the mirrors, and the least error any model linear in ``f_k`` allows on a draw and its
  mirror (``mirror_floor``). ``k = 2`` is ``LinearModel.predict_v_pu``.
* **build with branches**: the same with ``branches=True`` (branch-current sensitivities
  too), in the notes under the table.
* **AC s**: median time of one OpenDSS solve with the injections (reference), and the
  ratio build / AC.

Run: ``.venv/bin/python bench/bench_linear.py [--draws 40] [--share 0.5] [--only 8500]
[--no-mirror] [--k 2,1.5,1,0.5,0,-1]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from derms.powerflow.engine import OpenDSSEngine, SolveSettings  # noqa: E402
from derms.powerflow.linear import build_linear_model, solve_ac_with_injections  # noqa: E402
from derms.powerflow.linear_check import (  # noqa: E402
    draw_injections,
    mirror_floor,
    readout_v_pu,
)

_SHARED = REPO.parent / "shared" / "feeders" / "IEEETestCases"
_BUNDLED = REPO / "src" / "derms" / "data" / "feeders"
FEEDERS = {  # the shared reference copies, else the identical bundled ones
    "123": next(p for p in (_SHARED / "123Bus/IEEE123Master.dss",
                            _BUNDLED / "ieee123/IEEE123Master.dss") if p.exists()),
    "8500": next(p for p in (_SHARED / "8500-Node/Master.dss",
                             _BUNDLED / "ieee8500/Master.dss") if p.exists()),
}


def _draw(engine, seed: int, share: float, mixed: bool, excluded: set[str]):
    """(model, p_kw, q_kvar) for one seeded draw (derms.powerflow.linear_check)."""
    return draw_injections(engine, np.random.default_rng(seed), share=share, mixed=mixed,
                           excluded=excluded)


def run_feeder(key: str, draws: int, share: float, mirror: bool,
               ks: tuple[float, ...] = (2.0,)) -> dict:
    engine = OpenDSSEngine(FEEDERS[key], SolveSettings(tolerance=1e-8))
    engine.solve_snapshot()
    engine.set_control_mode("off")
    engine.solve_snapshot()
    n = len(engine.node_names())
    excluded: set[str] = set()
    nodes = _draw(engine, 0, share, False, excluded)[0].injection_nodes
    walls, cpus = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        build_linear_model(engine, nodes)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    br_walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        build_linear_model(engine, nodes, branches=True)
        br_walls.append(time.perf_counter() - t0)
    out = {"feeder": f"IEEE {key}", "nodes": n, "inj": len(nodes), "build": min(walls),
           "build_med": statistics.median(walls), "build_cpu": min(cpus), "ac": [],
           "build_br": min(br_walls), "k": {}}
    ok = None
    for mixed in (False, True):
        err, err_taylor, err_mirror, bound = [], [], [], []
        by_k = {k: ([], [], []) for k in ks}  # errors on draws, on mirrors, floors
        for seed in range(draws):
            model, p, q = _draw(engine, seed, share, mixed, excluded)
            ok = model.v0_pu > 0 if ok is None else ok
            t0 = time.perf_counter()
            v_ac = solve_ac_with_injections(engine, model.injection_nodes, p, q, restore=False)
            out["ac"].append(time.perf_counter() - t0)
            engine.solve()  # back to the operating point (untimed)
            err.append(np.abs(v_ac - model.predict_v_pu(p, q))[ok].max())
            u = model.dv_dp_pu_per_kw @ p + model.dv_dq_pu_per_kvar @ q
            err_taylor.append(np.abs(v_ac - model.v0_pu - u)[ok].max())
            v0 = model.v0_pu[ok]
            if mirror:  # the same draw with every sign flipped, and the class bound
                v_b = solve_ac_with_injections(engine, model.injection_nodes, -p, -q)
                err_mirror.append(np.abs(v_b - model.predict_v_pu(-p, -q))[ok].max())
                bound.append(mirror_floor(v0, v_ac[ok], v_b[ok], 2.0).max())
            for k, (e_k, m_k, f_k) in by_k.items():
                e_k.append(np.abs(v_ac[ok] - readout_v_pu(v0, u[ok], k)).max())
                if mirror:
                    m_k.append(np.abs(v_b[ok] - readout_v_pu(v0, -u[ok], k)).max())
                    f_k.append(mirror_floor(v0, v_ac[ok], v_b[ok], k).max())
            print(f"  {key} {'mixed' if mixed else 'same'} seed {seed}: err {err[-1]:.5f} "
                  f"(|V0|+u {err_taylor[-1]:.5f})"
                  + (f" mirror {err_mirror[-1]:.5f} bound {bound[-1]:.5f}" if mirror else ""),
                  file=sys.stderr)
        tag = "mixed" if mixed else "same"
        out[tag], out[tag + "_taylor"] = max(err), max(err_taylor)
        out[tag + "_seed"] = int(np.argmax(err))
        out[tag + "_le01"] = sum(e <= 0.01 for e in err)
        for k, (e_k, m_k, f_k) in by_k.items():
            out["k"][tag, k] = (max(e_k), int(np.argmax(e_k)), sum(e <= 0.01 for e in e_k),
                                max(m_k, default=np.nan), max(f_k, default=np.nan),
                                int(np.argmax(f_k)) if f_k else -1,
                                sum(f > 0.01 for f in f_k))
        if mirror:
            out[tag + "_mirror"], out[tag + "_bound"] = max(err_mirror), max(bound)
            out[tag + "_bound_seed"] = int(np.argmax(bound))
            out[tag + "_bound_gt01"] = sum(b > 0.01 for b in bound)
    out["excluded"] = sorted(excluded)
    engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--no-mirror", action="store_true",
                    help="skip the mirrored draws and the lower bound (half the AC solves)")
    ap.add_argument("--share", type=float, default=0.5, help="max |total| / feeder load")
    ap.add_argument("--only", choices=sorted(FEEDERS), action="append")
    ap.add_argument("--k", default="2", help="readout exponents, comma-separated: model "
                    "linear in (|V|^k - 1) / k, 0 = log |V| (default 2 = predict_v_pu)")
    args = ap.parse_args()
    ks = tuple(float(x) for x in args.k.split(","))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "?")
    load0 = os.getloadavg()[0]
    rows = [run_feeder(k, args.draws, args.share, not args.no_mirror, ks)
            for k in (args.only or ["123", "8500"])]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {cpu} ({os.cpu_count()} cores), load avg {load0:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; {args.draws} draws per column, totals up to "
          f"±{args.share:.0%} of the feeder load")
    print()
    print("| feeder | nodes | inj. nodes | build s | max err pu same-sign (|V0|+u) "
          "| max err pu mixed (|V0|+u) | AC s | build / AC |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ac = statistics.median(r["ac"])
        print(f"| {r['feeder']} | {r['nodes']} | {r['inj']} | {r['build']:.3f} | "
              f"{r['same']:.4f} ({r['same_taylor']:.4f}) | {r['mixed']:.4f} "
              f"({r['mixed_taylor']:.4f}) | {ac:.3f} | {r['build'] / ac:.1f} |")
    print()
    for r in rows:
        print(f"- {r['feeder']}: build wall min {r['build']:.3f} s, median "
              f"{r['build_med']:.3f} s, CPU {r['build_cpu']:.3f} s; with branch-current "
              f"sensitivities (branches=True) {r['build_br']:.3f} s; worst draws: same-sign "
              f"seed {r['same_seed']}, mixed seed {r['mixed_seed']}; draws <= 0.01 pu: "
              f"same-sign {r['same_le01']}, mixed {r['mixed_le01']} of {args.draws}; nodes "
              f"left out as ungrounded: {', '.join(r['excluded']) or 'none'}")
        if "mixed_bound" in r:
            print(f"  - mirrored draws (-p, -q): max err same-sign {r['same_mirror']:.4f}, "
                  f"mixed {r['mixed_mirror']:.4f}; least error any model linear in |V|^2 "
                  f"allows on a draw and its mirror (linear_check.mirror_bound): same-sign "
                  f"{r['same_bound']:.4f} (seed {r['same_bound_seed']}, "
                  f"{r['same_bound_gt01']} draws > 0.01), mixed {r['mixed_bound']:.4f} (seed "
                  f"{r['mixed_bound_seed']}, {r['mixed_bound_gt01']} draws > 0.01)")
    if ks != (2.0,):
        print()
        print("| feeder | kind | readout k | max err draws / mirrors | draws ≤ 0.01 "
              "| least error allowed (worst draw) | draws where it is > 0.01 |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            for (tag, k), (e, seed, le, m, f, f_seed, gt) in r["k"].items():
                kind = "mixed" if tag == "mixed" else "same-sign"
                print(f"| {r['feeder']} | {kind} | {'log' if k == 0 else f'{k:g}'} | {e:.4f} / "
                      f"{m:.4f} | {le} of {args.draws} (worst seed {seed}) | {f:.4f} (seed "
                      f"{f_seed}) | {gt} |")
    if load0 > 1.5:
        print("- NOTE: load average near the core count; wall times include other jobs.")


if __name__ == "__main__":
    main()
