"""Capacitor switching in the dispatch LP: kvar-type capacitor controls held as in the base
case where their switching causes what the AC check finds.

The network rows freeze the controls at the reference's AC run. A kvar-type
``CapControl`` switches its capacitor when the reactive power into its monitored
terminal crosses ``ONsetting`` / ``OFFsetting``; a plan that moves that flow by a few kvar
moves the switching by an interval, and the step (IEEE 8500: 300 kvar on one phase,
+0.006 pu at the substation bus inside its regulator's band) is beyond what any DER can
take back through the rows. Here, where the AC run of a plan has a capacitor in another
state than the base case (no DER) at an interval with violations that this difference
drives, the capacitor is *held* at the base case's state there:

* the reference the rows are centred on gets the linear effect of the capacitor in its
  target state instead of the state it had (an offset of node voltages, branch currents
  and monitored kvar per interval);
* one row per held (interval, control) keeps the monitored kvar (linear in the DERs' net
  import, :func:`derms.powerflow.linear.build_linear_model` ``flows``) on the side of its
  setting that gives the target state from the state the reference had an interval
  before (stay off: below ON; stay on: above OFF; switch on: above ON; switch off: below
  OFF), ``HOLD_MARGIN`` of the ON-OFF width inside; rows are elastic (priced slack).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from derms.dispatch.lp import INF, RowBlock
from derms.dispatch.network import Reference
from derms.powerflow.collect import NetworkIndex
from derms.powerflow.linear import LinearModel

log = logging.getLogger(__name__)
HOLD_MARGIN = 0.05  # share of |ON - OFF| a held kvar row keeps inside its setting
HOLD_MIN_PU = 1e-3  # least push toward a violation that makes a capacitor held [pu, A/100]
HOLD_SHARE = 0.5  # ... and least share of that violation's excess it makes up
HOLD_PRICE = 1e3  # slack price per kvar of a held row
HOLD_SWITCH = False  # also hold where the target asks the capacitor to switch
HOLD_TOP = 10  # DERs that move a held flow (local repair) ...
HOLD_REACH = 0.5  # ... a pair is held only if they can move it by twice what it needs


@dataclass(frozen=True)
class CapControls:
    """The kvar-type capacitor controls the LP can see: ``name``/``cap`` (n_ctl,),
    monitored branch conductors ``flow_rows`` with their control ``flow_of``, capacitor
    nodes ``node`` ("bus.k") with their control ``node_of`` and kvar ``node_kvar`` (rated,
    all steps on), settings ``on_kvar``/``off_kvar`` (n_ctl,)."""

    name: np.ndarray
    cap: np.ndarray
    flow_rows: np.ndarray
    flow_of: np.ndarray
    node: np.ndarray
    node_of: np.ndarray
    node_kvar: np.ndarray
    on_kvar: np.ndarray
    off_kvar: np.ndarray

    @property
    def n(self) -> int:
        return int(self.name.size)

    @classmethod
    def empty(cls) -> CapControls:
        z, o = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
        return cls(o, o, z, z, o, z, np.zeros(0), np.zeros(0), np.zeros(0))


def read_cap_controls(engine, index: NetworkIndex) -> CapControls:
    """Every enabled kvar-type CapControl (``type=kvar``) on a terminal-1 branch whose
    capacitor is wye-connected; others are left to the AC check (logged)."""
    c = engine.circuit
    cc, cp = c.CapControls, c.Capacitors
    el = index.branch_element.astype(str)
    rows: dict[str, np.ndarray] = {}
    out = {k: [] for k in ("name", "cap", "rows", "node", "kvar", "on", "off")}
    k = cc.First
    while k > 0:
        name, cap = cc.Name.lower(), cc.Capacitor.lower()
        obj, term = cc.MonitoredObj.lower(), cc.MonitoredTerm
        if cc.Mode != 2 or term != 1:  # 2 = kvar
            log.info("capcontrol %s: not a kvar control on terminal 1, not modelled", name)
            k = cc.Next
            continue
        r = rows.setdefault(obj, np.flatnonzero(el == obj))
        c.SetActiveElement(f"capacitor.{cap}")
        bus = c.ActiveCktElement.BusNames[0].lower().split(".")
        cp.Name = cap
        nph = c.ActiveCktElement.NumPhases
        nodes = bus[1:1 + nph] or [str(p) for p in range(1, nph + 1)]
        if r.size == 0 or cp.IsDelta:
            log.info("capcontrol %s: monitored element or delta capacitor not modelled", name)
            k = cc.Next
            continue
        out["name"].append(name)
        out["cap"].append(cap)
        out["rows"].append(r)
        out["node"].append([f"{bus[0]}.{n}" for n in nodes])
        out["kvar"].append(float(np.sum(cp.kvar)) / len(nodes))
        out["on"].append(cc.ONSetting)
        out["off"].append(cc.OFFSetting)
        k = cc.Next
    n = len(out["name"])
    cnt = [len(r) for r in out["rows"]]
    ncnt = [len(x) for x in out["node"]]
    return CapControls(
        np.array(out["name"], dtype=object), np.array(out["cap"], dtype=object),
        np.concatenate(out["rows"]).astype(np.int64) if n else np.zeros(0, np.int64),
        np.repeat(np.arange(n), cnt), np.array([s for x in out["node"] for s in x], dtype=object),
        np.repeat(np.arange(n), ncnt), np.repeat(np.array(out["kvar"], dtype=float), ncnt),
        np.array(out["on"], dtype=float), np.array(out["off"], dtype=float))


def cap_states(engine, ctl: CapControls) -> np.ndarray:
    """(n_ctl,) share of each controlled capacitor's steps that are on."""
    cp = engine.circuit.Capacitors
    out = np.empty(ctl.n)
    for j, cap in enumerate(ctl.cap):
        cp.Name = cap
        s = np.asarray(cp.States, dtype=float)
        out[j] = s.mean() if s.size else 0.0
    return out


def monitored_kvar(engine, ctl: CapControls, index: NetworkIndex) -> np.ndarray:
    """(n_ctl,) reactive power into each control's monitored terminal [kvar]."""
    c = engine.circuit
    out = np.zeros(ctl.n)
    seen: dict[str, float] = {}
    for j in range(ctl.n):
        e = str(index.branch_element[ctl.flow_rows[ctl.flow_of == j][0]])
        if e not in seen:
            c.SetActiveElement(e)
            nc = c.ActiveCktElement.NumConductors
            seen[e] = float(np.asarray(c.ActiveCktElement.Powers)[1:2 * nc:2].sum())
        out[j] = seen[e]
    return out


@dataclass(frozen=True)
class CapSensitivity:
    """At one operating point: the monitored kvar per DER net import ``dq_p``/``dq_q``
    (n_ctl, n_der) [kvar/kW, kvar/kvar], and the effect of switching each capacitor fully
    on, per control: node ``dv`` (n_nodes, n_ctl) [pu], branch ``di`` (n_br, n_ctl) [A],
    monitored ``dq`` (n_ctl, n_ctl) [kvar]."""

    dq_p: np.ndarray
    dq_q: np.ndarray
    dv: np.ndarray
    di: np.ndarray
    dq: np.ndarray


def cap_sensitivity(lin: LinearModel, W: sp.spmatrix, ctl: CapControls) -> CapSensitivity:
    """From a linear model built with the capacitor nodes among its injection nodes and
    ``flows=ctl.flow_rows``; ``W`` (n_inj, n_der) maps DER power to its nodes."""
    b = lin.branches
    pos_f = {int(r): k for k, r in enumerate(b.flow_rows)}
    F = sp.csr_matrix((np.ones(ctl.flow_rows.size),
                       (ctl.flow_of, [pos_f[int(r)] for r in ctl.flow_rows])),
                      shape=(ctl.n, b.flow_rows.size))
    pos = {n: k for k, n in enumerate(lin.injection_nodes)}
    node_pos = np.array([pos[n] for n in ctl.node], dtype=np.int64)
    vpos = {n: k for k, n in enumerate(lin.node_names)}
    v0 = lin.v0_pu[[vpos[n] for n in ctl.node]]
    # a capacitor on = net import of -kvar v^2 at its nodes
    C = sp.csr_matrix((-ctl.node_kvar * v0**2, (node_pos, ctl.node_of)),
                      shape=(len(lin.injection_nodes), ctl.n))
    dq_inj = F @ b.flow_dq_dq
    return CapSensitivity(np.asarray((W.T @ (F @ b.flow_dq_dp).T).T),
                          np.asarray((W.T @ dq_inj.T).T),
                          np.asarray((C.T @ lin.dv_dq_pu_per_kvar.T).T),
                          np.asarray((C.T @ b.di_dq_a_per_kvar.T).T),
                          np.asarray((C.T @ dq_inj.T).T))


class CapHold:
    """Held capacitor states and their rows in one planner's LP (module docstring).

    ``parts`` (one :class:`CapSensitivity` per sensitivity part of the planner's rows);
    ``base_on`` (T, n_ctl) the base case's capacitor states."""

    def __init__(self, planner, ctl: CapControls, parts: tuple[CapSensitivity, ...],
                 base_on: np.ndarray) -> None:
        self.pl, self.ctl, self.parts, self.base_on = planner, ctl, parts, base_on
        T = planner.lay.T
        self.target = np.full((T, ctl.n), np.nan)  # held state per (t, control)
        self.row = np.full((T, ctl.n), -1, dtype=np.int64)

    def _part(self, t: np.ndarray) -> np.ndarray:
        return self.pl.net.sset.of_t[t]

    def note(self, ref: Reference, over: dict[str, np.ndarray], res, lim) -> int:
        """Hold, at every interval with AC violations (``over`` masks of ``res`` against
        the LP limits ``lim``), the capacitors whose state differs from the base case's
        and whose difference makes up at least ``HOLD_SHARE`` of a violation there (and
        ``HOLD_MIN_PU``; currents ``100 x`` that in A): a violation the switching causes,
        not one the DERs' own power causes. Returns the pairs added."""
        d = ref.cap_on - self.base_on                        # (T, n_ctl)
        of_t = self._part(np.arange(d.shape[0]))
        excess = {"v_max": res.v_pu - lim.v_max, "v_min": lim.v_min - res.v_pu,
                  "i_max": res.i_a - lim.i_max}
        n_new = 0
        for t in np.flatnonzero(np.any(d != 0, axis=1)):
            part = self.parts[int(of_t[t])]
            hit = np.zeros(self.ctl.n, dtype=bool)
            for kind, sign, eff, floor in (("v_max", 1.0, part.dv, HOLD_MIN_PU),
                                           ("v_min", -1.0, part.dv, HOLD_MIN_PU),
                                           ("i_max", 1.0, part.di, 100 * HOLD_MIN_PU)):
                e = np.flatnonzero(over[kind][t] & (excess[kind][t] >= floor / 2))
                if e.size:
                    push = sign * eff[e] * d[t][None, :]          # (len(e), n_ctl)
                    need = np.maximum(HOLD_SHARE * excess[kind][t, e], floor)[:, None]
                    hit |= (push >= need).any(axis=0)
            new = hit & np.isnan(self.target[t])
            if not HOLD_SWITCH and t > 0:  # only where the base state is a "stay"
                new &= ref.cap_on[t - 1] == self.base_on[t]
            self.target[t, new] = self.base_on[t, new]
            cand = np.flatnonzero(new)
            if cand.size:  # only what a few DERs can do (a far-off state is left alone)
                tt = np.full(cand.size, t)
                _lo, _hi, need = self._bounds(self.offset(ref), tt, cand)
                far = need > HOLD_REACH * self.reach(tt, cand, HOLD_TOP)
                self.target[t, cand[far]] = np.nan
                new[cand[far]] = False
            n_new += int(new.sum())
        if n_new:
            self._add_rows()
            t, c = np.nonzero(~np.isnan(self.target))
            log.info("dispatch cap_hold pairs=%d (intervals %s, controls %s)", t.size,
                     np.unique(t).tolist(), np.unique(self.ctl.name[c]).tolist())
        return n_new

    def offset(self, ref: Reference) -> Reference:
        """``ref`` with every held capacitor in its target state (linear effect on node
        voltages, branch currents and monitored kvar); ``ref`` itself without holds."""
        held = ~np.isnan(self.target)
        if not held.any() or ref.cap_on is None:
            return ref
        delta = np.where(held, np.nan_to_num(self.target) - ref.cap_on, 0.0)   # (T, n_ctl)
        t = np.flatnonzero(np.any(delta != 0, axis=1))
        if t.size == 0:
            return ref
        v, i, q = ref.v_pu.copy(), ref.i_a.copy(), ref.ctl_kvar.copy()
        on = ref.cap_on.copy()
        for k in t:
            part = self.parts[int(self._part(np.array([k]))[0])]
            v[k] += part.dv @ delta[k]
            i[k] = np.maximum(i[k] + part.di @ delta[k], 0.0)
            q[k] += part.dq @ delta[k]
            on[k] += delta[k]
        return replace(ref, v_pu=v, i_a=i, ctl_kvar=q, cap_on=on)

    def _add_rows(self) -> None:
        """Rows (with two slack columns each) for held pairs that have none yet."""
        t, c = np.nonzero(~np.isnan(self.target) & (self.row < 0))
        if t.size == 0:
            return
        pl, lay = self.pl, self.pl.lay
        part = self._part(t)
        g = np.empty((t.size, lay.nv))
        for p in np.unique(part):
            k = np.flatnonzero(part == p)
            s = self.parts[int(p)]
            g[k] = (pl.ep.T @ s.dq_p[c[k]].T).T + (pl.eq.T @ s.dq_q[c[k]].T).T
        G = sp.csr_matrix(g)
        G.indices = (G.indices + np.repeat(t * lay.nv, np.diff(G.indptr))).astype(np.int32)
        cols = pl.lp.add_cols(np.full(2 * t.size, HOLD_PRICE), np.zeros(2 * t.size),
                              np.full(2 * t.size, INF))
        n = int(cols[-1]) + 1
        r = np.arange(t.size)
        G = sp.csr_matrix((G.data, G.indices, G.indptr), shape=(t.size, n)) + sp.csr_matrix(
            (np.r_[np.ones(t.size), -np.ones(t.size)], (np.r_[r, r], cols)),
            shape=(t.size, n))
        idx = pl.lp.add_rows(RowBlock(G, np.full(t.size, -INF), np.full(t.size, INF),
                                      np.full(t.size, "cap_hold", dtype=object),
                                      self.ctl.name[c].astype(object), t))
        self.row[t, c] = idx

    def _bounds(self, ref: Reference, t: np.ndarray, c: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row bounds (lo, hi) of held pairs (t, c) at the (offset) reference ``ref`` and
        the kvar the DERs must move the monitored flow by to meet them: the kvar the
        control sees before acting (the capacitor in its state of the interval before)
        on the side of its setting that gives the target state."""
        pl = self.pl
        prev = np.where(t > 0, ref.cap_on[np.maximum(t - 1, 0), c], ref.cap_on[t, c])
        q_pre, lin_ref = ref.ctl_kvar[t, c].copy(), np.empty(t.size)
        dp, dq = (ref.p_kw - pl.cp)[t], ref.q_kvar[t]
        for k in range(t.size):
            part = self.parts[int(self._part(t[k:k + 1])[0])]
            q_pre[k] += part.dq[c[k], c[k]] * (prev[k] - ref.cap_on[t[k], c[k]])
            lin_ref[k] = part.dq_p[c[k]] @ dp[k] + part.dq_q[c[k]] @ dq[k]
        on, off = self.ctl.on_kvar[c], self.ctl.off_kvar[c]
        m = HOLD_MARGIN * np.abs(on - off)
        want_on, was_on = self.target[t, c] >= 0.5, prev >= 0.5
        up = np.where(want_on, np.where(was_on, off + m, on + m), -INF)
        down = np.where(~want_on, np.where(was_on, off - m, on - m), INF)
        need = np.maximum(up - q_pre, 0.0) + np.maximum(q_pre - down, 0.0)
        base = q_pre - lin_ref  # the row is the DERs' part: lin(x) = kvar - base
        return up - base, down - base, need

    def recenter(self, ref: Reference) -> None:
        """Bounds of every held row at the (offset) reference ``ref`` (:meth:`_bounds`)."""
        t, c = np.nonzero(self.row >= 0)
        if t.size == 0 or ref.cap_on is None:
            return
        lo, hi, need = self._bounds(ref, t, c)
        self.pl.lp.set_row_bounds(self.row[t, c], lo, hi)
        log.info("dispatch cap_hold rows=%d kvar_to_move=%s", t.size,
                 [(int(a), str(self.ctl.name[b]), round(float(x), 1))
                  for a, b, x in zip(t, c, need) if x > 0])

    def reach(self, t: np.ndarray, c: np.ndarray, top: int) -> np.ndarray:
        """kvar the ``top`` DERs that move each pair's monitored flow most can move it by
        (over their range)."""
        span = np.max(self.pl.net.box[1] - self.pl.net.box[0], axis=0)
        qspan = np.max(self.pl.net.box[3] - self.pl.net.box[2], axis=0)
        out = np.empty(t.size)
        for k in range(t.size):
            part = self.parts[int(self._part(t[k:k + 1])[0])]
            a = np.abs(part.dq_p[c[k]]) * span + np.abs(part.dq_q[c[k]]) * qspan
            m = min(top, a.size)
            out[k] = np.partition(a, a.size - m)[a.size - m:].sum()
        return out

    def movers(self, top: int) -> np.ndarray:
        """(n_der,) bool: the ``top`` DERs whose net import moves each held row most."""
        t, c = np.nonzero(self.row >= 0)
        out = np.zeros(self.parts[0].dq_p.shape[1], dtype=bool)
        if t.size == 0:
            return out
        span = np.max(self.pl.net.box[1] - self.pl.net.box[0], axis=0)
        qspan = np.max(self.pl.net.box[3] - self.pl.net.box[2], axis=0)
        for k in range(t.size):
            part = self.parts[int(self._part(t[k:k + 1])[0])]
            a = np.abs(part.dq_p[c[k]]) * span + np.abs(part.dq_q[c[k]]) * qspan
            m = min(top, a.size)
            best = np.argpartition(-a, m - 1)[:m]
            out[best[a[best] > 0]] = True
        return out
