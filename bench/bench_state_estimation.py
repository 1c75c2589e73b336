"""State estimation benchmark: IEEE 8500 with AMI at every service transformer + SCADA head.

Scenario (``make_scenario`` of ``tests/validation/test_state_estimation.py``): the feeder is
compiled and solved once with controls acting, then taps and capacitors are frozen. Per
seed: every load's P and Q is drawn as base x U(1 - s, 1 + s), s = ``--spread`` (0.5); the
AC solve is the truth. Measurements: one AMI voltage per service transformer (1,177 meters,
at the customer bus it feeds), SCADA head voltage (3 phases at the LTC output) and head P/Q
per phase, each the truth + Gaussian noise of sigma = ``noise`` x value. Configurations
(``--configs``): ``v`` (AMI voltage only: the acceptance wording), ``v+p`` (+ AMI kW of every
load, meter sigma = ``noise`` x reading), ``v+pq`` (+ kvar). Pseudo-measurements: the base
loads with sigma = ``prior`` x value; ``--priors`` takes fractions or ``truth`` = the
standard deviation of the truth's distribution, s / sqrt(3) (28.9 % at s = 0.5: a correctly
specified prior). Two noise levels: sigma = 1 % and 1/3 % (1 % read as 3 sigma). The same
seed gives the same truth and voltage noise in every configuration and prior.

Columns:

* **cold wall s / cpu s**: wall and process CPU time of one ``estimate_state`` call (median
  over the seeds; max wall in the notes) at a prior point the engine has not seen (its
  ``derived`` cache cleared): everything the user waits for after the feeder is compiled --
  the first AC solve at the pseudo loads, the linearisation, the adjoint solves (in
  threads, BLAS held to one), the Gauss-Newton AC solves, residual statistics and the
  branch currents (the ``NetworkIndex`` is built once per compiled feeder, before timing).
  CPU time counts both threads. ``uptime`` is printed before/after.
* **warm wall s**: the same estimate again from the same prior point (the pseudo loads of a
  profile step: every estimate of a monitoring cycle until the profile moves on), where the
  measurement Jacobian and ``H P H^T`` kept on the engine are reused.
* **max err / mean err pu**: ``|V_est - V_true|`` over all energised phase nodes (<= 3,
  > 0.1 pu), the largest over the seeds and the mean.
* **chi2/dof**: mean over the seeds; near 1 when the prior and noise sigmas are right
  (the statistic a utility can use to check its own profile sigma, without a truth).

``--scales`` (``auto,1``): ``prior_scale`` of each row; ``auto`` calibrates the pseudo sigma
from the data (:mod:`derms.analysis.se_prior`; voltage-only rows only: with AMI power rows
auto keeps the sigmas as given); ``sigma used`` is the given sigma x the scale (range over
the seeds).

``--levels 0.5,0.7,1.3``: the truth at a level off the pseudo loads' (``level`` x base x
U(1 +- spread), pseudo loads at base with a 30 % sigma): the largest error with the load
level fitted to the head's metered P/Q (``estimate_state``'s default) and without.

``--sensitivity``: voltages only, sigma = 1 %, truth spreads s = 0.2 / 0.3 / 0.5 against
assumed prior sigmas 10-50 % taken as given (max and mean error over the seeds), and the
``auto`` column: calibrated from a 30 % start (the result does not depend on the start).

BLAS threads: ``estimate_state`` holds OpenBLAS to one thread itself while it runs (its
adjoint solves run in threads of their own: derms.threads); ``--blas-threads`` (default 1)
sets ``OPENBLAS_NUM_THREADS`` for the rest of the bench (the truth's scenario building).

Run: ``.venv/bin/python bench/bench_state_estimation.py [--seeds 5] [--configs v,v+p,v+pq]
[--priors truth,0.5] [--scales auto,1] [--sensitivity]``
"""

from __future__ import annotations

import argparse
import sys

from _setup import prepare


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--blas-threads", type=int, default=1)
    ap.add_argument("--configs", default="v,v+p,v+pq")
    ap.add_argument("--priors", default="truth,0.5")
    ap.add_argument("--scales", default="auto,1",
                    help="prior_scale values: auto (calibrated from the data) and/or numbers")
    ap.add_argument("--spread", type=float, default=0.5)
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--levels", default="",
                    help="truth levels, e.g. 0.5,0.7,1.3: truth = level x base x U(1 +- "
                         "spread), pseudo loads at base; with and without the level fit")
    return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
REPO = prepare(ARGS.blas_threads if ARGS is not None else None)

import statistics
import subprocess
import time
from dataclasses import replace

import numpy as np

from derms.analysis.state_estimation import estimate_state
from derms.powerflow.collect import build_index
from tests.validation.conftest import frozen_engine
from tests.validation.test_state_estimation import (
    HEAD_BUS,
    NOISE,
    load_table,
    make_scenario,
    meter_nodes_service_transformers,
    set_loads,
)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _prior(text: str, spread: float) -> float:
    return spread / np.sqrt(3) if text == "truth" else float(text)


def run_case(engine, index, meters, p0, q0, seeds, noise, *, spread, prior, ami,
             scale="auto") -> dict:
    walls, cpus, errs, means, iters, chi, conv, used = [], [], [], [], [], [], [], []
    warm = []
    for seed in range(seeds):
        sc = make_scenario(engine, meters, seed, HEAD_BUS["ieee8500"], noise, spread=spread,
                           pseudo_sigma=prior, ami=ami.replace("v", "").replace("+", ""))
        engine.derived.clear()  # cold: a prior point the engine has not seen
        t0, c0 = time.perf_counter(), time.process_time()
        est = estimate_state(engine, sc.meas, index=index, prior_scale=scale)
        used.append(prior * est.prior_scale)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        set_loads(engine, p0, q0)
        engine.solve()
        t0 = time.perf_counter()  # warm: the same prior point again (its H kept)
        estimate_state(engine, sc.meas, index=index, prior_scale=scale)
        warm.append(time.perf_counter() - t0)
        err = np.abs(est.v_pu - sc.v_true_pu)[sc.energised]
        errs.append(err.max())
        means.append(err.mean())
        iters.append(est.iterations)
        chi.append(est.chi2 / est.chi2_dof)
        conv.append(est.converged)
        set_loads(engine, p0, q0)
        engine.solve()
    return {"noise": noise, "prior": prior, "config": ami, "iters": iters, "scale": scale,
            "used_min": min(used), "used_max": max(used),
            "wall": statistics.median(walls), "wall_max": max(walls),
            "warm": statistics.median(warm), "warm_max": max(warm),
            "cpu": statistics.median(cpus), "err_max": max(errs),
            "err_mean": float(np.mean(means)), "chi": float(np.mean(chi)), "conv": all(conv),
            "errs": errs}


def run_levels(engine, index, meters, p0, q0, seeds) -> None:
    """Truth at ``level`` x base x U(1 +- spread), pseudo loads at base (sigma 30 %):
    the largest error with the level fitted to the head (the default) and without."""
    print(f"\nLoad level, IEEE 8500, voltages only, sigma 1 %, truth = level x base x "
          f"U(1 ± {ARGS.spread}), pseudo = base (30 %), {seeds} seeds: max err pu (mean)\n")
    print("| level | fitted (P, Q) | max err, level fitted | max err, without | cold wall s |")
    print("|---|---|---|---|---|")
    for level in (float(v) for v in ARGS.levels.split(",")):
        got = {True: [], False: []}
        fits, walls = set(), []
        for seed in range(seeds):
            set_loads(engine, p0 * level, q0 * level)
            engine.solve()
            sc = make_scenario(engine, meters, seed, HEAD_BUS["ieee8500"], NOISE,
                               spread=ARGS.spread, pseudo_sigma=0.3)
            set_loads(engine, p0, q0)
            engine.solve()
            meas = replace(sc.meas, load_p_kw=p0, load_q_kvar=q0,
                           load_p_sigma_kw=np.maximum(0.3 * np.abs(p0), 0.1),
                           load_q_sigma_kvar=np.maximum(0.3 * np.abs(q0), 0.1))
            for fit in (True, False):
                engine.derived.clear()
                t0 = time.perf_counter()
                est = estimate_state(engine, meas, index=index, restore=True, fit_level=fit)
                if fit:
                    walls.append(time.perf_counter() - t0)
                    fits.add(est.load_level)
                err = np.abs(est.v_pu - sc.v_true_pu)[sc.energised]
                got[fit].append((err.max(), err.mean()))
        cells = [f"{max(e for e, _ in got[f]):.4f} ({np.mean([m for _, m in got[f]]):.5f})"
                 for f in (True, False)]
        print(f"| {level} | {', '.join(f'({p:g}, {q:g})' for p, q in sorted(fits))} | "
              f"{cells[0]} | {cells[1]} | {statistics.median(walls):.3f} |", flush=True)


def main() -> None:
    print(f"uptime: {_uptime()}", file=sys.stderr)
    engine = frozen_engine("ieee8500")
    index = build_index(engine)
    meters = meter_nodes_service_transformers(engine)
    _, p0, q0 = load_table(engine)
    seeds = ARGS.seeds
    if ARGS.levels:
        run_levels(engine, index, meters, p0, q0, seeds)
        print(f"uptime: {_uptime()}", file=sys.stderr)
        engine.close()
        return
    if ARGS.sensitivity:
        print(f"\nSensitivity, IEEE 8500, voltages only, sigma 1 %, {seeds} seeds: "
              "max err pu (mean err pu)\n")
        priors = (0.1, 0.15, 0.2, 0.289, 0.5)
        print("| truth spread s (sd) | " + " | ".join(f"prior {100 * p:.0f} %" for p in priors)
              + " | auto (sigma used) |")
        print("|---" * (len(priors) + 2) + "|")
        for spread in (0.2, 0.3, 0.5):
            cells = []
            for prior in priors:
                r = run_case(engine, index, meters, p0, q0, seeds, NOISE, spread=spread,
                             prior=prior, ami="v", scale=1.0)
                cells.append(f"{r['err_max']:.4f} ({r['err_mean']:.5f})")
            r = run_case(engine, index, meters, p0, q0, seeds, NOISE, spread=spread,
                         prior=0.3, ami="v", scale="auto")
            cells.append(f"{r['err_max']:.4f} ({100 * r['used_min']:.1f}-"
                         f"{100 * r['used_max']:.1f} %)")
            print(f"| ±{100 * spread:.0f} % ({100 * spread / np.sqrt(3):.1f} %) | "
                  + " | ".join(cells) + " |", flush=True)
        print(f"uptime: {_uptime()}", file=sys.stderr)
        engine.close()
        return
    rows = []
    for config in ARGS.configs.split(","):
        for prior_text in ARGS.priors.split(","):
            prior = _prior(prior_text, ARGS.spread)
            for scale_text in ARGS.scales.split(","):
                scale = "auto" if scale_text == "auto" else float(scale_text)
                if scale == "auto" and config != "v":
                    continue  # AMI power rows: auto keeps the sigmas as given
                for noise in (NOISE, NOISE / 3):
                    rows.append(run_case(engine, index, meters, p0, q0, seeds, noise,
                                         spread=ARGS.spread, prior=prior, ami=config,
                                         scale=scale))
    engine.close()
    print(f"\nState estimation, IEEE 8500, truth spread ±{100 * ARGS.spread:.0f} %, {seeds} "
          f"seeds per row, BLAS held to 1 thread by the estimator\n")
    hdr = ("| AMI | prior sigma given | prior_scale | sigma used | noise sigma | iterations | "
           "cold wall s | cpu s | warm wall s | max err pu | mean err pu | chi2/dof |")
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")
    for r in rows:
        print(f"| {r['config']} | {100 * r['prior']:.1f} % | {r['scale']} | "
              f"{100 * r['used_min']:.1f}-{100 * r['used_max']:.1f} % | {100 * r['noise']:.2f} % | "
              f"{min(r['iters'])}-{max(r['iters'])} | {r['wall']:.3f} | {r['cpu']:.3f} | "
              f"{r['warm']:.3f} | "
              f"{r['err_max']:.4f} | {r['err_mean']:.5f} | {r['chi']:.2f} |")
    print()
    for r in rows:
        print(f"- {r['config']}, prior {100 * r['prior']:.1f} % ({r['scale']}), sigma {100 * r['noise']:.2f} %: "
              f"max wall cold {r['wall_max']:.3f} s, warm {r['warm_max']:.3f} s; per-seed max error "
              f"{', '.join(f'{e:.4f}' for e in r['errs'])} pu; all converged: {r['conv']}")
    print(f"uptime: {_uptime()}", file=sys.stderr)


if __name__ == "__main__":
    main()
