"""Which voltage a node's limit applies to: to ground, or line to line on ungrounded feeders.

On a 3-wire ungrounded (delta) system nothing ties the phases to ground but the lines'
capacitance (and OpenDSS's anti-float conductance): node-to-ground voltages float with the
capacitive unbalance (IEEE 37: 0.87 / 1.02 / 0.90 pu at the substation bus whose
line-to-line voltages are 0.92-0.95 pu), and customers, all connected line to line or
through transformers, never see them. There the limit applies to the line-to-line
voltage (ANSI C84.1 on 3-wire systems).

:func:`ungrounded_pairs` finds those nodes: buses are joined into areas by lines (and
series reactors) with a closed conductor (an open switch separates them), transformers
separate areas, and an area is *grounded* when any element other than a capacitor
connects one of its buses to ground (node 0: a wye winding, load, generator or PV system
with its neutral at 0, a one-phase element on one node, a Vsource, a reactor to ground, a
line conductor tied to node 0). The rule reads the element connections, not their
present admittance: a wye load at 0 kW still grounds the bus it sits on. Every phase node of an ungrounded
area is paired with the next phase node of its bus (3 nodes: 1-2, 2-3, 3-1; 2 nodes:
each other); its measure is then ``|V_a - V_b| / (sqrt(3) kVBase)`` [pu], the line-to-line
magnitude on the same per-unit base (a balanced bus reads the same either way). A node
alone on its bus in such an area keeps its node-to-ground measure.

:func:`measure_pu` applies the pairing to complex node voltages. Grounded feeders (every
one of the bundled ones but IEEE 37) are untouched: all pairs are -1.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)
_SQRT3 = np.sqrt(3.0)
_NOT_GROUNDING = ("capacitor.", "energymeter.", "monitor.", "fault.")


def ungrounded_pairs(engine) -> np.ndarray:
    """(n_nodes,) engine node index of each node's line-to-line partner, -1 where the
    node-to-ground voltage is the measure (see module docstring)."""
    ckt = engine.circuit
    names = engine.node_names()
    bus_of = [n.split(".")[0] for n in names]
    buses = sorted(set(bus_of))
    bid = {b: k for k, b in enumerate(buses)}
    parent = np.arange(len(buses))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    grounded = np.zeros(len(buses), dtype=bool)
    el = ckt.ActiveCktElement
    for full in ckt.AllElementNames:
        low = full.lower()
        if low.startswith(("energymeter.", "monitor.")):
            continue
        ckt.SetActiveElement(full)
        if not el.Enabled:
            continue
        specs = [b.lower() for b in el.BusNames]
        spec = [b.split(".")[0] for b in specs]
        listed = [_listed(b) for b in specs]
        series = low.startswith(("line.", "reactor.")) and len(spec) == 2
        if series and all(b in bid for b in spec):
            if spec[0] != spec[1] and _conducts(el):
                ra, rb = find(bid[spec[0]]), find(bid[spec[1]])
                parent[ra] = rb
            for t in (0, 1):  # a conductor tied to node 0 (a grounding switch)
                if 0 in listed[t]:
                    grounded[bid[spec[t]]] = True
            continue
        if series:  # a reactor (or line) from a bus to ground (its other end all node 0)
            for t in (0, 1):
                if spec[t] in bid and spec[1 - t] not in bid and _conducts(el):
                    grounded[bid[spec[t]]] = True
            continue
        if low.startswith(_NOT_GROUNDING):
            continue
        ncond, nph = int(el.NumConductors), int(el.NumPhases)
        delta = _delta_terminals(ckt, low, len(spec))
        for t, b in enumerate(spec):
            if b not in bid:
                continue
            if delta[t]:  # delta: to ground only through a node-0 entry, or one phase
                # on one node (OpenDSS ties its other end to ground)
                hit = 0 in listed[t] or (nph == 1 and len(listed[t]) == 1)
            else:
                hit = _touches_ground(specs[t], ncond, nph)
            if hit:
                grounded[bid[b]] = True
    root = np.array([find(k) for k in range(len(buses))])
    area_grounded = np.zeros(len(buses), dtype=bool)
    area_grounded[root[grounded]] = True
    floating = ~area_grounded[root]
    pair = np.full(len(names), -1, dtype=np.int64)
    if not floating.any():
        return pair
    by_bus: dict[str, list[int]] = {}
    for k, n in enumerate(names):
        ph = int(n.split(".")[1])
        if floating[bid[bus_of[k]]] and 1 <= ph <= 3:
            by_bus.setdefault(bus_of[k], []).append(k)
    for nodes in by_bus.values():
        if len(nodes) < 2:
            continue
        nodes = sorted(nodes, key=lambda k: names[k])
        for i, k in enumerate(nodes):
            pair[k] = nodes[(i + 1) % len(nodes)] if len(nodes) > 2 else nodes[1 - i]
    log.info("voltage_measure ungrounded_buses=%d line_to_line_nodes=%d",
             int(floating.sum()), int((pair >= 0).sum()))
    return pair


def _listed(bus_spec: str) -> list[int]:
    """Node numbers a bus spec names ("701.1.2" -> [1, 2]; "701" -> [])."""
    return [int(x) for x in bus_spec.split(".")[1:] if x.strip().lstrip("-").isdigit()]


def _conducts(el) -> bool:
    """The active two-terminal element joins its buses: some phase conductor is closed at
    both ends (an open switch does not join areas)."""
    for k in range(1, int(el.NumPhases) + 1):
        try:
            if not el.IsOpen(1, k) and not el.IsOpen(2, k):
                return True
        except Exception:  # noqa: BLE001 - engines without per-conductor state: closed
            return True
    return False


def _touches_ground(bus_spec: str, ncond: int, nphases: int) -> bool:
    """A terminal's conductors reach node 0: listed as 0, or left unlisted (OpenDSS
    connects conductors the bus spec does not name to ground; with no node listed the
    phases take nodes 1..n). Read from the spec, so it needs no solved circuit."""
    listed = _listed(bus_spec)
    if not listed:
        return ncond > nphases
    return 0 in listed or len(listed) < ncond


def _delta_terminals(ckt, name: str, n_terminals: int) -> list[bool]:
    """Per terminal of the active element: delta-connected (its neutral conductor, which
    OpenDSS still lists at node 0, carries no winding)."""
    if name.startswith("transformer."):
        tr = ckt.Transformers
        tr.Name = name.split(".", 1)[1]
        out = []
        for w in range(1, n_terminals + 1):
            tr.Wdg = w
            out.append(bool(tr.IsDelta))
        return out
    if name.startswith("autotrans."):  # one conn per winding: "[wye, wye, delta]"
        try:
            text = str(ckt.ActiveDSSElement.Properties("conns").Val).lower()
        except Exception:  # noqa: BLE001
            text = ""
        conns = [c.strip() for c in text.strip("[]() ").replace(",", " ").split()]
        if len(conns) >= n_terminals:
            return [c.startswith(("delta", "ll")) for c in conns[:n_terminals]]
    try:
        conn = str(ckt.ActiveDSSElement.Properties("conn").Val).strip().lower()
    except Exception:  # noqa: BLE001 - elements without a conn property are wye-like
        conn = ""
    return [conn.startswith(("delta", "ll"))] * n_terminals


def term_nodes(term: str) -> list[str]:
    """The nodes an injection term reaches: "bus.n" -> ["bus.n"] (node to ground),
    "bus.a.b" -> ["bus.a", "bus.b"] (between two distinct nodes); [] for anything else."""
    bus, *ends = str(term).strip().lower().split(".")
    if not bus or not 1 <= len(ends) <= 2 or (len(ends) == 2 and ends[0] == ends[1]):
        return []
    return [f"{bus}.{e}" for e in ends]


def partners_in(pair: np.ndarray, order_of_e: np.ndarray, n: int) -> np.ndarray:
    """(n,) the line-to-line partners of :func:`ungrounded_pairs` (engine order) in another
    node order (``order_of_e``: each engine node's index there, e.g. its Y index); -1
    where a node is measured to ground."""
    out = np.full(n, -1, dtype=np.int64)
    e = np.flatnonzero(pair >= 0)
    out[order_of_e[e]] = order_of_e[pair[e]]
    return out


def delta_terms(bus: str, nodes: tuple[int, ...] | list[int], phases: int) -> list[str]:
    """Injection terms "bus.a.b" of a delta (line-to-line) element on phase ``nodes``:
    3 phases a-b, b-c, c-a; 2 phases on 3 nodes a-b, b-c; 2 nodes a-b. Fewer than two
    nodes: the node itself ("bus.n")."""
    k = [int(n) for n in nodes]
    if len(k) < 2:
        return [f"{bus}.{n}" for n in k]
    if len(k) == 2:
        pairs = [(k[0], k[1])]
    elif phases >= 3:
        pairs = [(k[0], k[1]), (k[1], k[2]), (k[2], k[0])]
    else:
        pairs = [(k[0], k[1]), (k[1], k[2])]
    return [f"{bus}.{a}.{b}" for a, b in pairs]


def measure_pu(v: np.ndarray, base_v: np.ndarray, pair: np.ndarray,
               v_pu: np.ndarray | None = None) -> np.ndarray:
    """Voltage magnitudes [pu] from complex node voltages ``v`` [V] and the nodes' LN bases
    ``base_v`` [V]: ``|v|/base`` (or ``v_pu`` as given) where ``pair`` is -1, else
    ``|v - v[pair]| / (sqrt(3) base)``."""
    out = np.abs(v) / base_v if v_pu is None else np.array(v_pu, dtype=float)
    ll = np.flatnonzero(pair >= 0)
    if ll.size:
        out[ll] = np.abs(v[ll] - v[pair[ll]]) / (_SQRT3 * base_v[ll])
    return out
