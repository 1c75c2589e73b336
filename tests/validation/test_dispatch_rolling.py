"""Rolling re-planning on IEEE 123 (real OpenDSS): with perfect forecasts the executed
peak reduction reaches >= 80 % of the perfect-foresight one; battery SOC and EV energy
carry over from one re-plan to the next; noisy forecasts run end to end."""

from __future__ import annotations

import numpy as np
import pytest

from derms.dispatch.plan import ObjectiveConfig
from derms.dispatch.rolling import run_rolling
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case
from tests.conftest import shared_master


@pytest.fixture(scope="module")
def case():
    engine, scenario, ac = open_dispatch_case(shared_master("ieee123"),
                                              ScenarioConfig(n_steps=2 * 96))
    yield scenario, ac
    engine.close()


def test_perfect_forecast_reaches_80_percent_and_state_carries_over(case):
    scenario, ac = case
    r = run_rolling(ac, scenario, ObjectiveConfig(), forecast="perfect", replan_every="1h",
                    days=1)
    assert r.n_replans == 24 and r.fallbacks == 0
    assert r.peak_uncontrolled_kw - r.peak_perfect_kw > 100.0
    assert r.reduction_ratio >= 0.8, (r.peak_kw, r.peak_perfect_kw, r.peak_uncontrolled_kw)
    assert r.violations["violations_voltage"] + r.violations["violations_thermal"] == 0
    # SOC at each re-plan = executed energy at the end of the previous block
    e_max = np.array([b.e_max_kwh for b in scenario.fleet.batteries])
    np.testing.assert_allclose(r.soc0_frac_at_replan[1:], r.executed.e_kwh[3::4][:-1] / e_max,
                               atol=1e-9)
    # EV energy delivered carries over and every session that departed got its energy
    delivered = np.cumsum(r.executed.ev_kw * 0.92 * 0.25, axis=0)
    np.testing.assert_allclose(r.ev_delivered_kwh_at_replan[1:], delivered[3::4][:-1],
                               atol=1e-6)
    h = scenario.fleet.horizon
    end = h.start + 96 * h.step
    for j, e in enumerate(scenario.fleet.evs):
        if e.departure <= end:
            assert delivered[-1, j] == pytest.approx(e.e_needed_kwh, abs=1e-3)


def test_noisy_forecast_runs_and_reports_baselines(case):
    scenario, ac = case
    r = run_rolling(ac, scenario, ObjectiveConfig(), forecast="noisy", replan_every="1h",
                    days=1, seed=0)
    assert r.n_replans == 24 and len(r.replan_s) == 24
    assert np.isfinite([r.peak_kw, r.peak_rule_based_kw, r.peak_perfect_kw]).all()
    assert r.peak_kw < r.peak_uncontrolled_kw  # measured ratio ~0.44: below the 80 % target


@pytest.fixture(scope="module")
def midnight_case():
    from datetime import UTC, datetime
    cfg = ScenarioConfig(n_steps=2 * 96, start=datetime(2026, 7, 1, 8, tzinfo=UTC))  # 00:00
    engine, scenario, ac = open_dispatch_case(shared_master("ieee123"), cfg)
    yield cfg, scenario, ac
    engine.close()


def test_model_forecast_with_intraday_feedback_beats_the_day_ahead_model(midnight_case):
    """The scenario's first day is ≈ 15 % hotter than the day before: the LightGBM model
    (change from a day earlier) stays ≈ 10–15 % low all day; feeding back the error it
    is making right now recovers most of the reduction (measured 0.78 against 0.25)."""
    from derms.grid.opendss_import import read_feeder
    from derms.studies.dispatch_forecast import model_forecast

    cfg, scenario, ac = midnight_case
    model = read_feeder(ac.engine.ctx, ac.engine.source_master)
    ratios = {}
    for steps in (4, 0):
        fc = model_forecast(model, cfg, feedback_steps=steps)
        r = run_rolling(ac, scenario, ObjectiveConfig(), forecast=fc, replan_every="1h",
                        days=1)
        assert r.fallbacks == 0 and len(r.target_kw_at_replan) == r.n_replans == 24
        assert r.violations["violations_voltage"] + r.violations["violations_thermal"] == 0
        ratios[steps] = r.reduction_ratio
    assert ratios[4] >= ratios[0] + 0.25, ratios
    assert ratios[4] >= 0.6, ratios


def test_short_replans_between_hourly_full_ones_keep_the_perfect_reduction(case):
    """15-min re-plans: the full lookahead every hour, 4-h windows anchored to it in
    between (the default); with perfect forecasts they keep the full plan's reduction,
    the state carries over and every EV that left got its energy."""
    scenario, ac = case
    r = run_rolling(ac, scenario, ObjectiveConfig(), forecast="perfect",
                    replan_every="15min", days=1)
    assert r.n_replans == 96 and r.fallbacks == 0
    np.testing.assert_array_equal(r.full_replan, np.tile([True, False, False, False], 24))
    assert r.reduction_ratio >= 0.95, (r.peak_kw, r.peak_perfect_kw, r.peak_uncontrolled_kw)
    assert r.violations["violations_voltage"] + r.violations["violations_thermal"] == 0
    delivered = np.cumsum(r.executed.ev_kw * 0.92 * 0.25, axis=0)
    h = scenario.fleet.horizon
    end = h.start + 96 * h.step
    for j, e in enumerate(scenario.fleet.evs):
        if e.departure <= end:
            assert delivered[-1, j] == pytest.approx(e.e_needed_kwh, abs=1e-3)
    e_max = np.array([b.e_max_kwh for b in scenario.fleet.batteries])
    np.testing.assert_allclose(r.soc0_frac_at_replan[1:], r.executed.e_kwh[:-1] / e_max,
                               atol=1e-9)
    # every DER within its limits in the executed schedule
    e_min = np.array([b.e_min_kwh for b in scenario.fleet.batteries])
    assert (r.executed.e_kwh >= e_min - 1e-6).all() and (r.executed.e_kwh <= e_max + 1e-6).all()


def test_the_executed_schedule_holds_the_export_limit():
    """PV above its forecast exported past the limit in execution (IEEE 13, all customers
    with PV, noisy forecast: 22 of 96 intervals at 1,260 kW against 1,500, reported
    nowhere: an independent sweep). The execution now discharges less, charges more,
    then curtails by the policy; the AC head import stays within the limit and the miss
    count says so."""
    engine, scenario, ac = open_dispatch_case(
        shared_master("ieee13"),
        ScenarioConfig(pv_penetration=1.0, battery_penetration=0.3, ev_penetration=0.0,
                       n_steps=2 * 96, seed=1))
    try:
        obj = ObjectiveConfig(export_limit_kw=-1500.0, curtailment_policy="equal_proportional")
        r = run_rolling(ac, scenario, obj, forecast="noisy", replan_every="1h", days=1,
                        seed=1)
    finally:
        engine.close()
    assert r.head_kw.min() >= 1500.0 - 0.5, r.head_kw.min()
    assert r.violations["export_limit_missed_intervals"] == 0
    assert r.executed.curtail_kw.sum() > 0  # the limit binds: PV was curtailed


def test_grouped_rolling_baselines_are_the_members():
    """With groups the rolling run's uncontrolled baseline was the groups' (a group's EVs
    charged as one session): 7-15 kW off the single plan's, and the ratio with it."""
    from derms.der.aggregate import AggregationConfig
    from derms.dispatch.plan import uncontrolled_schedule

    engine, scenario, ac = open_dispatch_case(
        shared_master("ieee123"),
        ScenarioConfig(pv_penetration=0.8, battery_penetration=0.6, ev_penetration=0.6,
                       seed=9, n_steps=2 * 96), aggregation=AggregationConfig(size=4))
    try:
        assert ac.fleet is not ac.members
        r = run_rolling(ac, scenario, ObjectiveConfig(), forecast="perfect",
                        replan_every="4h", days=1)
        own = ac.simulate_schedule(uncontrolled_schedule(ac.members))
    finally:
        engine.close()
    assert r.peak_uncontrolled_kw == pytest.approx(own.head_p_kw.sum(axis=1)[:96].max(),
                                                   abs=1e-6)
