"""Execution of a schedule interval by interval on the AC model, with a real-time
correction where the interval breaks a limit (the rolling loop's closed loop).

A plan made on the linear model, re-planned every few minutes, is not AC-verified each
time: on a large feeder the executed schedule of the rolling loop alone broke limits
(IEEE 8500, 1 day: 1,008 node-phase x interval pairs against 2,657 uncontrolled; 489
with the correction below; bench/README.md).
The DERMS's fast corrective cycle (:mod:`derms.control.fast_cycle`) answers such an
excursion as it happens. Here the same answer is made in the study:

* :class:`ACStepper` advances the :class:`~derms.dispatch.verify.ACNetwork`'s QSTS one
  interval at a time (taps and capacitors carry over from one interval to the next, as in
  :meth:`ACNetwork.simulate`, from the same starting control state) with the DER
  setpoints decided for that interval; an interval can be solved again with other
  setpoints from the control state it started in (the controls answer the new setpoints
  as they would have answered them alone).
* :class:`RealTimeCorrector`: where the interval's AC solve has a row beyond its limit
  (DESIGN.md limits, pre-existing ones held to their base-case values; half the counting
  tolerance, as the repair), the corrective LP
  (:func:`~derms.dispatch.corrective.solve_corrective`) on that interval's AC state (rows
  and guards of :class:`~derms.dispatch.ac_repair_rows.RepairRows`: violated rows, rows
  near a limit, regulators' monitored voltages inside their bands, capacitor controls on
  their side, the head import under the peak target; with ``caps_out``, a
  kvar-controlled capacitor that switched in this interval away from the base case's
  state is kept out: rows at the base case's state, its kvar held on that side) moves PV
  output and reactive power,
  battery power within what its energy allows now, and EV charging down by what the rest
  of the session can take back; the interval is solved again, at most ``rounds`` times,
  and the round with the fewest rows beyond a limit (then the least excess) is kept. A
  round that clears the interval may lift the head import up to ``clear_kw`` (unbounded
  by default: limits first, as in the plan's LP); one that leaves rows beyond a limit
  only up to ``peak_kw`` (or the import before it, if higher): past that it is
  dropped and the next round starts again from the best one with no DER's import
  allowed to rise (reactive power, less import). Measured on IEEE 8500 (rolling, groups
  of 4): partial corrections that took 67 -> 17 rows by curtailing 2 MW of PV and
  charging batteries lifted the head import from 7,172 to 9,027 kW, past the day's
  target of 8,305 kW, and set the executed peak. The caller says what "the peak" is for
  each kind of round (:meth:`RealTimeCorrector.execute`'s ``peak_kw`` and ``clear_kw``):
  the rolling loop holds a partial round under the executed peak so far, not under the
  re-plan's target, which with a noisy forecast can sit well above it (IEEE 8500, noisy,
  interval 7: a re-plan's target of 9,189 kW let a round that took 54 -> 21 rows by
  curtailing 1,836 kW of PV lift the import from 7,226 to 9,046 kW, the executed peak,
  against 8,488 executed as planned; that peak then floored every later re-plan), and a
  clearing round under the target.

The AC state stands for a state estimate of the interval (the monitoring cycle's); the
corrected setpoints are what the devices execute, so battery energy and EV energy follow
them and the next re-plan starts from there.

Sign convention (DESIGN.md): net import, consumption positive (a PV inverter generating
5 kW has ``p_kw = -5``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from derms.der.models import fleet_arrays
from derms.dispatch.ac_repair import with_moves
from derms.dispatch.ac_repair_rows import (
    EV_WEIGHT,
    RepairRows,
    beyond_at,
    ev_room_kw,
    excess,
    shift_ev_energy,
)
from derms.dispatch.control_rows import cap_states
from derms.dispatch.corrective import CorrectiveConfig, solve_corrective
from derms.dispatch.plan import Schedule
from derms.powerflow.collect import StepCollector
from derms.powerflow.control_state import (
    capture_control_state,
    regulated_transformers,
    restore_control_state,
)

log = logging.getLogger(__name__)

BATTERY_WEIGHT = 1.5  # cost of 1 kW of battery power moved, against 1 kW of PV curtailed
PEAK_TOL_KW = 1.0  # a partial correction may lift the head import this far past the peak


@dataclass(frozen=True)
class RealTimeConfig:
    """``rounds``: corrective solves per interval at most (each followed by an AC solve);
    guard rows within ``guard_pu`` [pu] / ``guard_frac`` of a limit, the ``max_guards``
    nearest of each kind; ``battery``: batteries may move (within power and the energy
    they hold now), at ``BATTERY_WEIGHT`` per kW; ``pv_up``: a curtailed PV may produce
    more again; ``caps_out``: see the module docstring."""

    rounds: int = 3
    guard_pu: float = 0.01
    guard_frac: float = 0.25
    max_guards: int = 400
    battery: bool = True
    pv_up: bool = True  # PV output may rise toward its available power (off under an
    # export limit: the correction does not see the head's export)
    caps_out: bool = False  # a capacitor switched away from the base case's state: kept
    # out (measured on two captured IEEE 8500 plans, in sequence after the repair: 174 ->
    # 388 and 19 -> 19 violations against 174 -> 136 and 19 -> 19 left alone; off)
    corrective: CorrectiveConfig = field(default_factory=lambda: CorrectiveConfig(
        v_margin_pu=0.002, i_margin_frac=0.01, time_limit_s=2.0, lp_rows_add=60,
        lp_rounds=12))


class ACStepper:
    """The QSTS of ``ac`` advanced interval by interval (module docstring).

    :meth:`solve` solves the present interval with the planned DERs' net import
    ``p_kw``/``q_kvar`` (n_der,) [kW], [kvar] (groups expanded to their members); called
    again, it solves the same interval again from the control state the interval started
    in; :meth:`advance` moves on. ``record`` (a :class:`StepCollector`) holds each
    interval's last solve. The engine is the stepper's while it steps: a simulation run
    on ``ac`` in between (which rewrites the load shapes and the time) makes the next
    :meth:`solve` raise.
    """

    def __init__(self, ac, n_steps: int) -> None:
        self.ac, self.engine = ac, ac.engine
        h = ac.fleet.horizon
        if n_steps > h.n_steps:
            raise ValueError(f"{n_steps} steps asked of a {h.n_steps}-step horizon")
        e = self.engine
        if ac.control_state is not None:
            restore_control_state(e, ac.control_state)
        n_m = len(ac.members.ders)
        self._p = np.zeros((n_m, h.n_steps))   # what the engine's DER load shapes hold
        self._q = np.zeros((n_m, h.n_steps))
        ls = e.circuit.LoadShapes
        for k, name in enumerate(ac.shapes):
            ls.Name = name
            ls.Pmult = self._p[k]
            ls.Qmult = self._q[k]
        e.set_control_mode(ac.control_mode)
        e.command(f"set mode=yearly stepsize={h.step.total_seconds()}s number=1")
        e.command("set time=(0,0)")
        self._regs = regulated_transformers(e)
        self.record = StepCollector(e, ac.index, n_steps)
        self.n_steps = n_steps
        self._runs = ac.runs  # the engine is this stepper's until it is done
        self.k = 0
        self._start: tuple | None = None   # (hour, seconds, control state) of interval k

    def solve(self, p_kw: np.ndarray, q_kvar: np.ndarray) -> None:
        """Solve interval ``k`` with these setpoints (again, if it was solved already)."""
        e, k = self.engine, self.k
        if self.ac.runs != self._runs:
            raise RuntimeError("the AC network ran a simulation while this stepper was "
                               "stepping it: its load shapes and time are no longer the "
                               "stepper's (start a new ACStepper)")
        sol = e.circuit.Solution
        if self._start is None:
            self._start = (sol.Hour, sol.Seconds, capture_control_state(e, self._regs))
        else:
            hour, sec, state = self._start
            restore_control_state(e, state)
            sol.Hour, sol.Seconds = hour, sec
        ac = self.ac
        p_m = ac.agg.expand(np.asarray(p_kw, float)[None, :])[0]
        q_m = ac.agg.expand(np.asarray(q_kvar, float)[None, :])[0]
        changed = np.flatnonzero((p_m != self._p[:, k]) | (q_m != self._q[:, k]))
        self._p[changed, k], self._q[changed, k] = p_m[changed], q_m[changed]
        ls = e.circuit.LoadShapes
        for j in changed:
            ls.Name = ac.shapes[j]
            ls.Pmult = self._p[j]
            ls.Qmult = self._q[j]
        sol.Solve()
        self.record.collect(k)

    def advance(self) -> None:
        """The present interval is done: the next :meth:`solve` is the next interval's."""
        self.k += 1
        self._start = None


@dataclass
class Correction:
    """One interval's correction: rows beyond their limits before and after (the AC
    solves), kW and kvar moved by the setpoints kept (none when no round did better than
    the setpoints given), the corrective LP's status of its last round, the head import
    before and after [kW]."""

    t: int
    rows_before: int
    rows_after: int
    kw_moved: float
    kvar_moved: float
    status: str
    s: float
    head_before_kw: float = float("nan")
    head_after_kw: float = float("nan")


class RealTimeCorrector:
    """Executes intervals on an :class:`ACStepper`, correcting the ones that break a limit
    (module docstring). One per run: the adjoint sensitivities' structure is built once."""

    def __init__(self, ac, stepper: ACStepper, cfg: RealTimeConfig | None = None) -> None:
        self.ac, self.stepper = ac, stepper
        self.cfg = cfg = cfg or RealTimeConfig()
        self._rows: RepairRows | None = None
        self._prev_taps: np.ndarray | None = None
        rec = stepper.record
        self._over = {"v_max": np.zeros(rec.v_pu.shape, bool),
                      "v_min": np.zeros(rec.v_pu.shape, bool),
                      "i_max": np.zeros(rec.i_a.shape, bool)}
        self.log: list[Correction] = []

    @property
    def rows(self) -> RepairRows:
        if self._rows is None:
            c = self.cfg
            self._rows = RepairRows(self.ac, guard_pu=c.guard_pu, guard_frac=c.guard_frac,
                                    max_guards=c.max_guards, reg_move_pu=0.003,
                                    step_margin_pu=0.001, peak_kw=0.0, pv_up=c.pv_up)
        return self._rows

    def _beyond(self, t: int) -> tuple[int, float]:
        """Fill row ``t`` of the masks of rows beyond their limits
        (:func:`~derms.dispatch.ac_repair_rows.beyond_at`); their number and the excess
        (:func:`~derms.dispatch.ac_repair_rows.excess`)."""
        rec = self.stepper.record
        v, i_a = rec.v_pu[t], rec.i_a[t].astype(float)
        n = 0
        for kind, m in beyond_at(self.ac, t, v, i_a).items():
            self._over[kind][t] = m
            n += int(m.sum())
        return n, excess(self.ac.net_limits, t, v, i_a)

    def _switched(self, caps0: np.ndarray | None, t: int) -> np.ndarray | None:
        """(n_ctl,) kvar-controlled capacitors that switched in this interval's solve away
        from the state the base case has here (None: none): the rows are then taken at
        the base case's state and each one's kvar is kept on that side of its setting
        (:meth:`RepairRows.at`'s ``back``), so the solve again does not switch it. A
        capacitor step (IEEE 8500: 300 kvar, +0.0056 pu at the substation bus) is more
        than the DERs take back once it is in; keeping it out is a small move."""
        base = self.ac.base.cap_on
        if caps0 is None or base is None or not self.cfg.caps_out:
            return None
        now = cap_states(self.stepper.engine, self.ac.capctl)
        sw = (np.abs(now - caps0) > 1e-9) & (np.abs(caps0 - base[t]) <= 1e-9)
        return sw if sw.any() else None

    def execute(self, p_kw: np.ndarray, q_kvar: np.ndarray, *, ranges: DerRanges,
                peak_kw: float, clear_kw: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """Solve the stepper's present interval with ``p_kw``/``q_kvar`` (n_der,), correct
        it where it breaks a limit, advance; returns the setpoints executed. ``ranges``:
        what each battery and EV can do now; ``peak_kw``: the head import the correction
        may not push the interval above (elastic; 0 or inf: no such guard); a round that
        leaves rows beyond a limit is dropped above ``max(peak_kw, head import before) +
        PEAK_TOL_KW``, one that clears the interval above ``max(clear_kw, peak_kw, head
        import before) + PEAK_TOL_KW`` (inf, the default: a clearing round may lift the
        import without bound)."""
        st, t = self.stepper, self.stepper.k
        ctl = self.ac.capctl
        caps0 = cap_states(st.engine, ctl) if ctl.n else None  # as the interval starts
        st.solve(p_kw, q_kvar)
        n0, x0 = self._beyond(t)
        best = (n0, x0, p_kw, q_kvar)   # fewest rows beyond first, then least excess
        if n0:
            t0 = time.perf_counter()
            head0 = float(st.record.head_p_kw[t].sum())
            cap_kw = max(peak_kw if np.isfinite(peak_kw) else np.inf, head0) + PEAK_TOL_KW
            clear_cap = max(clear_kw + PEAK_TOL_KW, cap_kw)   # a round that clears
            rows = self.rows
            rows.peak_kw = peak_kw if np.isfinite(peak_kw) else 0.0
            status, last_is_best, safe = "none", True, False
            p, q = np.asarray(p_kw, float).copy(), np.asarray(q_kvar, float).copy()
            for _ in range(self.cfg.rounds):
                got = rows.at(st.engine, t, st.record, self._over, rows.taps(st.engine),
                              self._prev_taps, self._switched(caps0, t))
                if got is None:
                    break
                ders = ranges.state(rows, t, p, q)
                if safe:   # no DER's import may rise: reactive power, less import only
                    ders = replace(ders, p_max_kw=np.minimum(ders.p_max_kw, ders.p_kw))
                out = solve_corrective(ders, *got, self.cfg.corrective)
                status = out.status
                if not out.moved.any():
                    break
                p, q = out.p_kw.copy(), out.q_kvar.copy()
                st.solve(p, q)
                n1, x1 = self._beyond(t)
                # a correction that leaves rows beyond a limit may not make a new peak;
                # one that clears the interval may lift the import up to clear_cap
                ok = float(st.record.head_p_kw[t].sum()) <= (clear_cap if n1 == 0 else cap_kw)
                last_is_best = ok and (n1, x1) < best[:2]
                if last_is_best:
                    best = (n1, x1, p, q)
                if n1 == 0 and ok:
                    break
                if not ok and not safe:  # again from the best, without raising the import
                    safe = True
                    p = np.asarray(best[2], float).copy()
                    q = np.asarray(best[3], float).copy()
                    st.solve(p, q)
                    self._beyond(t)
                    last_is_best = True
            if not last_is_best:   # the last solve is not the best one: solve that again
                st.solve(best[2], best[3])
                self._beyond(t)
            dp = np.asarray(best[2], float) - np.asarray(p_kw, float)
            dq = np.asarray(best[3], float) - np.asarray(q_kvar, float)
            self.log.append(Correction(t, n0, best[0], float(np.abs(dp).sum()),
                                       float(np.abs(dq).sum()), status,
                                       time.perf_counter() - t0, head0,
                                       float(st.record.head_p_kw[t].sum())))
        self._prev_taps = self.rows.taps(st.engine) if self._rows is not None else None
        st.advance()
        return np.asarray(best[2], float), np.asarray(best[3], float)


@dataclass(frozen=True)
class DerRanges:
    """What the batteries and EVs can do in the interval being executed (fleet order
    within their kind): battery net import ``bat_min_kw``..``bat_max_kw`` (power and the
    energy held now), EV charging ``ev_min_kw``..``ev_max_kw`` (down by what the rest of
    the session can take back, never above its rate or its remaining need)."""

    bat_min_kw: np.ndarray
    bat_max_kw: np.ndarray
    ev_min_kw: np.ndarray
    ev_max_kw: np.ndarray
    battery: bool = True

    def state(self, rows: RepairRows, t: int, p_kw: np.ndarray, q_kvar: np.ndarray):
        """The corrective LP's :class:`~derms.dispatch.corrective.DerState` at ``t``: PV
        within its available power and reactive capability (``rows``), batteries and EVs
        within these ranges, flexible loads and generators fixed."""
        st = rows.ders(t, p_kw, q_kvar)
        n_pv, n_bat, n_ev = len(rows.fleet.pv), self.bat_min_kw.size, self.ev_min_kw.size
        p_min, p_max = st.p_min_kw.copy(), st.p_max_kw.copy()
        fixed, weight = st.fixed.copy(), st.weight.copy()
        b = slice(n_pv, n_pv + n_bat)
        e = slice(n_pv + n_bat, n_pv + n_bat + n_ev)
        if self.battery and n_bat:
            p_min[b], p_max[b] = self.bat_min_kw, self.bat_max_kw
            fixed[b] = self.bat_max_kw - self.bat_min_kw <= 1e-9
            weight[b] = BATTERY_WEIGHT
        if n_ev:
            p_min[e], p_max[e] = self.ev_min_kw, self.ev_max_kw
            fixed[e] = self.ev_max_kw - self.ev_min_kw <= 1e-9
            weight[e] = EV_WEIGHT
        p = np.clip(st.p_kw, p_min, p_max)
        return replace(st, p_kw=p, p_min_kw=p_min, p_max_kw=p_max, fixed=fixed,
                       weight=weight)


def correct_in_sequence(ac, sched: Schedule, peak_kw: float,
                        cfg: RealTimeConfig | None = None) -> tuple[Schedule, list[Correction]]:
    """A plan's intervals executed in order on the AC model, each corrected at its own
    state where it breaks a limit (:class:`RealTimeCorrector`), every later interval then
    solved from the taps and capacitors the corrected one left: the plan's last mile
    in sequence. Batteries keep the plan (their energy ties the intervals together); an
    EV's charging cut at ``t`` is made up in its session's latest intervals with rate
    headroom (:func:`~derms.dispatch.ac_repair_rows.shift_ev_energy`); PV output and
    reactive power move. ``peak_kw``: the head import a correction may not push an
    interval above (elastic). Returns the corrected schedule and the corrections."""
    cfg = replace(cfg or RealTimeConfig(), battery=False)
    T = sched.p_kw.shape[0]
    fleet = ac.fleet
    n_pv, n_bat, n_ev = len(fleet.pv), len(fleet.batteries), len(fleet.evs)
    ev = slice(n_pv + n_bat, n_pv + n_bat + n_ev)
    a = fleet_arrays(fleet)
    window = a.ev_window.astype(bool)
    p, q = sched.p_kw.copy(), sched.q_kvar.copy()
    ev_kw = sched.ev_kw.copy()
    cor = RealTimeCorrector(ac, ACStepper(ac, T), cfg)
    none = np.zeros(n_bat)
    for t in range(T):
        room = ev_room_kw(ev_kw, window, a.ev_p_max_kw, t) if n_ev else np.zeros(0)
        ranges = DerRanges(none, none, np.maximum(ev_kw[t] - room, 0.0), ev_kw[t].copy(),
                           battery=False)
        p_t, q_t = cor.execute(p[t], q[t], ranges=ranges, peak_kw=peak_kw)
        cut = np.maximum(ev_kw[t] - p_t[ev], 0.0)
        if (cut > 1e-9).any():   # the energy goes to the session's later intervals
            ev_kw = shift_ev_energy(ev_kw, cut, window, a.ev_p_max_kw, t)
            p[:, ev] = ev_kw
        p[t], q[t] = p_t, q_t
        p[t, ev] = ev_kw[t]
    return with_moves(sched, p, q), cor.log


__all__ = ["ACStepper", "Correction", "DerRanges", "RealTimeConfig", "RealTimeCorrector",
           "correct_in_sequence"]
