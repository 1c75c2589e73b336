"""Flexible-connection estimate against the reference year QSTS (AC bisection per hour).

Per case: a new device at a bus of IEEE 123, a year of hourly forecasts (bundled load
shapes; PV measured PVDAQ system 50, EV home charging drawn with seed 0); the fast method
(:func:`derms.analysis.interconnection.flexible_connection`) and the reference
(:func:`~derms.analysis.interconnection.curtailment_reference`) in the same run.
Columns: annual curtailed energy of each and their difference [%] (goal: within 10 %),
the static limit of each [kW], wall time of each (feeder compiled; everything after) and
the ratio reference / fast.

Run: ``.venv/bin/python bench/bench_interconnection.py [--days 365]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from derms.analysis.hosting_capacity import resolve_sites  # noqa: E402
from derms.analysis.interconnection import (  # noqa: E402
    curtailment_reference,
    flexible_connection,
)
from derms.grid.bundled import resolve_master  # noqa: E402
from derms.grid.opendss_import import read_feeder  # noqa: E402
from derms.powerflow.engine import OpenDSSEngine  # noqa: E402
from derms.studies.device_profiles import device_profile  # noqa: E402
from derms.studies.qsts_study import StudyConfig, study_profiles  # noqa: E402

CASES = [("ieee123", "67", "pv", 1500.0), ("ieee123", "300", "load", 900.0),
         ("ieee123", "114", "pv", 400.0)]


def _one(fn, feeder, bus, kind, kw, cfg):
    with OpenDSSEngine(resolve_master(feeder)) as eng:
        eng.solve_snapshot()
        model = read_feeder(eng.ctx, eng.source_master)
        prof, _ = study_profiles(model, cfg)
        site = resolve_sites(eng, [bus])[0]
        pu = device_profile(kind, cfg.start, cfg.n_steps, cfg.step, 0)
        t0 = time.perf_counter()
        res = fn(eng, prof, site, kind, kw, pu)
        return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=float, default=365.0)
    args = ap.parse_args()
    cfg = StudyConfig(days=args.days, step=timedelta(hours=1),
                      start=datetime(2026, 1, 1, 8, tzinfo=UTC))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
          file=sys.stderr)
    print("| feeder | bus | device | hours | curtailed fast kWh | curtailed reference kWh | "
          "difference | share curtailed | static limit fast / ref kW | fast s | reference s "
          "| reference / fast |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for feeder, bus, kind, kw in CASES:
        fast, t_f = _one(flexible_connection, feeder, bus, kind, kw, cfg)
        ref, t_r = _one(curtailment_reference, feeder, bus, kind, kw, cfg)
        (d, a), = fast.annual().items()
        r = ref.annual()[d]
        diff = 100 * (a["curtailed_kwh"] - r["curtailed_kwh"]) / r["curtailed_kwh"] \
            if r["curtailed_kwh"] > 0 else 0.0
        print(f"| {feeder} | {bus} | {kind} {kw:g} kW | {cfg.n_steps} | "
              f"{a['curtailed_kwh']:,.0f} | {r['curtailed_kwh']:,.0f} | {diff:+.2f} % | "
              f"{100 * r['curtailed_share']:.2f} % | {fast.static_limit_kw[d]:.0f} / "
              f"{ref.static_limit_kw[d]:.0f} | {t_f:.1f} | {t_r:.1f} | {t_r / t_f:.2f} |",
              flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
          file=sys.stderr)


if __name__ == "__main__":
    main()
