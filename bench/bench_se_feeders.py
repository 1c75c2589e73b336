"""State estimation on other feeders: the prior calibration against the sigmas taken as given.

For each feeder (OpenDSS masters in ../shared/feeders): compiled and solved once with
controls acting, then taps and capacitors frozen (``frozen_engine``'s recipe). One AMI
voltage meter per service transformer (at the customer bus it feeds, its lowest phase
node; feeders without service transformers: every load bus's phase nodes) + SCADA head
V/P/Q, 1 % Gaussian noise (sigma = 0.01 x value). Per seed the truth draws every load's P
and Q as base x U(1 - s, 1 + s), s = ``--spread``. Three estimates of the same
measurements:

* **auto**: pseudo sigma ``--given`` x value, ``prior_scale="auto"`` (the default);
* **given**: the same sigma taken as is (``prior_scale=1``);
* **right**: the truth's own sd, s / sqrt(3), taken as is (a correctly specified prior).

Columns: largest |V_est - V_true| over the energised phase nodes and seeds [pu], the
median wall time of one estimate [s] (everything after the compile: first AC solve,
Jacobian, calibration, iterations; no branch currents), and the sigma the auto estimate
used (range over the seeds).

``--track N``: instead, N snapshots in a row on each feeder (independent truths, seeds
100..), each calibrated alone from ``--given`` and each starting from the previous
snapshot's posterior on the scale (:class:`derms.analysis.se_prior.ScaleTracker`, what
the monitoring loop does): max and mean over the snapshots of each one's largest error.

Run: ``.venv/bin/python bench/bench_se_feeders.py [--feeders ieee34,ieee37,ckt5,ckt7,ckt24]
[--spread 0.3] [--given 0.3] [--seeds 5] [--track 10]``
"""

from __future__ import annotations

import argparse
import os
import sys

from _setup import prepare


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--feeders", default="ieee34,ieee37,ckt5,ckt7,ckt24")
    ap.add_argument("--spread", type=float, default=0.3)
    ap.add_argument("--given", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--blas-threads", type=int, default=1)
    ap.add_argument("--track", type=int, default=0,
                    help="instead: N snapshots in a row, each from the last one's posterior "
                         "(ScaleTracker) against each calibrated alone")
    return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
REPO = prepare(ARGS.blas_threads if ARGS is not None else None)

import time

import numpy as np

from derms.analysis.se_prior import ScaleTracker
from derms.analysis.state_estimation import estimate_state
from derms.powerflow.control_state import freeze_base_case
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from tests.conftest import SHARED_FEEDERS, SHARED_MASTERS
from tests.validation.test_state_estimation import (
    NOISE,
    load_table,
    make_scenario,
    meter_nodes_load_buses,
    meter_nodes_service_transformers,
    set_loads,
)

MASTERS = {**SHARED_MASTERS, "ckt7": "EPRITestCircuits/ckt7/Master_ckt7.dss",
           "ieee9500": "IEEETestCases/ieee9500dss/ieee9500_base.dss"}


def _open(name: str):
    engine = OpenDSSEngine(SHARED_FEEDERS / MASTERS[name], SolveSettings(tolerance=1e-8))
    freeze_base_case(engine)
    ckt = engine.circuit
    ckt.SetActiveElement("vsource.source")
    head_bus = ckt.ActiveCktElement.BusNames[0].split(".")[0].lower()
    meters = meter_nodes_service_transformers(engine)
    if len(meters) < 10:  # no service transformers modelled: meters at the load buses
        meters = meter_nodes_load_buses(engine)
    return engine, head_bus, meters


def run_tracking(name: str) -> dict:
    """``--track N`` snapshots (truth seeds 100..): each calibrated alone, and each from the
    previous snapshot's posterior (ScaleTracker), both from ``--given``."""
    engine, head_bus, meters = _open(name)
    try:
        _, p0, q0 = load_table(engine)
        tracker = ScaleTracker()
        alone, tracked, used = [], [], []
        for k in range(ARGS.track):
            sc = make_scenario(engine, meters, 100 + k, head_bus, NOISE, spread=ARGS.spread,
                               pseudo_sigma=ARGS.given)
            for out, kw in ((alone, {}), (tracked, {"prior_log_scale": tracker.prior()})):
                est = estimate_state(engine, sc.meas, **kw)
                out.append(float(np.max(np.abs(est.v_pu - sc.v_true_pu)[sc.energised])))
                set_loads(engine, p0, q0)
                engine.solve()
            if est.prior_log_scale_post is not None and est.converged and not est.bad_data:
                tracker.update(*est.prior_log_scale_post)  # as FeederMonitor does
            used.append(ARGS.given * est.prior_scale)
        return {"feeder": name, "alone": alone, "tracked": tracked, "used": used}
    finally:
        engine.close()


def run_feeder(name: str) -> dict:
    engine, head_bus, meters = _open(name)
    try:
        _, p0, q0 = load_table(engine)
        out = {"feeder": name, "nodes": len(engine.node_names()), "loads": int(p0.size),
               "meters": len(meters)}
        modes = (("auto", ARGS.given, "auto"), ("given", ARGS.given, 1.0),
                 ("right", ARGS.spread / np.sqrt(3), 1.0))
        for mode, prior, scale in modes:
            errs, walls, used = [], [], []
            for seed in range(ARGS.seeds):
                sc = make_scenario(engine, meters, seed, head_bus, NOISE, spread=ARGS.spread,
                                   pseudo_sigma=prior)
                t0 = time.perf_counter()
                est = estimate_state(engine, sc.meas, prior_scale=scale)
                walls.append(time.perf_counter() - t0)
                errs.append(float(np.max(np.abs(est.v_pu - sc.v_true_pu)[sc.energised])))
                used.append(prior * est.prior_scale)
                set_loads(engine, p0, q0)
                engine.solve()
            out[mode] = {"max_err": max(errs), "wall": float(np.median(walls)),
                         "used": (min(used), max(used))}
        return out
    finally:
        engine.close()


def main_tracking() -> None:
    sd = ARGS.spread / np.sqrt(3)
    print(f"\n{ARGS.track} snapshots in a row, truth U(1 ± {ARGS.spread:g}) (sd "
          f"{100 * sd:.1f} %), sigma 1 %, given sigma {100 * ARGS.given:.0f} %\n")
    print("| feeder | alone: max / mean of the snapshots' max err pu | tracked: max / mean | "
          "second half, alone / tracked: max | sigma used at snapshot 1 / 3 / last |")
    print("|---|---|---|---|---|")
    for name in ARGS.feeders.split(","):
        r = run_tracking(name)
        a, t, u = np.array(r["alone"]), np.array(r["tracked"]), r["used"]
        h = len(t) // 2
        print(f"| {name} | {a.max():.4f} / {a.mean():.4f} | {t.max():.4f} / {t.mean():.4f} | "
              f"{a[h:].max():.4f} / {t[h:].max():.4f} | {100 * u[0]:.1f} / "
              f"{100 * u[min(2, len(u) - 1)]:.1f} / {100 * u[-1]:.1f} % |", flush=True)


def main() -> None:
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    if ARGS.track:
        main_tracking()
        print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
        return
    rows = [run_feeder(name) for name in ARGS.feeders.split(",")]
    sd = ARGS.spread / np.sqrt(3)
    print(f"\nVoltage-only state estimation, truth U(1 ± {ARGS.spread:g}) (sd {100 * sd:.1f} %), "
          f"sigma 1 %, {ARGS.seeds} seeds; given sigma {100 * ARGS.given:.0f} %\n")
    print("| feeder | nodes | loads | meters | auto max err pu | sigma used | given max err pu "
          "| right max err pu | auto median s |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        lo, hi = r["auto"]["used"]
        print(f"| {r['feeder']} | {r['nodes']:,} | {r['loads']:,} | {r['meters']:,} | "
              f"{r['auto']['max_err']:.4f} | {100 * lo:.1f}–{100 * hi:.1f} % | "
              f"{r['given']['max_err']:.4f} | {r['right']['max_err']:.4f} | "
              f"{r['auto']['wall']:.2f} |")
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
