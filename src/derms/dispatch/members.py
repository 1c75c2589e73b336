"""A plan of DER groups (:mod:`derms.der.aggregate`) said per member DER.

Each member takes its fixed share of every quantity of its group; PV curtailment is the
member's own available power minus its share of the group's output (a group's available
power is the least its members allow, so a member may show a little curtailment its
group did not choose).
"""

from __future__ import annotations

import numpy as np

from derms.der.aggregate import Aggregation, singletons
from derms.der.models import fleet_arrays
from derms.dispatch.network import der_map
from derms.dispatch.plan import Schedule


def member_schedule(agg: Aggregation, s: Schedule) -> Schedule:
    """The members' schedule of a schedule of ``agg.fleet`` (returned as is when the
    aggregation is the identity)."""
    if not agg.grouped or s.fleet is agg.members:
        return s

    def ex(x: np.ndarray, kind: str) -> np.ndarray:
        g, w = agg.of_kind(kind)
        return np.asarray(x)[..., g] * w

    a = fleet_arrays(agg.members)
    pv = ex(s.pv_kw, "pv")
    ev = ex(s.ev_kw, "evs")
    short = None
    if s.ev_short_kwh is not None:  # each session's own need less what it gets (a group's
        # need within the horizon can be more than its members' shares of it: sessions
        # that leave after the horizon's end need less of it at their own rate)
        short = np.maximum(a.ev_e_required_kwh - (ev * a.ev_eta).sum(axis=0) * a.dt_h, 0.0)
        short[short < 1e-9] = 0.0
    return Schedule(agg.members, agg.expand(s.p_kw), agg.expand(s.q_kvar), pv,
                    a.pv_avail_kw - pv, ex(s.charge_kw, "batteries"),
                    ex(s.discharge_kw, "batteries"), ex(s.e_kwh, "batteries"),
                    ev, ex(s.shed_kw, "flex"), ex(s.rebound_kw, "flex"),
                    ex(s.gen_kw, "generators"), ev_short_kwh=short)


class MemberView:
    """An aggregating :class:`~derms.dispatch.verify.ACNetwork` seen DER by DER: its
    ``fleet`` is the members, schedules are the members' (T, n_member), sensitivities map
    each member to its own bus. Everything else is the network's own."""

    def __init__(self, ac) -> None:
        self._ac = ac
        self.fleet = ac.members
        self.agg = singletons(ac.members)
        self.cap_parts = ()  # the planner's are the groups': the base-case model instead

    def __getattr__(self, name: str):
        return getattr(self._ac, name)

    def simulate(self, p_kw: np.ndarray, q_kvar: np.ndarray):
        return self._ac.simulate_members(p_kw, q_kvar)

    def simulate_with(self, p_kw: np.ndarray, q_kvar: np.ndarray, at_step):
        return self._ac.simulate_with(p_kw, q_kvar, at_step, members=True)

    def der_map(self, lin=None):
        return der_map(lin or self._ac.lin, self.fleet)
