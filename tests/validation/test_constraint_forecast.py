"""Constraint forecasts against direct QSTS runs (OpenDSS) and against held-out days.

Fast: IEEE 13 over a short horizon, where a one-level forecast must reproduce the
violation counts of a direct QSTS + ``detect_violations`` run exactly, and a quantile grid
must give consistent probabilities. Slow: the acceptance figure on IEEE 123 (see
bench/bench_constraint_forecast.py for the setup and the multi-day figure).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from derms.analysis.constraint_forecast import forecast_constraints
from derms.analysis.constraints import Limits, detect_violations
from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import run_qsts
from derms.studies.qsts_study import StudyConfig, add_pv, place_pv

REPO = Path(__file__).resolve().parents[2]
T = pd.date_range("2026-07-01 16:00", periods=24, freq="15min", tz="UTC")
LOAD = np.linspace(0.3, 1.1, len(T))
PV = np.clip(np.sin(np.linspace(0.2, 3.0, len(T))), 0, None) * 1.1
LIMITS = Limits(reverse_power_kw=0.0)


def _ieee13():
    engine = OpenDSSEngine(resolve_master("ieee13"))
    model = read_feeder(engine.ctx, engine.source_master)
    pv = place_pv(model, StudyConfig(pv_penetration=0.8, pv_size_min=2.0, pv_size_max=3.0))
    add_pv(engine, pv)
    engine.solve_snapshot()
    return engine, list(pv["pv"])


def _direct_counts(pv_elements):
    """Reference: QSTS on fresh engines, with and without PV, then detect_violations."""
    counts = {}
    results = []
    for pv_on in (True, False):
        engine, _ = _ieee13()
        loads = [f"load.{n.lower()}" for n in engine.circuit.Loads.AllNames]
        mult = np.column_stack([np.repeat(LOAD[:, None], len(loads), 1),
                                np.repeat((PV if pv_on else 0 * PV)[:, None],
                                          len(pv_elements), 1)])
        prof = Profiles(start=T[0].to_pydatetime(), step=(T[1] - T[0]).to_pytimedelta(),
                        elements=tuple(loads + pv_elements), p_mult=mult)
        results.append(run_qsts(engine, prof, control_mode="static"))
        engine.close()
    res, base = results
    ix = res.index
    rep = detect_violations(
        res.t, res.dt_h, v_pu=res.v_pu, node_names=ix.node_bus, node_phases=ix.node_phase,
        loading_pct=res.loading_pct(), branch_names=ix.branch_element,
        branch_phases=ix.branch_phase, head_p_kw=res.head_p_kw.sum(axis=1), limits=LIMITS,
        base_v_pu=base.v_pu, base_loading_pct=base.loading_pct(),
        base_head_p_kw=base.head_p_kw.sum(axis=1))
    for kind, key in (("overvoltage", "overvoltage"), ("undervoltage", "undervoltage"),
                      ("thermal", "thermal"), ("reverse_power", "reverse_power")):
        counts[kind] = rep.counts[f"violations_{key}"]
    return counts


def test_point_forecast_reproduces_direct_qsts_counts():
    engine, pv_elements = _ieee13()
    try:
        res = forecast_constraints(engine, pd.DataFrame({"p50": LOAD}, index=T),
                                   pd.DataFrame({"p50": PV}, index=T), pv_elements,
                                   limits=LIMITS)
    finally:
        engine.close()
    ref = _direct_counts(pv_elements)
    got = res.violations.groupby("kind").size().reindex(list(ref), fill_value=0).to_dict()
    assert got == ref
    assert sum(ref.values()) > 0  # the case does exercise violations
    assert set(res.violations["probability"].unique()) <= {1.0}
    assert res.n_not_converged == 0


def test_quantile_grid_probabilities_are_consistent():
    engine, pv_elements = _ieee13()
    lq = pd.DataFrame({"p10": 0.8 * LOAD, "p50": LOAD, "p90": 1.2 * LOAD}, index=T)
    pq = pd.DataFrame({"p10": 0.3 * PV, "p50": PV, "p90": np.minimum(1.3 * PV, 1.2)},
                      index=T)
    try:
        res = forecast_constraints(engine, lq, pq, pv_elements, limits=LIMITS)
        res2 = forecast_constraints(engine, lq, pq, pv_elements, limits=LIMITS)
    finally:
        engine.close()
    v, h = res.violations, res.hourly
    assert len(res.scenarios) == 9 and np.isclose(res.scenarios["weight"].sum(), 1.0)
    assert ((v["probability"] > 0) & (v["probability"] <= 1 + 1e-12)).all()
    assert (v["expected_excess"] > 0).all()
    assert len(h) == 6 * h["kind"].nunique()  # 6 hours per kind
    # an hour's probability is at least that of any of its element-intervals
    v_hour = v.assign(hour=v["start"].dt.floor("h")).groupby(["hour", "kind"])[
        "probability"].max()
    hp = h.set_index(["hour", "kind"])["probability"]
    assert (hp.reindex(v_hour.index).to_numpy() >= v_hour.to_numpy() - 1e-12).all()
    # scenario runs start from the same control state: repeatable
    pd.testing.assert_frame_equal(res.violations, res2.violations)


def _bench():
    path = REPO / "bench" / "bench_constraint_forecast.py"
    spec = importlib.util.spec_from_file_location("bench_constraint_forecast", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    if not mod.CKT24_SHAPE.exists():
        pytest.skip(f"ckt24 load shape not available: {mod.CKT24_SHAPE}")
    return mod


@pytest.mark.slow
def test_ieee123_named_day_overvoltage_hours_precision_recall():
    """Acceptance: held-out day 2012-06-12 (local), forecasts from data before it only."""
    b = _bench()
    load, pv = b.load_mult_series(), b.pv_pu_series()
    feeder = b.build_feeder()
    try:
        day = b.evaluate_day(feeder, load, pv, b.NAMED_DAY)
    finally:
        feeder.engine.close()
    precision, recall = b.precision_recall([day])
    print(f"true {list(day.true_hours.hour)} predicted {list(day.predicted_hours.hour)} "
          f"precision {precision:.3f} recall {recall:.3f}")
    assert len(day.true_hours) > 0
    assert precision >= 0.9 and recall >= 0.9
