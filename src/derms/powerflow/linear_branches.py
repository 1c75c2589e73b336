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


def branch_current_matrix(engine: OpenDSSEngine, index: NetworkIndex | None = None
                          ) -> tuple[sp.csr_matrix, NetworkIndex]:
    """``M`` (n_branch_conductors x n_nodes, complex, [A per V]) and the index naming its rows.

    Rows of disabled or open elements are zero.
    """
    index = index or build_index(engine)
    c = engine.circuit
    ckt = c.ActiveCktElement
    pos = {s: k for k, s in enumerate(engine.node_names())}
    rows, cols, vals = [], [], []
    names = index.branch_element
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    for start in starts:
        c.SetActiveElement(str(names[start]))
        if not ckt.Enabled:
            continue
        ncond, nterm, nph = ckt.NumConductors, ckt.NumTerminals, ckt.NumPhases
        y = np.asarray(ckt.Yprim, dtype=float)
        y = (y[0::2] + 1j * y[1::2]).reshape(ncond * nterm, ncond * nterm)
        nodes = ckt.NodeOrder
        buses = [b.split(".")[0].lower() for b in ckt.BusNames]
        node_of = np.array([
            pos.get(f"{buses[t]}.{nodes[t * ncond + k]}", -1) if nodes[t * ncond + k] else -1
            for t in range(nterm) for k in range(ncond)
        ])
        live = np.flatnonzero(node_of >= 0)
        for k in range(nph):
            rows.append(np.full(live.size, start + k))
            cols.append(node_of[live])
            vals.append(y[k, live])
    shape = (index.n_branch_conductors, len(pos))
    if not rows:
        return sp.csr_matrix(shape, dtype=complex), index
    m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=shape)
    return m, index
