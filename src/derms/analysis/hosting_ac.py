"""Hosting-capacity criteria on the AC model: the base case's effective limits and the AC
margins of one site's injection on OpenDSS.

:class:`HostingCriteria` says what a hosted size must respect; :func:`solve_base_case`
converges the frozen base case tightly (its values decide which elements are
pre-existing, see the function); :func:`constraint_limits` turns the criteria into every
node's and conductor's effective limit, holding pre-existing violations to their base
value (../shared/DESIGN.md, "Violation"); :class:`ACProbe` solves one site at one size on
the engine and returns every constraint's margin (limit minus value, >= 0 feasible). Shared
by the fast method (:mod:`derms.analysis.hosting_capacity`), its OpenDSS check
(:mod:`derms.analysis.hosting_verify`) and the brute-force reference
(:mod:`derms.analysis.hosting_brute`).

Sign convention: network powers are import-positive (DESIGN); a size ``P >= 0`` is the
device's output and the site's net import is ``sign * P`` (PV ``-1``, load ``+1``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from derms.analysis.constraints import MAX_SIZE_KW, Limits
from derms.errors import ConvergenceError, InputError
from derms.powerflow.collect import NetworkIndex, StepCollector
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.linear import solve_ac_with_injections
from derms.powerflow.voltage_measure import delta_terms

log = logging.getLogger(__name__)

_DEFAULT_RATING_A = (400.0, 600.0)
BASE_TOL = 1e-8   # relative convergence tolerance of the study's base-case solve
PROBE_TOL = 1e-6  # relative convergence tolerance of every AC probe


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
    v_deviation_pu: float | None = None  # e.g. 0.03; None: voltage band and thermal only
    thermal: bool = True
    skip_default_ratings: bool = False
    reverse_flow: bool = False
    p_max_kw: float = 10_000.0
    tol_kw: float = 1.0
    rel_tol: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.p_max_kw <= MAX_SIZE_KW:
            raise InputError(f"maximum size must be positive and at most {MAX_SIZE_KW:g} kW, "
                             f"got {self.p_max_kw} kW")
        if not self.tol_kw > 0:
            raise InputError(f"size resolution must be positive, got {self.tol_kw} kW")
        if self.v_deviation_pu is not None and not self.v_deviation_pu > 0:
            raise InputError(f"voltage deviation limit must be positive, got "
                             f"{self.v_deviation_pu} pu")
        if not 0 < self.rel_tol < 0.5:
            raise InputError(f"rel_tol must be in (0, 0.5), got {self.rel_tol}")


@dataclass(frozen=True, slots=True)
class Site:
    """Where a device connects: a bus and the phase nodes (1-3) its injection is split over.

    ``line_to_line``: the bus is on an ungrounded (3-wire) area, where a device connects
    between phases (:mod:`derms.powerflow.voltage_measure`): the injection is split over
    the node pairs (a-b, b-c, c-a; two nodes: a-b) instead of node to ground.
    """

    bus: str
    nodes: tuple[int, ...]
    line_to_line: bool = False

    @property
    def node_names(self) -> list[str]:
        return [f"{self.bus}.{k}" for k in self.nodes]

    @property
    def injection_names(self) -> list[str]:
        """Where the power goes, shared equally: "bus.n", or "bus.a.b" line to line."""
        if not self.line_to_line:
            return self.node_names
        return delta_terms(self.bus, self.nodes, max(len(self.nodes), 3))

    @property
    def phases(self) -> str:
        return ".".join(str(k) for k in self.nodes)


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


def solve_base_case(engine: OpenDSSEngine, tol: float = BASE_TOL) -> None:
    """Re-solve the engine's (frozen) base case to the relative tolerance ``tol``.

    The study's limits come from the base case: which elements are pre-existing, and every
    margin a site's injection may use up. OpenDSS stops its fixed-point iteration on the
    size of the last step, not on the error, so at its default tolerance (1e-4) node
    voltages can be off by more than that: ≈ 1.7e-4 pu on IEEE 8500, where node
    l2730106.1 reads 0.94903 pu (3e-5 inside the band) at 1e-4 and 0.948945 pu (outside:
    pre-existing) converged. A margin smaller than the solver's error decides nothing, so
    the base case is converged to ``tol`` (one solve from the current solution, ≈ 10-25
    more iterations); the engine's tolerance is put back for the AC probes, whose errors
    move a site's size by error / sensitivity only.
    """
    sol = engine.circuit.Solution
    old = float(sol.Tolerance)
    engine.command("init")  # the starting point every probe starts from too (ACProbe)
    if old <= tol:
        engine.solve()
        return
    sol.Tolerance = tol
    try:
        engine.solve()
    except ConvergenceError:  # round-off stalls it: keep the engine's own resolution
        log.warning("base case: no convergence to tol=%g; using the engine's %g", tol, old)
        sol.Tolerance = old
        engine.solve()
    finally:
        sol.Tolerance = old


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
    hi_band, lo_band = lim.v_hi_count_pu, lim.v_lo_count_pu
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
    th = lim.thermal_count_pct
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
    branch_names = np.array([f"{e}.{k}" for e, k in zip(index.branch_element,
                                                          index.branch_phase.tolist(),
                                                          strict=True)],
                            dtype=object)
    node_arr = np.asarray(names, dtype=object)
    parts = [("overvoltage", node_arr[pre_hi], v0[pre_hi], "pu"),
             ("undervoltage", node_arr[pre_lo], v0[pre_lo], "pu")]
    if criteria.thermal:
        parts.append(("thermal", branch_names[pre_th], load0[pre_th], "%"))
    if pre_rev:
        parts.append(("reverse_power", np.array(["feeder_head"], dtype=object),
                      np.array([head0]), "kW"))
    sizes = [p[1].size for p in parts]
    pre = pd.DataFrame({  # one frame, not one per kind (pandas costs ~0.3 ms a frame)
        "kind": np.repeat(np.array([p[0] for p in parts], dtype=object), sizes),
        "element": np.concatenate([p[1] for p in parts]),
        "base_value": np.concatenate([p[2] for p in parts]).astype(float),
        "unit": np.repeat(np.array([p[3] for p in parts], dtype=object), sizes)})
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
        terms = site.injection_names
        n = len(terms)
        p = np.full(n, sign * p_kw / n)
        self.n_solves += 1
        # every probe from the same starting point: some load laws (CVR, model 4) have
        # more than one solution, and a probe started from the last large one lands on
        # another (ckt5: brute force 50 % low at 6 of 22 buses)
        self.engine.command("init")
        sol = self.engine.circuit.Solution
        old_tol = float(sol.Tolerance)
        # the same tolerance as the base case: at the engine's 1e-4 a probe's voltages are
        # off by ~1e-4 pu, which moves a site whose binding node is weakly coupled (PV on
        # one phase, undervoltage on another) by several % (EPRI ckt5: +6.5 %)
        sol.Tolerance = min(old_tol, PROBE_TOL)
        try:
            solve_ac_with_injections(self.engine, terms, p, np.zeros(n), restore=False)
        except ConvergenceError:
            self.engine.command("init")
            self.engine.solve()  # back to the base case (injections already disabled)
            return None
        finally:
            sol.Tolerance = old_tol
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
        """Re-solve the base case (the injection loads are disabled after each probe), from
        the same starting point as the study's base case."""
        self.engine.command("init")
        self.engine.solve()


def _feasible(m: np.ndarray | None) -> bool:
    return m is not None and bool((m >= -1e-9).all())



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
