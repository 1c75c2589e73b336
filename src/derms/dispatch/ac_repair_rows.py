"""Rows and DER ranges of one interval's AC repair (:mod:`derms.dispatch.ac_repair`).

At an interval's AC state (controls as they acted), :class:`RepairRows` builds the
corrective LP's input: the violated node-phases and branch conductors and, as guards, those
near a limit; the regulators' monitored nodes inside their bands (their taps stay put); a
hazard regulator that stepped up there held where the step would not have come; every
kvar-type capacitor control on its side of its setting; the head import under the plan's
peak. Sensitivities by adjoint solves at that state
(:class:`~derms.powerflow.linear_rows.RowSensitivities`), the capacitor controls' from the
plan's linear model. Net import, consumption positive (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from derms.der.models import fleet_arrays
from derms.dispatch.control_rows import (
    HOLD_MIN_PU,
    cap_sensitivity,
    cap_states,
    monitored_kvar,
)
from derms.dispatch.corrective import CurrentRows, DerState, VoltageRows
from derms.powerflow.collect import StepCollector
from derms.powerflow.linear_rows import RowSensitivities
from derms.powerflow.qsts import QSTSResult

CAP_GUARD_MARGIN = 0.1  # share of a capacitor control's ON-OFF width its guard keeps inside
CAP_BACK_MARGIN = 0.3  # ... and the guard of one put back (the linear kvar error: 20-40 %)
EV_WEIGHT = 2.0  # cost of 1 kW of EV charging moved later, against 1 kW of PV curtailed


class RepairRows:
    """One fleet on one :class:`~derms.dispatch.verify.ACNetwork`: the corrective LP's rows
    and DER ranges at any interval. ``guard_pu`` / ``guard_frac``: voltages and currents
    that near a limit are guards (at most ``max_guards`` each, nearest first);
    ``reg_move_pu``: how far a regulator's monitored voltage may move inside its band;
    ``step_margin_pu``: above the band's lower edge a stepped hazard regulator's pre-step
    voltage is held; ``peak_kw``: the plan's head import peak (a guard); ``pv_up``: PV
    output may rise back toward its available power (not under an export limit)."""

    def __init__(self, ac, *, guard_pu: float, guard_frac: float, max_guards: int,
                 reg_move_pu: float, step_margin_pu: float, peak_kw: float,
                 pv_up: bool = True) -> None:
        self.ac, self.fleet = ac, ac.fleet
        self.guard_pu, self.guard_frac, self.max_guards = guard_pu, guard_frac, max_guards
        self.reg_move_pu, self.step_margin_pu, self.peak_kw = reg_move_pu, step_margin_pu, \
            peak_kw
        self.pv_up = pv_up
        points, self.point_of = _points(ac)
        self.first_der = np.unique(self.point_of, return_index=True)[1]  # one per point
        self.sens = RowSensitivities(ac.engine, [[t for t, _w in p] for p in points],
                                     ac.index, [[w for _t, w in p] for p in points])
        a = fleet_arrays(self.fleet)
        self.avail_kw = a.pv_avail_kw
        self.ev_window, self.ev_p_max_kw = a.ev_window.astype(bool), a.ev_p_max_kw
        self.q_cap_kvar = np.broadcast_to(a.pv_q_max_kvar, a.pv_avail_kw.shape)
        self.band = ac.regulator_bands(1.0)  # (node, lo, hi, step): taps act outside it
        self.hz = _hazards(ac, self.band)
        parts = ac.cap_parts
        if ac.capctl.n and not parts:  # no plan built them: the base-case linear model
            parts = (cap_sensitivity(ac.lin, ac.der_map(), ac.capctl),)
        self.cap_part = parts[0] if parts else None

    def taps(self, engine) -> np.ndarray:
        """Present taps of the hazard regulators."""
        return _taps(engine, self.hz[0])

    def cap_states(self, engine) -> np.ndarray:
        """Present states of the kvar-controlled capacitors (share of steps on)."""
        ctl = self.ac.capctl
        return cap_states(engine, ctl) if ctl.n else np.zeros(0)

    def at(self, engine, t: int, res: QSTSResult, over: dict[str, np.ndarray],
           now: np.ndarray, prev: np.ndarray | None, back: np.ndarray | None = None
           ) -> tuple[VoltageRows, CurrentRows] | None:
        """Rows of interval ``t`` at the engine's present solution (``res`` its values,
        ``over`` the rows beyond their limits, ``now``/``prev`` the hazard regulators'
        taps here and an interval before); None when there is nothing to correct.
        ``back`` (n_ctl,) bool: capacitors to put back in the base case's state here
        (:func:`cap_holds`): the rows are then at that state and each one's guard keeps
        it there; where ``t`` has violations only if that leaves less of them."""
        v, i_a = res.v_pu[t], res.i_a[t].astype(float)
        head_kw = float(res.head_p_kw[t].sum())
        plan = None
        if back is not None and back.any():
            plan = self._raw_states(engine)
            self._set_caps(engine, np.where(back, self.ac.base.cap_on[t],
                                            self.cap_states(engine)))
            col = StepCollector(engine, self.ac.index, 1)
            col.collect(0)
            v2, i2 = col.v_pu[0], col.i_a[0].astype(float)
            bad = any(m[t].any() for m in over.values())
            if not bad or (excess(self.ac.net_limits, t, v2, i2)
                           < excess(self.ac.net_limits, t, v, i_a)):
                v, i_a, head_kw = v2, i2, float(col.head_p_kw[0].sum())
            else:
                self._put_raw(engine, plan)
                plan = None
        if plan is None:
            return self._at(engine, t, v, i_a, head_kw, over, now, prev)
        try:
            return self._at(engine, t, v, i_a, head_kw, over, now, prev, back=back)
        finally:
            self._put_raw(engine, plan)  # the plan's own state, as found

    def _raw_states(self, engine) -> list[list[int]]:
        """Each controlled capacitor's step states, as OpenDSS holds them."""
        cp = engine.circuit.Capacitors
        out = []
        for cap in self.ac.capctl.cap:
            cp.Name = cap
            out.append([int(x) for x in cp.States])
        return out

    def _put_raw(self, engine, raw: list[list[int]]) -> None:
        """Step states back as :meth:`_raw_states` read them, then one solve without
        control actions at the present time."""
        cp = engine.circuit.Capacitors
        for cap, st in zip(self.ac.capctl.cap, raw, strict=True):
            cp.Name = cap
            cp.States = st
        engine.circuit.Solution.SolveNoControl()

    def _set_caps(self, engine, states: np.ndarray) -> None:
        """Capacitors to ``states`` (share of steps on, the first steps on), then one solve
        without control actions at the present time."""
        raw = []
        for s, r in zip(states, self._raw_states(engine), strict=True):
            on = round(float(s) * len(r))
            raw.append([1] * on + [0] * (len(r) - on))
        self._put_raw(engine, raw)

    def _at(self, engine, t: int, v: np.ndarray, i_a: np.ndarray, head_kw: float,
            over: dict[str, np.ndarray], now: np.ndarray, prev: np.ndarray | None, *,
            back: np.ndarray | None = None) -> tuple[VoltageRows, CurrentRows] | None:
        """:meth:`at` at node voltages ``v`` [pu], branch currents ``i_a`` [A] and head
        import ``head_kw``; ``back``: capacitors put back (their guards are rows to act
        on, and there are rows even with nothing beyond a limit)."""
        ac, lim, band, hz = self.ac, self.ac.net_limits, self.band, self.hz
        vn, bi = self._near(v, i_a, t, over)
        # a hazard regulator that stepped up here (above the base case's tap): its node
        # is held where the step would not have come (pre-step voltage above the band's
        # lower edge); where it stepped earlier its overvoltage is left alone
        up = now > ac.base.taps[t] if now.size else np.zeros(0, bool)
        stepped = up & (now > prev) if prev is not None else np.zeros_like(up)
        vn = vn[~np.isin(vn, hz[1][up])]
        force = back is not None and back.any()
        if vn.size + bi.size == 0 and not stepped.any() and not force:
            return None
        held = hz[1][stepped]
        keep = ~np.isin(band[0], np.r_[vn, held])  # regulators' nodes inside their bands
        reg = band[0][keep].astype(np.int64)
        v_lo = np.r_[lim.v_min[t, vn],
                     np.minimum(np.maximum(band[1][keep], v[reg] - self.reg_move_pu), v[reg]),
                     hz[2][stepped] + hz[3][stepped] + self.step_margin_pu]
        v_hi = np.r_[lim.v_max[t, vn],
                     np.maximum(np.minimum(band[2][keep], v[reg] + self.reg_move_pu), v[reg]),
                     np.full(held.size, 2.0)]
        rows_v = np.r_[vn, reg, held].astype(np.int64)
        self.sens.linearise(engine)
        _, dvp, dvq, _, dip, diq = self.sens.rows(rows_v, bi)
        base_v, base_i = ac.base.v_pu[t], ac.base.i_a[t]
        guards = np.ones(reg.size + held.size, bool)
        vr = VoltageRows(np.asarray(ac.index.node_bus)[rows_v], v[rows_v], v_lo, v_hi, dvp, dvq,
                         np.r_[(base_v[vn] > lim.v_max[t, vn] - 1e-9)
                               | (base_v[vn] < lim.v_min[t, vn] + 1e-9), guards],
                         np.r_[over["v_max"][t, vn] | over["v_min"][t, vn],
                               np.zeros(reg.size, bool), np.ones(held.size, bool)])
        extra = self._extra(engine, head_kw, back)
        n_x = extra[0].size
        ir = CurrentRows(np.r_[np.asarray(ac.index.branch_element)[bi], extra[0]],
                         np.r_[i_a[bi], extra[1]], np.r_[lim.i_max[t, bi], extra[2]],
                         np.vstack([dip, extra[3]]), np.vstack([diq, extra[4]]),
                         np.r_[base_i[bi] >= lim.i_max[t, bi] - 1e-9, np.zeros(n_x, bool)],
                         np.r_[over["i_max"][t, bi], extra[5]])
        return vr, ir

    def ders(self, t: int, p_kw: np.ndarray, q_kvar: np.ndarray,
             ev_room_kw: np.ndarray | None = None) -> DerState:
        """The fleet at interval ``t``: PV inverters free within their output and reactive
        capability; EVs may charge less, by at most ``ev_room_kw`` (n_ev,) [kW] (what
        later intervals of their session can take back), at ``EV_WEIGHT`` per kW; every
        other DER fixed at the plan."""
        st = _der_state(self.fleet, self.point_of, p_kw, q_kvar, self.avail_kw[t],
                        self.q_cap_kvar[t])
        if not self.pv_up:  # curtail only: PV net import may not fall below the plan's
            n_pv = len(self.fleet.pv)
            p_min = st.p_min_kw.copy()
            p_min[:n_pv] = st.p_kw[:n_pv]
            st = replace(st, p_min_kw=p_min)
        if ev_room_kw is None or not ev_room_kw.size:
            return st
        n_pv, n_bat = len(self.fleet.pv), len(self.fleet.batteries)
        ev = slice(n_pv + n_bat, n_pv + n_bat + ev_room_kw.size)
        down = np.minimum(np.maximum(st.p_kw[ev], 0.0), ev_room_kw)
        p_min = st.p_min_kw.copy()
        p_min[ev] = st.p_kw[ev] - down
        fixed, weight = st.fixed.copy(), st.weight.copy()
        fixed[ev] = down <= 1e-9
        weight[ev] = EV_WEIGHT
        return replace(st, p_min_kw=p_min, fixed=fixed, weight=weight)

    def ev_room(self, t: int, ev_kw: np.ndarray) -> np.ndarray:
        """(n_ev,) kW each EV's charging at ``t`` could drop by (:func:`ev_room_kw`, later
        and earlier in its session: the repair works on the whole plan)."""
        return ev_room_kw(ev_kw, self.ev_window, self.ev_p_max_kw, t, earlier=True)

    def _near(self, v: np.ndarray, i_a: np.ndarray, t: int, over: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray]:
        """Voltage and current rows of interval ``t``: the violated ones and the nearest
        guards (within the guard band of a limit), at most ``max_guards`` of each."""
        lim = self.ac.net_limits
        dist_v = np.minimum(lim.v_max[t] - v, v - lim.v_min[t])  # pu inside (< 0: beyond)
        bad_v = over["v_max"][t] | over["v_min"][t]
        near_v = np.flatnonzero(lim.node_ok & ~bad_v & (dist_v < self.guard_pu))
        near_v = near_v[np.argsort(dist_v[near_v])[:self.max_guards]]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(np.isfinite(lim.i_max[t]), 1 - i_a / lim.i_max[t], np.inf)
        bad_i = over["i_max"][t]
        near_i = np.flatnonzero(~bad_i & (frac < self.guard_frac))
        near_i = near_i[np.argsort(frac[near_i])[:self.max_guards]]
        return (np.union1d(np.flatnonzero(bad_v), near_v).astype(np.int64),
                np.union1d(np.flatnonzero(bad_i), near_i).astype(np.int64))

    def _extra(self, engine, head_kw: float, act: np.ndarray | None = None
               ) -> tuple[np.ndarray, ...]:
        """Guard rows in the current-row form (labels, values, limits, sensitivities per
        injection point): every kvar-type capacitor control on its side of its setting
        (off: monitored kvar below ONsetting; on: above OFFsetting, as ``-kvar <= -OFF``),
        ``CAP_GUARD_MARGIN`` of its width inside, and the head import [kW] under the plan's
        peak (limits come first, as in the plan's LP: the row is elastic). Rows whose limit
        is not positive are left out (the LP scales rows by it). The last array: rows to
        act on (the guards of the controls in ``act``, capacitors put back), not only to
        hold."""
        n_pt = self.first_der.size
        lab, val, lim, sp, sq, acted = [], [], [], [], [], []
        ctl = self.ac.capctl
        if ctl.n and self.cap_part is not None:
            q = monitored_kvar(engine, ctl, self.ac.index)
            on = cap_states(engine, ctl) >= 0.5
            sign = np.where(on, -1.0, 1.0)
            act = act if act is not None else np.zeros(ctl.n, bool)
            inside = np.where(act, CAP_BACK_MARGIN, CAP_GUARD_MARGIN) * np.abs(
                ctl.on_kvar - ctl.off_kvar)
            limit = np.where(on, -ctl.off_kvar - inside, ctl.on_kvar - inside)
            ok = limit > 0
            lab.append(np.array([f"capcontrol.{n}" for n in ctl.name[ok]], dtype=object))
            val.append((sign * q)[ok])
            lim.append(limit[ok])
            sp.append((sign[:, None] * self.cap_part.dq_p[:, self.first_der])[ok])
            sq.append((sign[:, None] * self.cap_part.dq_q[:, self.first_der])[ok])
            acted.append(act[ok])
        if self.peak_kw > 0:
            lab.append(np.array(["feeder_head"], dtype=object))
            val.append(np.array([head_kw]))
            lim.append(np.array([self.peak_kw]))
            sp.append(np.ones((1, n_pt)))
            sq.append(np.zeros((1, n_pt)))
            acted.append(np.zeros(1, bool))
        if not lab:
            return (np.zeros(0, object), np.zeros(0), np.zeros(0), np.zeros((0, n_pt)),
                    np.zeros((0, n_pt)), np.zeros(0, bool))
        return (np.concatenate(lab), np.concatenate(val), np.concatenate(lim),
                np.vstack(sp), np.vstack(sq), np.concatenate(acted))


def _hazards(ac, band: tuple[np.ndarray, ...]) -> tuple[list[str], np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """Hazard regulators (one step up from their band's lower edge breaks the voltage
    limit): names, monitored nodes, band lower edges and tap steps [pu]."""
    names, node = list(ac.hazard_regs), np.asarray(ac.hazard_node, dtype=np.int64)
    if not names or ac.base.taps is None:
        z = np.zeros(0)
        return [], np.zeros(0, np.int64), z, z
    k = np.array([int(np.flatnonzero(band[0] == n)[0]) for n in node])
    return names, node, band[1][k], band[3][k]



def step_intervals(ac, res: QSTSResult, bad_t: np.ndarray) -> set[int]:
    """Intervals where a hazard regulator steps up above the base case's tap in ``res``
    (its taps as recorded in that simulation) and stays up into a violated interval:
    the step is where the overvoltage starts, even when that interval itself is clean."""
    tp = ac.taps_of(res)
    if tp is None or tp.shape[1] == 0 or ac.base.taps is None:
        return set()
    up = tp > ac.base.taps                                     # (T, n_reg)
    step = up & np.r_[np.zeros((1, tp.shape[1]), bool), tp[1:] > tp[:-1]]
    bad = np.zeros(tp.shape[0], bool)
    bad[bad_t] = True
    out = set()
    for t, j in zip(*np.nonzero(step)):
        end = t + 1
        while end < tp.shape[0] and up[end, j] and not step[end, j]:
            end += 1
        if bad[t:end].any():
            out.add(int(t))
    return out



def cap_holds(ac, res: QSTSResult, over: dict[str, np.ndarray], part) -> np.ndarray:
    """(T, n_ctl) bool: where the repair puts a kvar-controlled capacitor back in the base
    case's state. A capacitor the plan's run (``res``, states as recorded in that
    simulation) has in another state than the base case at an interval with violations
    (``over``), where its linear effect (``part``: :class:`CapSensitivity`, switching it
    fully on) says the base case's state relieves a violated row there by at least
    ``HOLD_MIN_PU`` (1 % of a rating counts as 0.001 pu), is held from the interval the
    plan switched it, when the base case stays as it was there: a capacitor step (IEEE
    8500: 300 kvar on one phase, +0.0056 pu at the substation bus) is beyond what DER
    moves at the switched state take back, while keeping its monitored kvar on the other
    side of the setting is a small move. (Also putting back, into the state the base case
    switched it to, a capacitor the plan kept as it was, its row then on the kvar the
    control samples beyond the other setting, was measured on four IEEE 8500 plans: 173
    violations left against 169; not kept.)"""
    caps, base = ac.caps_of(res), ac.base.cap_on
    if caps is None or base is None or part is None or caps.shape[1] == 0:
        return np.zeros((res.v_pu.shape[0], 0 if caps is None else caps.shape[1]), bool)
    diff = np.abs(caps - base) > 1e-9                               # (T, n_ctl)
    out = np.zeros_like(diff)
    lim = ac.net_limits
    for t, c in zip(*np.nonzero(diff), strict=True):
        vh, vl, ih = over["v_max"][t], over["v_min"][t], over["i_max"][t]
        if not (vh.any() or vl.any() or ih.any()):
            continue
        to_base = base[t, c] - caps[t, c]
        dv, di = to_base * part.dv[:, c], to_base * part.di[:, c]
        # the largest relief of a violated row [pu; 1 % of a rating counts as 0.001 pu]
        relief = np.r_[-dv[vh], dv[vl], -0.1 * di[ih] / lim.i_max[t, ih]].max()
        if relief < HOLD_MIN_PU:
            continue
        t0 = t
        while t0 > 0 and diff[t0 - 1, c] and caps[t0 - 1, c] == caps[t, c]:
            t0 -= 1
        # only where the plan switched it and the base case stays as it was (keeping a
        # capacitor as it was is a small move; making it switch is not)
        if t0 > 0 and caps[t0 - 1, c] != caps[t0, c] and base[t0, c] == caps[t0 - 1, c]:
            out[t0:t + 1, c] = True
    return out


def excess(lim, t: int, v: np.ndarray, i_a: np.ndarray) -> float:
    """Violation beyond the LP's limits at interval ``t``: node-phase pu over and under
    plus branch excess as a share of its rating (one 0.001 pu counts as 1 % of a
    rating)."""
    ok = lim.node_ok
    dv = np.maximum(v - lim.v_max[t], 0.0) + np.maximum(lim.v_min[t] - v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        di = np.where(np.isfinite(lim.i_max[t]),
                      np.maximum(i_a / lim.i_max[t] - 1.0, 0.0), 0.0)
    return float(dv[ok].sum() + 0.1 * di.sum())


def _taps(engine, names: list[str]) -> np.ndarray:
    """Present tap numbers of the named RegControls."""
    rc = engine.circuit.RegControls
    out = np.zeros(len(names), dtype=np.int64)
    for j, n in enumerate(names):
        rc.Name = n
        out[j] = rc.TapNumber
    return out



def per_interval(ac, res: QSTSResult) -> np.ndarray:
    """(T,) rows beyond their limits per interval (:func:`beyond`)."""
    return np.sum([m.sum(axis=1) for m in beyond(ac, res).values()], axis=0)



def beyond(ac, res: QSTSResult) -> dict[str, np.ndarray]:
    """(T, n) masks of the rows that count as violations (DESIGN.md tolerances) against
    the LP's limits (pre-existing ones held at their base-case values)."""
    lim = ac.net_limits
    return _beyond(ac, res.v_pu, res.i_a, lim.v_max, lim.v_min, lim.i_max)


def beyond_at(ac, t: int, v: np.ndarray, i_a: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`beyond` of one interval ``t``: node voltages ``v`` [pu], branch currents
    ``i_a`` [A] -> (n,) masks."""
    lim = ac.net_limits
    return _beyond(ac, v, i_a, lim.v_max[t], lim.v_min[t], lim.i_max[t])


def _beyond(ac, v, i_a, v_max, v_min, i_max) -> dict[str, np.ndarray]:
    """Rows beyond limits by half the counting tolerance (a count's rule, kept clear of
    the solver's rounding); arrays broadcast, (T, n) or (n,).

    A voltage limit held at a base value inside the tolerance (:func:`network_limits`:
    a base case of 0.949-0.95 pu is held at its value, between the count's threshold
    0.949 and 0.9495; the same above 1.05) is never taken past the count's own threshold
    (limit -/+ the tolerance): with half the tolerance taken off it, a node counted as a violation was
    not beyond (EPRI ckt7 seed 2, rolling with the model forecast: base case 0.94938 pu,
    limit held there, rows beyond only under 0.94888 pu; 0.94897 pu was counted, the
    real-time correction never saw it and the executed schedule kept 1 violation)."""
    tol, live = ac.limits, ac.net_limits.node_ok
    half = 0.5 * tol.v_tol_pu
    lo, hi = tol.v_lo_count_pu, tol.v_hi_count_pu
    lo_at = np.where(v_min >= lo, np.maximum(v_min - half, lo), v_min - half)
    hi_at = np.where(v_max <= hi, np.minimum(v_max + half, hi), v_max + half)
    return {"v_max": live & (v > hi_at),
            "v_min": live & (v < lo_at),
            "i_max": i_a > _i_beyond(ac.net_limits.rating_a, i_max, tol)}


def _i_beyond(rating_a: np.ndarray, i_max, tol) -> np.ndarray:
    """Current [A] above which a branch is beyond its limit: half the thermal tolerance
    past ``i_max``, never past the count's own threshold (DESIGN.md: the rating x
    (thermal_pct + tol) %, or a pre-existing one's base current + tol % of the rating), so
    a limit held at a base current inside the tolerance, or a base loading above twice
    the rating, does not let a counted overload go unseen. Without ratings (``rating_a``
    empty): the half tolerance alone."""
    i_half = i_max * (1 + 0.5 * tol.thermal_tol_pct / 100)
    if rating_a.size == 0 or rating_a.size != np.shape(i_max)[-1]:
        return i_half
    rated = np.where(rating_a > 0, rating_a, np.inf)
    th = rated * tol.thermal_count_pct / 100
    count = np.where(i_max <= th, th, i_max + rated * tol.thermal_tol_pct / 100)
    return np.minimum(i_half, count)



def _points(ac) -> tuple[list[tuple[tuple[str, float], ...]], np.ndarray]:
    """Unique injection points of the planned DERs, as (terminal, share) pairs (a group of
    DERs spreads over its members' terminals), and each DER's point (fleet order)."""
    pos: dict[tuple[tuple[str, float], ...], int] = {}
    of = np.empty(len(ac.fleet.ders), dtype=np.int64)
    for j, parts in enumerate(ac.agg.parts):
        key = tuple((t, w / len(c.injection_terminals)) for c, w in parts
                    for t in c.injection_terminals)
        of[j] = pos.setdefault(key, len(pos))
    return list(pos), of


def _der_state(fleet, point_of: np.ndarray, p_kw: np.ndarray, q_kvar: np.ndarray,
               avail_kw: np.ndarray, q_cap_kvar: np.ndarray) -> DerState:
    """The fleet at one interval: PV inverters free within their output and reactive
    capability, every other DER fixed at the plan."""
    n, n_pv = len(fleet.ders), len(fleet.pv)
    p_min, p_max = p_kw.copy(), p_kw.copy()
    q_min, q_max = q_kvar.copy(), q_kvar.copy()
    p_min[:n_pv], p_max[:n_pv] = -avail_kw, 0.0
    q_min[:n_pv], q_max[:n_pv] = -q_cap_kvar, q_cap_kvar
    # a plan value a hair outside the range (LP tolerance) would make the state invalid
    p = np.clip(p_kw, p_min, p_max)
    q = np.clip(q_kvar, q_min, q_max)
    fixed = np.ones(n, dtype=bool)
    fixed[:n_pv] = False
    return DerState(np.array(fleet.der_ids, dtype=object), point_of, p, p_min, p_max, q, q_min,
                    q_max, np.ones(n), fixed)


def _plan_max_kw(ev_kw: np.ndarray, window: np.ndarray, p_max_kw: np.ndarray) -> np.ndarray:
    """(n_ev,) the highest rate ``ev_kw`` gives each EV in its session (at most its
    charger's): what its service transformer and drop are taken to carry."""
    return np.minimum(np.where(window, ev_kw, 0.0).max(axis=0, initial=0.0), p_max_kw)


def ev_room_kw(ev_kw: np.ndarray, window: np.ndarray, p_max_kw: np.ndarray, t: int,
               earlier: bool = False) -> np.ndarray:
    """(n_ev,) kW each EV's charging at ``t`` could drop by and be made up elsewhere in
    its session (equal steps, so kW sums stand for energy): the rate headroom of its
    window's intervals after ``t``; with ``earlier`` (a whole plan being repaired, not
    one executed in sequence) also that of the intervals before ``t`` up to the plan's
    own highest rate (:func:`shift_ev_energy`)."""
    if not ev_kw.shape[1]:
        return np.zeros(0)
    later = window[t + 1:]
    room = (np.maximum(p_max_kw[None, :] - ev_kw[t + 1:], 0.0) * later).sum(axis=0)
    if earlier:
        cap = _plan_max_kw(ev_kw, window, p_max_kw)
        room += (np.maximum(cap[None, :] - ev_kw[:t], 0.0) * window[:t]).sum(axis=0)
    return room


def shift_ev_energy(ev_kw: np.ndarray, cut_kw: np.ndarray, window: np.ndarray,
                    p_max_kw: np.ndarray, t: int, earlier: bool = False) -> np.ndarray:
    """``ev_kw`` (T, n_ev) with each EV's charging at ``t`` lowered by ``cut_kw`` (n_ev,)
    and the same energy added back elsewhere in its session, in this order:

    1. its latest intervals after ``t`` (the night's end carries the least load) up to
       the rate left at ``t`` after the cut (what the interval's correction found the
       EV's own service transformer and drop may carry), or, where the cut leaves
       nothing, the highest rate ``ev_kw`` gives the EV in its session;
    2. with ``earlier``, its intervals before ``t``, nearest first, up to that rate;
    3. its latest intervals after ``t`` up to ``p_max_kw``;
    4. with ``earlier``, its intervals before ``t`` up to its highest planned rate (what
       :func:`ev_room_kw` counts there: no cut it allows is left unplaced).

    Filling to the charger's rate at once put one IEEE 8500 EV's 9.7 kW into its
    session's last interval, 203 % of its 5 kVA transformer, where the plan held it to
    about 4.4 kW; filling to the plan's highest rate (5.2 kW, itself over the transformer's
    limit where the repair cut it) left 118 %. The efficiency is the same in every
    interval, so equal kW x dt is equal energy stored."""
    out = ev_kw.copy()
    out[t] -= cut_kw
    left = cut_kw.copy()
    plan_max = _plan_max_kw(ev_kw, window, p_max_kw)
    cap = np.where(out[t] > 1e-9, np.minimum(plan_max, out[t]), plan_max)
    later, before = range(ev_kw.shape[0] - 1, t, -1), range(t - 1, -1, -1)
    tiers = ([(later, cap), (before, cap), (later, p_max_kw), (before, plan_max)] if earlier
             else [(later, cap), (later, p_max_kw)])
    for steps, cap_kw in tiers:
        for k in steps:
            if not (left > 1e-12).any():
                break
            room = np.where(window[k], np.maximum(cap_kw - out[k], 0.0), 0.0)
            add = np.minimum(room, left)
            out[k] += add
            left -= add
    return out


__all__ = ["RepairRows", "beyond", "cap_holds", "ev_room_kw", "per_interval", "shift_ev_energy",
           "step_intervals"]
