"""Branch currents as a sparse linear map of node voltages, for branch-flow sensitivities.

Each series PD element (line, transformer, series reactor) has ``I = Yprim V`` over its
conductors. Keeping the rows of terminal 1's phase conductors, in the order of
:class:`derms.powerflow.collect.NetworkIndex`, and mapping conductors to engine nodes
(ground conductors drop out, V = 0) gives one sparse complex matrix ``M`` with
``I_branch = M V_node``. Transformer ``Yprim`` is at the present taps.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from derms.powerflow.collect import NetworkIndex, build_index
from derms.powerflow.engine import OpenDSSEngine


def branch_current_matrix(engine: OpenDSSEngine, index: NetworkIndex | None = None, *,
                          y_order: bool = False) -> tuple[sp.csr_matrix, NetworkIndex]:
    """``M`` (n_branch_conductors x n_nodes, complex, [A per V]) and the index naming its rows.

    Columns follow the engine's node order (``engine.node_names()``), or OpenDSS's Y-node
    order (``YNodeOrder``) when ``y_order``. Rows of disabled or open elements are zero.
    """
    index = index or build_index(engine)
    c = engine.circuit
    ckt = c.ActiveCktElement
    names = index.branch_element
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    n_ph = np.diff(np.r_[starts, names.size])  # the index holds one row per phase
    keep, yps, refs = [], [], []  # per enabled element: its raw Yprim and NodeRef
    for e, start in enumerate(starts):
        c.SetActiveElement(str(names[start]))
        if ckt.Enabled:
            keep.append(e)
            yps.append(ckt.Yprim)
            refs.append(ckt.NodeRef)
    y_names = [s.lower() for s in c.YNodeOrder]
    shape = (index.n_branch_conductors, len(y_names))
    if not keep:
        return sp.csr_matrix(shape, dtype=complex), index
    # all elements at once: entry (r, col) of element e's Yprim, r < its phases, col < n_e
    first, nph = starts[keep], n_ph[keep]
    n_e = np.fromiter((len(r) for r in refs), dtype=np.int64, count=len(refs))
    node_of = np.concatenate(refs).astype(np.int64) - 1  # Y index, -1 = ground
    yflat = np.concatenate(yps).astype(float)
    ref_off = np.r_[0, np.cumsum(n_e)[:-1]]
    y_off = np.r_[0, np.cumsum(n_e * n_e)[:-1]]
    cnt = nph * n_e
    el = np.repeat(np.arange(len(keep)), cnt)
    local = np.arange(cnt.sum()) - np.repeat(np.r_[0, np.cumsum(cnt)[:-1]], cnt)
    r, k = local // n_e[el], local % n_e[el]
    node = node_of[ref_off[el] + k]
    live = node >= 0
    at = 2 * (y_off[el] + r * n_e[el] + k)[live]
    vals = yflat[at] + 1j * yflat[at + 1]
    rows, col = (first[el] + r)[live], node[live]
    if not y_order:  # Y index -> engine node index
        pos = {s: k for k, s in enumerate(engine.node_names())}
        col = np.fromiter((pos[s] for s in y_names), dtype=np.int64, count=len(y_names))[col]
    m = sp.csr_matrix((vals, (rows, col)), shape=shape)
    return m, index
