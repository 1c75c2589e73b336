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
