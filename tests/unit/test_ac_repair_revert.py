"""The AC repair gives an interval its plan back when the correction left it worse: more
rows beyond the LP's limits (half the tolerance), or as many and more pairs counted as
violations (DESIGN.md tolerances). A toy network (one node,
its voltage rising with the DER's net import) and scripted corrections stand in for
OpenDSS and the corrective LP; the counting is the real :func:`detect_violations`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from derms.dispatch import ac_repair
from tests.unit.repair_toy import ToyNet, scripted

T = 3


def _Net():
    return ToyNet(T, 0.01, counted=True)


def _scripted(monkeypatch, plans: list[list[float]]) -> None:
    scripted(monkeypatch, plans, T)


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
