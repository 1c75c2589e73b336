"""``derms sim`` against the served system, end to end.

``derms serve`` runs as a subprocess with its IEEE 2030.5 listener (certificates from the
sim's own PKI folder). ``derms sim`` (through a small Typer app and CliRunner, in this
process: its OpenDSS engine stays on the main thread) places 40 PV systems on IEEE 123,
pre-registers them through the management API and registry, and its aggregator clients
discover their programs over mutual TLS. Once they are registered, an operator publishes
a zero-export DERControl to the program; the test then checks, from the sim's own outputs
and the DERMS's API, that

* the devices obeyed it (site export falls to ~0, the curtailed PV shows up as extra
  import at the feeder head of the twin's power flow),
* every device acknowledged it (``received`` and ``started`` responses), and
* their mirrored readings reached the historian.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from derms.cli.sim_cmd import sim
from derms.sim.provision import ensure_pki
from tests.integration.conftest import mint_token
from tests.integration.test_ieee2030_5_management import _Served

N_DEVICES = 40


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command(name="sim")(sim)

    @app.callback()
    def _main() -> None:  # keeps "sim" a sub-command
        pass

    return app


def _publish_when_registered(api: str, headers: dict, pid: int, out: dict) -> None:
    """Wait until every end device has registered over TLS and mirrored a reading, then
    publish a zero-export control for the program (in a helper thread: the sim runs on
    the main thread)."""
    try:
        deadline = time.monotonic() + 40
        with httpx.Client(timeout=10) as h:
            pending: set[int] | None = None
            while time.monotonic() < deadline:
                if pending is None:
                    items = h.get(f"{api}/end-devices?limit=1000",
                                  headers=headers).json()["items"]
                    if len(items) == N_DEVICES:
                        pending = {i["end_device_id"] for i in items}
                else:  # registered over TLS: it made its MirrorUsagePoint
                    pending = {e for e in pending if not h.get(
                        f"{api}/end-devices/{e}/mirror-usage-points",
                        headers=headers).json()["items"]}
                    if not pending:
                        break
                time.sleep(0.3)
            else:
                out["error"] = "devices did not register"
                return
            time.sleep(3)  # some steps of free export first
            start = datetime.now(UTC).replace(microsecond=0)
            r = h.post(f"{api}/programs/{pid}/controls", headers=out["operate"], json={
                "start": start.isoformat(), "duration_s": 3600, "export_limit_w": 0,
                "description": "zero export"})
            out["control"] = r.json()
            out["published"] = datetime.now(UTC)
            out["status"] = r.status_code
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out["error"] = repr(exc)


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
def test_sim_devices_obey_acknowledge_and_report(tmp_path, mode):
    """``poll``: devices poll every 2 s (120 simulated s at 60x). ``subscribe``: they
    subscribe their lists and effectively never poll (10 h), so the control can only
    reach them by the server's Notification."""
    receive = (["--poll-rate", "120"] if mode == "poll" else
               ["--subscribe", "--poll-rate", "36000"])
    t_start = time.monotonic()
    pki = tmp_path / "pki"
    ensure_pki(pki, 2)  # CA, server and two aggregators, as `derms sim --pki` makes them
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    env = {**os.environ, "DERMS_DATABASE_URL": url, "DERMS_DATA_DIR": str(tmp_path)}
    served = _Served(env, pki)
    try:
        served.wait_ready()
        admin, read = mint_token(url, "admin"), mint_token(url, "read")
        api = f"http://127.0.0.1:{served.port}/v1/ieee2030-5"
        with httpx.Client(timeout=10) as h:
            pid = h.post(f"{api}/programs", headers=admin,
                         json={"description": "sim", "primacy": 1}).json()["program_id"]
            fsa = h.post(f"{api}/function-set-assignments", headers=admin,
                         json={"description": "sim", "program_ids": [pid]}).json()["fsa_id"]
            r = h.put(f"{api}/programs/{pid}/default-control", headers=admin,
                      json={"export_limit_w": 20000})
            assert r.status_code == 200, r.text
        shared = {"operate": mint_token(url, "operate")}
        helper = threading.Thread(target=_publish_when_registered,
                                  args=(api, read, pid, shared), daemon=True)
        helper.start()
        out = tmp_path / "out"
        result = CliRunner().invoke(_app(), [
            "sim", "--out", str(out), "--feeder", "ieee123", "--devices", str(N_DEVICES),
            "--mix", "pv=1", "--seed", "3", "--speed", "60", "--step", "60s",
            "--duration", "24min", "--start", "2026-07-01T19:30:00Z",
            "--ieee2030-5", f"127.0.0.1:{served.sep_port}", "--dcap-path", "/sep2/dcap",
            "--pki", str(pki), "--aggregators", "2", "--api", f"http://127.0.0.1:{served.port}",
            "--token", admin["Authorization"].split()[1], "--fsa-id", str(fsa),
            *receive, "--post-rate", "120"])
        assert result.exit_code == 0, (result.output, result.exception)
        helper.join(timeout=5)
        assert "error" not in shared, shared
        assert shared["status"] == 201, shared

        if mode == "subscribe":
            proto = json.loads((out / "summary.json").read_text())["protocol"]
            assert proto["notifications"] >= N_DEVICES, proto  # at least the control's
        ts = pd.read_csv(out / "timeseries.csv", parse_dates=["t", "wall_time"])
        published = pd.Timestamp(shared["published"])
        before = ts[ts.wall_time < published]
        after = ts[ts.wall_time > published + pd.Timedelta(seconds=4)]  # 2 s polls + slack
        assert len(before) >= 3 and len(after) >= 5, (len(before), len(after))
        # before: the PV exports; after: every device is under the control, no site exports
        assert before.site_export_kw.iloc[-1] > 30, before.site_export_kw.tolist()
        assert (after.active_controls == N_DEVICES).all(), after.active_controls.tolist()
        assert after.site_export_kw.max() < 0.5, after.site_export_kw.tolist()
        assert after.export_over_limit_kw.max() < 1e-6
        # the twin's power flow: the curtailed PV appears as extra import at the head
        curtailed = (after.pv_avail_kw - after.pv_p_out_kw).mean() - (
            before.pv_avail_kw - before.pv_p_out_kw).mean()
        net = (after.head_p_kw - after.load_kw).mean() - (before.head_p_kw
                                                          - before.load_kw).mean()
        assert curtailed > 30 and net == pytest.approx(curtailed, rel=0.15), (curtailed, net)

        with httpx.Client(timeout=10) as h:
            cid = shared["control"]["control_id"]
            items = h.get(f"{api}/controls/{cid}/responses?limit=1000",
                          headers=read).json()["items"]
            by_status: dict[str, set[int]] = {}
            for it in items:
                by_status.setdefault(it["status_name"], set()).add(it["end_device_id"])
            assert len(by_status.get("received", ())) == N_DEVICES, by_status
            assert len(by_status.get("started", ())) == N_DEVICES, by_status
            # mirrored site readings in the historian (import positive, simulated time)
            rd = h.get(f"http://127.0.0.1:{served.port}/v1/readings", headers=read, params={
                "series": "sim-pv-1-site", "quantity": "p_kw",
                "start": "2026-07-01T19:00:00Z", "end": "2026-07-01T21:00:00Z"}).json()
            assert rd["rows"] >= 5, rd
            v = h.get(f"http://127.0.0.1:{served.port}/v1/readings", headers=read, params={
                "series": "sim-pv-1-site", "quantity": "v_v",
                "start": "2026-07-01T19:00:00Z", "end": "2026-07-01T21:00:00Z"}).json()
            assert all(2000 < x < 2700 for x in v["value"]), v  # IEEE 123: 2.4 kV to neutral
            # the last readings show no export (p_kw >= 0 at the site)
            t_ctl = datetime.fromisoformat(rd["t"][-1])
            assert t_ctl > datetime(2026, 7, 1, 19, 30, tzinfo=UTC) + timedelta(minutes=10)
            assert rd["value"][-1] >= -0.01, rd
    finally:
        served.stop()
    assert time.monotonic() - t_start < 90
