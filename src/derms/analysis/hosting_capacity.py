"""Snapshot hosting capacity per bus (and phase): linear screening verified on the AC model.

Definition (../shared/DESIGN.md, "Hosting capacity"): controls (regulator taps, capacitor
states) frozen at the base case; a balanced injection at unity power factor at the bus,
split equally over the phase nodes asked for (all phases 1-3 present at the bus unless the
site names some), node to ground; the largest size in [0, ``p_max_kw``] that keeps every
criterion, to ``tol_kw``. ``hc_kw`` is the *total* over the site's phases (three-phase kW
at a three-phase bus, the sum over the phases present otherwise).

Sign convention: network powers are import-positive (DESIGN). A size ``P >= 0`` is the
device's own output: PV hosting adds net import ``-P`` (export), load hosting (EV
charging) adds ``+P``.

Criteria, per node-phase / branch conductor, relative to the base case where the base
already breaks a limit (:func:`constraint_limits`):

* voltage band: ``v_min - v_tol <= |V| <= v_max + v_tol`` [pu]; a node already outside is
  held to its base value ``± v_tol`` (it may not get worse);
* voltage deviation (optional): ``| |V| - |V0| | <= v_deviation_pu``;
* thermal: ``|I| <= (thermal_pct + thermal_tol_pct) %`` of the normal rating; a conductor
  already above is held to its base loading + ``thermal_tol_pct``; elements without a
  rating (0 A) are skipped, elements with the engine's default rating are kept unless
  ``skip_default_ratings``;
* reverse flow (optional): feeder-head total import ``>= -reverse_power_kw`` (0 when the
  limits leave it None).

Fast method (:func:`hosting_capacity_fast`): one factorised model of the frozen base case
(:class:`derms.powerflow.linear_newton.SiteFlows`, the network Jacobian of
:func:`derms.powerflow.linear.build_linear_model`), one column per site. Its unit responses
give the closed-form linear size of every site (:func:`derms.analysis.hosting_model.
linear_sizes`; the constraints that bind below 3x some site's linear size are kept); a
bracketed secant search then finds every site's size on the model's own AC power flow
(batched chord-Newton, the same constant-power injection and load laws as the OpenDSS
check; :func:`derms.analysis.hosting_model.model_sizes`, to 0.5 %). That answer is checked
on OpenDSS: ``verify=True`` per site (secant steps on the AC margins of every constraint,
bracketed, until a feasible AC point lies within ``rel_tol`` of its secant root; typically
1 AC solve), ``"groups"`` one representative per binding constraint and phase set until
the engine has agreed three times (:func:`_verify_groups`; any disagreement re-verifies
and rescales). ``verify="model"`` returns the model sizes, ``False`` the linear ones.

The reference (brute-force bisection with full AC solves) is
:func:`derms.analysis.hosting_brute.hosting_capacity_brute`; both share :class:`ACProbe`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits
from derms.analysis.hosting_model import (
    _SITES_PER_BATCH,
    ModelMargins,
    linear_sizes,
    model_sizes,
)
from derms.errors import ConvergenceError, InputError, ModelError
from derms.powerflow.collect import NetworkIndex, StepCollector, build_index
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.linear import solve_ac_with_injections
from derms.powerflow.linear_newton import SiteFlows

log = logging.getLogger(__name__)

Kind = Literal["pv", "load"]
KINDS: tuple[str, ...] = ("pv", "load")
RESULT_COLUMNS = ["bus", "phases", "kind", "hc_kw", "hc_linear_kw", "binding",
                  "binding_element", "n_ac_solves", "method"]
_DEFAULT_RATING_A = (400.0, 600.0)
Progress = Callable[[int, int], None]
_TRUST_AFTER = 3  # fast-groups: model/engine agreements before the model is trusted


@dataclass(frozen=True, slots=True)
class HostingCriteria:
    """What a hosted size must respect (see the module docstring).

    ``v_deviation_pu``: largest change of any node-phase voltage from the base case [pu]
    (None = not checked). ``reverse_flow``: check the feeder-head export against
    ``limits.reverse_power_kw`` (0 kW when None). ``p_max_kw`` / ``tol_kw``: the search
    interval [0, p_max_kw] and the bisection resolution [kW]; ``rel_tol``: relative
    resolution of the fast method's AC verification.
    """

    limits: Limits = field(default_factory=Limits)
    v_deviation_pu: float | None = 0.03
    thermal: bool = True
    skip_default_ratings: bool = False
    reverse_flow: bool = False
    p_max_kw: float = 10_000.0
    tol_kw: float = 1.0
    rel_tol: float = 0.02

    def __post_init__(self) -> None:
        if not self.p_max_kw > 0:
            raise InputError(f"maximum size must be positive, got {self.p_max_kw} kW")
        if not self.tol_kw > 0:
            raise InputError(f"size resolution must be positive, got {self.tol_kw} kW")
        if self.v_deviation_pu is not None and not self.v_deviation_pu > 0:
            raise InputError(f"voltage deviation limit must be positive, got "
                             f"{self.v_deviation_pu} pu")
        if not 0 < self.rel_tol < 0.5:
            raise InputError(f"rel_tol must be in (0, 0.5), got {self.rel_tol}")


@dataclass(frozen=True, slots=True)
class Site:
    """Where a device connects: a bus and the phase nodes (1-3) its injection is split over."""

    bus: str
    nodes: tuple[int, ...]

    @property
    def node_names(self) -> list[str]:
        return [f"{self.bus}.{k}" for k in self.nodes]

    @property
    def phases(self) -> str:
        return ".".join(str(k) for k in self.nodes)


@dataclass(frozen=True)
class HostingResult:
    """Hosting capacity of the sites.

    ``table`` columns (:data:`RESULT_COLUMNS`): bus, phases ("1.2.3"), kind (pv|load),
    hc_kw (total over the site's phases [kW], device output, >= 0), hc_linear_kw (the
    linear estimate), binding (overvoltage, undervoltage, deviation_high, deviation_low,
    thermal, reverse_power, max_size, not_converged), binding_element (node or branch
    conductor, e.g. "line.l115.1"), n_ac_solves, method. ``pre_existing`` lists the
    base-case violations held to their base value.
    """

    table: pd.DataFrame
    pre_existing: pd.DataFrame
    criteria: HostingCriteria
    runtime_s: float
    n_ac_solves: int
    notes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- base case


def resolve_sites(engine: OpenDSSEngine, buses: Sequence[str] | None = None, *,
                  primary_kv_min: float = 1.0) -> list[Site]:
    """Sites from bus specs: ``"671"`` (all its phases 1-3), ``"611.3"`` or ``"671.1.2"``.

    ``None`` = every energised bus whose line-to-neutral base is at least
    ``primary_kv_min`` [kV] (the primary), except the source bus. Unknown buses, phases a
    bus does not have, de-energised or duplicated sites raise :class:`InputError`.
    """
    names = engine.node_names()
    v_pu = engine.node_voltages_pu()
    phases: dict[str, list[int]] = {}
    live: dict[str, bool] = {}
    for name, v in zip(names, v_pu):
        bus, node = name.rsplit(".", 1)
        k = int(node)
        if 1 <= k <= 3:
            phases.setdefault(bus, []).append(k)
            live[bus] = live.get(bus, True) and v > 0.1
    if buses is None:
        c = engine.circuit
        c.Vsources.First  # noqa: B018 - makes the first Vsource the active element
        source_bus = c.ActiveCktElement.BusNames[0].split(".")[0].lower()
        out = []
        for bus, nodes in phases.items():
            c.SetActiveBus(bus)
            if bus != source_bus and live[bus] and c.ActiveBus.kVBase >= primary_kv_min:
                out.append(Site(bus, tuple(sorted(nodes))))
        if not out:
            raise ModelError(f"no energised bus at or above {primary_kv_min} kV line-to-neutral")
        return out
    sites: list[Site] = []
    for spec in buses:
        text = str(spec).strip().lower()
        if not text:
            raise InputError("empty bus name in the bus list")
        bus, *nodes_txt = text.split(".")
        if bus not in phases:
            raise InputError(f"unknown bus {bus!r}" + (
                f" in {text!r}" if nodes_txt else "") + " (not in the feeder model)")
        try:
            nodes = tuple(sorted({int(n) for n in nodes_txt})) or tuple(sorted(phases[bus]))
        except ValueError:
            raise InputError(f"bus {text!r}: phases must be numbers 1-3 ('611.3')") from None
        missing = [k for k in nodes if k not in phases[bus]]
        if missing:
            have = ".".join(str(k) for k in sorted(phases[bus]))
            raise InputError(f"bus {bus!r} has no phase {missing[0]} (it has phases {have})")
        if not live[bus]:
            raise InputError(f"bus {bus!r} is de-energised in the base case")
        sites.append(Site(bus, nodes))
    if len({(s.bus, s.nodes) for s in sites}) != len(sites):
        raise InputError("the bus list has duplicates")
    return sites


@dataclass(frozen=True)
class ConstraintLimits:
    """Effective limits of the frozen base case, in engine node / NetworkIndex order.

    ``v_hi_pu``/``v_lo_pu`` (n_nodes,) with nan where a node is not monitored (neutral,
    de-energised); ``i_max_a`` (n_conductors,) with nan where not monitored;
    ``head_min_kw`` the lowest feeder-head total import allowed (``-inf`` when reverse
    flow is not checked). The base values come with them.
    """

    v0_pu: np.ndarray
    v_hi_pu: np.ndarray
    v_lo_pu: np.ndarray
    v_hi_kind: np.ndarray  # "overvoltage" or "deviation_high"
    v_lo_kind: np.ndarray
    i0_a: np.ndarray
    i_max_a: np.ndarray
    head_p0_kw: float
    head_min_kw: float
    node_names: list[str]
    branch_names: np.ndarray
    pre_existing: pd.DataFrame


def constraint_limits(engine: OpenDSSEngine, index: NetworkIndex,
                      criteria: HostingCriteria) -> ConstraintLimits:
    """Read the solved (frozen) base case and derive every constraint's effective limit."""
    lim = criteria.limits
    col = StepCollector(engine, index, 1)
    col.collect(0)
    v0 = col.v_pu[0].copy()
    i0 = col.i_a[0].astype(float)
    head0 = float(col.head_p_kw[0].sum())
    mon = (v0 >= lim.energised_min_pu) & (index.node_phase >= 1) & (index.node_phase <= 3)
    hi_band, lo_band = lim.v_max_pu + lim.v_tol_pu, lim.v_min_pu - lim.v_tol_pu
    pre_hi, pre_lo = mon & (v0 > hi_band), mon & (v0 < lo_band)
    v_hi = np.where(pre_hi, v0 + lim.v_tol_pu, hi_band)
    v_lo = np.where(pre_lo, v0 - lim.v_tol_pu, lo_band)
    hi_kind = np.full(v0.size, "overvoltage", dtype=object)
    lo_kind = np.full(v0.size, "undervoltage", dtype=object)
    if criteria.v_deviation_pu is not None:
        d = criteria.v_deviation_pu
        hi_kind[v0 + d < v_hi] = "deviation_high"
        lo_kind[v0 - d > v_lo] = "deviation_low"
        v_hi, v_lo = np.minimum(v_hi, v0 + d), np.maximum(v_lo, v0 - d)
    v_hi[~mon], v_lo[~mon] = np.nan, np.nan

    norm = index.branch_norm_a
    th = lim.thermal_pct + lim.thermal_tol_pct
    rated = norm > 0
    if criteria.skip_default_ratings:
        default = ((norm == _DEFAULT_RATING_A[0]) & (index.branch_emerg_a == _DEFAULT_RATING_A[1])
                   & np.char.startswith(index.branch_element.astype(str), "line."))
        rated &= ~default
    with np.errstate(divide="ignore", invalid="ignore"):
        load0 = np.where(rated, i0 / norm * 100.0, np.nan)
    pre_th = rated & (load0 > th)
    i_max = np.where(pre_th, i0 + norm * lim.thermal_tol_pct / 100.0, norm * th / 100.0)
    i_max[~rated] = np.nan
    if not criteria.thermal:
        i_max[:] = np.nan
    head_min = -np.inf
    pre_rev = False
    if criteria.reverse_flow:
        head_min = -(lim.reverse_power_kw or 0.0)
        if head0 < head_min:
            pre_rev, head_min = True, head0 - 1e-6
    names = engine.node_names()
    branch_names = np.char.add(np.char.add(index.branch_element.astype(str), "."),
                               index.branch_phase.astype(str))
    rows = [pd.DataFrame({"kind": "overvoltage", "element": np.asarray(names)[pre_hi],
                          "base_value": v0[pre_hi], "unit": "pu"}),
            pd.DataFrame({"kind": "undervoltage", "element": np.asarray(names)[pre_lo],
                          "base_value": v0[pre_lo], "unit": "pu"})]
    if criteria.thermal:
        rows.append(pd.DataFrame({"kind": "thermal", "element": branch_names[pre_th],
                                  "base_value": load0[pre_th], "unit": "%"}))
    if pre_rev:
        rows.append(pd.DataFrame({"kind": ["reverse_power"], "element": ["feeder_head"],
                                  "base_value": [head0], "unit": ["kW"]}))
    pre = pd.concat(rows, ignore_index=True)
    return ConstraintLimits(v0, v_hi, v_lo, hi_kind, lo_kind, i0, i_max, head0, head_min,
                            names, branch_names, pre)


# ----------------------------------------------------------------------------- AC probe


class ACProbe:
    """AC solves of one site at one size on the frozen engine, and their margins.

    ``margins(site, p_kw, sign)`` returns the vector of every constraint's margin (limit
    minus value, in its own unit: pu, A, kW; >= 0 is feasible) or None when the solve does
    not converge (taken as infeasible; the engine is re-solved at the base case).
    """

    def __init__(self, engine: OpenDSSEngine, index: NetworkIndex, lim: ConstraintLimits):
        self.engine, self.index, self.lim = engine, index, lim
        self._col = StepCollector(engine, index, 1)
        self._vh = np.flatnonzero(~np.isnan(lim.v_hi_pu))
        self._vl = np.flatnonzero(~np.isnan(lim.v_lo_pu))
        self._br = np.flatnonzero(~np.isnan(lim.i_max_a))
        self._head = int(np.isfinite(lim.head_min_kw))
        self.n_solves = 0

    @property
    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(kind, element) of each margin entry."""
        lim = self.lim
        nodes = np.asarray(lim.node_names, dtype=object)
        kinds = np.concatenate([lim.v_hi_kind[self._vh], lim.v_lo_kind[self._vl],
                                np.full(self._br.size, "thermal", dtype=object),
                                np.array(["reverse_power"] * self._head, dtype=object)])
        elems = np.concatenate([nodes[self._vh], nodes[self._vl],
                                lim.branch_names[self._br].astype(object),
                                np.array(["feeder_head"] * self._head, dtype=object)])
        return kinds, elems

    def base_margins(self) -> np.ndarray:
        lim = self.lim
        return self._margins(lim.v0_pu, lim.i0_a, lim.head_p0_kw)

    def _margins(self, v: np.ndarray, i: np.ndarray, head: float) -> np.ndarray:
        lim = self.lim
        return np.concatenate([lim.v_hi_pu[self._vh] - v[self._vh],
                               v[self._vl] - lim.v_lo_pu[self._vl],
                               lim.i_max_a[self._br] - i[self._br],
                               [head - lim.head_min_kw] * self._head])

    def margins(self, site: Site, p_kw: float, sign: float) -> np.ndarray | None:
        n = len(site.nodes)
        p = np.full(n, sign * p_kw / n)
        self.n_solves += 1
        try:
            solve_ac_with_injections(self.engine, site.node_names, p, np.zeros(n),
                                     restore=False)
        except ConvergenceError:
            self.engine.solve()  # back to the base case (injections already disabled)
            return None
        self._col.collect(0)
        return self._margins(self._col.v_pu[0], self._col.i_a[0].astype(float),
                             float(self._col.head_p_kw[0].sum()))

    def resolution(self) -> np.ndarray:
        """Per margin entry, what the engine's convergence tolerance leaves uncertain: its
        relative tolerance times the value's scale (1 pu, the rating, the head power)."""
        lim = self.lim
        scale = np.concatenate([np.ones(self._vh.size + self._vl.size), lim.i_max_a[self._br],
                                [max(abs(lim.head_p0_kw), 1.0)] * self._head])
        return float(self.engine.circuit.Solution.Tolerance) * scale

    def restore(self) -> None:
        """Re-solve the base case (the injection loads are disabled after each probe)."""
        self.engine.solve()


def _feasible(m: np.ndarray | None) -> bool:
    return m is not None and bool((m >= -1e-9).all())


# ----------------------------------------------------------------------------- fast method


def _secant_root(p_a: float, m_a: np.ndarray, p_b: float, m_b: np.ndarray) -> float:
    """Smallest size above which some margin's secant through (p_a, m_a), (p_b, m_b)
    crosses zero (inf when none decreases)."""
    slope = (m_b - m_a) / (p_b - p_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.where(slope < 0, p_b - m_b / slope, np.inf)
    return float(np.min(root)) if root.size else np.inf


def _binding(p_a: float, m_a: np.ndarray, p_b: float, m_b: np.ndarray) -> int:
    """Index of the margin whose secant crosses zero first (the binding constraint)."""
    slope = (m_b - m_a) / (p_b - p_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.where(slope < 0, p_b - m_b / slope, np.inf)
    return int(np.argmin(root))


def verify_site(probe: ACProbe, site: Site, sign: float, p_lin_kw: float,
                criteria: HostingCriteria, m0: np.ndarray, max_solves: int = 8
                ) -> tuple[float, int, np.ndarray | None]:
    """AC-verify a linear estimate near the limit.

    Keeps a bracket (largest AC-feasible size ``lo``, smallest violated or non-converged
    size ``hi``); each step takes the secant root of the margins through the last two AC
    points (the base case first), aimed slightly to the safe side, or bisects when the
    secant leaves the bracket. Stops when a feasible point's own secant root lies within
    ``rel_tol`` (+ ``tol_kw``) of it, or the bracket is that narrow.

    Returns (``lo`` [kW], AC solves used, margins at ``lo``).
    """
    p_max, tol, rel = criteria.p_max_kw, criteria.tol_kw, criteria.rel_tol
    lo, m_lo, hi = 0.0, m0, np.inf
    prev_p, prev_m = 0.0, m0
    p = min(max(p_lin_kw, tol), p_max)
    used = 0
    while used < max_solves:
        m = probe.margins(site, p, sign)
        used += 1
        ok = _feasible(m)
        if ok:
            lo, m_lo = p, m
        else:
            hi = p
        est = _secant_root(prev_p, prev_m, p, m) if m is not None and p != prev_p else np.nan
        if ok and (p >= p_max or est <= p * (1 + rel) + tol):
            break
        if hi - lo <= max(tol, rel * lo):
            break
        if m is not None:
            prev_p, prev_m = p, m
        if np.isfinite(est):
            est = est * (1 + rel / 2) if ok else est * (1 - rel / 2)
        step = 0.9 * max(tol, rel * lo)  # closest approach to the bracket's ends
        if np.isfinite(est) and lo < est < min(hi, 2 * p_max):
            p = min(max(est, lo + step), hi - step, p_max)
        elif np.isfinite(hi):
            p = (lo + hi) / 2
        else:
            p = min(2 * p, p_max)
    return lo, used, m_lo


def hosting_capacity_fast(
    engine: OpenDSSEngine, sites: Sequence[Site], kind: Kind, criteria: HostingCriteria
    | None = None, *, verify: bool | str = True, index: NetworkIndex | None = None,
    on_progress: Progress | None = None,
) -> HostingResult:
    """Hosting capacity of ``sites`` on the factorised model, AC-verified near the limit.

    ``verify``: True verifies every site on OpenDSS (starting from its model size);
    "groups" one site per binding constraint (see :func:`_verify_groups`); "model" returns
    the model's AC sizes (:func:`derms.analysis.hosting_model.model_sizes`, no OpenDSS
    solve); False the linear estimates.

    ``engine`` must be solved with controls frozen
    (:func:`derms.powerflow.control_state.freeze_base_case`); it is left at its base-case
    solution. ``kind`` "pv" (export, net import -P) or "load" (+P).
    """
    t0 = time.perf_counter()
    criteria = criteria or HostingCriteria()
    sign = _sign(kind)
    if verify not in (True, False, "groups", "model"):
        raise InputError(f"verify must be True, False, 'groups' or 'model', got {verify!r}")
    sites = list(sites)
    index = index or build_index(engine)
    lim = constraint_limits(engine, index, criteria)
    probe = ACProbe(engine, index, lim)
    kinds, elems = probe.labels
    m0 = probe.base_margins()
    n = len(sites)
    p_lin = np.zeros(n)
    b_kind = np.full(n, "max_size", dtype=object)
    b_elem = np.full(n, "", dtype=object)
    hc = np.zeros(n)
    b_row = np.full(n, -1)          # model's binding constraint (probe order) and its
    m_bind = np.full(n, np.nan)     # margin at the model size
    sf = SiteFlows(engine, index, branches=criteria.thermal)
    for lo in range(0, n, _SITES_PER_BATCH):
        sl = slice(lo, min(lo + _SITES_PER_BATCH, n))
        triples = sf.site_matrix([s.node_names for s in sites[sl]])
        p_lin[sl], b_kind[sl], b_elem[sl], x1, rows = linear_sizes(sf, triples, sign, lim,
                                                                    criteria)
        if verify is False or rows.size == 0:  # (no constraint that can bind: p_max)
            hc[sl] = p_lin[sl]
            continue
        margins = ModelMargins(sf, probe, sign, rows)
        hc[sl], m_lo, bind = model_sizes(sf, triples, sign, p_lin[sl], x1, margins, m0[rows],
                                         criteria)
        m_bind[sl] = m_lo[bind, np.arange(bind.size)]
        bind = rows[bind]
        b_row[sl] = bind
        found = (hc[sl] > 0) & (hc[sl] < criteria.p_max_kw)
        b_kind[sl] = np.where(found, kinds[bind], b_kind[sl])
        b_elem[sl] = np.where(found, elems[bind], b_elem[sl])
        top = hc[sl] >= criteria.p_max_kw
        b_kind[sl] = np.where(top, "max_size", b_kind[sl])
        b_elem[sl] = np.where(top, "", b_elem[sl])
    del sf
    n_ac = np.zeros(n, dtype=int)
    if verify == "groups":
        n_ac = _verify_groups(probe, sites, sign, hc, criteria, b_kind, b_elem, m0,
                              (b_row, m_bind))
        probe.restore()
    elif verify is True:
        for j, site in enumerate(sites):
            start = hc[j] * (1 - criteria.rel_tol / 2)
            hc[j], n_ac[j], m = verify_site(probe, site, sign, start, criteria, m0)
            if hc[j] >= criteria.p_max_kw:
                b_kind[j], b_elem[j] = "max_size", ""
            elif m is not None and hc[j] > 0:
                k = _binding(0.0, m0, hc[j], m)
                b_kind[j], b_elem[j] = kinds[k], elems[k]
            if on_progress:
                on_progress(j + 1, n)
        probe.restore()
    if on_progress and verify is not True:
        on_progress(n, n)
    method = {"groups": "fast-groups", True: "fast", False: "linear", "model": "model"}[verify]
    table = _table(sites, kind, hc, p_lin, b_kind, b_elem, n_ac, method)
    return HostingResult(table, lim.pre_existing, criteria, time.perf_counter() - t0,
                         int(n_ac.sum()))


def _verify_groups(probe: ACProbe, sites: list[Site], sign: float, hc: np.ndarray,
                   criteria: HostingCriteria, b_kind, b_elem, m0: np.ndarray,
                   model_bind: tuple[np.ndarray, np.ndarray],
                   trust_after: int = _TRUST_AFTER) -> np.ndarray:
    """AC-verify (OpenDSS) one representative per group of sites that share the model's
    binding constraint and phase set, largest groups first; where OpenDSS disagrees with
    the model, verify the representative by :func:`verify_site` and scale the group's
    sizes by its AC/model ratio (``hc`` updated in place).

    The model sizes solve the AC equations of the same network (controls frozen), so the
    check is of the model against the engine, one AC solve at the representative's model
    size: they agree when that size is AC-feasible and the binding constraint's AC margin
    there matches the model's to ``rel_tol`` of the margin used up from the base case,
    both up to the engine's own resolution (:meth:`ACProbe.resolution`: its convergence
    tolerance, 1e-4 pu by default; the model stops within 0.5 % of the root, where the
    margin left can be smaller than that).
    Once ``trust_after`` groups agree and none has disagreed, the remaining groups keep
    their model sizes (no AC solve; ``n_ac_solves`` 0); after any disagreement every group
    is checked. ``model_bind``: per site, the model's binding row (probe order, -1 when
    none) and its margin at the model size. Returns the AC solves per site.
    """
    b_row, m_bind = model_bind
    n_ac = np.zeros(len(sites), dtype=int)
    floor = probe.resolution()
    keys = [f"{k}|{el}|{s.phases}" for k, el, s in zip(b_kind, b_elem, sites, strict=True)]
    _, key_id = np.unique(keys, return_inverse=True)
    by_key = np.argsort(key_id, kind="stable")
    groups = sorted(np.split(by_key, np.flatnonzero(np.diff(key_id[by_key])) + 1),
                    key=len, reverse=True)
    agreed, disagreed = 0, False
    for members in groups:
        if agreed >= trust_after and not disagreed:
            break
        idx = np.asarray(members)
        order = idx[np.argsort(hc[idx])]
        rep = int(order[len(order) // 2])           # the median model size
        if hc[rep] <= 0 or hc[rep] >= criteria.p_max_kw or b_row[rep] < 0:
            continue
        m = probe.margins(sites[rep], float(hc[rep]), sign)
        n_ac[rep] = 1
        b = b_row[rep]
        if m is not None and (m >= -floor).all() and abs(m[b] - m_bind[rep]) <= max(
                criteria.rel_tol * abs(m0[b] - m_bind[rep]), floor[b]):
            agreed += 1
            continue
        disagreed = True  # the engine disagrees: verify, correct the group
        start = hc[rep] * (1 - criteria.rel_tol / 2)
        ac, used, _ = verify_site(probe, sites[rep], sign, start, criteria, m0)
        n_ac[rep] += used
        hc[idx] = np.minimum(hc[idx] * (ac / hc[rep]), criteria.p_max_kw)
        hc[rep] = ac
    return n_ac


def _sign(kind: str) -> float:
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return -1.0 if kind == "pv" else 1.0


def _table(sites: list[Site], kind: str, hc: np.ndarray, p_lin: np.ndarray, b_kind, b_elem,
           n_ac: np.ndarray, method: str) -> pd.DataFrame:
    return pd.DataFrame({
        "bus": [s.bus for s in sites], "phases": [s.phases for s in sites], "kind": kind,
        "hc_kw": np.round(hc, 3), "hc_linear_kw": np.round(p_lin, 3),
        "binding": np.asarray(b_kind, dtype=object), "binding_element": np.asarray(
            b_elem, dtype=object), "n_ac_solves": n_ac, "method": method,
    }, columns=RESULT_COLUMNS)
