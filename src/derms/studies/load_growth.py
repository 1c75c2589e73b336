"""Load-growth planning study: year-by-year peaks per feeder, transformer and line, and the
year each limit is first exceeded, for a :class:`GrowthScenario` of EV, heat-pump and PV
adoption, organic growth and new connections.

Method (per year index ``y = 0..years``, 0 = base year):

1. *Screen* (vectorised, every interval of the representative year): each customer's net kW
   (base shape x growth + EV + heat pump - PV, import positive) is summed per load, then per
   bus, then up the feeder's radial tree (breadth-first from the head bus; open switches and
   disabled lines are not edges). An element's screened flow is the net kW of every load
   below it (losses excluded); banks of transformers between the same buses are one element.
2. *Candidates*: the ``n_head`` highest and lowest head intervals, and the peak (or, for an
   element whose export exceeds its import, the minimum) interval of the ``n_elements``
   elements with the highest screened kW / kVA-rating ratio plus every element screened above
   ``near_limit_ratio`` of its rating (at most ``max_rows_per_year`` intervals).
3. *AC*: the candidate intervals of all years are solved in one QSTS pass of the OpenDSS
   engine (regulators and capacitors act, ``control_mode``). Each candidate is reached
   through the ``warmup_h`` hours before it in its own year, starting from the base case's
   solved taps and capacitor states: a regulator settles anywhere inside its band, so its
   taps depend on the loads before; chained through unrelated intervals of other years,
   IEEE 34's bus 890 moved by up to 0.03 pu with their order and a pre-existing
   undervoltage was said to worsen in a year where it improved; a lone snapshot from the
   base taps put IEEE 13's worst transformer 1.3 % below a chained full-year QSTS, and
   3 h of warm-up still left IEEE 34's bus 890 0.005 pu low; from 6 h on both equal the
   chained year. The warm-up solves one row per hour (at most 6 more solves per
   candidate, fewer where candidates' windows overlap). Head kW, loadings (% of the engine's normal rating, the thermal-limit
   basis) and voltages come from the candidates' solves.

Limits follow DESIGN.md: violations with tolerance 0.001 pu / 1 %; a limit already broken in
the base year is *pre-existing*, held to its base-year value, and is first exceeded only in a
year where it gets worse. Reverse power is judged at the head (AC) and at each transformer
(screened net kW below ``-reverse_power_kw``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order

from derms.analysis.constraints import Limits
from derms.errors import InputError
from derms.grid.model import FeederModel
from derms.grid.opendss_import import read_feeder
from derms.powerflow.collect import NetworkIndex, build_index
from derms.powerflow.control_state import capture_control_state, regulated_transformers
from derms.powerflow.engine import ControlMode, OpenDSSEngine, SolveSettings
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import QSTSResult, run_qsts
from derms.studies.growth_profiles import (
    Adoption,
    GrowthInputs,
    GrowthScenario,
    NewConnection,
    prepare,
)

__all__ = [
    "Adoption",
    "GrowthInputs",
    "GrowthNetwork",
    "GrowthResult",
    "GrowthScenario",
    "NewConnection",
    "QSTSResult",
    "ScreenSettings",
    "add_new_connections",
    "candidate_profiles",
    "growth_network",
    "prepare",
    "run_load_growth",
    "screen_year",
    "year_profiles",
]

ProgressFn = Callable[[str, int, int], None]  # (stage "screen" | "ac", done, total)
_CHUNK_CELLS = 15_000_000  # buses x intervals per screening chunk (float64: 120 MB)


@dataclass(frozen=True)
class ScreenSettings:
    """How many intervals per year go to the AC solve (see module docstring)."""

    n_head: int = 3
    n_elements: int = 20
    near_limit_ratio: float = 0.9
    max_rows_per_year: int = 200
    warmup_h: float = 6.0  # hours of the year's own loads solved (hourly) before each candidate


def warmup_runs(rows: np.ndarray, n_warm: int, stride: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows to solve for candidate ``rows`` with ``n_warm`` warm-up rows each, ``stride``
    rows apart (one per hour): (solve rows ascending, restart flags where a merged
    window of overlapping candidates begins, candidate flags). Rows before 0 are dropped
    (a candidate in the year's first hours gets less warm-up)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        return rows, np.zeros(0, bool), np.zeros(0, bool)
    lo = np.maximum(rows - stride * n_warm, 0)
    new = np.r_[True, lo[1:] > rows[:-1]]          # a window not overlapping the previous
    group = np.cumsum(new) - 1
    span = rows[:, None] - stride * np.arange(n_warm, -1, -1)[None, :]
    labels = np.broadcast_to(group[:, None], span.shape)
    keep = span >= 0
    solve, first = np.unique(span[keep], return_index=True)
    g = labels[keep][first]
    start = np.r_[True, g[1:] != g[:-1]]
    return solve, start, np.isin(solve, rows)


def add_new_connections(engine: OpenDSSEngine, inputs: GrowthInputs) -> None:
    """Create the engine loads of the scenario's new connections (constant PQ)."""
    model = inputs.model
    # buses on ungrounded (3-wire) areas: a new connection there is line to line (a wye
    # one would ground the area and change its physics)
    ungrounded = {n.split(".")[0] for n, q in zip(engine.node_names(), engine.voltage_pairs(),
                                                   strict=True) if q >= 0}
    for i, nc in enumerate(inputs.scenario.new_connections):
        bus = model.bus(nc.bus)
        same = [ld for ld in model.loads if ld.bus == bus.name and ld.enabled]
        if same:
            ld = same[0]
            spec = f"{bus.name}.{'.'.join(str(n) for n in ld.nodes)}"
            phases, kv, conn = ld.phases, ld.kv, ld.conn
        else:
            ph = [n for n in bus.nodes if 1 <= n <= 3]
            if not ph:
                raise InputError(f"new connection bus {bus.name} has no phase nodes")
            phases = 3 if len(ph) == 3 else 1
            spec = bus.name if phases == 3 else f"{bus.name}.{ph[0]}"
            kv = bus.kv_base_ln * (np.sqrt(3.0) if phases == 3 else 1.0)
            conn = "wye"
            if bus.name in ungrounded and len(ph) >= 2:  # 3-wire: between phases
                conn, kv = "delta", bus.kv_base_ln * np.sqrt(3.0)
                spec = bus.name if phases == 3 else f"{bus.name}.{ph[0]}.{ph[1]}"
        pf = 1.0 if nc.profile == "pv" else nc.pf
        engine.command(f"new load.growth_{i} bus1={spec} phases={phases} kv={kv:.6g} "
                       f"kw={nc.p_kw} pf={pf} conn={conn} model=1")


@dataclass(frozen=True)
class GrowthNetwork:
    """The feeder's radial tree and the study's elements.

    ``parent``: (n_bus,) position of each bus's parent in breadth-first order from the head
    (-1 for the head); ``elements``: element, kind (transformer | line), units, child (bus
    position, -1 off the tree), rating, rating_unit, kva_nameplate, screen_kva,
    rating_is_default, phases; ``cond_element``: element row of each index branch conductor (-1 none).
    """

    bus_names: np.ndarray
    parent: np.ndarray
    elements: pd.DataFrame
    cond_element: np.ndarray
    collapse: np.ndarray  # (n_bus,) primary phase 0..2 a 1-phase transformer feeds, else -1

    def bus_pos(self, names) -> np.ndarray:
        pos = {b: i for i, b in enumerate(self.bus_names)}
        return np.array([pos.get(str(b), -1) for b in names], dtype=int)


def growth_network(model: FeederModel, index: NetworkIndex) -> GrowthNetwork:
    """Build the tree from closed, enabled lines, transformers and the engine's other
    two-terminal PD elements (series reactors), and the element table."""
    names = [b.name for b in model.buses]
    pos = {b: i for i, b in enumerate(names)}
    open_sw = {s.element for s in model.switches if not s.closed}
    banks: dict[frozenset, list] = {}
    for t in model.transformers:
        banks.setdefault(frozenset(t.buses), []).append(t)
    kv_ln = {b.name: b.kv_base_ln for b in model.buses}
    rows, edges = [], []
    for ln in model.lines:
        live = ln.enabled and ln.name not in open_sw
        rows.append({"element": ln.name, "kind": "line", "units": (ln.name,),
                     "buses": (ln.bus1, ln.bus2) if live else (), "rating": ln.norm_amps,
                     "rating_unit": "A", "kva_nameplate": np.nan,
                     "screen_kva": ln.phases * kv_ln.get(ln.bus1, np.nan) * ln.norm_amps,
                     "rating_is_default": ln.rating_is_default, "phases": ln.phases})
    for units in banks.values():
        first = units[0]
        name = first.name if len(units) == 1 else "transformer." + "+".join(
            u.name.split(".", 1)[1] for u in units)
        kva = sum(u.kva for u in units)
        normal = sum(u.kva * (u.norm_amps / _rated_a(u) if _rated_a(u) > 0 else 1.1)
                     for u in units)
        rows.append({"element": name, "kind": "transformer",
                     "units": tuple(u.name for u in units), "buses": tuple(first.buses),
                     "rating": normal, "rating_unit": "kVA", "kva_nameplate": kva,
                     "screen_kva": normal, "rating_is_default": False,
                     "phases": sum(u.phases for u in units)})
    known = {u for r in rows for u in r["units"]}
    other = {(str(e), str(b1), str(b2)) for e, b1, b2 in zip(
        index.branch_element, index.branch_bus1, index.branch_bus2, strict=True)
        if str(e) not in known}  # series reactors and the like: edges without a row
    for buses in [r["buses"] for r in rows] + [(b1, b2) for _e, b1, b2 in other]:
        b = [pos[x] for x in dict.fromkeys(buses) if x in pos]
        edges += [(b[0], x) for x in b[1:]]
    n = len(names)
    e = np.array(edges, dtype=int).reshape(-1, 2)
    g = sp.csr_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    order, pred = breadth_first_order(g, pos[model.head.bus], directed=False)
    new_pos = np.full(n, -1)
    new_pos[order] = np.arange(len(order))
    parent = np.where(pred[order] >= 0, new_pos[np.maximum(pred[order], 0)], -1)
    bus_names = np.array(names, dtype=object)[order]
    child = []
    for r in rows:
        b = [pos[x] for x in dict.fromkeys(r["buses"]) if x in pos]
        kids = [new_pos[x] for x in b[1:] + b[:1] if new_pos[x] > 0
                and any(parent[new_pos[x]] == new_pos[y] for y in b if y != x)]
        child.append(kids[0] if kids else -1)
    elements = pd.DataFrame(rows).drop(columns="buses")
    elements["child"] = np.array(child, dtype=int)
    unit_row = {u: i for i, units in enumerate(elements["units"]) for u in units}
    cond = np.array([unit_row.get(str(x), -1) for x in index.branch_element], dtype=int)
    first_phase = {}
    for e, ph in zip(index.branch_element, index.branch_phase, strict=True):
        first_phase.setdefault(str(e), int(ph))
    collapse = np.full(len(bus_names), -1)
    for r, kid in zip(rows, child, strict=True):
        if kid > 0 and r["kind"] == "transformer" and r["phases"] == 1 and \
                1 <= first_phase.get(r["units"][0], 0) <= 3:
            collapse[kid] = first_phase[r["units"][0]] - 1
    return GrowthNetwork(bus_names=bus_names, parent=parent, elements=elements,
                         cond_element=cond, collapse=collapse)


def _rated_a(t) -> float:
    kv = t.kv[0] if t.phases == 1 else t.kv[0] / np.sqrt(3.0)
    return t.kva / (t.phases * kv) if kv > 0 else 0.0


@dataclass(frozen=True)
class YearScreen:
    """Screened flows of one year (import positive): head kW (T,); per bus, for the net kW of
    the subtree below it, max/argmax/min/argmin of the total, and ``ph_max``/``ph_argmax``
    (3, n_bus) of each phase."""

    head_kw: np.ndarray
    bus_max: np.ndarray
    bus_argmax: np.ndarray
    bus_min: np.ndarray
    bus_argmin: np.ndarray
    ph_max: np.ndarray
    ph_argmax: np.ndarray


def _phase_share(inputs: GrowthInputs) -> np.ndarray:
    """(3, n_ext) share of each load on phases A, B, C (equal split over its phase nodes)."""
    nodes = {ld.name: ld.nodes for ld in inputs.model.loads}
    share = np.zeros((3, len(inputs.names)))
    for j, (name, bus) in enumerate(zip(inputs.names, inputs.bus, strict=True)):
        nd = nodes.get(name)
        if nd is None:  # a new connection: like a load at its bus, else the bus's phases
            same = [ld.nodes for ld in inputs.model.loads if ld.bus == bus]
            nd = same[0] if same else inputs.model.bus(bus).nodes
        ph = [n - 1 for n in nd if 1 <= n <= 3] or [0, 1, 2]
        share[ph, j] = 1.0 / len(ph)
    return share


def screen_year(inputs: GrowthInputs, net: GrowthNetwork, year: int) -> YearScreen:
    """Vectorised screen over every interval of the year, in chunks of intervals.

    Phases: a load's kW is split equally over its phase nodes; a single-phase transformer
    passes its whole secondary subtree to its primary phase (split-phase secondaries);
    other elements keep phase labels (three-phase transformers taken as wye-wye)."""
    n_bus, T = len(net.bus_names), inputs.scenario.n_steps
    lb = net.bus_pos(inputs.bus)
    keep = lb >= 0
    m = sp.csr_matrix((np.ones(keep.sum()), (lb[keep], np.flatnonzero(keep))),
                      shape=(n_bus, len(lb)))
    share = _phase_share(inputs)
    loaded = np.zeros(n_bus, bool)
    loaded[lb[keep]] = True
    for b in range(n_bus - 1, 0, -1):  # mark buses with a load below them
        if loaded[b] and net.parent[b] >= 0:
            loaded[net.parent[b]] = True
    walk = [b for b in range(n_bus - 1, 0, -1) if loaded[b] and net.parent[b] >= 0]
    par, col = net.parent, net.collapse
    chunk = max(1, _CHUNK_CELLS // (3 * n_bus))
    head = np.empty(T)
    out = {k: np.full(n_bus, v) for k, v in (("max", -np.inf), ("min", np.inf))}
    arg = {k: np.zeros(n_bus, dtype=int) for k in ("max", "min")}
    ph_max, ph_arg = np.full((3, n_bus), -np.inf), np.zeros((3, n_bus), dtype=int)
    for s0 in range(0, T, chunk):
        rows = slice(s0, min(T, s0 + chunk))
        net_kw = inputs.net_load_kw(year, rows)
        s = np.stack([np.asarray(m @ (share[p][:, None] * net_kw)) for p in range(3)])
        for b in walk:
            if col[b] >= 0:
                s[col[b], par[b]] += s[:, b].sum(axis=0)
            else:
                s[:, par[b]] += s[:, b]
        tot = s.sum(axis=0)
        head[rows] = tot[0]
        for key, fn, argfn, better in (("max", np.max, np.argmax, np.greater),
                                       ("min", np.min, np.argmin, np.less)):
            v, a = fn(tot, axis=1), argfn(tot, axis=1) + s0
            upd = better(v, out[key])
            out[key][upd], arg[key][upd] = v[upd], a[upd]
        v, a = s.max(axis=2), s.argmax(axis=2) + s0
        upd = v > ph_max
        ph_max[upd], ph_arg[upd] = v[upd], a[upd]
    return YearScreen(head, out["max"], arg["max"], out["min"], arg["min"], ph_max, ph_arg)


def _candidates(scr: YearScreen, net: GrowthNetwork, st: ScreenSettings) -> np.ndarray:
    """Interval rows of one year to AC-solve (module docstring, step 2)."""
    h = scr.head_kw
    k = min(st.n_head, len(h))
    rows = [np.argpartition(-h, k - 1)[:k], np.argpartition(h, k - 1)[:k]]
    el = net.elements
    child = el["child"].to_numpy()
    ok = child >= 0
    c = np.where(ok, child, 0)
    mx, mn = scr.bus_max[c], scr.bus_min[c]
    worst_ph = scr.ph_max[:, c].argmax(axis=0)
    ph_kw = scr.ph_max[worst_ph, c] * el["phases"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, np.maximum(np.maximum(mx, ph_kw), -mn)
                         / el["screen_kva"].to_numpy(), -np.inf)
    ratio = np.nan_to_num(ratio, nan=-np.inf)
    at = np.where(mx >= -mn, scr.bus_argmax[c], scr.bus_argmin[c])
    order = np.argsort(-ratio, kind="stable")
    n_near = int((ratio >= st.near_limit_ratio).sum())
    pick = order[: max(st.n_elements, n_near)]
    pick = pick[np.isfinite(ratio[pick])]
    both = np.column_stack([at[pick], scr.ph_argmax[worst_ph[pick], c[pick]]]).ravel()
    extra = pd.unique(both)[: max(0, st.max_rows_per_year - 2 * k)]
    return np.unique(np.concatenate([*rows, extra]).astype(int))


@dataclass(frozen=True)
class GrowthResult:
    """Tables of a load-growth study (see :mod:`derms.reports` for their files).

    ``peaks``: year, element, kind (feeder | transformer | line), peak_kw, peak_time,
    min_kw, min_time, rating, rating_unit, kva_nameplate, loading_pct, peak_solved,
    rating_is_default. Feeder kW is the AC head import; element kW is screened (net kW of the
    loads below it); loading_pct is the largest AC phase loading over the year's solved
    intervals [% of normal rating]; ``peak_solved`` says whether the element's own screened
    peak interval was among them.
    ``first_exceeded``: element, kind, limit, year (calendar, <NA> if never), value, unit,
    limit_value, base_value, pre_existing.
    ``extremes``: per year and instant (``peak_load`` | ``min_import``: the largest and the
    smallest head import, import positive, so a negative ``min_import`` is export): time,
    head_kw, v_min_pu, v_min_bus, v_max_pu, v_max_bus, max_loading_pct,
    max_loading_element.
    """

    feeder: str
    scenario: GrowthScenario
    peaks: pd.DataFrame
    first_exceeded: pd.DataFrame
    extremes: pd.DataFrame
    runtime_s: float
    n_ac_solves: int
    n_not_converged: int
    limits: Limits
    notes: tuple[str, ...] = field(default=())


def run_load_growth(
    master: str | Path,
    scenario: GrowthScenario,
    *,
    limits: Limits | None = None,
    screen: ScreenSettings = ScreenSettings(),
    control_mode: ControlMode = "static",
    max_iterations: int = 100,
    on_progress: ProgressFn | None = None,
) -> GrowthResult:
    """Run the study on the feeder ``master`` (module docstring). ``limits`` default to ANSI
    Range A, 100 % thermal and reverse power below 0 kW."""
    t0 = time.perf_counter()
    limits = limits or Limits(reverse_power_kw=0.0)
    settings = SolveSettings(max_iterations=max_iterations, max_control_iterations=1000,
                             control_mode=control_mode)
    tick = on_progress or (lambda *_: None)
    with OpenDSSEngine(master, settings) as engine:
        model = read_feeder(engine.ctx, engine.source_master)
        engine.solve_snapshot()
        start = capture_control_state(engine, regulated_transformers(engine))
        inputs = prepare(model, scenario)
        add_new_connections(engine, inputs)
        index = build_index(engine)
        net = growth_network(model, index)
        n_years = scenario.years + 1
        screens, cands = [], []
        for y in range(n_years):
            screens.append(screen_year(inputs, net, y))
            cands.append(_candidates(screens[-1], net, screen))
            tick("screen", y + 1, n_years)
        stride = max(round(60.0 / scenario.step_min), 1)  # warm-up rows an hour apart
        n_warm = max(round(screen.warmup_h * 60.0 / (stride * scenario.step_min)), 0)
        runs = [warmup_runs(c, n_warm, stride) for c in cands]
        cands = [r[0][r[2]] for r in runs]
        profiles = candidate_profiles(inputs, [r[0] for r in runs])
        total = profiles.n_steps
        res = run_qsts(engine, profiles, control_mode=control_mode, index=index,
                       on_step=lambda k: tick("ac", k + 1, total), restart=start,
                       restart_at=np.concatenate([r[1] for r in runs]))
        res = res.take(np.flatnonzero(np.concatenate([r[2] for r in runs])))
    peaks, first, extremes = _tables(inputs, net, screens, cands, res, limits)
    notes = _notes(model, net)
    return GrowthResult(feeder=model.name, scenario=scenario, peaks=peaks,
                        first_exceeded=first, extremes=extremes,
                        runtime_s=time.perf_counter() - t0, n_ac_solves=total,
                        n_not_converged=int((~res.converged).sum()), limits=limits,
                        notes=notes)


def candidate_profiles(inputs: GrowthInputs, cands: list[np.ndarray]) -> Profiles:
    """Engine profiles whose row ``k`` is the ``k``-th candidate interval, years in order."""
    ps, qs = zip(*(inputs.multipliers(y, rows) for y, rows in enumerate(cands)), strict=True)
    sc = inputs.scenario
    return Profiles(start=inputs.profiles.times[0].to_pydatetime(),
                    step=timedelta(minutes=sc.step_min), elements=inputs.names,
                    p_mult=np.vstack(ps), q_mult=np.vstack(qs))


def year_profiles(inputs: GrowthInputs, year: int) -> Profiles:
    """Engine profiles of every interval of one year (the brute-force reference)."""
    return candidate_profiles(inputs, [np.array([], int)] * year + [
        np.arange(inputs.scenario.n_steps)])


def _notes(model: FeederModel, net: GrowthNetwork) -> tuple[str, ...]:
    el = net.elements
    out = []
    n_def = int(el["rating_is_default"].sum())
    if n_def:
        out.append(f"{n_def} lines carry OpenDSS's default rating (400 A); their loading is "
                   "against that default")
    off = int((el["child"] < 0).sum())
    if off:
        out.append(f"{off} elements are not on the radial tree from the head (open or "
                   "parallel); they have no screened kW")
    return tuple(out)



# -- result tables ---------------------------------------------------------------------------
def _group_reduce(values: np.ndarray, groups: np.ndarray, n: int, ufunc, fill: float
                  ) -> np.ndarray:
    """Reduce the columns of ``values`` (K, N) by group id (N,) into (K, n); -1 skipped."""
    sel = np.flatnonzero(groups >= 0)
    order = sel[np.argsort(groups[sel], kind="stable")]
    g = groups[order]
    out = np.full((values.shape[0], n), fill)
    if len(order) == 0:
        return out
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    out[:, g[starts]] = ufunc.reduceat(values[:, order], starts, axis=1)
    return out


def _first_exceeded(values: np.ndarray, bad, worse, worst_is_max: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``values`` (n, years + 1): first year index exceeded (-1 never), the value
    then (else the worst over the years) and whether the base year was already in violation."""
    b = bad(values)
    pre = b[:, 0]
    hit = np.where(pre[:, None], b[:, 1:] & worse(values[:, 1:], values[:, :1]), b[:, 1:])
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, -1)
    worst = np.nanmax(values, axis=1) if worst_is_max else np.nanmin(values, axis=1)
    val = np.where(first >= 0, values[np.arange(len(values)), np.maximum(first, 0)], worst)
    return first, val, pre


def _tables(inputs: GrowthInputs, net: GrowthNetwork, screens: list[YearScreen],
            cands: list[np.ndarray], res: QSTSResult, lim: Limits
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Peaks, first-exceeded and extremes tables (see :class:`GrowthResult`)."""
    sc, times, el = inputs.scenario, inputs.profiles.times, net.elements
    n_y, n_el = sc.years + 1, len(el)
    bounds = np.cumsum([0] + [len(c) for c in cands])
    # a candidate interval whose AC solve did not converge says nothing about its voltages
    # or loadings (ckt24: two such solves at 1.063 pu made 41 % of first_exceeded):
    # left out of every table (GrowthResult.n_not_converged counts them)
    conv = np.asarray(res.converged, dtype=bool)
    head = res.head_p_kw.sum(axis=1)
    head_hi = np.where(conv, head, -np.inf)
    head_lo = np.where(conv, head, np.inf)
    loading = np.nan_to_num(res.loading_pct(), nan=0.0)
    loading[~conv] = 0.0
    el_load = _group_reduce(loading, net.cond_element, n_el, np.maximum, np.nan)
    ix = res.index
    live = ((res.v_pu >= lim.energised_min_pu) & (ix.node_phase <= 3)[None, :]
            & conv[:, None])
    bus_codes, bus_names = pd.factorize(pd.Series(ix.node_bus.astype(str)))
    nb = len(bus_names)
    v_lo = _group_reduce(np.where(live, res.v_pu, np.inf), bus_codes, nb, np.minimum, np.inf)
    v_hi = _group_reduce(np.where(live, res.v_pu, -np.inf), bus_codes, nb, np.maximum, -np.inf)
    child = el["child"].to_numpy()
    c = np.maximum(child, 0)
    on = child >= 0

    def when(y: int, row: int) -> pd.Timestamp:
        return times[row] + pd.DateOffset(years=y)

    peaks, ext = [], []
    el_year = np.full((n_el, n_y), np.nan)
    el_min_kw = np.full((n_el, n_y), np.nan)
    vmin, vmax, head_min = np.full((nb, n_y), np.inf), np.full((nb, n_y), -np.inf), []
    for y, (scr, rows) in enumerate(zip(screens, cands, strict=True)):
        r = slice(bounds[y], bounds[y + 1])
        ih, il = bounds[y] + np.argmax(head_hi[r]), bounds[y] + np.argmin(head_lo[r])
        peaks.append(pd.DataFrame({
            "year": sc.start_year + y, "element": [inputs.model.name], "kind": "feeder",
            "peak_kw": head[ih], "peak_time": when(y, rows[ih - bounds[y]]),
            "min_kw": head[il], "min_time": when(y, rows[il - bounds[y]]),
            "rating": np.nan, "rating_unit": "", "kva_nameplate": np.nan,
            "loading_pct": np.nan, "peak_solved": True, "rating_is_default": False}))
        head_min.append(head[il])
        el_year[:, y] = el_load[r].max(axis=0)
        el_min_kw[:, y] = np.where(on, scr.bus_min[c], np.nan)
        vmin[:, y], vmax[:, y] = v_lo[r].min(axis=0), v_hi[r].max(axis=0)
        t_max = times[scr.bus_argmax[c]] + pd.DateOffset(years=y)
        t_min = times[scr.bus_argmin[c]] + pd.DateOffset(years=y)
        peaks.append(pd.DataFrame({
            "year": sc.start_year + y, "element": el["element"], "kind": el["kind"],
            "peak_kw": np.where(on, scr.bus_max[c], np.nan), "peak_time": t_max.where(on),
            "min_kw": el_min_kw[:, y], "min_time": t_min.where(on), "rating": el["rating"],
            "rating_unit": el["rating_unit"], "kva_nameplate": el["kva_nameplate"],
            "loading_pct": el_year[:, y], "peak_solved": on & np.isin(scr.bus_argmax[c], rows),
            "rating_is_default": el["rating_is_default"]}))
        for instant, k in (("peak_load", ih), ("min_import", il)):
            vl, vh = np.where(live[k], res.v_pu[k], np.inf), np.where(live[k], res.v_pu[k], -np.inf)
            ext.append({"year": sc.start_year + y, "instant": instant,
                        "time": when(y, rows[k - bounds[y]]), "head_kw": head[k],
                        "v_min_pu": vl.min(), "v_min_bus": ix.node_bus[vl.argmin()],
                        "v_max_pu": vh.max(), "v_max_bus": ix.node_bus[vh.argmax()],
                        "max_loading_pct": np.nanmax(el_load[k]) if n_el else np.nan,
                        "max_loading_element": el["element"].iloc[int(np.nanargmax(
                            np.nan_to_num(el_load[k], nan=-1)))] if n_el else ""})
    first = _first_table(inputs, net, lim, el_year, el_min_kw, np.array(head_min), vmin, vmax,
                         np.asarray(bus_names, dtype=object))
    return (pd.concat(peaks, ignore_index=True), first, pd.DataFrame(ext))


def _first_table(inputs: GrowthInputs, net: GrowthNetwork, lim: Limits, el_year, el_min_kw,
                 head_min, vmin, vmax, bus_names) -> pd.DataFrame:
    sc, el, feeder = inputs.scenario, net.elements, inputs.model.name
    th = lim.thermal_count_pct
    lo, hi = lim.v_lo_count_pu, lim.v_hi_count_pu
    rev = -lim.reverse_power_kw if lim.reverse_power_kw else 0.0  # (never -0.0 in a table)
    frames = []

    def add(names, kinds, limit, unit, values, bad, worse, worst_is_max, limit_value, keep=None):
        first, val, pre = _first_exceeded(values, bad, worse, worst_is_max)
        df = pd.DataFrame({
            "element": names, "kind": kinds, "limit": limit,
            "year": pd.array(np.where(first >= 0, sc.start_year + first, 0), dtype="Int64"),
            "value": val, "unit": unit, "limit_value": np.where(pre, values[:, 0], limit_value),
            "base_value": values[:, 0], "pre_existing": pre})
        df.loc[first < 0, "year"] = pd.NA
        if keep is not None:
            df = df[keep(first, pre)]
        frames.append(df)
        return df

    add(el["element"].to_numpy(), el["kind"].to_numpy(), "thermal", "%",
        np.nan_to_num(el_year, nan=0.0), lambda v: v > th, lambda v, b: v > b + lim.thermal_tol_pct,
        True, lim.thermal_pct)
    add(np.array([feeder]), np.array(["feeder"]), "reverse_power", "kW", head_min[None, :],
        lambda v: v < rev, lambda v, b: v < b - 1e-3, False, rev)
    tx = (el["kind"] == "transformer").to_numpy() & (el["child"] >= 0).to_numpy()
    add(el["element"].to_numpy()[tx], "transformer", "reverse_power", "kW", el_min_kw[tx],
        lambda v: v < rev, lambda v, b: v < b - 1e-3, False, rev)
    energised = np.isfinite(vmin).all(axis=1)
    for limit, values, bad, worse, is_max, lv in (
            ("undervoltage", vmin, lambda v: v < lo, lambda v, b: v < b - lim.v_tol_pu, False,
             lim.v_min_pu),
            ("overvoltage", vmax, lambda v: v > hi, lambda v, b: v > b + lim.v_tol_pu, True,
             lim.v_max_pu)):
        v = values[energised]
        df = add(bus_names[energised], "bus", limit, "pu", v, bad, worse, is_max, lv,
                 keep=lambda f, p: (f >= 0) | p)
        hit = df.dropna(subset=["year"]).sort_values(["year", "value"],
                                                     ascending=[True, not is_max])
        if len(hit):  # the feeder row: the earliest bus to exceed the limit
            row = hit.iloc[[0]].assign(element=feeder, kind="feeder")
        else:
            base = v[:, 0] if v.size else np.array([np.nan])
            b_ext = float(base.max() if is_max else base.min())
            pre = bool(df["pre_existing"].any())
            row = pd.DataFrame({
                "element": [feeder], "kind": "feeder", "limit": limit,
                "year": pd.array([pd.NA], dtype="Int64"),
                "value": float(v.max() if is_max else v.min()) if v.size else np.nan,
                "unit": "pu", "limit_value": b_ext if pre else lv,  # held to the base,
                "base_value": b_ext, "pre_existing": pre})          # as the bus rows are
        frames.append(row)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["year", "limit", "element"], na_position="last", kind="stable",
                           ignore_index=True)
