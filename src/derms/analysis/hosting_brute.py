"""Reference hosting capacity: bisection with a full AC solve at every trial size.

Same definition, criteria, base case and AC probe as the fast method
(:mod:`derms.analysis.hosting_capacity`; :mod:`derms.analysis.hosting_ac`): controls frozen
at the base case, converged to :data:`~derms.analysis.hosting_ac.BASE_TOL` before the limits
are read; balanced unity power factor injection split over the site's phase nodes, size in
[0, ``p_max_kw``] bisected to ``tol_kw`` (about 14 AC solves per site for 10 MW to 1 kW),
each trial an OpenDSS solve at the engine's own tolerance starting from the previous
trial's solution. A solve that does not converge counts as a violation. Slow by design: it
validates the fast method.

Sign convention: a size ``P >= 0`` is the device's output; PV adds net import ``-P``
(export), load (EV charging) ``+P``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from derms.analysis.hosting_ac import (
    ACProbe,
    HostingCriteria,
    Site,
    _binding,
    _feasible,
    constraint_limits,
    solve_base_case,
)
from derms.analysis.hosting_capacity import HostingResult, Kind, Progress, _sign, _table
from derms.powerflow.collect import NetworkIndex, build_index
from derms.powerflow.engine import OpenDSSEngine


def bisect_site(probe: ACProbe, site: Site, sign: float, criteria: HostingCriteria
                ) -> tuple[float, int, np.ndarray | None]:
    """Largest AC-feasible size [kW] of one site by bisection; (size, solves, its margins)."""
    used = 1
    m = probe.margins(site, criteria.p_max_kw, sign)
    if _feasible(m):
        return criteria.p_max_kw, used, m
    lo, hi, m_lo = 0.0, criteria.p_max_kw, None
    while hi - lo > criteria.tol_kw:
        mid = (lo + hi) / 2
        m = probe.margins(site, mid, sign)
        used += 1
        if _feasible(m):
            lo, m_lo = mid, m
        else:
            hi = mid
    return lo, used, m_lo


def hosting_capacity_brute(
    engine: OpenDSSEngine, sites: Sequence[Site], kind: Kind,
    criteria: HostingCriteria | None = None, *, index: NetworkIndex | None = None,
    on_progress: Progress | None = None,
) -> HostingResult:
    """Reference hosting capacity of ``sites`` by AC bisection (engine frozen and solved,
    see :func:`derms.powerflow.control_state.freeze_base_case`; left at its base case)."""
    t0 = time.perf_counter()
    criteria = criteria or HostingCriteria()
    sign = _sign(kind)
    sites = list(sites)
    solve_base_case(engine)
    index = index or build_index(engine)
    lim = constraint_limits(engine, index, criteria)
    probe = ACProbe(engine, index, lim)
    kinds, elems = probe.labels
    m0 = probe.base_margins()
    n = len(sites)
    hc = np.zeros(n)
    n_ac = np.zeros(n, dtype=int)
    b_kind = np.full(n, "max_size", dtype=object)
    b_elem = np.full(n, "", dtype=object)
    for j, site in enumerate(sites):
        hc[j], n_ac[j], m = bisect_site(probe, site, sign, criteria)
        if hc[j] < criteria.p_max_kw:
            if m is None or hc[j] <= 0:
                b_kind[j] = "at_base"
            else:
                k = _binding(0.0, m0, hc[j], m)
                b_kind[j], b_elem[j] = kinds[k], elems[k]
        if on_progress:
            on_progress(j + 1, n)
    probe.restore()
    table = _table(sites, kind, hc, np.full(n, np.nan), b_kind, b_elem, n_ac, "brute-force")
    return HostingResult(table, lim.pre_existing, criteria, time.perf_counter() - t0,
                         int(n_ac.sum()))
