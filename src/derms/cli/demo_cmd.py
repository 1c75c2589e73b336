"""``derms demo``: the live system through a short scenario on the embedded defaults.

What it runs (≈ 1.5 min wall, SQLite and the bundled IEEE 123; nothing outside ``--out``):

1. a fresh SQLite database and a test PKI (``ensure_pki``: CA, server and one aggregator
   certificate) in ``OUT/live``;
2. ``derms serve`` as a subprocess with the control loop on ``ieee123`` (5 s cycles) and
   the IEEE 2030.5 listener (mutual TLS), on free local ports; an admin token is minted
   into ``OUT/live/token.txt`` (the API's URL is printed at once);
3. the fail-safe export limit of the loop's "derms control" program is widened (the
   loop's own 1.5 kW default curtails every PV that exports more, which is not what the
   demo is about);
4. ``derms sim --feeder-id ieee123`` (100 devices: 60 % EV chargers, 20 % PV, 20 %
   batteries, over IEEE 2030.5 with subscriptions, real time, 1 s steps, wall-clock
   stamped readings) on a summer evening (20:30 local): the EV chargers are off line until
   20 s, then all start charging at once; the surge overloads the feeder-head section
   beyond its base-case loading; the loop sees it in its next cycle and limits the EV
   chargers / discharges batteries through DERControls; the devices acknowledge and obey;
5. a summary from the twin's own power flow (violations the devices cause, before and
   after) and the DERMS's tracked commands, in ``OUT/live/demo-summary.json`` and on the
   console, with the path of the sim's ``report.html``; the server is stopped (or left
   running with ``--keep-serving`` until Ctrl-C).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from derms.api.auth import mint_token
from derms.cli.common import handle_errors, out_console
from derms.errors import InputError

FEEDER = "ieee123"
RAMP_AT_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, api: str, sep_port: int, log: Path,
                timeout_s: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InputError(f"derms serve exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{api}/ready", timeout=1).status_code == 200:
                socket.create_connection(("127.0.0.1", sep_port), timeout=1).close()
                return
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.2)
    raise InputError(f"derms serve did not become ready in {timeout_s:g} s; see {log}")


def _summary(db: Path, sim_out: Path, headers: dict, api: str, period_s: float) -> dict:
    """Violation before/after (the twin's power flow), the loop's detection and the
    commands, acknowledgements and delivery (the DERMS)."""
    import httpx
    import pandas as pd

    ts = pd.read_csv(sim_out / "timeseries.csv", parse_dates=["wall_time"])
    ramp = ts.wall_time[ts.ev_p_out_kw < -1.0].min()  # the EV chargers come on line
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
        audit = pd.read_sql("select detail from audit_log where action = 'control_cycle' "
                            "order by id", c)
    cycles = []
    for d in audit["detail"]:
        d = json.loads(d) if isinstance(d, str) else d
        cycles.append((pd.Timestamp(d["t"]), sum((d.get("violations") or {}).values()),
                       d.get("commands", 0)))
    hit = [c for c in cycles if c[0] >= ramp and c[1] > 0]
    cmds = httpx.get(f"{api}/v1/control/commands", headers=headers,
                     params={"limit": 1000}, timeout=10).json()["items"]
    states: dict[str, int] = {}
    for c in cmds:
        states[c["state"]] = states.get(c["state"], 0) + 1
    out: dict = {
        "devices": int(json.loads((sim_out / "summary.json").read_text())["devices"]),
        "ev_surge_wall_time": ramp.isoformat() if pd.notna(ramp) else None,
        "commands": len(cmds),
        "acknowledged": sum(1 for c in cmds if c.get("acknowledged_at")),
        "command_states": states,
    }
    win = ts[ts.wall_time >= ramp] if pd.notna(ramp) else ts.iloc[0:0]
    out["twin_violations_before_max"] = int(win.der_violations.max()) if len(win) else 0
    out["twin_loading_excess_before_max_pct"] = round(
        float(win.der_loading_excess_pct.max()), 1) if len(win) else None
    out["twin_violated_elements"] = (win.der_violated.dropna().iloc[0]
                                     if len(win) and win.der_violated.notna().any() else "")
    tail = ts.tail(10)
    out["twin_violations_after"] = int(tail.der_violations.max())
    out["twin_loading_excess_after_pct"] = round(float(tail.der_loading_excess_pct.max()), 1)
    if hit:
        t_det = hit[0][0]
        after = win[win.wall_time >= t_det].reset_index(drop=True)
        ok = (after.der_violations == 0).to_numpy()
        clear = next((after.wall_time[k] for k in range(len(after))
                      if ok[k:k + 5].all()), None)
        out["loop_detection_wall_time"] = t_det.isoformat()
        out["loop_detection_commands"] = int(hit[0][2])
        if clear is not None:
            dt = (clear - t_det).total_seconds()
            out["twin_clear_after_detection_s"] = round(dt, 1)
            out["twin_clear_after_detection_cycles"] = round(dt / period_s, 2)
    return out


@handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    devices: Annotated[int, typer.Option(min=10, max=2000, help="Simulated devices.")] = 100,
    duration_s: Annotated[int, typer.Option(
        "--duration-s", min=RAMP_AT_S + 15, help="Seconds of simulated (= wall) time.")] = 60,
    keep_serving: Annotated[bool, typer.Option(
        help="Leave derms serve running after the scenario (until Ctrl-C).")] = False,
) -> None:
    """Run the live system (derms serve with the control loop and IEEE 2030.5, derms sim
    with a simulated fleet on IEEE 123) through a short scenario with a violation the
    DERMS clears; print where the API and the report are."""
    import httpx

    from derms.sim.provision import ensure_pki

    folder = (out / "live").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("derms.db", "derms.db-wal", "derms.db-shm"):
        (folder / name).unlink(missing_ok=True)
    pki = folder / "pki"
    ensure_pki(pki, 1)
    db = folder / "derms.db"
    url = f"sqlite:///{db}"
    env = {**os.environ, "DERMS_DATABASE_URL": url, "DERMS_DATA_DIR": str(folder)}
    port, sep_port, period_s = _free_port(), _free_port(), 5.0
    api = f"http://127.0.0.1:{port}"
    log = folder / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "derms.cli.main", "serve", "--port", str(port), "--no-mqtt",
             "--ieee2030-5-port", str(sep_port), "--ieee2030-5-cert", str(pki / "server.pem"),
             "--ieee2030-5-key", str(pki / "server.key"),
             "--ieee2030-5-client-ca", str(pki / "ca.pem"), "--control-feeder", FEEDER,
             "--control-period-s", str(period_s)], env=env, stdout=fh,
            stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, api, sep_port, log)
        token = mint_token(url, "admin", "derms demo")
        (folder / "token.txt").write_text(token + "\n")
        headers = {"Authorization": f"Bearer {token}"}
        out_console.print(f"derms serve: API {api} (docs {api}/docs, token in "
                          f"{folder / 'token.txt'}), IEEE 2030.5 on 127.0.0.1:{sep_port}, "
                          f"control loop on {FEEDER} every {period_s:g} s; log {log}")
        progs = httpx.get(f"{api}/v1/ieee2030-5/programs", headers=headers,
                          params={"limit": 1000}, timeout=10).json()["items"]
        pid = next(p["program_id"] for p in progs if p["description"] == "derms control")
        httpx.put(f"{api}/v1/ieee2030-5/programs/{pid}/default-control", headers=headers,
                  json={"export_limit_w": 100000, "set_grad_w": 27},
                  timeout=10).raise_for_status()
        scenario = folder / "scenario.json"
        scenario.write_text(json.dumps({
            "description": "EV chargers come on line at once: feeder-head overload",
            "events": [{"kind": "dropout", "share": 1.0, "kinds": ["ev"], "start_s": 0,
                        "end_s": RAMP_AT_S}]}))
        sim_out = folder / "sim"
        out_console.print(f"derms sim: {devices} devices on {FEEDER}, {duration_s} s at "
                          f"real time; the EV chargers all start at {RAMP_AT_S} s")
        rc = subprocess.call(
            [sys.executable, "-m", "derms.cli.main", "sim", "--out", str(sim_out), "--force",
             "--feeder", FEEDER, "--feeder-id", FEEDER, "--devices", str(devices),
             "--mix", "pv=0.2,battery=0.2,ev=0.6", "--seed", "0", "--speed", "1",
             "--step", "1s", "--duration", f"{duration_s}s",
             "--start", "2026-07-02T04:30:00Z", "--ieee2030-5", f"127.0.0.1:{sep_port}",
             "--pki", str(pki), "--aggregators", "1", "--api", api, "--token", token,
             "--subscribe", "--post-rate", "3", "--scenario", str(scenario)], env=env)
        if rc != 0:
            raise InputError(f"derms sim failed (exit {rc}); server log {log}")
        time.sleep(2 * period_s)  # delivery verdicts of the last commands
        summary = _summary(db, sim_out, headers, api, period_s)
        summary |= {"api": api, "report": str(sim_out / "report.html"),
                    "server_log": str(log)}
        (folder / "demo-summary.json").write_text(json.dumps(summary, indent=2))
        s = summary
        out_console.print(
            f"\nviolation (twin's power flow, caused by the DERs): after the EV surge "
            f"{s['twin_violations_before_max']} conductors/nodes "
            f"({s['twin_violated_elements']}), loading up to "
            f"{s['twin_loading_excess_before_max_pct']} % beyond the limit -> "
            f"{s['twin_violations_after']} at the end "
            f"({s['twin_loading_excess_after_pct']} %, negative = margin)")
        if "loop_detection_wall_time" in s:
            out_console.print(
                f"control loop: detected at {s['loop_detection_wall_time']}, "
                f"{s['loop_detection_commands']} commands; the twin clear "
                f"{s.get('twin_clear_after_detection_s', '?')} s "
                f"({s.get('twin_clear_after_detection_cycles', '?')} cycles) later")
        out_console.print(f"commands {s['commands']}, acknowledged {s['acknowledged']}, "
                          f"states {s['command_states']}")
        out_console.print(f"report: {s['report']}\nsummary: {folder / 'demo-summary.json'}")
        if keep_serving:
            out_console.print(f"API still at {api} (token in {folder / 'token.txt'}); "
                              "Ctrl-C stops it")
            try:
                proc.wait()
            except KeyboardInterrupt:
                pass
        else:
            out_console.print(f"API was at {api} (stopped; --keep-serving leaves it up)")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
