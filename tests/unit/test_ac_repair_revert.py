"""The AC repair gives an interval its plan back when the correction left it worse: more
rows beyond the LP's limits (half the tolerance), or as many and more pairs counted as
violations (DESIGN.md tolerances). A toy network (one node,
its voltage rising with the DER's net import) and scripted corrections stand in for
OpenDSS and the corrective LP; the counting is the real :func:`detect_violations`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits, detect_violations
from derms.dispatch import ac_repair

T = 3


class _Net:
    def __init__(self) -> None:
        self.limits = Limits()
        self.net_limits = SimpleNamespace(
            v_max=np.full((T, 1), 1.05), v_min=np.full((T, 1), 0.95),
            i_max=np.full((T, 0), np.inf), node_ok=np.ones(1, bool))
        self.fleet = SimpleNamespace(pv=[object()])
        self.capctl = SimpleNamespace(n=0)

    def simulate(self, p_kw: np.ndarray, q_kvar: np.ndarray):
        return SimpleNamespace(v_pu=1.0 + 0.01 * p_kw[:, :1], i_a=np.zeros((T, 0)),
                               head_p_kw=np.zeros((T, 1)))

    def simulate_with(self, p_kw, q_kvar, at_step):
        return self.simulate(p_kw, q_kvar)

    def violations(self, res):
        return detect_violations(
            pd.date_range("2026-07-01", periods=T, freq="15min", tz="UTC"), 0.25,
            v_pu=res.v_pu, node_names=np.array(["n"]), node_phases=np.array([1]),
            loading_pct=np.zeros((T, 0)), branch_names=np.array([], dtype=object),
            branch_phases=np.array([], dtype=int), limits=self.limits)


def _scripted(monkeypatch, plans: list[list[float]]) -> None:
    """Round k's corrections give the schedule ``plans[k]`` (net import per interval)."""
    script = iter(plans)

    class Fix:
        def __init__(self, rows, cur, over, todo, cfg, holds) -> None:
            p = np.array(next(script), float)[:, None]
            self.p, self.q = p, np.zeros_like(p)
            self.moved_kw = self.moved_kvar = 0.0
            self.partial = self.held_failed = 0

        def revert(self, plan, worse) -> None:
            self.p[worse] = plan.p_kw[worse]

    monkeypatch.setattr(ac_repair, "_Correction", Fix)
    monkeypatch.setattr(ac_repair, "RepairRows", lambda ac, **kw: SimpleNamespace(
        cap_part=None))
    monkeypatch.setattr(ac_repair, "cap_holds",
                        lambda ac, res, over, part: np.zeros((T, 0), bool))
    monkeypatch.setattr(ac_repair, "step_intervals", lambda ac, res, bad: set())
    monkeypatch.setattr(ac_repair, "_with_moves",
                        lambda s, p, q: SimpleNamespace(p_kw=p.copy(), q_kvar=q.copy()))


def test_a_correction_that_turns_a_row_within_tolerance_into_a_violation_is_reverted(
        monkeypatch):
    net = _Net()
    # interval 0: 1.06 pu, a violation; interval 1: 1.0507 pu, beyond the LP's limit by
    # more than half the tolerance (a row the repair works on) but not counted
    plan = SimpleNamespace(p_kw=np.array([[6.0], [5.07], [0.0]]), q_kvar=np.zeros((T, 1)))
    res = net.simulate(plan.p_kw, plan.q_kvar)
    assert net.violations(res).per_interval.tolist() == [1, 0, 0]
    assert ac_repair.per_interval(net, res).tolist() == [1, 1, 0]
    # the correction clears interval 0 and takes interval 1 to 1.055 pu: one row beyond
    # the limit there before and after, but now a counted violation
    _scripted(monkeypatch, [[0.0, 5.5, 0.0]])
    out = ac_repair.repair_plan(net, plan, res, ac_repair.RepairConfig(rounds=1, uphill=0))
    assert out.log[0]["reverted"] == [1]
    assert out.schedule.p_kw[:, 0].tolist() == [0.0, 5.07, 0.0]
    assert ac_repair._count(out.report) == 0


def test_fewer_counted_violations_are_kept_though_more_rows_are_beyond():
    net = _Net()
    old = net.simulate(np.array([[6.0], [6.0], [0.0]]), None)  # two counted, two beyond
    new = net.simulate(np.array([[5.07], [5.07], [5.07]]), None)  # none counted, three beyond
    worse = ac_repair._worse(net, new, net.violations(new), old, net.violations(old))
    assert worse.tolist() == [False, False, True]  # only the interval that had nothing
