"""Rows "beyond" the LP's limits (what the AC repair and the real-time correction act on)
must include every node-phase the violation count counts (DESIGN.md tolerances,
pre-existing held to the base case)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits, detect_violations
from derms.dispatch.ac_repair_rows import beyond, beyond_at
from derms.dispatch.network import Reference, network_limits


def _ac(base_v: np.ndarray) -> SimpleNamespace:
    T, n = base_v.shape
    ref = Reference(np.zeros((T, 0)), np.zeros((T, 0)), base_v, np.zeros((T, 1)), np.zeros(T))
    lim = network_limits(ref, np.ones(n, dtype=int), np.full(1, 100.0), Limits())
    return SimpleNamespace(limits=Limits(), net_limits=lim)


def _counted(v: np.ndarray, base_v: np.ndarray) -> np.ndarray:
    T, n = v.shape
    rep = detect_violations(pd.date_range("2026-07-01", periods=T, freq="15min", tz="UTC"),
                            0.25, v_pu=v, node_names=np.array([f"n{j}" for j in range(n)]),
                            node_phases=np.ones(n, dtype=int), loading_pct=np.zeros((T, 0)),
                            branch_names=np.array([], dtype=object),
                            branch_phases=np.array([], dtype=int), limits=Limits(),
                            base_v_pu=base_v, base_loading_pct=np.zeros((T, 0)))
    return rep.per_interval


def test_a_node_whose_base_is_inside_the_tolerance_is_beyond_when_counted():
    # base 0.9492 pu: below 0.95 but inside the 0.001 pu tolerance (not pre-existing); the
    # limit is held at 0.9492, and 0.94897 pu is a counted violation (< 0.949)
    base = np.array([[0.9492, 1.0508]])
    v = np.array([[0.94897, 1.05104]])
    ac = _ac(base)
    assert _counted(v, base)[0] == 2
    m = beyond_at(ac, 0, v[0], np.zeros(1))
    assert m["v_min"].tolist() == [True, False]
    assert m["v_max"].tolist() == [False, True]


def test_counted_implies_beyond_and_the_base_case_is_never_beyond():
    rng = np.random.default_rng(3)
    T, n = 4000, 1   # one node: the count per interval is the pair's
    base = rng.uniform(0.946, 1.054, (T, n))
    v = base + rng.uniform(-0.004, 0.004, (T, n))
    ac = _ac(base)
    res = SimpleNamespace(v_pu=v, i_a=np.zeros((T, 1)))
    m = beyond(ac, res)
    n_beyond = (m["v_min"] | m["v_max"]).sum(axis=1)
    counted = _counted(v, base)
    assert counted.sum() > 100
    assert (n_beyond >= counted).all()   # every counted pair is beyond
    mb = beyond(ac, SimpleNamespace(v_pu=base, i_a=np.zeros((T, 1))))
    assert not (mb["v_min"] | mb["v_max"]).any()


def test_counted_overload_is_beyond_thermal():
    """The thermal analogue: a base loading inside the tolerance (100-101 %) holds the
    limit at the base current, and half the tolerance past it (100.8 % -> 101.3 %) was
    past the count's 101 %; a base loading above twice the rating, its + 1 point."""
    rng = np.random.default_rng(5)
    T, rating = 4000, 100.0
    base_i = rng.uniform(95.0, 230.0, (T, 1))
    i_a = base_i + rng.uniform(-3.0, 3.0, (T, 1))
    ref = Reference(np.zeros((T, 0)), np.zeros((T, 0)), np.ones((T, 1)), base_i, np.zeros(T))
    lim = network_limits(ref, np.ones(1, dtype=int), np.full(1, rating), Limits())
    ac = SimpleNamespace(limits=Limits(), net_limits=lim)
    m = beyond(ac, SimpleNamespace(v_pu=np.ones((T, 1)), i_a=i_a))["i_max"][:, 0]
    rep = detect_violations(pd.date_range("2026-07-01", periods=T, freq="15min", tz="UTC"),
                            0.25, v_pu=np.ones((T, 1)), node_names=np.array(["n"]),
                            node_phases=np.ones(1, dtype=int),
                            loading_pct=i_a / rating * 100, branch_names=np.array(["b"]),
                            branch_phases=np.ones(1, dtype=int), limits=Limits(),
                            base_v_pu=np.ones((T, 1)), base_loading_pct=base_i / rating * 100)
    counted = rep.per_interval.astype(bool)
    assert counted.sum() > 100
    assert not (counted & ~m).any()   # every counted overload is beyond
    # the base case itself is never beyond
    mb = beyond(ac, SimpleNamespace(v_pu=np.ones((T, 1)), i_a=base_i))["i_max"]
    assert not mb.any()
