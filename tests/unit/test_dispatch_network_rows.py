"""Network rows of the dispatch LP: regulator bands and margins learned from AC results
(small synthetic networks; the AC-side behaviour is in tests/validation/test_dispatch_*)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from derms.dispatch.network import DerSensitivity, NetworkLimits, Reference, SensitivitySet
from derms.dispatch.plan import GridContext, ObjectiveConfig, Planner, uncontrolled_schedule
from tests.unit.test_dispatch_lp import small_fleet


def _grid(fleet, load, v_ref, dv_dp, band=None):
    """One monitored node with sensitivity ``dv_dp`` [pu/kW] to every DER."""
    T, n = fleet.horizon.n_steps, len(fleet.ders)
    unc = uncontrolled_schedule(fleet)
    hv = sp.csr_matrix(np.full((1, n), dv_dp))
    z1, z0 = sp.csr_matrix((1, n)), sp.csr_matrix((0, n))
    ref = Reference(unc.p_kw, unc.q_kvar, np.full((T, 1), v_ref), np.zeros((T, 0)),
                    load + unc.p_kw.sum(axis=1))
    lim = NetworkLimits(np.full((T, 1), 1.05), np.full((T, 1), 0.95), np.zeros((T, 0)),
                        np.ones(1, bool))
    if band is not None:
        lim = replace(lim, band_node=np.array([0]), band_lo_pu=np.array([band[0]]),
                      band_hi_pu=np.array([band[1]]))
    return GridContext(DerSensitivity(hv, z1, z0, z0), lim, np.array(["reg.1"], object),
                       np.zeros(0, object), ref), unc


def test_regulator_band_rows_hold_the_monitored_node_inside_the_band():
    """A battery discharging at the peak raises the monitored node: without a band only
    the 1.05 pu limit binds; with the band (never tighter than the reference) the node
    stays at or below the band's top, so the taps the reference found stay put."""
    fleet, load = small_fleet()
    dv = -0.002  # pu per kW of net import: exporting raises the voltage
    obj = ObjectiveConfig(allow_pv_q=False)
    for band, top in ((None, 1.05), ((1.030, 1.041), 1.041)):
        grid, unc = _grid(fleet, load, 1.040, dv, band)
        p = Planner(fleet, grid, obj)
        p.net.band_on[:] = True  # plan_and_verify switches intervals on after an AC round
        p.recenter(grid.uncontrolled)
        p.solve_linear()
        v = 1.040 + dv * (p.schedule().p_kw - unc.p_kw).sum(axis=1)
        assert v.max() <= top + 1e-5  # rows are in u = (V^2 - V0^2) / (2 V0)
        if band is None:
            assert v.max() > 1.041 + 1e-6  # the band is what binds in the second case


def test_band_is_never_tighter_than_the_reference():
    """A reference already outside the band (a regulator at its last tap) is the limit."""
    fleet, load = small_fleet()
    grid, _unc = _grid(fleet, load, 1.045, -0.002, (1.030, 1.041))
    p = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=False))
    np.testing.assert_allclose(p.net.limit_term("v_max"),  # bands off: 1.05 pu, u-form
                               (1.05**2 - 1.045**2) / (2 * 1.045))
    p.net.band_on[:] = True
    u = p.net.limit_term("v_max")
    np.testing.assert_allclose(u, 0.0, atol=1e-12)  # limit = the reference value


def test_each_interval_group_uses_its_own_sensitivities():
    """A SensitivitySet: intervals served by a part with twice the sensitivity get rows
    (and linear predictions) twice as steep, so the plan moves half as much there."""
    fleet, load = small_fleet()
    T = fleet.horizon.n_steps
    dv = -0.002
    grid, unc = _grid(fleet, load, 1.048, dv)
    s1 = grid.sens
    s2 = DerSensitivity(s1.hv_p * 2.0, s1.hv_q, s1.hi_p, s1.hi_q)
    of_t = (np.arange(T) >= T // 2).astype(np.int64)      # second half: steeper
    sset = SensitivitySet((s1, s2), of_t)
    p = Planner(fleet, replace(grid, sens=sset), ObjectiveConfig(allow_pv_q=False))
    x = np.zeros(p.lay.n_cols)
    rng = np.random.default_rng(0)
    x[: p.lay.z] = rng.uniform(0, 1, p.lay.z)
    one = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=False))
    a, b = p.net.lhs("v_max", x), one.net.lhs("v_max", x)
    np.testing.assert_allclose(a[of_t == 0], b[of_t == 0])
    np.testing.assert_allclose(a[of_t == 1], 2.0 * b[of_t == 1])
    assert p.net.sens_at(T - 1) is s2 and p.net.sens_at(0) is s1
    # rows added in both halves carry their own part's coefficients
    p.net.add("v_max", np.ones((T, 1), bool))
    rows = p.net.row["v_max"][:, 0]
    p.solve_linear()
    v = 1.048 + dv * (1 + of_t) * (p.schedule().p_kw - unc.p_kw).sum(axis=1)
    assert v.max() <= 1.05 + 1e-5 and rows.min() >= 0
    with np.testing.assert_raises(ValueError):
        SensitivitySet.of(sset, T + 1)


def test_trust_region_holds_the_ders_that_are_not_movers():
    """Local repair: only the movers' columns get the region; every other DER keeps its
    schedule from the centre exactly (energy columns of a held battery included)."""
    fleet, load = small_fleet()
    grid, _unc = _grid(fleet, load, 1.040, -0.002)
    p = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=False))
    x0 = p.solve_linear().copy()
    centre = p.schedule()
    n = len(fleet.ders)
    movers = np.zeros(n, bool)
    movers[0] = True
    p.trust_region(x0, 0.5, movers)
    p.lp.set_costs(np.array([p.lay.z]), np.array([0.0]))     # another objective: no peak
    p.solve_linear()
    moved = np.abs(p.schedule().p_kw - centre.p_kw).max(axis=0) > 1e-9
    assert not moved[1:].any()
    der = p.col_der()
    assert der.shape == (p.lay.nv,) and set(np.unique(der)) <= set(range(-1, n))


def test_trust_region_per_interval_movers_free_the_energy_columns():
    """(T, n_der) movers: a DER moves only in its marked intervals; battery energy then
    follows its power within the SOC bounds (not held at the centre)."""
    fleet, load = small_fleet()
    grid, _unc = _grid(fleet, load, 1.040, -0.002)
    p = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=False))
    x0 = p.solve_linear().copy()
    centre = p.schedule()
    T, n = centre.p_kw.shape
    movers = np.zeros((T, n), bool)
    movers[: T // 2] = True                      # every DER, first half of the horizon
    p.trust_region(x0, 1.0, movers)
    p.lp.set_costs(np.array([p.lay.z]), np.array([0.0]))
    p.solve_linear()
    diff = np.abs(p.schedule().p_kw - centre.p_kw)
    assert diff[T // 2:].max() <= 1e-9               # held where not marked
    e = p.lay.index("bat_e").ravel()
    lo, hi = p.lp.h.getLp().col_lower_, p.lp.h.getLp().col_upper_
    np.testing.assert_allclose(np.asarray(lo)[e], p._col_box[0][e])
    np.testing.assert_allclose(np.asarray(hi)[e], p._col_box[1][e])


def test_thermal_rows_come_from_the_point_where_the_branch_is_loaded():
    """Branch 0 is nearly idle at point 0 (its |I| projection there is arbitrary) and
    loaded at point 1: point 0 borrows point 1's row. Branch 1 is loaded at both and keeps
    its own rows. Voltage rows are never touched. Dense and CSR alike."""
    from derms.dispatch.network import thermal_rows_from_loaded_points

    n = 3
    hv = np.arange(2 * n, dtype=float).reshape(2, n)
    p0 = DerSensitivity(hv, hv, np.array([[-0.02, 0.0, 0.1], [1.0, 1.0, 1.0]]),
                        np.array([[0.14, 0.0, 0.0], [0.5, 0.5, 0.5]]))
    p1 = DerSensitivity(hv + 1, hv + 1, np.array([[0.13, 0.0, 0.1], [2.0, 2.0, 2.0]]),
                        np.array([[0.05, 0.0, 0.0], [0.7, 0.7, 0.7]]))
    i_at = np.array([[0.07, 90.0], [0.19, 100.0]])
    for conv in (np.asarray, sp.csr_matrix):
        parts = tuple(DerSensitivity(*(conv(getattr(p, k)) for k in
                                       ("hv_p", "hv_q", "hi_p", "hi_q"))) for p in (p0, p1))
        out = thermal_rows_from_loaded_points(parts, i_at)

        def dense(m):
            return m.toarray() if sp.issparse(m) else np.asarray(m)
        np.testing.assert_allclose(dense(out[0].hi_p), [[0.13, 0.0, 0.1], [1.0, 1.0, 1.0]])
        np.testing.assert_allclose(dense(out[0].hi_q), [[0.05, 0.0, 0.0], [0.5, 0.5, 0.5]])
        np.testing.assert_allclose(dense(out[1].hi_p), dense(parts[1].hi_p))
        np.testing.assert_allclose(dense(out[0].hv_p), hv)


def test_kvar_relieves_a_thermal_row_only_where_it_cannot_overshoot():
    """EPRI ckt24: the tangent d|I|/dQ let four PV inverters inject full kvar all night
    behind a service transformer carrying 7 kvar, to make room for EV charging; its flow
    turned 15 kvar leading and the AC check found it up to 11 points over its base value.
    A branch whose reactive current the DERs' kvar could overshoot takes kvar as
    |S_q| |q| (pv_qa and pv_qi both count against it); a feeder head keeps the tangent."""
    fleet, load = small_fleet()
    T, n = fleet.horizon.n_steps, len(fleet.ders)
    unc = uncontrolled_schedule(fleet)
    # two branches, the same DERs behind both: sin(phi) = 0.05 / |0.2 + 0.05 j| = 0.24
    hi_p = sp.csr_matrix(np.full((2, n), 0.2))
    hi_q = sp.csr_matrix(np.full((2, n), 0.05))
    z = sp.csr_matrix((0, n))
    i_ref = np.tile([2.0, 100.0], (T, 1))  # a small transformer and a feeder head [A]
    ref = Reference(unc.p_kw, unc.q_kvar, np.zeros((T, 0)), i_ref,
                    load + unc.p_kw.sum(axis=1))
    lim = NetworkLimits(np.zeros((T, 0)), np.zeros((T, 0)), i_ref + 1.0, np.zeros(0, bool))
    grid = GridContext(DerSensitivity(z, z, hi_p, hi_q), lim, np.zeros(0, object),
                       np.array(["transformer.t1.1", "line.head.1"], object), ref)
    p = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=True))
    p.recenter(ref)
    net = p.net
    # the PVs' kvar could inject (4.84 + 2.64) x 0.206 = 1.5 A of reactive current, more
    # than the transformer's 2 x 0.24 = 0.49 A, far less than the head's 24 A
    np.testing.assert_array_equal(net.q_abs, [True, False])
    g = net.g_rows("i_max", np.array([0, 1])).toarray()
    qa, qi = p.lay.local("pv_qa"), p.lay.local("pv_qi")
    np.testing.assert_allclose(g[0, qa], 0.05)
    np.testing.assert_allclose(g[0, qi], 0.05)   # injecting counts against it too
    np.testing.assert_allclose(g[1, qa], 0.05)
    np.testing.assert_allclose(g[1, qi], -0.05)  # the head: injection relieves
    # the linear values of every row agree with those coefficients
    x = np.zeros(p.lay.n_cols)
    x[p.lay.index("pv_qi")] = 1.5
    lin = net.lhs("i_max", x)
    np.testing.assert_allclose(lin[:, 0], 2 * 1.5 * 0.05)
    np.testing.assert_allclose(lin[:, 1], -2 * 1.5 * 0.05)


def _thermal_grid(fleet, load, i_ref_a, i_max_a, di_dp_a_per_kw, *, large=True):
    """One branch conductor whose |I| moves ``di_dp_a_per_kw`` [A/kW] with each DER's net
    import, at ``i_ref_a`` [A] in every interval of the reference, rated ``i_max_a``."""
    T, n = fleet.horizon.n_steps, len(fleet.ders)
    unc = uncontrolled_schedule(fleet)
    hi_p = sp.csr_matrix(np.asarray(di_dp_a_per_kw, float).reshape(1, n))
    z = sp.csr_matrix((0, n))
    ref = Reference(unc.p_kw, unc.q_kvar, np.zeros((T, 0)), np.full((T, 1), i_ref_a),
                    load + unc.p_kw.sum(axis=1))
    lim = NetworkLimits(np.zeros((T, 0)), np.zeros((T, 0)), np.full((T, 1), i_max_a),
                        np.zeros(0, bool))
    return GridContext(DerSensitivity(z, z, hi_p, sp.csr_matrix((1, n))), lim,
                       np.zeros(0, object), np.array(["line.service.1"], object), ref,
                       large=large), unc


def test_a_lazy_row_brings_its_elements_near_rows_of_the_other_intervals():
    """Large-feeder rules: a branch the linear plan overloads in some intervals gets its
    rows in every interval where it is near its limit at the reference, not only in
    those: one interval at a time, the battery behind it moved its charging to the
    intervals without a row, round after round (EPRI ckt7 seed 3: the linear rounds ran
    out with a service line at 379 A against 299 in the linear model itself)."""
    fleet, load = small_fleet()
    T = fleet.horizon.n_steps
    n_pv = len(fleet.pv)
    sens = np.zeros(len(fleet.ders))
    sens[n_pv] = 1.0                           # the battery alone: +1 A per kW charged
    grid, unc = _thermal_grid(fleet, load, 97.0, 100.0, sens)
    p = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=False))
    assert (p.net.row["i_max"] < 0).all()     # nothing beyond the limit: no row at first
    x, _rv, _du = p.lp.solve()
    over = p.net.lhs("i_max", x) > p.net.rhs("i_max") + 1e-6
    assert over.any() and not over.all()       # charging overloads some intervals
    assert p.net.add_violated(x) == T          # ... and the branch gets a row in all
    assert (p.net.row["i_max"] >= 0).all()
    p.solve_linear()
    i = 97.0 + (p.schedule().p_kw - unc.p_kw)[:, n_pv]
    assert i.max() <= 100.0 + 1e-6


def test_small_feeder_rules_add_only_the_violated_rows():
    """The small-feeder rules keep their near rows from the start; a row added later
    (an AC violation) is that row alone."""
    fleet, load = small_fleet()
    T = fleet.horizon.n_steps
    sens = np.zeros(len(fleet.ders))
    sens[len(fleet.pv)] = 1.0
    grid, _unc = _thermal_grid(fleet, load, 50.0, 100.0, sens, large=False)
    p = Planner(fleet, grid, ObjectiveConfig(allow_pv_q=False))
    assert p.net.lazy_near is None
    mask = np.zeros((T, 1), bool)
    mask[3] = True
    assert p.net.add_lazy("i_max", mask) == 1
    assert (p.net.row["i_max"] >= 0).sum() == 1


def test_a_ckt7_size_feeder_is_planned_with_the_large_feeder_rules():
    """EPRI ckt7 with the default scenario (2,452 node-phases x 679 DERs, 1.66 M
    sensitivity entries) takes the large-feeder rules; IEEE 123 (278 x 68) does not."""
    from derms.dispatch.network import is_large

    assert is_large(2452, 679)
    assert not is_large(278, 68)


def _pv_only(T=12):
    """Two PVs of unequal kVA and no storage: the export limit is met by curtailment
    alone (the policy's share column is the only way to move them together)."""
    from datetime import timedelta

    from derms.der.models import Fleet, Horizon, PVInverter
    from tests.unit.test_dispatch_lp import T0, C

    h = Horizon(T0, timedelta(hours=1), T)
    sun = np.clip(np.sin(np.linspace(-0.5, 3.6, T)), 0, None)
    pv = (PVInverter("pv1", C, 11.0, 10 * sun), PVInverter("pv2", C, 6.0, 5 * sun))
    return Fleet(h, pv, (), ()), 20 + 8 * np.cos(np.linspace(0, 2 * np.pi, T))


def test_capacity_share_column_is_bounded_by_what_the_policy_rows_admit():
    """proportional_to_capacity: the share column's upper bound is the smallest avail /
    kVA of the interval (finite: a trust region takes a share of each column's range)."""
    from derms.dispatch.lp import capacity_share_max

    fleet, load = _pv_only()
    p = Planner(fleet, _grid(fleet, load, 1.0, 0.0)[0],
                ObjectiveConfig(allow_pv_q=False, curtailment_policy="proportional_to_capacity"))
    hi = p._col_box[1][p.lay.index("share").ravel()]
    a = p.arrays
    np.testing.assert_allclose(hi, (a.pv_avail_kw / a.pv_s_kva).min(axis=1))
    np.testing.assert_allclose(capacity_share_max(a), hi)
    assert np.isfinite(hi).all()


def test_trust_region_lets_the_capacity_share_move():
    """An AC round found the head import 1 kW below the linear model's (losses): the
    re-plan in a trust region around the plan must curtail more. With an unbounded share
    column the region held it (and with it every PV of proportional_to_capacity) at the
    centre, and the re-plan was infeasible (EPRI ckt5, export limit -2500 kW: the plan
    kept 12 kW short in 25 intervals, said "head import at best 2488.0 kW")."""
    fleet, load = _pv_only()
    grid, _unc = _grid(fleet, load, 1.0, 0.0)
    obj = ObjectiveConfig(allow_pv_q=False, curtailment_policy="proportional_to_capacity",
                          export_limit_kw=0.0)  # head import >= 0
    p = Planner(fleet, grid, obj)
    x0 = p.solve_linear().copy()
    s0 = p.schedule()
    head0 = load + s0.p_kw.sum(axis=1)
    binding = head0 < 1e-6
    assert binding.any() and s0.curtail_kw[binding].sum() > 0  # the limit curtails PV
    # the AC result of the plan: 1 kW less import than the linear model said
    ac = Reference(s0.p_kw, s0.q_kvar, grid.uncontrolled.v_pu, grid.uncontrolled.i_a,
                   head0 - 1.0)
    p.recenter(ac)
    p.trust_region(x0, 0.5)
    p.solve_linear()
    s1 = p.schedule()
    more = (s1.curtail_kw - s0.curtail_kw).sum(axis=1)
    np.testing.assert_allclose(more[binding], 1.0, atol=1e-6)  # the 1 kW, by curtailment
    # the policy holds: curtailment per kVA equal across the PVs in every interval
    per_kva = s1.curtail_kw / np.array([pv.s_kva for pv in fleet.pv])
    np.testing.assert_allclose(per_kva[:, 0], per_kva[:, 1], atol=1e-7)


def test_kept_plan_note_says_what_it_leaves():
    """The note of a kept plan names what its AC run leaves: violations, export-limit
    misses (beyond EXPORT_TOL_KW), or nothing (it said "the violations it leaves" of a
    plan with none)."""
    from derms.dispatch.verify import _left_text, export_misses

    obj = ObjectiveConfig(export_limit_kw=-2500.0)
    head = np.array([2600.0, 2499.8, 2488.0, 2490.0])
    assert export_misses(obj, head) == (2, 12.0)
    assert export_misses(ObjectiveConfig(), head) == (0, 0.0)
    text = _left_text(0, obj, head)
    assert "violation" not in text and "2 interval(s)" in text and "12.0 kW" in text
    assert "3 voltage/thermal violation(s)" in _left_text(3, obj, head)
    assert "within every limit" in _left_text(0, obj, head + 20.0)
