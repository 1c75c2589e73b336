"""Dispatch planning: objective configuration, the LP with its network rows, schedules.

:class:`Planner` holds one HiGHS model for a fleet and horizon. ``solve_linear`` solves it
and adds lazily the network rows the linear model says the solution violates (warm
re-solves); :mod:`derms.dispatch.verify` re-centres it on AC results. Sign convention:
schedules give each DER's net import ``p_kw`` (consumption positive, a PV exporting
5 kW is -5) and its own quantities (``pv_kw`` output, ``charge_kw``/``discharge_kw``,
``e_kwh``, ``curtail_kw``), per interval ``[t, t + step)``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits
from derms.der.models import Fleet, check_group_requests, fleet_arrays
from derms.dispatch.lp import (
    HighsLP,
    Layout,
    Policy,
    Weights,
    der_columns,
    der_rows,
    net_import_maps,
)
from derms.dispatch.network import (
    DerSensitivity,
    NetworkLimits,
    NetworkRows,
    Reference,
    der_box,
)
from derms.errors import InfeasibleError

log = logging.getLogger(__name__)
_DIAG_TOL = 1e-5
_HARD_ROWS = ("battery_energy", "flex_rebound")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the plan optimises and which optional constraints apply.

    ``weights``: peak at the head, energy price, curtailment, battery throughput, reactive
    power, EV delay, shedding (:class:`~derms.dispatch.lp.Weights`); their small defaults
    make the plan unique. ``export_limit_kw``: the head import must stay >= minus this.
    ``curtailment_policy``: "cost_minimal" (the LP chooses), "equal_proportional" (every
    PV curtailed by the same share of its available power in an interval) or
    ``"proportional_to_capacity"`` (curtailment kW proportional to inverter kVA).
    ``allow_pv_q``: PV inverters may absorb/inject reactive power within their rating.
    """

    weights: Weights = field(default_factory=Weights)
    export_limit_kw: float | None = None
    curtailment_policy: Policy = "cost_minimal"
    allow_pv_q: bool = True
    limits: Limits = field(default_factory=Limits)
    max_linear_rounds: int = 8


@dataclass(frozen=True)
class GridContext:
    """What the planner needs from the network: DER sensitivities, limits relative to the
    base case, element names, and the AC result of the uncontrolled schedule."""

    sens: DerSensitivity
    limits: NetworkLimits
    node_names: np.ndarray
    branch_names: np.ndarray
    uncontrolled: Reference


@dataclass(frozen=True)
class Schedule:
    """A DER schedule: per interval (axis 0) and DER (axis 1, fleet order)."""

    fleet: Fleet
    p_kw: np.ndarray  # net import, consumption positive
    q_kvar: np.ndarray  # net reactive import
    pv_kw: np.ndarray  # PV output (T, n_pv)
    curtail_kw: np.ndarray  # PV available - output (T, n_pv)
    charge_kw: np.ndarray  # battery (T, n_bat)
    discharge_kw: np.ndarray
    e_kwh: np.ndarray  # battery energy at the end of each interval (T, n_bat)
    ev_kw: np.ndarray  # (T, n_ev)
    shed_kw: np.ndarray  # flexible load (T, n_flex)
    rebound_kw: np.ndarray
    gen_kw: np.ndarray  # (T, n_gen)

    def long(self) -> pd.DataFrame:
        """Tidy table ``t, der_id, kind, p_kw, q_kvar`` (net import) plus ``soc_frac``
        (batteries) and ``curtail_kw`` (PV), NaN where not applicable."""
        f = self.fleet
        T, n = self.p_kw.shape
        times = pd.date_range(f.horizon.start, periods=T, freq=f.horizon.step)
        soc = np.full((T, n), np.nan)
        n_pv, n_bat = len(f.pv), len(f.batteries)
        if n_bat:
            e_max = np.array([b.e_max_kwh for b in f.batteries])
            soc[:, n_pv:n_pv + n_bat] = self.e_kwh / e_max
        curt = np.full((T, n), np.nan)
        curt[:, :n_pv] = self.curtail_kw
        return pd.DataFrame({
            "t": times.repeat(n), "der_id": np.tile(np.array(f.der_ids, dtype=object), T),
            "kind": np.tile(np.array(f.kinds, dtype=object), T), "p_kw": self.p_kw.ravel(),
            "q_kvar": self.q_kvar.ravel(), "soc_frac": soc.ravel(), "curtail_kw": curt.ravel(),
        })


class Planner:
    """One LP for a fleet over a horizon on one network (see module docstring)."""

    def __init__(self, fleet: Fleet, grid: GridContext, objective: ObjectiveConfig) -> None:
        t0 = time.perf_counter()
        self.fleet, self.grid, self.objective = fleet, grid, objective
        a = self.arrays = fleet_arrays(fleet)  # EV feasibility checked here
        check_group_requests(fleet, a)
        T = fleet.horizon.n_steps
        self.lay = lay = Layout.of(a, T)
        self.ep, self.eq, self.cp = net_import_maps(lay, a)
        cost, lo, hi = der_columns(lay, a, objective.weights, policy=objective.curtailment_policy,
                                   allow_q=objective.allow_pv_q)
        rows = der_rows(lay, a, fleet, self.ep, self.cp, policy=objective.curtailment_policy)
        self.lp = HighsLP(cost, lo, hi, rows)
        self.net = NetworkRows(self.lp, lay, grid.sens, self.ep, self.eq, self.cp, grid.limits,
                               der_box(a, objective.allow_pv_q), objective.export_limit_kw,
                               grid.node_names, grid.branch_names)
        self.net.set_reference(grid.uncontrolled)
        self.n_initial_rows = self.net.initial_rows()
        self.build_s = time.perf_counter() - t0
        self.x: np.ndarray | None = None
        self.duals: np.ndarray | None = None
        self.row_values: np.ndarray | None = None

    def solve_linear(self) -> np.ndarray:
        """Solve, then add rows the linear model says are violated and re-solve (warm),
        up to ``max_linear_rounds``. Returns the column values."""
        for _ in range(self.objective.max_linear_rounds):
            try:
                x, rv, du = self.lp.solve()
            except InfeasibleError:
                raise self.diagnose() from None
            if self.net.add_violated(x) == 0:
                break
        self.x, self.row_values, self.duals = x, rv, du
        return x

    def diagnose(self) -> InfeasibleError:
        """Why the LP is infeasible: HiGHS's feasibility relaxation (rows only, column
        bounds hard), reported as the rows it had to relax, with their numbers."""
        h = self.lp.h
        kind = self.lp.kind
        # physics rows stay hard (negative penalty); a pu of voltage weighs like 1000 kW/A
        pen = np.where(np.isin(kind, _HARD_ROWS) | np.char.startswith(
            kind.astype(str), "policy"), -1.0, np.where(np.isin(kind, ("v_max", "v_min")),
                                                       1e3, 1.0))
        h.feasibilityRelaxation(-1.0, -1.0, 1.0, None, None, pen)
        sol = h.getSolution()
        rv = np.asarray(sol.row_value)
        lp = h.getLp()
        lo, hi = np.asarray(lp.row_lower_), np.asarray(lp.row_upper_)
        short = np.maximum(lo - rv, 0.0) + np.maximum(rv - hi, 0.0)
        bad = np.flatnonzero(short > _DIAG_TOL)
        if bad.size == 0:
            return InfeasibleError("dispatch LP infeasible; the relaxation names no row")
        bad = bad[np.argsort(-short[bad])]
        times = pd.date_range(self.fleet.horizon.start, periods=self.lay.T,
                              freq=self.fleet.horizon.step)
        parts = []
        for r in bad[:5]:
            k, e, t = self.lp.kind[r], self.lp.element[r], int(self.lp.t[r])
            lim = lo[r] if rv[r] < lo[r] else hi[r]
            parts.append(f"{k} {e} at {times[t].isoformat()}: needs {lim:.4g}, best "
                         f"reachable {rv[r]:.4g} (short by {short[r]:.4g})")
        return InfeasibleError(f"no dispatch meets every constraint; {bad.size} constraint(s) "
                               "bind beyond their limits: " + "; ".join(parts))

    def recenter(self, ref: Reference) -> None:
        """Re-linearise around an AC-solved plan (row bounds change in place)."""
        self.net.set_reference(ref)

    def schedule(self, x: np.ndarray | None = None) -> Schedule:
        x = self.x if x is None else x
        lay, T = self.lay, self.lay.T
        xt = x[: lay.z].reshape(T, lay.nv)

        def blk(name):
            return xt[:, lay.local(name)]

        p = (self.ep @ xt.T).T + self.cp
        q = (self.eq @ xt.T).T
        return Schedule(self.fleet, p, q, blk("pv_p"), self.arrays.pv_avail_kw - blk("pv_p"),
                        blk("bat_ch"), blk("bat_dis"), blk("bat_e"), blk("ev_c"),
                        blk("fl_shed"), blk("fl_rec"), blk("gen_p"))


def uncontrolled_schedule(fleet: Fleet) -> Schedule:
    """The uncontrolled case: PV at its available power, batteries idle, EVs charging at
    full rate from arrival until their energy is in, flexible loads at baseline,
    generators at their minimum."""
    a = fleet_arrays(fleet)
    T = fleet.horizon.n_steps
    dt = a.dt_h
    ev = np.zeros((T, a.ev_p_max_kw.size))
    if ev.shape[1]:
        rate = a.ev_p_max_kw * a.ev_window
        before = np.cumsum(rate * a.ev_eta * dt, axis=0) - rate * a.ev_eta * dt
        left = np.maximum(a.ev_e_required_kwh - before, 0.0)
        ev = np.minimum(rate, left / (a.ev_eta * dt))
    n_bat = a.bat_p_max_kw.size
    z = np.zeros((T, n_bat))
    gen = np.broadcast_to(a.gen_p_min_kw, (T, a.gen_p_min_kw.size)).copy()
    p = np.column_stack([-a.pv_avail_kw, z, ev, a.flex_base_kw, -gen])
    return Schedule(fleet, p, np.zeros_like(p), a.pv_avail_kw.copy(),
                    np.zeros_like(a.pv_avail_kw), z, z.copy(),
                    np.broadcast_to(a.bat_e0_kwh, (T, n_bat)).copy(), ev,
                    np.zeros_like(a.flex_base_kw), np.zeros_like(a.flex_base_kw), gen)
