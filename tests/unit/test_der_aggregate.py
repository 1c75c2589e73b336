"""DER aggregation (derms.der.aggregate): groups are compatible and local, and every
member's share of a group's limits is within the member's own limits (an inner
restriction, checked member by member)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from derms.der.aggregate import AggregationConfig, aggregate, singletons
from derms.der.models import (
    Battery,
    Connection,
    DERGroup,
    EVSession,
    Fleet,
    FlexibleLoad,
    GroupRequest,
    Horizon,
    PVInverter,
    fleet_arrays,
)
from derms.errors import InputError

T0 = datetime(2026, 7, 1, tzinfo=UTC)
H = Horizon(T0, timedelta(minutes=15), 96)


def _conn(k: int) -> Connection:
    return Connection(f"b{k}", (1,), 1, 0.24)


def _fleet(n: int = 40, seed: int = 0) -> tuple[Fleet, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = np.clip(np.sin(np.linspace(0, np.pi, 96)), 0, None)
    pv, bat, ev, fl = [], [], [], []
    for k in range(n):
        pv.append(PVInverter(f"pv{k}", _conn(k), float(rng.uniform(5, 6)),
                             shape * float(rng.uniform(4.0, 4.4))))
        bat.append(Battery(f"bat{k}", _conn(k), p := float(rng.uniform(3, 6)),
                           p * float(rng.uniform(2.0, 2.1))))
        ev.append(EVSession(f"ev{k}", _conn(k), T0 + timedelta(hours=18, minutes=15 * (k % 3)),
                            T0 + timedelta(hours=23), float(rng.uniform(8, 25)), 7.2))
        fl.append(FlexibleLoad(f"fl{k}", _conn(k), 2.0 * (1 + shape) * (1 + k % 2),
                               T0 + timedelta(hours=12), T0 + timedelta(hours=20)))
    fleet = Fleet(H, tuple(pv), tuple(bat), tuple(ev), tuple(fl))
    # two locations far apart: DER k at location k % 2
    loc = np.array([[10.0, 0.0], [0.0, 10.0]])
    feats = np.vstack([loc[k % 2] + rng.normal(0, 0.01, 2) for _kind in range(4)
                       for k in range(n)])
    return fleet, feats


def test_groups_are_local_compatible_and_shares_sum_to_one():
    fleet, feats = _fleet()
    agg = aggregate(fleet, feats, AggregationConfig(size=8))
    n = len(fleet.ders)
    assert len(agg.fleet.ders) < n / 3
    np.testing.assert_allclose(np.bincount(agg.group_of, weights=agg.share), 1.0)
    kinds_m, kinds_g = np.array(fleet.kinds), np.array(agg.fleet.kinds)
    assert (kinds_g[agg.group_of] == kinds_m).all()
    side = np.arange(n) % 40 % 2  # the location of every member
    for g in range(len(agg.fleet.ders)):
        assert np.unique(side[agg.group_of == g]).size == 1  # never across locations
    # flexible loads of two baseline shapes never share a group
    gf, _w = agg.of_kind("flex")
    for g in np.unique(gf):
        assert np.unique(np.arange(40)[gf == g] % 2).size == 1


def test_every_member_share_is_within_its_own_limits():
    fleet, feats = _fleet()
    agg = aggregate(fleet, feats, AggregationConfig(size=8))
    a, m = fleet_arrays(agg.fleet), fleet_arrays(fleet)
    g, w = agg.of_kind("pv")
    assert (a.pv_avail_kw[:, g] * w <= m.pv_avail_kw + 1e-9).all()
    assert (a.pv_q_max_kvar[:, g] * w <= m.pv_q_max_kvar + 1e-9).all()
    g, w = agg.of_kind("batteries")
    assert (a.bat_p_max_kw[g] * w <= m.bat_p_max_kw + 1e-9).all()
    np.testing.assert_allclose(a.bat_e_max_kwh[g] * w, m.bat_e_max_kwh)
    np.testing.assert_allclose(a.bat_e0_kwh[g] * w, m.bat_e0_kwh)
    g, w = agg.of_kind("evs")
    assert (a.ev_p_max_kw[g] * w <= m.ev_p_max_kw + 1e-9).all()
    np.testing.assert_allclose(a.ev_e_required_kwh[g] * w, m.ev_e_required_kwh)
    assert (a.ev_window[:, g] <= m.ev_window).all()  # a group charges in its members' windows
    g, w = agg.of_kind("flex")
    np.testing.assert_allclose(a.flex_base_kw[:, g] * w, m.flex_base_kw)
    # what the restriction costs: the members' summed power limits lost are small
    assert (a.bat_p_max_kw.sum() / m.bat_p_max_kw.sum()) > 0.9
    # collect is the transpose of expand's member map
    x = np.arange(len(agg.fleet.ders), dtype=float)
    np.testing.assert_allclose(agg.collect(agg.expand(x)), x)


def test_vpp_request_members_stay_single_and_size_one_is_identity():
    fleet, feats = _fleet(10)
    vpp = DERGroup("vpp", ("bat0", "bat2", "pv4"))
    req = GroupRequest("vpp", T0 + timedelta(hours=17), T0 + timedelta(hours=18), 1.0)
    from dataclasses import replace
    fleet = replace(fleet, groups=(vpp,), requests=(req,))
    agg = aggregate(fleet, feats, AggregationConfig(size=4))
    for d in ("bat0", "bat2", "pv4"):
        assert d in agg.fleet.der_ids
    assert agg.fleet.requests == (req,)
    ident = aggregate(fleet, feats, AggregationConfig(size=1))
    assert ident.fleet is fleet and (ident.share == 1).all()
    assert singletons(fleet).fleet is fleet


def test_auto_size_groups_large_fleets_only(monkeypatch):
    """``size=None`` (auto): every DER on its own below ``AUTO_GROUP_MIN_DERS``, groups of
    ``AUTO_GROUP_SIZE`` from it (the default threshold, 500, lowered to this fleet)."""
    import derms.der.aggregate as aggmod

    fleet, feats = _fleet(10)  # 40 DERs
    n = len(fleet.ders)
    assert AggregationConfig(size=None).resolved(n).size == 1
    assert aggregate(fleet, feats, AggregationConfig(size=None)).fleet is fleet
    monkeypatch.setattr(aggmod, "AUTO_GROUP_MIN_DERS", n)
    assert AggregationConfig(size=None).resolved(n).size == aggmod.AUTO_GROUP_SIZE
    assert AggregationConfig(size=None).resolved(n - 1).size == 1
    assert AggregationConfig(size=2).resolved(n).size == 2  # a size given is kept
    grouped = aggregate(fleet, feats, AggregationConfig(size=None))
    assert len(grouped.fleet.ders) < n
    assert len(grouped.fleet.ders) == len(aggregate(
        fleet, feats, AggregationConfig(size=aggmod.AUTO_GROUP_SIZE)).fleet.ders)


def test_bad_config_and_features_are_refused():
    fleet, feats = _fleet(4)
    with pytest.raises(InputError):
        AggregationConfig(size=0)
    with pytest.raises(InputError, match="one feature row per DER"):
        aggregate(fleet, feats[:3])


def test_pv_by_capacity_groups_only_equal_kva_over_peak():
    """The proportional_to_capacity policy: a member's share of its group's curtailment
    must be its share of the group's kVA, which holds only for equal kVA over peak."""
    fleet, feats = _fleet()
    loose = aggregate(fleet, feats, AggregationConfig(size=8))
    assert (loose.sizes[:len(loose.fleet.pv)] > 1).any()
    assert not loose.pv_follows_capacity()  # kVA over peak differs inside its groups
    strict = aggregate(fleet, feats, AggregationConfig(size=8, pv_by_capacity=True))
    assert strict.pv_follows_capacity()
    # PVs of equal kVA over peak (and shapes) still share a group, its kVA their sum
    from dataclasses import replace
    pv = tuple(replace(p, s_kva=1.25 * float(p.p_avail_kw.max())) for p in fleet.pv)
    same = aggregate(replace(fleet, pv=pv), feats, AggregationConfig(size=8,
                                                                     pv_by_capacity=True))
    g, _w = same.of_kind("pv")
    assert (np.bincount(g) > 1).any() and same.pv_follows_capacity()
    s_g = np.array([p.s_kva for p in same.fleet.pv])
    np.testing.assert_allclose(np.bincount(g, weights=[p.s_kva for p in pv]), s_g)


def test_ev_group_fits_the_whole_intervals_of_its_window():
    """1-h steps, sessions plugged in mid-interval: the group charges from its last
    arrival's next whole interval (18:00), not from 17:40; a group that its window's
    whole intervals cannot charge is not formed (it used to be, and fleet_arrays refused
    the group's fleet although every member can get its energy)."""
    h = Horizon(T0, timedelta(hours=1), 24)
    dep = T0 + timedelta(hours=20, minutes=30)
    evs = (EVSession("ev0", _conn(0), T0 + timedelta(hours=17), dep, 14.0, 7.2),
           EVSession("ev1", _conn(1), T0 + timedelta(hours=17, minutes=40), dep, 5.0, 7.2))
    fleet = Fleet(h, evs=evs)
    fleet_arrays(fleet)  # every member on its own is feasible
    agg = aggregate(fleet, np.ones((2, 2)), AggregationConfig(size=4))
    a = fleet_arrays(agg.fleet)  # so is every group
    g, w = agg.of_kind("evs")
    assert (a.ev_window[:, g] * a.ev_p_max_kw[g] * w <= fleet_arrays(fleet).ev_window
            * fleet_arrays(fleet).ev_p_max_kw + 1e-9).all()
    # the same sessions with room to spare still share a group
    roomy = Fleet(h, evs=tuple(EVSession(e.der_id, e.connection, e.arrival, dep + timedelta(
        hours=2), e.e_needed_kwh, e.p_max_kw) for e in evs))
    assert len(aggregate(roomy, np.ones((2, 2)), AggregationConfig(size=4)).fleet.evs) == 1


def test_member_shortfall_is_each_sessions_own():
    """Sessions that leave after the horizon's end: the group's need within the horizon
    (at the group's rate) is more than its members' shares of their own needs, so a
    group short of its need leaves a member short only of what that member needs."""
    from dataclasses import replace

    from derms.dispatch.members import member_schedule
    from derms.dispatch.plan import uncontrolled_schedule

    h = Horizon(T0, timedelta(hours=1), 24)
    arr, dep = T0 + timedelta(hours=18), T0 + timedelta(hours=30)
    evs = (EVSession("ev0", _conn(0), arr, dep, 60.0, 7.2),
           EVSession("ev1", _conn(1), arr, dep, 30.0, 7.2))
    fleet = Fleet(h, evs=evs)
    agg = aggregate(fleet, np.ones((2, 2)), AggregationConfig(size=4))
    assert len(agg.fleet.evs) == 1
    ga, ma = fleet_arrays(agg.fleet), fleet_arrays(fleet)
    assert ma.ev_e_required_kwh[1] == 0.0 < ma.ev_e_required_kwh[0]
    # the group's plan: 3 kWh short of its need, spread evenly over its window
    s = uncontrolled_schedule(agg.fleet)
    win = ga.ev_window[:, 0]
    kw = (ga.ev_e_required_kwh[0] - 3.0) / (ga.ev_eta[0] * ga.dt_h * win.sum())
    ev = np.where(win, kw, 0.0)[:, None]
    s = replace(s, ev_kw=ev, p_kw=ev.copy(), ev_short_kwh=np.array([3.0]))
    m = member_schedule(agg, s)
    got = (m.ev_kw * ma.ev_eta).sum(axis=0) * ma.dt_h
    np.testing.assert_allclose(m.ev_short_kwh, np.maximum(ma.ev_e_required_kwh - got, 0))
    assert m.ev_short_kwh[1] == 0.0 and m.ev_short_kwh[0] > 0
    assert (m.ev_short_kwh <= agg.share[agg.group_of] * 3.0 + 1e-9).all()


def test_ders_at_one_location_group_without_warnings():
    """More DERs at one location than groups asked for (k-means++ seeding divided by
    zero: NaN probabilities and empty clusters, printed as warnings by the CLI)."""
    import warnings

    fleet, _feats = _fleet(12)
    n = len(fleet.ders)
    feats = np.repeat(np.array([[1.0, 0.0], [0.0, 1.0]]), [n // 2, n - n // 2], axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agg = aggregate(fleet, feats, AggregationConfig(size=2))
    assert len(agg.fleet.ders) < n
    assert np.allclose(np.bincount(agg.group_of, weights=agg.share), 1.0)
