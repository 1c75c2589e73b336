"""HighsLP's stall guard: an attempt that hits its time limit falls back to another HiGHS
setting instead of running for ever (IEEE 34 at 5-min steps: dual simplex after presolve
was still iterating after 15 min; without presolve the LP solves in 0.3 s)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

import derms.dispatch.lp as lp_mod
from derms.dispatch.lp import HighsLP, RowBlock


def _lp() -> HighsLP:
    """min c x, A x >= b, 0 <= x <= 10 (random, feasible)."""
    rng = np.random.default_rng(0)
    n, m = 40, 30
    A = sp.random(m, n, density=0.3, random_state=1, format="csr") + sp.eye(m, n, format="csr")
    b = A @ np.full(n, 2.0)
    rows = RowBlock(sp.csr_matrix(A), b, np.full(m, np.inf), np.full(m, "r", dtype=object),
                    np.full(m, "e", dtype=object), np.zeros(m, dtype=np.int64))
    return HighsLP(rng.uniform(1, 2, n), np.zeros(n), np.full(n, 10.0), rows)


def test_an_attempt_out_of_time_falls_back_and_the_fallback_is_kept(monkeypatch):
    ref_x, _, _ = _lp().solve()
    monkeypatch.setattr(lp_mod, "STALL_MIN_S", 0.0)   # every limited attempt times out
    monkeypatch.setattr(lp_mod, "STALL_S_PER_NNZ", 0.0)
    lp = _lp()
    x, _, _ = lp.solve()                              # presolve off, then IPM (no limit)
    assert lp._fallback == len(lp_mod.FALLBACKS)
    np.testing.assert_allclose(lp.h.getInfo().objective_function_value,
                               float(lp.h.getLp().col_cost_ @ ref_x), rtol=1e-7)
    x2, _, _ = lp.solve()                             # later solves keep the last setting
    np.testing.assert_allclose(x2, x, atol=1e-7)


def test_time_limits_are_per_solve_not_per_model(monkeypatch):
    """HiGHS's time limit counts the model's whole run time: a later solve must get its
    own allowance (set as a plain limit, it returned 'time limit reached' at once once the
    model's total passed it). Cold solves of ~1 ms each until the model's run time is three
    times the 100 ms allowance (an allowance of 20 ms was once overrun by one solve on a
    loaded machine, which is not what this checks)."""
    monkeypatch.setattr(lp_mod, "STALL_MIN_S", 0.1)
    monkeypatch.setattr(lp_mod, "STALL_S_PER_NNZ", 0.0)
    lp = _lp()
    for _ in range(20_000):
        lp.h.clearSolver()
        lp.solve()
        if lp.h.getRunTime() > 0.3:
            break
    assert lp.h.getRunTime() > 0.3 and lp._fallback == 0


def test_a_callers_budget_is_kept():
    """The fast cycle's corrective LP has a 2 s budget; the stall guard replaced it with
    30 s (and fell back to an interior point without any limit)."""
    lp = _lp()
    lp.solve(time_limit_s=0.5)
    limit = lp.h.getOptionValue("time_limit")
    limit = limit[1] if isinstance(limit, tuple) else limit
    assert limit <= lp.h.getRunTime() + 0.5 + 1e-9 and lp._fallback == 0


def test_a_stall_goes_to_interior_point_and_the_next_solve_back_to_simplex(monkeypatch,
                                                                           caplog):
    """EPRI ckt7 (seed 1): a warm dual simplex ran 212 k iterations (119-129 s) where the
    interior point takes 19 s; the first fallback, presolve off, only restarted the same
    simplex (HiGHS skips presolve when it has a basis) and stalled again, and the IPM that
    followed was kept for every later solve (855 s in all). Now a solve after the second
    gets a multiple of the model's longest warm solve so far (here made 0: it stalls), the
    fallback is interior point at once, and the solve after it is dual simplex again, warm
    from the crossover basis."""
    monkeypatch.setattr(lp_mod, "STALL_MIN_S", 1e6)   # the first two solves: no stall
    lp = _lp()
    n = lp.h.getNumCol()
    lp.solve()
    monkeypatch.setattr(lp_mod, "STALL_FACTOR", 0.0, raising=False)  # later solves:
    monkeypatch.setattr(lp_mod, "STALL_FLOOR_S", 0.0, raising=False)  # limit 0
    lp.set_costs(np.arange(n), np.random.default_rng(4).uniform(1, 2, n))
    lp.solve()                         # the cold first solve sets no limit
    assert lp.h.getInfo().ipm_iteration_count == 0 and lp._fallback == 0
    cost = np.random.default_rng(5).uniform(1, 2, n)
    lp.set_costs(np.arange(n), cost)
    with caplog.at_level("WARNING", logger="derms.dispatch.lp"):
        x, _, _ = lp.solve()
    stalls = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
    assert len(stalls) == 1 and "'solver': 'ipm'" in stalls[0], stalls
    assert lp.h.getInfo().ipm_iteration_count > 0
    ref = _lp()
    ref.set_costs(np.arange(n), cost)
    np.testing.assert_allclose(cost @ x, cost @ ref.solve()[0], rtol=1e-7)
    monkeypatch.setattr(lp_mod, "STALL_FACTOR", 1e6, raising=False)
    lp.set_costs(np.arange(n), np.random.default_rng(6).uniform(1, 2, n))
    lp.solve()
    info = lp.h.getInfo()
    assert lp._fallback == 0 and info.ipm_iteration_count == 0 and not lp._kept
