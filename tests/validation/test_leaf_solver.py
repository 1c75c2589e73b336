"""LeafSolver (block elimination of leaves and line sections, then SuperLU on the core)
against scipy's sparse LU on the network Jacobians of real feeders."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from derms.powerflow.linear_loads import read_branches
from derms.powerflow.network_jacobian import (
    LeafSolver,
    adjoint_rows,
    complex_pairs,
    network_jacobian,
)


def _jacobian(engine):
    engine.solve()
    ckt = engine.circuit
    v_y = complex_pairs(ckt.YNodeVarray)
    jac = network_jacobian(engine, v_y, read_branches(engine, v_y), 0.0)
    names = [s.lower() for s in ckt.YNodeOrder]
    bus = np.unique([s.rsplit(".", 1)[0] for s in names], return_inverse=True)[1]
    return jac.tocsr(), np.repeat(bus, 2)


@pytest.mark.parametrize("feeder", ["ieee13", "ieee123"])
@pytest.mark.parametrize(("rounds", "chains"), [(6, False), (64, True), (3, True)])
def test_solve_matches_sparse_lu(feeder, rounds, chains, request):
    jac, bus2 = _jacobian(request.getfixturevalue(feeder))
    solver = LeafSolver(jac, bus2, max_rounds=rounds, chains=chains)
    b = np.random.default_rng(1).standard_normal((jac.shape[0], 7))
    x_p = solver.solve(b[solver.perm].copy())
    x = np.empty_like(x_p)
    x[solver.perm] = x_p
    ref = spla.splu(jac.tocsc()).solve(b)
    # both backward stable: the same residual, and the same x to what the Jacobian's
    # conditioning allows (its large series admittances make it ~1e8)
    res, res_ref = np.abs(jac @ x - b).max(), np.abs(jac @ ref - b).max()
    assert res <= max(10 * res_ref, 1e-9 * np.abs(b).max())
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
    if chains and rounds == 64:  # a radial feeder reduces to (almost) nothing
        assert jac.shape[0] - solver.core <= max(12, 0.05 * jac.shape[0])


def test_adjoint_rows_same_with_and_without_chains(ieee123):
    jac, bus2 = _jacobian(ieee123)
    jt = jac.T.tocsr()
    n = jac.shape[0]
    c = sp.random(n, 40, density=0.01, random_state=3, format="csc")
    e = sp.random(n, 25, density=0.02, random_state=4, format="csc")
    ref = (spla.splu(jt.tocsc()).solve(c.toarray()).T @ e.toarray())
    for chains, rounds in ((False, 10), (True, 64)):
        got = adjoint_rows(LeafSolver(jt, bus2, max_rounds=rounds, chains=chains), c, e)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
