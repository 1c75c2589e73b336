"""The dispatch LP (sparse blocks, HiGHS) against a reference formulation written
independently, constraint by constraint, and solved with scipy's linprog."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog

from derms.der.models import (
    Battery,
    Connection,
    EVSession,
    Fleet,
    Horizon,
    PVInverter,
    fleet_arrays,
)
from derms.dispatch.lp import Weights
from derms.dispatch.network import DerSensitivity, NetworkLimits, Reference
from derms.dispatch.plan import GridContext, ObjectiveConfig, Planner, uncontrolled_schedule

T0 = datetime(2026, 7, 1, tzinfo=UTC)
C = Connection("b1", (1, 0), 1, 2.4)


def small_fleet(T=12) -> tuple[Fleet, np.ndarray]:
    h = Horizon(T0, timedelta(hours=1), T)
    sun = np.clip(np.sin(np.linspace(-0.5, 3.6, T)), 0, None)
    pv = (PVInverter("pv1", C, 11.0, 10 * sun), PVInverter("pv2", C, 6.0, 5 * sun))
    bat = (Battery("b1", C, 5.0, 12.0, soc0_frac=0.5, soc_min_frac=0.1, eta_charge=0.9,
                   eta_discharge=0.95),)
    ev = (EVSession("ev1", C, T0 + timedelta(hours=7), T0 + timedelta(hours=11), 12.0, 7.0,
                    eta_charge=0.9),)
    load = 20 + 8 * np.cos(np.linspace(0, 2 * np.pi, T))
    return Fleet(h, pv, bat, ev), load


def empty_grid(fleet: Fleet, load: np.ndarray) -> GridContext:
    T, n = fleet.horizon.n_steps, len(fleet.ders)
    unc = uncontrolled_schedule(fleet)
    z = sp.csr_matrix((0, n))
    ref = Reference(unc.p_kw, unc.q_kvar, np.zeros((T, 0)), np.zeros((T, 0)),
                    load + unc.p_kw.sum(axis=1))
    lim = NetworkLimits(np.zeros((T, 0)), np.zeros((T, 0)), np.zeros((T, 0)),
                        np.zeros(0, bool))
    return GridContext(DerSensitivity(z, z, z, z), lim, np.zeros(0, object),
                       np.zeros(0, object), ref)


def reference_lp(fleet: Fleet, load: np.ndarray, w: Weights, export_kw: float | None):
    """Dense, loop-by-loop formulation: minimise peak + curtailment + throughput + EV delay."""
    T, dt = fleet.horizon.n_steps, fleet.horizon.dt_h
    b, ev = fleet.batteries[0], fleet.evs[0]
    pv = fleet.pv
    names = []
    for t in range(T):
        names += [("pv", t, 0), ("pv", t, 1), ("ch", t), ("dis", t), ("e", t), ("ev", t)]
    names.append(("z",))
    col = {k: i for i, k in enumerate(names)}
    n = len(names)
    c = np.zeros(n)
    bounds = [None] * n
    A_eq, b_eq, A_ub, b_ub = [], [], [], []
    const = 0.0
    win = [t for t in range(T) if 7 <= t < 11]
    for t in range(T):
        for i in range(2):
            bounds[col[("pv", t, i)]] = (0, pv[i].p_avail_kw[t])
            c[col[("pv", t, i)]] = -w.curtailment * dt
            const += w.curtailment * dt * pv[i].p_avail_kw[t]
        bounds[col[("ch", t)]] = bounds[col[("dis", t)]] = (0, b.p_max_kw)
        c[col[("ch", t)]] = c[col[("dis", t)]] = w.throughput * dt
        lo = b.e_min_kwh if t < T - 1 else max(b.e_min_kwh, b.soc0_frac * b.e_max_kwh)
        bounds[col[("e", t)]] = (lo, b.e_max_kwh)
        bounds[col[("ev", t)]] = (0, ev.p_max_kw if t in win else 0)
        c[col[("ev", t)]] = w.ev_delay * dt * t * dt
        row = np.zeros(n)  # e_t - e_{t-1} - eta_c dt ch + dt/eta_d dis = 0
        row[col[("e", t)]] = 1
        row[col[("ch", t)]] = -b.eta_charge * dt
        row[col[("dis", t)]] = dt / b.eta_discharge
        if t:
            row[col[("e", t - 1)]] = -1
        A_eq.append(row)
        b_eq.append(b.soc0_frac * b.e_max_kwh if t == 0 else 0.0)
        row = np.zeros(n)  # head_t - z <= 0
        for i in range(2):
            row[col[("pv", t, i)]] = -1
        row[col[("ch", t)]], row[col[("dis", t)]], row[col[("ev", t)]] = 1, -1, 1
        row[col[("z",)]] = -1
        A_ub.append(row)
        b_ub.append(-load[t])
        if export_kw is not None:  # -head_t <= export
            r2 = -row.copy()
            r2[col[("z",)]] = 0
            A_ub.append(r2)
            b_ub.append(export_kw + load[t])
    row = np.zeros(n)
    for t in win:
        row[col[("ev", t)]] = ev.eta_charge * dt
    A_eq.append(row)
    b_eq.append(ev.e_needed_kwh)
    bounds[col[("z",)]] = (None, None)
    c[col[("z",)]] = w.peak
    res = linprog(c, A_ub=np.array(A_ub), b_ub=b_ub, A_eq=np.array(A_eq), b_eq=b_eq,
                  bounds=bounds, method="highs")
    assert res.status == 0
    return res.fun + const


def objective_of(planner: Planner, load: np.ndarray) -> float:
    """The same objective evaluated on the planner's schedule (physical quantities)."""
    s, w, dt = planner.schedule(), planner.objective.weights, planner.fleet.horizon.dt_h
    head = load + s.p_kw.sum(axis=1)
    hours = np.arange(head.size) * dt
    return (w.peak * head.max() + w.curtailment * dt * s.curtail_kw.sum()
            + w.throughput * dt * (s.charge_kw + s.discharge_kw).sum()
            + w.ev_delay * dt * (s.ev_kw[:, 0] * hours).sum())


@pytest.mark.parametrize("export_kw", [None, 2.0])
def test_lp_matches_reference_formulation(export_kw):
    fleet, load = small_fleet()
    if export_kw is not None:
        load = load - 15  # midday export so that the limit binds
    obj = ObjectiveConfig(export_limit_kw=export_kw, allow_pv_q=False)
    p = Planner(fleet, empty_grid(fleet, load), obj)
    p.solve_linear()
    ref = reference_lp(fleet, load, obj.weights, export_kw)
    assert objective_of(p, load) == pytest.approx(ref, rel=1e-7, abs=1e-7)
    s = p.schedule()
    head = load + s.p_kw.sum(axis=1)
    if export_kw is not None:
        assert head.min() >= -export_kw - 1e-7
        assert s.curtail_kw.sum() > 0


def test_equal_proportional_policy_shares_curtailment():
    fleet, load = small_fleet()
    load = load - 15
    p = Planner(fleet, empty_grid(fleet, load),
                ObjectiveConfig(export_limit_kw=0.0, allow_pv_q=False,
                                curtailment_policy="equal_proportional"))
    p.solve_linear()
    s = p.schedule()
    avail = np.column_stack([v.p_avail_kw for v in fleet.pv])
    on = s.curtail_kw.sum(axis=1) > 1e-6
    assert on.any()
    share = s.curtail_kw[on] / avail[on]
    np.testing.assert_allclose(share[:, 0], share[:, 1], rtol=1e-6)


def test_layout_is_vectorised_blocks():
    fleet, load = small_fleet(T=96)
    p = Planner(fleet, empty_grid(fleet, load), ObjectiveConfig())
    assert p.lay.n_cols == 96 * p.lay.nv + 1
    assert p.lp.n_rows == 96 * 1 + 1 + 96  # battery balance, EV energy, peak rows


def test_row_thinning_keeps_the_most_violated_row_per_interval_and_cluster():
    from derms.dispatch.network import direction_clusters, thin_mask
    s = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    cl = direction_clusters(s)
    assert cl[0] == cl[1] and len({cl[0], cl[2], cl[3]}) == 3  # parallel rows share one
    mask = np.array([[True, True, True, False], [True, False, False, False]])
    score = np.array([[0.1, 0.5, 0.2, 0.0], [0.3, 0.0, 0.0, 0.0]])
    out = thin_mask(mask, score, cl)
    np.testing.assert_array_equal(out, [[False, True, True, False],
                                        [True, False, False, False]])


def test_coarse_clusters_group_rows_by_direction_not_size():
    from derms.dispatch.network import coarse_clusters
    rng = np.random.default_rng(0)
    dirs = np.eye(4)[:3] + 0.01 * rng.standard_normal((3, 4))
    s = np.vstack([dirs[k] * rng.uniform(0.1, 10.0) for k in np.repeat(np.arange(3), 20)]
                  + [np.zeros((1, 4))])
    cl = coarse_clusters(s, k=3)
    assert [len(set(cl[20 * k:20 * k + 20])) for k in range(3)] == [1, 1, 1]
    assert len(set(cl[:60])) == 3 and cl[60] == 3  # the zero row gets the extra id


def test_base_case_values_beyond_a_limit_are_held_even_inside_the_tolerance():
    """DESIGN.md definitions: an element already beyond a limit in the base case may not get
    worse. One just beyond the limit but inside the tolerance used to get the nominal limit,
    which made the LP infeasible for a state the plan did not cause."""
    from derms.analysis.constraints import Limits
    from derms.dispatch.network import network_limits

    v = np.array([[1.0, 1.0505, 1.06, 0.9495, 0.94]])  # inside / beyond the 0.001 pu tolerance
    i = np.array([[100.0, 100.5, 120.0]])  # rating 100 A, tolerance 1 %
    ref = Reference(np.zeros((1, 0)), np.zeros((1, 0)), v, i, np.zeros(1))
    lim = network_limits(ref, np.ones(5, dtype=int), np.full(3, 100.0), Limits())
    # voltages beyond the tolerance held at base + half the 0.001 pu tolerance; inside it
    # at the base value or the limit + half the tolerance, whichever is looser, never
    # past the count's own threshold (limit + tolerance)
    np.testing.assert_allclose(lim.v_max[0], [1.05, 1.0505, 1.0605, 1.05, 1.05])
    np.testing.assert_allclose(lim.v_min[0], [0.95, 0.95, 0.95, 0.9495, 0.9395])
    v2 = np.array([[1.0502, 0.9498, 0.9491, 1.0509]])
    ref2 = Reference(np.zeros((1, 0)), np.zeros((1, 0)), v2, i[:, :1], np.zeros(1))
    lim2 = network_limits(ref2, np.ones(4, dtype=int), np.full(1, 100.0), Limits())
    np.testing.assert_allclose(lim2.v_max[0], [1.0505, 1.05, 1.05, 1.0509])
    np.testing.assert_allclose(lim2.v_min[0], [0.95, 0.9495, 0.9491, 0.95])
    np.testing.assert_allclose(lim.i_max[0], [100.0, 100.5, 120.0])


def test_ev_that_a_thermal_limit_cannot_serve_ends_short_not_infeasible():
    """A branch that carries only the EV (1 A per kW) rated 3 A: the session (12 kWh in 4 h
    at 90 %) can get 4 h x 3 kW x 0.9 = 10.8 kWh. The grid limit holds and the EV ends
    1.2 kWh short, reported, instead of the plan failing."""
    fleet, load = small_fleet()
    T, n = fleet.horizon.n_steps, len(fleet.ders)
    unc = uncontrolled_schedule(fleet)
    j_ev = fleet.der_ids.index("ev1")
    hi = sp.csr_matrix(([1.0], ([0], [j_ev])), shape=(1, n))
    zv = sp.csr_matrix((0, n))
    i_ref = unc.p_kw[:, [j_ev]] * 1.0  # the branch current in the uncontrolled case [A]
    ref = Reference(unc.p_kw, unc.q_kvar, np.zeros((T, 0)), i_ref,
                    load + unc.p_kw.sum(axis=1))
    lim = NetworkLimits(np.zeros((T, 0)), np.zeros((T, 0)), np.full((T, 1), 3.0),
                        np.zeros(0, bool))
    grid = GridContext(DerSensitivity(zv, zv, hi, sp.csr_matrix((1, n))), lim,
                       np.zeros(0, object), np.array(["line.svc"], dtype=object), ref)
    p = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=False))
    p.solve_linear()
    s = p.schedule()
    assert s.ev_kw[:, 0].max() <= 3.0 + 1e-7
    assert s.ev_short_kwh == pytest.approx([1.2], abs=1e-6)
    assert (s.ev_kw[:, 0] * 0.9 * fleet.horizon.dt_h).sum() == pytest.approx(10.8, abs=1e-6)
    # the ledger names the session and the limit that shorts it
    from types import SimpleNamespace

    from derms.dispatch.ledger import build_ledger
    ac = SimpleNamespace(head_p_kw=(load + s.p_kw.sum(axis=1))[:, None],
                         i_a=s.ev_kw[:, :1] * 1.0, v_pu=np.zeros((T, 0)))
    led = build_ledger(p, s, unc, ac)
    row = led.ev_shortfalls.set_index("der_id").loc["ev1"]
    assert row.short_kwh == pytest.approx(1.2, abs=1e-6)
    assert row.delivered_kwh == pytest.approx(10.8, abs=1e-6)
    assert row.reason == "i_max:line.svc"
    # without the limit nothing is short
    p2 = Planner(fleet, empty_grid(fleet, load), ObjectiveConfig(allow_pv_q=False))
    p2.solve_linear()
    assert p2.schedule().ev_short_kwh == pytest.approx([0.0], abs=1e-9)


def test_uncontrolled_ev_leaving_after_the_horizon_charges_from_arrival():
    """A session that leaves after the horizon: the plan must put in only what cannot be
    charged after the horizon (here nothing), but the uncontrolled case charges at full
    rate from arrival; it charged nothing, understating the uncontrolled peak (an
    independent sweep: IEEE 13 with a 7 h horizon)."""
    h = Horizon(T0, timedelta(hours=1), 6)
    ev = (EVSession("ev1", C, T0 + timedelta(hours=3), T0 + timedelta(hours=20), 16.0, 7.0,
                    eta_charge=0.8),)
    fleet = Fleet(h, (), (), ev)
    assert fleet_arrays(fleet).ev_e_required_kwh[0] == 0.0
    unc = uncontrolled_schedule(fleet)
    # 7 kW x 0.8 = 5.6 kWh an hour from 03:00: 5.6, 5.6, then the 4.8 kWh left
    np.testing.assert_allclose(unc.ev_kw[:, 0], [0, 0, 0, 7.0, 7.0, 4.8 / 0.8])


def test_sessions_and_windows_outside_the_horizon_are_not_controllable():
    """``n_controllable_ders`` counted EV sessions wholly after the horizon (an independent
    sweep, IEEE 123 with a short horizon): only DERs the plan can move in some interval."""
    from derms.der.models import FlexibleLoad, controllable_in_horizon

    h = Horizon(T0, timedelta(hours=1), 6)
    ev = (EVSession("in", C, T0 + timedelta(hours=2), T0 + timedelta(hours=9), 5.0, 7.0),
          EVSession("after", C, T0 + timedelta(hours=7), T0 + timedelta(hours=9), 5.0, 7.0),
          EVSession("before", C, T0 - timedelta(hours=5), T0 - timedelta(hours=1), 0.0, 7.0),
          # plugged in for 30 min inside one hour-long interval: no whole interval
          EVSession("short", C, T0 + timedelta(hours=1, minutes=10),
                    T0 + timedelta(hours=1, minutes=40), 0.0, 7.0))
    base = np.full(6, 2.0)
    fl = (FlexibleLoad("fl_in", C, base, T0, T0 + timedelta(hours=3)),
          FlexibleLoad("fl_out", C, base, T0 + timedelta(hours=8), T0 + timedelta(hours=9)))
    pv = (PVInverter("pv_night", C, 5.0, np.zeros(6)),)
    bat = (Battery("b1", C, 5.0, 12.0),)
    fleet = Fleet(h, pv, bat, ev, fl)
    mask = controllable_in_horizon(fleet)
    got = dict(zip(fleet.der_ids, mask.tolist()))
    assert got == {"pv_night": True, "b1": True, "in": True, "after": False, "before": False,
                   "short": False, "fl_in": True, "fl_out": False}


@pytest.mark.parametrize("limit", [-1e20, 1e20, float("nan"), float("-inf")])
def test_an_export_limit_highs_would_read_as_no_bound_is_refused(limit):
    """-1e20 kW reached HiGHS as 'no bound' and the plan came out worse than leaving the
    DERs alone (an independent sweep); every entry point builds an ObjectiveConfig."""
    from derms.dispatch.plan import ObjectiveConfig
    from derms.errors import InputError

    with pytest.raises(InputError, match="export limit"):
        ObjectiveConfig(export_limit_kw=limit)
    assert ObjectiveConfig(export_limit_kw=-5e8).export_limit_kw == -5e8
