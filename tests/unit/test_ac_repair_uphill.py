"""The AC repair's rounds: a round that leaves more violations than the best is worked on
once more (``RepairConfig.uphill``) without counting against ``rounds``, and the best
schedule seen is what comes back. A toy network (one node per interval, the voltage
rises with the DER's net import) and scripted corrections stand in for OpenDSS and the
corrective LP, so only the round logic is under test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from derms.dispatch import ac_repair
from tests.unit.repair_toy import ToyNet, scripted

T = 4


def _Net():
    return ToyNet(T, 0.1, counted=False)


def _scripted(monkeypatch, plans: list[list[float]]) -> None:
    scripted(monkeypatch, plans, T)


@pytest.mark.parametrize("uphill,expected", [(1, [0, 0, 0, 0]), (0, [1, 0, 0, 0])])
def test_a_worse_round_is_worked_on_once_more(monkeypatch, uphill, expected):
    net = _Net()
    # the plan: 1 violation (interval 0); round 1 leaves 3, round 2 none
    _scripted(monkeypatch, [[1, 1, 1, 0], [0, 0, 0, 0]])
    plan = SimpleNamespace(p_kw=np.array([[1.0], [0], [0], [0]]), q_kvar=np.zeros((T, 1)))
    out = ac_repair.repair_plan(net, plan, net.simulate(plan.p_kw, plan.q_kvar),
                                ac_repair.RepairConfig(rounds=1, uphill=uphill))
    assert out.schedule.p_kw[:, 0].tolist() == expected
    assert [e["violations_after"] for e in out.log] == ([3, 0] if uphill else [3])
    assert ac_repair._count(out.report) == (0 if uphill else 1)


def test_the_best_seen_comes_back_when_the_extra_round_does_not_help(monkeypatch):
    net = _Net()
    _scripted(monkeypatch, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    plan = SimpleNamespace(p_kw=np.array([[1.0], [0], [0], [0]]), q_kvar=np.zeros((T, 1)))
    res = net.simulate(plan.p_kw, plan.q_kvar)
    out = ac_repair.repair_plan(net, plan, res, ac_repair.RepairConfig(rounds=2, uphill=1))
    assert out.schedule is plan and out.result is res  # 1 violation: still the best
    assert [e["violations_after"] for e in out.log] == [3, 2]  # 2: not below 1, stop
