"""Constraint forecasts: forecast scenarios pushed through QSTS -> violation probabilities.

Given quantile forecasts of the load multiplier and of PV output per unit (see
:mod:`derms.analysis.constraint_scenarios`), each scenario is run through
:func:`derms.powerflow.qsts.run_qsts` with regulators and capacitors in their normal
control mode (``"static"``: they act within each step; every scenario starts from the
same tap and capacitor state). Violations follow ``derms.analysis.constraints``.

**Base case of a forecast**: the same scenario's load with the PV fleet's output at zero
(controls acting), run once per distinct load path. Element-phases already in violation
there (e.g. IEEE 123's feeder-head section above its default rating) are *pre-existing*:
they count only where the scenario is worse than its own base case (DESIGN.md). What the
forecast load alone breaks is listed separately (``ConstraintForecast.pre_existing``: its
probability over the load paths, against the plain limits): an undervoltage or an
overload at the evening peak is a constraint about to be hit too, one the PV does not
cause.

**Probability** of a violation at (element, phase, interval) = total weight of the
scenarios in which it is in violation. **Expected excess** = weighted mean, over those
scenarios, of the distance beyond the limit (pu for voltage, percentage points of the
normal rating for thermal; the limit is the base-case value for pre-existing ones), i.e.
conditional on the violation. Hourly probability of a kind = total weight of the
scenarios with at least one violation of that kind in that hour.

**Margin** of an element-phase and interval = its signed distance beyond the violation
threshold (limit + tolerance; base-case value + tolerance for a pre-existing one), in the
kind's excess unit: > 0 exactly where a violation is counted, <= 0 is headroom. The
hourly worst margin (``margins``) is the largest over element-phases, intervals of the
hour and scenarios; for a one-level forecast of the actuals it is the truth's distance
from the threshold, which tells a knife-edge hour (|margin| of a few 1e-4 pu, decided
by sub-millivolt differences and regulator tap timing) from a clear one.
:func:`score_hours` scores predicted hours against such a truth.

Power convention: load multipliers scale each load's base kW/kvar (import positive); PV
output is generation (>= 0) per unit of each system's Pmpp.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from derms.analysis.constraint_scenarios import ScenarioSet, build_scenarios
from derms.analysis.constraints import Limits, detect_violations
from derms.errors import InputError
from derms.powerflow.collect import build_index
from derms.powerflow.control_state import capture_control_state, restore_control_state
from derms.powerflow.engine import ControlMode, OpenDSSEngine
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import QSTSResult, run_qsts

KINDS = ("overvoltage", "undervoltage", "thermal", "reverse_power")
EXCESS_UNIT = {"overvoltage": "pu", "undervoltage": "pu", "thermal": "pct_points",
               "reverse_power": "kW"}
VIOLATION_FORECAST_COLUMNS = [
    "kind", "element", "phase", "start", "end", "probability", "expected_excess",
    "excess_unit", "worst_value", "limit", "pre_existing",
]
DEFAULT_HORIZON = pd.Timedelta("24h")
MARGIN_COLUMNS = ["hour", "kind", "worst_margin", "margin_unit"]
HOURLY_COLUMNS = ["hour", "kind", "probability", "n_elements", "worst_element", "worst_phase",
                  "worst_probability", "expected_excess"]


@dataclass(frozen=True)
class ConstraintForecast:
    """Result of :func:`forecast_constraints`.

    ``violations``: one row per (kind, element, phase, interval) with probability > 0
    (``start``/``end`` UTC, ``[start, end)``). ``hourly``: one row per (hour, kind) over
    the horizon. ``scenarios``: the scenario table; ``threshold``: the probability at or
    above which an hour counts as predicted. ``margins``: one row per (hour, kind), the
    worst margin (module docstring; > 0 where some scenario violates).
    """

    violations: pd.DataFrame
    hourly: pd.DataFrame
    scenarios: pd.DataFrame
    t: pd.DatetimeIndex
    threshold: float
    runtime_s: float
    n_not_converged: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    margins: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=MARGIN_COLUMNS))
    # violations of the base case itself (forecast load, PV at zero), same columns as
    # ``violations`` with pre_existing True: what the load alone is forecast to break
    pre_existing: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=VIOLATION_FORECAST_COLUMNS))
    # the PV systems the scenarios drive (when the caller placed them): one row each
    pv_systems: pd.DataFrame | None = None

    def predicted_hours(self, kind: str = "overvoltage") -> pd.DatetimeIndex:
        """Hours (UTC starts) whose probability of ``kind`` is >= ``threshold``."""
        h = self.hourly[(self.hourly["kind"] == kind)
                        & (self.hourly["probability"] >= self.threshold)]
        return pd.DatetimeIndex(h["hour"])

    def hour_margins(self, kind: str = "overvoltage") -> pd.Series:
        """Worst margin of ``kind`` per hour (UTC starts), see :attr:`margins`."""
        m = self.margins[self.margins["kind"] == kind]
        return pd.Series(m["worst_margin"].to_numpy(float), index=pd.DatetimeIndex(m["hour"]),
                         name=f"{kind}_worst_margin")


def _masks(res: QSTSResult, base: QSTSResult, limits: Limits
           ) -> dict[str, tuple[np.ndarray, ...]]:
    """Per kind: (mask (T, N) counted violations, excess (T, N), value (T, N), limit (T, N),
    pre-existing (T, N), margin (T, N)) from :func:`detect_violations`' events, expanded
    back to intervals; margin as in the module docstring (-inf where not checked)."""
    ix = res.index
    head, base_head = res.head_p_kw.sum(axis=1), base.head_p_kw.sum(axis=1)
    loading, base_loading = np.nan_to_num(res.loading_pct()), np.nan_to_num(base.loading_pct())
    rep = detect_violations(
        res.t, res.dt_h, v_pu=res.v_pu, node_names=ix.node_bus, node_phases=ix.node_phase,
        loading_pct=loading, branch_names=ix.branch_element, branch_phases=ix.branch_phase,
        head_p_kw=head, limits=limits, base_v_pu=base.v_pu, base_loading_pct=base_loading,
        base_head_p_kw=base_head)
    sets, live = _kind_sets(res, base, limits)
    out = {}
    for kind, (val, bval, keys, sign, lim, tol) in sets.items():
        mask, pre = _event_masks(rep.events, kind, keys, res.t, val.shape)
        limit = np.where(pre, bval, lim)
        # a pre-existing violation counts only where it is worse than its base case
        mask &= ~pre | (sign * (val - bval) > tol)
        # distance beyond the threshold; pre-existing in the base case: beyond base + tol
        base_bad = sign * (bval - lim) > tol
        if kind == "undervoltage":
            base_bad &= bval >= limits.energised_min_pu
        margin = np.where(base_bad, sign * (val - bval), sign * (val - lim)) - tol
        if kind in ("overvoltage", "undervoltage"):
            margin = np.where(live, margin, -np.inf)
        out[kind] = (mask, np.where(mask, sign * (val - limit), 0.0), val, limit, pre, margin)
    return out


def _base_masks(base: QSTSResult, limits: Limits) -> dict[str, tuple[np.ndarray, ...]]:
    """Per kind: (mask (T, N), excess (T, N), value (T, N), limit) of the base case's own
    violations against the plain limits (no base of its own)."""
    ix = base.index
    loading = np.nan_to_num(base.loading_pct())
    rep = detect_violations(
        base.t, base.dt_h, v_pu=base.v_pu, node_names=ix.node_bus, node_phases=ix.node_phase,
        loading_pct=loading, branch_names=ix.branch_element, branch_phases=ix.branch_phase,
        head_p_kw=base.head_p_kw.sum(axis=1), limits=limits)
    sets, _ = _kind_sets(base, base, limits)
    out = {}
    for kind, (val, _b, keys, sign, lim, _tol) in sets.items():
        mask, _ = _event_masks(rep.events, kind, keys, base.t, val.shape)
        out[kind] = (mask, np.where(mask, sign * (val - lim), 0.0), val, lim)
    return out


def _kind_sets(res: QSTSResult, base: QSTSResult, limits: Limits):
    """Per kind: (value, base value, keys, sign, limit, tolerance); and the live mask."""
    ix = res.index
    head, base_head = res.head_p_kw.sum(axis=1), base.head_p_kw.sum(axis=1)
    loading, base_loading = np.nan_to_num(res.loading_pct()), np.nan_to_num(base.loading_pct())
    sets = {
        "overvoltage": (res.v_pu, base.v_pu, _keys(ix.node_bus, ix.node_phase), +1,
                        limits.v_max_pu, limits.v_tol_pu),
        "undervoltage": (res.v_pu, base.v_pu, _keys(ix.node_bus, ix.node_phase), -1,
                         limits.v_min_pu, limits.v_tol_pu),
        "thermal": (loading, base_loading, _keys(ix.branch_element, ix.branch_phase), +1,
                    limits.thermal_pct, limits.thermal_tol_pct),
    }
    if limits.reverse_power_kw is not None:
        sets["reverse_power"] = (head[:, None], base_head[:, None],
                                 _keys(np.array(["feeder_head"], dtype=object), np.array([0])),
                                 -1, -limits.reverse_power_kw, 1e-6)
    live = ((res.v_pu >= limits.energised_min_pu)
            & (np.asarray(ix.node_phase) <= 3)[None, :])
    return sets, live


def _event_masks(ev: pd.DataFrame, kind: str, keys: pd.MultiIndex, t: pd.DatetimeIndex,
                 shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) masks of ``kind``'s violation events and of those pre-existing."""
    mask = np.zeros(shape, dtype=bool)
    pre = np.zeros(shape, dtype=bool)
    e = ev[ev["kind"] == kind] if len(ev) else ev
    if len(e):
        t_pos = pd.Series(np.arange(len(t)), index=t)
        col = keys.get_indexer(pd.MultiIndex.from_arrays(
            [e["element"].to_numpy(), e["phase"].to_numpy().astype(int)]))
        s = t_pos.reindex(pd.DatetimeIndex(e["start"])).to_numpy()
        n = e["n_steps"].to_numpy(dtype=int)
        rows = np.repeat(s, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        cols = np.repeat(col, n)
        mask[rows, cols] = True
        pre[rows, cols] = np.repeat(e["pre_existing"].to_numpy(dtype=bool), n)
    return mask, pre


def _keys(names: np.ndarray, phases: np.ndarray) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([np.asarray(names, dtype=object),
                                      np.asarray(phases, dtype=int)])


def _profiles(sc: ScenarioSet, s: int, load_elements: Sequence[tuple[str, int]],
              pv_elements: Sequence[str], pv_on: bool) -> Profiles:
    """One scenario as QSTS profiles: load columns by group, PV columns (or zero)."""
    names = [e for e, _ in load_elements] + list(pv_elements)
    gi = np.array([g for _, g in load_elements], dtype=int)
    load = sc.load_mult[s][:, gi]
    pv = np.repeat((sc.pv_pu[s] if pv_on else np.zeros(len(sc.t)))[:, None],
                   len(pv_elements), axis=1)
    step = sc.t[1] - sc.t[0] if len(sc.t) > 1 else pd.Timedelta(hours=1)
    return Profiles(start=sc.t[0].to_pydatetime(), step=step.to_pytimedelta(),
                    elements=tuple(names), p_mult=np.column_stack([load, pv]))


def forecast_constraints(
    engine: OpenDSSEngine,
    load_mult_q: pd.DataFrame | Mapping[str, pd.DataFrame],
    pv_pu_q: pd.DataFrame,
    pv_elements: Sequence[str],
    *,
    load_groups: Mapping[str, str] | None = None,
    limits: Limits | None = None,
    method: str = "grid",
    threshold: float = 0.5,
    control_mode: ControlMode = "static",
    **scenario_kw,
) -> ConstraintForecast:
    """Forecast voltage/thermal (and reverse-power) violations over a horizon.

    Parameters
    ----------
    engine:
        Compiled feeder whose PV systems (``pv_elements``, "pvsystem.x") already exist;
        their irradiance multiplier is the PV forecast [pu of Pmpp].
    load_mult_q:
        Quantiles (columns ``p10, p50, p90``; UTC index of interval starts) of the load
        multiplier [-] applied to each enabled load's base kW and kvar; or ``{group:
        frame}`` with ``load_groups`` mapping "load.x" -> group (loads without a group
        follow the first group).
    pv_pu_q:
        Quantiles of PV output [pu of Pmpp], same index.
    method, scenario_kw:
        Scenario construction ("grid" or "copula", see
        :mod:`derms.analysis.constraint_scenarios`).
    threshold:
        Probability at or above which an hour is predicted to be in violation.
    """
    t0 = time.perf_counter()
    limits = limits or Limits()
    if not 0 < threshold <= 1:
        raise InputError(f"threshold must be in (0, 1], got {threshold}")
    sc = build_scenarios(load_mult_q, pv_pu_q, method=method, **scenario_kw)
    known = {n.lower() for n in engine.circuit.AllElementNames}
    missing = [p for p in pv_elements if p.lower() not in known]
    if missing:
        raise InputError(f"PV system {missing[0]} is not in the feeder ({len(missing)} missing)")
    loads = [n.lower() for n in engine.circuit.Loads.AllNames if n.lower() != "none"]
    group_pos = {g: i for i, g in enumerate(sc.groups)}
    lg = load_groups or {}
    bad = [g for g in lg.values() if g not in group_pos]
    if bad:
        raise InputError(f"load group {bad[0]!r} has no load forecast "
                         f"(forecast groups: {', '.join(sc.groups)})")
    load_elements = [(f"load.{n}", group_pos.get(lg.get(f"load.{n}", sc.groups[0]), 0))
                     for n in loads]
    pv_elements = [p.lower() for p in pv_elements]
    state = capture_control_state(engine)
    index = build_index(engine)

    def run(s: int, pv_on: bool) -> QSTSResult:
        restore_control_state(engine, state)
        return run_qsts(engine, _profiles(sc, s, load_elements, pv_elements, pv_on),
                        control_mode=control_mode, index=index)

    first_of_load = {int(lid): int(np.argmax(sc.load_id == lid)) for lid in
                     np.unique(sc.load_id)}
    bases = {lid: run(s, False) for lid, s in first_of_load.items()}
    T, w = len(sc.t), sc.weight
    hour = sc.t.floor("h")
    h_start = np.flatnonzero(np.r_[True, hour[1:] != hour[:-1]])
    acc: dict[str, dict[str, np.ndarray]] = {}
    n_bad = sum(int((~b.converged).sum()) for b in bases.values())
    result = None
    for s in range(sc.n_scenarios):
        result = run(s, True)
        n_bad += int((~result.converged).sum())
        for kind, (mask, excess, val, limit, pre, margin) in _masks(
                result, bases[int(sc.load_id[s])], limits).items():
            a = acc.setdefault(kind, {
                "p": np.zeros(mask.shape), "ex": np.zeros(mask.shape),
                "worst": np.full(mask.shape, np.nan), "limit": np.zeros(mask.shape),
                "pre": np.zeros(mask.shape, dtype=bool), "hour_any": np.zeros(len(h_start)),
                "hour_el": np.zeros((len(h_start), mask.shape[1])),
                "margin": np.full(len(h_start), -np.inf)})
            a["p"] += w[s] * mask
            a["ex"] += w[s] * excess
            sign = -1.0 if kind in ("undervoltage", "reverse_power") else 1.0
            cand = np.where(mask, sign * val, np.nan)
            a["worst"] = np.fmax(a["worst"], cand)
            a["limit"] = np.where(mask, limit, a["limit"])
            a["pre"] |= mask & pre
            by_hour = np.logical_or.reduceat(mask, h_start, axis=0)  # (H, N)
            a["hour_el"] += w[s] * by_hour
            a["hour_any"] += w[s] * by_hour.any(axis=1)
            if margin.shape[1]:
                a["margin"] = np.maximum(a["margin"], np.maximum.reduceat(
                    margin.max(axis=1), h_start))
    assert result is not None
    # what the forecast load alone breaks (the base case's own violations), weighted over
    # the scenarios that share each load path
    pre_acc: dict[str, dict[str, np.ndarray]] = {}
    for lid, b in bases.items():
        wl = float(w[sc.load_id == lid].sum())
        for kind, (mask, excess, val, lim) in _base_masks(b, limits).items():
            a = pre_acc.setdefault(kind, {
                "p": np.zeros(mask.shape), "ex": np.zeros(mask.shape),
                "worst": np.full(mask.shape, np.nan), "limit": np.zeros(mask.shape),
                "pre": np.ones(mask.shape, dtype=bool)})
            a["p"] += wl * mask
            a["ex"] += wl * excess
            sign = -1.0 if kind in ("undervoltage", "reverse_power") else 1.0
            a["worst"] = np.fmax(a["worst"], np.where(mask, sign * val, np.nan))
            a["limit"] = np.where(mask, lim, a["limit"])
    ix = result.index
    names = {"overvoltage": (ix.node_bus, ix.node_phase), "undervoltage": (ix.node_bus,
             ix.node_phase), "thermal": (ix.branch_element, ix.branch_phase),
             "reverse_power": (np.array(["feeder_head"], dtype=object), np.array([0]))}
    step = sc.t[1] - sc.t[0] if T > 1 else pd.Timedelta(hours=1)
    violations = _violation_table(acc, names, sc.t, step)
    hourly = _hourly_table(acc, names, hour[h_start], h_start)
    margins = pd.concat([pd.DataFrame({"hour": hour[h_start], "kind": kind,
                                       "worst_margin": acc[kind]["margin"],
                                       "margin_unit": EXCESS_UNIT[kind]})
                         for kind in KINDS if kind in acc], ignore_index=True)
    pre_existing = _violation_table(pre_acc, names, sc.t, step)
    notes = (("base case: each scenario's load with the PV fleet at zero output; what it "
              "breaks by itself is listed as pre-existing (pre_existing.csv)"),
             (f"scenarios: {method}, {sc.n_scenarios}; hour predicted when probability >= "
              f"{threshold:g}"))
    return ConstraintForecast(violations=violations, hourly=hourly, scenarios=sc.table(),
                              t=sc.t, threshold=threshold,
                              runtime_s=time.perf_counter() - t0, n_not_converged=n_bad,
                              notes=notes, margins=margins, pre_existing=pre_existing)


def _violation_table(acc, names, t: pd.DatetimeIndex, step: pd.Timedelta) -> pd.DataFrame:
    frames = []
    for kind, a in acc.items():
        r, c = np.nonzero(a["p"] > 0)
        if not len(r):
            continue
        p = a["p"][r, c]
        sign = -1.0 if kind in ("undervoltage", "reverse_power") else 1.0
        el, ph = names[kind]
        frames.append(pd.DataFrame({
            "kind": kind, "element": np.asarray(el, dtype=object)[c],
            "phase": np.asarray(ph)[c], "start": t[r], "end": t[r] + step,
            "probability": p, "expected_excess": a["ex"][r, c] / p,
            "excess_unit": EXCESS_UNIT[kind], "worst_value": sign * a["worst"][r, c],
            "limit": a["limit"][r, c], "pre_existing": a["pre"][r, c],
        }))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in VIOLATION_FORECAST_COLUMNS})
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["start", "kind", "probability"], ascending=[True, True, False],
                           ignore_index=True)


def _hourly_table(acc, names, hours: pd.DatetimeIndex, h_start: np.ndarray) -> pd.DataFrame:
    """Per (hour, kind): probability of any violation, and the element most likely in one
    (its largest conditional expected excess within the hour)."""
    rows = []
    for kind in KINDS:
        if kind not in acc:
            continue
        a = acc[kind]
        el, ph = names[kind]
        H = len(h_start)
        best = a["hour_el"].argmax(axis=1)
        best_p = a["hour_el"][np.arange(H), best]
        ex = np.divide(a["ex"], a["p"], out=np.zeros_like(a["ex"]), where=a["p"] > 0)
        ex_h = np.maximum.reduceat(ex, h_start, axis=0)[np.arange(H), best]
        rows.append(pd.DataFrame({
            "hour": hours, "kind": kind, "probability": a["hour_any"],
            "n_elements": (a["hour_el"] > 0).sum(axis=1),
            "worst_element": np.where(best_p > 0, np.asarray(el, dtype=object)[best], ""),
            "worst_phase": np.where(best_p > 0, np.asarray(ph)[best], 0),
            "worst_probability": best_p,
            "expected_excess": np.where(best_p > 0, ex_h, 0.0),
        }))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=HOURLY_COLUMNS)


@dataclass(frozen=True)
class HourScore:
    """Predicted hours against true hours (see :func:`score_hours`)."""

    tp: int
    fp: int
    fn: int
    marginal: pd.DatetimeIndex   # hours left out of the score: truth within the band
    band: float

    @property
    def precision(self) -> float:
        n = self.tp + self.fp
        return self.tp / n if n else float("nan")

    @property
    def recall(self) -> float:
        n = self.tp + self.fn
        return self.tp / n if n else float("nan")


def score_hours(predicted: pd.DatetimeIndex, truth_margin: pd.Series, band: float = 0.0
                ) -> HourScore:
    """Precision/recall of ``predicted`` hours against the truth's hourly worst margin.

    ``truth_margin``: hour -> worst margin of the kind in the truth run
    (:meth:`ConstraintForecast.hour_margins` of a one-level forecast of the actuals); an
    hour is truly in violation when its margin > 0. With ``band`` > 0, hours whose truth
    margin lies within ``[-band, +band]`` are *marginal*: a violation or none is decided
    there by less than ``band`` (e.g. 0.001 pu, the voltage tolerance), so they are left
    out of both precision and recall and listed in ``marginal``. ``band=0`` is the plain
    definition. Micro-average several days by summing the counts.
    """
    if band < 0:
        raise InputError(f"band must be >= 0, got {band}")
    m = truth_margin.astype(float)
    marginal = m.index[(m.abs() <= band) & (band > 0)]
    scored = m.drop(marginal)
    true = pd.DatetimeIndex(scored.index[scored.to_numpy() > 0])
    pred = pd.DatetimeIndex(predicted).difference(marginal)
    tp = len(true.intersection(pred))
    return HourScore(tp=tp, fp=len(pred) - tp, fn=len(true) - tp,
                     marginal=pd.DatetimeIndex(marginal), band=band)


def normalise_histories(load_history: pd.Series, pv_history: pd.Series,
                        pv_capacity: float | None = None,
                        before: pd.Timestamp | None = None) -> tuple[pd.Series, pd.Series]:
    """Load history -> multiplier of each load's base (peak) kW: ``value / max``; PV
    history -> per unit of capacity: ``value / pv_capacity`` (default: the 99.9th
    percentile of the history, robust to spikes). Units of the inputs cancel.

    ``before`` (tz-aware): the peak and the default capacity come from the values before
    it only (a forecast at that origin must not see later data)."""
    out = []
    for name, s in (("load history", load_history), ("pv history", pv_history)):
        if not isinstance(s, pd.Series) or len(s) < 2:
            raise InputError(f"{name}: expected a time series with at least 2 values")
        if not isinstance(s.index, pd.DatetimeIndex) or s.index.tz is None:
            raise InputError(f"{name}: index must be timezone-aware timestamps")
        s = s.astype(float)
        inf = np.isinf(s.to_numpy())
        if inf.any():
            raise InputError(f"{name}: value {s.iloc[int(np.flatnonzero(inf)[0])]} at "
                             f"{s.index[int(np.flatnonzero(inf)[0])].isoformat()} is not finite")
        out.append(s.sort_index().tz_convert("UTC"))
    load, pv = out
    if before is not None:
        load_seen, pv_seen = load[load.index < before], pv[pv.index < before]
        for name, s in (("load history", load_seen), ("pv history", pv_seen)):
            if s.dropna().empty:
                raise InputError(f"{name}: no values before the origin {before.isoformat()} "
                                 "(a forecast uses only data before its origin)")
    else:
        load_seen, pv_seen = load, pv
    peak = float(load_seen.max())
    if not np.isfinite(peak) or peak <= 0:
        raise InputError(f"load history: its peak must be positive, got {peak:g}")
    cap = float(pv_seen.quantile(0.999)) if pv_capacity is None else float(pv_capacity)
    if pv_capacity is None and not (np.isfinite(cap) and cap > 0):  # (it said "pv capacity
        # must be positive, got 0" when none was given: the API's message; the CLI's own)
        raise InputError("pv history: no PV output above 0 before the origin, so no "
                         "capacity to scale by; give the PV capacity")
    if not np.isfinite(cap) or cap <= 0:
        raise InputError(f"pv capacity must be positive, got {cap:g}")
    return load / peak, (pv / cap).clip(lower=0.0)


def forecast_constraints_from_history(
    engine: OpenDSSEngine,
    load_history: pd.Series,
    pv_history: pd.Series,
    pv_elements: Sequence[str],
    *,
    origin: pd.Timestamp,
    horizon: pd.Timedelta = DEFAULT_HORIZON,
    pv_capacity: float | None = None,
    latitude: float | None = None,
    longitude: float | None = None,
    tz: str = "UTC",
    **kw,
) -> ConstraintForecast:
    """Quantile forecasts of load and PV from their histories (data before ``origin``
    only, :func:`derms.forecast.forecast_quantiles`), then :func:`forecast_constraints`.

    ``load_history`` in any unit of power (import positive), ``pv_history`` PV output
    (generation >= 0) in any unit; both UTC-indexed at the same step (the step of the
    QSTS). ``tz`` is the local zone for calendar features. ``kw`` go to
    :func:`forecast_constraints` (limits, method, threshold, ...). This is the function
    the API calls.
    """
    import warnings

    from derms.forecast import forecast_quantiles
    from derms.forecast.api import ForecastWarning

    origin = pd.Timestamp(origin)
    if origin.tzinfo is None:
        raise InputError(f"origin {origin} must be timezone-aware")
    origin = origin.tz_convert("UTC")
    load, pv = normalise_histories(load_history, pv_history, pv_capacity, before=origin)
    heard: list[str] = []
    for name, hist in (("load", load), ("pv", pv)):
        with warnings.catch_warnings(record=True) as got:  # the forecasters' warnings
            # (gaps, duplicates, short history) are the user's to see: kept as notes
            warnings.simplefilter("always")
            if name == "load":
                lq = forecast_quantiles(hist[hist.index < origin], kind="load",
                                        origin=origin, horizon=horizon, tz=tz)
            else:
                pq = forecast_quantiles(hist[hist.index < origin], kind="pv", origin=origin,
                                        horizon=horizon, latitude=latitude,
                                        longitude=longitude, capacity=1.0, tz=tz)
        for w in got:
            if issubclass(w.category, ForecastWarning):
                text = f"{name} history: {w.message}"
                if text not in heard:
                    heard.append(text)
    if not lq.index.equals(pq.index):
        raise InputError(f"load and pv histories have different steps or ranges: forecasts "
                         f"of {len(lq)} and {len(pq)} intervals; resample them to one step")
    fc = forecast_constraints(engine, lq.clip(lower=0.0), pq.clip(lower=0.0), pv_elements,
                              **kw)
    return replace(fc, notes=(*heard, *fc.notes)) if heard else fc
