"""Dynamic operating envelopes benchmark: time, AC check and export/import against a static limit.

Cases (bundled shapes, a July day from 00:00 UTC, 5-min intervals = 288, seed 0):

* IEEE 123, every load a connection point, policies equal / proportional / max_total;
* IEEE 8500, 1,000 loads drawn with seed 0 as connection points, equal and proportional,
  ANSI Range A and Range B; max_total on request (``--max-total-8500``: slow, see README).

Columns: **time s** is everything after the feeder is compiled (forecast base case, linear
model, zero-net reference, allocation, every AC check); **QSTS s** the plain QSTS of the
same horizon with controls acting in the same run (the reference), and the ratio;
**AC solves**; **export / import vs 5 kW**: the envelope energy against a static 5 kW per
connection point; **max AC excess**: the largest voltage [pu] and thermal [%] excess over
the limits (DESIGN "Violation", pre-existing and held-at-zero rows at their value) in the
final AC check with every connection point at its envelope (> 0 = violated).

Run: ``.venv/bin/python bench/bench_envelopes.py [--only 123|8500] [--max-total-8500]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from derms.analysis.constraints import Limits  # noqa: E402
from derms.analysis.envelope_network import connection_points  # noqa: E402
from derms.analysis.envelopes import EnvelopeCriteria, compute_envelopes  # noqa: E402
from derms.grid.opendss_import import read_feeder  # noqa: E402
from derms.powerflow.engine import OpenDSSEngine  # noqa: E402
from derms.powerflow.qsts import run_qsts  # noqa: E402
from derms.studies.qsts_study import StudyConfig, study_profiles  # noqa: E402

_SHARED = REPO.parent / "shared" / "feeders" / "IEEETestCases"
_BUNDLED = REPO / "src" / "derms" / "data" / "feeders"
FEEDERS = {
    "123": next(p for p in (_SHARED / "123Bus/IEEE123Master.dss",
                            _BUNDLED / "ieee123/IEEE123Master.dss") if p.exists()),
    "8500": next(p for p in (_SHARED / "8500-Node/Master.dss",
                             _BUNDLED / "ieee8500/Master.dss") if p.exists()),
}
CFG = StudyConfig(step=timedelta(minutes=5), start=datetime(2026, 7, 1, tzinfo=UTC))


def _case(key: str, n_cp: int | None, policy: str, rng_name: str) -> dict:
    eng = OpenDSSEngine(FEEDERS[key])
    eng.solve_snapshot()
    model = read_feeder(eng.ctx, eng.source_master)
    prof, _ = study_profiles(model, CFG)
    names = [ld.name for ld in model.loads if ld.enabled]
    pick = None
    if n_cp is not None:
        rng = np.random.default_rng(0)
        pick = [names[i] for i in sorted(rng.choice(len(names), n_cp, replace=False))]
    cps = connection_points(model, pick)
    limits = Limits.ansi_range_a() if rng_name == "A" else Limits.ansi_range_b()
    t0, c0 = time.perf_counter(), time.process_time()
    res = compute_envelopes(eng, prof, cps, EnvelopeCriteria(policy=policy, limits=limits))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    eng.close()
    ref = OpenDSSEngine(FEEDERS[key])  # the reference: plain QSTS of the same horizon
    ref.solve_snapshot()
    t0 = time.perf_counter()
    run_qsts(ref, prof, control_mode="static")
    qsts = time.perf_counter() - t0
    ref.close()
    iv = res.intervals
    out = {"feeder": f"IEEE {key}", "cps": len(cps), "T": len(res.times), "policy": policy,
           "range": rng_name, "time": wall, "cpu": cpu, "qsts": qsts,
           "solves": res.n_ac_solves}
    for d in ("export", "import"):
        g = iv[iv["direction"] == d]
        out[d] = res.static_ratio(5.0, d)
        out[f"{d}_v"] = float(g["ac_v_excess_pu"].max())
        out[f"{d}_th"] = float(g["ac_thermal_excess_pct"].max())
        out[f"{d}_min"] = float(np.nanmin(res.export_kw if d == "export" else res.import_kw))
        out[f"{d}_bind"] = g["binding"].value_counts().idxmax()
        out[f"{d}_backoff"] = int((g["binding"] == "ac_backoff").sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["123", "8500"])
    ap.add_argument("--max-total-8500", action="store_true")
    args = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
          file=sys.stderr)
    cases = []
    if args.only in (None, "123"):
        cases += [("123", None, p, "A") for p in ("equal", "proportional", "max_total")]
    if args.only in (None, "8500"):
        cases += [("8500", 1000, "equal", "A"), ("8500", 1000, "proportional", "A"),
                  ("8500", 1000, "equal", "B")]
        if args.max_total_8500:
            cases.append(("8500", 1000, "max_total", "A"))
    print("| feeder | CPs x intervals | policy | range | time s (CPU) | QSTS s | time / QSTS "
          "| AC solves | export vs 5 kW | import vs 5 kW | max AC excess export (pu / %) "
          "| max AC excess import (pu / %) | binding export / import | back-offs |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|")
    for case in cases:
        print(f"running {case}", file=sys.stderr)
        r = _case(*case)
        print(f"| {r['feeder']} | {r['cps']} x {r['T']} | {r['policy']} | {r['range']} | "
              f"{r['time']:.1f} ({r['cpu']:.1f}) | {r['qsts']:.1f} | {r['time'] / r['qsts']:.1f} "
              f"| {r['solves']} | {r['export']:.2f} | {r['import']:.2f} | "
              f"{r['export_v']:.4f} / {r['export_th']:.2f} | {r['import_v']:.4f} / "
              f"{r['import_th']:.2f} | {r['export_bind']} / {r['import_bind']} | "
              f"{r['export_backoff'] + r['import_backoff']} |", flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
          file=sys.stderr)


if __name__ == "__main__":
    main()
