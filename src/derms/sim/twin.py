"""The digital-twin feeder: one OpenDSS engine context stepping through time.

Customer loads follow the bundled 8760-h load shapes (one per load, drawn with the seed,
as in ``derms study``), times a per-load multiplier the scenario sets (heat wave). The
simulated devices are *not* one OpenDSS element each: every customer load that has devices
gets one companion ``Load.simder_<k>`` at the same bus, nodes and connection, constant
power (model 1, Vminpu 0.5 / Vmaxpu 1.5 so it never turns into an impedance), carrying
the summed net import of its devices (kW and kvar, import positive; negative when they
export). That is the cheapest correct form: the power flow only sees net injections per
bus, and the per-step cost is one setter per loaded bus, not per device. Injected
overloads are further loads ``Load.simovl_<k>`` at their bus.

Each :meth:`FeederTwin.step` sets every load, solves a snapshot power flow (regulators and
capacitors act as in a QSTS, ``controlmode=static``) and returns node voltages averaged
per customer load (the devices' terminal voltage) and the feeder-head P/Q (import
positive), read with vectorised engine calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from derms.errors import InputError
from derms.grid.model import Load
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from derms.studies.profiles_library import load_shapes_at

_PHASE_NODES = (1, 2, 3)


@dataclass(frozen=True)
class TwinStep:
    """One solved step. ``v_load_pu`` (n_loads,): mean phase-node voltage of each customer
    load's bus nodes; ``head_p_kw``/``head_q_kvar``: total feeder-head import; ``v_min_pu``/
    ``v_max_pu`` over energised phase nodes; ``load_kw``: total customer load."""

    v_load_pu: np.ndarray
    head_p_kw: float
    head_q_kvar: float
    v_min_pu: float
    v_max_pu: float
    load_kw: float
    converged: bool
    #: per source phase (a, b, c) head import [kW] / [kvar]
    head_p_phase_kw: np.ndarray | None = None
    head_q_phase_kvar: np.ndarray | None = None
    #: violations the devices cause (DESIGN.md definition, base case = this step without
    #: the devices), when the twin checks them (``check_violations``); see
    #: :class:`DerViolations`
    violations: DerViolations | None = None


@dataclass(frozen=True)
class DerViolations:
    """Violations in this step that the devices cause, as DESIGN.md defines them: a phase
    node outside [0.95, 1.05] pu (tolerance 0.001 pu) or a branch conductor above 100 % of
    its normal rating (tolerance 1 %), where an element already beyond a limit in the base
    case (the same step with the devices' injections at zero) is held to its base-case
    value instead. ``v_excess_pu``: the largest overshoot of the upper voltage limit so
    defined (negative: the margin left); ``loading_excess_pct``: the same for loading;
    ``elements``: the first ten violated node or ``element.phase`` names."""

    n_overvoltage: int
    n_undervoltage: int
    n_thermal: int
    v_excess_pu: float
    loading_excess_pct: float
    elements: tuple[str, ...]

    @property
    def count(self) -> int:
        return self.n_overvoltage + self.n_undervoltage + self.n_thermal


class FeederTwin:
    """A compiled feeder whose loads and device injections are set at every step.

    Parameters
    ----------
    master: the feeder's master file (compiled from a private copy, see OpenDSSEngine).
    seed: picks each load's shape among the five bundled ones.
    utc_offset_h: local standard time of the load shapes (hour-of-year is local).
    overload_buses: buses that may get extra load from the scenario (checked here).
    check_violations: also solve each step without the devices and report the violations
        they cause (:class:`DerViolations`; needs ``frozen_controls``).
    frozen_controls: settle regulators and capacitors once on the base case (loads at their
        base), then hold them (OpenDSS ``controlmode=off``) — what a DERMS whose model
        freezes them at the same settle assumes (its control loop does, having no tap
        SCADA); default False: they act at every step.
    """

    def __init__(self, master: str | Path, *, seed: int = 0, utc_offset_h: float = -8.0,
                 overload_buses: tuple[str, ...] = (), max_iterations: int = 100,
                 frozen_controls: bool = False, check_violations: bool = False) -> None:
        self.engine = OpenDSSEngine(master, SolveSettings(max_iterations=max_iterations))
        self._index = None
        try:
            self._setup(seed, utc_offset_h, overload_buses)
            if frozen_controls:
                self.engine.solve_snapshot()  # the base case, controls acting
                self.engine.set_control_mode("off")
            if check_violations:
                if not frozen_controls:
                    raise InputError("twin: violations are checked with frozen controls only "
                                     "(the base-case solve must not move taps)")
                from derms.powerflow.collect import build_index

                self.engine.solve_snapshot()
                self._index = build_index(self.engine)
        except Exception:
            self.engine.close()
            raise

    def _setup(self, seed: int, utc_offset_h: float, overload_buses: tuple[str, ...]) -> None:
        eng = self.engine
        self.model = read_feeder(eng.ctx, eng.source_master)
        self.loads: list[Load] = [ld for ld in self.model.loads if ld.enabled and ld.p_kw > 0]
        if not self.loads:
            raise InputError(f"feeder {self.model.name} has no customer loads")
        self.utc_offset_h = utc_offset_h
        rng = np.random.default_rng(seed)
        self.shape_of_load = rng.integers(0, 5, size=len(self.loads))
        self.base_kw = np.array([ld.p_kw for ld in self.loads])
        self.base_kvar = np.array([ld.q_kvar for ld in self.loads])
        for k, ld in enumerate(self.loads):
            eng.command(f"new load.simder_{k} bus1={_bus_spec(ld)} phases={ld.phases} "
                        f"conn={ld.conn} kv={ld.kv} kw=0 kvar=0 model=1 vminpu=0.5 "
                        "vmaxpu=1.5")
        self.overload_buses = tuple(b.lower() for b in overload_buses)
        for k, bus in enumerate(self.overload_buses):
            try:
                b = self.model.bus(bus)
            except KeyError:
                raise InputError(f"overload bus {bus!r}: no such bus in feeder "
                                 f"{self.model.name}") from None
            phases = [n for n in b.nodes if n in _PHASE_NODES]
            kv = b.kv_base_ln * (np.sqrt(3) if len(phases) > 1 else 1.0)
            eng.command(f"new load.simovl_{k} bus1={b.name}.{'.'.join(map(str, phases))} "
                        f"phases={len(phases)} kv={kv:.6g} kw=0 kvar=0 model=1 vminpu=0.5 "
                        "vmaxpu=1.5")
        c = eng.circuit
        L = c.Loads
        idx = {}
        for i in range(1, L.Count + 1):
            L.idx = i
            idx[L.Name.lower()] = i
        self._idx_customer = [idx[ld.name.split(".", 1)[1]] for ld in self.loads]
        self._idx_der = [idx[f"simder_{k}"] for k in range(len(self.loads))]
        self._idx_ovl = [idx[f"simovl_{k}"] for k in range(len(self.overload_buses))]
        names = eng.node_names()
        self.node_names = names
        pos = {n: i for i, n in enumerate(names)}
        rows, cols = [], []
        for k, ld in enumerate(self.loads):
            nodes = [n for n in ld.nodes if n in _PHASE_NODES] or list(_PHASE_NODES[:ld.phases])
            hits = [pos[f"{ld.bus}.{n}"] for n in nodes if f"{ld.bus}.{n}" in pos]
            rows += [k] * len(hits)
            cols += hits
        weights = 1.0 / np.bincount(rows, minlength=len(self.loads))[rows]
        self._avg = sp.csr_matrix((weights, (rows, cols)), shape=(len(self.loads), len(names)))
        phase = np.array([int(n.rsplit(".", 1)[1]) for n in names])
        self._phase_node = np.isin(phase, _PHASE_NODES)
        vs = c.Vsources
        vs.First
        self._source = f"vsource.{vs.Name.lower()}"
        c.SetActiveElement(self._source)
        self.n_source_phases = int(c.ActiveCktElement.NumPhases)
        self.source_bus = str(c.ActiveCktElement.BusNames[0]).split(".", 1)[0].lower()

    # ---------------------------------------------------------------------------------------
    @property
    def n_loads(self) -> int:
        return len(self.loads)

    def load_shape(self, t: datetime) -> np.ndarray:
        """Each customer load's shape multiplier at ``t`` (peak 1) -> (n_loads,)."""
        shapes = load_shapes_at(pd.DatetimeIndex([pd.Timestamp(t)]), self.utc_offset_h)[0]
        return shapes[self.shape_of_load]

    def step(self, load_mult: np.ndarray, der_p_kw: np.ndarray, der_q_kvar: np.ndarray,
             overload_kw: np.ndarray | None = None) -> TwinStep:
        """Set the loads and solve.

        ``load_mult`` (n_loads,): multiplier of each customer load's base kW/kvar (shape x
        heat wave); ``der_p_kw``/``der_q_kvar`` (n_loads,): the net import of the devices
        behind each load (import positive: a PV exporting 5 kW is -5); ``overload_kw``
        (n_overload_buses,): extra load, balanced over the bus's phases, unity power
        factor. Raises ConvergenceError when the power flow fails.
        """
        c = self.engine.circuit
        L = c.Loads
        kw = self.base_kw * load_mult
        kvar = self.base_kvar * load_mult
        for i, p, q in zip(self._idx_customer, kw.tolist(), kvar.tolist(), strict=True):
            L.idx = i
            L.kW = p
            L.kvar = q
        for i, p, q in zip(self._idx_der, np.asarray(der_p_kw, float).tolist(),
                           np.asarray(der_q_kvar, float).tolist(), strict=True):
            L.idx = i
            L.kW = p
            L.kvar = q
        if self._idx_ovl:
            extra = np.zeros(len(self._idx_ovl)) if overload_kw is None else overload_kw
            for i, p in zip(self._idx_ovl, np.asarray(extra, float).tolist(), strict=True):
                L.idx = i
                L.kW = p
                L.kvar = 0.0
        self.engine.solve_snapshot()
        v = self.engine.node_voltages_pu()  # line to line on ungrounded (3-wire) areas
        c.SetActiveElement(self._source)
        pw = np.asarray(c.ActiveCktElement.Powers)
        nph = c.ActiveCktElement.NumPhases
        head = -pw[: 2 * nph]
        live = v[self._phase_node & (v > 0.1)]
        converged = bool(c.Solution.Converged)
        viol = self._violations(v) if self._index is not None else None
        return TwinStep(v_load_pu=self._avg @ v, head_p_kw=float(head[0::2].sum()),
                        head_q_kvar=float(head[1::2].sum()), v_min_pu=float(live.min()),
                        v_max_pu=float(live.max()), load_kw=float(kw.sum()),
                        converged=converged, violations=viol,
                        head_p_phase_kw=head[0::2].copy(), head_q_phase_kvar=head[1::2].copy())

    def _violations(self, v: np.ndarray) -> DerViolations:
        """Solve again with the device loads at zero (the engine stays there) and compare
        (class docstring). ``v``: the node voltages of the step's solve."""
        ix, c = self._index, self.engine.circuit
        i_now = self._currents()
        L = c.Loads
        for i in self._idx_der:
            L.idx = i
            L.kW = 0.0
            L.kvar = 0.0
        self.engine.solve_snapshot()
        v0 = self.engine.node_voltages_pu()
        i0 = self._currents()
        node = self._phase_node & (v > 0.1)
        hi, lo = np.maximum(1.05, v0), np.minimum(0.95, v0)
        over = node & (v > hi + 0.001)
        under = node & (v < lo - 0.001)
        rated = ix.branch_norm_a > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            load = np.where(rated, 100.0 * i_now / ix.branch_norm_a, 0.0)
            load0 = np.where(rated, 100.0 * i0 / ix.branch_norm_a, 0.0)
        lim = np.maximum(100.0, load0)
        thermal = rated & (load > lim + 1.0)
        names = [self.node_names[k] for k in np.flatnonzero(over | under)[:10]]
        names += [f"{ix.branch_element[k]}.{ix.branch_phase[k]}"
                  for k in np.flatnonzero(thermal)[:10]]
        return DerViolations(
            int(over.sum()), int(under.sum()), int(thermal.sum()),
            float((v - hi)[node].max()) if node.any() else float("nan"),
            float((load - lim)[rated].max()) if rated.any() else float("nan"),
            tuple(names[:10]))

    def _currents(self) -> np.ndarray:
        ix = self._index
        cur = np.asarray(self.engine.circuit.PDElements.AllCurrents)
        return np.hypot(cur[ix.current_pos], cur[ix.current_pos + 1])

    def has_element(self, element: str) -> bool:
        return self.engine.circuit.SetActiveElement(element) >= 0

    def set_switch(self, element: str, closed: bool) -> None:
        """Open or close terminal 1 of ``element`` (e.g. ``line.sw1``): the hook for ADMS
        switching. InputError for an element the feeder does not have."""
        if not self.has_element(element):
            raise InputError(f"switch element {element!r}: not in feeder {self.model.name}")
        self.engine.command(f"{'close' if closed else 'open'} {element} term=1")

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> FeederTwin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bus_spec(ld: Load) -> str:
    nodes = ".".join(str(n) for n in ld.nodes)
    return f"{ld.bus}.{nodes}" if nodes else ld.bus
