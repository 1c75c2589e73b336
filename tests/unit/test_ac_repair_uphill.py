"""The AC repair's rounds: a round that leaves more violations than the best is worked on
once more (``RepairConfig.uphill``) without counting against ``rounds``, and the best
schedule seen is what comes back. A toy network (one node per interval, the voltage
rises with the DER's net import) and scripted corrections stand in for OpenDSS and the
corrective LP, so only the round logic is under test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from derms.analysis.constraints import Limits
from derms.dispatch import ac_repair

T = 4


class _Net:
    def __init__(self) -> None:
        self.limits = Limits()
        self.net_limits = SimpleNamespace(
            v_max=np.full((T, 1), 1.05), v_min=np.full((T, 1), 0.95),
            i_max=np.full((T, 0), np.inf), node_ok=np.ones(1, bool))
        self.fleet = SimpleNamespace(pv=[object()])
        self.capctl = SimpleNamespace(n=0)

    def simulate(self, p_kw: np.ndarray, q_kvar: np.ndarray):
        return SimpleNamespace(v_pu=1.0 + 0.1 * p_kw[:, :1], i_a=np.zeros((T, 0)),
                               head_p_kw=np.zeros((T, 1)))

    def simulate_with(self, p_kw, q_kvar, at_step):
        return self.simulate(p_kw, q_kvar)

    def violations(self, res):
        per_t = ac_repair.per_interval(self, res)
        return SimpleNamespace(counts={"violations_voltage": int(per_t.sum()),
                                       "violations_thermal": 0}, per_interval=per_t)


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
