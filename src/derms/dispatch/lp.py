"""Sparse LP of the multi-period DER dispatch, assembled in whole blocks, solved by HiGHS.

Columns are laid out interval by interval: block ``t`` holds ``nv`` variables (PV output
``pv_p`` [kW >= 0], PV reactive absorption/injection ``pv_qa``/``pv_qi`` [kvar >= 0],
battery ``bat_ch``/``bat_dis`` [kW >= 0] and end-of-interval energy ``bat_e`` [kWh], EV
charge ``ev_c`` [kW], flexible-load ``fl_shed``/``fl_rec`` [kW], generator ``gen_p``
[kW], the curtailment share ``share`` of the fairness policy); the last column is the
peak epigraph ``z`` [kW]. Every DER's net import (consumption positive, DESIGN sign
convention) is affine in the columns: ``p_t = Ep @ x_t + cp_t`` and ``q_t = Eq @ x_t``.

Rows are built with vectorised COO index arithmetic (never row by row) and handed to
``highspy.Highs`` once (CSR); later rounds only add rows or change bounds in place so the
solver warm-starts from its last basis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import highspy
import numpy as np
import scipy.sparse as sp

from derms.der.models import Fleet, FleetArrays
from derms.errors import InfeasibleError

INF = highspy.kHighsInf
STALL_MIN_S = 30.0  # a model's first two solves get at least this before the fallback
STALL_S_PER_NNZ = 5e-5  # ... or this per nonzero (generous: a slow but sound solve on a
# loaded machine -- EPRI ckt24's first, 0.9 M nonzeros -- must not be cut short; a fallback
# costs only time, its solution is as optimal); the most any later solve gets
STALL_FACTOR = 3.0  # later solves: this many times the model's longest warm attempt so
STALL_FLOOR_S = 10.0  # far, at least this. 3x is about what the fallback costs: EPRI
# ckt7's IPM took 1.4-5.7x the longest warm simplex before it (11-20 s); IEEE 8500's (36-40
# s against 8-18 s warm) makes a false alarm there the dearest.
# Interior point (crossover on, so the next solve warm-starts from its basis) comes first:
# measured on the stalled LPs, 1 thread, each alone from the dumped model and basis --
#   ckt7 seed 1 after the elastic columns (23,615 x 162,720, 2.6 M nnz): warm dual simplex
#     100 s (212 k it. / 119-129 s in the loop), presolve off warm the same (HiGHS skips
#     presolve when it has a basis: that fallback only restarted the stall), cold presolve
#     on 64 s, off 83 s, IPM 19 s, primal simplex and PDLP > 300 s;
#   IEEE 34, every DER at every customer (9,597 x 45,861): warm > 120 s (582 k it.), cold
#     presolve on 1.3 s, off > 120 s, IPM 6.5 s (5-min steps, when the guard was added:
#     presolve on stalled cold, off 0.3 s, IPM 4 s).
FALLBACKS = ({"solver": "ipm", "presolve": "on"},)
STICKY_AFTER = 2  # solves stalled in a row after which later ones go straight to the
# last fallback (a model on which dual simplex keeps stalling)
_SIMPLEX = {"solver": "choose", "presolve": "choose"}  # HiGHS's defaults
log = logging.getLogger(__name__)
Policy = Literal["cost_minimal", "equal_proportional", "proportional_to_capacity"]
BLOCKS = ("pv_p", "pv_qa", "pv_qi", "bat_ch", "bat_dis", "bat_e", "ev_c", "fl_shed", "fl_rec",
          "gen_p", "share")


@dataclass(frozen=True)
class Layout:
    """Column layout: ``index(name)`` -> (T, n) column numbers of one variable block."""

    T: int
    sizes: dict[str, int]
    offsets: dict[str, int]
    nv: int

    @classmethod
    def of(cls, a: FleetArrays, T: int) -> Layout:
        n_pv, n_bat = a.pv_s_kva.size, a.bat_p_max_kw.size
        n_ev, n_fl, n_gen = a.ev_p_max_kw.size, a.flex_rebound_frac.size, a.gen_p_max_kw.size
        sizes = dict(zip(BLOCKS, (n_pv, n_pv, n_pv, n_bat, n_bat, n_bat, n_ev, n_fl, n_fl,
                                  n_gen, 1)))
        offsets, k = {}, 0
        for name in BLOCKS:
            offsets[name] = k
            k += sizes[name]
        return cls(T, sizes, offsets, k)

    @property
    def n_cols(self) -> int:
        return self.T * self.nv + 1

    @property
    def z(self) -> int:
        return self.T * self.nv

    def index(self, name: str) -> np.ndarray:
        return (np.arange(self.T)[:, None] * self.nv + self.offsets[name]
                + np.arange(self.sizes[name])[None, :])

    def local(self, name: str) -> np.ndarray:
        return self.offsets[name] + np.arange(self.sizes[name])


def net_import_maps(lay: Layout, a: FleetArrays) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """``Ep`` (n_der, nv), ``Eq`` (n_der, nv) and ``cp`` (T, n_der): net import of every DER
    [kW], [kvar] = ``Ep @ x_t + cp_t``, ``Eq @ x_t`` in the fleet's DER order."""
    s = lay.sizes
    n_pv, n_bat, n_ev, n_fl, n_gen = s["pv_p"], s["bat_ch"], s["ev_c"], s["fl_shed"], s["gen_p"]
    rows, cols, vals = [], [], []

    def put(der0, block, sign):
        n = s[block]
        rows.append(der0 + np.arange(n))
        cols.append(lay.local(block))
        vals.append(np.full(n, sign, dtype=float))

    put(0, "pv_p", -1.0)
    put(n_pv, "bat_ch", 1.0)
    put(n_pv, "bat_dis", -1.0)
    put(n_pv + n_bat, "ev_c", 1.0)
    put(n_pv + n_bat + n_ev, "fl_shed", -1.0)
    put(n_pv + n_bat + n_ev, "fl_rec", 1.0)
    put(n_pv + n_bat + n_ev + n_fl, "gen_p", -1.0)
    n_der = n_pv + n_bat + n_ev + n_fl + n_gen
    ep = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(n_der, lay.nv))
    eq = sp.csr_matrix((np.r_[np.ones(n_pv), -np.ones(n_pv)],
                        (np.r_[np.arange(n_pv), np.arange(n_pv)],
                         np.r_[lay.local("pv_qa"), lay.local("pv_qi")])), shape=(n_der, lay.nv))
    cp = np.zeros((lay.T, n_der))
    cp[:, n_pv + n_bat + n_ev: n_pv + n_bat + n_ev + n_fl] = a.flex_base_kw
    return ep, eq, cp


@dataclass(frozen=True)
class Weights:
    """Objective weights (money-like units; only their ratios matter). ``peak`` per kW of
    the largest head import; the rest per kWh (``ev_delay`` per kWh and hour of delay,
    ``q`` per kvarh). ``price_per_kwh`` (T,) prices the head import when given.
    ``ev_shortfall`` per kWh an EV session ends short of its energy: far above every other
    term, so a session is shorted only where a network limit leaves no other way (the grid
    limits come first; the ledger names the limit)."""

    peak: float = 1.0
    curtailment: float = 0.02
    throughput: float = 0.002
    q: float = 0.001
    ev_delay: float = 0.0005
    shed: float = 0.01
    ev_shortfall: float = 100.0
    price_per_kwh: np.ndarray | None = None


def _coo(r, c, v):
    r, c = np.broadcast_arrays(r, c)
    return r.ravel(), c.ravel(), np.broadcast_to(v, r.shape).ravel().astype(float)


def der_columns(lay: Layout, a: FleetArrays, w: Weights, *, policy: Policy, allow_q: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Costs, lower and upper bounds of every column (n_cols,)."""
    T, dt = lay.T, a.dt_h
    lo = np.zeros((T, lay.nv))
    hi = np.zeros((T, lay.nv))
    c = np.zeros((T, lay.nv))
    price = (np.zeros(T) if w.price_per_kwh is None
             else np.broadcast_to(np.asarray(w.price_per_kwh, dtype=float), (T,)))[:, None]
    L = lay.local
    hi[:, L("pv_p")] = a.pv_avail_kw
    c[:, L("pv_p")] = -(w.curtailment + a.pv_curtail_cost) * dt - price * dt
    for b in ("pv_qa", "pv_qi"):
        hi[:, L(b)] = a.pv_q_max_kvar if allow_q else 0.0
        c[:, L(b)] = w.q * dt
    for b, sign in (("bat_ch", 1.0), ("bat_dis", -1.0)):
        hi[:, L(b)] = a.bat_p_max_kw
        c[:, L(b)] = (w.throughput + a.bat_cycle_cost) * dt + sign * price * dt
    lo[:, L("bat_e")] = a.bat_e_min_kwh
    hi[:, L("bat_e")] = a.bat_e_max_kwh
    lo[-1, L("bat_e")] = np.maximum(a.bat_e_min_kwh, np.minimum(a.bat_e_end_min_kwh,
                                                                a.bat_e_max_kwh))
    hi[:, L("ev_c")] = a.ev_p_max_kw * a.ev_window
    hours = (np.arange(T) * dt)[:, None]
    c[:, L("ev_c")] = price * dt + w.ev_delay * dt * hours
    hi[:, L("fl_shed")] = a.flex_shed_max_kw
    hi[:, L("fl_rec")] = a.flex_rebound_max_kw
    c[:, L("fl_shed")] = (w.shed + a.flex_shed_cost) * dt - price * dt
    c[:, L("fl_rec")] = price * dt
    lo[:, L("gen_p")] = a.gen_p_min_kw
    hi[:, L("gen_p")] = a.gen_p_max_kw
    c[:, L("gen_p")] = a.gen_cost * dt - price * dt
    hi[:, L("share")] = (capacity_share_max(a)[:, None] if policy == "proportional_to_capacity"
                         else {"cost_minimal": 0.0, "equal_proportional": 1.0}[policy])
    return (np.r_[c.ravel(), w.peak], np.r_[lo.ravel(), -INF], np.r_[hi.ravel(), INF])


def capacity_share_max(a: FleetArrays) -> np.ndarray:
    """(T,) the largest curtailment per kVA the proportional_to_capacity rows admit in each
    interval (``p = avail - s_kva * share >= 0`` for every PV: the smallest
    ``avail / s_kva``; 0 without PV). An upper bound the rows imply anyway, given as the
    share column's own so its range is finite: a trust region (``Planner.trust_region``,
    a share of each column's range) held an unbounded share column fixed, so no PV's
    curtailment could change in an AC round's re-plan (EPRI ckt5, export limit -2500 kW:
    the head import stayed 12 kW short, the re-plan "infeasible")."""
    s = np.asarray(a.pv_s_kva, dtype=float)
    if s.size == 0:
        return np.zeros(a.pv_avail_kw.shape[0])
    ratio = np.where(s > 0, a.pv_avail_kw / np.where(s > 0, s, 1.0), INF)
    out = ratio.min(axis=1)
    return np.where(np.isfinite(out), np.maximum(out, 0.0), 0.0)


@dataclass(frozen=True)
class RowBlock:
    """Rows in CSR with bounds and tags: ``kind`` (str), ``element`` (str), ``t`` (int)."""

    A: sp.csr_matrix
    lo: np.ndarray
    hi: np.ndarray
    kind: np.ndarray
    element: np.ndarray
    t: np.ndarray


def der_rows(lay: Layout, a: FleetArrays, fleet: Fleet, ep: sp.csr_matrix, cp: np.ndarray,
             *, policy: Policy) -> RowBlock:
    """Battery energy balance, EV energy by departure, flexible-load rebound, fairness
    policy and group requests, as one CSR block."""
    T, dt, X = lay.T, a.dt_h, lay.index
    rs, cs, vs, lo, hi, kind, elem, tt = [], [], [], [], [], [], [], []
    n0 = 0

    def block(r, c, v, lo_, hi_, kind_, elem_, t_):
        nonlocal n0
        r_, c_, v_ = _coo(r, c, v)
        rs.append(r_ + n0)
        cs.append(c_)
        vs.append(v_)
        m = len(lo_)
        lo.append(lo_)
        hi.append(hi_)
        kind.append(np.full(m, kind_, dtype=object))
        elem.append(np.asarray(elem_, dtype=object))
        tt.append(np.asarray(t_, dtype=int))
        n0 += m

    ids = np.array(fleet.der_ids, dtype=object)
    n_pv, n_bat, n_ev = lay.sizes["pv_p"], lay.sizes["bat_ch"], lay.sizes["ev_c"]
    if n_bat:  # e_t - e_{t-1} - eta_c dt ch_t + dt / eta_d dis_t = (e0 at t = 0)
        r = np.arange(T * n_bat).reshape(T, n_bat)
        rhs = np.zeros((T, n_bat))
        rhs[0] = a.bat_e0_kwh
        ones = np.ones((T, n_bat))
        block(np.r_[r.ravel(), r.ravel(), r.ravel(), r[1:].ravel()],
              np.r_[X("bat_e").ravel(), X("bat_ch").ravel(), X("bat_dis").ravel(),
                    X("bat_e")[:-1].ravel()],
              np.r_[ones.ravel(), (-a.bat_eta_ch * dt * ones).ravel(),
                    (dt / a.bat_eta_dis * ones).ravel(), -ones[1:].ravel()],
              rhs.ravel(), rhs.ravel(), "battery_energy",
              np.tile(ids[n_pv:n_pv + n_bat], T), np.repeat(np.arange(T), n_bat))
    if n_ev:  # sum_t eta dt c_t = required energy (every interval: the plug-in window is
        # in the column bounds, so a re-plan changes bounds only)
        r = np.broadcast_to(np.arange(n_ev), (T, n_ev))
        win = np.ones((T, n_ev), dtype=bool)
        block(r[win], X("ev_c")[win], (a.ev_eta * dt * np.ones((T, 1)))[win],
              a.ev_e_required_kwh, a.ev_e_required_kwh, "ev_energy",
              ids[n_pv + n_bat:n_pv + n_bat + n_ev], np.full(n_ev, T - 1))
    n_fl = lay.sizes["fl_shed"]
    if n_fl:  # sum rec - rebound_frac * sum shed = 0
        r = np.broadcast_to(np.arange(n_fl), (T, n_fl))
        block(np.c_[r, r], np.c_[X("fl_rec"), X("fl_shed")],
              np.c_[np.ones((T, n_fl)), -np.broadcast_to(a.flex_rebound_frac, (T, n_fl))],
              np.zeros(n_fl), np.zeros(n_fl), "flex_rebound",
              ids[n_pv + n_bat + n_ev:n_pv + n_bat + n_ev + n_fl], np.full(n_fl, T - 1))
    if n_pv and policy != "cost_minimal":  # p + coef * share_t = avail
        coef = a.pv_avail_kw if policy == "equal_proportional" else np.broadcast_to(
            a.pv_s_kva, (T, n_pv))
        keep = a.pv_avail_kw.ravel() > 0 if policy == "equal_proportional" else np.ones(
            T * n_pv, bool)
        m = int(keep.sum())
        r = np.arange(m)
        share = np.broadcast_to(X("share"), (T, n_pv)).ravel()[keep]
        block(np.c_[r, r], np.c_[X("pv_p").ravel()[keep], share],
              np.c_[np.ones(m), coef.ravel()[keep]], a.pv_avail_kw.ravel()[keep],
              a.pv_avail_kw.ravel()[keep], f"policy_{policy}",
              np.tile(ids[:n_pv], T)[keep], np.repeat(np.arange(T), n_pv)[keep])
    if fleet.requests:  # -(sum of members' net import) >= p_export
        from derms.der.models import _window_mask
        pos = {d: k for k, d in enumerate(fleet.der_ids)}
        groups = {g.group_id: g for g in fleet.groups}
        epd = ep.toarray()
        for req in fleet.requests:
            sel = [pos[m] for m in groups[req.group_id].members]
            row = -epd[sel].sum(axis=0)
            ts = np.flatnonzero(_window_mask(fleet.horizon, req.start, req.end))
            nz = np.flatnonzero(row)
            r = np.repeat(np.arange(ts.size), nz.size)
            c = (ts[:, None] * lay.nv + nz[None, :]).ravel()
            block(r, c, np.tile(row[nz], ts.size),
                  req.p_export_kw + cp[ts][:, sel].sum(axis=1), np.full(ts.size, INF),
                  "group_request", [req.group_id] * ts.size, ts)
    if not lo:
        return RowBlock(sp.csr_matrix((0, lay.n_cols)), *(np.zeros(0),) * 2,
                        *(np.zeros(0, dtype=object),) * 2, np.zeros(0, dtype=int))
    A = sp.csr_matrix((np.concatenate(vs), (np.concatenate(rs), np.concatenate(cs))),
                      shape=(n0, lay.n_cols))
    return RowBlock(A, np.concatenate(lo).astype(float), np.concatenate(hi).astype(float),
                    np.concatenate(kind), np.concatenate(elem), np.concatenate(tt))


class HighsLP:
    """One HiGHS model kept across re-solves: rows are added and bounds/costs changed in
    place, so every solve after the first starts from the previous basis."""

    def __init__(self, cost: np.ndarray, col_lo: np.ndarray, col_hi: np.ndarray,
                 rows: RowBlock) -> None:
        self.h = quiet_highs()
        self.h.setOptionValue("output_flag", False)
        self.h.setOptionValue("threads", 1)
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = cost.size, rows.A.shape[0]
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, col_lo, col_hi
        lp.row_lower_, lp.row_upper_ = rows.lo, rows.hi
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = rows.A.indptr
        lp.a_matrix_.index_ = rows.A.indices
        lp.a_matrix_.value_ = rows.A.data
        self.h.passModel(lp)
        self.kind, self.element, self.t = rows.kind, rows.element, rows.t
        self.n_solves = 0
        self.solve_s = 0.0
        self._fallback = 0  # FALLBACKS used by the latest solve
        self._longest_s: float | None = None  # longest finished attempt after the first
        self._stalls_in_row = 0
        self._kept = False  # STICKY_AFTER reached: the last fallback for good

    @property
    def n_rows(self) -> int:
        return self.kind.size

    def add_rows(self, rows: RowBlock) -> np.ndarray:
        """Append rows; return their indices."""
        A = rows.A.tocsr()
        first = self.n_rows
        if A.shape[0]:
            self.h.addRows(A.shape[0], rows.lo, rows.hi, A.nnz, A.indptr[:-1].astype(np.int32),
                           A.indices.astype(np.int32), A.data)
            self.kind = np.concatenate([self.kind, rows.kind])
            self.element = np.concatenate([self.element, rows.element])
            self.t = np.concatenate([self.t, rows.t])
        return np.arange(first, self.n_rows)

    def add_cols(self, cost: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 A: sp.spmatrix | None = None) -> np.ndarray:
        """Append columns, empty or with entries ``A`` (n_rows x n) in existing rows;
        return their indices."""
        first = self.h.getNumCol()
        n = cost.size
        if A is None:
            self.h.addCols(n, cost, lo, hi, 0, np.zeros(0, np.int32), np.zeros(0, np.int32),
                           np.zeros(0))
        else:
            A = sp.csc_matrix(A)
            self.h.addCols(n, cost, lo, hi, A.nnz, A.indptr[:-1].astype(np.int32),
                           A.indices.astype(np.int32), A.data.astype(float))
        return np.arange(first, first + n)

    def set_row_bounds(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        if idx.size:
            self.h.changeRowsBounds(idx.size, idx.astype(np.int32), lo, hi)

    def set_col_bounds(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        if idx.size:
            self.h.changeColsBounds(idx.size, idx.astype(np.int32), lo, hi)

    def set_costs(self, idx: np.ndarray, cost: np.ndarray) -> None:
        if idx.size:
            self.h.changeColsCost(idx.size, idx.astype(np.int32), cost)

    def solve(self, time_limit_s: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Solve; return (x, row activities, row duals). Raise :class:`InfeasibleError`
        (without naming elements; callers diagnose) when HiGHS finds no optimum.

        ``time_limit_s``: the caller's own budget for this solve (the fast cycle's
        corrective step: 2 s), no stall guard and no fallback (a budget it runs out of is
        an InfeasibleError "Time limit reached").

        Otherwise the solve is a stall guard around HiGHS's default (dual simplex, warm
        from the last basis): it gets :meth:`stall_limit_s`, and past it the next of
        ``FALLBACKS`` (interior point, the last one without a limit). The next solve goes
        back to dual simplex, warm from the fallback's crossover basis, unless
        ``STICKY_AFTER`` solves in a row have stalled. Warm dual simplex stalled on EPRI
        ckt7 (212 k iterations, 119-129 s, where IPM takes 19 s) and IEEE 34 (289 k
        iterations in 61 s, IPM 6.5 s); the numbers are at ``FALLBACKS``."""
        import time
        t0 = time.perf_counter()
        if time_limit_s is not None:
            self.h.setOptionValue("time_limit", self.h.getRunTime() + max(time_limit_s, 0.0))
            run_interruptible(self.h)
            return self._result(t0)
        limit = self.stall_limit_s()
        if not self._kept:
            self._fallback = 0
            for k, v in _SIMPLEX.items():
                self.h.setOptionValue(k, v)
        while True:
            last = self._fallback == len(FALLBACKS)
            # HiGHS's time limit is on the run time of the object, summed over its runs;
            # the last fallback has none
            self.h.setOptionValue("time_limit", highspy.kHighsInf if last
                                  else self.h.getRunTime() + limit)
            ta = time.perf_counter()
            run_interruptible(self.h)
            if self.h.getModelStatus() != highspy.HighsModelStatus.kTimeLimit or last:
                break
            opts = FALLBACKS[self._fallback]
            self._fallback += 1
            log.warning("dispatch_lp stalled after %.0f s (limit %.0f s; %d x %d); retrying "
                        "with %s", time.perf_counter() - t0, limit, self.n_rows,
                        self.h.getNumCol(), opts)
            for k, v in opts.items():
                self.h.setOptionValue(k, v)
        if self.n_solves:  # the first solve is cold and presolved: not a warm one's measure
            self._longest_s = max(self._longest_s or 0.0, time.perf_counter() - ta)
        if not self._kept:
            self._stalls_in_row = self._stalls_in_row + 1 if self._fallback else 0
            self._kept = self._stalls_in_row >= STICKY_AFTER
        return self._result(t0)

    def stall_limit_s(self) -> float:
        """Time [s] the next solve's dual simplex gets before the fallback: a model's first
        two solves max(``STALL_MIN_S``, ``STALL_S_PER_NNZ`` x nonzeros); later ones
        ``STALL_FACTOR`` x the longest attempt that finished since the first (any solver,
        so an interior-point time raises it), at least ``STALL_FLOOR_S``, at most the first
        rule. The first solve (cold, presolved) does not count: IEEE 8500's takes 3.8 s,
        the next (warm) 8.3 s. On EPRI ckt7 the warm solves before the stall took
        0.07-37 s, the stalled one would have run 119-129 s where IPM takes 19 s."""
        cap = max(STALL_MIN_S, STALL_S_PER_NNZ * self.h.getNumNz())
        if self._longest_s is None:
            return cap
        return min(cap, max(STALL_FLOOR_S, STALL_FACTOR * self._longest_s))

    def _result(self, t0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import time
        self.solve_s += time.perf_counter() - t0
        self.n_solves += 1
        status = self.h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            raise InfeasibleError(f"dispatch LP: {self.h.modelStatusToString(status)}")
        sol = self.h.getSolution()
        return (np.asarray(sol.col_value), np.asarray(sol.row_value),
                np.asarray(sol.row_dual))


def run_interruptible(h: highspy.Highs) -> None:
    """``h.run()`` so that a signal stops it: on the main thread HiGHS runs in a thread of
    its own while this one waits, so a signal handler (SIGTERM -> ``SystemExit`` in the
    CLI, Ctrl-C -> ``KeyboardInterrupt``) runs during the solve; the solve is then
    cancelled (HiGHS's interrupt callback, status ``kInterrupt``), waited for, and the
    signal's exception re-raised. An exception of the solve itself is re-raised here
    (highspy's own ``startSolve`` thread only printed it). After a cancel the callbacks
    are restarted: HiGHS kept the interrupt set, and every later run of the object
    stopped at once. Before, a handler waited for ``run()`` to return: minutes on a large
    feeder, an unbounded interior-point fallback at worst. Elsewhere (a server's worker
    thread, where no handler runs) it is ``h.run()``."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        h.run()
        return
    stop = _stop_flag(h)
    stop.clear()
    failed: list[BaseException] = []
    done = threading.Event()  # (not Thread.join: a signal during join marks the thread
    # stopped while it still runs -- CPython's bpo-45274 handling -- and the process then
    # exited under a running solve: "terminate called without an active exception")

    def solve() -> None:
        try:
            h.run()
        except BaseException as exc:  # noqa: BLE001  handed to the waiting thread
            failed.append(exc)
        finally:  # this thread's HiGHS scheduler (as highspy's startSolve does)
            highspy._core._Highs.resetThreadScheduler(False)
            done.set()

    threading.Thread(target=solve, name="highs-solve", daemon=True).start()
    try:
        while not done.wait(0.2):
            pass
    except BaseException:
        stop.set()
        while not done.is_set():
            try:
                done.wait(0.1)
            except BaseException:  # noqa: BLE001  a second signal: keep waiting
                stop.set()
        h.disableCallbacks()  # clears the interrupt HiGHS keeps between runs
        h.enableCallbacks()
        raise
    if failed:
        raise failed[0]


def _stop_flag(h: highspy.Highs):
    """The object's cancel flag (a ``threading.Event``), read by interrupt callbacks of
    its simplex, interior-point and MIP solvers; registered once per object."""
    import threading

    stop = getattr(h, "_derms_stop", None)
    if stop is None:
        stop = h._derms_stop = threading.Event()

        def interrupt(event) -> None:
            if stop.is_set():
                event.interrupt()

        h.cbSimplexInterrupt += interrupt
        h.cbIpmInterrupt += interrupt
        h.cbMipInterrupt += interrupt
    return stop


def quiet_highs():
    """A ``highspy.Highs`` without its banner: HiGHS prints it to the process's stdout (fd 1)
    while constructing, before any option can be set, which polluted the CLI's output."""
    import os
    import sys

    import highspy

    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)

