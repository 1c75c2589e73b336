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
import scipy.sparse as sp

from derms.analysis.constraints import Limits
from derms.der.models import Fleet, check_group_requests, fleet_arrays
from derms.dispatch import EXPORT_LIMIT_MAX_KW
from derms.dispatch.lp import (
    INF,
    HighsLP,
    Layout,
    Policy,
    RowBlock,
    Weights,
    der_columns,
    der_rows,
    net_import_maps,
)
from derms.dispatch.network import (
    NEAR_ROWS_PER_COL,
    DerSensitivity,
    NetworkLimits,
    NetworkRows,
    Reference,
    SensitivitySet,
    der_box,
    is_large,
)
from derms.errors import InfeasibleError, InputError

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
    ``loss_weight`` [per kWh of losses]: prices network losses with a linear proxy, the
    marginal loss factor of each DER (``GridContext.loss_p``/``loss_q``: kW of losses per
    kW/kvar of its net import, ``sum_k 2 R_k I0_k d|I_k|/dp`` over branch conductors,
    ``R_k`` from each element's losses at the linearisation point) scaled in each
    interval by the reference head import over the head import at that point (marginal
    losses grow with the current and change sign with reverse flow); 0 leaves it out.
    ``peak_element`` (an OpenDSS element, e.g. "transformer.t1"): also minimise the
    peak power into that element's terminal 1, weighted by ``peak_element_weight`` per
    kW (linear: the DERs downstream of it move its flow 1:1, losses left out). All
    terms add up; set ``weights.peak`` to 0 to optimise only the element's peak.
    """

    weights: Weights = field(default_factory=Weights)
    export_limit_kw: float | None = None
    curtailment_policy: Policy = "cost_minimal"
    allow_pv_q: bool = True
    limits: Limits = field(default_factory=Limits)
    max_linear_rounds: int = 8
    loss_weight: float = 0.0
    peak_element: str | None = None
    peak_element_weight: float = 1.0

    def __post_init__(self) -> None:
        x = self.export_limit_kw
        if x is not None and not (np.isfinite(x) and abs(x) < EXPORT_LIMIT_MAX_KW):
            # HiGHS reads a bound of 1e20 or more as none: -1e20 asked for an impossible
            # import and got a plan worse than leaving the DERs alone (an independent sweep)
            raise InputError(f"export limit {x:g} kW: expected a finite number within "
                             f"±{EXPORT_LIMIT_MAX_KW:g} kW")


@dataclass(frozen=True)
class GridContext:
    """What the planner needs from the network: DER sensitivities, limits relative to the
    base case, element names, and the AC result of the uncontrolled schedule."""

    sens: DerSensitivity | SensitivitySet  # row sensitivities (one per interval group)
    limits: NetworkLimits
    node_names: np.ndarray
    branch_names: np.ndarray
    uncontrolled: Reference
    loss_p: np.ndarray | None = None  # (n_der,) kW of losses per kW of net import
    loss_q: np.ndarray | None = None  # (n_der,) kW of losses per kvar
    head_lin_kw: float = 0.0  # head import at the linearisation point [kW]
    element_coef: dict[str, np.ndarray] = field(default_factory=dict)  # (n_der,) 1 downstream
    v_nominal_pu: tuple[float, float] = (0.95, 1.05)  # the limits before the base-case hold
    # a large feeder's planning rules (row screening, thinning) whatever the columns: a
    # fleet planned as groups is as large as its members (it was planned with every
    # near-limit row once 882 DERs became 230 groups: 99,541 rows, infeasible, 363 s)
    large: bool = False


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
    ev_short_kwh: np.ndarray | None = None  # (n_ev,) energy an EV ends short of its need

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
        self._ref_for_costs = grid.uncontrolled
        cost = self._extra_costs(cost)
        rows = der_rows(lay, a, fleet, self.ep, self.cp, policy=objective.curtailment_policy)
        self.lp = HighsLP(cost, lo, hi, rows)
        self._col_box = (lo, hi)  # the DER columns' own bounds (trust regions shrink them)
        self.ev_short_cols = self._add_ev_shortfall(rows.kind, a.ev_e_required_kwh)
        big = grid.large or is_large(len(grid.node_names), len(fleet.ders))
        self.net = NetworkRows(self.lp, lay, grid.sens, self.ep, self.eq, self.cp, grid.limits,
                               der_box(a, objective.allow_pv_q), objective.export_limit_kw,
                               grid.node_names, grid.branch_names,
                               near_pu=0.01, near_frac=0.1, thin=big)
        self._add_element_peak()
        self.net.set_reference(grid.uncontrolled)
        self._set_extra_bounds()
        self.notes: list[str] = []  # what the planner changed on its own, for the report
        if not big:  # near-limit rows by the hundred thousand (a feeder held near a limit
            # everywhere): rows beyond the limit first and the rest lazily, as on large ones
            n_near = self.net.count_initial()
            if n_near > NEAR_ROWS_PER_COL * lay.n_cols:
                self.net.use_large_rules()
                self.notes.append(
                    f"{n_near:,} network rows are within 0.01 pu or 10 % of their limit in "
                    f"the uncontrolled case ({n_near / lay.n_cols:.1f} per LP column): "
                    "planned with the large-feeder rules (rows added where the plan "
                    "reaches a limit)")
        self.n_initial_rows = self.net.initial_rows()
        self.build_s = time.perf_counter() - t0
        self.x: np.ndarray | None = None
        self.duals: np.ndarray | None = None
        self.row_values: np.ndarray | None = None

    def update(self, fleet: Fleet, reference: Reference | None = None,
               limits: NetworkLimits | None = None) -> None:
        """Warm re-plan input: the same DERs (same order and kinds) and horizon length with
        new forecasts, initial SOCs, EV needs or windows, and optionally a new reference.
        Only column bounds, costs and row bounds change in the kept HiGHS model (its basis
        is reused); network rows already added stay, new near-limit ones are added.
        Raises :class:`InputError` when the LP's structure would change (another number
        of DERs or steps, group requests, the "equal_proportional" policy)."""
        t0 = time.perf_counter()
        a = fleet_arrays(fleet)
        lay = Layout.of(a, fleet.horizon.n_steps)
        if (lay.sizes != self.lay.sizes or lay.T != self.lay.T or fleet.requests
                or self.objective.curtailment_policy == "equal_proportional"):
            raise InputError("Planner.update needs the same DERs and steps, no group requests "
                             "and a policy other than equal_proportional; build a new Planner")
        obj = self.objective
        self.fleet, self.arrays = fleet, a
        _ep, _eq, self.cp = net_import_maps(lay, a)
        cost, lo, hi = der_columns(lay, a, obj.weights, policy=obj.curtailment_policy,
                                   allow_q=obj.allow_pv_q)
        self._ref_for_costs = reference or self.net.ref
        cost = self._extra_costs(cost)
        cols = np.arange(lay.n_cols)
        self.lp.set_col_bounds(cols, lo, hi)
        self._col_box = (lo, hi)
        self.lp.set_costs(cols, cost)
        rows = der_rows(lay, a, fleet, self.ep, self.cp, policy=obj.curtailment_policy)
        self.lp.set_row_bounds(np.arange(rows.lo.size), rows.lo, rows.hi)
        self.lp.set_col_bounds(self.ev_short_cols, np.zeros(self.ev_short_cols.size),
                               a.ev_e_required_kwh)
        self.net.cp = self.cp
        if limits is not None:
            self.net.lim = limits
        self.net.set_box(der_box(a, obj.allow_pv_q))
        self.net.set_reference(reference or self.net.ref)
        self._set_extra_bounds()
        self.n_initial_rows += self.net.initial_rows()
        self.update_s = time.perf_counter() - t0

    def _add_ev_shortfall(self, row_kind: np.ndarray, need_kwh: np.ndarray) -> np.ndarray:
        """One column per EV session [kWh, 0 … its need] in its energy row, priced at
        ``weights.ev_shortfall``: a session the network limits cannot serve in full ends
        short (and is reported) instead of making the plan infeasible. Returns the column
        indices (n_ev,)."""
        rows = np.flatnonzero(row_kind == "ev_energy")
        n = rows.size
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        A = sp.csc_matrix((np.ones(n), (rows, np.arange(n))), shape=(self.lp.n_rows, n))
        return self.lp.add_cols(np.full(n, self.objective.weights.ev_shortfall),
                                np.zeros(n), need_kwh.astype(float), A)

    def ev_short_kwh(self, x: np.ndarray | None = None) -> np.ndarray:
        """kWh each EV session (fleet order of EVs) ends short of its need in solution
        ``x`` (default the last)."""
        x = self.x if x is None else x
        return np.maximum(x[self.ev_short_cols], 0.0) if self.ev_short_cols.size else \
            np.zeros(0)

    def solve_linear(self, max_rounds: int | None = None) -> np.ndarray:
        """Solve, then add rows the linear model says are violated and re-solve (warm),
        up to ``max_rounds`` solves (default ``objective.max_linear_rounds``). Returns the
        column values."""
        n = self.objective.max_linear_rounds if max_rounds is None else max_rounds
        for _ in range(max(n, 1)):
            try:
                x, rv, du = self.lp.solve()
            except InfeasibleError:
                if not self._relax_network_rows():
                    raise self.diagnose() from None
                try:
                    x, rv, du = self.lp.solve()
                except InfeasibleError:
                    raise self.diagnose() from None
            if self.net.add_violated(x) == 0:
                break
        self.x, self.row_values, self.duals = x, rv, du
        return x

    def _relax_network_rows(self) -> bool:
        """Where the LP is infeasible and its network rows are hard, make them elastic
        (priced slack) once: True if that was done. The rows the DERs' own constraints
        (EV energy, battery energy, policies, export limit) cannot meet stay hard, and
        are diagnosed as before. IEEE 13 / 123 with EVs at every customer: a current held
        at its base value (13) or at its rating (123) was 0.016 / 2.7 A beyond reach with
        every EV idle in the linear model, whose reference had them charging, while idle
        is the base case; the study was refused."""
        net = self.net
        if net.elastic is not None or not any((r >= 0).any() for r in net.row.values()):
            return False
        n = net.make_elastic()
        self.notes.append(f"the linear model could not meet all {n} network rows at once "
                          "(its error near the base case: every DER idle is the base case): "
                          "they were made elastic, and the "
                          "AC check counts what is left")
        log.info("dispatch network rows made elastic after an infeasible LP: %d", n)
        return True

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
            phys = self._row_physical(int(r), str(k), t, float(rv[r]))
            if phys is None:
                parts.append(f"{k} {e} at {times[t].isoformat()}: needs {lim:.4g}, best "
                             f"reachable {rv[r]:.4g} (short by {short[r]:.4g})")
            else:
                parts.append(f"{k} {e} at {times[t].isoformat()}: {phys}")
        return InfeasibleError(f"no dispatch meets every constraint; {bad.size} constraint(s) "
                               "bind beyond their limits: " + "; ".join(parts))

    def _row_physical(self, r: int, kind: str, t: int, value: float) -> str | None:
        """A network row's relaxed value ``value`` (row units) said in pu or A: the best
        the linear model reaches against the row's limit, and why the limit is where it is
        (the base case's own value for a pre-existing violation; a back-off margin the AC
        check added); an export-limit row as the head import in kW. None for any other
        row."""
        net = self.net
        if kind == "export_limit" and net.ref is not None and net.export_limit_kw is not None:
            # row = the DERs' part of the head import; the rest is the reference's own
            h0 = float(net.ref.head_kw[t] - (net.ref.p_kw[t] - self.cp[t]).sum())
            best, need = value + h0, -net.export_limit_kw
            return (f"head import at best {best:.1f} kW against a minimum of {need:.1f} kW "
                    f"(short by {need - best:.1f} kW; export limit "
                    f"{net.export_limit_kw:g} kW)")
        if kind not in net.row or net.ref is None:
            return None
        hit = np.flatnonzero(net.row[kind][t] == r)
        if hit.size == 0:
            return None
        j = int(hit[0])
        u = value - float(net.at_ref(kind)[t, j])
        m = float(net.margin[kind][t, j])
        if kind == "i_max":
            best, lim, unit = float(net.ref.i_a[t, j]) + u, float(net.lim.i_max[t, j]), "A"
            text = f"best reachable {best:.1f} A against a limit of {lim - m:.1f} A"
        else:
            v0 = max(float(net.ref.v_pu[t, j]), 1e-6)
            best = float(np.sqrt(max(v0**2 + 2 * v0 * u, 0.0)))
            lim = float(getattr(net.lim, kind)[t, j])
            unit = "pu"
            text = (f"best reachable {best:.4f} pu against a limit of "
                    f"{lim + m if kind == 'v_min' else lim - m:.4f} pu")
            nominal = self.grid.v_nominal_pu[0 if kind == "v_min" else 1]
            if abs(lim - nominal) > 1e-9:
                text += (f" (beyond {nominal:.3f} pu already without the DERs, so held to that "
                         "value: DESIGN.md's pre-existing rule)")
        if m > 0:
            text += f"; includes a {m:.4g} {unit} back-off the AC check added"
        return text

    def col_der(self) -> np.ndarray:
        """DER index (fleet order) of every column of one interval's block (nv,); -1 for
        columns that belong to no DER (the policy share)."""
        out = np.full(self.lay.nv, -1, dtype=np.int64)
        ep, eq = self.ep.tocoo(), self.eq.tocoo()
        out[ep.col] = ep.row
        out[eq.col] = eq.row
        L, s = self.lay.local, self.lay.sizes
        n_pv = s["pv_p"]
        out[L("bat_e")] = n_pv + np.arange(s["bat_e"])   # energy columns: their battery
        return out

    def trust_region(self, x_ref: np.ndarray | None, frac: float,
                     movers: np.ndarray | None = None) -> None:
        """Keep the DER columns within ``frac`` of their own range around ``x_ref`` (a
        solution of this LP, so the region holds a point meeting every DER row); ``None``
        restores their own bounds. Large feeders: a re-linearised LP otherwise jumps to
        another of its many near-equal optima (interchangeable batteries), far from the
        point the rows were re-centred on, where the first-order rows are off by up to
        0.03 pu (IEEE 8500) and the regulators answer with other taps. ``movers`` (n_der,)
        or (T, n_der) bool: only those DERs' columns (in those intervals) get the region,
        the others are held at ``x_ref``; with a (T, n_der) mask battery energy columns
        keep their own SOC bounds (the energy follows the power columns)."""
        lo, hi = self._col_box
        z = self.lay.z
        cols = np.arange(z)
        if x_ref is None:
            self.lp.set_col_bounds(cols, lo[:z], hi[:z])
            return
        span = np.where(np.isfinite(hi[:z] - lo[:z]), hi[:z] - lo[:z], 0.0) * frac
        if movers is not None:  # only these DERs (in these intervals) move
            der = np.tile(self.col_der(), self.lay.T)
            m = np.broadcast_to(movers, (self.lay.T, movers.shape[-1]))
            t = np.repeat(np.arange(self.lay.T), self.lay.nv)
            span = np.where((der >= 0) & ~m[t, np.maximum(der, 0)], 0.0, span)
        xr = np.clip(x_ref[:z], lo[:z], hi[:z])
        new_lo, new_hi = np.maximum(lo[:z], xr - span), np.minimum(hi[:z], xr + span)
        if movers is not None and np.ndim(movers) == 2:  # energy follows the power columns
            e = self.lay.index("bat_e").ravel()
            new_lo[e], new_hi[e] = lo[e], hi[e]
        self.lp.set_col_bounds(cols, new_lo, new_hi)

    def recenter(self, ref: Reference) -> None:
        """Re-linearise around an AC-solved plan (row bounds change in place)."""
        self.net.set_reference(ref)
        self._set_extra_bounds()

    # -- optional objective terms --------------------------------------------------------
    def _extra_costs(self, cost: np.ndarray) -> np.ndarray:
        """Add the loss proxy (see :class:`ObjectiveConfig`) to the column costs."""
        obj, g, lay = self.objective, self.grid, self.lay
        if obj.loss_weight == 0 or g.loss_p is None:
            return cost
        mlf = np.asarray(self.ep.T @ g.loss_p).ravel()
        if g.loss_q is not None:
            mlf = mlf + np.asarray(self.eq.T @ g.loss_q).ravel()
        head = np.asarray(self._ref_for_costs.head_kw, dtype=float)
        scale = np.clip(head / max(g.head_lin_kw, 1e-6), -2.0, 2.0)
        add = obj.loss_weight * self.arrays.dt_h * scale[:, None] * mlf[None, :]
        cost = cost.copy()
        cost[: lay.z] += add.ravel()
        return cost

    def _add_element_peak(self) -> None:
        """Epigraph column ``z_e`` and one row per interval for ``peak_element``."""
        self.elem_col = self.elem_rows = None
        name = self.objective.peak_element
        if name is None:
            return
        coef = self.grid.element_coef.get(name.lower())
        if coef is None:
            raise InputError(f"peak_element {name!r} is not watched by the AC network "
                             "(ACNetwork.watch it before planning)")
        lay, T = self.lay, self.lay.T
        col = self.lp.add_cols(np.array([self.objective.peak_element_weight]),
                               np.array([-INF]), np.array([INF]))
        g = np.asarray(self.ep.T @ coef).ravel()
        nz = np.flatnonzero(g)
        t = np.arange(T)
        r = np.repeat(t, nz.size + 1)
        c = np.c_[t[:, None] * lay.nv + nz[None, :], np.full(T, col[0])].ravel()
        v = np.tile(np.r_[g[nz], -1.0], T)
        A = sp.csr_matrix((v, (r, c)), shape=(T, int(col[0]) + 1))
        self.elem_col = int(col[0])
        self.elem_rows = self.lp.add_rows(RowBlock(
            A, np.full(T, -INF), np.zeros(T), np.full(T, "peak_element", dtype=object),
            np.full(T, name.lower(), dtype=object), t))
        self._elem_coef = coef

    def _set_extra_bounds(self) -> None:
        if self.elem_rows is None:
            return
        ref = self.net.ref
        flow = ref.element_kw.get(self.objective.peak_element.lower())
        if flow is None:
            raise InputError(f"reference has no flow of {self.objective.peak_element!r}")
        h0 = flow - (ref.p_kw - self.cp) @ self._elem_coef
        self.lp.set_row_bounds(self.elem_rows, np.full(self.lay.T, -INF), -h0)

    def element_peak_kw(self, x: np.ndarray | None = None) -> float:
        """Linear prediction of the peak at ``peak_element`` [kW] (nan without one)."""
        x = self.x if x is None else x
        return float(x[self.elem_col]) if self.elem_col is not None else float("nan")

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
                        blk("fl_shed"), blk("fl_rec"), blk("gen_p"),
                        ev_short_kwh=self.ev_short_kwh(x))


def uncontrolled_schedule(fleet: Fleet) -> Schedule:
    """The uncontrolled case: PV at its available power, batteries idle, EVs charging at
    full rate from arrival until their session's whole energy is in (or the horizon
    ends: a session that leaves after it charges now, not only what the plan must put in
    within the horizon), flexible loads at baseline, generators at their minimum."""
    a = fleet_arrays(fleet)
    T = fleet.horizon.n_steps
    dt = a.dt_h
    ev = np.zeros((T, a.ev_p_max_kw.size))
    if ev.shape[1]:
        rate = a.ev_p_max_kw * a.ev_window
        before = np.cumsum(rate * a.ev_eta * dt, axis=0) - rate * a.ev_eta * dt
        need = a.ev_e_required_kwh if a.ev_e_needed_kwh is None else np.maximum(
            a.ev_e_needed_kwh, a.ev_e_required_kwh)
        left = np.maximum(need - before, 0.0)
        ev = np.minimum(rate, left / (a.ev_eta * dt))
    n_bat = a.bat_p_max_kw.size
    z = np.zeros((T, n_bat))
    gen = np.broadcast_to(a.gen_p_min_kw, (T, a.gen_p_min_kw.size)).copy()
    p = np.column_stack([-a.pv_avail_kw, z, ev, a.flex_base_kw, -gen])
    return Schedule(fleet, p, np.zeros_like(p), a.pv_avail_kw.copy(),
                    np.zeros_like(a.pv_avail_kw), z, z.copy(),
                    np.broadcast_to(a.bat_e0_kwh, (T, n_bat)).copy(), ev,
                    np.zeros_like(a.flex_base_kw), np.zeros_like(a.flex_base_kw), gen)
