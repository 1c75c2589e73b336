"""Explanation of a plan: binding constraints, DER moves and why, curtailment fairness.

For every interval the ledger lists the constraints that bind (LP rows with a nonzero
dual: element, kind, limit, AC value) and every DER moved against the uncontrolled
schedule (net import [kW], consumption positive), with the reason: the binding row at
that interval whose ``dual x sensitivity`` to the DER is largest, else the binding row
anywhere in the horizon the DER's move serves most (an energy shift), else the objective.
Curtailment shares are cumulative curtailed kWh per PV over the horizon so far. EV
sessions that end short of their energy (a network limit left no other way) are listed
with the binding constraint in their plug-in window that weighs most on their charging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from derms.der.aggregate import Aggregation
from derms.der.models import FleetArrays, fleet_arrays
from derms.dispatch.network import rows_dense
from derms.dispatch.plan import Planner, Schedule
from derms.powerflow.qsts import QSTSResult

EXPLAINED = ("v_max", "v_min", "i_max", "peak", "export_limit", "group_request")
_DUAL_TOL = 1e-7
_MOVE_KW = 0.01
SHORT_KWH = 0.01  # an EV session this much short of its need [kWh] is reported


@dataclass(frozen=True)
class Ledger:
    """``binding`` (t, kind, element, limit, value, dual), ``moves`` (t, der_id, kind,
    p_uncontrolled_kw, p_plan_kw, delta_kw, reason), ``curtailment`` (t, der_id,
    curtailed_kwh_cum, share_cum), ``ev_shortfalls`` (der_id, need_kwh, delivered_kwh,
    short_kwh, reason), one row per EV session that ends short."""

    binding: pd.DataFrame
    moves: pd.DataFrame
    curtailment: pd.DataFrame
    ev_shortfalls: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["der_id", "need_kwh", "delivered_kwh", "short_kwh", "reason"]))


def build_ledger(planner: Planner, plan: Schedule, uncontrolled: Schedule,
                 result: QSTSResult, agg: Aggregation | None = None) -> Ledger:
    """The ledger of a solved planner (see module docstring). ``agg``: the planner's DERs
    are groups of ``agg`` and ``plan``/``uncontrolled`` are the members' schedules; every
    member is then explained by its group's rows (its share of the group's sensitivity)."""
    lp, net, fleet = planner.lp, planner.net, planner.fleet
    members = agg is not None and agg.of_members(plan.fleet)
    col = agg.group_of if members else np.arange(len(fleet.ders))
    own = plan.fleet
    T = planner.lay.T
    times = pd.date_range(fleet.horizon.start, periods=T, freq=fleet.horizon.step)
    ids = np.array(own.der_ids, dtype=object)
    kinds = np.array(own.kinds, dtype=object)
    duals = planner.duals
    n = min(duals.size, lp.n_rows)
    sel = np.flatnonzero(np.isin(lp.kind[:n], EXPLAINED) & (np.abs(duals[:n]) > _DUAL_TOL))
    b_kind, b_t = lp.kind[sel], lp.t[sel].astype(int)
    # physical limit and AC value of each binding row
    limit = np.full(sel.size, np.nan)
    value = np.full(sel.size, np.nan)
    sens = np.zeros((sel.size, len(fleet.ders)))
    head = result.head_p_kw.sum(axis=1)
    z = planner.x[planner.lay.z]
    for kind in EXPLAINED:
        m = b_kind == kind
        if not m.any():
            continue
        t = b_t[m]
        if kind in ("v_max", "v_min", "i_max"):
            e = np.array([np.flatnonzero(net.row[kind][tt] == r)[0] for tt, r in
                          zip(t, sel[m])])
            lim = getattr(net.lim, kind)[t, e]
            val = (result.i_a if kind == "i_max" else result.v_pu)[t, e]
            for c in np.unique(net.sset.of_t[t]):  # each interval's own sensitivities
                k = net.sset.of_t[t] == c
                part = net.sset.parts[int(c)]
                sens[np.flatnonzero(m)[k]] = rows_dense(
                    part.hi_p if kind == "i_max" else part.hv_p, e[k])
        elif kind == "peak":
            lim, val = np.full(t.size, z), head[t]
            sens[m] = 1.0
        elif kind == "export_limit":
            lim, val = np.full(t.size, -planner.objective.export_limit_kw), head[t]
            sens[m] = 1.0
        else:
            lim, val = np.full(t.size, np.nan), np.full(t.size, np.nan)
        limit[m], value[m] = lim, val
    binding = pd.DataFrame({"t": times[b_t], "kind": b_kind, "element": lp.element[sel],
                            "limit": limit, "value": value, "dual": duals[sel]})
    score = np.abs(duals[sel][:, None] * sens)[:, col]  # (n_bind, n_der): each its group's
    label = np.array([f"{k}:{e}" for k, e in zip(b_kind, lp.element[sel])], dtype=object)
    delta = plan.p_kw - uncontrolled.p_kw
    tt, jj = np.nonzero(np.abs(delta) > _MOVE_KW)
    reason = np.full(tt.size, "objective", dtype=object)
    if sel.size:
        best_any = np.argmax(score, axis=0)
        for t in np.unique(tt):
            rows_t = np.flatnonzero(b_t == t)
            at = np.flatnonzero(tt == t)
            if rows_t.size:
                s = score[rows_t][:, jj[at]]
                k = np.argmax(s, axis=0)
                ok = s[k, np.arange(at.size)] > 0
                reason[at[ok]] = label[rows_t[k[ok]]]
        rest = reason == "objective"
        has = score[best_any[jj[rest]], jj[rest]] > 0
        idx = np.flatnonzero(rest)[has]
        reason[idx] = ["shift for " + label[best_any[j]] for j in jj[idx]]
    moves = pd.DataFrame({"t": times[tt], "der_id": ids[jj], "kind": kinds[jj],
                          "p_uncontrolled_kw": uncontrolled.p_kw[tt, jj],
                          "p_plan_kw": plan.p_kw[tt, jj], "delta_kw": delta[tt, jj],
                          "reason": reason})
    return Ledger(binding, moves, curtailment_shares(plan),
                  ev_shortfalls(planner, plan, score, b_t, label,
                                fleet_arrays(own) if members else None))


def ev_shortfalls(planner: Planner, plan: Schedule, score: np.ndarray, b_t: np.ndarray,
                  label: np.ndarray, arrays: FleetArrays | None = None) -> pd.DataFrame:
    """EV sessions that end short of their need [kWh], each with the binding constraint
    (``score``: |dual x sensitivity|, (n_bind, n_der), rows at intervals ``b_t``) that
    weighs most on its charging inside its plug-in window (``arrays``: those of
    ``plan``'s fleet when it is not the planner's)."""
    fleet, a = plan.fleet, planner.arrays if arrays is None else arrays
    short = plan.ev_short_kwh if plan.ev_short_kwh is not None else np.zeros(len(fleet.evs))
    k = np.flatnonzero(short > SHORT_KWH)
    j0 = len(fleet.pv) + len(fleet.batteries)
    reasons = []
    for e in k:
        win = np.flatnonzero(a.ev_window[:, e])
        rows = np.flatnonzero(np.isin(b_t, win))
        s = score[rows, j0 + e] if rows.size else np.zeros(0)
        reasons.append(label[rows[int(np.argmax(s))]] if s.size and s.max() > 0 else
                       "no binding constraint found in its window")
    need = a.ev_e_required_kwh[k]
    return pd.DataFrame({"der_id": [fleet.evs[e].der_id for e in k], "need_kwh": need,
                         "delivered_kwh": need - short[k], "short_kwh": short[k],
                         "reason": reasons})


def curtailment_shares(plan: Schedule) -> pd.DataFrame:
    """Cumulative curtailed energy [kWh] per PV and its share of the total so far."""
    f = plan.fleet
    T, n_pv = plan.curtail_kw.shape
    cum = np.cumsum(np.maximum(plan.curtail_kw, 0.0) * f.horizon.dt_h, axis=0)
    tot = cum.sum(axis=1, keepdims=True)
    share = np.divide(cum, tot, out=np.zeros_like(cum), where=tot > 0)
    times = pd.date_range(f.horizon.start, periods=T, freq=f.horizon.step)
    return pd.DataFrame({"t": times.repeat(n_pv),
                         "der_id": np.tile(np.array([p.der_id for p in f.pv], dtype=object), T),
                         "curtailed_kwh_cum": cum.ravel(), "share_cum": share.ravel()})


def policy_deviation_pct(plan: Schedule, policy: str, min_kw: float = 0.01) -> float:
    """Largest deviation [%] of any PV's curtailment from the policy, over intervals with
    curtailment: per interval the PVs' curtailment per available kW
    ("equal_proportional") or per kVA ("proportional_to_capacity") relative to the
    interval's curtailment-weighted mean. 0 when nothing is curtailed."""
    f = plan.fleet
    avail = np.column_stack([p.p_avail_kw for p in f.pv]) if f.pv else np.zeros((0, 0))
    curt = plan.curtail_kw
    if policy == "equal_proportional":
        base = avail
    elif policy == "proportional_to_capacity":
        base = np.broadcast_to(np.array([p.s_kva for p in f.pv]), curt.shape)
    else:
        raise ValueError(f"no fairness rule for policy {policy!r}")
    rows = curt.sum(axis=1) > min_kw
    if not rows.any():
        return 0.0
    c, b = curt[rows], base[rows]
    live = b > 1e-6
    ratio = np.where(live, c / np.where(live, b, 1.0), 0.0)
    mean = (c.sum(axis=1) / np.where(live, b, 0.0).sum(axis=1))[:, None]
    dev = np.abs(ratio - mean) / np.maximum(mean, 1e-12)
    return float(100.0 * dev[live].max())
