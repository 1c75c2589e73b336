"""The slow re-plan of the control loop (derms.control.replan) on the bundled IEEE 123.

A SQLite store with the feeder registered (as tests/integration/test_control_loop.py
does) and six batteries and four PVs at single-phase customer buses, fresh ``p_kw``
telemetry (and ``soc_frac`` for some batteries); the load forecast is the loop's load
multiplier, a function of time with an evening-like peak three hours ahead.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from derms.control.commands import CommandMode
from derms.control.loop import ControlLoop, LoopConfig
from derms.control.replan import ReplanConfig, horizon_at
from derms.errors import InputError
from derms.grid.bundled import resolve_master
from derms.monitoring.feeder_monitor import MonitorConfig, head_meter_id
from derms.protocols.ieee2030_5 import InMemoryRepository
from derms.protocols.ieee2030_5.events import superseded_times
from derms.store import commands as cstore
from derms.store.db import make_engine, make_session_factory
from derms.store.migrate import upgrade
from derms.store.models import (
    AuditEntry,
    DerDevice,
    DerSite,
    DerType,
    DeviceStatus,
    Feeder,
    FeederModelVersion,
    Meter,
    Phase,
)
from derms.store.timeseries import write_readings
from tests.validation.test_corrective import customer_loads, frozen

T0 = datetime(2026, 7, 1, 12, 3, 20, tzinfo=UTC)  # inside the 12:00-12:15 interval
MASTER = resolve_master("ieee123")
PHASE = {1: Phase.A, 2: Phase.B, 3: Phase.C}


def load_multiplier(t: datetime) -> float:
    """0.5 of the base loads, rising to 1.0 three hours after T0 (an evening peak)."""
    h = (t - T0).total_seconds() / 3600.0
    return 0.5 + 0.5 * math.exp(-(((h - 3.0) / 1.0) ** 2))


@pytest.fixture(scope="module")
def customers():
    eng = frozen(MASTER)
    try:
        return [c for c in customer_loads(eng) if len(c[2]) == 1]
    finally:
        eng.close()


@pytest.fixture
def store(tmp_path, customers):
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    upgrade(url)
    db = make_engine(url)
    fid = f"f123-{uuid.uuid4().hex[:6]}"
    rng = np.random.default_rng(3)
    pick = rng.choice(len(customers), size=10, replace=False)
    ders = []  # (der_id, kind, bus, phase)
    with make_session_factory(db).begin() as s:
        s.add(Feeder(feeder_id=fid, name="IEEE 123"))
        s.flush()
        s.add(FeederModelVersion(feeder_id=fid, version=1, source_uri="ieee123",
                                 valid_from=T0 - timedelta(days=1)))
        s.add(Meter(meter_id=head_meter_id(fid), feeder_id=fid, bus="150", phase=Phase.ABC))
        for k, j in enumerate(pick):
            _, bus, nodes, _, _ = customers[j]
            ph = PHASE[int(nodes[0].rsplit(".", 1)[1])]
            kind = "bat" if k < 6 else "pv"
            der_id = f"{fid}-{kind}{k}"
            s.add(DerSite(site_id=f"{der_id}-site", feeder_id=fid, bus=bus))
            s.flush()
            if kind == "bat":
                s.add(DerDevice(der_id=der_id, site_id=f"{der_id}-site",
                                der_type=DerType.BATTERY, p_gen_max_kw=50.0,
                                p_charge_max_kw=50.0, e_max_kwh=200.0, s_max_kva=55.0,
                                bus=bus, phase=ph, status=DeviceStatus.ACTIVE))
            else:
                s.add(DerDevice(der_id=der_id, site_id=f"{der_id}-site", der_type=DerType.PV,
                                p_gen_max_kw=40.0, s_max_kva=44.0, bus=bus, phase=ph,
                                status=DeviceStatus.ACTIVE))
            ders.append((der_id, kind))
    yield db, fid, ders
    db.dispose()


def write_telemetry(db, ders, now: datetime) -> None:
    rows = [(d, "p_kw", 0.0) for d, _ in ders]
    rows += [(d, "soc_frac", 0.6) for d, k in ders[:3] if k == "bat"]
    frame = pd.DataFrame({"der_id": [r[0] for r in rows], "quantity": [r[1] for r in rows],
                          "value": [r[2] for r in rows],
                          "t": pd.Series([now] * len(rows), dtype=object), "source": "test"})
    write_readings(db, frame)


def make_loop(db, fid, repo=None):
    cfg = LoopConfig(replan=ReplanConfig(horizon_h=6.0),
                     monitor=MonitorConfig(alarms=False, load_multiplier=load_multiplier))
    return ControlLoop(db, fid, repo=repo, config=cfg)


def register(repo, ders) -> dict[str, int]:
    out = {}
    for k, (d, _) in enumerate(ders):
        lfdi = uuid.uuid5(uuid.NAMESPACE_DNS, d).hex[:20].upper() + f"{k:020X}"
        out[d] = repo.add_end_device(lfdi[:40], der_id=d).edev_id
    return out


def tracked(db, fid) -> dict[str, cstore.ControlCommandRecord]:
    with make_session_factory(db)() as s:
        rows = s.scalars(select(cstore.ControlCommandRecord)
                         .where(cstore.ControlCommandRecord.feeder_id == fid)).all()
    return {r.command_id: r for r in rows}


def test_config_is_checked():
    with pytest.raises(InputError, match="period_s"):
        ReplanConfig(period_s=30)
    with pytest.raises(InputError, match="horizon_h"):
        ReplanConfig(horizon_h=0)
    with pytest.raises(InputError):
        ReplanConfig(horizon_h=0.1)  # shorter than one 15-min step
    h = horizon_at(T0, ReplanConfig())
    assert h.start == datetime(2026, 7, 1, 12, 0, tzinfo=UTC) and h.n_steps == 24


def test_replan_lowers_the_peak_and_commands_are_tracked(store):
    db, fid, ders = store
    repo = InMemoryRepository()
    register(repo, ders)
    loop = make_loop(db, fid, repo)
    try:
        write_telemetry(db, ders, T0)
        s = loop.run_replan(T0)
        assert s["status"] == "planned", s
        assert s["n_batteries"] == 6 and s["n_pv"] == 4
        # the plan lowers the forecast head peak, checked on the AC model
        assert s["peak_after_kw"] < s["peak_before_kw"] - 50.0, s
        v, v0 = s["violations"], s["violations_uncontrolled"]
        assert v["violations_voltage"] + v["violations_thermal"] <= \
            v0["violations_voltage"] + v0["violations_thermal"]
        # every battery gets its planned net import in the present interval as a setpoint
        res = loop.last_replan_result
        cmds = {c.der_id: c for c in res.commands}
        bats = [d for d, k in ders if k == "bat"]
        assert set(bats) <= set(cmds)
        n_pv = len(res.schedule.fleet.pv)
        end = datetime(2026, 7, 1, 12, 15, tzinfo=UTC)
        for j, b in enumerate(res.schedule.fleet.batteries):
            c = cmds[b.der_id]
            assert c.mode is CommandMode.P_SETPOINT and c.valid_from == T0
            assert c.valid_until == end and c.cycle_id.startswith("rp-")
            assert c.p_kw == pytest.approx(res.schedule.p_kw[0, n_pv + j], abs=1e-3)
            assert c.reason.startswith(f"re-plan {c.cycle_id}: ")
        # tracked (stored, sent, audited) and published as DERControls of the program
        tr = tracked(db, fid)
        assert set(s["command_ids"]) <= set(tr)
        assert {tr[c].state for c in s["command_ids"]} == {"sent"}
        mrids = {c.mrid for c in repo.controls(loop.program_id)}
        assert {c.upper() for c in s["command_ids"]} <= mrids
        with make_session_factory(db)() as ses:
            acts = ses.execute(select(AuditEntry.action).where(
                AuditEntry.entity_id == fid)).scalars().all()
        assert "control_replan" in acts
        st = loop.status()
        assert st["last_replan"]["replan_id"] == s["replan_id"] and st["replans"] == 1
        assert st["replan_period_s"] == 900.0
        from fastapi.testclient import TestClient

        from derms.api.app import create_app
        from derms.config import get_settings
        from tests.integration.conftest import mint_token

        url = str(db.url)
        app = create_app(get_settings(database_url=url))
        app.state.control_loop = loop
        r = TestClient(app, headers=mint_token(url, "read")).get("/v1/control/loop")
        assert r.status_code == 200 and r.json()["last_replan"]["replan_id"] == s["replan_id"]
        assert r.json()["last_replan"]["peak_after_kw"] == s["peak_after_kw"]
        assert s["timings"]["total_s"] > 0
        # the plan discharges the batteries at the forecast peak (3 h ahead) ...
        fleet = res.schedule.fleet
        k_peak = int(np.argmax([load_multiplier(fleet.horizon.start + (k + 0.5)
                                                * fleet.horizon.step)
                                for k in range(fleet.horizon.n_steps)]))
        assert res.schedule.p_kw[k_peak, n_pv:].sum() < -100.0
        # ... and a re-plan at the peak commands that discharge now
        now = T0 + timedelta(hours=3)
        write_telemetry(db, ders, now)
        s2 = loop.run_replan(now)
        assert s2["status"] == "planned" and s2["peak_after_kw"] < s2["peak_before_kw"] - 50
        now_cmds = {c.der_id: c for c in loop.last_replan_result.commands}
        assert set(bats) <= set(now_cmds)
        assert sum(now_cmds[b].p_kw for b in bats) < -100.0  # discharging at the peak
        assert all(now_cmds[b].valid_until == datetime(2026, 7, 1, 15, 15, tzinfo=UTC)
                   for b in bats)
        assert {tracked(db, fid)[c].state for c in s2["command_ids"]} == {"sent"}
        print("replan timings", s["timings"], "peaks", s["peak_before_kw"], s["peak_after_kw"],
              "at the peak", s2["peak_before_kw"], s2["peak_after_kw"], s2["timings"]["total_s"])
    finally:
        loop.close()


def test_fast_cycle_command_is_not_undone_by_the_plan(store):
    db, fid, ders = store
    repo = InMemoryRepository()
    edevs = register(repo, ders)
    loop = make_loop(db, fid, repo)
    bats = [d for d, k in ders if k == "bat"]
    try:
        write_telemetry(db, ders, T0)
        loop.build(T0)
        # the fast cycle commanded bats[0] 20 s ago (its issuer and sink, as FastCycle does)
        t_fc = T0 - timedelta(seconds=20)
        fc = loop._issuer.issue(t_fc, "fc-test-1", [bats[0]], ["battery"], [-7.0],
                                [float("nan")], ["corrective: overload"])
        loop.sink.send(fc)
        s1 = loop.run_replan(T0)
        assert s1["status"] == "planned"
        assert bats[0] in s1["protected"]
        assert bats[0] not in {c.der_id for c in loop.last_replan_result.commands}
        assert loop._issuer.last[bats[0]].command_id == fc[0].command_id  # it stands
        # a fast-cycle command after the plan's, for a DER the plan commanded, supersedes it
        plan_cmd = next(c for c in loop.last_replan_result.commands if c.der_id == bats[1])
        t2 = T0 + timedelta(seconds=10)
        fc2 = loop._issuer.issue(t2, "fc-test-2", [bats[1]], ["battery"],
                                 [plan_cmd.p_kw - 10.0], [float("nan")], ["corrective: v"])
        assert fc2
        loop.sink.send(fc2)
        mine = [c for c in repo.controls(loop.program_id) if c.edev_id == edevs[bats[1]]]
        sup = superseded_times(mine)
        plan_ctrl = next(c for c in mine if c.mrid == plan_cmd.command_id.upper())
        assert plan_ctrl.control_id in sup
        standing = {c.der_id: c for c in loop.tracker.standing(t2)}
        assert standing[bats[1]].command_id == fc2[0].command_id
        # the next re-plan in the same interval leaves both fast-cycle DERs alone and does
        # not re-issue the plan's unchanged decisions
        write_telemetry(db, ders, T0 + timedelta(seconds=60))
        s2 = loop.run_replan(T0 + timedelta(seconds=60))
        assert {bats[0], bats[1]} <= set(s2["protected"])
        again = {c.der_id for c in loop.last_replan_result.commands}
        assert not again & {bats[0], bats[1]}
        assert len(again) < len(s1["command_ids"]), s2
        assert loop._issuer.last[bats[1]].command_id == fc2[0].command_id
    finally:
        loop.close()


def test_serve_rejects_a_short_replan_period(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DERMS_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    r = subprocess.run([sys.executable, "-m", "derms.cli.main", "serve", "--no-mqtt",
                        "--control-feeder", "ieee123", "--control-replan-s", "30"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "at least 60 s" in r.stderr + r.stdout
    assert not (tmp_path / "x.db").exists()  # rejected before anything started


@pytest.mark.slow
def test_serve_runs_the_replan(store):
    """`derms serve --control-feeder F --control-replan-s 60`: the loop's thread re-plans
    one period after its start; the summary is served as ``last_replan``."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.integration.conftest import mint_token
    from tests.integration.test_control_serve import _free_port, _wait

    db, fid, ders = store
    url_db = str(db.url)
    start = datetime.now(UTC).replace(microsecond=0)
    for k in range(15):  # fresh readings over the next 140 s (the first re-plan at 60 s)
        write_telemetry(db, ders, start + timedelta(seconds=10 * k))
    headers = mint_token(url_db, "read")
    port = _free_port()
    env = {**os.environ, "DERMS_DATABASE_URL": url_db}
    proc = subprocess.Popen(
        [sys.executable, "-m", "derms.cli.main", "serve", "--port", str(port), "--no-mqtt",
         "--control-feeder", fid, "--control-period-s", "5", "--control-replan-s", "60"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def replanned():
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/control/loop", headers=headers,
                              timeout=2)
            except httpx.TransportError:
                return None
            return r.json() if r.status_code == 200 and r.json().get("last_replan") else None

        status = _wait(replanned, 90)
        last = status["last_replan"]
        assert status["replan_period_s"] == 60.0
        assert last["status"] == "planned", last
        assert last["n_batteries"] == 6 and last["commands"] >= 6
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert "Traceback" not in err, err[-3000:]


def test_replan_uses_the_stored_head_forecast(store):
    """A forecast run of the head meter's ``p_kw`` series (the forecast service's output)
    is the load forecast: the plan discharges at its peak, not at the monitor's."""
    from derms.store.forecasts import RunIn, save_model_record, write_forecast

    db, fid, ders = store
    head = head_meter_id(fid)
    write_readings(db, pd.DataFrame({"meter_id": [head], "quantity": ["p_kw"], "value": [1.0],
                                     "t": pd.Series([T0 - timedelta(hours=1)], dtype=object),
                                     "source": "test"}))
    loop = make_loop(db, fid)
    try:
        write_telemetry(db, ders, T0)
        loop.build(T0)
        base_kw = float(loop._meas.base_p_kw.sum())
        with db.connect() as conn:
            from derms.store.models import Series
            sid = conn.execute(select(Series.series_id).where(
                Series.meter_id == head, Series.quantity == "p_kw")).scalar_one()
        model, _ = save_model_record(db, name="load-test", kind="load", version="v1",
                                     trained_at=T0 - timedelta(days=1),
                                     train_end=T0 - timedelta(days=1), n_series=1, path="x")
        start = horizon_at(T0, ReplanConfig()).start
        t = pd.date_range(start, periods=24, freq="15min")
        m = np.full(24, 0.5)
        m[4:7] = 1.0  # the peak 1:00-1:45 h after the start (the monitor's is at 3 h)
        write_forecast(db, RunIn(sid, model.id, T0 - timedelta(minutes=5), 6 * 3600, 900),
                       pd.DataFrame({"t": t, "p10": m * base_kw * 0.9, "p50": m * base_kw,
                                     "p90": m * base_kw * 1.1}))
        s = loop.run_replan(T0)
        assert s["status"] == "planned" and s["load_forecast"]["source"] == "forecast", s
        p = loop.last_replan_result.schedule
        bat = p.p_kw[:, len(p.fleet.pv):].sum(axis=1)
        assert bat[4:7].mean() < -100.0 and bat[4:7].mean() < bat[12] - 50.0, bat
        assert s["peak_after_kw"] < s["peak_before_kw"] - 50.0
    finally:
        loop.close()
