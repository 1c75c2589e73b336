"""Terminal reactive-power sensitivities of the linear model (what a kvar-type capacitor
control measures) against OpenDSS's AC solve, controls frozen (IEEE 13)."""

from __future__ import annotations

import numpy as np

from derms.powerflow.collect import build_index
from derms.powerflow.linear import build_linear_model, solve_ac_with_injections


def _q_kvar(engine, element: str) -> float:
    c = engine.circuit
    c.SetActiveElement(element)
    nc = c.ActiveCktElement.NumConductors
    return float(np.asarray(c.ActiveCktElement.Powers)[1:2 * nc:2].sum())


def test_flow_kvar_sensitivity_matches_finite_difference(ieee13):
    ix = build_index(ieee13)
    rows = np.flatnonzero(ix.branch_element == "line.670671")
    nodes = ["671.1", "675.2", "634.3"]
    m = build_linear_model(ieee13, nodes, branches=True, flows=rows)
    b = m.branches
    np.testing.assert_array_equal(b.flow_rows, rows)
    assert b.flow_dq_dp.shape == (rows.size, len(nodes))
    q0 = _q_kvar(ieee13, "line.670671")
    np.testing.assert_allclose(b.flow_q0_kvar.sum(), q0, rtol=1e-6)
    for j in range(len(nodes)):
        for dp, dq, sens in ((10.0, 0.0, b.flow_dq_dp), (0.0, 10.0, b.flow_dq_dq)):
            p, q = np.zeros(len(nodes)), np.zeros(len(nodes))
            p[j], q[j] = dp, dq
            solve_ac_with_injections(ieee13, nodes, p, q, restore=False)
            got = _q_kvar(ieee13, "line.670671") - q0
            want = 10.0 * sens[:, j].sum()
            assert abs(got - want) <= 0.02 * 10.0 + 0.01 * abs(got), (j, dp, dq, got, want)
    solve_ac_with_injections(ieee13, nodes, np.zeros(3), np.zeros(3))  # back to the point
    # a kvar drawn downstream passes through the line almost 1:1
    assert 0.9 < b.flow_dq_dq[:, 0].sum() < 1.2
