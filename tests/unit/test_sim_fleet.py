"""The simulated fleet (derms.sim): device models, 1547 behaviour against EPRI's opender,
IEEE 2030.5 controls, the fail-safe after a communication loss, the agents' event
handling (no network), scenarios and the command's bad input."""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from lxml import etree
from typer.testing import CliRunner

from derms.errors import InputError
from derms.sim import fleet as F
from derms.sim.board import ControlBoard
from derms.sim.placement import place_fleet
from derms.sim.scenario import Timeline, parse_scenario

SRC = Path(__file__).resolve().parents[2] / "src" / "derms"


def _spec(kinds, p_max, s_kva=None, e_max=None, **kw) -> F.FleetSpec:
    n = len(kinds)
    kinds = np.array(kinds)
    p_max = np.asarray(p_max, float)
    return F.FleetSpec(
        der_id=np.array([f"d{i}" for i in range(n)], dtype=object), kind=kinds,
        s_kva=np.asarray(s_kva if s_kva is not None else p_max, float), p_max_kw=p_max,
        e_max_kwh=np.asarray(e_max if e_max is not None else np.zeros(n), float),
        load_index=np.zeros(n, int), house_share=np.ones(n),
        soc_min_frac=np.where(kinds == F.BATTERY, 0.1, 0.0),
        eta=np.where(kinds == F.BATTERY, 0.95, np.where(kinds == F.EV, 0.92, 1.0)),
        ev_arrival_h=np.where(kinds == F.EV, 18.0, np.nan),
        ev_departure_h=np.where(kinds == F.EV, 7.0, np.nan),
        ev_need_kwh=np.where(kinds == F.EV, 20.0, 0.0), flex_frac=np.ones(n), **kw)


def _inputs(n, pv=0.0, house=1.0, flex=0.0, v=1.0, hour=12.0) -> F.StepInputs:
    full = lambda x: np.broadcast_to(np.asarray(x, float), (n,)).copy()  # noqa: E731
    return F.StepInputs(full(pv), full(house), full(flex), full(v), hour)


# ----------------------------------------------------------------------------- IEEE 1547


def test_volt_var_and_volt_watt_match_opender():
    """Category B volt-var (reactive power priority) and volt-watt, steady state, on a grid
    of operating points: our vectorised model against EPRI's opender, one DER at a time."""
    opender = pytest.importorskip("opender")
    s_va, p_w = 11_000.0, 10_000.0
    volts = [0.90, 0.93, 0.95, 0.99, 1.0, 1.03, 1.04, 1.05, 1.07, 1.09]
    avail = [0.0, 2000.0, 6000.0, 10_000.0]
    pts = [(v, a) for v in volts for a in avail]
    ref = []
    for vv in (False, True):
        der = opender.DER_PV(NP_VA_MAX=s_va, NP_P_MAX=p_w, NP_Q_MAX_INJ=0.44 * s_va,
                             NP_Q_MAX_ABS=0.44 * s_va, NP_NORMAL_OP_CAT="CAT_B",
                             NP_AC_V_NOM=240)
        der.der_file.QV_MODE_ENABLE = True
        der.der_file.PV_MODE_ENABLE = vv
        for v, a in pts:
            der.update_der_input(v_pu=v, f=60, p_dc_w=a)
            ref.append(der.run())
    ref = np.array(ref) / 1000.0  # kW, kvar
    n = len(pts)
    v = np.array([p[0] for p in pts] * 2)
    a = np.array([p[1] for p in pts] * 2) / 1000.0
    for k, vw in enumerate((None, F.VoltWatt())):
        spec = _spec([F.PV] * n, [p_w / 1000] * n, s_kva=[s_va / 1000] * n,
                     volt_watt=vw)
        st = F.step_fleet(spec, F.FleetState.initial(spec), F.Controls.none(n),
                          _inputs(n, pv=a[:n], v=v[:n]), 60.0)
        sl = slice(k * n, (k + 1) * n)
        np.testing.assert_allclose(st.p_out_kw, ref[sl, 0], atol=1e-6)
        np.testing.assert_allclose(st.q_out_kvar, ref[sl, 1], atol=1e-6)


def test_fleet_step_is_vectorised_for_thousands():
    spec = place_fleet(np.full(500, 30.0), 10_000, seed=1)
    st = F.FleetState.initial(spec)
    inp = _inputs(spec.n, pv=np.where(spec.kind == F.PV, spec.p_max_kw * 0.7, 0.0),
                  house=2.0, flex=np.where(spec.kind == F.FLEX, 0.5, 0.0), v=1.03)
    F.step_fleet(spec, st, F.Controls.none(spec.n), inp, 60.0)
    t0 = time.perf_counter()
    for _ in range(10):
        st = F.step_fleet(spec, st, F.Controls.none(spec.n), inp, 60.0)
    assert (time.perf_counter() - t0) / 10 < 0.05  # opender: ~0.8 s per step for 10,000
    assert np.isfinite(st.p_out_kw).all()


# ----------------------------------------------------------------------------- devices, controls


def test_site_export_and_import_limits_and_device_limits():
    # PV 8 kW available behind a 2 kW house; battery 5 kW; EV 7 kW; flexible load 1 kW
    spec = _spec([F.PV, F.BATTERY, F.EV, F.FLEX], [8.0, 5.0, 7.0, 1.0],
                 s_kva=[8.8, 5.0, 7.0, 1.0], e_max=[0, 10.0, 0, 0], volt_var=None)
    inp = _inputs(4, pv=[8.0, 0, 0, 0], house=2.0, flex=[0, 0, 0, 1.0], hour=19.0)
    st0 = F.FleetState.initial(spec)
    free = F.step_fleet(spec, st0, F.Controls.none(4), inp, 60.0)
    assert free.p_out_kw.tolist() == pytest.approx([8.0, 5.0, -7.0, -1.0])  # battery
    # discharges in the evening peak, EV charges flat out
    c = F.Controls.none(4)
    for i in range(4):
        c.set_row(i, exp_lim_kw=1.5, imp_lim_kw=4.0)
    got = F.step_fleet(spec, st0, c, inp, 60.0).p_out_kw
    site = 2.0 - got
    assert (site >= -1.5 - 1e-9).all() and (site <= 4.0 + 1e-9).all()
    assert got.tolist() == pytest.approx([3.5, 3.5, -2.0, -1.0])
    c = F.Controls.none(4)
    c.set_row(0, gen_lim_kw=3.0)
    c.set_row(1, target_kw=-4.0)  # charge at 4 kW
    c.set_row(2, load_lim_kw=3.3)
    c.set_row(3, connect=False)
    got = F.step_fleet(spec, st0, c, inp, 60.0).p_out_kw
    assert got.tolist() == pytest.approx([3.0, -4.0, -3.3, 0.0])
    c = F.Controls.none(4)
    c.set_row(0, energize=False)
    c.set_row(1, target_kw=99.0)  # beyond its rating: clipped
    assert F.step_fleet(spec, st0, c, inp, 60.0).p_out_kw[:2].tolist() == [0.0, 5.0]


def test_battery_energy_efficiency_and_bounds():
    spec = _spec([F.BATTERY], [5.0], e_max=[10.0], volt_var=None)
    st = F.FleetState.initial(spec)  # 5 kWh
    c = F.Controls.none(1)
    c.set_row(0, target_kw=5.0)
    st1 = F.step_fleet(spec, st, c, _inputs(1), 1800.0)  # 2.5 kWh out over 30 min
    assert st1.e_kwh[0] == pytest.approx(5.0 - 2.5 / 0.95)
    st2 = F.step_fleet(spec, st1, c, _inputs(1), 3600.0)  # empties to the 10 % floor
    assert st2.e_kwh[0] == pytest.approx(1.0)
    assert st2.p_out_kw[0] == pytest.approx((st1.e_kwh[0] - 1.0) * 0.95)
    c.set_row(0, target_kw=-5.0)
    st3 = F.step_fleet(spec, st2, c, _inputs(1), 3600.0)
    assert st3.e_kwh[0] == pytest.approx(1.0 + 5.0 * 0.95)
    assert F.soc_frac(spec, st3)[0] == pytest.approx(0.575)


def test_ev_sessions_deliver_their_energy_and_end():
    spec = _spec([F.EV], [7.0], volt_var=None)
    st = F.FleetState.initial(spec)
    delivered = 0.0
    for k in range(24 * 4):
        hour = 12.0 + k * 0.25
        st = F.step_fleet(spec, st, F.Controls.none(1), _inputs(1, hour=hour), 900.0)
        delivered += -st.p_out_kw[0] * 0.25 * 0.92
        if 12 <= hour % 24 < 18:
            assert st.p_out_kw[0] == 0.0  # not plugged in
    assert delivered == pytest.approx(20.0)  # the session's need, then it stops


# ----------------------------------------------------------------------------- fail-safe


def test_comm_loss_falls_back_to_the_default_control():
    n = 3
    board = ControlBoard(n)
    for i in range(n):
        board.set_default(i, {"exp_lim_kw": 1.5})
        board.set_event(i, {"exp_lim_kw": 0.0, "gen_lim_kw": 2.0})
        board.contact(i)
    board.last_contact[1] -= 20.0  # 20 wall s ago = 1200 simulated s at 60x
    board.set_event(2, None)  # no active event: default
    eff, fallback = board.effective(speed=60.0, comm_timeout_s=900.0)
    assert eff.exp_lim_kw.tolist() == [0.0, 1.5, 1.5]
    assert eff.gen_lim_kw[0] == 2.0 and np.isnan(eff.gen_lim_kw[1:]).all()
    assert fallback.tolist() == [False, True, False]
    spec = _spec([F.PV] * n, [8.0] * n, s_kva=[8.8] * n, volt_var=None)
    p = F.step_fleet(spec, F.FleetState.initial(spec), eff, _inputs(n, pv=8.0, house=1.0),
                     60.0).p_out_kw
    assert p.tolist() == pytest.approx([1.0, 2.5, 2.5])


# ----------------------------------------------------------------------------- agents, offline


def _control_xml(mrid: str, start: int, duration: int, status: int = 0, rs: int = 0,
                 exp_w: int = 0) -> etree._Element:
    ns = "urn:ieee:std:2030.5:ns"
    rand = f"<randomizeStart>{rs}</randomizeStart>" if rs else ""
    return etree.fromstring(
        f'<DERControl xmlns="{ns}" xmlns:csipaus="https://csipaus.org/ns" href="/x" '
        f'replyTo="/rsps/1/rsp" responseRequired="03"><mRID>{mrid}</mRID>'
        f"<creationTime>0</creationTime><EventStatus><currentStatus>{status}</currentStatus>"
        f"<dateTime>0</dateTime><potentiallySuperseded>false</potentiallySuperseded>"
        f"</EventStatus><interval><duration>{duration}</duration><start>{start}</start>"
        f"</interval>{rand}<DERControlBase><csipaus:opModExpLimW><multiplier>0</multiplier>"
        f"<value>{exp_w}</value></csipaus:opModExpLimW></DERControlBase></DERControl>")


def test_agent_event_lifecycle_and_responses():
    from derms.sim.agents import AgentSettings, Aggregator, DeviceAgent

    board = ControlBoard(2)
    devs = [DeviceAgent(0, "d0", "A" * 40), DeviceAgent(1, "d1", "B" * 40)]
    agg = Aggregator("agg", "127.0.0.1", 1, None, devs, board, AgentSettings())
    now = {"t": 1_000_000.0}
    agg.now = lambda: now["t"]
    agg._update_event(devs[0], _control_xml("AA" * 16, 1_000_010, 100, exp_w=500), 1)
    agg._update_event(devs[1], _control_xml("BB" * 16, 1_000_010, 100, rs=30), 1)
    sent = lambda: [(q[0].der_id, q[3]) for q in agg._responses._queue]  # noqa: E731, SLF001
    assert sent() == [("d0", 1), ("d1", 1)]  # received on first sight
    agg.evaluate(devs[0])
    assert not board.event_active[0]  # scheduled, not yet started
    now["t"] = 1_000_011.0
    agg.evaluate(devs[0])
    agg.evaluate(devs[1])
    assert board.event_active[0] and board.event.exp_lim_kw[0] == 0.5
    ev1 = devs[1].events["BB" * 16]
    assert 1_000_010 <= ev1.start_s <= 1_000_040  # its randomised start
    assert board.event_active[1] == (ev1.start_s <= now["t"])
    now["t"] = 1_000_111.0
    agg.evaluate(devs[0])
    assert not board.event_active[0] and not devs[0].events
    assert [s for d, s in sent() if d == "d0"] == [1, 2, 3]  # received, started, completed
    # a cancelled event: cancelled response, control lifted
    agg._update_event(devs[0], _control_xml("CC" * 16, 1_000_100, 100), 1)
    agg.evaluate(devs[0])
    assert board.event_active[0]
    agg._update_event(devs[0], _control_xml("CC" * 16, 1_000_100, 100, status=2), 1)
    agg.evaluate(devs[0])
    assert not board.event_active[0]
    assert [s for d, s in sent() if d == "d0"][-3:] == [1, 2, 6]


# ----------------------------------------------------------------------------- placement, scenario


def test_placement_is_seeded_and_sized_by_the_load():
    a = place_fleet([10.0, 40.0, 0.0], 200, seed=4)
    b = place_fleet([10.0, 40.0, 0.0], 200, seed=4)
    assert (a.der_id == b.der_id).all() and np.array_equal(a.p_max_kw, b.p_max_kw)
    assert not (a.load_index == 2).any()  # no devices where there is no load
    house = np.array([10.0, 40.0, 0.0])[a.load_index] * a.house_share
    assert np.bincount(a.load_index, weights=a.house_share)[:2] == pytest.approx(
        [1.0, 1.0], abs=0.51)  # the houses share their load
    pv = a.kind == F.PV
    assert ((a.p_max_kw[pv] >= 0.8 * house[pv] - 1e-9)
            & (a.p_max_kw[pv] <= 2.0 * house[pv] + 1e-9)).all()
    with pytest.raises(InputError, match="unknown kind 'wind'"):
        place_fleet([10.0], 5, mix={"wind": 1.0})
    with pytest.raises(InputError, match="no customer loads"):
        place_fleet([0.0], 5)


def test_fleet_spec_rejects_bad_values():
    with pytest.raises(InputError, match="d0: s_kva must be > 0"):
        _spec([F.PV], [5.0], s_kva=[0.0])
    with pytest.raises(InputError, match="battery d0: e_max_kwh"):
        _spec([F.BATTERY], [5.0], e_max=[0.0])
    with pytest.raises(InputError, match="unknown kind 9"):
        _spec([9], [5.0])


def test_scenario_timeline_and_errors_name_the_field():
    scen = parse_scenario({"events": [
        {"kind": "cloud", "points": [[0, 1.0], [600, 0.2], [1200, 1.0]]},
        {"kind": "heat_wave", "points": [[0, 1.0], [3600, 1.4]]},
        {"kind": "overload", "bus": "67", "kw": 900, "start_s": 1200, "end_s": 2400},
        {"kind": "dropout", "devices": ["d1"], "start_s": 600},
        {"kind": "comm_loss", "share": 0.5, "start_s": 300, "end_s": 900},
        {"kind": "switch", "element": "line.sw1", "closed": False, "at_s": 100}]})
    tl = Timeline(scen, np.array(["d0", "d1", "d2", "d3"]), np.zeros(4, int), seed=1)
    assert tl.cloud(300) == pytest.approx(0.6) and tl.load_multiplier(1800) == pytest.approx(1.2)
    assert tl.overload_kw(1200).tolist() == [900.0] and tl.overload_kw(2400).tolist() == [0.0]
    assert tl.dropped(599).sum() == 0 and tl.dropped(10_000).tolist() == [0, 1, 0, 0]
    assert tl.comm_lost(300).sum() == 2 and tl.comm_lost(900).sum() == 0
    assert [e.element for e in tl.switching_due(150)] == ["line.sw1"]
    assert tl.switching_due(200) == []
    bad = {
        "events[0].points": {"events": [{"kind": "cloud", "points": [[10, 1], [5, 1]]}]},
        "events[0].kw": {"events": [{"kind": "overload", "bus": "1", "kw": -5,
                                     "start_s": 0}]},
        "events[0].kind": {"events": [{"kind": "tornado"}]},
        "events[0]": {"events": [{"kind": "dropout", "start_s": 0}]},
        "events[0].end_s": {"events": [{"kind": "dropout", "share": 0.1, "start_s": 5,
                                        "end_s": 5}]},
        "events[0].extra": {"events": [{"kind": "dropout", "share": 0.1, "start_s": 0,
                                        "extra": 1}]},
    }
    for field, doc in bad.items():
        with pytest.raises(InputError, match="scenario: " + re.escape(field)):
            parse_scenario(doc)
    with pytest.raises(InputError, match=r"events\[0\].devices: unknown device 'x'"):
        Timeline(parse_scenario({"events": [{"kind": "dropout", "devices": ["x"],
                                             "start_s": 0}]}), np.array(["d0"]),
                 np.zeros(1, int))


# ----------------------------------------------------------------------------- the command


def _app() -> typer.Typer:
    from derms.cli.sim_cmd import sim

    app = typer.Typer()
    app.command(name="sim")(sim)

    @app.callback()
    def _main() -> None:
        pass

    return app


def test_command_runs_offline_with_a_scenario(tmp_path):
    scen = tmp_path / "scenario.json"
    scen.write_text(json.dumps({"events": [
        {"kind": "cloud", "points": [[0, 1.0], [600, 0.1]]},
        {"kind": "overload", "bus": "671", "kw": 600, "start_s": 900},
        {"kind": "dropout", "share": 0.5, "kinds": ["pv"], "start_s": 1200}]}))
    out = tmp_path / "out"
    r = CliRunner().invoke(_app(), ["sim", "--out", str(out), "--feeder", "ieee13",
                                    "--devices", "60", "--speed", "1e6", "--duration", "30min",
                                    "--step", "60s", "--start", "2026-07-01T20:00:00Z",
                                    "--scenario", str(scen), "--volt-watt"])
    assert r.exit_code == 0, (r.output, r.exception)
    ts = pd.read_csv(out / "timeseries.csv")
    assert len(ts) == 30 and {"head_p_kw", "v_min_pu", "v_max_pu", "der_p_out_kw",
                              "active_controls"} <= set(ts.columns)
    assert ts.pv_avail_kw.iloc[12] < 0.2 * ts.pv_avail_kw.iloc[0]  # the cloud
    assert ts.overload_kw.iloc[16] == 600 and ts.overload_kw.iloc[14] == 0
    # the injected load appears at the head (the cloud already stopped moving)
    assert ts.head_p_kw.iloc[15] - ts.head_p_kw.iloc[14] > 500
    assert ts.online_devices.iloc[-1] < 60
    for name in ("timeseries.parquet", "devices.csv", "summary.json", "report.html"):
        assert (out / name).exists(), name
    assert "plotly" in (out / "report.html").read_text()[:5_000_000].lower()


@pytest.mark.parametrize("args,message", [
    (["--scenario", "{scen}"], "events[0].points"),
    (["--scenario", "{missing}"], "cannot be read"),
    (["--ieee2030-5", "nohost"], "HOST:PORT"),
    (["--ieee2030-5", "127.0.0.1:8443"], "needs --pki"),
    (["--api", "http://127.0.0.1:1"], "--api needs --ieee2030-5"),
    (["--step", "2h"], "--step must be within"),
    (["--feeder", "nowhere.dss"], "feeder file not found"),
    (["--mix", "pv"], "kind=share"),
])
def test_command_bad_input_exits_2_naming_it(tmp_path, args, message):
    scen = tmp_path / "bad.json"
    scen.write_text(json.dumps({"events": [{"kind": "cloud", "points": [[5, 1], [1, 1]]}]}))
    args = [a.format(scen=scen, missing=tmp_path / "none.json") for a in args]
    r = CliRunner().invoke(_app(), ["sim", "--out", str(tmp_path / "o"), "--feeder",
                                    "ieee13", "--devices", "5", "--duration", "5min", *args])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "".join(message.split()) in "".join(r.output.split()), r.output
    assert not (tmp_path / "o").exists()


def test_only_the_cli_imports_the_sim():
    for path in SRC.rglob("*.py"):
        package = path.relative_to(SRC).parts[0]
        if package in ("sim", "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.startswith("derms.sim") for n in names), path
