"""The batched chord-Newton AC of :class:`SiteFlows` against OpenDSS where the loads leave
their normal voltage region: a PV export large enough to push IEEE 13's loads above
Vmaxpu (1.05 pu, where OpenDSS turns every load model into constant Z) and a load large
enough to pull some below Vminpu (0.95 pu, current interpolated towards Vlowpu)."""

from __future__ import annotations

import numpy as np
import pytest

from derms.analysis.hosting_capacity import resolve_sites
from derms.powerflow.collect import build_index
from derms.powerflow.linear import solve_ac_with_injections
from derms.powerflow.linear_newton import SiteFlows


@pytest.mark.parametrize("p_kw", [-6000.0, 2500.0])  # net import: export, load
def test_siteflows_matches_opendss_outside_the_normal_region(ieee13, p_kw):
    sites = resolve_sites(ieee13, ["675", "680", "634"])
    sf = SiteFlows(ieee13, build_index(ieee13))
    triples = sf.site_matrix([s.node_names for s in sites])
    p = np.full(len(sites), p_kw)
    state = sf.solve(triples, p, tol_pu=1e-9, max_iter=30)
    assert state.converged.all()
    v_model = sf.voltages_pu(state)
    outside = 0
    for j, s in enumerate(sites):
        n = len(s.nodes)
        v_ac = solve_ac_with_injections(ieee13, s.node_names, np.full(n, p_kw / n),
                                        np.zeros(n))
        live = v_ac > 0.5
        outside += int(((v_ac[live] > 1.05) | (v_ac[live] < 0.95)).sum())
        assert np.abs(v_model[live, j] - v_ac[live]).max() < 2e-4, s.bus
    assert outside > 0  # the scenarios do reach the other voltage regions
