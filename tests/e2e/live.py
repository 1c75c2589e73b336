"""The live system for end-to-end tests: ``derms serve`` with the control loop and the
IEEE 2030.5 listener as a subprocess on a SQLite database of its own, ``derms sim`` in
control mode (``--feeder-id``) as another subprocess, and readers of what both recorded
(the twin's ``timeseries.csv``, the loop's cycles in the audit log, tracked commands,
2030.5 controls and responses).

Both run as processes (as in production): the test's own thread only posts ADMS
messages, kills and restarts the server, and reads. Times compared across the two are
wall-clock UTC (the sim stamps its readings with the wall clock in control mode).
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd

from derms.api.auth import mint_token
from derms.sim.provision import ensure_pki

FEEDER = "ieee123"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveDerms:
    """``derms serve --control-feeder`` + 2030.5 listener in ``folder`` (always stopped)."""

    folder: Path
    period_s: float = 5.0
    aggregators: int = 1
    #: MQTT ingest on this topic root (None: ``--no-mqtt``)
    mqtt_root: str | None = None
    port: int = field(default_factory=free_port)
    sep_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db_path = self.folder / "derms.db"
        self.url = f"sqlite:///{self.db_path}"
        self.pki = self.folder / "pki"
        ensure_pki(self.pki, self.aggregators)
        self.env = {**os.environ, "DERMS_DATABASE_URL": self.url,
                    "DERMS_DATA_DIR": str(self.folder)}
        if self.mqtt_root is not None:
            self.env |= {"DERMS_MQTT_TOPIC_ROOT": self.mqtt_root,
                         "DERMS_MQTT_CLIENT_ID": f"derms-{self.mqtt_root.replace('/', '-')}"}
        self.api = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        self.starts += 1
        log = open(self.folder / f"serve-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "derms.cli.main", "serve", "--port", str(self.port),
             *(["--no-mqtt"] if self.mqtt_root is None else []),
             "--ieee2030-5-port", str(self.sep_port),
             "--ieee2030-5-cert", str(self.pki / "server.pem"),
             "--ieee2030-5-key", str(self.pki / "server.key"),
             "--ieee2030-5-client-ca", str(self.pki / "ca.pem"),
             "--control-feeder", FEEDER, "--control-period-s", str(self.period_s)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"derms serve exited with {self.proc.returncode}: "
                                   + self.log_text()[-3000:])
            try:
                if httpx.get(f"{self.api}/ready", timeout=1).status_code == 200:
                    socket.create_connection(("127.0.0.1", self.sep_port), timeout=1).close()
                    if self.starts == 1:
                        self.admin = {"Authorization": f"Bearer {mint_token(self.url, 'admin')}"}
                    return
            except (httpx.TransportError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError("derms serve did not become ready")

    def log_text(self) -> str:
        return "".join((self.folder / f"serve-{k}.log").read_text(errors="replace")
                       for k in range(1, self.starts + 1)
                       if (self.folder / f"serve-{k}.log").exists())

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    # --- API ---------------------------------------------------------------------------
    def get(self, path: str, **params) -> dict:
        r = httpx.get(self.api + path, headers=self.admin, params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.api + path, headers=self.admin, json=body, timeout=10)

    def program_id(self) -> int:
        items = self.get("/v1/ieee2030-5/programs", limit=1000)["items"]
        return next(p["program_id"] for p in items if p["description"] == "derms control")

    def open_default_control(self, export_limit_w: float = 100_000) -> None:
        """A generous fail-safe export limit for the program (the loop's own default, 1.5
        kW, would curtail the PV before the test's event makes any violation)."""
        r = httpx.put(f"{self.api}/v1/ieee2030-5/programs/{self.program_id()}/default-control",
                      headers=self.admin, json={"export_limit_w": export_limit_w,
                                                "set_grad_w": 27}, timeout=10)
        r.raise_for_status()

    def commands(self) -> list[dict]:
        out, offset = [], 0
        while True:
            page = self.get("/v1/control/commands", limit=1000, offset=offset)
            items = page["items"] if isinstance(page, dict) else page
            out += items
            if len(items) < 1000:
                return out
            offset += len(items)

    def controls(self) -> list[dict]:
        pid = self.program_id()
        out, offset = [], 0
        while True:
            items = self.get(f"/v1/ieee2030-5/programs/{pid}/controls", limit=1000,
                             offset=offset)["items"]
            out += items
            if len(items) < 1000:
                return out
            offset += len(items)

    # --- the database (read-only) ------------------------------------------------------
    def audit(self, action: str | None = None, entity: str | None = None) -> pd.DataFrame:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30) as c:
            df = pd.read_sql("select * from audit_log order by id", c)
        if action:
            df = df[df.action == action]
        if entity:
            df = df[df.entity == entity]
        return df

    def cycles(self) -> pd.DataFrame:
        """The loop's audited cycles: time (the cycle's ``t``), status, counts."""
        rows = []
        for d in self.audit("control_cycle")["detail"]:
            d = json.loads(d) if isinstance(d, str) else d
            v = d.get("violations") or {}
            rows.append({"t": pd.Timestamp(d["t"]), "status": d["status"],
                         "commands": d["commands"], "violations": sum(v.values()),
                         "imminent": d.get("imminent", 0), "cycle_id": d.get("cycle_id"),
                         "reload": d.get("topology_reloaded"),
                         "command_ids": d.get("command_ids", [])})
        return pd.DataFrame(rows)


@dataclass
class LiveSim:
    """``derms sim`` in control mode against a :class:`LiveDerms`, as a subprocess."""

    derms: LiveDerms
    out: Path
    scenario: dict
    devices: int = 100
    duration_s: int = 60
    mix: str = "pv=0.7,battery=0.15,ev=0.15"
    post_rate_s: int = 3
    start: str = "2026-07-01T20:00:00Z"  # local noon (UTC-8): PV at its peak
    #: readings over IEEE 2030.5 mirror usage points, or over MQTT to the ingest
    telemetry: str = "ieee2030_5"
    proc: subprocess.Popen | None = None

    def launch(self) -> None:
        self.out = Path(self.out)
        scen = self.out.parent / f"{self.out.name}-scenario.json"
        scen.write_text(json.dumps(self.scenario))
        d = self.derms
        self.log = self.out.parent / f"{self.out.name}-sim.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "derms.cli.main", "sim", "--out", str(self.out), "--force",
                 "--feeder", FEEDER, "--feeder-id", FEEDER, "--devices", str(self.devices),
                 "--mix", self.mix, "--seed", "0", "--speed", "1", "--step", "1s",
                 "--duration", f"{self.duration_s}s", "--start", self.start,
                 "--ieee2030-5", f"127.0.0.1:{d.sep_port}", "--pki", str(d.pki),
                 "--aggregators", str(d.aggregators), "--api", d.api,
                 "--token", d.admin["Authorization"].split()[1], "--subscribe",
                 "--post-rate", str(self.post_rate_s), "--scenario", str(scen),
                 "--telemetry", self.telemetry,
                 *(["--mqtt-topic-root", d.mqtt_root] if d.mqtt_root else [])],
                env=d.env, stdout=log, stderr=subprocess.STDOUT)
        self.t_launch = datetime.now(UTC)

    def wait(self, timeout_s: float) -> None:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert rc == 0, self.log.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def timeseries(self) -> pd.DataFrame:
        return pd.read_csv(self.out / "timeseries.csv", parse_dates=["t", "wall_time"])

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def stepping_started(self, timeout_s: float = 90) -> datetime:
        """Wait until the fleet is registered and discovered (the loop has its DERs and
        fresh telemetry); returns the wall time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text(errors="replace")[-4000:])
            try:
                st = self.derms.get("/v1/control/loop")
                last = st.get("last_cycle") or {}
                if st["n_ders"] == self.devices and last.get("status") not in (
                        None, "no_telemetry") and len(last.get("stale", [1])) == 0:
                    return datetime.now(UTC)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the loop never saw the fleet with fresh telemetry")


def cloud_ramp(at_s: float, low: float = 0.15, ramp_s: float = 5) -> dict:
    """Scenario: PV under thick cloud, then the sky clears over ``ramp_s`` seconds."""
    return {"kind": "cloud", "points": [[0, low], [at_s, low], [at_s + ramp_s, 1.0]]}


def clearance(ts: pd.DataFrame, t_detect: pd.Timestamp, hold_rows: int = 5):
    """The first wall time at or after ``t_detect`` from which the twin shows no violation
    the devices cause for ``hold_rows`` steps in a row (or to the end); None if never."""
    after = ts[ts.wall_time >= t_detect].reset_index(drop=True)
    ok = (after.der_violations == 0).to_numpy()
    for k in range(len(after)):
        if ok[k:k + hold_rows].all() and len(ok[k:k + hold_rows]):
            return after.wall_time[k]
    return None
