"""The linearisation-error check of DESIGN.md, shared by the validation tests and the bench.

A draw: injections at 10 % of the nodes (seeded; not the source bus, not nodes on an
ungrounded island), P and Q totals each uniform in ``±share`` of the feeder's total load,
spread with uniform random weights. ``mixed`` gives each node its own random sign (the sum
of magnitudes is then the drawn share); otherwise every node has the sign of its total.
Powers are net import at the node [kW, kvar] (consumption positive), as in
:mod:`derms.powerflow.linear`.
"""

from __future__ import annotations

import numpy as np

from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.linear import LinearModel, build_linear_model, solve_ac_with_injections


def total_load(engine: OpenDSSEngine) -> tuple[float, float]:
    """Sum of the enabled loads' base kW and kvar."""
    loads = engine.circuit.Loads
    p = q = 0.0
    idx = loads.First
    while idx:
        p, q, idx = p + loads.kW, q + loads.kvar, loads.Next
    return p, q


def _candidate_nodes(engine: OpenDSSEngine, excluded: set[str]) -> list[str]:
    ckt = engine.circuit
    ckt.Vsources.First
    source_bus = ckt.ActiveCktElement.BusNames[0].split(".")[0].lower()
    return [s for s in engine.node_names()
            if s.rsplit(".", 1)[0] != source_bus and s not in excluded]


def draw_injections(
    engine: OpenDSSEngine, rng: np.random.Generator, *, share: float = 0.5,
    mixed: bool = False, excluded: set[str] | None = None,
) -> tuple[LinearModel, np.ndarray, np.ndarray]:
    """One draw: the linear model on the drawn nodes, and ``p_kw``, ``q_kvar`` per node.

    Nodes whose own sensitivity is absurd (>= 1 pu per kW: an ungrounded island, where a
    node-to-ground injection is ill-posed) are added to ``excluded`` and redrawn.
    """
    excluded = set() if excluded is None else excluded
    names = engine.node_names()
    row = {s: i for i, s in enumerate(names)}
    while True:
        nodes = [str(s) for s in rng.choice(_candidate_nodes(engine, excluded),
                                            size=round(0.1 * len(names)), replace=False)]
        model = build_linear_model(engine, nodes)
        rows, cols = [row[s] for s in nodes], np.arange(len(nodes))
        own = np.maximum(np.abs(model.dv_dp_pu_per_kw[rows, cols]),
                         np.abs(model.dv_dq_pu_per_kvar[rows, cols]))
        if (own < 1.0).all():
            break
        excluded |= {s for s, o in zip(nodes, own, strict=True) if o >= 1.0}
    p_total, q_total = total_load(engine)
    wp, wq = rng.random(len(nodes)), rng.random(len(nodes))
    up, uq = rng.uniform(-share, share, 2)
    p, q = up * p_total * wp / wp.sum(), uq * q_total * wq / wq.sum()
    if mixed:
        p, q = p * rng.choice([-1, 1], len(nodes)), q * rng.choice([-1, 1], len(nodes))
    return model, p, q


def linearisation_error(engine: OpenDSSEngine, model: LinearModel, p_kw: np.ndarray,
                        q_kvar: np.ndarray) -> float:
    """Largest node |V| difference [pu] between the linear prediction and the AC solve."""
    v_ac = solve_ac_with_injections(engine, model.injection_nodes, p_kw, q_kvar)
    return float(np.abs(v_ac - model.predict_v_pu(p_kw, q_kvar)).max())


def mirror_bound(engine: OpenDSSEngine, model: LinearModel, p_kw: np.ndarray,
                 q_kvar: np.ndarray) -> tuple[float, float, float]:
    """Errors on a draw and its mirror, and the least error any squared-magnitude model allows.

    A model linear in ``|V|^2`` and exact at zero injection (as :class:`LinearModel` and
    the optimisers that take its ``u`` rows) predicts ``|V(s)|^2 + |V(-s)|^2 = 2 |V0|^2``
    for the draw ``s`` and its mirror ``-s``. The AC solves ``a``, ``b`` break that by
    their curvature, so at every node one of the two errors is at least about
    ``|(a^2 + b^2) / 2 - |V0|^2| / (a + b)`` [pu], whatever the sensitivities.

    Returns
    -------
    (error on s, error on -s, lower bound) [pu], maxima over the energised nodes.
    """
    v0 = model.v0_pu
    ok = v0 > 0
    a = solve_ac_with_injections(engine, model.injection_nodes, p_kw, q_kvar)
    b = solve_ac_with_injections(engine, model.injection_nodes, -p_kw, -q_kvar)
    e_a = np.abs(a - model.predict_v_pu(p_kw, q_kvar))[ok].max()
    e_b = np.abs(b - model.predict_v_pu(-p_kw, -q_kvar))[ok].max()
    bound = np.abs(((a**2 + b**2) / 2 - v0**2) / (a + b))[ok].max()
    return float(e_a), float(e_b), float(bound)
