"""Corrective DER dispatch for the fast control cycle: the smallest weighted change of DER
setpoints that brings violated (and near-violated) network rows back inside their limits.

Two parts:

* :class:`~derms.powerflow.linear_rows.RowSensitivities` (powerflow layer) — the
  sensitivities of *chosen* rows to net-import P and Q at each DER injection point, by
  adjoint solves: one per row, never one per injection point.
* :func:`solve_corrective` — pure numpy/scipy + HiGHS: an LP over the given rows only.
  Columns: each free DER's increase/decrease of P and Q (cost = its weight, e.g. 1 /
  delivery score; Q at ``q_weight`` x that), one aggregate column per injection point
  (the sum of its DERs' changes; rows reference points, so a row has one entry per point,
  not per DER), and an elastic slack per row at a large price. Rows: per point, aggregate =
  sum of its DERs; per network row, the linearised row within its target (limit minus a
  margin). Voltage rows are linear in ``u = (|V|^2 - |V0|^2) / (2 |V0|)`` as in
  :mod:`derms.powerflow.linear` (``d u / d p = d|V| / d p`` at ``V0``); current rows in
  ``|I|``. Rows are scaled to 0.001 pu and to 1 % of the limit, so one slack price fits.

  A row whose slack stays positive cannot be brought to its target with the DERs' present
  ranges: the LP then returns the least remaining violation and the result reports those
  rows (``status="partial"``). If HiGHS fails or exceeds its time limit, a greedy rule
  takes over: for each row still beyond its target, worst first, the free DERs are moved
  in order of relief per unit of cost until the row reaches its target or the DERs run out.

Sign convention (DESIGN.md): every power is the DER's net **import** at its terminals,
consumption positive (a PV inverter generating 5 kW is ``p_kw = -5``; curtailing it moves
``p_kw`` up toward 0). Sensitivities are per kW / kvar of net import.

Limits of the approach: first order around the present point (a large move is checked by
the next cycle's state estimate, or by an AC solve, see ``tests/validation``); rows not
given are not protected (the caller picks rows near either limit); feeder/section
aggregate limits of the arbiter are not rows here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp

from derms.dispatch.lp import INF, HighsLP, RowBlock
from derms.errors import InfeasibleError, InputError

log = logging.getLogger(__name__)

V_UNIT = 1e-3  # one LP row unit of a voltage row [pu]
I_UNIT_FRAC = 1e-2  # one LP row unit of a current row [fraction of its limit]


# -- inputs and result ---------------------------------------------------------------------
@dataclass(frozen=True)
class DerState:
    """The fleet now, as arrays (n,) in one order; net import, consumption positive.

    ``point``: column of each DER's injection point in the row sensitivities;
    ``p_kw``/``q_kvar``: present net import [kW], [kvar]; ``p_min_kw``..``p_max_kw`` and
    ``q_min_kvar``..``q_max_kvar``: what the DER can do now (a PV inverter
    ``-available..0``, a battery ``-p_max..p_max`` within its SOC, an EV ``0..rate``);
    ``weight``: cost per kW moved (> 0; e.g. 1 / delivery score, so unreliable DERs are
    used last); ``fixed``: never moved (blocked by the arbiter, held by a higher
    authority's setpoint).
    """

    der_id: np.ndarray
    point: np.ndarray
    p_kw: np.ndarray
    p_min_kw: np.ndarray
    p_max_kw: np.ndarray
    q_kvar: np.ndarray
    q_min_kvar: np.ndarray
    q_max_kvar: np.ndarray
    weight: np.ndarray
    fixed: np.ndarray

    @property
    def n(self) -> int:
        return int(np.asarray(self.der_id).size)


@dataclass(frozen=True)
class VoltageRows:
    """Node-voltage rows (m,): ``label`` ("bus.node"), present magnitude ``v_pu`` (or the
    projected one, for an imminent excursion), limits ``v_min_pu``/``v_max_pu`` (the row
    is held to the nearer one) and sensitivities (m, n_points) ``dv_dp_pu_per_kw``,
    ``dv_dq_pu_per_kvar`` at the operating point. ``pre_existing`` (m,) marks rows whose
    limit is their base-case value (held, not improved): no margin is asked of them.
    ``violated`` (m,) marks the rows to correct (beyond a limit now or soon): they must
    reach their target; the others are guards, which may not move further beyond their
    target than they are. ``None``: every row beyond its target is corrected."""

    label: np.ndarray
    v_pu: np.ndarray
    v_min_pu: np.ndarray
    v_max_pu: np.ndarray
    dv_dp_pu_per_kw: np.ndarray
    dv_dq_pu_per_kvar: np.ndarray
    pre_existing: np.ndarray | None = None
    violated: np.ndarray | None = None


@dataclass(frozen=True)
class CurrentRows:
    """Branch-conductor rows (m,): ``label`` ("line.x.1"), present magnitude ``i_a``
    [A], upper limit ``i_max_a`` [A] and sensitivities (m, n_points) ``di_dp_a_per_kw``,
    ``di_dq_a_per_kvar``; ``pre_existing`` and ``violated`` as for :class:`VoltageRows`."""

    label: np.ndarray
    i_a: np.ndarray
    i_max_a: np.ndarray
    di_dp_a_per_kw: np.ndarray
    di_dq_a_per_kvar: np.ndarray
    pre_existing: np.ndarray | None = None
    violated: np.ndarray | None = None


@dataclass(frozen=True)
class CorrectiveConfig:
    """Targets are the limit minus a margin: ``v_margin_pu`` [pu], ``i_margin_frac`` of
    the current limit. ``q_weight``: cost of 1 kvar relative to 1 kW of the same DER.
    ``slack_price``: price of one row unit (0.001 pu, 1 % of a rating) beyond target,
    relative to a weight of 1. ``min_effect``: a DER direction whose whole range moves no
    row toward its target by this many row units (5 % of the tolerance) is not moved.
    ``method``: "lp" (greedy only as fallback) or "greedy";
    ``time_limit_s`` bounds all LP rounds together; ``lp_rows0``, ``lp_cosine``,
    ``lp_rows_add``, ``lp_rounds`` steer the lazy rows (see ``_lp``).
    ``min_move_kw``: smaller changes are dropped (not worth a command). A row predicted
    beyond its limit by more than ``v_tol_pu`` / ``i_tol_frac`` of it remains (DESIGN.md
    tolerances: 0.001 pu, 1 % of the rating)."""

    v_margin_pu: float = 0.003
    i_margin_frac: float = 0.02
    v_tol_pu: float = 0.001
    i_tol_frac: float = 0.01
    q_weight: float = 0.2
    slack_price: float = 1e4
    min_effect: float = 0.05
    method: Literal["lp", "greedy"] = "lp"
    time_limit_s: float = 2.0
    lp_rows0: int = 30
    lp_cosine: float = 0.995
    lp_rows_add: int = 30
    lp_rounds: int = 8
    min_move_kw: float = 1e-3


@dataclass(frozen=True)
class CorrectiveResult:
    """What to do and why.

    Per DER (n,): new setpoints ``p_kw``/``q_kvar`` (net import), changes ``dp_kw``/
    ``dq_kvar``, ``moved``; ``relieved_row`` the row (index into the row arrays, -1: none)
    its change relieves most and ``relief`` by how much [the row's unit]: an acted row, or
    for a DER moved only to hold a guard row the other moves pushed to its target, that
    guard row.
    Per row (m; voltage rows first, then current rows): ``row_label``, ``row_kind``
    ("v_max", "v_min", "i_max"), ``row_unit`` ("pu", "A"), present ``row_value``,
    ``row_limit``, ``row_target``; ``acted`` (beyond target: the reason to act);
    ``margin_before``/``margin_after`` = distance to the limit, positive inside (after:
    the linear prediction). ``remaining``: labels of rows predicted still beyond their
    limit. ``status``: "clear" (no row beyond its target), "resolved" (every row predicted
    within its limit; a row that reaches its limit but not its target is noted),
    "partial" (some rows predicted beyond their limit: ``remaining``). ``method``:
    "none", "lp", "greedy".
    """

    status: str
    method: str
    der_id: np.ndarray
    p_kw: np.ndarray
    q_kvar: np.ndarray
    dp_kw: np.ndarray
    dq_kvar: np.ndarray
    moved: np.ndarray
    relieved_row: np.ndarray
    relief: np.ndarray
    row_label: np.ndarray
    row_kind: np.ndarray
    row_unit: np.ndarray
    row_value: np.ndarray
    row_limit: np.ndarray
    row_target: np.ndarray
    acted: np.ndarray
    margin_before: np.ndarray
    margin_after: np.ndarray
    remaining: list[str]
    solve_s: float
    notes: list[str] = field(default_factory=list)

    def explanations(self) -> dict[str, str]:
        """One line per moved DER: its change and the constraint it relieves most."""
        out = {}
        for j in np.flatnonzero(self.moved):
            r = int(self.relieved_row[j])
            if r < 0:
                what = "no acted row"
            elif self.acted[r]:
                what = (f"relieves {self.row_kind[r]} at {self.row_label[r]} by "
                        f"{self.relief[j]:.4g} {self.row_unit[r]}")
            else:  # a guard row the other DERs' moves pushed to its target
                what = (f"holds {self.row_kind[r]} at {self.row_label[r]} at its target "
                        f"(pushed by the other moves; relief {self.relief[j]:.4g} "
                        f"{self.row_unit[r]})")
            out[str(self.der_id[j])] = (f"dp {self.dp_kw[j]:+.3f} kW, dq {self.dq_kvar[j]:+.3f} "
                                        f"kvar: {what}")
        return out


# -- the LP and its fallback ---------------------------------------------------------------
def solve_corrective(ders: DerState, vrows: VoltageRows | None, irows: CurrentRows | None,
                     config: CorrectiveConfig | None = None) -> CorrectiveResult:
    """Smallest weighted DER change that brings every given row within its target.

    Raises :class:`InputError` for non-finite or inconsistent input (naming the field and
    the first bad entry); an infeasible target is reported in the result, not raised.
    """
    cfg = config or CorrectiveConfig()
    t0 = time.perf_counter()
    d = _check_ders(ders)
    n_points = _n_points(d, vrows, irows)
    if d["point"].size and d["point"].max() >= n_points:
        j = int(np.argmax(d["point"]))
        raise InputError(f"DER {ders.der_id[j]}: point {d['point'][j]} but the sensitivities "
                         f"have {n_points} point columns")
    rows = _stack_rows(vrows, irows, cfg, n_points)
    n, m = d["p"].size, rows["value"].size
    fixed = d["fixed"]
    # free DERs start from their present value clipped into range (a forced move)
    p0 = np.where(fixed, d["p"], np.clip(d["p"], d["p_min"], d["p_max"]))
    q0 = np.where(fixed, d["q"], np.clip(d["q"], d["q_min"], d["q_max"]))
    forced_p, forced_q = p0 - d["p"], q0 - d["q"]
    rhs = rows["rhs"] - _apply(rows, d["point"], forced_p, forced_q)  # room left, row units
    acted = rows["rhs"] < -1e-9
    notes: list[str] = []
    dp, dq = forced_p.copy(), forced_q.copy()
    method = "none"
    if (rhs < -1e-9).any():
        free = np.flatnonzero(~fixed)
        if free.size == 0:
            notes.append("no free DER (empty fleet or all blocked/held)")
        else:
            step = None
            if cfg.method == "lp":
                try:
                    step = _lp(d, free, p0, q0, rows, rhs, cfg)
                    method = "lp"
                except InfeasibleError as exc:
                    notes.append(f"LP failed ({exc}); greedy fallback")
            if step is None:
                step = _greedy(d, free, p0, q0, rows, rhs, cfg)
                method = "greedy"
            dp[free] += step[0]
            dq[free] += step[1]
    small = (np.abs(dp - forced_p) < cfg.min_move_kw) & (np.abs(dq - forced_q) < cfg.min_move_kw)
    dp = np.where(small, forced_p, dp)
    dq = np.where(small, forced_q, dq)
    moved = (np.abs(dp) > 0) | (np.abs(dq) > 0)
    after = rows["rhs"] - _apply(rows, d["point"], dp, dq)  # >= 0: within target
    v_after = _value_after(rows, after)
    margin_after = rows["sense"] * (rows["limit"] - v_after)
    tol = np.where(rows["quad"], cfg.v_tol_pu, cfg.i_tol_frac * np.abs(rows["limit"]))
    remaining = [str(s) for s in rows["label"][margin_after < -tol]]
    unresolved = acted & (after < -1e-3)
    status = "clear" if not acted.any() else "partial" if remaining else "resolved"
    if unresolved.any():
        notes.append(f"{int(unresolved.sum())} row(s) cannot reach their target (limit less "
                     f"the margin) with the DERs' present ranges"
                     f"{'' if remaining else ' but stay within the limit'}: "
                     f"{', '.join(rows['label'][unresolved][:10])}")
    relieved, relief = _explain(rows, d["point"], dp, dq, acted, moved)
    # a DER moved only to hold a guard row that other moves pushed to its target: name it
    guard = ~acted & (after <= 1e-6)
    rest = moved & (relieved < 0)
    if guard.any() and rest.any():
        g_rel, g_relief = _explain(rows, d["point"], np.where(rest, dp, 0.0),
                                   np.where(rest, dq, 0.0), guard, rest)
        relieved = np.where(rest, g_rel, relieved)
        relief = np.where(rest, g_relief, relief)
    res = CorrectiveResult(
        status=status, method=method if moved.any() or method != "none" else "none",
        der_id=np.asarray(ders.der_id), p_kw=d["p"] + dp, q_kvar=d["q"] + dq, dp_kw=dp,
        dq_kvar=dq, moved=moved, relieved_row=relieved, relief=relief,
        row_label=rows["label"], row_kind=rows["kind"], row_unit=rows["unit"],
        row_value=rows["value"], row_limit=rows["limit"], row_target=rows["target"],
        acted=acted, margin_before=rows["sense"] * (rows["limit"] - rows["value"]),
        margin_after=margin_after, remaining=remaining, solve_s=time.perf_counter() - t0,
        notes=notes)
    log.debug("corrective status=%s method=%s rows=%d acted=%d moved=%d of %d s=%.3f",
              status, res.method, m, int(acted.sum()), int(moved.sum()), n, res.solve_s)
    return res


def _lp(d, free, p0, q0, rows, rhs, cfg):
    """Elastic LP (module docstring) with lazy network rows; returns (dp, dq) of the free
    DERs.

    Columns: each free DER's P up / P down / Q up / Q down where it has room (others are
    left out), one slack per network row. A network row holds one entry per DER column
    (its point's sensitivity): with only a few rows in the model the simplex basis stays
    tiny and most DERs end at a bound (bound flips, not pivots); aggregate columns per
    point (fewer entries) were measured slower, every free aggregate needing its own
    pivot (IEEE 8500: 0.8 s against 0.1 s). It starts from at most ``lp_rows0`` rows
    beyond their target, worst first, skipping rows nearly parallel (cosine >
    ``lp_cosine``) to one already taken (the nodes of one lateral move together); after
    each solve every other row is checked with its own sensitivities and those left
    beyond their room join (at most ``lp_rows_add`` per round, warm re-solve), until none
    is or ``lp_rounds`` is reached."""
    nf = free.size
    pts, pt_of = np.unique(d["point"][free], return_inverse=True)
    w = d["weight"][free]
    caps = (np.maximum(d["p_max"][free] - p0[free], 0.0),   # P up (more import)
            np.maximum(p0[free] - d["p_min"][free], 0.0),   # P down
            np.maximum(d["q_max"][free] - q0[free], 0.0),   # Q up
            np.maximum(q0[free] - d["q_min"][free], 0.0))   # Q down
    sign = (1.0, -1.0, 1.0, -1.0)
    cost_of = (w, w, cfg.q_weight * w, cfg.q_weight * w)
    # a DER direction whose whole range relieves no given row by ``min_effect`` row units
    # is left out (the rows' tolerance is 1 unit): with every row unit beyond target priced
    # at slack_price, a battery was swung from full discharge to full charge for a 1e-5 pu
    # cross-phase relief (0.011 units) of an undervoltage the others could not clear
    # (live, EPRI ckt7 and IEEE 34: battery discharge 221 -> 28 kW during an EV surge)
    relief = [-sign[k] * (rows["sp"] if k < 2 else rows["sq"])[:, pts[pt_of]]
              for k in range(4)]
    blocks = [np.flatnonzero((caps[k] > 1e-9) & (
        (relief[k].max(axis=0, initial=0.0) * caps[k]) >= cfg.min_effect)) for k in range(4)]
    sizes = [b.size for b in blocks]
    off = np.cumsum([0, *sizes])
    nc = int(off[-1])
    cost = np.r_[*(cost_of[k][blocks[k]] for k in range(4))]
    hi = np.r_[*(caps[k][blocks[k]] for k in range(4))]
    # column c of the DER block: its point (P or Q sensitivity column) and sign
    col_pt = np.r_[*(pt_of[blocks[k]] + (k // 2) * pts.size for k in range(4))]
    col_sign = np.r_[*(np.full(sizes[k], sign[k]) for k in range(4))]
    s_all = np.hstack([rows["sp"][:, pts], rows["sq"][:, pts]])  # (m, 2 n_pts)
    price = cfg.slack_price * max(float(w.max()), 1.0)
    active = np.zeros(rhs.size, dtype=bool)

    def block(idx):
        k = idx.size
        a = s_all[np.ix_(idx, col_pt)] * col_sign
        return sp.csr_matrix(a), k

    first = _representatives(s_all, rhs, cfg.lp_rows0, cfg.lp_cosine)
    a0, k0 = block(first)
    a0 = sp.hstack([a0, -sp.identity(k0, format="csr")]).tocsr()
    lp = HighsLP(np.r_[cost, np.full(k0, price)], np.zeros(nc + k0), np.r_[hi, np.full(k0, INF)],
                 RowBlock(a0, np.full(k0, -INF), rhs[first], np.array(["net"] * k0),
                          rows["label"][first].astype(str), np.zeros(k0, dtype=int)))
    # few rows, many bounded columns: dual simplex without presolve (IEEE 8500, 18 rows x
    # 22,000 columns: 0.02 s; with presolve 0.3 s)
    lp.h.setOptionValue("presolve", "off")
    lp.h.setOptionValue("simplex_strategy", 1)
    active[first] = True
    t_end = time.perf_counter() + cfg.time_limit_s
    for _ in range(cfg.lp_rounds):
        x = lp.solve(time_limit_s=max(0.05, t_end - time.perf_counter()))[0]
        mv = np.bincount(col_pt, weights=col_sign * x[:nc], minlength=2 * pts.size)
        room = rhs - s_all @ mv
        out = np.flatnonzero(~active & (room < -1e-6))
        if out.size == 0:
            break
        idx = out[np.argsort(room[out])[:cfg.lp_rows_add]]
        a, k = block(idx)
        n_now = lp.h.getNumCol()
        sl = lp.add_cols(np.full(k, price), np.zeros(k), np.full(k, INF))
        a = sp.hstack([a, sp.csr_matrix((k, n_now - nc)),
                       sp.csr_matrix((-np.ones(k), (np.arange(k), sl - n_now)),
                                     shape=(k, k))]).tocsr()
        a.eliminate_zeros()
        lp.add_rows(RowBlock(a, np.full(k, -INF), rhs[idx], np.array(["net"] * k),
                             rows["label"][idx].astype(str), np.zeros(k, dtype=int)))
        active[idx] = True
    else:
        raise InfeasibleError(f"corrective LP: rows still beyond their room after "
                              f"{cfg.lp_rounds} rounds")
    dp, dq = np.zeros(nf), np.zeros(nf)
    for k, tgt in enumerate((dp, dp, dq, dq)):
        np.add.at(tgt, blocks[k], sign[k] * x[off[k]:off[k + 1]])
    return dp, dq


def _representatives(s_all: np.ndarray, rhs: np.ndarray, cap: int, cosine: float
                     ) -> np.ndarray:
    """Rows beyond their room, worst first, skipping near-parallel ones (at most ``cap``)."""
    need = np.flatnonzero(rhs < -1e-9)
    need = need[np.argsort(rhs[need], kind="stable")]
    norm = np.linalg.norm(s_all[need], axis=1)
    unit = s_all[need] / np.where(norm > 0, norm, 1.0)[:, None]
    taken: list[int] = []
    for k in range(need.size):
        if len(taken) >= cap:
            break
        if not taken or (unit[taken] @ unit[k]).max() < cosine:
            taken.append(k)
    return need[taken]


def _greedy(d, free, p0, q0, rows, rhs, cfg):
    """Worst row first: move the most effective free DERs (relief per cost) until the row
    reaches its target or they run out; returns (dp, dq) of the free DERs."""
    nf = free.size
    pt = d["point"][free]
    w = d["weight"][free]
    cap = {  # remaining room per direction: P up/down, Q up/down
        "pu": np.maximum(d["p_max"][free] - p0[free], 0.0),
        "pd": np.maximum(p0[free] - d["p_min"][free], 0.0),
        "qu": np.maximum(d["q_max"][free] - q0[free], 0.0),
        "qd": np.maximum(q0[free] - d["q_min"][free], 0.0)}
    dp, dq = np.zeros(nf), np.zeros(nf)
    room = rhs.copy()
    for _ in range(rows["value"].size):
        r = int(np.argmin(room))
        if room[r] >= -1e-9:
            break
        need = -room[r]
        s_p = rows["sp"][r, pt]  # effect per kW on the (sense-signed) row: must go down
        s_q = rows["sq"][r, pt]
        eff = np.r_[np.abs(s_p), np.abs(s_q)]
        c = np.r_[np.where(s_p > 0, cap["pd"], cap["pu"]), np.where(s_q > 0, cap["qd"], cap["qu"])]
        cost = np.r_[w, cfg.q_weight * w]
        order = np.argsort(-(eff / cost), kind="stable")
        order = order[(eff[order] > 0) & (c[order] > 0)
                      & (eff[order] * c[order] >= cfg.min_effect)]  # as the LP's columns
        if order.size == 0:
            room[r] = 0.0  # nothing can move it: reported as remaining
            continue
        gain = np.cumsum(eff[order] * c[order])
        k = int(np.searchsorted(gain, need))
        take = c[order].copy()
        if k < order.size:
            take[k] = (need - (gain[k - 1] if k else 0.0)) / eff[order[k]]
            take[k + 1:] = 0.0
        mv = np.zeros(2 * nf)
        mv[order] = take
        mp = -np.sign(s_p) * mv[:nf]
        mq = -np.sign(s_q) * mv[nf:]
        for key, arr in (("pu", np.maximum(mp, 0)), ("pd", np.maximum(-mp, 0)),
                         ("qu", np.maximum(mq, 0)), ("qd", np.maximum(-mq, 0))):
            cap[key] = cap[key] - arr
        dp += mp
        dq += mq
        room -= _apply(rows, pt, mp, mq)
        if k >= order.size:
            room[r] = max(room[r], 0.0)  # exhausted: stop retrying this row
    return dp, dq


# -- rows, checks, explanations ------------------------------------------------------------
def _stack_rows(vrows, irows, cfg, n_points):
    """One table of rows in LP units (sense-signed: "value <= target" for every row)."""
    parts = []
    if vrows is not None and np.asarray(vrows.label).size:
        v = _finite("v_pu", vrows.v_pu)
        vmax, vmin = np.asarray(vrows.v_max_pu, float), np.asarray(vrows.v_min_pu, float)
        _same("voltage rows", v, vmax, vmin, np.asarray(vrows.label))
        if (v <= 0).any():
            raise InputError(f"v_pu[{int(np.flatnonzero(v <= 0)[0])}] must be > 0 (energised)")
        upper = v >= 0.5 * (vmax + vmin)
        sense = np.where(upper, 1.0, -1.0)
        limit = np.where(upper, vmax, vmin)
        target = limit - sense * cfg.v_margin_pu * ~_flags(vrows.pre_existing, v.size, False)
        u_room = (target**2 - v**2) / (2 * v)  # u-form room [pu]
        parts.append(dict(
            label=np.asarray(vrows.label, dtype=object), kind=np.where(upper, "v_max", "v_min"),
            unit=np.full(v.size, "pu"), value=v, limit=limit, target=target, sense=sense,
            scale=np.full(v.size, 1.0 / V_UNIT), rhs=sense * u_room / V_UNIT,
            sp=_sens("dv_dp_pu_per_kw", vrows.dv_dp_pu_per_kw, v.size, n_points)
            * (sense / V_UNIT)[:, None],
            sq=_sens("dv_dq_pu_per_kvar", vrows.dv_dq_pu_per_kvar, v.size, n_points)
            * (sense / V_UNIT)[:, None], quad=np.ones(v.size, bool),
            fix=_flags(vrows.violated, v.size, True)))
    if irows is not None and np.asarray(irows.label).size:
        i = _finite("i_a", irows.i_a)
        imax = _finite("i_max_a", irows.i_max_a)
        _same("current rows", i, imax, np.asarray(irows.label))
        if (imax <= 0).any():
            raise InputError(f"i_max_a[{int(np.flatnonzero(imax <= 0)[0])}] must be > 0")
        target = imax * (1 - cfg.i_margin_frac * ~_flags(irows.pre_existing, i.size, False))
        scale = 1.0 / (I_UNIT_FRAC * imax)
        parts.append(dict(
            label=np.asarray(irows.label, dtype=object), kind=np.full(i.size, "i_max"),
            unit=np.full(i.size, "A"), value=i, limit=imax, target=target,
            sense=np.ones(i.size), scale=scale, rhs=(target - i) * scale,
            sp=_sens("di_dp_a_per_kw", irows.di_dp_a_per_kw, i.size, n_points) * scale[:, None],
            sq=_sens("di_dq_a_per_kvar", irows.di_dq_a_per_kvar, i.size, n_points)
            * scale[:, None], quad=np.zeros(i.size, bool),
            fix=_flags(irows.violated, i.size, True)))
    if not parts:
        z = np.zeros(0)
        return dict(label=np.zeros(0, object), kind=np.zeros(0, "<U5"), unit=np.zeros(0, "<U2"),
                    value=z, limit=z, target=z, sense=z, scale=z, rhs=z,
                    sp=np.zeros((0, n_points)), sq=np.zeros((0, n_points)),
                    quad=np.zeros(0, bool), fix=np.zeros(0, bool))
    out = {k: (np.vstack if k in ("sp", "sq") else np.concatenate)([p[k] for p in parts])
           for k in parts[0]}
    out["rhs"] = np.where(out["fix"], out["rhs"], np.maximum(out["rhs"], 0.0))  # guards
    return out


def _flags(flags, m: int, default: bool) -> np.ndarray:
    if flags is None:
        return np.full(m, default)
    a = np.asarray(flags, dtype=bool).ravel()
    if a.size != m:
        raise InputError(f"row flags have {a.size} values for {m} rows")
    return a


def _apply(rows, point, dp, dq):
    """Change of every (sense-signed, scaled) row for DER moves ``dp``/``dq`` at ``point``."""
    if rows["value"].size == 0:
        return np.zeros(0)
    n_pts = rows["sp"].shape[1]
    agg_p = np.bincount(point, weights=dp, minlength=n_pts)
    agg_q = np.bincount(point, weights=dq, minlength=n_pts)
    return rows["sp"] @ agg_p + rows["sq"] @ agg_q


def _value_after(rows, room_after):
    """Predicted row values [pu or A] from the room left (u-form for voltages)."""
    v, sense, scale = rows["value"], rows["sense"], rows["scale"]
    delta = (rows["rhs"] - room_after) * sense / scale  # change of u [pu] or of |I| [A]
    quad = rows["quad"]
    out = v + delta
    out[quad] = np.sqrt(np.maximum(v[quad] ** 2 + 2 * v[quad] * delta[quad], 0.0))
    return out


def _explain(rows, point, dp, dq, acted, moved):
    n = dp.size
    relieved, relief = np.full(n, -1), np.zeros(n)
    a, j = np.flatnonzero(acted), np.flatnonzero(moved)
    if a.size == 0 or j.size == 0:
        return relieved, relief
    pt = point[j]
    c = -(rows["sp"][np.ix_(a, pt)] * dp[j] + rows["sq"][np.ix_(a, pt)] * dq[j])  # relief
    best = np.argmax(c, axis=0)
    val = c[best, np.arange(j.size)]
    ok = val > 0
    relieved[j[ok]] = a[best[ok]]
    relief[j[ok]] = val[ok] / rows["scale"][a[best[ok]]]
    return relieved, relief


def _finite(name: str, v) -> np.ndarray:
    a = np.asarray(v, dtype=float).ravel()
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise InputError(f"{name}[{bad}] is not finite ({a[bad]})")
    return a


def _same(what: str, *arrays) -> None:
    sizes = {np.asarray(a).shape[0] for a in arrays}
    if len(sizes) > 1:
        raise InputError(f"{what}: arrays of different lengths {sorted(sizes)}")


def _sens(name: str, s, m: int, n_points: int) -> np.ndarray:
    a = np.asarray(s.toarray() if sp.issparse(s) else s, dtype=float)
    if a.shape != (m, n_points):
        raise InputError(f"{name} has shape {a.shape}, expected ({m}, {n_points})")
    if not np.isfinite(a).all():
        r, c = np.argwhere(~np.isfinite(a))[0]
        raise InputError(f"{name}[{r}, {c}] is not finite ({a[r, c]})")
    return a


def _n_points(d, vrows, irows) -> int:
    for rows, name in ((vrows, "dv_dp_pu_per_kw"), (irows, "di_dp_a_per_kw")):
        if rows is not None and np.ndim(getattr(rows, name)) == 2:
            return int(np.shape(getattr(rows, name))[1])
    return int(d["point"].max()) + 1 if d["point"].size else 0


def _check_ders(ders: DerState) -> dict[str, np.ndarray]:
    n = ders.n
    out = {"point": np.asarray(ders.point, dtype=np.int64).ravel(),
           "fixed": np.asarray(ders.fixed, dtype=bool).ravel()}
    for key, name in (("p", "p_kw"), ("p_min", "p_min_kw"), ("p_max", "p_max_kw"),
                      ("q", "q_kvar"), ("q_min", "q_min_kvar"), ("q_max", "q_max_kvar"),
                      ("weight", "weight")):
        out[key] = _finite(name, getattr(ders, name))
    for key, a in out.items():
        if a.size != n:
            raise InputError(f"DER array {key} has {a.size} values for {n} DERs")
    for lo, hi, unit in (("p_min", "p_max", "kW"), ("q_min", "q_max", "kvar")):
        bad = np.flatnonzero(out[lo] > out[hi] + 1e-9)
        if bad.size:
            j = int(bad[0])
            raise InputError(f"DER {ders.der_id[j]}: range {out[lo][j]}..{out[hi][j]} {unit} "
                             "is empty")
    if (out["weight"] <= 0).any():
        j = int(np.flatnonzero(out["weight"] <= 0)[0])
        raise InputError(f"DER {ders.der_id[j]}: weight {out['weight'][j]} must be > 0")
    if n and out["point"].min() < 0:
        raise InputError("DER point indices must be >= 0")
    return out


__all__ = ["CorrectiveConfig", "CorrectiveResult", "CurrentRows", "DerState",
           "VoltageRows", "solve_corrective"]
