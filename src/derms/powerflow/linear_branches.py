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
    rows, cols, vals = [], [], []
    names = index.branch_element
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    for start in starts:
        c.SetActiveElement(str(names[start]))
        if not ckt.Enabled:
            continue
        nph = ckt.NumPhases
        y = np.asarray(ckt.Yprim, dtype=float)
        node_of = np.asarray(ckt.NodeRef, dtype=np.int64) - 1  # Y index, -1 = ground
        y = (y[0::2] + 1j * y[1::2]).reshape(node_of.size, node_of.size)
        live = np.flatnonzero(node_of >= 0)
        rows.append(np.repeat(start + np.arange(nph), live.size))
        cols.append(np.tile(node_of[live], nph))
        vals.append(y[:nph, live].ravel())
    y_names = [s.lower() for s in c.YNodeOrder]
    shape = (index.n_branch_conductors, len(y_names))
    if not rows:
        return sp.csr_matrix(shape, dtype=complex), index
    col = np.concatenate(cols)
    if not y_order:  # Y index -> engine node index
        pos = {s: k for k, s in enumerate(engine.node_names())}
        col = np.fromiter((pos[s] for s in y_names), dtype=np.int64, count=len(y_names))[col]
    m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), col)), shape=shape)
    return m, index
