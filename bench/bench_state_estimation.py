"""State estimation benchmark: IEEE 8500 with AMI at every service transformer + SCADA head.

Scenario (as ``tests/validation/test_state_estimation.py``): the feeder is compiled and
solved once with controls acting, then taps and capacitors are frozen. Per seed: every
load's P and Q is drawn as base x U(0.5, 1.5); the AC solve is the truth. Measurements:
one AMI voltage per service transformer (1,177 meters, at the customer bus it feeds),
SCADA head voltage (3 phases at the LTC output) and head P/Q per phase, each the truth +
Gaussian noise of sigma = ``noise`` x value; pseudo-measurements: the base loads with
sigma = 50 %. Two noise levels: sigma = 1 % and sigma = 1/3 % (1 % read as 3 sigma).

Columns:

* **time s**: wall time of one ``estimate_state`` call (median over the seeds; max in the
  notes): everything the user waits for after the feeder is compiled -- the first AC
  solve at the pseudo loads, the linearisation, the adjoint solves, the Gauss-Newton AC
  solves, residual statistics and the branch currents (the ``NetworkIndex`` is built once
  per compiled feeder, before timing).
* **max err / mean err pu**: ``|V_est - V_true|`` over all energised phase nodes (<= 3,
  > 0.1 pu), the largest over the seeds and the mean.
* **AC s**: median time of one plain OpenDSS solve after a load change (the truth solves),
  and the ratio estimate / AC.

BLAS threads: OpenBLAS is pinned to 1 thread by default (``--blas-threads``); on this
shared 2-core machine 2 threads made the dense Cholesky/products 2-10x slower and erratic
whenever another process held a core. The variable is set before numpy is imported.

Run: ``.venv/bin/python bench/bench_state_estimation.py [--seeds 5] [--blas-threads 1]``
"""

from __future__ import annotations

import argparse
import os
import sys


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--blas-threads", type=int, default=1)
    return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.blas_threads)

import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from derms.analysis.state_estimation import estimate_state
from derms.powerflow.collect import build_index
from tests.validation.test_state_estimation import (
    HEAD_BUS,
    NOISE,
    load_table,
    make_engine,
    make_scenario,
    meter_nodes_service_transformers,
    set_loads,
)


def run(seeds: int) -> list[dict]:
    engine = make_engine("ieee8500")
    index = build_index(engine)
    meters = meter_nodes_service_transformers(engine)
    names, p0, q0 = load_table(engine)
    n_nodes = len(engine.node_names())
    rows = []
    for noise in (NOISE, NOISE / 3):
        times, errs, means, iters, ac, conv, m = [], [], [], [], [], [], 0
        for seed in range(seeds):
            sc = make_scenario(engine, meters, seed, HEAD_BUS["ieee8500"], noise)
            # reference: one plain AC solve after a load change (the truth solve again)
            set_loads(engine, sc.p_true_kw, sc.q_true_kvar)
            t0 = time.perf_counter()
            engine.solve()
            ac.append(time.perf_counter() - t0)
            set_loads(engine, p0, q0)
            engine.solve()
            t0 = time.perf_counter()
            est = estimate_state(engine, sc.meas, index=index)
            times.append(time.perf_counter() - t0)
            err = np.abs(est.v_pu - sc.v_true_pu)[sc.energised]
            errs.append(err.max())
            means.append(err.mean())
            iters.append(est.iterations)
            conv.append(est.converged)
            m = len(sc.meas.v_nodes) + 2 * est.head_p_kw.size
            set_loads(engine, p0, q0)
            engine.solve()
        rows.append({
            "noise": noise, "nodes": n_nodes, "meas": m, "pseudo": 2 * len(names),
            "iters": iters, "t_med": statistics.median(times), "t_max": max(times),
            "err_max": max(errs), "err_mean": float(np.mean(means)),
            "ac": statistics.median(ac), "conv": all(conv), "errs": errs,
        })
    engine.close()
    return rows


def main() -> None:
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}",
          file=sys.stderr)
    rows = run(ARGS.seeds)
    print(f"\nState estimation, IEEE 8500, {ARGS.seeds} seeds per row, "
          f"OPENBLAS_NUM_THREADS={ARGS.blas_threads}\n")
    hdr = ("| feeder | noise sigma | nodes | meas | pseudo | iterations | time s | "
           "max err pu | mean err pu | AC s | time/AC |")
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")
    for r in rows:
        print(f"| IEEE 8500 | {100 * r['noise']:.2f} % | {r['nodes']} | {r['meas']} | "
              f"{r['pseudo']} | {min(r['iters'])}-{max(r['iters'])} | {r['t_med']:.3f} | "
              f"{r['err_max']:.4f} | {r['err_mean']:.5f} | {r['ac']:.3f} | "
              f"{r['t_med'] / r['ac']:.0f} |")
    print()
    for r in rows:
        print(f"- sigma {100 * r['noise']:.2f} %: max time {r['t_max']:.3f} s; per-seed max "
              f"error {', '.join(f'{e:.4f}' for e in r['errs'])} pu; all converged: {r['conv']}")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
