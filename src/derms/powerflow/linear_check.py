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
    ungrounded = engine.voltage_pairs() >= 0  # a node-to-ground injection there is ill-posed
    return [s for s, ug in zip(engine.node_names(), ungrounded, strict=True)
            if s.rsplit(".", 1)[0] != source_bus and s not in excluded and not ug]


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


def box_cox(v: np.ndarray, k: float) -> np.ndarray:
    """``f_k(v) = (v^k - 1) / k``, ``log v`` at ``k = 0``: increasing in ``v`` for every ``k``."""
    return np.log(v) if k == 0 else (v**k - 1.0) / k


def readout_v_pu(v0_pu: np.ndarray, u_pu: np.ndarray, k: float = 2.0) -> np.ndarray:
    """|V| [pu] of a model linear in ``f_k(|V|)`` (:func:`box_cox`) with first-order ``u``.

    ``f_k(V) = f_k(V0) + f_k'(V0) u`` with ``f_k'(V0) = V0^(k-1)`` and ``u = dv_dp @ p +
    dv_dq @ q`` [pu] the first-order change of :class:`LinearModel`: ``k = 2`` is its
    ``predict_v_pu`` (``sqrt(V0^2 + 2 V0 u)``), ``k = 1`` is ``V0 + u``, ``k = 0`` is
    ``V0 exp(u / V0)``, ``k = -1`` is ``V0 / (1 - u / V0)``. Where ``f_k`` leaves its
    range (a collapse of the readout), ``0`` for ``k > 0`` and ``inf`` for ``k < 0``.
    ``v0_pu`` broadcasts against ``u_pu`` (pass ``v0[:, None]`` for scenario columns).
    """
    v0, u = np.asarray(v0_pu, dtype=float), np.asarray(u_pu, dtype=float)
    if k == 0:
        return v0 * np.exp(u / v0)
    x = v0**k + k * v0 ** (k - 1) * u
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(x, 0.0) ** (1 / k) if k > 0 else np.where(x > 0, x ** (1 / k), np.inf)


def mirror_floor(v0_pu: np.ndarray, a_pu: np.ndarray, b_pu: np.ndarray, k: float = 2.0,
                 *, iterations: int = 60) -> np.ndarray:
    """Per node, the least ``max(|pa - a|, |pb - b|)`` with ``f_k(pa) + f_k(pb) = 2 f_k(V0)``.

    ``a``, ``b`` are the AC |V| [pu] on a draw and its mirror. Any model linear in
    ``f_k(|V|)`` and exact at zero injection predicts a pair ``pa``, ``pb`` on that curve,
    whatever its sensitivities; ``f_k`` increasing, the closest pair moves both by the same
    ``e`` the same way, found by bisection (to ``2^-iterations`` of the bracket). [pu]
    """
    v0, a, b = (np.asarray(x, dtype=float) for x in (v0_pu, a_pu, b_pu))
    excess = box_cox(a, k) + box_cox(b, k) - 2 * box_cox(v0, k)
    sign = np.sign(excess)  # > 0: both predictions must be lower than the AC figures
    hi = np.maximum(np.where(excess > 0, np.maximum(a, b) - v0, v0 - np.minimum(a, b)), 0.0)
    lo = np.zeros_like(hi)
    for _ in range(iterations):
        e = (lo + hi) / 2
        pa, pb = np.maximum(a - sign * e, 1e-9), np.maximum(b - sign * e, 1e-9)
        short = sign * (box_cox(pa, k) + box_cox(pb, k) - 2 * box_cox(v0, k)) > 0
        lo, hi = np.where(short, e, lo), np.where(short, hi, e)
    return (lo + hi) / 2


def mirror_bound(engine: OpenDSSEngine, model: LinearModel, p_kw: np.ndarray,
                 q_kvar: np.ndarray, k: float = 2.0) -> tuple[float, float, float]:
    """Errors on a draw and its mirror, and the least any model linear in ``f_k(|V|)`` allows.

    A model linear in ``f_k(|V|)`` (:func:`box_cox`; ``k = 2``: ``|V|^2``, as
    :class:`LinearModel` and the optimisers that take its ``u`` rows) and exact at zero
    injection predicts ``f_k(V(s)) + f_k(V(-s)) = 2 f_k(V0)`` for the draw ``s`` and its
    mirror ``-s``. The AC solves ``a``, ``b`` break that by their curvature, so at every
    node one of the two errors is at least :func:`mirror_floor`, whatever the
    sensitivities. The errors are those of :func:`readout_v_pu` with this ``k`` (``k = 2``:
    ``model.predict_v_pu``).

    Returns
    -------
    (error on s, error on -s, lower bound) [pu], maxima over the energised nodes.
    """
    v0 = model.v0_pu
    ok = v0 > 0
    a = solve_ac_with_injections(engine, model.injection_nodes, p_kw, q_kvar)
    b = solve_ac_with_injections(engine, model.injection_nodes, -p_kw, -q_kvar)
    u = model.dv_dp_pu_per_kw @ p_kw + model.dv_dq_pu_per_kvar @ q_kvar
    e_a = np.abs(a - readout_v_pu(v0, u, k))[ok].max()
    e_b = np.abs(b - readout_v_pu(v0, -u, k))[ok].max()
    bound = mirror_floor(v0[ok], a[ok], b[ok], k).max()
    return float(e_a), float(e_b), float(bound)
