"""Monitoring on both backends (SQLite, real PostgreSQL): state estimate of the bundled IEEE 13
feeder from AMI voltages and head SCADA written to the store, DER availability, alarms raised
and cleared, the background loop with a topology change, and the API routes.

Truth: a separate OpenDSS engine of the same feeder, controls frozen at the base case, every
load's P and Q × U(0.8, 1.2) (seeded); meters read the true node voltages + 0.3 % Gaussian
noise, the head meter the true per-phase P/Q + 0.5 %.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from derms.api.app import create_app
from derms.api.auth import new_token
from derms.config import get_settings
from derms.grid.bundled import resolve_master
from derms.monitoring import (
    AvailabilityThresholds,
    FeederMonitor,
    MonitorConfig,
    MonitorLoop,
    classify_availability,
    head_meter_id,
    model_path_of,
)
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from derms.store.db import make_engine, make_session_factory
from derms.store.models import (
    Alarm,
    ApiToken,
    DerDevice,
    DerSite,
    DerType,
    DeviceStatus,
    Feeder,
    FeederModelVersion,
    Meter,
    Phase,
    SwitchState,
    TopologyEvent,
)
from derms.store.timeseries import write_readings

MASTER = resolve_master("ieee13")
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
# meter -> (bus, phase); "nobus" has neither and must be skipped
METERS = {"m634": ("634", Phase.ABC), "m611": ("611", Phase.C), "m652": ("652", Phase.A),
          "m675": ("675", Phase.ABC), "m646": ("646", Phase.B), "m680": ("680", Phase.ABC),
          "nobus": (None, None)}
PHASE_NODES = {Phase.A: [1], Phase.B: [2], Phase.C: [3], Phase.ABC: [1, 2, 3]}
# measured over 8 seeds: largest node error 0.003-0.007 pu (mean over nodes ≈ 0.001 pu) at
# 0.3 % meter noise; noise-limited at metered nodes with one meter each
V_TOL_PU = 0.01


class Truth:
    """OpenDSS truth of the feeder with scaled loads (controls frozen at the base case)."""

    def __init__(self) -> None:
        self.engine = OpenDSSEngine(MASTER, SolveSettings(tolerance=1e-8))
        self.engine.solve_snapshot()
        self.engine.set_control_mode("off")
        loads = self.engine.circuit.Loads
        self.base = []
        for i in range(len(loads.AllNames)):
            loads.idx = i + 1
            self.base.append((loads.kW, loads.kvar))
        self.base = np.array(self.base)

    def solve(self, scale: np.ndarray) -> None:
        loads = self.engine.circuit.Loads
        for i, (p, q) in enumerate(self.base * scale[:, None]):
            loads.idx = i + 1
            loads.kW, loads.kvar = float(p), float(q)
        self.engine.solve_snapshot()

    def v(self) -> dict[str, float]:
        return dict(zip(self.engine.node_names(), self.engine.node_voltages_pu()))

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.engine.circuit
        c.SetActiveElement("vsource.source")
        pw = np.asarray(c.ActiveCktElement.Powers)[:6]
        return -pw[0::2], -pw[1::2]

    def close(self) -> None:
        self.engine.close()


def telemetry(fid: str, truth: Truth, t: datetime, rng, *, meters=None) -> pd.DataFrame:
    """Meter voltages (v_pu; m680 as v_v) and head P/Q per phase at ``t``."""
    v = truth.v()
    rows = []
    for m, (bus, phase) in METERS.items():
        if bus is None or (meters is not None and m not in meters):
            continue
        for k in PHASE_NODES[phase]:  # multi-phase meters: one reading per phase
            val = v[f"{bus}.{k}"] * (1 + 0.003 * rng.standard_normal())
            ph = "" if len(PHASE_NODES[phase]) == 1 else f"_{'abc'[k - 1]}"
            if m == "m680":  # volts, line-to-neutral of the 4.16 kV primary
                rows.append((m, f"v{ph}_v", val * 4160 / np.sqrt(3)))
            else:
                rows.append((m, f"v{ph}_pu", val))
    rows.append(("nobus", "v_pu", 1.0))
    p, q = truth.head()
    for k, ph in enumerate("abc"):
        rows.append((head_meter_id(fid), f"p_{ph}_kw", p[k] * (1 + 0.005 * rng.standard_normal())))
        rows.append((head_meter_id(fid), f"q_{ph}_kvar", q[k] * (1 + 0.005 * rng.standard_normal())))
    return pd.DataFrame({"meter_id": [r[0] for r in rows], "quantity": [r[1] for r in rows],
                         "value": [float(r[2]) for r in rows],
                         "t": pd.Series([t] * len(rows), dtype=object), "source": "ami"})


def device_reading(der_id: str, p_kw: float, t: datetime) -> pd.DataFrame:
    return pd.DataFrame({"der_id": [der_id], "quantity": ["p_kw"], "value": [p_kw],
                         "t": pd.Series([t], dtype=object)})


@pytest.fixture
def feeder(db_url):
    """A registered IEEE 13 feeder with meters (unique ids per test) and three DER devices."""
    fid = f"f13-{uuid.uuid4().hex[:6]}"
    db = make_engine(db_url)
    with make_session_factory(db).begin() as s:
        s.add(Feeder(feeder_id=fid, name="IEEE 13"))
        s.flush()
        s.add(FeederModelVersion(feeder_id=fid, version=1, source_uri=str(MASTER),
                                 valid_from=T0 - timedelta(days=1)))
        for m, (bus, phase) in METERS.items():
            s.add(Meter(meter_id=f"{fid}-{m}", feeder_id=fid, bus=bus, phase=phase))
        s.add(Meter(meter_id=head_meter_id(fid), feeder_id=fid, bus="650", phase=Phase.ABC))
        s.add(DerSite(site_id=f"{fid}-site", feeder_id=fid, bus="675"))
        s.flush()
        for name, kind, gen, chg in (("pv", DerType.PV, 5.0, 0.0),
                                     ("bat", DerType.BATTERY, 5.0, 5.0),
                                     ("ev", DerType.EV_CHARGER, 0.0, 7.0)):
            s.add(DerDevice(der_id=f"{fid}-{name}", site_id=f"{fid}-site", der_type=kind,
                            p_gen_max_kw=gen, p_charge_max_kw=chg, s_max_kva=max(gen, chg),
                            status=DeviceStatus.ACTIVE))
    # meter ids in the store are prefixed with the feeder id
    yield fid, db
    db.dispose()


def _prefixed(frame: pd.DataFrame, fid: str) -> pd.DataFrame:
    head = head_meter_id(fid)
    return frame.assign(meter_id=[m if m == head else f"{fid}-{m}" for m in frame["meter_id"]])


def _api(db, db_url: str, scope: str):
    """The API on ``db_url`` with a token of ``scope``: (app, client, auth header)."""
    app = create_app(get_settings(database_url=db_url))
    client = TestClient(app, raise_server_exceptions=False)
    text, rec = new_token(scope)
    with make_session_factory(db).begin() as s:
        s.add(ApiToken(token_id=rec.token_id, secret_sha256=rec.secret_sha256, scope=scope))
    return app, client, {"Authorization": f"Bearer {text}"}


def _open_alarms(db, fid: str) -> dict[tuple, Alarm]:
    with make_session_factory(db)() as s:
        rows = s.scalars(select(Alarm).where(Alarm.feeder_id == fid,
                                             Alarm.t_cleared.is_(None))).all()
    return {(a.kind, a.der_id, a.meter_id): a for a in rows}


def test_availability_classes_and_headroom():
    th = AvailabilityThresholds(expected_interval_s=60, stale_factor=2, offline_after_s=900)
    tab = classify_availability(
        ["pv", "bat", "ev", "off", "gone"], active=[True, True, True, False, True],
        p_gen_max_kw=[5, 5, 0, 5, 5], p_charge_max_kw=[0, 5, 7, 0, 0],
        age_s=[10, 10, 10, 10, np.nan], p_kw=[-3.0, 2.0, 7.0, -3.0, np.nan], thresholds=th)
    assert list(tab["state"]) == ["online", "online", "online", "offline", "offline"]
    # PV generating 3 kW (reads -3 kW import): 2 kW more, 3 kW less; battery charging 2 kW:
    # up to 5 kW generation (7 up), 3 kW more charging (3 down); EV at 7 kW: 7 up, 0 down
    np.testing.assert_allclose(tab["p_out_kw"], [3, -2, -7, 3, np.nan])
    np.testing.assert_allclose(tab["headroom_up_kw"], [2, 7, 7, 0, 0])
    np.testing.assert_allclose(tab["headroom_down_kw"], [3, 3, 0, 0, 0])
    ages = classify_availability(["a", "b", "c"], active=[True] * 3, p_gen_max_kw=[1] * 3,
                                 p_charge_max_kw=[0] * 3, age_s=[120, 121, 901],
                                 p_kw=[0, 0, 0], thresholds=th)
    assert list(ages["state"]) == ["online", "stale", "offline"]


def test_estimate_availability_alarms_and_api(feeder, db_url):
    fid, db = feeder
    rng = np.random.default_rng(7)
    truth = Truth()
    n_loads = len(truth.base)
    assert model_path_of(db, fid, T0) == MASTER.resolve()
    monitor = FeederMonitor(fid, model_path_of(db, fid, T0), db,
                            MonitorConfig(v_sigma_pu=0.003, head_sigma_frac=0.005))
    try:
        # -- 1. normal operation: estimate close to the truth ----------------------------
        truth.solve(rng.uniform(0.8, 1.2, n_loads))
        now = T0
        write_readings(db, _prefixed(telemetry(fid, truth, now - timedelta(seconds=30), rng), fid))
        write_readings(db, device_reading(f"{fid}-pv", -3.0, now - timedelta(seconds=20)))
        write_readings(db, device_reading(f"{fid}-bat", 1.0, now - timedelta(minutes=10)))
        state = monitor.run_once(now)
        v_true = truth.v()
        live = [i for i, s in enumerate(state.node_names) if int(s.split(".")[1]) <= 3]
        err = max(abs(state.v_pu[i] - v_true[state.node_names[i]]) for i in live)
        assert err < V_TOL_PU, err
        est = state.estimation
        assert est["method"] == "wls" and est["converged"] and est["n_head"] == 3
        assert est["n_voltage"] == 3 + 1 + 1 + 3 + 1 + 3  # per node; "nobus" skipped
        assert any("nobus" in n for n in state.notes)
        assert state.v_min_pu > 0.95
        av = state.availability.set_index("der_id")
        assert av.loc[f"{fid}-pv", "state"] == "online"
        assert av.loc[f"{fid}-pv", "headroom_up_kw"] == pytest.approx(2.0)
        assert av.loc[f"{fid}-pv", "headroom_down_kw"] == pytest.approx(3.0)
        assert av.loc[f"{fid}-bat", "state"] == "stale"
        assert av.loc[f"{fid}-ev", "state"] == "offline"
        alarms = _open_alarms(db, fid)
        assert ("telemetry_stale", f"{fid}-bat", None) in alarms
        assert ("telemetry_stale", f"{fid}-ev", None) in alarms
        assert ("telemetry_stale", f"{fid}-pv", None) not in alarms
        assert not [k for k in alarms if k[0].startswith("undervoltage:")]
        # the IEEE 13 regulator bus sits at 1.056 pu in its base case: an absolute limit
        assert ("overvoltage:rg60.1", None, None) in alarms
        n_open = len(alarms)
        assert monitor.run_once(now).alarms["raised"] == []  # no duplicates
        assert len(_open_alarms(db, fid)) == n_open

        # -- 2. heavy load: undervoltage; one meter silent → stale ------------------------
        truth.solve(np.full(n_loads, 1.6))
        now2 = T0 + timedelta(minutes=20)
        silent = {"m652"}
        write_readings(db, _prefixed(telemetry(fid, truth, now2 - timedelta(seconds=30), rng,
                                               meters=set(METERS) - silent), fid))
        for d in ("pv", "bat", "ev"):
            write_readings(db, device_reading(f"{fid}-{d}", -1.0, now2 - timedelta(seconds=5)))
        state2 = monitor.run_once(now2)
        assert state2.v_min_pu < 0.95
        v_true2 = truth.v()
        err2 = max(abs(state2.v_pu[i] - v_true2[state2.node_names[i]]) for i in live)
        assert err2 < V_TOL_PU, err2
        alarms2 = _open_alarms(db, fid)
        under = [k for k in alarms2 if k[0].startswith("undervoltage:")]
        assert under and ("telemetry_stale", None, f"{fid}-m652") in alarms2
        assert ("telemetry_stale", f"{fid}-bat", None) not in alarms2  # fresh again → cleared
        assert set(state2.availability["state"]) == {"online"}

        # -- 3. back to normal: undervoltage and meter alarms clear ----------------------
        truth.solve(np.ones(n_loads))
        now3 = T0 + timedelta(minutes=40)
        write_readings(db, _prefixed(telemetry(fid, truth, now3 - timedelta(seconds=30), rng), fid))
        for d in ("pv", "bat", "ev"):
            write_readings(db, device_reading(f"{fid}-{d}", 2.0, now3 - timedelta(seconds=5)))
        state3 = monitor.run_once(now3)
        alarms3 = _open_alarms(db, fid)
        assert not [k for k in alarms3 if k[0].startswith("undervoltage:")]
        assert not [k for k in alarms3 if k[0] == "telemetry_stale"]
        with make_session_factory(db)() as s:
            cleared = s.scalars(select(Alarm).where(Alarm.feeder_id == fid,
                                                    Alarm.kind.startswith("undervoltage:"))).all()
        assert cleared and all(a.t_cleared == now3 for a in cleared)

        # -- 4. the API ------------------------------------------------------------------
        app, client, hdr = _api(db, db_url, "read")
        app.state.monitor = None
        assert client.get(f"/v1/feeders/{fid}/state", headers=hdr).status_code == 503
        loop = MonitorLoop({fid: monitor}, clock=lambda: now3)
        app.state.monitor = loop
        r = client.get(f"/v1/feeders/{fid}/state", headers=hdr)
        assert r.status_code == 404 and "no state computed yet" in r.json()["detail"]
        loop.run_feeder(fid)
        r = client.get(f"/v1/feeders/{fid}/state", headers=hdr)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["feeder_id"] == fid and body["t"] == now3.isoformat()
        assert body["voltage"]["v_min_pu"] == pytest.approx(state3.v_min_pu, abs=1e-9)
        assert len(body["nodes"]["v_pu"]) == len(state3.node_names)
        assert body["availability"]["summary"]["n_online"] == 3
        assert body["estimation"]["method"] == "wls"
        assert client.get(f"/v1/feeders/{fid}/state").status_code == 401
        r = client.get("/v1/feeders/nosuch/state", headers=hdr)
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        page = client.get(f"/v1/alarms?open=true&feeder_id={fid}&limit=2", headers=hdr).json()
        assert page["total"] == len(alarms3) and len(page["items"]) == min(2, len(alarms3))
        assert all(a["t_cleared"] is None for a in page["items"])
        closed = client.get(f"/v1/alarms?open=false&feeder_id={fid}", headers=hdr).json()
        assert closed["total"] >= 1 and all(a["t_cleared"] for a in closed["items"])
        page2 = client.get(f"/v1/alarms?open=true&feeder_id={fid}&limit=2&offset=2",
                           headers=hdr).json()
        ids = {a["id"] for a in page["items"]} | {a["id"] for a in page2["items"]}
        assert len(ids) == min(4, len(alarms3))
    finally:
        monitor.close()
        truth.close()


@pytest.mark.slow  # known issue: a dss-python context created on a second thread of a process
# segfaults in NewContext (here the loop's thread, after other tests used the main thread);
# kept out of CI until the monitoring cycle runs in its own process
def test_loop_runs_and_reacts_to_topology(feeder):
    fid, db = feeder
    truth = Truth()
    rng = np.random.default_rng(1)
    truth.solve(np.ones(len(truth.base)))
    write_readings(db, _prefixed(telemetry(fid, truth, T0 - timedelta(seconds=30), rng), fid))
    # the factory builds the monitor (its OpenDSS engine) on the loop's own thread
    loop = MonitorLoop(period_s=3600, clock=lambda: T0,
                       factory=lambda: {fid: FeederMonitor(fid, MASTER, db)})
    try:
        loop.start()
        assert loop.wait_for_runs(fid, 1, timeout=120)
        first = loop.latest(fid)
        assert first is not None and first.topology == {}
        with make_session_factory(db).begin() as s:
            s.add(TopologyEvent(feeder_id=fid, switch="671692", state=SwitchState.OPEN,
                                t=T0 - timedelta(seconds=1)))
        loop.notify_topology_change(fid)
        assert loop.wait_for_runs(fid, 2, timeout=120)
        second = loop.latest(fid)
        assert loop.last_error(fid) is None
        assert second.topology == {"671692": "open"}
        dead = dict(zip(second.node_names, second.v_pu))
        assert dead["675.1"] < 0.1 and dead["692.1"] < 0.1  # downstream of the open switch
        assert any("m675" in n for n in second.notes)  # its meter skipped (de-energised)
    finally:
        loop.close()
        truth.close()


def test_without_telemetry_power_flow_of_pseudo_measurements(feeder):
    fid, db = feeder
    monitor = FeederMonitor(fid, MASTER, db, MonitorConfig(load_multiplier=lambda t: 0.5))
    try:
        state = monitor.run_once(T0)
        assert state.estimation["method"] == "pseudo_power_flow"
        assert state.estimation["load_multiplier"] == 0.5
        assert set(state.availability["state"]) == {"offline"}
        assert state.v_min_pu > 0.95
        alarms = _open_alarms(db, fid)
        assert {k[1] for k in alarms if k[0] == "telemetry_stale"} == {
            f"{fid}-pv", f"{fid}-bat", f"{fid}-ev"}
    finally:
        monitor.close()


def test_monitor_process_runs_and_reacts_to_topology(feeder, db_url):
    """What `derms serve --monitor-period-s` runs: the cycle in a child process (its engines
    never touch the server's threads), results pumped back; a topology notice re-runs."""
    from derms.monitoring.process import MonitorProcess

    fid, db = feeder
    proc = MonitorProcess(db.url.render_as_string(hide_password=False), period_s=3600)
    try:
        proc.start()
        assert proc.wait_for_runs(fid, 1, timeout=180), proc.last_error(fid)
        first = proc.latest(fid)
        assert first is not None and first.topology == {}
        assert fid in proc.monitors
        with make_session_factory(db).begin() as s:
            s.add(TopologyEvent(feeder_id=fid, switch="671692", state=SwitchState.OPEN,
                                t=first.t - timedelta(seconds=1)))
        proc.notify_topology_change(fid)
        assert proc.wait_for_runs(fid, 2, timeout=180)
        second = proc.latest(fid)
        assert second.topology == {"671692": "open"}
        dead = dict(zip(second.node_names, second.v_pu))
        assert dead["675.1"] < 0.1 and dead["692.1"] < 0.1
    finally:
        proc.close()
    assert not proc.alive


def test_a_feeder_registered_while_serving_is_monitored(feeder, db_url, tmp_path):
    """There was no way to register a feeder's model but writing to the database, and the
    monitoring child built its monitors once, at start: a feeder added later was never
    monitored until a restart. POST /v1/feeders/{id}/models registers a version and the
    running cycle picks it up."""
    from derms.monitoring.process import MonitorProcess

    fid, db = feeder
    proc = MonitorProcess(db.url.render_as_string(hide_password=False), period_s=3600)
    app, client, hdr = _api(db, db_url, "admin")
    fid2 = f"f13b-{uuid.uuid4().hex[:6]}"
    try:
        proc.start()
        app.state.monitor = proc
        assert proc.wait_for_runs(fid, 1, timeout=180), proc.last_error(fid)
        assert client.post("/v1/feeders", headers=hdr, json={"feeder_id": fid2}).status_code == 201
        r = client.post(f"/v1/feeders/{fid2}/models", headers=hdr, json={"source_uri": "ieee13"})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and len(r.json()["sha256"]) == 64
        assert proc.wait_for_runs(fid2, 1, timeout=180), proc.last_error(fid2)
        assert proc.latest(fid2) is not None
        r = client.post(f"/v1/feeders/{fid2}/models", headers=hdr,
                        json={"source_uri": str(MASTER)})
        assert r.status_code == 201 and r.json()["version"] == 2
        # the same file registered again (edited in place, say) is a new version: the
        # running cycle builds a new monitor for it and runs it
        assert proc.wait_for_runs(fid2, 2, timeout=180), proc.last_error(fid2)
        items = client.get(f"/v1/feeders/{fid2}/models", headers=hdr).json()["items"]
        assert [v["version"] for v in items] == [1, 2]
        assert client.post("/v1/feeders/nosuch/models", headers=hdr,
                           json={"source_uri": "ieee13"}).status_code == 404
        r = client.post(f"/v1/feeders/{fid2}/models", headers=hdr,
                        json={"source_uri": "/no/such/Master.dss"})
        assert r.status_code == 422 and "not found" in r.json()["detail"]
        # a file that is no OpenDSS model was registered (201) and the monitor only
        # logged the compile error (found by an independent test): now 422, not stored
        bad = tmp_path / "Master.dss"
        bad.write_text("New Circuit.x basekv=12.47\nNew Line.l1 bus1=a bus2=b linecode=nosuch\n")
        r = client.post(f"/v1/feeders/{fid2}/models", headers=hdr,
                        json={"source_uri": str(bad)})
        assert r.status_code == 422, r.text
        assert "not a usable OpenDSS model" in r.json()["detail"]
        assert r.json()["errors"][0]["field"] == "body.source_uri"
        # a master that redirects to itself crashes the engine (segfault): checked in a
        # child process, it is a 422 about the file (it was a 503 at every retry)
        loop_dir = tmp_path / "loop"
        loop_dir.mkdir()
        (loop_dir / "Master.dss").write_text("Clear\nRedirect Master.dss\n")
        r = client.post(f"/v1/feeders/{fid2}/models", headers=hdr,
                        json={"source_uri": str(loop_dir / "Master.dss")})
        assert r.status_code == 422, r.text
        items = client.get(f"/v1/feeders/{fid2}/models", headers=hdr).json()["items"]
        assert [v["version"] for v in items] == [1, 2]
    finally:
        proc.close()


def test_ami_power_measures_the_single_load_at_the_meter_bus(feeder):
    """AMI p_kw/q_kvar at bus 611 (one load) and 652 (one load) pull those loads to the
    metered values; at 675 (three loads) the reading is ambiguous and not used. Truth: 611
    and 652 at 1.6 x their base, the rest at base; pseudo-measurements at base."""
    fid, db = feeder
    truth = Truth()
    names = [s.lower() for s in truth.engine.circuit.Loads.AllNames]
    scale = np.ones(len(names))
    scale[names.index("611")] = scale[names.index("652")] = 1.6
    truth.solve(scale)
    rows = []
    for m, load in (("m611", "611"), ("m652", "652"), ("m675", "675a")):
        p, q = truth.base[names.index(load)] * scale[names.index(load)]
        rows += [(f"{fid}-{m}", "p_kw", p), (f"{fid}-{m}", "q_kvar", q)]
    p, q = truth.head()
    for k, ph in enumerate("abc"):  # head SCADA too, as in the field
        rows += [(head_meter_id(fid), f"p_{ph}_kw", p[k]), (head_meter_id(fid), f"q_{ph}_kvar", q[k])]
    t = T0 - timedelta(seconds=60)
    write_readings(db, pd.DataFrame({
        "meter_id": [r[0] for r in rows], "quantity": [r[1] for r in rows],
        "value": [float(r[2]) for r in rows], "t": pd.Series([t] * len(rows), dtype=object),
        "source": "ami"}))
    v_true = truth.v()
    truth.close()
    # the truth's taps are frozen at the base case, so are the monitors' (the comparison is
    # of the AMI power rows alone; with only head and AMI power rows the chi-square cannot
    # tell tap positions apart)
    with_ami = FeederMonitor(fid, MASTER, db, MonitorConfig(alarms=False, settle_controls=0))
    without = FeederMonitor(fid, MASTER, db, MonitorConfig(alarms=False, ami_p_sigma_frac=1e3,
                                                           ami_p_sigma_min_kw=1e6,
                                                           settle_controls=0))
    try:
        st = with_ami.run_once(T0)
        st0 = without.run_once(T0)
    finally:
        with_ami.close()
        without.close()
    assert st.estimation["n_ami_p"] == 2 and st.estimation["n_ami_q"] == 2
    # IEEE 13 with AMI power rows: the pseudo sigmas are used as given, and the state says so
    assert st.estimation["prior_scale"] == 1.0 and st.estimation["prior_scale_snapshots"] == 0
    assert len(st.estimation["load_level"]) == 2  # the pseudo-loads' level fitted to the head
    assert any("prior_scale auto needs" in n for n in st.estimation["estimator_notes"])
    assert any("AMI power not used" in n and f"{fid}-m675" in n for n in st.notes)
    err = {n: abs(v - v_true[n]) for n, v in zip(st.node_names, st.v_pu)}
    err0 = {n: abs(v - v_true[n]) for n, v in zip(st0.node_names, st0.v_pu)}
    assert err["611.3"] < 0.25 * err0["611.3"] and err["611.3"] < 0.002
    assert err["652.1"] < 0.25 * err0["652.1"]


def _tight_monitor(fid: str, db) -> FeederMonitor:
    """A monitor with the telemetry's own noise (AMI 0.3 %, head 0.5 %)."""
    return FeederMonitor(fid, MASTER, db, MonitorConfig(v_sigma_pu=0.003, head_sigma_frac=0.005))


def test_estimates_keep_working_after_a_switch_opens_and_closes(feeder):
    """A switch that de-energises part of the feeder: the loads there have no voltage, and
    their current injections (dS / V) were 0/0 = NaN in the Jacobian; the NaN loads were
    written into the engine and every later estimate failed, even after the switch closed
    (found on IEEE 34 and 13 through `derms serve`). Each run now estimates, the dead loads
    have no effect, and the voltages match a truth with the same switch state."""
    fid, db = feeder
    rng = np.random.default_rng(3)
    truth = Truth()
    monitor = _tight_monitor(fid, db)
    try:
        scale = rng.uniform(0.8, 1.2, len(truth.base))
        for k, state_ in enumerate(("open", "open", "open", "closed", "closed")):
            now = T0 + timedelta(minutes=k)
            verb = "open" if state_ == "open" else "close"
            truth.engine.command(f"{verb} line.671692 term=1")
            truth.solve(scale)
            with make_session_factory(db).begin() as s:
                s.add(TopologyEvent(feeder_id=fid, switch="671692", state=SwitchState(state_),
                                    t=now - timedelta(seconds=5)))
            live = {m: b for m, b in METERS.items()
                    if not (state_ == "open" and m == "m675")}
            write_readings(db, _prefixed(telemetry(fid, truth, now - timedelta(seconds=2), rng,
                                                   meters=live), fid))
            st = monitor.run_once(now)
            assert st.estimation["method"] == "wls" and st.estimation["converged"], (k, st.notes)
            assert np.isfinite(st.v_pu).all()
            v_true = truth.v()
            err = max(abs(v - v_true[n]) for n, v in zip(st.node_names, st.v_pu)
                      if v_true[n] > 0.1)
            assert err < V_TOL_PU, (k, state_, err)
            dead = dict(zip(st.node_names, st.v_pu))["692.1"]
            assert (dead < 0.1) == (state_ == "open")
            # the fixture's DERs sit at 675, behind the switch: no headroom while it is
            # open, whatever their telemetry (they read "online" with headroom before)
            av = st.availability
            assert (~av["energised"]).all() == (state_ == "open"), av
            if state_ == "open":
                assert (av["headroom_up_kw"] == 0).all() and (av["headroom_down_kw"] == 0).all()
    finally:
        monitor.close()
        truth.close()


def test_closing_a_tie_the_model_leaves_disabled_energises_it(feeder, tmp_path):
    """ckt7's tie line.175012 is disabled in the model: an ADMS "closed" was reported as
    closed and the line stayed out of the circuit (independent test). Here IEEE 13 with
    line 671692 disabled: 692 is dead until the switch is reported closed."""
    fid, db = feeder
    master = tmp_path / "Master.dss"
    master.write_text(f"Redirect {MASTER}\nDisable Line.671692\n")
    monitor = FeederMonitor(fid, master, db)
    try:
        st = monitor.run_once(T0)
        assert dict(zip(st.node_names, st.v_pu))["692.1"] < 0.1
        with make_session_factory(db).begin() as s:
            s.add(TopologyEvent(feeder_id=fid, switch="671692", state=SwitchState.CLOSED,
                                t=T0 + timedelta(seconds=5)))
        st = monitor.run_once(T0 + timedelta(minutes=1))
        assert st.topology == {"671692": "closed"}
        assert dict(zip(st.node_names, st.v_pu))["692.1"] > 0.9, st.notes
    finally:
        monitor.close()


def test_a_switch_the_model_does_not_have_raises_an_alarm(feeder):
    """An ADMS switching of an element the model does not have was accepted (201) and only
    noted in the state (independent test): it is an alarm until the model takes it."""
    fid, db = feeder
    monitor = FeederMonitor(fid, MASTER, db)
    try:
        with make_session_factory(db).begin() as s:
            s.add(TopologyEvent(feeder_id=fid, switch="nosuchswitch", state=SwitchState.OPEN,
                                t=T0 - timedelta(seconds=5)))
        st = monitor.run_once(T0)
        assert any("nosuchswitch" in n and "not applied" in n for n in st.notes)
        with make_session_factory(db)() as s:
            kinds = [a.kind for a in s.scalars(select(Alarm).where(
                Alarm.feeder_id == fid, Alarm.t_cleared.is_(None)))]
        assert "topology_not_applied:nosuchswitch" in kinds, kinds
        # the next run keeps that one alarm open: the kind was not the monitor's own, so
        # every run raised another one and none was ever cleared
        monitor.run_once(T0 + timedelta(minutes=1))
        with make_session_factory(db)() as s:
            kinds = [a.kind for a in s.scalars(select(Alarm).where(
                Alarm.feeder_id == fid, Alarm.t_cleared.is_(None)))]
        assert kinds.count("topology_not_applied:nosuchswitch") == 1, kinds
    finally:
        monitor.close()


def test_a_failed_estimate_is_said_and_a_failed_run_is_not_served_as_fresh(feeder, db_url,
                                                                          monkeypatch):
    """When the estimator fails, the run still computes availability and alarms (from the
    pseudo-measurements, which the alarm messages say) and raises ``estimation_failed``;
    the next good run clears it. When a whole run fails, the API marks the last good state
    ``stale`` with the error (it used to serve it as if current). Open alarms carry the
    present value, not the one they were raised with; the state lists every conductor's
    loading."""
    import derms.monitoring.feeder_monitor as fm
    from derms.errors import ConvergenceError

    fid, db = feeder
    rng = np.random.default_rng(5)
    truth = Truth()
    monitor = _tight_monitor(fid, db)
    real = fm.estimate_state

    def broken(*a, **k):
        raise ConvergenceError("power flow did not converge after 100 iterations")
    try:
        truth.solve(np.full(len(truth.base), 1.6))         # heavy: undervoltage alarms
        write_readings(db, _prefixed(telemetry(fid, truth, T0 - timedelta(seconds=5), rng), fid))
        monkeypatch.setattr(fm, "estimate_state", broken)
        st = monitor.run_once(T0)
        assert st.estimation["method"] == "pseudo_power_flow"
        assert not st.estimation["converged"] and "converge" in st.estimation["estimation_error"]
        alarms = _open_alarms(db, fid)
        assert ("estimation_failed", None, None) in alarms
        model_only = [a for k, a in alarms.items() if k[0].startswith(("under", "over", "therm"))]
        assert all("model only" in a.message for a in model_only)
        monkeypatch.setattr(fm, "estimate_state", real)
        t1 = T0 + timedelta(minutes=1)
        write_readings(db, _prefixed(telemetry(fid, truth, t1 - timedelta(seconds=5), rng), fid))
        st1 = monitor.run_once(t1)
        assert st1.estimation["method"] == "wls"
        alarms = _open_alarms(db, fid)
        assert ("estimation_failed", None, None) not in alarms
        under = [a for k, a in alarms.items() if k[0].startswith("undervoltage:")]
        assert under and not any("model only" in a.message for a in under)
        # -- a whole run fails: the API says the state it serves is stale -----------------
        app, client, hdr = _api(db, db_url, "read")
        clock = {"t": t1}
        loop = MonitorLoop({fid: monitor}, clock=lambda: clock["t"])
        app.state.monitor = loop
        loop.run_feeder(fid)
        body = client.get(f"/v1/feeders/{fid}/state", headers=hdr).json()
        assert body["stale"] is False and "last_error" not in body
        names, pct = body["branches"]["branch"], body["branches"]["loading_pct"]
        assert len(names) == len(pct) == len(st1.branch_names)
        assert max(p for p in pct if p is not None) == pytest.approx(
            body["branch_loading"]["max_pct"])
        monkeypatch.setattr(monitor, "run_once", lambda now: (_ for _ in ()).throw(
            ConvergenceError("engine gone")))
        clock["t"] = t1 + timedelta(minutes=1)
        loop.run_feeder(fid)
        body = client.get(f"/v1/feeders/{fid}/state", headers=hdr).json()
        assert body["stale"] is True and body["t"] == t1.isoformat()
        assert "engine gone" in body["last_error"]["error"]
    finally:
        monitor.close()
        truth.close()


def _truth_with_regulators_acting(rng):
    """The IEEE 13 truth at loads 1.3-1.6 x base with its regulators acting: (truth, the
    regulated transformers, their taps)."""
    from derms.powerflow.control_state import capture_control_state, regulated_transformers

    truth = Truth()
    truth.engine.set_control_mode("static")
    truth.solve(rng.uniform(1.3, 1.6, len(truth.base)))
    regs = regulated_transformers(truth.engine)
    return truth, regs, capture_control_state(truth.engine, regs)


def test_regulators_that_moved_are_followed(feeder):
    """The truth's regulators act (as a feeder's do) at loads 1.3-1.6 x base; the model's
    taps start frozen at the base case. With the taps settled at the estimated loads and
    the estimate repeated there, the largest error is well below the frozen-tap one
    (measured 2026-11-26: 0.033 pu frozen, 0.0062 pu settled) and the taps the monitor
    ends with are within a step of the truth's (a regulator's band lets either stand)."""
    from derms.powerflow.control_state import capture_control_state

    fid, db = feeder
    rng = np.random.default_rng(11)
    truth, regs, taps_true = _truth_with_regulators_acting(rng)
    v_true = truth.v()
    write_readings(db, _prefixed(telemetry(fid, truth, T0 - timedelta(seconds=5), rng), fid))
    errs = {}
    try:
        for settle in (0, 3):
            mon = FeederMonitor(fid, MASTER, db, MonitorConfig(
                v_sigma_pu=0.003, head_sigma_frac=0.005, settle_controls=settle, alarms=False))
            try:
                assert capture_control_state(mon.engine, regs) != taps_true  # base-case taps
                st = mon.run_once(T0)
                errs[settle] = max(abs(v - v_true[n]) for n, v in zip(st.node_names, st.v_pu)
                                   if v_true[n] > 0.1)
                if settle:
                    assert any("re-estimated" in n for n in st.notes), (st.notes, errs)
                    got = {(t, w): v for t, w, v in
                               capture_control_state(mon.engine, regs).taps}
                    for t, w, v in taps_true.taps:  # within a step (the band's hysteresis)
                        assert abs(got[(t, w)] - v) <= 0.00625 + 1e-9, (t, got, taps_true)
            finally:
                mon.close()
    finally:
        truth.close()
    assert errs[3] < 0.5 * errs[0] and errs[3] < V_TOL_PU, errs


def test_regulator_taps_from_scada_are_used(feeder):
    """Tap telemetry (quantity ``tap_pu`` of meter ``<feeder>-reg-<regcontrol>``): the
    model's regulators take the telemetered taps, nothing settles, and the estimate is as
    good as with the taps known (truth's regulators acting at 1.3-1.6 x load)."""
    from derms.powerflow.control_state import capture_control_state

    fid, db = feeder
    rng = np.random.default_rng(11)
    truth, regs, taps_true = _truth_with_regulators_acting(rng)
    rc, tr = truth.engine.circuit.RegControls, truth.engine.circuit.Transformers
    rows, k = [], rc.First
    while k > 0:
        tr.Name = rc.Transformer
        tr.Wdg = rc.Winding
        rows.append((f"{fid}-reg-{rc.Name.lower()}", float(tr.Tap)))
        k = rc.Next
    with make_session_factory(db).begin() as s:
        for m, _ in rows:
            s.add(Meter(meter_id=m, feeder_id=fid))
    t = T0 - timedelta(seconds=5)
    write_readings(db, pd.DataFrame({"meter_id": [r[0] for r in rows], "quantity": "tap_pu",
                                     "value": [r[1] for r in rows],
                                     "t": pd.Series([t] * len(rows), dtype=object),
                                     "source": "scada"}))
    v_true = truth.v()
    write_readings(db, _prefixed(telemetry(fid, truth, t, rng), fid))
    mon = FeederMonitor(fid, MASTER, db, MonitorConfig(v_sigma_pu=0.003, head_sigma_frac=0.005,
                                                       alarms=False))
    try:
        st = mon.run_once(T0)
        assert capture_control_state(mon.engine, regs) == taps_true
        assert any("taps from telemetry: 3 of 3" in n for n in st.notes), st.notes
        assert not any("re-estimated" in n for n in st.notes)
        assert not any("reg-" in n for n in st.notes if "skipped" in n)  # not voltage meters
        err = max(abs(v - v_true[n]) for n, v in zip(st.node_names, st.v_pu) if v_true[n] > 0.1)
        assert err < 0.006, err
    finally:
        mon.close()
        truth.close()


def test_a_failed_settling_keeps_the_estimate_in_hand(feeder, monkeypatch):
    """Settling the controls can fail (too many control iterations with interacting
    regulators and capacitors): that used to throw the converged estimate away and leave
    the taps where the failed solve put them; the estimate stands and the taps go back."""
    from derms.errors import ConvergenceError
    from derms.powerflow.control_state import capture_control_state

    fid, db = feeder
    rng = np.random.default_rng(2)
    truth = Truth()
    truth.solve(rng.uniform(0.8, 1.2, len(truth.base)))
    write_readings(db, _prefixed(telemetry(fid, truth, T0 - timedelta(seconds=5), rng), fid))
    mon = FeederMonitor(fid, MASTER, db, MonitorConfig(v_sigma_pu=0.003, alarms=False))

    def failing(est, taps=None):
        mon.engine.circuit.Transformers.Name = mon._regulated[0]
        mon.engine.circuit.Transformers.Wdg = 2
        mon.engine.circuit.Transformers.Tap = 1.1          # half-way through, then fails
        raise ConvergenceError("max control iterations exceeded")
    try:
        before = capture_control_state(mon.engine, mon._regulated)
        monkeypatch.setattr(mon, "_settle_controls", failing)
        st = mon.run_once(T0)
        assert st.estimation["method"] == "wls" and st.estimation["converged"]
        assert capture_control_state(mon.engine, mon._regulated) == before
    finally:
        mon.close()
        truth.close()


def test_branches_near_their_rating_get_the_estimates_spread(feeder):
    """Branches estimated near their rating carry the estimate's posterior spread and the
    probability of being over it (IEEE 13's loads are mostly unmetered): reported in the
    state's estimation, with a note."""
    fid, db = feeder
    rng = np.random.default_rng(3)
    truth = Truth()
    truth.solve(rng.uniform(0.9, 1.1, len(truth.base)))
    write_readings(db, _prefixed(telemetry(fid, truth, T0 - timedelta(seconds=30), rng), fid))
    truth.close()
    wide = FeederMonitor(fid, MASTER, db, MonitorConfig(alarms=False, settle_controls=0,
                                                        possible_from_pct=1.0,
                                                        possible_probability=1e-9))
    off = FeederMonitor(fid, MASTER, db, MonitorConfig(alarms=False, settle_controls=0,
                                                       possible_from_pct=1e9))
    try:
        st, st_off = wide.run_once(T0), off.run_once(T0)
    finally:
        wide.close()
        off.close()
    rows = st.estimation["possible_overloads"]
    assert rows and all(r["sd_pct"] > 0 and 0 < r["probability"] <= 1 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r["probability"])
    assert any("may be over their limit" in n for n in st.notes)
    assert st_off.estimation["possible_overloads"] == []


@pytest.mark.parametrize("bad_value", [0.0, 1.3])
def test_a_gross_voltage_reading_is_left_out_of_the_estimate(feeder, bad_value):
    """One AMI meter reading 0 V (a blown service fuse, an outage's last gasp) or a far
    too high value on an energised node: the largest-normalised-residual test flagged it,
    yet the estimate that fitted it was served and drove the limit alarms (European LV
    feeder through `derms serve`: 0.0015 -> 0.0098 pu for one 0 V reading of 55; 0.41 pu
    and 1,713 alarms for one 120 pu reading). The reading is now left out and said so."""
    fid, db = feeder
    st, err = _estimate_with_a_bad_meter(fid, db, 11, 0.2, bad_value)
    assert err < V_TOL_PU, (bad_value, err, st.notes)
    assert any("bad data" in n and "652.1" in n for n in st.notes), st.notes


def _estimate_with_a_bad_meter(fid: str, db, seed: int, spread: float, bad_value: float):
    """One run of a tight monitor on a truth with loads x U(1 -/+ spread) whose meter m652
    reads ``bad_value``: (state, largest voltage error on energised nodes [pu])."""
    rng = np.random.default_rng(seed)
    truth = Truth()
    monitor = _tight_monitor(fid, db)
    try:
        truth.solve(rng.uniform(1 - spread, 1 + spread, len(truth.base)))
        now = T0 + timedelta(hours=3)
        frame = telemetry(fid, truth, now - timedelta(seconds=2), rng)
        frame.loc[frame["meter_id"] == "m652", "value"] = bad_value
        write_readings(db, _prefixed(frame, fid))
        st = monitor.run_once(now)
        v_true = truth.v()
        return st, max(abs(v - v_true[n]) for n, v in zip(st.node_names, st.v_pu)
                       if v_true[n] > 0.1)
    finally:
        monitor.close()
        truth.close()


@pytest.mark.parametrize(("seed", "bad_value"), [(7, 0.0), (5, 1.3)])
def test_bad_data_removal_restarts_from_the_controls_before_it(feeder, seed, bad_value):
    """Two ways the elimination served an estimate the bad reading made (review of
    `_estimate_without_bad_data`, loads 0.6-1.4 x base): seed 7, 0 V at 652: the estimate
    did not converge, so nothing was left out and it was served 0.38 pu off; seed 5,
    1.3 pu: the first estimate moved the regulators to fit the bad reading, the repeat
    started from there, left a good reading (634.1) out as well and was 0.042 pu off.
    Without the bad meter at all both are 0.005 pu off."""
    fid, db = feeder
    st, err = _estimate_with_a_bad_meter(fid, db, seed, 0.4, bad_value)
    assert err < V_TOL_PU, (err, st.notes)
    bad = [n for n in st.notes if n.startswith("bad data")]
    assert len(bad) == 1 and "652.1" in bad[0] and "634.1" not in bad[0], st.notes


def test_silent_head_scada_raises_a_stale_alarm(feeder):
    """The head meter's P/Q stopped while the AMI kept reporting: the estimate dropped its
    only power measurement without a word (no alarm, no note; IEEE 37 and the European LV
    feeder through `derms serve`), where a silent AMI meter gets a telemetry_stale alarm."""
    fid, db = feeder
    rng = np.random.default_rng(5)
    truth = Truth()
    monitor = _tight_monitor(fid, db)
    head = head_meter_id(fid)
    try:
        truth.solve(rng.uniform(0.8, 1.2, len(truth.base)))
        t1 = T0 + timedelta(hours=5)
        write_readings(db, _prefixed(telemetry(fid, truth, t1 - timedelta(seconds=2), rng), fid))
        st1 = monitor.run_once(t1)
        assert st1.estimation["n_head"] == 3
        assert ("telemetry_stale", None, head) not in _open_alarms(db, fid)
        t2 = t1 + timedelta(minutes=20)  # AMI fresh, head silent since t1
        frame = telemetry(fid, truth, t2 - timedelta(seconds=2), rng)
        write_readings(db, _prefixed(frame[frame["meter_id"] != head], fid))
        st2 = monitor.run_once(t2)
        assert st2.estimation["n_head"] == 0
        assert ("telemetry_stale", None, head) in _open_alarms(db, fid)
        assert any("head SCADA" in n for n in st2.notes), st2.notes
        t3 = t2 + timedelta(minutes=1)  # back: the alarm clears
        write_readings(db, _prefixed(telemetry(fid, truth, t3 - timedelta(seconds=2), rng), fid))
        monitor.run_once(t3)
        assert ("telemetry_stale", None, head) not in _open_alarms(db, fid)
    finally:
        monitor.close()
        truth.close()


def test_line_to_line_meters_on_an_ungrounded_feeder(db_url):
    """IEEE 37 is a 3-wire delta feeder: its node voltages are measured line to line. A
    meter registered with phase ``ab`` sending its one line-to-line value was skipped, and
    a ``v_v`` there was divided by the line-to-neutral base, sqrt 3 too high (independent
    test). Now both read what the node measures: the estimate matches the truth."""
    from derms.powerflow.collect import StepCollector, build_index
    from tests.conftest import shared_master

    master = shared_master("ieee37")
    with OpenDSSEngine(master) as eng:
        eng.solve_snapshot()
        ix = build_index(eng)
        col = StepCollector(eng, ix, 1)
        col.collect(0)
    v_true = col.v_pu[0]
    pos = {(b, int(p)): k for k, (b, p) in enumerate(zip(ix.node_bus, ix.node_phase))}
    buses = sorted({b for (b, p), k in pos.items()
                    if p == 1 and ix.v_pair[k] >= 0 and ix.v_pair[k] == pos.get((b, 2))})[:12]
    assert len(buses) == 12
    fid = f"f37-{uuid.uuid4().hex[:6]}"
    db = make_engine(db_url)
    rows = []
    with make_session_factory(db).begin() as s:
        s.add(Feeder(feeder_id=fid, name="IEEE 37"))
        s.flush()
        s.add(FeederModelVersion(feeder_id=fid, version=1, source_uri=str(master),
                                 valid_from=T0 - timedelta(days=1)))
        for k, b in enumerate(buses):
            s.add(Meter(meter_id=f"{fid}-m{k}", feeder_id=fid, bus=b, phase=Phase.AB))
            i = pos[(b, 1)]
            if k % 2:  # volts, line to line
                rows.append((f"{fid}-m{k}", "v_v",
                             v_true[i] * np.sqrt(3) * ix.node_kv_base_ln[i] * 1000))
            else:
                rows.append((f"{fid}-m{k}", "v_pu", v_true[i]))
    write_readings(db, pd.DataFrame({
        "meter_id": [r[0] for r in rows], "quantity": [r[1] for r in rows],
        "value": [float(r[2]) for r in rows],
        "t": pd.Series([T0 - timedelta(seconds=10)] * len(rows), dtype=object),
        "source": "ami"}))
    monitor = FeederMonitor(fid, master, db, MonitorConfig(alarms=False, v_sigma_pu=0.001))
    try:
        st = monitor.run_once(T0)
    finally:
        monitor.close()
        db.dispose()
    assert not any("meters skipped" in n for n in st.notes), st.notes
    est = dict(zip(st.node_names, st.v_pu))
    err = max(abs(est[f"{b}.1"] - v_true[pos[(b, 1)]]) for b in buses)
    assert err < 2e-3, err
