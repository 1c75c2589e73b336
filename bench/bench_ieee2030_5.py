"""IEEE 2030.5 load test (issue 8): N simulated devices, each with its own client
certificate and one keep-alive mutual-TLS connection, each polling its DERControlList every
``--period`` seconds for ``--seconds`` seconds, against ``derms serve`` (subprocess, the
2030.5 listener on 127.0.0.1).

Setup (not measured): the test PKI (a CA, the server certificate and one device certificate
per client, issued once with ``derms.protocols.ieee2030_5.certs`` and cached in
``--pki-dir``), a fresh SQLite database, ``derms serve --no-mqtt --ieee2030-5-port …``;
through the management API: one DER program, one function set assignment, N end devices
(connection point ``NMI-<k>``) assigned to it, and operating envelopes for every connection
point (``--intervals`` five-minute DERControls each, the current one active), so each device's
list holds its own envelope controls among N × intervals.

Measured: every client connects (TLS 1.2+, ECDHE-ECDSA with its own P-256 certificate; the
connections are spread over the first period) and then sends ``GET …/derc?l=10`` on its own
connection every period (its first at a random offset within the period). A request succeeds
when the answer is 200 with a DERControlList holding the client's envelopes; latency is from
writing the request to reading the whole body. A failed connection is retried at the next
tick (its requests count as failures). Reported: success rate, latency p50/p90/p99/max,
requests per second, handshake time, the CPU seconds of the server process
(/proc/<pid>/stat) and of this generator, ``uptime`` before and after (other jobs share the
2 cores).

``--profile out.prof`` runs the same listener in a child process with cProfile on its
event-loop thread instead of ``derms serve`` (same SepApp and repository set-up in process).

Run: ``.venv/bin/python bench/bench_ieee2030_5.py [--clients 1000] [--seconds 120]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- PKI --------------------------------------------------------------------------------------

def pki(folder: Path, n: int) -> tuple[Path, list[tuple[str, str]]]:
    """CA, server certificate and ``n`` device certificates (cached): ``(dir, [(name,
    lfdi)])``."""
    from derms.protocols.ieee2030_5.certs import create_ca, issue
    from derms.protocols.ieee2030_5.identity import lfdi_from_cert_pem

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "ca.pem").exists():
        create_ca(folder)
        issue(folder, "server", "server", folder / "ca.pem", folder / "ca.key")
    t0 = time.perf_counter()
    out, made = [], 0
    for k in range(n):
        name = f"dev{k:05d}"
        pem = folder / f"{name}.pem"
        if not pem.exists():
            issue(folder, name, "device", folder / "ca.pem", folder / "ca.key")
            made += 1
        out.append((name, lfdi_from_cert_pem(pem.read_bytes())))
    if made:
        _log(f"issued {made} device certificates in {time.perf_counter() - t0:.1f} s")
    return folder, out


# --- the server and its set-up ----------------------------------------------------------------

def setup_payloads(n: int, intervals: int) -> tuple[list[dict], dict]:
    """End devices (lfdi filled in later) and the envelope rows for every connection point."""
    now = datetime.now(UTC).timestamp()
    t0 = int(now // 300 * 300)
    rows = {"mrid": [], "connection_point": [], "start": [], "duration_s": [],
            "export_limit_w": [], "import_limit_w": []}
    for k in range(n):
        for j in range(intervals):
            rows["mrid"].append(f"{k:08X}{j:08X}{'0' * 16}")
            rows["connection_point"].append(f"NMI-{k}")
            rows["start"].append(datetime.fromtimestamp(t0 + 300 * j, UTC).isoformat())
            rows["duration_s"].append(300 if j < intervals - 1 else 86_400)
            rows["export_limit_w"].append(1000.0 + k + j)
            rows["import_limit_w"].append(5000.0 + j)
    return [{"connection_point": f"NMI-{k}"} for k in range(n)], rows


class Served:
    """``derms serve`` with the listener, as a subprocess (always terminated)."""

    def __init__(self, pki_dir: Path, work: Path) -> None:
        self.port, self.sep_port = _free_port(), _free_port()
        self.env = {**os.environ, "DERMS_DATABASE_URL": f"sqlite:///{work / 'derms.db'}",
                    "DERMS_DATA_DIR": str(work)}
        self.log = open(work / "serve.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "derms.cli.main", "serve", "--port", str(self.port),
             "--no-mqtt", "--ieee2030-5-port", str(self.sep_port),
             "--ieee2030-5-cert", str(pki_dir / "server.pem"),
             "--ieee2030-5-key", str(pki_dir / "server.key"),
             "--ieee2030-5-client-ca", str(pki_dir / "ca.pem")],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def token(self, scope: str) -> dict[str, str]:
        text = subprocess.run([sys.executable, "-m", "derms.cli.main", "token", "create",
                               "--scope", scope], env=self.env, capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]
        return {"Authorization": f"Bearer {text}"}

    def wait_ready(self, timeout_s: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"derms serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("derms serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()

    def configure(self, devices: list[tuple[str, str]], intervals: int) -> list[str]:
        """Program, FSA, end devices, envelopes; returns each client's DERControlList path."""
        import httpx

        admin, operate = self.token("admin"), self.token("operate")
        api = f"http://127.0.0.1:{self.port}/v1/ieee2030-5"
        edevs, rows = setup_payloads(len(devices), intervals)
        with httpx.Client(timeout=60) as h:
            pid = h.post(f"{api}/programs", headers=admin,
                         json={"description": "DOE", "primacy": 1}).json()["program_id"]
            fsa = h.post(f"{api}/function-set-assignments", headers=admin,
                         json={"description": "all", "program_ids": [pid]}).json()["fsa_id"]
            ids = []
            for (_name, lfdi), body in zip(devices, edevs, strict=True):
                r = h.post(f"{api}/end-devices", headers=admin, json={**body, "lfdi": lfdi})
                r.raise_for_status()
                ids.append(r.json()["end_device_id"])
            h.post(f"{api}/function-set-assignments/{fsa}/end-devices", headers=admin,
                   json={"end_device_ids": ids}).raise_for_status()
            r = h.post(f"{api}/programs/{pid}/envelopes", headers=operate,
                       json={"site_controls": rows})
            r.raise_for_status()
        return [f"/edev/{e}/derp/{pid}/derc?l=10" for e in ids]


def serve_profiled(args: argparse.Namespace) -> None:
    """Child process of ``--profile``: the listener in process, cProfile on its loop
    thread; set up like ``configure``; prints the paths; stops on stdin EOF."""
    import cProfile
    import threading

    from derms.protocols.ieee2030_5 import InMemoryRepository
    from derms.protocols.ieee2030_5.app import SepApp
    from derms.protocols.ieee2030_5.http11 import Http11TlsServer
    from derms.protocols.ieee2030_5.model import ControlSpec, DerLimits
    from derms.protocols.ieee2030_5.tls import server_ssl_context

    folder, devices = pki(Path(args.pki_dir), args.clients)
    repo = InMemoryRepository()
    prog = repo.add_program("DOE", 1)
    fsa = repo.add_fsa("all", [prog.program_id])
    _, rows = setup_payloads(len(devices), args.intervals)
    ids = [repo.add_end_device(lfdi, nmi=f"NMI-{k}", fsa_ids=[fsa.fsa_id]).edev_id
           for k, (_n, lfdi) in enumerate(devices)]
    repo.add_controls([ControlSpec(prog.program_id, datetime.fromisoformat(s), d,
                                   DerLimits(exp_lim_w=e, imp_lim_w=i), connection_point=cp,
                                   mrid=m)
                       for m, cp, s, d, e, i in zip(*rows.values(), strict=True)])
    ctx = server_ssl_context(folder / "server.pem", folder / "server.key", folder / "ca.pem")
    server = Http11TlsServer(SepApp(repo), ctx, "127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    prof = cProfile.Profile()

    def run() -> None:
        prof.enable()
        loop.run_forever()
        prof.disable()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    print(json.dumps({"port": port, "paths": [f"/edev/{e}/derp/{prog.program_id}/derc?l=10"
                                              for e in ids]}), flush=True)
    sys.stdin.read()
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    prof.dump_stats(args.profile)


# --- the generator ----------------------------------------------------------------------------

class Stats:
    def __init__(self) -> None:
        self.latency: list[float] = []
        self.first_round: list[bool] = []  # the request was its client's first (connecting)
        self.handshake: list[float] = []
        self.ok = self.failed = self.connect_failed = 0
        self.errors: dict[str, int] = {}

    def fail(self, what: str) -> None:
        self.failed += 1
        self.errors[what] = self.errors.get(what, 0) + 1


async def _request(reader, writer, request: bytes, timeout_s: float) -> tuple[int, bytes]:
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(x.split(":", 1)[1]) for x in lines[1:]
                   if x.lower().startswith("content-length:")), 0)
    body = await asyncio.wait_for(reader.readexactly(length), timeout_s) if length else b""
    return status, body


def client_context(folder: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    ctx.load_cert_chain(folder / f"{name}.pem", folder / f"{name}.key")
    return ctx


async def client(k: int, ctx: ssl.SSLContext, path: str, port: int, t_start: float,
                 t_end: float, period: float, stats: Stats, timeout_s: float) -> None:
    request = (f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n"
               "Accept: application/sep+xml\r\n\r\n").encode()
    rng = random.Random(k)
    offset = rng.uniform(0, period)
    prefix = f"<mRID>{k:08X}".encode()  # its envelopes' mRIDs start with its number
    reader = writer = None
    tick = 0
    while True:
        due = t_start + offset + tick * period
        if due >= t_end:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tick += 1
        if writer is None:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="localhost"), timeout_s)
                stats.handshake.append(time.perf_counter() - t0)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                stats.connect_failed += 1
                stats.fail(f"connect:{type(exc).__name__}")
                writer = None
                continue
        t0 = time.perf_counter()
        try:
            status, body = await _request(reader, writer, request, timeout_s)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError,
                ValueError, IndexError) as exc:
            stats.fail(f"request:{type(exc).__name__}")
            writer.close()
            writer = None
            continue
        dt = time.perf_counter() - t0
        if status == 200 and b"<DERControlList" in body and prefix in body:
            stats.ok += 1
            stats.latency.append(dt)
            stats.first_round.append(tick == 1)
        else:
            stats.fail(f"status:{status}")
    if writer is not None:
        writer.close()


async def generate(devices, paths, folder: Path, port: int, seconds: float, period: float,
                   timeout_s: float) -> tuple[Stats, float]:
    stats = Stats()
    # every client's SSL context (its own certificate) before the clock starts
    contexts = [client_context(folder, name) for name, _lfdi in devices]
    t_start = time.perf_counter() + 1.0
    t_end = t_start + seconds
    await asyncio.gather(*(client(k, ctx, path, port, t_start, t_end, period, stats,
                                  timeout_s)
                           for k, (ctx, path) in enumerate(zip(contexts, paths, strict=True))))
    return stats, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--period", type=float, default=5.0)
    ap.add_argument("--intervals", type=int, default=3,
                    help="envelope DERControls per connection point")
    ap.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    ap.add_argument("--pki-dir", default=str(Path(tempfile.gettempdir())
                                             / "derms-bench-ieee2030-5-pki"))
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--profile", help="cProfile the listener (in a child process) to this file")
    ap.add_argument("--serve-profiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_profiled:
        serve_profiled(args)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)),
                                                hard))
    up_start = _uptime()
    _log(f"uptime: {up_start}")
    folder, devices = pki(Path(args.pki_dir), args.clients)
    with tempfile.TemporaryDirectory(prefix="derms-bench-2030-5-") as work:
        if args.profile:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve-profiled", "--clients", str(args.clients),
                 "--intervals", str(args.intervals), "--pki-dir", str(folder),
                 "--profile", args.profile], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True)
            info = json.loads(proc.stdout.readline())
            port, paths, server_pid, served = info["port"], info["paths"], proc.pid, None
        else:
            served = Served(folder, Path(work))
            try:
                served.wait_ready()
                t0 = time.perf_counter()
                paths = served.configure(devices, args.intervals)
                _log(f"configured {len(paths)} end devices and "
                     f"{len(paths) * args.intervals} controls in "
                     f"{time.perf_counter() - t0:.1f} s")
            except BaseException:
                served.stop()
                raise
            port, server_pid, proc = served.sep_port, served.proc.pid, None
        try:
            cpu_srv0, cpu_gen0 = _cpu_s(server_pid), time.process_time()
            t0 = time.perf_counter()
            _log(f"{args.clients} clients x {args.seconds:.0f} s, one GET per "
                 f"{args.period:.0f} s each")
            stats, _ = asyncio.run(generate(devices, paths, folder, port, args.seconds,
                                            args.period, args.timeout))
            wall = time.perf_counter() - t0
            cpu_srv, cpu_gen = _cpu_s(server_pid) - cpu_srv0, time.process_time() - cpu_gen0
        finally:
            if proc is not None:
                proc.stdin.close()
                proc.wait(timeout=60)
            if served is not None:
                served.stop()
    up_end = _uptime()
    lat = np.array(stats.latency) * 1e3
    hs = np.array(stats.handshake) * 1e3
    steady = lat[~np.array(stats.first_round, dtype=bool)] if len(lat) else lat
    total = stats.ok + stats.failed
    pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan"))
    out = {
        "clients": args.clients, "seconds": args.seconds, "period_s": args.period,
        "controls_per_client": args.intervals, "controls_total": args.clients * args.intervals,
        "requests": total, "ok": stats.ok, "failed": stats.failed,
        "success_pct": 100.0 * stats.ok / total if total else float("nan"),
        "errors": stats.errors,
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                       "max": float(lat.max()) if len(lat) else float("nan")},
        "handshake_ms": {"n": len(hs), "p50": pct(hs, 50), "p99": pct(hs, 99)},
        # after every client has connected (from each client's second request on)
        "latency_steady_ms": {"p50": pct(steady, 50), "p99": pct(steady, 99),
                              "max": float(steady.max()) if len(steady) else float("nan")},
        "requests_per_s": stats.ok / args.seconds,
        "offered_per_s": args.clients / args.period,
        "wall_s": wall,
        "cpu_server_s": cpu_srv, "cpu_server_pct_of_core": 100 * cpu_srv / wall,
        "cpu_generator_s": cpu_gen, "cpu_generator_pct_of_core": 100 * cpu_gen / wall,
        "uptime_start": up_start, "uptime_end": up_end, "profiled": bool(args.profile),
    }
    _log(f"uptime: {up_end}")
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
