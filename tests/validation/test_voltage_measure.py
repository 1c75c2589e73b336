"""Ungrounded (3-wire delta) areas: line-to-line voltage measure and delta injections.

IEEE 37 is an ungrounded delta feeder (delta-delta substation transformer, open-delta
regulators, every load connected line to line); its node-to-ground voltages float with
the lines' capacitive unbalance (0.87 / 1.02 / 0.90 pu at bus 799, whose line-to-line
voltages are 0.92-0.95 pu). Checked here against OpenDSS's own solution: which nodes get
the line-to-line measure, that every consumer reads the same values, and that the linear
model's sensitivities (delta injections, line-to-line rows) match finite AC changes.
"""

from __future__ import annotations

import numpy as np
import pytest

from derms.der.models import Connection
from derms.powerflow.collect import StepCollector, build_index
from derms.powerflow.linear import build_linear_model, solve_ac_with_injections
from tests.validation.conftest import frozen_engine, tangent_errors


@pytest.fixture(scope="module")
def ieee37():
    engine = frozen_engine("ieee37")
    yield engine
    engine.close()


def _puvll(engine, bus: str) -> np.ndarray:
    """OpenDSS's own line-to-line magnitudes of a 3-phase bus [pu] (ab, bc, ca)."""
    ckt = engine.circuit
    ckt.SetActiveBus(bus)
    ll = np.asarray(ckt.ActiveBus.puVLL, dtype=float)
    return np.abs(ll[0::2] + 1j * ll[1::2])


def test_ieee37_is_measured_line_to_line_except_the_grounded_source(ieee37):
    pair = ieee37.voltage_pairs()
    names = np.array(ieee37.node_names())
    ll = set(names[pair >= 0])
    assert {"799.1", "799.2", "799.3", "701.1", "775.3"} <= ll
    assert not any(n.startswith("sourcebus.") for n in ll)  # the Vsource grounds its bus
    assert len(ll) == len(names) - 3
    v = ieee37.node_voltages_pu()
    for bus in ("799", "701", "740", "775"):
        k = [int(np.flatnonzero(names == f"{bus}.{p}")[0]) for p in (1, 2, 3)]
        np.testing.assert_allclose(v[k], _puvll(ieee37, bus), rtol=1e-9)


def test_grounded_feeders_keep_node_to_ground(ieee13, ieee123):
    assert not (ieee13.voltage_pairs() >= 0).any()
    names = np.array(ieee123.node_names())
    # bus 610 hangs off a delta-delta transformer with no ground (the linear model's
    # floating-node warning names it too): the only line-to-line bus of IEEE 123
    assert sorted(names[ieee123.voltage_pairs() >= 0]) == ["610.1", "610.2", "610.3"]
    np.testing.assert_array_equal(ieee13.node_voltages_pu(),
                                  np.asarray(ieee13.circuit.AllBusVmagPu))


def test_step_collector_reads_the_same_measure(ieee37):
    index = build_index(ieee37)
    col = StepCollector(ieee37, index, 1)
    col.collect(0)
    np.testing.assert_allclose(col.v_pu[0], ieee37.node_voltages_pu(), rtol=1e-12)


def test_delta_injection_tangent_matches_finite_difference(ieee37):
    """1 kW / 1 kvar between two phases: linear vs AC within 2e-3 of the change (a
    node-to-ground injection on this feeder gives sensitivities of ~12 pu per 200 kW,
    where the AC change is 0.01 pu)."""
    for term, p_kw, q_kvar, err, change in tangent_errors(
            ieee37, ["701.1.2", "775.2.3", "740.3.1"]):
        assert change > 5e-6
        assert err < 2e-3 * change, (term, p_kw, q_kvar, err, change)


def test_delta_injection_on_a_grounded_feeder(ieee13):
    """A line-to-line element on a grounded feeder (IEEE 13's 692 carries a delta load)."""
    model = build_linear_model(ieee13, ["692.1.2", "671.1"], load_band_pu=0.0)
    v0 = ieee13.node_voltages_pu()
    dv_ac = solve_ac_with_injections(ieee13, ["692.1.2", "671.1"], np.array([1.0, 0.0]),
                                     np.zeros(2)) - v0
    dv_lin = model.dv_dp_pu_per_kw[:, 0]
    assert np.abs(dv_ac).max() > 5e-6
    assert np.abs(dv_ac - dv_lin).max() < 2e-3 * np.abs(dv_ac).max()


def test_connection_terminals():
    assert Connection("b", (1, 2), 1, 4.8, "delta").injection_terminals == ("b.1.2",)
    assert Connection("b", (1, 2, 3), 3, 4.8, "delta").injection_terminals == (
        "b.1.2", "b.2.3", "b.3.1")
    assert Connection("b", (1, 2, 3), 3, 4.8, "wye").injection_terminals == (
        "b.1", "b.2", "b.3")
    assert Connection("b", (2,), 1, 2.4, "delta").injection_terminals == ("b.2",)


@pytest.mark.parametrize("kind", ["pv", "load"])
def test_ieee37_hosting_capacity_fast_matches_brute_force(ieee37, kind):
    """Every primary bus of IEEE 37 (ungrounded: sites inject line to line). Before, every
    site read 0 kW (node-to-ground injections with no return path)."""
    from derms.analysis.hosting_brute import hosting_capacity_brute
    from derms.analysis.hosting_capacity import hosting_capacity_fast, resolve_sites

    sites = resolve_sites(ieee37)
    assert all(s.line_to_line for s in sites)
    fast = hosting_capacity_fast(ieee37, sites, kind).table["hc_kw"].to_numpy()
    brute = hosting_capacity_brute(ieee37, sites, kind).table["hc_kw"].to_numpy()
    # load: the substation bus is below 0.95 pu without it (pre-existing, held to its
    # base value within 0.001 pu), which leaves 15-26 kW anywhere
    assert (brute > (100.0 if kind == "pv" else 10.0)).all()
    assert np.all(np.abs(fast - brute) <= np.maximum(0.02 * brute, 10.0)), (fast, brute)


def test_ieee37_hosting_size_binds_in_opendss_own_line_to_line_voltages(ieee37):
    """Independent of derms's measure: at the brute-force size, a 3-phase delta generator
    of that size (OpenDSS's own element) brings OpenDSS's own puVLL to the binding limit."""
    from derms.analysis.hosting_brute import hosting_capacity_brute
    from derms.analysis.hosting_capacity import resolve_sites

    site = resolve_sites(ieee37, ["799"])[0]
    res = hosting_capacity_brute(ieee37, [site], "pv").table.iloc[0]
    assert res["binding"] == "overvoltage"
    bus, node = str(res["binding_element"]).split(".")
    ckt = ieee37.circuit

    def vll() -> float:
        ckt.SetActiveBus(bus)
        v = np.asarray(ckt.ActiveBus.puVLL, dtype=float)
        return float(np.abs(v[0::2] + 1j * v[1::2])[int(node) - 1])

    ieee37.command(f"new generator.hc_check bus1={bus_of(site)} phases=3 conn=delta "
                   f"kv=4.8 kw={res['hc_kw']} pf=1 model=1")
    try:
        ieee37.solve()
        assert 1.051 - 2e-3 <= vll() <= 1.051 + 2e-3  # v_max 1.05 + tolerance 0.001
    finally:
        ieee37.command("disable generator.hc_check")
        ieee37.solve()


def bus_of(site) -> str:
    return f"{site.bus}." + ".".join(str(k) for k in site.nodes)


def test_ieee37_envelopes_hold_in_opendss_own_line_to_line_voltages():
    """Operating envelopes on IEEE 37 (every load a delta connection point): the linear
    model takes each one line to line (before: node-to-ground columns, 1.4 kW import
    envelopes); every connection point at its import envelope, in a fresh OpenDSS context,
    keeps OpenDSS's own puVLL inside the limits (pre-existing held to the base case)."""
    from datetime import UTC, datetime, timedelta

    import dss

    from derms.analysis.constraints import Limits
    from derms.analysis.envelope_network import connection_points
    from derms.analysis.envelopes import EnvelopeCriteria, compute_envelopes
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine
    from derms.studies.qsts_study import StudyConfig, study_profiles
    from tests.conftest import shared_master
    from tests.validation.conftest import reference_v_pu

    cfg = StudyConfig(step=timedelta(hours=1), start=datetime(2026, 7, 1, tzinfo=UTC),
                      seed=3)
    eng = OpenDSSEngine(shared_master("ieee37"))
    eng.solve_snapshot()
    model = read_feeder(eng.ctx, eng.source_master)
    prof, _ = study_profiles(model, cfg)
    cps = connection_points(model, None)
    assert all(c.conn == "delta" for c in cps)
    res = compute_envelopes(eng, prof, cps, EnvelopeCriteria(policy="equal"))
    names = eng.node_names()
    ll = {names[k] for k in np.flatnonzero(eng.voltage_pairs() >= 0)}
    master = eng.master
    assert res.import_kw.mean() > 5.0
    lim = Limits()
    ctx = dss.DSS.NewContext()
    for k in (0, 12, 18):
        ctx.Text.Command = f"compile [{master}]"
        ckt = ctx.ActiveCircuit
        for j, el in enumerate(prof.elements):
            ckt.Loads.Name = el.split(".", 1)[1]
            ckt.Loads.kW, ckt.Loads.kvar = (ckt.Loads.kW * prof.p_mult[k, j],
                                            ckt.Loads.kvar * prof.p_mult[k, j])
        ctx.Text.Command = "set controlmode=static"
        ckt.Solution.Solve()
        v_base = reference_v_pu(ckt, names, ll)
        for j, cp in enumerate(cps):
            p = res.import_kw[k, j]
            ctx.Text.Command = (f"edit {cp.load} model=1 vminpu=0 vlowpu=0 vmaxpu=1000 "
                                f"kW={p} kvar={p * 0.329}")
        ckt.Solution.Solve()
        assert ckt.Solution.Converged
        v = reference_v_pu(ckt, names, ll)
        lo = np.where(v_base < lim.v_min_pu - lim.v_tol_pu, v_base - lim.v_tol_pu,
                      lim.v_min_pu - lim.v_tol_pu)
        assert (lo - v).max() <= 0.002, (k, (lo - v).max())
    eng.close()


def test_row_sensitivities_take_pairs_and_line_to_line_rows(ieee37):
    """The corrective cycle's adjoint rows (RowSensitivities) agree with the linear model
    (checked against OpenDSS above) for delta points and line-to-line voltage rows."""
    from derms.powerflow.linear_rows import RowSensitivities

    points = [("701.1.2", "701.2.3", "701.3.1"), ("775.2.3",), ("740.3.1",)]
    rs = RowSensitivities(ieee37, points, build_index(ieee37))
    names = ieee37.node_names()
    rows = np.array([names.index(s) for s in ("799.1", "701.2", "740.3", "775.1")])
    v, dvp, dvq, *_ = rs.compute(ieee37, rows, np.zeros(0, dtype=np.int64),
                                 load_band_pu=0.0)
    terms = sorted({t for pt in points for t in pt})
    model = build_linear_model(ieee37, terms, load_band_pu=0.0)
    w = np.zeros((len(terms), len(points)))
    for j, pt in enumerate(points):
        for t in pt:
            w[terms.index(t), j] = 1.0 / len(pt)
    np.testing.assert_allclose(v, ieee37.node_voltages_pu()[rows], rtol=1e-10)
    tol = {"rtol": 1e-6, "atol": 1e-10}  # an ungrounded feeder: round-off ~3e-12
    np.testing.assert_allclose(dvp, model.dv_dp_pu_per_kw[rows] @ w, **tol)
    np.testing.assert_allclose(dvq, model.dv_dq_pu_per_kvar[rows] @ w, **tol)


def test_new_connection_on_an_ungrounded_bus_is_delta_and_keeps_it_ungrounded():
    """A wye element with its neutral at node 0 would ground the 3-wire area it joins."""
    from derms.analysis.hosting_capacity import resolve_sites
    from derms.analysis.interconnection import new_connection

    eng = frozen_engine("ieee37")
    try:
        before = int((eng.voltage_pairs() >= 0).sum())
        site = resolve_sites(eng, ["740"])[0]
        cp = new_connection(eng, site, 500.0)
        assert cp.conn == "delta" and cp.injection_names == ["740.1.2", "740.2.3", "740.3.1"]
        eng.solve()
        assert int((eng.voltage_pairs() >= 0).sum()) == before
    finally:
        eng.close()


def _n_ll(engine) -> int:
    return int((engine.voltage_pairs() >= 0).sum())


def _ll_names(engine) -> list[str]:
    names = engine.node_names()
    return sorted(names[k] for k in np.flatnonzero(engine.voltage_pairs() >= 0))


def test_open_switch_separates_areas_and_commands_refresh_the_cache():
    """A grounded area behind a tie switch grounds IEEE 37 only while the tie is closed
    (open/close commands, as the monitor applies switch events, re-read the areas)."""
    eng = frozen_engine("ieee37")
    try:
        n0 = _n_ll(eng)
        eng.command("new line.tie bus1=740 bus2=tiex phases=3 length=0.01 switch=yes")
        eng.command("new reactor.tiex bus1=tiex bus2=gnd.0.0.0 phases=3 x=50 r=1")
        eng.solve()
        # a grounding reactor behind a closed tie grounds the area (775, behind the
        # delta-delta XFM1, stays 3-wire)
        assert _ll_names(eng) == ["775.1", "775.2", "775.3"]
        eng.command("open line.tie term=1")
        eng.solve()
        assert _n_ll(eng) == n0  # open: IEEE 37 is 3-wire again (tiex is grounded)
        names = eng.node_names()
        k = [names.index(f"740.{p}") for p in (1, 2, 3)]
        np.testing.assert_allclose(eng.node_voltages_pu()[k], _puvll(eng, "740"), rtol=1e-9)
        eng.command("close line.tie term=1")
        eng.solve()
        assert _ll_names(eng) == ["775.1", "775.2", "775.3"]
    finally:
        eng.close()


def test_reactor_to_ground_grounds_the_area():
    eng = frozen_engine("ieee37")
    try:
        eng.command("new reactor.grd bus1=799 bus2=gnd.0.0.0 phases=3 x=50 r=1")
        eng.solve()
        assert _ll_names(eng) == ["775.1", "775.2", "775.3"]  # behind XFM1: still 3-wire
    finally:
        eng.close()


def test_dead_node_with_a_live_partner_reads_on_its_bus_base():
    """One phase opened upstream: the line-to-line reading of the dead node's pair stays
    on the bus base (it read ~1472 pu with a 1 V fallback base)."""
    eng = frozen_engine("ieee37")
    try:
        # a 3-phase spur with phase 3 opened at its source end, only a 1-2 load below
        for cmd in (("new line.bd phases=3 bus1=740 bus2=nd length=0.1 units=kft r1=0.3 "
                     "x1=0.6 c1=0 c0=0"),
                    "new load.nd bus1=nd.1.2 phases=1 conn=delta kv=4.8 kw=50",
                    "open line.bd 1 3", "calcvoltagebases"):
            eng.command(cmd)
        eng.solve()
        v = eng.node_voltages_pu()
        index = build_index(eng)
        col = StepCollector(eng, index, 1)
        col.collect(0)
        np.testing.assert_allclose(v, col.v_pu[0], rtol=1e-9, atol=1e-12)
        assert v.max() < 1.5
    finally:
        eng.close()


def test_node_to_ground_injection_on_an_ungrounded_node_is_refused(ieee37):
    from derms.errors import InputError

    with pytest.raises(InputError, match="ungrounded"):
        solve_ac_with_injections(ieee37, ["740.1"], np.zeros(1), np.zeros(1))
    assert _n_ll(ieee37) == 114  # and the cache was not left stale by a grounding load


def test_replan_connection_and_growth_connections_go_line_to_line(ieee37):
    from derms.control.replan import _connection

    c3 = _connection(ieee37, ("740.1.2", "740.2.3", "740.3.1"))
    assert (c3.bus, c3.nodes, c3.phases, c3.conn) == ("740", (1, 2, 3), 3, "delta")
    assert c3.injection_terminals == ("740.1.2", "740.2.3", "740.3.1")
    c1 = _connection(ieee37, ("701.1.2",))
    assert (c1.nodes, c1.phases, c1.conn) == ((1, 2), 1, "delta")
    assert c1.injection_terminals == ("701.1.2",)


def test_growth_new_connection_on_an_ungrounded_bus_keeps_it_ungrounded():
    from types import SimpleNamespace

    from derms.grid.opendss_import import read_feeder
    from derms.studies.growth_profiles import NewConnection
    from derms.studies.load_growth import add_new_connections

    eng = frozen_engine("ieee37")
    try:
        n0 = _n_ll(eng)
        model = read_feeder(eng.ctx, eng.source_master)
        add_new_connections(eng, SimpleNamespace(model=model, scenario=SimpleNamespace(
            new_connections=[NewConnection("702", 50.0)])))  # a bus without a load
        eng.solve()
        assert _n_ll(eng) == n0
        names = eng.node_names()
        k = [names.index(f"740.{p}") for p in (1, 2, 3)]
        np.testing.assert_allclose(eng.node_voltages_pu()[k], _puvll(eng, "740"), rtol=1e-9)
    finally:
        eng.close()
