"""Ingest benchmark (issue 4): N devices x 4 quantities, 1 reading per device per second,
for ``--seconds`` seconds, into PostgreSQL through the served system — once by REST bulk
POST and once by MQTT (QoS 1) — with rate, latency and a lost/duplicated count.

Setup (not measured): a fresh database ``derms_bench_<random>`` on 127.0.0.1:5432
(dropped at the end), ``derms db upgrade``, ``--devices`` DER devices inserted in bulk, an
operate token from ``derms token create``, and ``derms serve --port <free>`` (MQTT on,
Mosquitto at 127.0.0.1:1883) as a subprocess; the benchmark waits for ``/ready``.

Per path, one warm-up second (at a time outside the measured range: it creates the
``devices x 4`` series of that source) and then the measured run, paced to real time:
second k's readings (t = base + k s) are due at run start + k s.

* REST: ``--rest-posts`` column-form JSON bodies per second, sent by a pool of
  ``--rest-conns`` keep-alive httpx connections. "Queryable" = the 200 response (the route
  commits before it answers). Latency = response time - due time (and - actual send start).
* MQTT: ``--mqtt-readings`` readings per message (columns JSON), QoS 1, topic
  ``derms/v1/telemetry/der``. "Queryable" = a sentinel reading of the message (its first
  row's (series_id, t)) is visible in PostgreSQL; a message is written in one transaction,
  so the sentinel proves the whole message. A watcher polls the pending sentinels every
  ``--poll`` s (primary-key lookups). Latency = first seen - publish call time. At most
  ``--sentinels`` messages per second are followed, evenly spread. ``--mqtt-publisher c``
  publishes with Mosquitto's C client (``mosquitto_pub -l``) instead of paho in this
  process (whose own cost at 10,000 small messages/s is about a core).

Counts after each run: rows per second of the run's range (exactly devices x 4 each), lost
= sent - stored, duplicated = rows beyond one per (series, t) (primary key: must be 0) plus
series beyond devices x 4; then one batch / message is sent again and must insert 0.
Sustained rate = stored / (last stored - first due). CPU seconds of the server process
(/proc/<pid>/stat), of the PostgreSQL backends of the bench database, of Mosquitto, and of
this generator process, per run.

Loopback only; bounded in count (devices x 4 x seconds readings per path) and in time
(``--drain-timeout`` after the last send). Server and database are cleaned up on failure.

Run: ``.venv/bin/python bench/bench_ingest.py [--seconds 60] [--devices 10000] [--json out.json]``
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
QUANTITIES = ("p_kw", "q_kvar", "v_v", "soc_frac")
T_REST = datetime(2026, 1, 1, tzinfo=UTC)
T_MQTT = datetime(2026, 1, 2, tzinfo=UTC)
WARMUP_OFFSET = timedelta(hours=-1)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- helpers ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pids_matching(comm: str, cmd_part: str | None = None) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if (p / "comm").read_text().strip() != comm:
                continue
            if cmd_part is not None and cmd_part not in (p / "cmdline").read_bytes().decode(
                    errors="replace"):
                continue
        except OSError:
            continue
        out.append(int(p.name))
    return out


class CpuMeter:
    """CPU seconds of the server, the bench database's PostgreSQL backends, Mosquitto and
    this process between start() and stop()."""

    def __init__(self, server_pid: int, dbname: str) -> None:
        self.server_pid, self.dbname = server_pid, dbname

    def _sample(self) -> dict[str, float]:
        pg = {p: proc_cpu(p) for p in pids_matching("postgres", self.dbname)}
        return {"server": proc_cpu(self.server_pid), "pg": pg,
                "mosquitto": sum(proc_cpu(p) for p in pids_matching("mosquitto")),
                "generator": time.process_time()}

    def start(self) -> None:
        self.a = self._sample()

    def stop(self) -> dict[str, float]:
        b = self._sample()
        pg = sum(v - self.a["pg"].get(p, 0.0) for p, v in b["pg"].items())
        return {"server_cpu_s": round(b["server"] - self.a["server"], 2),
                "postgres_cpu_s": round(pg, 2),
                "mosquitto_cpu_s": round(b["mosquitto"] - self.a["mosquitto"], 2),
                "generator_cpu_s": round(b["generator"] - self.a["generator"], 2)}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


# --- load ------------------------------------------------------------------------------------

class Load:
    """The readings of one second as column-form JSON bodies (one per chunk of rows).

    Rows are device-major: device d's four quantities are rows 4d..4d+3. Values are
    deterministic functions of (device, quantity, second)."""

    def __init__(self, device_ids: list[str], rows_per_body: int) -> None:
        n_dev = len(device_ids)
        self.n = n_dev * len(QUANTITIES)
        self.series = np.repeat(np.asarray(device_ids, dtype=object), len(QUANTITIES))
        self.quantity = np.tile(np.asarray(QUANTITIES, dtype=object), n_dev)
        self.bounds = [(lo, min(lo + rows_per_body, self.n)) for lo in range(0, self.n, rows_per_body)]
        # pre-serialised constant parts of every body
        self._head = [
            '{"series":' + json.dumps(self.series[lo:hi].tolist(), separators=(",", ":"))
            + ',"quantity":' + json.dumps(self.quantity[lo:hi].tolist(), separators=(",", ":"))
            for lo, hi in self.bounds]
        dev = np.arange(n_dev, dtype=np.float64)
        base = np.stack([(dev % 100) * 0.1, (dev % 7) * 0.01, 230.0 + (dev % 11) * 0.1,
                         0.5 + (dev % 13) * 0.01], axis=1).reshape(-1)
        self.base = base

    def values(self, k: int) -> np.ndarray:
        v = self.base + (k % 10) * 0.001
        v[3::4] = np.clip(v[3::4], 0, 1)
        return np.round(v, 4)

    def bodies(self, t: datetime, k: int) -> list[bytes]:
        ts = t.strftime("%Y-%m-%dT%H:%M:%SZ")
        vals = self.values(k)
        out = []
        for (lo, hi), head in zip(self.bounds, self._head, strict=True):
            t_list = '["' + '","'.join([ts] * (hi - lo)) + '"]'
            out.append((head + ',"t":' + t_list + ',"value":'
                        + json.dumps(vals[lo:hi].tolist(), separators=(",", ":")) + "}").encode())
        return out


# --- database --------------------------------------------------------------------------------

def create_db() -> str:
    import psycopg

    name = f"derms_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_db(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def register_devices(url: str, device_ids: list[str]) -> float:
    from sqlalchemy import insert

    from derms.store.db import make_engine
    from derms.store.models import DerDevice, DerSite, DerType, DeviceStatus, Protocol

    t0 = time.perf_counter()
    engine = make_engine(url)
    try:
        now = datetime.now(UTC)
        n_sites = max(1, len(device_ids) // 10)
        sites = [{"site_id": f"{device_ids[0][:6]}site{i:05d}", "created_at": now}
                 for i in range(n_sites)]
        devs = [{"der_id": d, "site_id": sites[i % n_sites]["site_id"], "der_type": DerType.PV,
                 "s_max_kva": 5.0, "p_gen_max_kw": 5.0, "q_max_kvar": 2.0, "q_min_kvar": -2.0,
                 "protocol": Protocol.MQTT, "status": DeviceStatus.ACTIVE, "created_at": now}
                for i, d in enumerate(device_ids)]
        with engine.begin() as conn:
            conn.execute(insert(DerSite), sites)
            conn.execute(insert(DerDevice), devs)
    finally:
        engine.dispose()
    return time.perf_counter() - t0


class Db:
    """The bench's own connection to the bench database (counts, sentinels)."""

    def __init__(self, dbname: str) -> None:
        import psycopg

        self.conn = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={dbname}",
                                    autocommit=True)

    def series_ids(self, source: str) -> dict[tuple[str, str], int]:
        rows = self.conn.execute("SELECT der_id, quantity, series_id FROM series "
                                 "WHERE source = %s AND der_id IS NOT NULL", (source,)).fetchall()
        return {(d, q): s for d, q, s in rows}

    def per_second(self, source: str, t0: datetime, t1: datetime) -> dict[datetime, int]:
        rows = self.conn.execute(
            "SELECT r.t, count(*) FROM readings r JOIN series s ON s.series_id = r.series_id "
            "WHERE s.source = %s AND r.t >= %s AND r.t < %s GROUP BY r.t",
            (source, t0, t1)).fetchall()
        return {t: n for t, n in rows}

    def dup_check(self, source: str, t0: datetime, t1: datetime) -> tuple[int, int]:
        n, distinct = self.conn.execute(
            "SELECT count(*), count(DISTINCT (r.series_id, r.t)) FROM readings r "
            "JOIN series s ON s.series_id = r.series_id "
            "WHERE s.source = %s AND r.t >= %s AND r.t < %s", (source, t0, t1)).fetchone()
        return int(n), int(distinct)

    def present(self, keys: list[tuple[int, datetime]]) -> set[tuple[int, datetime]]:
        if not keys:
            return set()
        sids = [k[0] for k in keys]
        ts = [k[1] for k in keys]
        rows = self.conn.execute(
            "SELECT r.series_id, r.t FROM readings r JOIN unnest(%s::int4[], %s::timestamptz[]) "
            "AS k(sid, t) ON r.series_id = k.sid AND r.t = k.t", (sids, ts)).fetchall()
        return {(s, t) for s, t in rows}

    def close(self) -> None:
        self.conn.close()


def check_counts(db: Db, source: str, base: datetime, seconds: int, per_second: int,
                 n_series_expected: int) -> dict:
    counts = db.per_second(source, base, base + timedelta(seconds=seconds))
    stored = sum(counts.values())
    short = {k: per_second - counts.get(base + timedelta(seconds=k), 0) for k in range(seconds)}
    n, distinct = db.dup_check(source, base, base + timedelta(seconds=seconds))
    n_series = len(db.series_ids(source))
    return {"sent": per_second * seconds, "stored": stored,
            "lost": per_second * seconds - distinct,
            "duplicated": (n - distinct) + max(0, stored - per_second * seconds),
            "series": n_series, "extra_series": n_series - n_series_expected,
            "seconds_incomplete": sum(1 for v in short.values() if v != 0)}


# --- server ----------------------------------------------------------------------------------

def run_cli(args: list[str], env: dict, timeout: float = 120) -> str:
    res = subprocess.run([str(VENV_BIN / "derms"), *args], env=env, capture_output=True,
                         text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"derms {' '.join(args)} failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


def start_server(env: dict, port: int, log_path: Path, serve_cmd: list[str] | None = None
                 ) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    cmd = serve_cmd or [str(VENV_BIN / "derms")]
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc._bench_log = log  # type: ignore[attr-defined]
    return proc


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"derms serve exited with {proc.returncode}")
        try:
            if httpx.get(base_url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"derms serve not ready within {timeout} s")


def end_mqtt_session(client_id: str, host: str = "127.0.0.1", port: int = 1883) -> None:
    """Delete the server's persistent broker session (else the broker keeps queueing
    telemetry for it: up to max_queued_messages per id)."""
    import paho.mqtt.client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.connect(host, port, keepalive=10)
    c.loop_start()
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    proc._bench_log.close()  # type: ignore[attr-defined]


# --- REST ------------------------------------------------------------------------------------

def rest_run(base_url: str, token: str, load: Load, seconds: int, conns: int,
             drain_timeout: float, cpu: CpuMeter, db: Db, n_series: int) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    client = httpx.Client(base_url=base_url, headers=headers, limits=limits,
                          timeout=httpx.Timeout(drain_timeout + seconds + 30))

    def post(body: bytes) -> tuple[float, float, dict]:
        t_start = time.monotonic()
        r = client.post("/v1/readings", content=body, params={"source": "api"})
        t_done = time.monotonic()
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/readings -> {r.status_code}: {r.text[:500]}")
        return t_start, t_done, r.json()

    try:
        # warm-up second (creates the series of source "api"; not in the measured range)
        t0 = time.monotonic()
        for body in load.bodies(T_REST + WARMUP_OFFSET, 0):
            post(body)
        warmup_s = time.monotonic() - t0

        pool = cf.ThreadPoolExecutor(max_workers=conns)
        futures: list[tuple[int, float, cf.Future]] = []
        max_behind = 0.0
        cpu.start()
        load1 = os.getloadavg()[0]
        run0 = time.monotonic() + 0.5
        for k in range(seconds):
            due = run0 + k
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            max_behind = max(max_behind, time.monotonic() - due)
            for body in load.bodies(T_REST + timedelta(seconds=k), k):
                futures.append((k, due, pool.submit(post, body)))
        gen_done = time.monotonic()
        _done, pending = cf.wait([f for _, _, f in futures],
                                timeout=max(1.0, drain_timeout - (time.monotonic() - gen_done)))
        if pending:
            for f in pending:
                f.cancel()
        lat_due, lat_send, inserted, dups, errors, last_done = [], [], 0, 0, [], run0
        for k, due, f in futures:
            if not f.done() or f.cancelled():
                errors.append(f"second {k}: not answered within the drain timeout")
                continue
            if f.exception() is not None:
                errors.append(f"second {k}: {f.exception()}")
                continue
            t_start, t_done, res = f.result()
            lat_due.append(t_done - due)
            lat_send.append(t_done - t_start)
            inserted += res["inserted"]
            dups += res["duplicates"]
            last_done = max(last_done, t_done)
        pool.shutdown(wait=False, cancel_futures=True)
        usage = cpu.stop()
        load2 = os.getloadavg()[0]
        wall = last_done - run0
        # resend one batch: must insert 0
        _, _, again = post(load.bodies(T_REST, 0)[0])
    finally:
        client.close()
    counts = check_counts(db, "api", T_REST, seconds, load.n, n_series)
    return {"path": "REST", **counts, "warmup_s": round(warmup_s, 2),
            "wall_s": round(wall, 2), "rate_per_s": round(counts["stored"] / wall) if wall > 0 else None,
            "p50_s": pct(lat_due, 50), "p99_s": pct(lat_due, 99),
            "p50_from_send_s": pct(lat_send, 50), "p99_from_send_s": pct(lat_send, 99),
            "latency_basis": "200 response (after commit) - due time; batch = one POST",
            "batches": len(futures), "gen_max_behind_s": round(max_behind, 3),
            "server_inserted": inserted, "server_duplicates": dups,
            "resend_inserted": again["inserted"], "resend_duplicates": again["duplicates"],
            "errors": errors[:10], "loadavg_start": load1, "loadavg_end": load2, **usage}


# --- MQTT ------------------------------------------------------------------------------------

class CPublisher:
    """Mosquitto's own C client (``mosquitto_pub -l``: one message per stdin line, QoS 1,
    MQTT 5, 1,000 in flight) as the generator: a Python paho publisher takes ≈ a core of
    its own at 10,000 small messages per second, on the same 2 cores as the server."""

    def __init__(self, topic: str, host: str, port: int) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto_pub", "-h", host, "-p", str(port), "-l", "-q", "1", "-M", "1000",
             "-V", "mqttv5", "-t", topic, "-i", f"bench-cpub-{uuid.uuid4().hex[:8]}"],
            stdin=subprocess.PIPE)

    def publish_all(self, bodies: list[bytes], wait: bool = False) -> list[float]:
        now = time.monotonic()
        self.proc.stdin.write(b"\n".join(bodies) + b"\n")
        self.proc.stdin.flush()
        if wait:
            time.sleep(1.0)
        return [now] * len(bodies)

    def cpu_s(self) -> float:
        return proc_cpu(self.proc.pid)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def mqtt_run(load: Load, seconds: int, drain_timeout: float, poll_s: float, cpu: CpuMeter,
             db: Db, n_series: int, host: str = "127.0.0.1", port: int = 1883,
             publisher: str = "paho", max_sentinels: int = 100) -> dict:
    import paho.mqtt.client as paho

    topic = "derms/v1/telemetry/der"
    cpub = CPublisher(topic, host, port) if publisher == "c" else None
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2,
                      client_id=f"bench-pub-{uuid.uuid4().hex[:8]}", clean_session=True)
    pub.max_inflight_messages_set(200)
    pub.connect(host, port, keepalive=30)
    pub.loop_start()

    def publish_all(bodies: list[bytes], wait: bool = False) -> list[float]:
        if cpub is not None:
            return cpub.publish_all(bodies, wait)
        times, infos = [], []
        for body in bodies:
            times.append(time.monotonic())
            infos.append(pub.publish(topic, body, qos=1))
        if wait:
            for info in infos:
                info.wait_for_publish(timeout=30)
        return times

    def sentinels(base: datetime, k: int, sid: dict) -> list[tuple[int, datetime]]:
        t = base + timedelta(seconds=k)
        return [(sid[(load.series[lo], load.quantity[lo])], t) for lo, _ in load.bounds]

    try:
        # warm-up second: creates the series of source "der"; wait until stored
        t0 = time.monotonic()
        publish_all(load.bodies(T_MQTT + WARMUP_OFFSET, 0), wait=True)
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            sid = db.series_ids("der")
            if len(sid) >= n_series:
                keys = sentinels(T_MQTT + WARMUP_OFFSET, 0, sid)
                if len(db.present(keys)) == len(keys):
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("MQTT warm-up second not stored within the drain timeout")
        warmup_s = time.monotonic() - t0
        sid = db.series_ids("der")

        # watcher: first time each message's sentinel is visible
        pending: dict[tuple[int, datetime], tuple[int, float]] = {}  # key -> (k, publish t)
        seen: dict[tuple[int, datetime], float] = {}
        lock = threading.Lock()
        stop = threading.Event()
        watch_db_name = db.conn.info.dbname

        def watcher() -> None:
            wdb = Db(watch_db_name)
            try:
                while not stop.is_set():
                    with lock:
                        keys = list(pending)
                    if keys:
                        found = wdb.present(keys)
                        now = time.monotonic()
                        with lock:
                            for key in found:
                                if key in pending:
                                    pending.pop(key)
                                    seen[key] = now
                    stop.wait(poll_s)
            finally:
                wdb.close()

        published: dict[tuple[int, datetime], tuple[int, float]] = {}
        wt = threading.Thread(target=watcher, daemon=True)
        wt.start()
        cpu.start()
        cpub_cpu0 = cpub.cpu_s() if cpub is not None else 0.0
        load1 = os.getloadavg()[0]
        run0 = time.monotonic() + 0.5
        max_behind = 0.0
        for k in range(seconds):
            due = run0 + k
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            max_behind = max(max_behind, time.monotonic() - due)
            keys = sentinels(T_MQTT, k, sid)
            times = publish_all(load.bodies(T_MQTT + timedelta(seconds=k), k))
            # the watcher follows at most --sentinels messages of each second, evenly
            # spread (one per message held a PostgreSQL core busy at 10,000 msg/s); the
            # counts below check every reading
            pick = np.unique(np.linspace(0, len(keys) - 1, min(len(keys), max_sentinels))
                             .astype(int))
            keys, times = [keys[i] for i in pick], [times[i] for i in pick]
            with lock:
                for key, tp in zip(keys, times, strict=True):
                    pending[key] = (k, tp)
                    published[key] = (k, tp)
        gen_done = time.monotonic()
        deadline = gen_done + drain_timeout
        while time.monotonic() < deadline:
            with lock:
                if not pending:
                    break
            time.sleep(poll_s)
        stop.set()
        wt.join(timeout=10)
        usage = cpu.stop()
        if cpub is not None:  # the C publisher is the generator's other process
            usage["publisher_cpu_s"] = round(cpub.cpu_s() - cpub_cpu0, 2)
            usage["generator_cpu_s"] = round(usage["generator_cpu_s"]
                                             + usage["publisher_cpu_s"], 2)
        load2 = os.getloadavg()[0]
        lat = [seen[key] - published[key][1] for key in seen]
        per_sec: dict[int, float] = {}
        for key, t_seen in seen.items():
            k, _ = published[key]
            per_sec[k] = max(per_sec.get(k, 0.0), t_seen - (run0 + k))
        last_seen = max(seen.values()) if seen else run0
        wall = last_seen - run0
        unseen = len(published) - len(seen)

        # resend one message: must store nothing new
        before = sum(db.per_second("der", T_MQTT, T_MQTT + timedelta(seconds=1)).values())
        publish_all([load.bodies(T_MQTT, 0)[0]], wait=True)
        time.sleep(2.0)
        after = sum(db.per_second("der", T_MQTT, T_MQTT + timedelta(seconds=1)).values())
    finally:
        if cpub is not None:
            cpub.close()
        pub.loop_stop()
        pub.disconnect()
    counts = check_counts(db, "der", T_MQTT, seconds, load.n, n_series)
    return {"path": "MQTT", **counts, "warmup_s": round(warmup_s, 2),
            "wall_s": round(wall, 2), "rate_per_s": round(counts["stored"] / wall) if wall > 0 else None,
            "p50_s": pct(lat, 50), "p99_s": pct(lat, 99),
            "p50_second_complete_s": pct(list(per_sec.values()), 50),
            "p99_second_complete_s": pct(list(per_sec.values()), 99),
            "latency_basis": (f"sentinel row visible in PostgreSQL (poll {poll_s} s) - publish "
                              "call; batch = one message"),
            "batches": len(published), "messages_not_seen": unseen, "publisher": publisher,
            "gen_max_behind_s": round(max_behind, 3),
            "resend_inserted": after - before, "errors": [], "loadavg_start": load1,
            "loadavg_end": load2, **usage}


# --- main ------------------------------------------------------------------------------------

def fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def print_table(results: list[dict], meta: dict) -> None:
    cols = [("path", "path"), ("sent", "sent"), ("stored", "stored"), ("lost", "lost"),
            ("duplicated", "dup"), ("rate_per_s", "readings/s"), ("p50_s", "p50 s"),
            ("p99_s", "p99 s"), ("server_cpu_s", "server cpu s"),
            ("postgres_cpu_s", "pg cpu s"), ("mosquitto_cpu_s", "mosq cpu s"),
            ("generator_cpu_s", "gen cpu s"), ("wall_s", "wall s"),
            ("gen_max_behind_s", "gen behind s"), ("loadavg_start", "load start"),
            ("loadavg_end", "load end")]
    rows = [[h for _, h in cols]] + [[fmt(r.get(k)) for k, _ in cols] for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    print(f"cpu: {meta['cpu_model']} x {meta['cpus']}; devices {meta['devices']:,d} x "
          f"{len(QUANTITIES)} quantities, {meta['seconds']} s; goal >= 50,000 readings/s")
    for r in results:
        extra = {k: r[k] for k in r if k not in {c for c, _ in cols}}
        print(f"{r['path']}: " + ", ".join(f"{k}={fmt(v, 3)}" for k, v in extra.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rest-posts", type=int, default=4, help="POST bodies per second")
    ap.add_argument("--rest-conns", type=int, default=4, help="keep-alive connections")
    ap.add_argument("--mqtt-readings", type=int, default=1000, help="readings per message")
    ap.add_argument("--sentinels", type=int, default=100,
                    help="MQTT messages per second whose latency is followed")
    ap.add_argument("--mqtt-publisher", choices=("paho", "c"), default="paho",
                    help="generator client: paho (Python, in this process) or mosquitto_pub")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--poll", type=float, default=0.1, help="MQTT watcher poll interval, s")
    ap.add_argument("--only", choices=("rest", "mqtt"))
    ap.add_argument("--keep-server", type=float, default=0.0,
                    help="seconds to pause before the runs (attach a profiler)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve-cmd", default="",
                    help="command replacing `.venv/bin/derms` for `serve` only (experiments, "
                         "e.g. a patched server); split on spaces")
    a = ap.parse_args()
    if not (1 <= a.seconds <= 600 and 1 <= a.devices <= 100_000):
        ap.error("--seconds 1..600, --devices 1..100000")

    sys.path.insert(0, str(REPO / "src"))
    prefix = f"b{uuid.uuid4().hex[:4]}-"
    device_ids = [f"{prefix}{i:05d}" for i in range(a.devices)]
    n_series = a.devices * len(QUANTITIES)
    meta = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "devices": a.devices,
            "seconds": a.seconds, "loadavg_start": os.getloadavg(),
            "started": datetime.now(UTC).isoformat(), "args": {k: str(v) for k, v in vars(a).items()}}
    dbname = proc = db = None
    mqtt_client_id = f"derms-bench-{uuid.uuid4().hex[:8]}"
    results: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="derms_bench_ingest_"))
    try:
        dbname = create_db()
        url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
        env = {**os.environ, "DERMS_DATABASE_URL": url, "DERMS_DATA_DIR": str(tmp),
               "DERMS_MQTT_HOST": "127.0.0.1", "DERMS_MQTT_PORT": "1883",
               # own persistent session: the default id is shared by every `derms serve`
               "DERMS_MQTT_CLIENT_ID": mqtt_client_id}
        run_cli(["db", "upgrade"], env)
        reg_s = register_devices(url, device_ids)
        token = run_cli(["token", "create", "--scope", "operate", "--name", "bench"], env).strip()
        port = free_port()
        proc = start_server(env, port, tmp / "serve.log", a.serve_cmd.split() or None)
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, proc)
        meta.update({"database": dbname, "register_s": round(reg_s, 2), "server_pid": proc.pid,
                     "server_log": str(tmp / "serve.log")})
        print(f"db {dbname}; {a.devices:,d} devices registered in {reg_s:.1f} s; "
              f"server pid {proc.pid} on {base_url}", flush=True)
        if a.keep_server:
            time.sleep(a.keep_server)
        db = Db(dbname)
        cpu = CpuMeter(proc.pid, dbname)
        if a.only in (None, "rest"):
            load = Load(device_ids, -(-a.devices * len(QUANTITIES) // a.rest_posts))
            results.append(rest_run(base_url, token, load, a.seconds, a.rest_conns,
                                    a.drain_timeout, cpu, db, n_series))
            print(f"REST done: {results[-1]['rate_per_s']} readings/s", flush=True)
        if a.only in (None, "mqtt"):
            load = Load(device_ids, a.mqtt_readings)
            results.append(mqtt_run(load, a.seconds, a.drain_timeout, a.poll, cpu, db, n_series,
                                    publisher=a.mqtt_publisher, max_sentinels=a.sentinels))
            print(f"MQTT done: {results[-1]['rate_per_s']} readings/s", flush=True)
        if proc.poll() is not None:
            raise RuntimeError(f"derms serve died (exit {proc.returncode})")
    finally:
        if db is not None:
            db.close()
        stop_server(proc)
        if proc is not None:
            try:
                end_mqtt_session(mqtt_client_id)
            except Exception as exc:  # noqa: BLE001 - report, keep going
                print(f"warning: could not end MQTT session {mqtt_client_id}: {exc}",
                      file=sys.stderr)
        if dbname is not None:
            try:
                drop_db(dbname)
            except Exception as exc:  # noqa: BLE001 - report, keep going
                print(f"warning: could not drop {dbname}: {exc}", file=sys.stderr)
    meta["loadavg_end"] = os.getloadavg()
    print_table(results, meta)
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
