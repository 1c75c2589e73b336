"""Network rows of the dispatch LP: voltages, branch currents, head import (peak, export).

The network part is ``V_t = V_ref_t + S (P_t - P_ref_t)`` in the linear model's u-form
(``u = (|V|^2 - |V_ref|^2) / (2 |V_ref|)``, :mod:`derms.powerflow.linear`): ``S`` (node
voltages and branch currents per kW/kvar of each DER's net import) is evaluated once, at
the feeder's base (peak) load with controls frozen, or, on large feeders, at a few
operating points of the uncontrolled QSTS, each serving the intervals nearest to it in
head import (:class:`SensitivitySet`); ``V_ref_t``/``I_ref_t``/head import are
the AC QSTS result of a reference schedule (first the uncontrolled one, then each
AC-verified plan), so a re-linearisation only changes row bounds. Rows exist only for
(interval, element) pairs that can bind: the reachable ones (linear model over the DER
box) that are near their limit at the reference, plus those a solution violates in the
linear prediction or in the AC check (added lazily).

Reactive power relieves a thermal row only where it cannot overshoot: ``|I|`` is convex in
the injections, and the tangent ``d|I|/dQ x Q`` promises ever more relief from kvar that
cancels a branch's reactive flow, past the point where that flow reverses and the
current grows again. Where the DERs' kvar could inject more reactive current than the
branch carries (``NetworkRows.q_abs``: their full kvar times the magnitude of their current
sensitivity, against the reference current times the branch's reactive share, estimated
from the same sensitivities), the row takes a DER's kvar as ``|d|I|/dQ| x |Q|``
(absorbed and injected alike, the LP's ``pv_qa + pv_qi``: the triangle inequality's
side); elsewhere (a feeder head carrying MW and Mvar) the tangent stays. On EPRI ckt24
the plan put four PV inverters at full kvar injection all night behind a service
transformer already at 106-200 % without any DER, to make room for EV charging behind
it: its reactive flow turned from 7 kvar lagging to 15 leading and the AC check found
it 1.5-11 points above its base value in 40 intervals, which the later rounds could not
remove (the re-centred rows kept the same tangent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from derms.analysis.constraints import Limits
from derms.der.models import Connection, Fleet, FleetArrays
from derms.dispatch.lp import INF, HighsLP, Layout, RowBlock
from derms.powerflow.linear import LinearModel

V_KINDS = ("v_max", "v_min")


Sens = np.ndarray | sp.csr_matrix
_DENSE_ABOVE = 1_000_000  # nodes x DERs above which sensitivities are kept dense and the
# large-feeder rules plan (:func:`is_large`). EPRI ckt7 (2,452 nodes x 679 DERs, 1.66 M)
# was below the 2 M it had been: every near-limit row in the LP from the start, 136-320 s
# a day with a stalling warm dual simplex; with the large-feeder rules (and their lazy
# rows per element, :meth:`NetworkRows.add_lazy`) 0 violations on seeds 1-3 in about a
# fifth of that (bench/README.md). IEEE 123 with 68 DERs is 0.02 M.

# large feeders: thermal rows thinned by direction cluster too. Off: a service
# transformer's row is its own (the EV behind it), and one row per (interval, cluster)
# left dozens of them to later rounds. EPRI ckt24: 47 -> 40 thermal violations; IEEE
# 8500: 12 -> 10 (0 thermal), at more rows (4.1 M nonzeros against 2.7 M) and a slower LP
THIN_THERMAL = False


LARGE_DROP_REL = 0.02  # large-feeder rules: coefficients below this share of a row's
# largest are dropped (the AC check catches what that costs)
NEAR_ROWS_PER_COL = 2.0  # more near-limit rows at the reference than this many per LP
# column: the large-feeder rules instead (Planner). The European LV test case (source at
# 1.05 pu) has 152,569 near rows for 9,804 columns (15.6 per column: 22 s a day, the same
# plan in 0.4 s with the large rules); IEEE 13/34/37/123 and EPRI ckt7 0.01-0.17


def is_large(n_nodes: int, n_der: int) -> bool:
    """The large-feeder mode (EPRI ckt5, ckt7 and ckt24, IEEE 8500 with hundreds of
    DERs): nodes x DERs above ``_DENSE_ABOVE``. Sensitivities are then dense arrays and the
    planner and its AC verification switch to elastic, thinned rows, operating-point
    sensitivities and local repair."""
    return n_nodes * n_der > _DENSE_ABOVE


@dataclass(frozen=True)
class DerSensitivity:
    """Sensitivities per DER (columns in fleet order) of node |V| [pu/kW, u-form] and branch
    |I| [A/kW] to net import (consumption positive); a DER's power is shared equally by
    its phase nodes. Small feeders keep them as CSR (products then never go through the
    multi-threaded BLAS, which on a loaded 2-core machine made 100 x 300 products take
    15 ms each); large ones (nodes x DERs above ``_DENSE_ABOVE``) as dense C arrays, where
    one BLAS product of (T, n_der) x (n_der, n_nodes) is far cheaper than CSR with dense
    rows. Radial-feeder sensitivities are dense by nature: this is nodes x DERs, never
    nodes x nodes."""

    hv_p: Sens
    hv_q: Sens
    hi_p: Sens
    hi_q: Sens

    @property
    def n_der(self) -> int:
        return self.hv_p.shape[1]


def times_t(x: np.ndarray, m: Sens) -> np.ndarray:
    """``x @ m.T`` as an ndarray for dense or CSR ``m``: (k, n_der) x (n, n_der) -> (k, n)."""
    if sp.issparse(m):
        return np.asarray((m @ x.T).T)
    return x @ m.T


def times_t_abs(x: np.ndarray, m: Sens, chunk: int = 2048) -> np.ndarray:
    """``|x| @ |m|.T`` as an ndarray, ``m``'s rows in chunks (a dense ``|m|`` of EPRI
    ckt24's branches x DERs would be another 175 MB)."""
    ax = np.abs(x)
    if sp.issparse(m):
        return np.asarray((abs(m) @ ax.T).T)
    out = np.empty((ax.shape[0], m.shape[0]))
    for lo in range(0, m.shape[0], chunk):
        out[:, lo:lo + chunk] = ax @ np.abs(m[lo:lo + chunk]).T
    return out


def rows_dense(m: Sens, e: np.ndarray) -> np.ndarray:
    """Rows ``e`` of ``m`` as a dense (len(e), n_der) array."""
    return m[e].toarray() if sp.issparse(m) else np.asarray(m[e])


def der_map(lin: LinearModel, fleet: Fleet,
            parts: Sequence[Sequence[tuple[Connection, float]]] | None = None
            ) -> sp.csc_matrix:
    """(n_inj, n_der): a DER's power shared equally by its phase nodes (``lin``'s
    injection nodes; nodes of no DER get no column). ``parts`` (one per DER, fleet
    order): the DER's power spread over several connections with those shares (an
    aggregated DER, :mod:`derms.der.aggregate`); default its own connection."""
    pos = {n: k for k, n in enumerate(lin.injection_nodes)}
    rows, cols, vals = [], [], []
    spread = parts if parts is not None else [((d.connection, 1.0),) for d in fleet.ders]
    for j, der_parts in enumerate(spread):
        for conn, share in der_parts:
            nodes = conn.injection_terminals
            for n in nodes:
                rows.append(pos[n])
                cols.append(j)
                vals.append(share / len(nodes))
    return sp.csc_matrix((vals, (rows, cols)),
                         shape=(len(lin.injection_nodes), len(fleet.ders)))


def der_sensitivity(lin: LinearModel, fleet: Fleet,
                    parts: Sequence[Sequence[tuple[Connection, float]]] | None = None, *,
                    W: sp.spmatrix | None = None) -> DerSensitivity:
    """Sensitivities of the fleet's DERs (``parts``: see :func:`der_map`; ``W``: the map
    of ``lin``'s injection columns to DERs when given)."""
    W = der_map(lin, fleet, parts) if W is None else W
    b = lin.branches
    dense = is_large(lin.dv_dp_pu_per_kw.shape[0], W.shape[1])

    def conv(m: np.ndarray) -> Sens:
        out = (W.T @ m.T).T  # sparse W: no threaded BLAS call
        return np.ascontiguousarray(out) if dense else sp.csr_matrix(out)

    return DerSensitivity(conv(lin.dv_dp_pu_per_kw), conv(lin.dv_dq_pu_per_kvar),
                          conv(b.di_dp_a_per_kw), conv(b.di_dq_a_per_kvar))


def thermal_rows_from_loaded_points(parts: tuple[DerSensitivity, ...], i_at_a: np.ndarray,
                                    keep: float = 0.5) -> tuple[DerSensitivity, ...]:
    """Branch-current rows of each part taken from the part where the branch carries the
    most current (``i_at_a``: (k, n_branch) |I| [A] at each part's operating point),
    wherever the part's own current is below ``keep`` of that.

    A |I| sensitivity is the projection of the current change on the operating point's
    current direction: where the current is near zero (a service transformer whose PV
    meets its load at that point) the direction is arbitrary, and one IEEE 8500
    transformer got -0.017 A/kW for its EV (the AC check: +0.13 A/kW, 166 % loading).
    Thermal rows bind when the element is loaded, so the most loaded point's direction is
    the one that matters."""
    k = len(parts)
    if k < 2:
        return parts
    best = np.argmax(i_at_a, axis=0)                      # (n_branch,)
    top = i_at_a[best, np.arange(i_at_a.shape[1])]
    out = []
    for c, part in enumerate(parts):
        borrow = (i_at_a[c] < keep * top) & (best != c)
        if not borrow.any():
            out.append(part)
            continue
        hi = []
        for name in ("hi_p", "hi_q"):
            m = getattr(part, name)
            if sp.issparse(m):
                keep_own = sp.diags((~borrow).astype(float))
                new = keep_own @ m
                for b in np.unique(best[borrow]):
                    sel = sp.diags((borrow & (best == b)).astype(float))
                    new = new + sel @ getattr(parts[int(b)], name)
                hi.append(sp.csr_matrix(new))
            else:
                new = np.array(m, copy=True)
                rows = np.flatnonzero(borrow)
                for b in np.unique(best[rows]):
                    r = rows[best[rows] == b]
                    new[r] = np.asarray(getattr(parts[int(b)], name))[r]
                hi.append(new)
        out.append(replace(part, hi_p=hi[0], hi_q=hi[1]))
    return tuple(out)


@dataclass(frozen=True)
class SensitivitySet:
    """Sensitivities per group of intervals: ``parts[of_t[t]]`` serves interval ``t``.

    One operating point does not fit a whole day on large feeders: on IEEE 8500 the node
    voltage response to a DER's power grows with the feeder's loading (at 5.1 MW of head
    import it is 0.70 of that at the 9.7 MW peak, and the response linearised at the
    feeder's nominal loads is 1.3-1.9 x what the QSTS intervals show), so each group of
    intervals gets the model linearised at one of its own intervals
    (:meth:`derms.dispatch.verify.ACNetwork.grid_context`)."""

    parts: tuple[DerSensitivity, ...]
    of_t: np.ndarray  # (T,) index into parts
    at: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (k,)
    # the interval each part was linearised at (empty: not from a QSTS)

    @classmethod
    def of(cls, sens: DerSensitivity | SensitivitySet, T: int) -> SensitivitySet:
        """``sens`` as a set over ``T`` intervals (one part for a plain DerSensitivity)."""
        if isinstance(sens, SensitivitySet):
            if sens.of_t.size != T:
                raise ValueError(f"sensitivity set covers {sens.of_t.size} intervals, not {T}")
            return sens
        return cls((sens,), np.zeros(T, dtype=np.int64))

    def groups(self) -> list[tuple[int, np.ndarray]]:
        """(part, intervals) for every part that serves at least one interval."""
        return [(c, np.flatnonzero(self.of_t == c)) for c in range(len(self.parts))
                if np.any(self.of_t == c)]


@dataclass(frozen=True)
class Reference:
    """An AC-solved schedule: DER net import ``p_kw``/``q_kvar`` (T, n_der), node ``v_pu``
    (T, n_nodes), branch ``i_a`` (T, n_branch_conductors), head import ``head_kw`` (T,)."""

    p_kw: np.ndarray
    q_kvar: np.ndarray
    v_pu: np.ndarray
    i_a: np.ndarray
    head_kw: np.ndarray
    element_kw: dict[str, np.ndarray] = field(default_factory=dict)  # watched flows (T,)
    # kvar-type capacitor controls (``control_rows``): share of the capacitor on and the
    # monitored kvar, (T, n_ctl); None when not recorded
    cap_on: np.ndarray | None = None
    ctl_kvar: np.ndarray | None = None
    # tap positions of the regulators a step up from their band's lower edge takes over the
    # voltage limit (``ACNetwork.hazard_regs``), (T, n_reg); None when not recorded
    taps: np.ndarray | None = None


@dataclass(frozen=True)
class NetworkLimits:
    """Per interval and element limits, pre-existing violations held at the base case:
    ``v_max``/``v_min`` (T, n_nodes) [pu], ``i_max`` (T, n_br) [A] (inf: no rating),
    ``node_ok`` (n_nodes,) phase nodes that are energised in the base case."""

    v_max: np.ndarray
    v_min: np.ndarray
    i_max: np.ndarray
    node_ok: np.ndarray
    # voltage regulators' monitored nodes (k,) and the band [pu] inside which their taps
    # stay put: the rows hold these nodes inside it (never tighter than the reference), so
    # the frozen-control sensitivities stay valid for the plan (see ``regulator_bands``)
    band_node: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    band_lo_pu: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_hi_pu: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # (n_br,) normal ratings [A] (<= 0: none), for the count's own thresholds
    # (``ac_repair_rows``); empty where not known
    rating_a: np.ndarray = field(default_factory=lambda: np.zeros(0))


def network_limits(base: Reference, node_phase: np.ndarray, rating_a: np.ndarray,
                   limits: Limits) -> NetworkLimits:
    """Limits as in DESIGN.md "Definitions", relative to the base case ``base``: an element
    already beyond a limit in the base case is held to its base value (a voltage plus half
    the counting tolerance, which the AC count allows). That includes one
    beyond the limit but inside the tolerance (not a violation by the definition): held at
    its base value too, since the nominal limit would make the LP infeasible for a state
    the plan did not cause (found by the control loop's re-plan: IEEE 123 at night, 0.1 A
    over on line.l7)."""
    v = base.v_pu
    # a voltage is held at the base value plus half the counting tolerance: exactly at the
    # base value, a pinned node (a regulator's, which its taps hold) made the LP charge
    # batteries to pull it down, and a 1-h plan's peak rose above the uncontrolled one
    # (IEEE 13). Currents stay at the base value: with half their tolerance the AC
    # check found the head section over it in every round (IEEE 13, 24 h)
    # (a base value inside the tolerance is no violation: the count's threshold stays the
    # limit's own, so it is held at the looser of the base value and the limit + half the
    # tolerance, never past the threshold: max(base, v_max + tol/2) above, min(base,
    # v_min - tol/2) below -- at base - half the tolerance the LP let IEEE 34's bus 890 go
    # to 0.9487 from a base of 0.9491)
    tol, half_v = limits.v_tol_pu, 0.5 * limits.v_tol_pu
    hi, lo = limits.v_max_pu, limits.v_min_pu
    v_max = np.where(v > hi + tol, v + half_v,
                     np.where(v > hi, np.maximum(v, hi + half_v), hi))
    live = v >= limits.energised_min_pu
    v_min = np.where(live & (v < lo - tol), v - half_v,
                     np.where(live & (v < lo), np.minimum(v, lo - half_v), lo))
    rated = np.where(rating_a > 0, rating_a * limits.thermal_pct / 100.0, INF)
    i_max = np.maximum(base.i_a, rated)
    node_ok = (node_phase <= 3) & (v.min(axis=0) >= limits.energised_min_pu)
    return NetworkLimits(v_max, v_min, i_max, node_ok,
                         rating_a=np.asarray(rating_a, dtype=float))


def der_box(a: FleetArrays, allow_q: bool) -> tuple[np.ndarray, ...]:
    """Range of each DER's net import per interval: (p_lo, p_hi, q_lo, q_hi), (T, n_der)."""
    T = a.pv_avail_kw.shape[0]
    bc = np.broadcast_to
    nb, ne, ng = a.bat_p_max_kw.size, a.ev_p_max_kw.size, a.gen_p_max_kw.size
    p_lo = np.column_stack([-a.pv_avail_kw, -bc(a.bat_p_max_kw, (T, nb)), np.zeros((T, ne)),
                            a.flex_base_kw - a.flex_shed_max_kw, -bc(a.gen_p_max_kw, (T, ng))])
    p_hi = np.column_stack([np.zeros_like(a.pv_avail_kw), bc(a.bat_p_max_kw, (T, nb)),
                            a.ev_p_max_kw * a.ev_window, a.flex_base_kw + a.flex_rebound_max_kw,
                            -bc(a.gen_p_min_kw, (T, ng))])
    q = a.pv_q_max_kvar if allow_q else np.zeros_like(a.pv_q_max_kvar)
    q_hi = np.zeros_like(p_lo)
    q_hi[:, :q.shape[1]] = q
    return p_lo, p_hi, -q_hi, q_hi


class NetworkRows:
    """The reference-centred rows of one LP and their bookkeeping (see module docstring).

    ``margin`` arrays (T, n) tighten single rows [pu or A] where the AC check found the
    linear model optimistic. Row coefficients are formed only for the rows added (from
    the sensitivities, on demand); ``drop_rel`` drops coefficients below that share of
    a row's largest one (0 keeps all; the AC check catches what that costs).

    ``thin`` (large feeders): rows whose sensitivities point the same way (elements of a
    lateral, the phases of a secondary) form one cluster; rows are then added at most one
    per (interval, cluster) and round, the most violated first, and the lazy rounds add the
    next ones only if the first did not already pull the others inside their limits.
    """

    def __init__(self, lp: HighsLP, lay: Layout, sens: DerSensitivity | SensitivitySet,
                 ep: sp.csr_matrix,
                 eq: sp.csr_matrix, cp: np.ndarray, lim: NetworkLimits,
                 box: tuple[np.ndarray, ...], export_limit_kw: float | None,
                 node_names: np.ndarray, branch_names: np.ndarray, near_pu: float = 0.01,
                 near_frac: float = 0.1, drop_rel: float = 0.0, thin: bool = False) -> None:
        self.lp, self.lay, self.cp, self.lim = lp, lay, cp, lim
        self.sset = SensitivitySet.of(sens, lay.T)
        self.sens = self.sset.parts[0]  # representative (clusters, element coefficients)
        self.near_pu, self.near_frac = near_pu, near_frac
        # large-feeder rules: (pu, share of the rating) of the near-limit rows an element
        # brings into the LP with its first lazy row (:meth:`add_lazy`); None: rows alone
        self.lazy_near: tuple[float, float] | None = None
        self.n_lazy_near = 0  # rows those brought in (beyond the violated ones)
        self.ep, self.eq, self.drop_rel = ep, eq, drop_rel
        self.eq_abs = abs(sp.csr_matrix(eq))  # kvar absorbed + injected (thermal rows)
        # thermal rows whose kvar could overshoot the branch's reactive flow (module
        # docstring): fixed at the first reference; None (before it): all of them
        self.q_abs: np.ndarray | None = None
        self._q_reach = self._q_sin = None
        self.cluster: dict[str, np.ndarray] | None = None
        self.n_unfixable = 0  # (t, element) rows skipped: beyond reach of every DER
        # large feeders: network rows are elastic (slack priced per pu of u and per A), so
        # a row the linear model cannot meet leaves the LP feasible and the AC check
        # reports what is left
        self.elastic: tuple[float, float] | None = None
        if thin:
            self.use_large_rules()
        self.names = {"v_max": node_names, "v_min": node_names, "i_max": branch_names}
        T = lay.T
        self.row = {k: np.full((T, len(n)), -1, dtype=np.int64) for k, n in self.names.items()}
        self.margin = {k: np.zeros((T, len(n))) for k, n in self.names.items()}
        # intervals (T,) whose regulator bands (``NetworkLimits.band_node``) are held; the
        # AC rounds switch them on where the AC check finds violations
        self.band_on = np.zeros(T, dtype=bool)
        self.export_limit_kw = export_limit_kw
        g_head = np.asarray(ep.sum(axis=0)).ravel()
        t = np.arange(T)
        nz = np.flatnonzero(g_head)
        r = np.repeat(t, nz.size + 1)
        c = np.c_[t[:, None] * lay.nv + nz[None, :], np.full(T, lay.z)].ravel()
        v = np.tile(np.r_[g_head[nz], -1.0], T)
        A = sp.csr_matrix((v, (r, c)), shape=(T, lay.n_cols))
        self.peak_rows = lp.add_rows(RowBlock(A, np.full(T, -INF), np.zeros(T),
                                              np.full(T, "peak", dtype=object),
                                              np.full(T, "feeder_head", dtype=object), t))
        self.export_rows = np.zeros(0, dtype=np.int64)
        if export_limit_kw is not None:
            A2 = sp.csr_matrix((np.tile(g_head[nz], T), (np.repeat(t, nz.size),
                                (t[:, None] * lay.nv + nz[None, :]).ravel())),
                               shape=(T, lay.n_cols))
            self.export_rows = lp.add_rows(RowBlock(A2, np.zeros(T), np.full(T, INF),
                                                    np.full(T, "export_limit", dtype=object),
                                                    np.full(T, "feeder_head", dtype=object), t))
        self.ref: Reference | None = None
        self._at_ref: dict[str, np.ndarray] = {}
        self.set_box(box)

    def use_large_rules(self) -> None:
        """The large-feeder rules (class docstring): rows only where the reference is
        beyond a limit at first, then lazily (a violated thermal row with its branch's
        near-rating rows, :meth:`add_lazy`), thinned by direction cluster, elastic, small
        coefficients dropped. Called before :meth:`initial_rows`."""
        self.elastic = self.elastic or (1e6, 1e3)
        if self.lazy_near is None:
            self.lazy_near = (max(self.near_pu, 0.0), max(self.near_frac, 0.0))
        self.near_pu = min(self.near_pu, -1e-6)
        self.near_frac = min(self.near_frac, -1e-6)
        self.drop_rel = max(self.drop_rel, LARGE_DROP_REL)
        cv, ci = coarse_clusters(self.sens.hv_p), coarse_clusters(self.sens.hi_p)
        self.cluster = {"v_max": cv, "v_min": cv, "i_max": ci}

    # -- sensitivities ---------------------------------------------------------------------
    def _s(self, kind: str, part: int = 0) -> tuple[Sens, Sens]:
        s = self.sset.parts[part]
        return (s.hi_p, s.hi_q) if kind == "i_max" else (s.hv_p, s.hv_q)

    def sens_at(self, t: int) -> DerSensitivity:
        """The sensitivities that serve interval ``t``."""
        return self.sset.parts[int(self.sset.of_t[t])]

    def _lin(self, kind: str, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Linear row quantity (T, n) of DER net import changes ``p``/``q`` (T, n_der);
        thermal rows take ``|S_q| |q|`` (module docstring)."""
        q_term = self._thermal_q if kind == "i_max" else times_t
        groups = self.sset.groups()
        if len(groups) == 1:
            sp_, sq = self._s(kind, groups[0][0])
            out = times_t(p, sp_)
            if np.any(q):
                out += q_term(q, sq)
            return out
        out = np.empty((p.shape[0], self._s(kind)[0].shape[0]))
        for c, ts in groups:
            sp_, sq = self._s(kind, c)
            out[ts] = times_t(p[ts], sp_)
            if np.any(q[ts]):
                out[ts] += q_term(q[ts], sq)
        return out

    def _thermal_q(self, q: np.ndarray, sq: Sens) -> np.ndarray:
        """Thermal rows' kvar term (k, n_branch): ``|S_q| |q|`` where ``q_abs``, else
        ``S_q q``."""
        absolute = times_t_abs(q, sq)
        if self.q_abs is None or self.q_abs.all():
            return absolute
        return np.where(self.q_abs[None, :], absolute, times_t(q, sq))

    def _q_overshoot_stats(self, q_cap: np.ndarray) -> None:
        """Per branch (part 0's sensitivities, DER kvar ranges ``q_cap`` (n_der,)): the
        reactive current the DERs' full kvar could inject [A] (``|S_p + j S_q|`` per kvar,
        the same magnitude as per kW for a DER beyond the branch) and the branch's
        reactive share ``sin phi`` (their ``|S_q|`` against that magnitude, weighted)."""
        hp, hq = self.sens.hi_p, self.sens.hi_q
        if sp.issparse(hp):
            mag = (hp.multiply(hp) + hq.multiply(hq)).sqrt()
            reach = np.asarray(mag @ q_cap).ravel()
            proj = np.asarray(abs(hq) @ q_cap).ravel()
        else:
            reach, proj = np.empty(hp.shape[0]), np.empty(hp.shape[0])
            for lo in range(0, hp.shape[0], 2048):
                a, b = hp[lo:lo + 2048], hq[lo:lo + 2048]
                reach[lo:lo + 2048] = np.sqrt(a * a + b * b) @ q_cap
                proj[lo:lo + 2048] = np.abs(b) @ q_cap
        with np.errstate(divide="ignore", invalid="ignore"):
            self._q_sin = np.where(reach > 0, proj / reach, 0.0)
        self._q_reach = reach

    def set_box(self, box: tuple[np.ndarray, ...]) -> None:
        """The DERs' range (p_lo, p_hi, q_lo, q_hi) (T, n_der); precomputes the largest and
        smallest linear value every row can take over it (for screening)."""
        self.box = box
        p_lo, p_hi, q_lo, q_hi = box
        if self._q_reach is None:
            q_cap = np.max(np.maximum(np.abs(q_lo), np.abs(q_hi)), axis=0) if q_lo.size \
                else np.zeros(q_lo.shape[1])
            self._q_overshoot_stats(q_cap)
        p_lo, p_hi = p_lo - self.cp, p_hi - self.cp  # rows act on the columns, not on cp
        self._range: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, kind in (("v", "v_max"), ("i", "i_max")):
            hi = np.zeros((p_lo.shape[0], self._s(kind)[0].shape[0]))
            lo = np.zeros_like(hi)
            for c, ts in self.sset.groups():
                sp_, sq = self._s(kind, c)
                for m, a_lo, a_hi in ((sp_, p_lo[ts], p_hi[ts]), (sq, q_lo[ts], q_hi[ts])):
                    if not (np.any(a_lo) or np.any(a_hi)):
                        continue
                    if kind == "i_max" and m is sq:  # |S_q| |q|: from 0 (or the box's
                        # nearest edge to 0) up to its farthest edge
                        far = np.maximum(np.abs(a_lo), np.abs(a_hi))
                        near = np.where((a_lo <= 0) & (a_hi >= 0), 0.0,
                                        np.minimum(np.abs(a_lo), np.abs(a_hi)))
                        hi[ts] += times_t_abs(far, m)
                        lo[ts] += times_t_abs(near, m)
                        continue
                    pos, neg = m.maximum(0) if sp.issparse(m) else np.maximum(m, 0), \
                        m.minimum(0) if sp.issparse(m) else np.minimum(m, 0)
                    hi[ts] += times_t(a_hi, pos) + times_t(a_lo, neg)
                    lo[ts] += times_t(a_lo, pos) + times_t(a_hi, neg)
            self._range[key] = (lo, hi)

    def g_rows(self, kind: str, e: np.ndarray, part: int = 0) -> sp.csr_matrix:
        """Row coefficients (len(e), nv) of elements ``e`` on one interval's columns (the
        intervals served by sensitivity ``part``)."""
        sp_, sq = self._s(kind, part)
        sq = sq[e]
        if sp.issparse(sp_):
            g_q = sq @ self.eq
            if kind == "i_max":  # kvar either way counts against these thermal rows
                a = self._abs_rows(e)
                g_q = sp.diags((~a).astype(float)) @ g_q + \
                    sp.diags(a.astype(float)) @ (abs(sq) @ self.eq_abs)
            g = sp.csr_matrix(sp_[e] @ self.ep + g_q)
        else:
            sq = np.asarray(sq)
            g_q = (self.eq.T @ sq.T).T
            if kind == "i_max":
                a = self._abs_rows(e)
                if a.any():
                    g_q[a] = (self.eq_abs.T @ np.abs(sq[a]).T).T
            g = np.asarray((self.ep.T @ sp_[e].T).T + g_q)
            if self.drop_rel > 0:
                big = np.abs(g).max(axis=1, keepdims=True)
                g[np.abs(g) < self.drop_rel * big] = 0.0
            g = sp.csr_matrix(g)
        g.eliminate_zeros()
        return g

    def _abs_rows(self, e: np.ndarray) -> np.ndarray:
        """(len(e),) bool: thermal rows of elements ``e`` that take kvar as ``|S_q| |q|``."""
        return np.ones(len(e), dtype=bool) if self.q_abs is None else self.q_abs[e]

    # -- reference and bounds ------------------------------------------------------------
    def at_ref(self, kind: str) -> np.ndarray:
        """Linear row value (T, n) at the reference schedule (columns without ``cp``)."""
        key = "i" if kind == "i_max" else "v"
        if key not in self._at_ref:
            ref = self.ref
            self._at_ref[key] = self._lin(kind, ref.p_kw - self.cp, ref.q_kvar)
        return self._at_ref[key]

    def limit_term(self, kind: str) -> np.ndarray:
        """Distance (T, n) from the reference to the limit in row units (u [pu] or A)."""
        ref, lim, m = self.ref, self.lim, self.margin[kind]
        if kind == "i_max":
            return lim.i_max - m - ref.i_a
        v0 = np.maximum(ref.v_pu, 1e-6)
        v_lim = lim.v_max - m if kind == "v_max" else lim.v_min + m
        b, on = lim.band_node, self.band_on
        if b.size and on.any():  # regulator bands in the intervals where they are held,
            # never tighter than the reference (taps as the reference's AC run found)
            vr = ref.v_pu[np.ix_(on, b)]
            cur, mb = v_lim[np.ix_(on, b)], m[np.ix_(on, b)]
            if kind == "v_max":
                v_lim[np.ix_(on, b)] = np.minimum(cur, np.maximum(lim.band_hi_pu - mb, vr))
            else:
                v_lim[np.ix_(on, b)] = np.maximum(cur, np.minimum(lim.band_lo_pu + mb, vr))
        return (v_lim**2 - v0**2) / (2 * v0)

    def rhs(self, kind: str) -> np.ndarray:
        """Right-hand side (T, n) of every potential row of ``kind`` at the reference."""
        return self.limit_term(kind) + self.at_ref(kind)

    def set_reference(self, ref: Reference) -> None:
        """Re-centre every network row at an AC-solved schedule (bounds only)."""
        self.ref = ref
        self._at_ref = {}
        if self.q_abs is None:  # once: the rows already in the LP keep their coefficients
            i_r = np.max(ref.i_a, axis=0) * self._q_sin
            self.q_abs = self._q_reach > i_r
        for kind, rows in self.row.items():
            sel = rows >= 0
            if sel.any():
                b = self.rhs(kind)[sel]
                if kind == "v_min":
                    self.lp.set_row_bounds(rows[sel], b, np.full(b.size, INF))
                else:
                    self.lp.set_row_bounds(rows[sel], np.full(b.size, -INF), b)
        h0 = ref.head_kw - (ref.p_kw - self.cp).sum(axis=1)
        T = self.lay.T
        self.lp.set_row_bounds(self.peak_rows, np.full(T, -INF), -h0)
        if self.export_rows.size:
            self.lp.set_row_bounds(self.export_rows, -self.export_limit_kw - h0,
                                   np.full(T, INF))

    def lhs(self, kind: str, x: np.ndarray) -> np.ndarray:
        """Linear row values (T, n) of every potential row at solution ``x``."""
        xt = x[: self.lay.z].reshape(self.lay.T, self.lay.nv)
        return self._lin(kind, (self.ep @ xt.T).T, (self.eq @ xt.T).T)

    def reachable(self, kind: str) -> np.ndarray:
        """(T, n) rows whose limit the DER box can reach (linear model)."""
        lo, hi = self._range["i" if kind == "i_max" else "v"]
        b = self.rhs(kind)
        ok = self._ok(kind)
        return ok & ((lo <= b + 1e-9) if kind == "v_min" else (hi >= b - 1e-9))

    def _ok(self, kind: str) -> np.ndarray:
        if kind == "i_max":
            return np.isfinite(self.lim.i_max)
        return np.broadcast_to(self.lim.node_ok, self.row[kind].shape)

    def _slack_at_ref(self, kind: str) -> np.ndarray:
        """Distance to the limit at the reference, in row units (u [pu] or A), >= 0 inside."""
        d = self.limit_term(kind)
        return -d if kind == "v_min" else d

    def _initial(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(mask, score) (T, n) of the reachable rows of ``kind`` near their limit at the
        reference (with ``near_pu`` < 0: only those beyond it); score = -slack."""
        return self._near(kind, self.near_pu, self.near_frac)

    def _near(self, kind: str, near_pu: float, near_frac: float
              ) -> tuple[np.ndarray, np.ndarray]:
        """(mask, score) (T, n): reachable rows of ``kind`` within ``near_pu`` [pu] (voltage)
        or ``near_frac`` of the limit (current) of it at the reference (a negative value:
        only those beyond it by more than that); score = -slack."""
        slack = self._slack_at_ref(kind)
        if kind == "i_max":
            lim = np.where(np.isfinite(self.lim.i_max), self.lim.i_max, 0.0)
            near = slack <= near_frac * lim if near_frac >= 0 else slack < near_frac * lim
        else:
            near = slack <= near_pu if near_pu >= 0 else slack < near_pu
        return self.reachable(kind) & near, -slack

    def count_initial(self) -> int:
        """How many rows :meth:`initial_rows` would add at most (before thinning)."""
        return int(sum((self._initial(kind)[0] & (self.row[kind] < 0)).sum()
                       for kind in self.row))

    def initial_rows(self) -> int:
        """Add the reachable rows that are near their limit at the reference (with
        ``near_pu < 0``: only those beyond it)."""
        n = 0
        for kind in self.row:
            mask, score = self._initial(kind)
            n += self.add(kind, mask, score=score)
        return n

    def add(self, kind: str, mask: np.ndarray, score: np.ndarray | None = None) -> int:
        """Add rows for the (t, element) pairs in ``mask`` that are not in the LP yet;
        with clusters (``thin``) only the highest ``score`` (T, n) (how far beyond the
        limit, row units) of each (interval, cluster)."""
        mask = mask & (self.row[kind] < 0) & self._ok(kind)
        if self.cluster is not None:  # rows no DER setting can satisfy (linear model): a
            # control action (a regulator tap) moved them; left to the AC check
            lo, hi = self._range["i" if kind == "i_max" else "v"]
            b = self.rhs(kind)
            fix = (hi >= b - 1e-9) if kind == "v_min" else (lo <= b + 1e-9)
            self.n_unfixable += int((mask & ~fix).sum())
            mask &= fix
        if self.cluster is not None and score is not None and (THIN_THERMAL
                                                                or kind != "i_max"):
            keep = np.zeros_like(mask)  # regulator band rows: all of them, never thinned
            if kind != "i_max" and self.lim.band_node.size:
                keep[:, self.lim.band_node] = mask[:, self.lim.band_node]
            mask = thin_mask(mask & ~keep, score, self.cluster[kind]) | keep
        t, e = np.nonzero(mask)
        if t.size == 0:
            return 0
        part = self.sset.of_t[t]
        if np.all(part == part[0]):
            ue, inv = np.unique(e, return_inverse=True)
            G = self.g_rows(kind, ue, int(part[0]))[inv].tocsr()
        else:  # rows of each part from its own sensitivities, back in (t, e) order
            blocks, order = [], []
            for c in np.unique(part):
                k = np.flatnonzero(part == c)
                ue, inv = np.unique(e[k], return_inverse=True)
                blocks.append(self.g_rows(kind, ue, int(c))[inv])
                order.append(k)
            G = sp.vstack(blocks).tocsr()[np.argsort(np.concatenate(order))]
        G.indices = (G.indices + np.repeat(t * self.lay.nv, np.diff(G.indptr))).astype(np.int32)
        G = sp.csr_matrix((G.data, G.indices, G.indptr), shape=(t.size, self.lay.n_cols))
        if self.elastic is not None:  # slack column per row (added before the rows: the
            # order the warm-started simplex has always seen)
            pen, sign = self._slack(kind)
            cols = self.lp.add_cols(np.full(t.size, pen), np.zeros(t.size),
                                    np.full(t.size, INF))
            n = int(cols[-1]) + 1
            G = sp.csr_matrix((G.data, G.indices, G.indptr), shape=(t.size, n)) + sp.csr_matrix(
                (np.full(t.size, sign), (np.arange(t.size), cols)), shape=(t.size, n))
        b = self.rhs(kind)[t, e]
        lo, hi = (b, np.full(b.size, INF)) if kind == "v_min" else (np.full(b.size, -INF), b)
        idx = self.lp.add_rows(RowBlock(G, lo, hi, np.full(t.size, kind, dtype=object),
                                        self.names[kind][e].astype(object), t))
        self.row[kind][t, e] = idx
        return int(t.size)

    def _slack(self, kind: str) -> tuple[float, float]:
        """(price, coefficient) of a row's slack column: per pu of u or per A beyond the
        limit, entering so that it relaxes the row (+1 on ``v_min`` rows, -1 else)."""
        pen = self.elastic[1] if kind == "i_max" else self.elastic[0]
        return pen, (1.0 if kind == "v_min" else -1.0)

    def make_elastic(self) -> int:
        """Give every network row in the LP a priced slack column (and every later row
        one too, as on large feeders); returns the rows made elastic. For an LP whose
        hard rows the linear model cannot meet at once, not even with every DER idle
        (which is the base case, within its limits by definition): its error from a
        reference with the DERs active can put idle a little beyond a limit."""
        self.elastic = self.elastic or (1e6, 1e3)
        rows, signs, costs = [], [], []
        for kind, idx in self.row.items():
            r = idx[idx >= 0]
            pen, sign = self._slack(kind)
            rows.append(r)
            signs.append(np.full(r.size, sign))
            costs.append(np.full(r.size, pen))
        r = np.concatenate(rows)
        if r.size:
            n = r.size
            A = sp.csc_matrix((np.concatenate(signs), (r, np.arange(n))),
                              shape=(self.lp.n_rows, n))
            self.lp.add_cols(np.concatenate(costs), np.zeros(n), np.full(n, INF), A)
        return int(r.size)

    def add_violated(self, x: np.ndarray, tol: float = 1e-6) -> int:
        """Lazy rows: add every (t, element) the linear model says ``x`` violates."""
        n = 0
        for kind in self.row:
            val, b = self.lhs(kind, x), self.rhs(kind)
            over = (b - val) if kind == "v_min" else (val - b)
            n += self.add_lazy(kind, over > tol, score=over)
        return n

    def add_lazy(self, kind: str, mask: np.ndarray, score: np.ndarray | None = None) -> int:
        """:meth:`add` for rows found violated (by the linear model or the AC check); under
        the large-feeder rules each branch among them also brings its thermal rows of the
        other intervals where it is near its rating at the reference (``lazy_near``, the
        small-feeder rules' screen, so never more rows than those would have had). Voltage
        rows do not: on IEEE 8500 (groups of 4, seed 1) they took the LP to 25,313 rows and
        8.3 M nonzeros against 11,511 and 1.3 M with thermal rows only, and plan + verify
        to 131 s against 103 s on the same loaded machine.

        One interval at a time let the LP move what broke the limit to the next interval
        without a row: EPRI ckt7 seed 3, a battery behind a 299 A service line charged
        in the intervals that had no row yet (4 new ones per linear round), the rounds
        ran out with the line at 379 A in the linear model itself, and the AC round that
        found it became the best one, the later re-plans held near it."""
        n = self.add(kind, mask, score=score)
        if self.lazy_near is None or kind != "i_max" or not mask.any():
            return n
        near, near_score = self._near(kind, *self.lazy_near)
        more = near & mask.any(axis=0)[None, :] & (self.row[kind] < 0)
        k = self.add(kind, more, score=near_score)
        self.n_lazy_near += k
        return n + k


def direction_clusters(m: Sens, n_proj: int = 8, width: float = 0.05, seed: int = 0
                       ) -> np.ndarray:
    """Cluster id (n,) of the rows of ``m`` (n, n_der) by direction: rows projected on
    ``n_proj`` random directions, normalised, and binned at ``width``; rows that share
    every bin (near-parallel sensitivities) share an id, all-zero rows get their own."""
    r = np.random.default_rng(seed).standard_normal((m.shape[1], n_proj))
    proj = np.asarray(m @ r)
    norm = np.linalg.norm(proj, axis=1, keepdims=True)
    key = np.floor(proj / np.maximum(norm, 1e-300) / width).astype(np.int64)
    _u, cid = np.unique(key, axis=0, return_inverse=True)
    return cid.ravel()


def coarse_clusters(m: Sens, k: int = 24, seed: int = 0) -> np.ndarray:
    """Cluster id (n,) of the rows of ``m`` (n, n_der): k-means (``k`` clusters) of the
    unit row directions; all-zero rows share the extra id ``k``.

    Used instead of :func:`direction_clusters` on large feeders: binned directions gave
    1,264-1,560 clusters on IEEE 8500 (one row per interval and cluster: 2,216 dense rows
    from the uncontrolled violations alone, a 21 s first solve; 12,204 more after the
    first lazy round, a 163 s warm re-solve); with 24 clusters the lazy rounds add a few
    hundred rows at a time, the next row of a cluster only if the first did not already
    pull it inside its limit."""
    from scipy.cluster.vq import kmeans2

    a = m.toarray() if sp.issparse(m) else np.asarray(m)
    norm = np.linalg.norm(a, axis=1)
    live = norm > 0
    out = np.full(a.shape[0], k, dtype=np.int64)
    if live.sum() > k:
        _c, lab = kmeans2(a[live] / norm[live, None], k, seed=seed, minit="++")
        out[live] = lab
    else:
        out[live] = np.arange(int(live.sum()))
    return out


def thin_mask(mask: np.ndarray, score: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Keep, of the True entries of ``mask`` (T, n), only the highest ``score`` per
    (interval, ``cluster`` of the column)."""
    t, e = np.nonzero(mask)
    if t.size == 0:
        return mask
    key = t * (int(cluster.max()) + 1) + cluster[e]
    o = np.lexsort((-score[t, e], key))
    first = np.r_[True, key[o][1:] != key[o][:-1]]
    out = np.zeros_like(mask)
    out[t[o][first], e[o][first]] = True
    return out
