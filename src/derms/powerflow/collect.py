"""Per-step result collection from an OpenDSS engine into preallocated numpy arrays.

:class:`NetworkIndex` is built once per compiled circuit: which entries of the engine's
flat result vectors belong to which node, branch conductor and transformer. Each step then
costs three vectorised engine calls (node voltages, PD element currents, source powers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from derms.powerflow.engine import OpenDSSEngine

_SQRT3 = np.sqrt(3.0)


@dataclass(frozen=True)
class NetworkIndex:
    """Index maps from engine result vectors to nodes, branch conductors and transformers.

    Branch conductors are the phase conductors of terminal 1 of every two-terminal PD
    element (lines, transformers, reactors in series), in engine order.
    """

    node_bus: np.ndarray  # (n_nodes,) str
    node_phase: np.ndarray  # (n_nodes,) int: OpenDSS node number
    node_kv_base_ln: np.ndarray  # (n_nodes,) kV
    branch_element: np.ndarray  # (n_cond,) str, e.g. "line.650632"
    branch_phase: np.ndarray  # (n_cond,) int node number at terminal 1
    branch_norm_a: np.ndarray  # (n_cond,) A (engine rating, 0 when none)
    branch_emerg_a: np.ndarray  # (n_cond,) A
    branch_bus1: np.ndarray  # (n_cond,) str
    branch_bus2: np.ndarray  # (n_cond,) str
    current_pos: np.ndarray  # (n_cond,) int: position of Re(I) in PDElements.AllCurrents
    n_pd_values: int  # expected length of PDElements.AllCurrents
    xfmr_rated_a: np.ndarray  # (n_cond,) A nameplate current per phase (nan for non-transformers)
    xfmr_kva: np.ndarray  # (n_cond,) kVA (nan for non-transformers)
    source: str  # "vsource.<name>"
    source_phases: int
    # (n_nodes,) line-to-line partner of nodes on ungrounded (3-wire) areas, -1 elsewhere:
    # their voltage is measured line to line (:mod:`derms.powerflow.voltage_measure`)
    v_pair: np.ndarray | None = None

    @property
    def n_nodes(self) -> int:
        return len(self.node_bus)

    @property
    def n_branch_conductors(self) -> int:
        return len(self.branch_element)


def build_index(engine: OpenDSSEngine) -> NetworkIndex:
    """Walk the compiled circuit once and build the :class:`NetworkIndex`."""
    c = engine.circuit
    names = engine.node_names()
    node_bus = np.array([n.split(".")[0] for n in names], dtype=object)
    node_phase = np.array([int(n.split(".")[1]) for n in names], dtype=int)
    kv_base = {}
    for i, b in enumerate(c.AllBusNames):
        c.SetActiveBusi(i)
        kv_base[b.lower()] = c.ActiveBus.kVBase
    node_kv = np.array([kv_base[b] for b in node_bus], dtype=float)

    pd = c.PDElements
    ckt = c.ActiveCktElement
    elem, phase, norm, emerg, b1s, b2s, pos, rated, kvas = ([] for _ in range(9))
    names = list(pd.AllNames)  # every PD element, disabled ones included, in result order
    n_values = 2 * np.asarray(pd.AllNumTerminals) * np.asarray(pd.AllNumConductors)
    offsets = np.concatenate([[0], np.cumsum(n_values)])
    for e, full in enumerate(names):
        c.SetActiveElement(full)  # hashed lookup; PDElements.Name would scan: O(n^2)
        nterm, nph = ckt.NumTerminals, ckt.NumPhases
        if nterm < 2 or pd.IsShunt:
            continue
        name = full.lower()
        spec = [b.lower().split(".") for b in ckt.BusNames]
        buses = [b[0] for b in spec]
        nodes = [int(n) for n in spec[0][1:]] or list(range(1, nph + 1))
        r_a, kva = _transformer_rating(c, name, nph)
        for k in range(nph):
            elem.append(name)
            phase.append(int(nodes[k]))
            norm.append(ckt.NormalAmps)
            emerg.append(ckt.EmergAmps)
            b1s.append(buses[0])
            b2s.append(buses[1])
            pos.append(int(offsets[e]) + 2 * k)
            rated.append(r_a)
            kvas.append(kva)
    offset = int(offsets[-1])
    vs = c.Vsources
    vs.First
    return NetworkIndex(
        node_bus=node_bus, node_phase=node_phase, node_kv_base_ln=node_kv,
        branch_element=np.array(elem, dtype=object), branch_phase=np.array(phase, dtype=int),
        branch_norm_a=np.array(norm, dtype=float), branch_emerg_a=np.array(emerg, dtype=float),
        branch_bus1=np.array(b1s, dtype=object), branch_bus2=np.array(b2s, dtype=object),
        current_pos=np.array(pos, dtype=np.int64), n_pd_values=offset,
        xfmr_rated_a=np.array(rated, dtype=float), xfmr_kva=np.array(kvas, dtype=float),
        source=f"vsource.{vs.Name.lower()}", source_phases=ckt.NumPhases,
        v_pair=engine.voltage_pairs(),
    )


def _transformer_rating(c, name: str, nphases: int) -> tuple[float, float]:
    """Nameplate current per phase of winding 1 [A] and kVA; nan for other elements."""
    if not name.startswith("transformer."):
        return np.nan, np.nan
    tr = c.Transformers
    tr.Name = name.split(".", 1)[1]
    tr.Wdg = 1
    kva, kv = tr.kVA, tr.kV
    kv_phase = kv if nphases == 1 else kv / _SQRT3
    return (kva / (nphases * kv_phase) if kv_phase > 0 else np.nan), kva


class StepCollector:
    """Collects node voltages, branch currents, head powers and losses, one step at a time.

    Arrays have the step on axis 0. ``head_p_kw``/``head_q_kvar`` (n_steps, n_phases) are
    the power drawn by the feeder from the source (import positive).
    """

    def __init__(self, engine: OpenDSSEngine, index: NetworkIndex, n_steps: int) -> None:
        self.engine, self.index = engine, index
        self.v_pu = np.empty((n_steps, index.n_nodes))
        self.i_a = np.empty((n_steps, index.n_branch_conductors), dtype=np.float32)
        self.head_p_kw = np.empty((n_steps, index.source_phases))
        self.head_q_kvar = np.empty((n_steps, index.source_phases))
        self.losses_kw = np.empty(n_steps)
        self.losses_kvar = np.empty(n_steps)
        self.converged = np.zeros(n_steps, dtype=bool)
        self._c = engine.circuit
        self._pd = self._c.PDElements
        self._ll = (np.flatnonzero(index.v_pair >= 0) if index.v_pair is not None
                    else np.zeros(0, dtype=np.int64))

    def collect(self, step: int) -> None:
        """Read the engine's current solution into row ``step``."""
        c, ix = self._c, self.index
        self.v_pu[step] = c.AllBusVmagPu
        if self._ll.size:  # ungrounded areas: line-to-line magnitudes
            v = np.asarray(c.AllBusVolts)
            v = v[0::2] + 1j * v[1::2]
            self.v_pu[step, self._ll] = np.abs(v[self._ll] - v[ix.v_pair[self._ll]]) / (
                _SQRT3 * 1000.0 * ix.node_kv_base_ln[self._ll])
        cur = np.asarray(self._pd.AllCurrents)  # (re, im) per conductor, like MagAng
        if cur.size != ix.n_pd_values:
            raise RuntimeError("circuit topology changed since the index was built")
        self.i_a[step] = np.hypot(cur[ix.current_pos], cur[ix.current_pos + 1])
        c.SetActiveElement(ix.source)
        pw = np.asarray(c.ActiveCktElement.Powers)[: 2 * ix.source_phases]
        self.head_p_kw[step] = -pw[0::2]
        self.head_q_kvar[step] = -pw[1::2]
        loss = c.Losses
        self.losses_kw[step] = loss[0] / 1e3
        self.losses_kvar[step] = loss[1] / 1e3
        self.converged[step] = c.Solution.Converged
