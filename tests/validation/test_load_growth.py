"""Load-growth screening (few AC solves) against a brute-force full-year hourly QSTS.

For one year of the scenario, the year's maximum feeder-head import and the worst
transformer phase loading found by the screened study must match the brute-force QSTS of all
8760 hours of that year within TOL_PCT (measured: ≤ 0.02 % on IEEE 13 and 123).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.collect import build_index
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from derms.powerflow.qsts import run_qsts
from derms.studies.load_growth import (
    GrowthScenario,
    NewConnection,
    ScreenSettings,
    add_new_connections,
    growth_network,
    prepare,
    run_load_growth,
    year_profiles,
)

TOL_PCT = 1.0
V_TOL_PU = 1e-3  # DESIGN.md's voltage tolerance
CASES = {
    "ieee13": GrowthScenario.simple(
        6, ev_final=0.6, hp_final=0.4, pv_final=0.5, seed=2,
        new_connections=(NewConnection("675", 300.0, "ev", 2029),)),
    "ieee123": GrowthScenario.simple(10, seed=1),
}


def _brute_force(feeder: str, sc: GrowthScenario, year: int):
    settings = SolveSettings(max_control_iterations=1000)
    with OpenDSSEngine(resolve_master(feeder), settings) as engine:
        model = read_feeder(engine.ctx, engine.source_master)
        inputs = prepare(model, sc)
        add_new_connections(engine, inputs)
        index = build_index(engine)
        net = growth_network(model, index)
        res = run_qsts(engine, year_profiles(inputs, year), index=index)
    kinds = net.elements["kind"].to_numpy()
    is_x = (net.cond_element >= 0) & (kinds[np.maximum(net.cond_element, 0)] == "transformer")
    loading = np.nan_to_num(res.loading_pct()[:, is_x])
    return res.head_p_kw.sum(axis=1), loading, inputs


@pytest.fixture(scope="module", params=sorted(CASES))
def study(request):
    feeder = request.param
    sc = CASES[feeder]
    return feeder, sc, run_load_growth(resolve_master(feeder), sc)


def test_screened_peaks_match_full_year_qsts(study):
    feeder, sc, result = study
    year = sc.years  # the last, most loaded year
    head, loading, inputs = _brute_force(feeder, sc, year)
    p = result.peaks[result.peaks["year"] == sc.start_year + year]
    head_kw = p.loc[p["kind"] == "feeder", "peak_kw"].iloc[0]
    worst_x = p.loc[p["kind"] == "transformer", "loading_pct"].max()
    assert head_kw == pytest.approx(head.max(), rel=TOL_PCT / 100)
    assert worst_x == pytest.approx(loading.max(), rel=TOL_PCT / 100)
    # the peak's time is the brute force's (or ties within the tolerance)
    t_peak = p.loc[p["kind"] == "feeder", "peak_time"].iloc[0]
    k = int(np.argmax(head))
    assert t_peak.replace(year=sc.start_year) == inputs.profiles.times[k] or \
        head[inputs.profiles.times.get_loc(t_peak.replace(year=sc.start_year))] >= \
        head.max() * (1 - TOL_PCT / 100)
    assert result.n_ac_solves < 0.02 * (sc.years + 1) * 8760


def test_tables_cover_every_year_and_element(study):
    _feeder, sc, result = study
    p = result.peaks
    assert sorted(p["year"].unique()) == list(range(sc.start_year, sc.start_year + sc.years + 1))
    assert {"feeder", "transformer", "line"} <= set(p["kind"])
    head = p[p["kind"] == "feeder"]["peak_kw"].to_numpy()
    assert head[-1] > head[0]  # growth raises the peak
    fe = result.first_exceeded
    assert {"thermal", "reverse_power", "undervoltage", "overvoltage"} <= set(fe["limit"])
    pre = fe[fe["pre_existing"]]
    # pre-existing violations count only when worse than their base-year value
    worse = pre.dropna(subset=["year"])
    assert ((worse["value"] - worse["base_value"]).abs() > 0).all()
    # a pre-existing row is held to its base value, feeder rows too (they said 1.05)
    np.testing.assert_allclose(pre["limit_value"], pre["base_value"])
    assert not np.signbit(fe["limit_value"].to_numpy(float)[fe["limit_value"] == 0]).any()
    assert result.n_not_converged == 0


def test_ieee123_has_its_upstream_transformers():
    sc = GrowthScenario.simple(2, seed=1)
    result = run_load_growth(resolve_master("ieee123"), sc)
    x = set(result.peaks.loc[result.peaks["kind"] == "transformer", "element"])
    assert "transformer.reg1a" in x and "transformer.reg4a+reg4b+reg4c" in x
    reg1 = result.peaks[result.peaks["element"] == "transformer.reg1a"]
    head = result.peaks[result.peaks["kind"] == "feeder"]
    # the head regulator carries the whole feeder: screened kW ≈ AC head kW less losses
    ratio = reg1["peak_kw"].to_numpy() / head["peak_kw"].to_numpy()
    assert ((ratio > 0.9) & (ratio < 1.0)).all()


def test_unconverged_solves_are_left_out_of_the_tables(monkeypatch):
    """A candidate interval whose AC solve did not converge must not decide a first-exceeded
    year (EPRI ckt24: two such solves at 1.063 pu made 41 % of first_exceeded.csv)."""
    import dataclasses

    import derms.studies.load_growth as lg

    real = lg.run_qsts

    def broken(*a, **k):  # the last candidate "did not converge", at an absurd voltage
        res = real(*a, **k)
        conv = res.converged.copy()
        conv[-1] = False
        v = res.v_pu.copy()
        v[-1] = np.where(v[-1] > 0.1, 1.2, v[-1])
        return dataclasses.replace(res, converged=conv, v_pu=v)

    monkeypatch.setattr(lg, "run_qsts", broken)
    out = run_load_growth(resolve_master("ieee13"), CASES["ieee13"])
    assert out.n_not_converged == 1
    over = out.first_exceeded[out.first_exceeded["limit"] == "overvoltage"]
    assert (over["value"].astype(float) < 1.1).all()
    assert (out.extremes["v_max_pu"] < 1.1).all()


def test_pre_existing_undervoltage_first_year_matches_a_chained_qsts_ieee34():
    """IEEE 34's bus 890 is under 0.95 pu in the base year (pre-existing, held to 0.9144
    pu). Solved as candidates chained through unrelated intervals, or each from the base
    taps with too short a warm-up, the study said it got worse in 2027 (0.9130 / 0.9141
    pu) while a QSTS of every hour of the years, regulators acting and taps carried from
    hour to hour, never finds it below 0.9150 after the base year (found by an
    independent test)."""
    from tests.conftest import shared_master

    master = shared_master("ieee34")
    sc = GrowthScenario.simple(3, seed=1, growth_pct=1.0, start_year=2026, step_min=60,
                               customer_peak_kw=10.0)
    with OpenDSSEngine(master, SolveSettings(max_control_iterations=1000)) as engine:
        model = read_feeder(engine.ctx, engine.source_master)
        engine.solve_snapshot()
        inputs = prepare(model, sc)
        add_new_connections(engine, inputs)
        index = build_index(engine)
        nodes = np.flatnonzero(index.node_bus == "890")
        v_min = np.array([run_qsts(engine, year_profiles(inputs, y), index=index)
                          .v_pu[:, nodes].min() for y in range(sc.years + 1)])
    worse = np.flatnonzero(v_min[1:] < v_min[0] - V_TOL_PU)
    brute_year = sc.start_year + 1 + worse[0] if worse.size else None
    for warmup_h in (0.0, ScreenSettings().warmup_h):
        res = run_load_growth(master, sc, screen=ScreenSettings(warmup_h=warmup_h))
        row = res.first_exceeded.query("element == '890' and limit == 'undervoltage'").iloc[0]
        assert bool(row["pre_existing"])
        got = None if pd.isna(row["year"]) else int(row["year"])
        if warmup_h == 0.0:
            assert got != brute_year  # the premise: without the warm-up it is wrong
        else:
            assert got == brute_year
            assert row["base_value"] == pytest.approx(v_min[0], abs=1e-4)
