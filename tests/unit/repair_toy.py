"""A toy network and scripted corrections for the AC repair's round and revert logic: one
node, its voltage ``1 + slope x`` the DER's net import in each interval; the corrections
of round k give the schedule ``plans[k]``. They stand in for OpenDSS and the corrective
LP, so only :func:`derms.dispatch.ac_repair.repair_plan`'s own logic is under test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits, detect_violations
from derms.dispatch import ac_repair
from derms.dispatch.network import NetworkLimits


class ToyNet:
    """``counted``: violations from the real :func:`detect_violations` (DESIGN.md
    tolerances); otherwise every row beyond the LP's limits counts as one."""

    def __init__(self, T: int, slope: float, counted: bool) -> None:
        self.T, self.slope, self.counted = T, slope, counted
        self.limits = Limits()
        self.net_limits = NetworkLimits(
            v_max=np.full((T, 1), 1.05), v_min=np.full((T, 1), 0.95),
            i_max=np.full((T, 0), np.inf), node_ok=np.ones(1, bool))
        self.fleet = SimpleNamespace(pv=[object()])
        self.capctl = SimpleNamespace(n=0)

    def simulate(self, p_kw: np.ndarray, q_kvar: np.ndarray):
        return SimpleNamespace(v_pu=1.0 + self.slope * p_kw[:, :1], i_a=np.zeros((self.T, 0)),
                               head_p_kw=np.zeros((self.T, 1)))

    def simulate_with(self, p_kw, q_kvar, at_step):
        return self.simulate(p_kw, q_kvar)

    def violations(self, res):
        if not self.counted:
            per_t = ac_repair.per_interval(self, res)
            return SimpleNamespace(counts={"violations_voltage": int(per_t.sum()),
                                           "violations_thermal": 0}, per_interval=per_t)
        return detect_violations(
            pd.date_range("2026-07-01", periods=self.T, freq="15min", tz="UTC"), 0.25,
            v_pu=res.v_pu, node_names=np.array(["n"]), node_phases=np.array([1]),
            loading_pct=np.zeros((self.T, 0)), branch_names=np.array([], dtype=object),
            branch_phases=np.array([], dtype=int), limits=self.limits)


def scripted(monkeypatch, plans: list[list[float]], T: int) -> None:
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
    monkeypatch.setattr(ac_repair, "with_moves",
                        lambda s, p, q: SimpleNamespace(p_kw=p.copy(), q_kvar=q.copy()))
