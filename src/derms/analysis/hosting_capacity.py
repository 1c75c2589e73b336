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
already breaks a limit (:func:`derms.analysis.hosting_ac.constraint_limits`; the base case
is first converged to ``BASE_TOL`` = 1e-8, :func:`derms.analysis.hosting_ac.
solve_base_case`, because OpenDSS's default 1e-4 leaves voltages off by more than some
base-case margins: which elements are pre-existing must not depend on solver noise):

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
the engine has agreed three times (:func:`derms.analysis.hosting_verify.verify_groups`;
any disagreement re-verifies and rescales). ``verify="model"`` returns the model sizes,
``False`` the linear ones.

Modules: this one holds the sites, the result and the fast method's driver;
:mod:`derms.analysis.hosting_ac` the criteria, the base case's limits and the OpenDSS
probe; :mod:`derms.analysis.hosting_model` the model's linear and AC sizes;
:mod:`derms.analysis.hosting_verify` the OpenDSS check. The reference (brute-force
bisection with full AC solves) is :func:`derms.analysis.hosting_brute.
hosting_capacity_brute`; all share :class:`~derms.analysis.hosting_ac.ACProbe`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from derms.analysis.hosting_ac import (  # re-exported: the study's public vocabulary
    BASE_TOL,
    ACProbe,
    ConstraintLimits,
    HostingCriteria,
    Site,
    _binding,
    constraint_limits,
    solve_base_case,
)
from derms.analysis.hosting_model import (
    _SITES_PER_BATCH,
    ModelMargins,
    linear_sizes,
    model_sizes,
)
from derms.analysis.hosting_verify import verify_groups, verify_site
from derms.errors import InputError, ModelError
from derms.powerflow.collect import NetworkIndex, build_index
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.linear_newton import SiteFlows

__all__ = ["BASE_TOL", "KINDS", "RESULT_COLUMNS", "ACProbe", "ConstraintLimits",
           "HostingCriteria", "HostingResult", "Kind", "Site", "constraint_limits",
           "hosting_capacity_fast", "resolve_sites", "solve_base_case"]

log = logging.getLogger(__name__)

Kind = Literal["pv", "load"]
KINDS: tuple[str, ...] = ("pv", "load")
RESULT_COLUMNS = ["bus", "phases", "kind", "hc_kw", "hc_linear_kw", "binding",
                  "binding_element", "n_ac_solves", "method"]
Progress = Callable[[int, int], None]


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
    ``primary_kv_min`` [kV] (the primary), except the source bus; on a feeder with no such
    bus (all low voltage), every energised bus but the source. Unknown buses, phases a
    bus does not have, de-energised or duplicated sites raise :class:`InputError`.
    """
    names = engine.node_names()
    v_pu = engine.node_voltages_pu()
    phases: dict[str, list[int]] = {}
    live: dict[str, bool] = {}
    ungrounded = {n.rsplit(".", 1)[0] for n, p in zip(names, engine.voltage_pairs(),
                                                       strict=True) if p >= 0}
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
        out, low = [], []
        for bus, nodes in phases.items():
            if bus == source_bus or not live[bus]:
                continue
            c.SetActiveBus(bus)
            site = Site(bus, tuple(sorted(nodes)), bus in ungrounded)
            (out if c.ActiveBus.kVBase >= primary_kv_min else low).append(site)
        if not out and low:  # an all-LV feeder (e.g. the European LV test case): every bus
            log.info("hosting sites: no bus at or above %s kV line-to-neutral; every "
                     "energised bus instead (%d)", primary_kv_min, len(low))
            return low
        if not out:
            raise ModelError("no energised bus besides the source bus: nothing to host on")
        return out
    if not buses:
        raise InputError("the bus list is empty: name at least one bus (or give none for "
                         "every primary bus)")
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
        sites.append(Site(bus, nodes, bus in ungrounded and len(nodes) >= 2))
        if bus in ungrounded and len(nodes) < 2:
            raise InputError(f"bus {bus!r} is on an ungrounded (3-wire) part of the feeder: "
                             "a device there connects between two phases ('"
                             f"{bus}.1.2'), not phase to ground ({text!r})")
    if len({(s.bus, s.nodes) for s in sites}) != len(sites):
        raise InputError("the bus list has duplicates")
    return sites


def hosting_capacity_fast(
    engine: OpenDSSEngine, sites: Sequence[Site], kind: Kind, criteria: HostingCriteria
    | None = None, *, verify: bool | str = True, index: NetworkIndex | None = None,
    on_progress: Progress | None = None,
) -> HostingResult:
    """Hosting capacity of ``sites`` on the factorised model, AC-verified near the limit.

    ``verify``: True verifies every site on OpenDSS (starting from its model size);
    "groups" one site per binding constraint (see
    :func:`derms.analysis.hosting_verify.verify_groups`); "model" returns
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
    solve_base_case(engine)
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
    unsure = np.zeros(n, dtype=bool)  # the model's power flow failed: a lower bound only
    sf = SiteFlows(engine, index, branches=criteria.thermal)
    for lo in range(0, n, _SITES_PER_BATCH):
        sl = slice(lo, min(lo + _SITES_PER_BATCH, n))
        triples = sf.site_matrix([s.injection_names for s in sites[sl]])
        p_lin[sl], b_kind[sl], b_elem[sl], x1, rows = linear_sizes(sf, triples, sign, lim,
                                                                    criteria)
        if verify is False or rows.size == 0:  # (no constraint that can bind: p_max)
            hc[sl] = p_lin[sl]
            continue
        margins = ModelMargins(sf, probe, sign, rows)
        hc[sl], m_lo, bind, unsure[sl] = model_sizes(sf, triples, sign, p_lin[sl], x1,
                                                     margins, m0[rows], criteria)
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
    def verify_alone(j: int, start: float, max_solves: int = 8) -> int:
        """Site ``j`` on OpenDSS from ``start``: its size and binding constraint; solves."""
        hc[j], used, m = verify_site(probe, sites[j], sign, start, criteria, m0, max_solves)
        if hc[j] >= criteria.p_max_kw:
            b_kind[j], b_elem[j] = "max_size", ""
        elif m is not None and hc[j] > 0:
            k = _binding(0.0, m0, hc[j], m)
            b_kind[j], b_elem[j] = kinds[k], elems[k]
        return used

    if verify == "groups":
        n_ac = verify_groups(probe, sites, sign, hc, criteria, b_kind, b_elem, m0,
                              (b_row, m_bind))
        # sites where the model's power flow did not converge: each on OpenDSS, from the
        # larger of the linear and the model size (a group's agreement says nothing of them)
        for j in np.flatnonzero(unsure):
            n_ac[j] += verify_alone(j, max(hc[j], p_lin[j]) * (1 - criteria.rel_tol / 2), 16)
        if unsure.any():
            log.info("hosting %d sites verified one by one (model power flow did not "
                     "converge)", int(unsure.sum()))
        probe.restore()
    elif verify is True:
        for j in range(n):
            start = max(hc[j], p_lin[j]) if unsure[j] else hc[j]
            n_ac[j] = verify_alone(j, start * (1 - criteria.rel_tol / 2))
            if on_progress:
                on_progress(j + 1, n)
        probe.restore()
    if on_progress and verify is not True:
        on_progress(n, n)
    method = {"groups": "fast-groups", True: "fast", False: "linear", "model": "model"}[verify]
    table = _table(sites, kind, hc, p_lin, b_kind, b_elem, n_ac, method)
    return HostingResult(table, lim.pre_existing, criteria, time.perf_counter() - t0,
                         int(n_ac.sum()))


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
