"""Rolling (receding-horizon) re-planning with forecasts, executed against the truth.

:func:`run_rolling` walks through ``days`` simulated days. At every re-plan origin
(every ``replan_every``) the optimiser sees, for the next ``lookahead`` (default 24 h):

* forecasts of the non-DER head import (customer load + losses) and of every PV's
  available power, and of the energy of EV sessions that have not arrived yet;
* the actual state: battery energy and the energy each EV session has received so far
  (sessions that are plugged in are known exactly: declared need and departure).

It keeps one HiGHS model (:meth:`Planner.update`: bounds and costs change in place, warm
start; the peak already reached is a lower bound of the plan's peak), then *executes*
the first interval(s) with the actual load and PV: EVs follow the plan (charge capped at
what the session still needs), a PV output the plan curtails is capped at the planned
value, otherwise it produces its actual available power; batteries follow the plan plus
a real-time correction (:func:`_correct`) that holds the metered head import at the
plan's peak target (less charging / more discharging when above it, within power and
energy; planned discharge given back when below it), and EV charging above the target is
deferred where the session can still finish by departure (:func:`_defer_ev`); under an
export limit, an interval whose metered import would fall below what the limit allows
(PV above its forecast) discharges less, charges more, then curtails PV by the plan's
policy (:func:`_hold_export`; IEEE 13 with PV at every customer, noisy forecast: 22 of 96
intervals 240 kW past the limit before, none after), aiming above the limit by
``EXPORT_MARGIN_KW`` plus what the estimate overstated the AC import in the last interval
executed on the AC model (losses change with the curtailment: EPRI ckt5 missed by up to
11.6 kW in 10 intervals without it), and the AC check counts the intervals still past it
(``violations["export_limit_missed_intervals"]``). With
``realtime`` (the default) each interval is then executed on the AC model as it comes and
corrected where it breaks a limit (:mod:`derms.dispatch.realtime`: the fast corrective
cycle's answer, on the interval's AC state); the corrected setpoints are the executed
ones; a correction that leaves rows beyond a limit may not lift the head import above
the executed peak so far (AC), one that clears the interval not above the plan's target.
The executed schedule is simulated once more on the AC model at the end (the
violation counts come from that run).

Forecast "noisy" (:class:`NoisyForecast`): truth x (1 + e_k), ``e_k`` an AR(1) path in the
lead time ``k`` (``e_0 ~ N(0, s^2)``, ``e_k = phi e_{k-1} + N(0, s^2)``,
``s = sigma sqrt(1 - phi^2)``), so the error's standard deviation grows with the lead
from ``sigma sqrt(1 - phi^2)`` to ``sigma``; one path per origin for the feeder's load and
one for all PV (weather errors are common), fresh draws at each origin (seeded). EV
sessions not yet plugged in: energy x (1 + N(0, ev_sigma^2)), clipped to what the session
can take. "perfect": the truth. A callable ``f(k0, n, truth) -> (head0_kw (n,),
pv_avail_kw (n, n_pv))`` gives custom forecasts for intervals ``[k0, k0 + n)``.

Network rows are centred on the AC solve of the uncontrolled schedule with the actual
load (the state an estimator would give; only the objective and the DER bounds see the
forecasts), so the re-plans are linear and not AC-verified; the real-time correction
catches what they leave (executed violations, 1 day: IEEE 13 seed 3 noisy 8 -> 0, EPRI
ckt5 seed 1 noisy 25 -> 0, IEEE 8500 seed 1 with groups of 4 1,008 -> 486 with a perfect
forecast but 1,355 -> 1,374 with the noisy one, its peak 25 kW higher: bench/README.md).

Peaks (head import [kW], import positive) are over the executed ``days``, of the member
DERs where the plan is of groups (as a single plan's baselines): uncontrolled,
rule-based (:func:`~derms.dispatch.baselines.rule_based_peak_shaving`, threshold 0.9 x the
uncontrolled peak), perfect foresight (one plan over the whole scenario horizon with the
actual data, AC-verified) and the executed rolling schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from derms.analysis.constraints import detect_violations
from derms.der.models import Fleet, Horizon, fleet_arrays
from derms.dispatch import baselines
from derms.dispatch.lp import INF
from derms.dispatch.network import NetworkLimits, Reference
from derms.dispatch.plan import ObjectiveConfig, Planner, Schedule, uncontrolled_schedule
from derms.dispatch.realtime import (
    ACStepper,
    Correction,
    DerRanges,
    RealTimeConfig,
    RealTimeCorrector,
)
from derms.dispatch.verify import ACNetwork, export_misses, plan_and_verify
from derms.errors import InfeasibleError, InputError

log = logging.getLogger(__name__)

EXPORT_MARGIN_KW = 1.0  # the execution holds the export limit this far inside it (losses
# move the AC head import from the metered estimate by a little)

ForecastFn = Callable[[int, int, "Truth"], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class NoisyForecast:
    """AR(1) relative forecast errors (see module docstring). ``phi`` per 15 min."""

    load_sigma: float = 0.10
    pv_sigma: float = 0.25
    ev_sigma: float = 0.20
    phi: float = 0.95

    def path(self, rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
        """One AR(1) error path of ``n`` leads (std grows to ``sigma``)."""
        s = sigma * np.sqrt(1 - self.phi**2)
        eta = rng.normal(0.0, s, n)
        k = np.arange(n)
        # e_k = sum_j phi^(k-j) eta_j, vectorised as a lower-triangular product
        w = np.tril(self.phi ** np.maximum(k[:, None] - k[None, :], 0))
        return w @ eta


@dataclass(frozen=True)
class Truth:
    """What actually happens over the scenario horizon: non-DER head import ``head0_kw``
    (N,) [kW, customer load + losses of the uncontrolled AC solve] and available PV power
    ``pv_avail_kw`` (N, n_pv)."""

    head0_kw: np.ndarray
    pv_avail_kw: np.ndarray


@dataclass
class RollingResult:
    """Outcome of :func:`run_rolling`. Schedules are (n_exec, n_der), fleet order, net
    import (consumption positive); ``e_kwh`` battery energy at the end of each interval.
    ``soc0_frac_at_replan`` (n_replans, n_bat) and ``ev_delivered_kwh_at_replan``
    (n_replans, n_ev) are the actual states each re-plan started from;
    ``target_kw_at_replan`` (n_replans,) the head-import peak each plan aimed at [kW]
    (inf where a plan fell back to uncontrolled); ``full_replan`` (n_replans,) True where
    the re-plan covered the whole lookahead (always, without ``anchor_every``)."""

    executed: Schedule
    peak_kw: float
    peak_perfect_kw: float
    peak_uncontrolled_kw: float
    peak_rule_based_kw: float
    replan_s: list[float]
    n_replans: int
    violations: dict[str, int]
    violations_uncontrolled: dict[str, int]
    head_kw: np.ndarray
    soc0_frac_at_replan: np.ndarray
    ev_delivered_kwh_at_replan: np.ndarray
    forecast: str
    fallbacks: int = 0
    timing_s: dict[str, float] = field(default_factory=dict)
    target_kw_at_replan: np.ndarray = field(default_factory=lambda: np.zeros(0))
    full_replan: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    corrections: list[Correction] = field(default_factory=list)

    @property
    def realtime(self) -> dict[str, float]:
        """The real-time AC corrections in numbers: intervals corrected, rows beyond a
        limit before and after them (summed), kW and kvar moved, seconds."""
        c = self.corrections
        return {"intervals_corrected": len(c),
                "rows_beyond_before": int(sum(x.rows_before for x in c)),
                "rows_beyond_after": int(sum(x.rows_after for x in c)),
                "kw_moved": float(sum(x.kw_moved for x in c)),
                "kvar_moved": float(sum(x.kvar_moved for x in c)),
                "s": float(sum(x.s for x in c))}

    @property
    def reduction_ratio(self) -> float:
        """(uncontrolled - executed) / (uncontrolled - perfect foresight) peak reduction."""
        den = self.peak_uncontrolled_kw - self.peak_perfect_kw
        return (self.peak_uncontrolled_kw - self.peak_kw) / den if den > 0 else float("nan")


@dataclass(frozen=True)
class _Anchor:
    """The last full plan's trajectory, from its origin ``k0``: battery energy at the end
    of each interval ``e_kwh`` (W, n_bat) and at its start ``e0_kwh``; EV energy delivered
    by the end of each interval ``ev_cum_kwh`` (W, n_ev) on top of ``done0_kwh``; its peak
    target ``target_kw`` (a short window's floor: a window short of the day's peak would
    otherwise aim lower, and the real-time correction would spend the energy kept for
    the peak on holding that lower target)."""

    k0: int
    e_kwh: np.ndarray
    e0_kwh: np.ndarray
    ev_cum_kwh: np.ndarray
    done0_kwh: np.ndarray
    target_kw: float = -np.inf

    @classmethod
    def of(cls, k0: int, s: Schedule, e_kwh: np.ndarray, done: np.ndarray, a,
           dt: float, target_kw: float = -np.inf) -> _Anchor:
        return cls(k0, s.e_kwh.copy(), e_kwh.copy(),
                   np.cumsum(s.ev_kw * a.ev_eta * dt, axis=0), done.copy(), target_kw)

    def terminal(self, k0: int, n: int, e_kwh: np.ndarray, done: np.ndarray,
                 need: np.ndarray, fleet: Fleet, a, ev_arr: np.ndarray,
                 ev_dep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Least battery energy at the end of window ``[k0, k0 + n)`` [kWh] (n_bat,) and
        the EV needs [kWh] (n_ev,) to give :func:`_window_fleet` for it: sessions leaving
        after the window must get what the full plan delivered by then (the rest can come
        after: ``EVSession.e_needed_kwh`` counts what the time after the horizon allows)."""
        i, j = k0 - self.k0, k0 - self.k0 + n - 1
        e_was = self.e_kwh[i - 1] if i > 0 else self.e0_kwh
        dt = fleet.horizon.dt_h
        reach = e_kwh + a.bat_p_max_kw * a.bat_eta_ch * dt * n   # what n intervals can add
        e_end = np.clip(self.e_kwh[j] + (e_kwh - e_was), a.bat_e_min_kwh,
                        np.minimum(a.bat_e_max_kwh, reach))
        h = fleet.horizon
        end = h.start + h.step * (k0 + n)
        after_h = np.array([max(0.0, (e.departure - end).total_seconds() / 3600.0)
                            for e in fleet.evs])
        plugged = np.maximum(np.minimum(ev_dep, k0 + n) - np.maximum(ev_arr, k0), 0)
        can = 0.999 * a.ev_p_max_kw * a.ev_eta * dt * plugged
        by_end = np.clip(self.done0_kwh + self.ev_cum_kwh[j] - done, 0.0,
                         np.minimum(need, can))
        need_w = np.where(ev_dep > k0 + n, by_end + a.ev_p_max_kw * a.ev_eta * after_h, need)
        return e_end, need_w


def _whole(td: str | None, step) -> int | None:
    """``td`` in whole intervals of ``step`` (None when it is None or not whole)."""
    if td is None:
        return None
    n = pd.Timedelta(td) / pd.Timedelta(step)
    return round(n) if n >= 1 and abs(n - round(n)) < 1e-9 else None


def _steps(td, step) -> int:
    n = pd.Timedelta(td) / pd.Timedelta(step)
    if n < 1 or abs(n - round(n)) > 1e-9:
        raise InputError(f"{td} is not a whole number (>= 1) of {step} intervals")
    return round(n)


def _window_fleet(fleet: Fleet, k0: int, n: int, pv_kw: np.ndarray, e_kwh: np.ndarray,
                  ev_need_kwh: np.ndarray, e_end_kwh: np.ndarray | None = None) -> Fleet:
    """The fleet over ``[k0, k0 + n)`` with forecasts, actual battery energy and EV needs;
    ``e_end_kwh`` (n_bat,) the least battery energy at the window's end (default: the
    scenario's own end condition)."""
    h = fleet.horizon
    hw = Horizon(h.start + k0 * h.step, h.step, n)

    def end(j: int, b) -> float:
        if e_end_kwh is not None:
            return float(np.clip(e_end_kwh[j] / b.e_max_kwh, b.e_min_kwh / b.e_max_kwh,
                                 b.soc_max_frac))
        return b.soc0_frac if b.soc_end_min_frac is None else b.soc_end_min_frac

    bats = tuple(replace(b, soc0_frac=float(np.clip(e_kwh[j] / b.e_max_kwh,
                                                    b.e_min_kwh / b.e_max_kwh,
                                                    b.soc_max_frac)),
                         soc_end_min_frac=end(j, b))
                 for j, b in enumerate(fleet.batteries))
    evs = tuple(replace(e, e_needed_kwh=float(ev_need_kwh[j])) for j, e in enumerate(fleet.evs))
    flex = tuple(replace(f, p_base_kw=f.p_base_kw[k0:k0 + n]) for f in fleet.flex)
    pv = tuple(replace(p, p_avail_kw=pv_kw[:, j]) for j, p in enumerate(fleet.pv))
    return replace(fleet, horizon=hw, pv=pv, batteries=bats, evs=evs, flex=flex,
                   requests=())


def _slice_ref(ref: Reference, k0: int, n: int, head0_kw: np.ndarray) -> Reference:
    p = ref.p_kw[k0:k0 + n]
    return Reference(p, ref.q_kvar[k0:k0 + n], ref.v_pu[k0:k0 + n], ref.i_a[k0:k0 + n],
                     head0_kw + p.sum(axis=1))


def _slice_limits(lim: NetworkLimits, k0: int, n: int) -> NetworkLimits:
    return NetworkLimits(lim.v_max[k0:k0 + n], lim.v_min[k0:k0 + n], lim.i_max[k0:k0 + n],
                         lim.node_ok, rating_a=lim.rating_a)


def run_rolling(ac: ACNetwork, scenario, objective: ObjectiveConfig | None = None, *,
                forecast: str | ForecastFn = "noisy", replan_every="15min", days: float = 3,
                seed: int = 0, lookahead="24h",
                noise: NoisyForecast | None = None, sunk_peak: bool = True,
                valley_price: float = 0.01, anchor_every: str | None = "1h",
                short_window: str = "4h", realtime: RealTimeConfig | None | bool = True
                ) -> RollingResult:
    """Re-plan every ``replan_every`` over ``days`` days and execute (module docstring).

    ``ac``/``scenario`` from :func:`~derms.studies.dispatch_scenario.open_dispatch_case`
    with a horizon of at least ``days + lookahead`` (e.g. ``ScenarioConfig(n_steps=
    96 * (days + 1))``). Raises :class:`InputError` when it is shorter.
    ``valley_price`` [per kWh, relative to the peak weight per kW]: a small price on head
    import proportional to the forecast load, so that among plans with the same peak the
    one that charges in the forecast valleys wins (a min-max plan is otherwise free to
    charge anywhere below its target, and a forecast error then makes a new peak); 0
    leaves it out.

    ``anchor_every`` (default 1 h): two levels. A full re-plan over ``lookahead`` only at
    that period; the re-plans in between cover ``short_window`` and are anchored to the
    last full plan: each battery ends the window with at least the energy the full plan
    had there, shifted by how far the battery is from the full plan now, and each EV
    session that leaves after the window gets at least what the full plan delivered by
    then (``_Anchor``). A short LP re-solves in a fraction of the full one's time (IEEE
    8500 with groups of 4: 1.0-1.3 s against 25-50 s; IEEE 123: 0.03 against 0.15 s, mean
    reduction ratio 0.803 against 0.788 at seven starts: bench/README.md). Every re-plan is full when
    ``anchor_every`` is None, not a whole number of steps longer than ``replan_every``,
    or ``short_window`` is shorter than ``replan_every``.

    ``realtime`` (default on): each interval is executed on the AC model as it comes
    (:class:`~derms.dispatch.realtime.ACStepper`) and, where it breaks a limit, corrected
    there (:class:`~derms.dispatch.realtime.RealTimeCorrector`: PV, batteries within their
    energy, EV charging the session can make up later); the corrected setpoints are the
    executed ones. False: the schedule is executed as planned (and only simulated at the
    end).
    """
    objective = objective or ObjectiveConfig()
    noise = noise or NoisyForecast()
    t_all = time.perf_counter()
    fleet = ac.fleet
    h = fleet.horizon
    N, dt = h.n_steps, h.dt_h
    k_re = _steps(replan_every, h.step)
    W = _steps(lookahead, h.step)
    n_exec = _steps(pd.Timedelta(days=days), h.step)
    if n_exec + W > N:
        raise InputError(f"scenario horizon has {N} intervals; rolling over {n_exec} with a "
                         f"{W}-interval lookahead needs {n_exec + W} (set ScenarioConfig."
                         "n_steps)")
    a = fleet_arrays(fleet)
    # the baselines are the member DERs' (as a single plan's): the uncontrolled schedule of
    # groups charged each group's EVs as one session, 7-15 kW off the members' peak
    own = ac.members
    unc_own = uncontrolled_schedule(own)
    ref_u, res_u = ac.reference(unc_own)
    unc = uncontrolled_schedule(fleet) if own is not fleet else unc_own  # the planned DERs'
    truth = Truth(ref_u.head_kw - unc_own.p_kw.sum(axis=1), a.pv_avail_kw)
    n_pv, n_bat, n_ev = len(fleet.pv), len(fleet.batteries), len(fleet.evs)
    ev_e = np.array([e.e_needed_kwh for e in fleet.evs])
    ev_arr = np.array([h.step_at(e.arrival, ceil=True) for e in fleet.evs], dtype=int)
    ev_dep = np.array([h.step_at(e.departure, ceil=False) for e in fleet.evs], dtype=int)
    ev_pmax, ev_eta = a.ev_p_max_kw, a.ev_eta
    q_cap = a.pv_q_max_kvar

    def fc(k0: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if callable(forecast):
            h0, pv = forecast(k0, W, truth)
            return np.asarray(h0, float), np.asarray(pv, float), np.zeros(n_ev)
        h0, pv = truth.head0_kw[k0:k0 + W], truth.pv_avail_kw[k0:k0 + W]
        if forecast == "perfect":
            return h0, pv, np.zeros(n_ev)
        if forecast != "noisy":
            raise InputError(f"forecast must be 'noisy', 'perfect' or a callable, got "
                             f"{forecast!r}")
        e_l = noise.path(rng, W, noise.load_sigma)
        e_p = noise.path(rng, W, noise.pv_sigma)
        s_kva = a.pv_s_kva[None, :]
        return (h0 * (1 + e_l), np.clip(pv * (1 + e_p)[:, None], 0.0, s_kva),
                rng.normal(0.0, noise.ev_sigma, n_ev))

    e_kwh = a.bat_e0_kwh.copy()
    bmax = np.array([b.e_max_kwh for b in fleet.batteries], dtype=float)  # nameplate
    done = np.zeros(n_ev)
    n_der = len(fleet.ders)
    P, Q = np.zeros((n_exec, n_der)), np.zeros((n_exec, n_der))
    pv_x, ch_x, dis_x = np.zeros((n_exec, n_pv)), np.zeros((n_exec, n_bat)), np.zeros((n_exec,
                                                                                        n_bat))
    e_x, ev_x = np.zeros((n_exec, n_bat)), np.zeros((n_exec, n_ev))
    n_fl = len(fleet.flex)
    sh_x, rb_x = np.zeros((n_exec, n_fl)), np.zeros((n_exec, n_fl))
    gen_x = np.broadcast_to(a.gen_p_min_kw, (n_exec, a.gen_p_min_kw.size)).copy()
    planners: dict[int, Planner] = {}  # one kept HiGHS model per window length
    # a warm update keeps the LP's structure: not with group requests or a policy that
    # ties PVs together per interval (their rows change with the window); then cold
    warm = not fleet.requests and objective.curtailment_policy != "equal_proportional"
    k_anchor = _whole(anchor_every, h.step)
    k_short = min(_whole(short_window, h.step) or 0, W)
    if k_anchor is None or k_anchor <= k_re or k_short < k_re:
        k_anchor, k_short = None, W
    anchor: _Anchor | None = None
    replan_s, soc_log, ev_log, targets, full_log = [], [], [], [], []
    fallbacks = 0
    peak_so_far = -np.inf
    peak_ac = -np.inf   # the executed head import's peak so far on the AC model [kW]
    if realtime is True:
        realtime = RealTimeConfig()
    if realtime and objective.export_limit_kw is not None:  # it does not see the export
        realtime = replace(realtime, pv_up=False)
    # the least head import the export limit allows [kW] (None: no limit)
    x_min_kw = None if objective.export_limit_kw is None else -objective.export_limit_kw
    x_bias_kw = 0.0  # the last AC-executed interval's estimate minus its AC import [kW]
    corrector = (RealTimeCorrector(ac, ACStepper(ac, n_exec), realtime) if realtime
                 else None)
    for k0 in range(0, n_exec, k_re):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, k0])
        h0_fc, pv_fc, ev_err = fc(k0, rng)
        # EV needs: plugged-in or past sessions known; future ones forecast
        future = ev_arr > k0
        need = np.where(future, ev_e * (1 + ev_err), ev_e) - done
        start = np.maximum(ev_arr, k0)
        can = ev_pmax * ev_eta * dt * np.maximum(ev_dep - start, 0)
        need = np.clip(need, 0.0, 0.999 * can)
        soc_log.append(e_kwh / bmax)
        ev_log.append(done.copy())
        short = (k_anchor is not None and anchor is not None and k0 - anchor.k0 < k_anchor
                 and k0 + k_short <= anchor.k0 + W)
        n_w = k_short if short else W
        if short:   # a window of k_short anchored to the last full plan's trajectory
            e_end, need_w = anchor.terminal(k0, n_w, e_kwh, done, need, fleet, a, ev_arr,
                                            ev_dep)
        else:
            e_end, need_w = None, need
        floor = peak_so_far if (k0 and sunk_peak) else -INF

        def plan(n: int, e_end, need_w, target_floor: float, k0=k0, pv_fc=pv_fc,
                 h0_fc=h0_fc, e_kwh=e_kwh, floor=floor) -> tuple[Schedule, float]:
            """The window [k0, k0 + n) with this origin's forecasts and state, planned."""
            fw = _window_fleet(fleet, k0, n, pv_fc[:n], e_kwh, need_w, e_end)
            return _plan_window(planners, n, fw, _slice_ref(ref_u, k0, n, h0_fc[:n]),
                                    _slice_limits(ac.net_limits, k0, n),
                                    _valley(objective, h0_fc[:n], valley_price), ac, ref_u,
                                    warm, floor, target_floor)

        try:
            s, target = plan(n_w, e_end, need_w, anchor.target_kw if short else -INF)
        except InfeasibleError as err:
            s = None
            if short:   # the anchored window failed: re-plan the whole lookahead now
                log.info("rolling k0=%d short window infeasible (%s); full re-plan", k0, err)
                short = False
                try:
                    s, target = plan(W, None, need, -INF)
                except InfeasibleError as err2:
                    err = err2
            if s is None:  # keep going: this block runs uncontrolled
                log.warning("rolling k0=%d infeasible, block runs uncontrolled: %s", k0, err)
                fallbacks += 1
                s = uncontrolled_schedule(_window_fleet(fleet, k0, W, pv_fc, e_kwh, need))
                target = float("inf")
                anchor = None
        if not short and k_anchor is not None and np.isfinite(target):
            anchor = _Anchor.of(k0, s, e_kwh, done, a, dt, target)
        full_log.append(not short)
        replan_s.append(time.perf_counter() - t0)
        targets.append(target)
        for k in range(min(k_re, n_exec - k0)):  # execute with the actual data
            t = k0 + k
            avail = truth.pv_avail_kw[t]
            curtailed = s.pv_kw[k] < pv_fc[k] - 1e-6
            pv = np.where(curtailed, np.minimum(avail, s.pv_kw[k]), avail)
            q_pv = np.clip(s.q_kvar[k, :n_pv], -q_cap[t], q_cap[t])
            ch, dis = s.charge_kw[k].copy(), s.discharge_kw[k].copy()
            if n_bat and np.isfinite(target):  # real-time correction toward the target
                ev_plan = np.where((ev_arr <= t) & (t < ev_dep), s.ev_kw[k], 0.0)
                head = (truth.head0_kw[t] - pv.sum() + (ch - dis).sum() + ev_plan.sum()
                        + (a.flex_base_kw[t] - s.shed_kw[k] + s.rebound_kw[k]).sum())
                ch, dis = _correct(head - target, ch, dis, e_kwh, a, dt)
            plugged = (ev_arr <= t) & (t < ev_dep)
            ev = np.where(plugged, np.minimum(s.ev_kw[k], np.maximum(ev_e - done, 0.0)
                                              / (ev_eta * dt)), 0.0)
            if np.isfinite(target) and ev.sum() > 0:  # defer EV charging above the target
                head = (truth.head0_kw[t] - pv.sum() + (ch - dis).sum() + ev.sum()
                        + (a.flex_base_kw[t] - s.shed_kw[k] + s.rebound_kw[k]).sum())
                ev = _defer_ev(head - target, ev, ev_e - done, ev_dep - t - 1, ev_pmax,
                               ev_eta, dt)
            fl = a.flex_base_kw[t] - s.shed_kw[k] + s.rebound_kw[k]
            if x_min_kw is not None:  # the export limit, held at the metered import
                short = x_min_kw + EXPORT_MARGIN_KW + x_bias_kw - (
                    truth.head0_kw[t] - pv.sum() + (ch - dis).sum() + ev.sum() + fl.sum()
                    - gen_x[t].sum())
                if short > 0:
                    ch, dis, pv = _hold_export(short, ch, dis, pv, e_kwh, a, dt,
                                               objective.curtailment_policy)
            p_t = np.r_[-pv, ch - dis, ev, fl, -gen_x[t]]
            q_t = np.zeros(n_der)
            q_t[:n_pv] = q_pv
            if corrector is not None:  # executed on the AC model, corrected where it breaks
                p_c, q_c = corrector.execute(
                    p_t, q_t, ranges=_ranges(a, e_kwh, ev, plugged, ev_e - done,
                                             ev_dep - (k0 + k_re), dt, realtime.battery),
                    # a partial round under the peak executed so far (the first
                    # interval: its own import), not under the target: with a noisy
                    # forecast the target can sit far above the peak (bench/README.md)
                    peak_kw=peak_ac if np.isfinite(peak_ac) else 0.0,
                    clear_kw=max(target, peak_so_far))
                head_ac = float(corrector.stepper.record.head_p_kw[t].sum())
                peak_ac = max(peak_ac, head_ac)
                # how far the metered estimate overstated the AC import here (losses move
                # with the curtailment): the next interval's export hold adds it
                x_bias_kw = max(truth.head0_kw[t] + p_c.sum() - head_ac, 0.0)
                pv, q_pv = -p_c[:n_pv], q_c[:n_pv]
                b_new = p_c[n_pv:n_pv + n_bat]
                moved = np.abs(b_new - (ch - dis)) > 1e-9
                ch = np.where(moved, np.maximum(b_new, 0.0), ch)
                dis = np.where(moved, np.maximum(-b_new, 0.0), dis)
                ev = p_c[n_pv + n_bat:n_pv + n_bat + n_ev]
                p_t, q_t = p_c, q_c
            e_kwh = np.clip(e_kwh + (a.bat_eta_ch * ch - dis / a.bat_eta_dis) * dt,
                            a.bat_e_min_kwh, a.bat_e_max_kwh)
            done = done + ev * ev_eta * dt
            pv_x[t], ch_x[t], dis_x[t], e_x[t], ev_x[t] = pv, ch, dis, e_kwh, ev
            sh_x[t], rb_x[t] = s.shed_kw[k], s.rebound_kw[k]
            P[t], Q[t] = p_t, q_t
            peak_so_far = max(peak_so_far, truth.head0_kw[t] + P[t].sum())
    t_ac = time.perf_counter()
    p_full, q_full = unc.p_kw.copy(), unc.q_kvar.copy()
    p_full[:n_exec], q_full[:n_exec] = P, Q
    res_x = ac.simulate(p_full, q_full)
    head_x = res_x.head_p_kw.sum(axis=1)[:n_exec]
    ac_s = time.perf_counter() - t_ac

    viol_x = _counts(ac, res_x, n_exec)
    if x_min_kw is not None:  # intervals whose AC head import broke the export limit
        n_miss, miss_kw = export_misses(objective, head_x)
        viol_x = {**viol_x, "export_limit_missed_intervals": n_miss,
                  "export_limit_missed_kw_max": miss_kw}
    viol_u = _counts(ac, res_u, n_exec)
    head_u = ref_u.head_kw[:n_exec]
    t_pf = time.perf_counter()
    pf = plan_and_verify(ac, objective, uncontrolled=(ref_u, res_u))
    pf_s = time.perf_counter() - t_pf
    rb = baselines.rule_based_peak_shaving(own, ref_u.head_kw, 0.9 * head_u.max())
    res_rb = ac.simulate_schedule(rb)
    fx = replace(fleet, horizon=Horizon(h.start, h.step, n_exec), requests=(),
                 pv=tuple(replace(p, p_avail_kw=p.p_avail_kw[:n_exec]) for p in fleet.pv),
                 flex=tuple(replace(f, p_base_kw=f.p_base_kw[:n_exec]) for f in fleet.flex))
    ex = Schedule(fx, P, Q, pv_x,
                  truth.pv_avail_kw[:n_exec] - pv_x, ch_x, dis_x, e_x, ev_x, sh_x, rb_x, gen_x)
    return RollingResult(
        executed=ex, peak_kw=float(head_x.max()),
        peak_perfect_kw=float(pf.result.head_p_kw.sum(axis=1)[:n_exec].max()),
        peak_uncontrolled_kw=float(head_u.max()),
        peak_rule_based_kw=float(res_rb.head_p_kw.sum(axis=1)[:n_exec].max()),
        replan_s=replan_s, n_replans=len(replan_s), violations=viol_x,
        violations_uncontrolled=viol_u, head_kw=head_x,
        soc0_frac_at_replan=np.array(soc_log).reshape(len(soc_log), n_bat),
        ev_delivered_kwh_at_replan=np.array(ev_log).reshape(len(ev_log), n_ev),
        forecast=forecast if isinstance(forecast, str) else "callable", fallbacks=fallbacks,
        timing_s={"total_s": time.perf_counter() - t_all, "ac_executed_s": ac_s,
                  "perfect_foresight_s": pf_s, "replan_mean_s": float(np.mean(replan_s)),
                  "replan_max_s": float(np.max(replan_s))},
        target_kw_at_replan=np.array(targets), full_replan=np.array(full_log, dtype=bool),
        corrections=corrector.log if corrector is not None else [],
    )


def _valley(objective: ObjectiveConfig, h0_kw: np.ndarray, valley_price: float
            ) -> ObjectiveConfig:
    """``objective`` with import priced by the forecast load ``h0_kw`` (run_rolling's
    ``valley_price``; 0 leaves it as it is)."""
    if valley_price <= 0:
        return objective
    price = valley_price * h0_kw / max(float(np.mean(np.abs(h0_kw))), 1e-9)
    return replace(objective, weights=replace(objective.weights, price_per_kwh=price))


def _plan_window(planners: dict[int, Planner], n_w: int, fw: Fleet, ref_w: Reference,
                 lim_w: NetworkLimits, obj: ObjectiveConfig, ac: ACNetwork, ref_u: Reference,
                 warm: bool, floor_kw: float, target_floor_kw: float
                 ) -> tuple[Schedule, float]:
    """Plan one window on the kept model for its length (built at its first use; rebuilt
    each time when not ``warm``) with the peak no lower than ``floor_kw`` (the peak already
    reached) and ``target_floor_kw``; returns the schedule and its peak target [kW]."""
    planner = planners.get(n_w)
    if planner is None or not warm:
        grid = replace(ac.grid_context(ref_u), limits=lim_w, uncontrolled=ref_w)
        planner = planners[n_w] = Planner(fw, grid, obj)
    else:
        planner.objective = obj
        planner.update(fw, ref_w, limits=lim_w)
    planner.lp.set_col_bounds(np.array([planner.lay.z]),
                              np.array([max(floor_kw, target_floor_kw)]), np.array([INF]))
    x = planner.solve_linear()
    return planner.schedule(), float(x[planner.lay.z])


def _correct(excess_kw: float, ch: np.ndarray, dis: np.ndarray, e_kwh: np.ndarray, a,
             dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Real-time battery correction of one interval: when the metered head import would
    exceed the plan's peak target by ``excess_kw`` > 0, charge less and discharge more
    (shared by headroom, within power and energy); when it is below the target, give
    back planned discharge (never beyond it) to keep the energy for later. (Charging into
    the headroom below a forecast-based target was tried and removed: with an
    over-forecast the target sits above the actual peak and charging made a new one.)"""
    if excess_kw > 0:
        cut = np.minimum(ch, excess_kw * ch / max(ch.sum(), 1e-12))
        ch = ch - cut
        left = excess_kw - cut.sum()
        room = np.minimum(a.bat_p_max_kw - dis,
                          np.maximum((e_kwh - a.bat_e_min_kwh) * a.bat_eta_dis / dt - dis, 0))
        room = np.maximum(room, 0.0)
        if left > 0 and room.sum() > 0:
            dis = dis + room * min(1.0, left / room.sum())
    elif excess_kw < 0 and dis.sum() > 0:
        give = min(-excess_kw, dis.sum())
        dis = dis - dis * (give / dis.sum())
    return ch, dis


def _hold_export(short_kw: float, ch: np.ndarray, dis: np.ndarray, pv: np.ndarray,
                 e_kwh: np.ndarray, a, dt: float, policy: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real-time hold of the export limit in one interval: the metered head import would
    be ``short_kw`` > 0 below the least the limit allows (PV above its forecast, a plan
    made on another forecast). Discharge less, then charge more (shared by headroom,
    within power and energy), then curtail PV by the plan's policy: the same share of
    every PV's output ("equal_proportional"), kW in proportion to inverter kVA
    ("proportional_to_capacity", each at most its output; what one cannot give goes to
    the others in the same proportion), else in proportion to output."""
    give = min(short_kw, dis.sum())
    if give > 0:
        dis = dis - dis * (give / dis.sum())
        short_kw -= give
    room = np.maximum(_charge_max(a, e_kwh, dt) - ch, 0.0)
    if short_kw > 0 and room.sum() > 0:
        add = room * min(1.0, short_kw / room.sum())
        ch, short_kw = ch + add, short_kw - add.sum()
    if short_kw <= 0 or pv.sum() <= 0:
        return ch, dis, pv
    cut = min(short_kw, pv.sum())
    if policy == "proportional_to_capacity":
        kva = np.where(pv > 0, a.pv_s_kva, 0.0)
        take = np.zeros_like(pv)
        while cut - take.sum() > 1e-9 and (kva > 0).any():  # water-fill by kVA
            step = (cut - take.sum()) * kva / kva.sum()
            step = np.minimum(step, pv - take)
            take += step
            kva = np.where(pv - take > 1e-12, kva, 0.0)
        return ch, dis, pv - take
    return ch, dis, pv * (1.0 - cut / pv.sum())


def _charge_max(a, e_kwh: np.ndarray, dt: float) -> np.ndarray:
    """Most each battery can charge in one interval [kW]: its power, and the energy room
    above ``e_kwh`` through its charging efficiency."""
    return np.minimum(a.bat_p_max_kw, np.maximum(a.bat_e_max_kwh - e_kwh, 0.0)
                      / (a.bat_eta_ch * dt))


def _ranges(a, e_kwh: np.ndarray, ev_kw: np.ndarray, plugged: np.ndarray,
            need_kwh: np.ndarray, steps_left: np.ndarray, dt: float, battery: bool
            ) -> DerRanges:
    """What the real-time correction may do with batteries and EVs in one interval:
    batteries within power and the energy they hold now; a plugged-in EV's charging down
    by what its session can make up at full rate in ``steps_left`` intervals (those from
    the next re-plan on: within a block the executed charging never exceeds the plan's),
    up to its rate or what it still needs."""
    bat_max = _charge_max(a, e_kwh, dt)
    bat_min = -np.minimum(a.bat_p_max_kw, np.maximum(e_kwh - a.bat_e_min_kwh, 0.0)
                          * a.bat_eta_dis / dt)
    eta = a.ev_eta
    later_kwh = np.maximum(steps_left, 0) * a.ev_p_max_kw * eta * dt
    after_kwh = np.maximum(need_kwh - ev_kw * eta * dt, 0.0)  # still needed after this one
    room_kw = np.maximum(later_kwh - after_kwh, 0.0) / (eta * dt)
    ev_min = np.where(plugged, np.maximum(ev_kw - room_kw, 0.0), ev_kw)
    ev_max = np.where(plugged, np.maximum(np.minimum(a.ev_p_max_kw, np.maximum(need_kwh, 0.0)
                                                      / (eta * dt)), ev_kw), ev_kw)
    return DerRanges(bat_min, bat_max, ev_min, ev_max, battery)


def _defer_ev(excess_kw: float, ev_kw: np.ndarray, need_kwh: np.ndarray, steps_left: np.ndarray,
              p_max_kw: np.ndarray, eta: np.ndarray, dt: float) -> np.ndarray:
    """Real-time EV deferral of one interval: when the metered head import would exceed
    the plan's peak target by ``excess_kw`` > 0, reduce the charging of sessions that can
    still finish by departure at full rate afterwards (their laxity), most lax first in
    proportion to what each can give. Never defers energy a session could no longer get."""
    if excess_kw <= 0:
        return ev_kw
    later_kwh = np.maximum(steps_left, 0) * p_max_kw * eta * dt   # reachable after this one
    must_kw = np.clip((need_kwh - later_kwh) / (eta * dt), 0.0, None)
    give = np.maximum(ev_kw - must_kw, 0.0)
    if give.sum() <= 0:
        return ev_kw
    return ev_kw - give * min(1.0, excess_kw / give.sum())


def _counts(ac: ACNetwork, res, n: int) -> dict[str, int]:
    """Violation counts (DESIGN.md, pre-existing held to the base case) of ``res`` over
    its first ``n`` intervals."""
    ix, b = res.index, ac.base_result
    rep = detect_violations(
        res.t[:n], res.dt_h, v_pu=res.v_pu[:n], node_names=ix.node_bus,
        node_phases=ix.node_phase, loading_pct=res.loading_pct()[:n],
        branch_names=ix.branch_element, branch_phases=ix.branch_phase, limits=ac.limits,
        base_v_pu=b.v_pu[:n], base_loading_pct=b.loading_pct()[:n])
    return {k: int(v) for k, v in rep.counts.items()}
