"""AC side of dynamic operating envelopes: the forecast base case over the horizon, and the
check with every connection point at its envelope at once.

Connection points are customer loads of the feeder. Their forecast is part of the
``Profiles`` (multipliers of each load's base kW/kvar, as for any QSTS). For the check each
connection point's load is disabled and a *companion* element takes its place: a load on
the same bus, nodes, connection and kV, constant power over the whole voltage range
(``model=1 vminpu=0 vmaxpu=1000``), whose yearly shape carries the envelope net import
[kW] (and the reactive power that goes with it) of every interval. Everything else on the
feeder follows its forecast.

Regulator taps and capacitor states: the base case runs with controls acting
(``controlmode=static``, taps carried from step to step); the state of every regulated
transformer and capacitor is captured at each step, and the check starts each step from
that state, then either keeps it (``frozen``, as hosting capacity freezes the base case)
or lets the controls respond within the step (``acting``). With every connection point at
zero net (:meth:`EnvelopeNetwork.reference`) the controls act at every ``act_every``-th
step (an acting solve costs 3-5 frozen ones: measured 0.08 against 0.022 s on IEEE 8500)
and the state they settle on is held for the steps in between; every envelope check then
solves at that state, controls frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from derms.errors import ConvergenceError, InputError, ModelError
from derms.grid.model import FeederModel
from derms.powerflow.collect import NetworkIndex, StepCollector, build_index
from derms.powerflow.control_state import (
    ControlState,
    capture_control_state,
    regulated_transformers,
    restore_control_state,
)
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import load_profiles_into_engine
from derms.powerflow.voltage_measure import delta_terms

_COMPANION = "doe__"


@dataclass(frozen=True, slots=True)
class ConnectionPoint:
    """A customer connection: the load element behind it and where it connects.

    ``capacity_kw`` is the connection's rated capacity: the largest envelope it can get
    in either direction, and its weight under the ``proportional`` policy.
    """

    id: str
    load: str  # "load.<name>"
    bus: str
    nodes: tuple[int, ...]
    phases: int
    conn: str
    kv: float
    base_p_kw: float
    base_q_kvar: float
    capacity_kw: float

    @property
    def node_names(self) -> list[str]:
        return [f"{self.bus}.{k}" for k in self.nodes]

    @property
    def injection_names(self) -> list[str]:
        """Where its power goes, shared equally: its phase nodes (wye), or the node pairs
        "bus.a.b" of a delta connection (as the load the AC check adds draws it)."""
        if self.conn.lower() != "delta" or len(self.nodes) < 2:
            return self.node_names
        return delta_terms(self.bus, self.nodes, self.phases)

    @property
    def phase_label(self) -> str:
        return ".".join(str(k) for k in self.nodes)


def connection_points(model: FeederModel, loads: Sequence[str] | None = None, *,
                      min_capacity_kw: float = 20.0, capacity_factor: float = 2.0,
                      capacity_kw: dict[str, float] | None = None) -> list[ConnectionPoint]:
    """Connection points from the feeder's enabled loads (all, or the names given).

    Names may be given with or without the ``load.`` prefix (case-insensitive). Capacity:
    ``capacity_kw[name]`` when given, else ``max(min_capacity_kw, capacity_factor x the
    load's base kW)``. Unknown or disabled loads raise :class:`ModelError` naming them.
    """
    enabled = {ld.name: ld for ld in model.loads if ld.enabled}
    if loads is None:
        chosen = list(enabled.values())
    else:
        chosen = []
        for raw in loads:
            name = str(raw).strip().lower()
            key = name if name.startswith("load.") else f"load.{name}"
            if key not in enabled:
                raise ModelError(f"connection point {raw!r}: no enabled load of that name "
                                 "in the feeder")
            chosen.append(enabled[key])
        if len({ld.name for ld in chosen}) != len(chosen):
            raise ModelError("the connection-point list has duplicates")
    if not chosen and loads is not None:  # (it said the feeder had no enabled loads)
        raise InputError("the connection-point list is empty: name at least one load (or "
                         "give none for every load)")
    if not chosen:
        raise ModelError(f"feeder {model.name} has no enabled loads to be connection points")
    caps = {k.lower().removeprefix("load."): v for k, v in (capacity_kw or {}).items()}
    out = []
    for ld in chosen:
        cid = ld.name.removeprefix("load.")
        cap = caps.get(cid, max(min_capacity_kw, capacity_factor * max(ld.p_kw, 0.0)))
        if not np.isfinite(cap) or cap <= 0:
            raise ModelError(f"connection point {cid}: capacity must be positive, got {cap} kW")
        nodes = tuple(int(k) for k in ld.nodes if int(k) > 0)
        out.append(ConnectionPoint(cid, ld.name, ld.bus, nodes, ld.phases, ld.conn, ld.kv,
                                   ld.p_kw, ld.q_kvar, float(cap)))
    return out


@dataclass(frozen=True)
class HorizonStates:
    """AC results over the horizon (step on axis 0), as :class:`StepCollector` reads them."""

    v_pu: np.ndarray  # (T, n_nodes)
    i_a: np.ndarray  # (T, n_branch_conductors)
    head_p_kw: np.ndarray  # (T,) total over phases, import positive
    converged: np.ndarray  # (T,) bool


class EnvelopeNetwork:
    """One compiled engine set up for the horizon: forecast shapes, companions, states.

    ``base()`` runs the forecast base case (controls acting) and captures the control
    state of every step; ``check(p_kw, q_kvar, steps)`` solves the chosen steps with every
    connection point at the given net import (T, n_cp) [kW], [kvar], controls frozen at
    that step's base-case state.
    """

    def __init__(self, engine: OpenDSSEngine, profiles: Profiles,
                 cps: Sequence[ConnectionPoint], index: NetworkIndex | None = None) -> None:
        self.engine, self.profiles, self.cps = engine, profiles, list(cps)
        self.n_steps = profiles.n_steps
        self._sec = profiles.step.total_seconds()
        load_profiles_into_engine(engine, profiles)
        self.index = index or build_index(engine)
        self._regulated = regulated_transformers(engine)
        self._states: list[ControlState] = []
        self.ref_states: dict[int, ControlState] = {}
        self.n_solves = 0  # AC solves run (base case and checks)
        c = engine.circuit
        t = self.n_steps
        zeros = np.zeros(t)
        for k, cp in enumerate(cps):
            shape = f"{_COMPANION}{k}"
            engine.command(f"new loadshape.{shape} npts={t} sinterval={self._sec}")
            c.LoadShapes.Name = shape  # data now: a shape without data crashes the engine
            c.LoadShapes.Pmult = zeros
            c.LoadShapes.Qmult = zeros
            engine.command(
                f"new load.{shape} bus1={cp.bus}.{cp.phase_label} phases={cp.phases} "
                f"conn={cp.conn} kV={cp.kv} kW=1 kvar=1 model=1 vminpu=0 vlowpu=0 "
                f"vmaxpu=1000 yearly={shape} enabled=no"
            )
        if c.SetActiveElement(self.index.source) < 0:
            raise ModelError(f"feeder source {self.index.source} not found")
        mult = np.array([_base_mult(profiles, cp.load) for cp in cps]).T  # (T, n_cp)
        q_mult = np.array([_base_mult(profiles, cp.load, q=True) for cp in cps]).T
        base_p = np.array([cp.base_p_kw for cp in cps])
        base_q = np.array([cp.base_q_kvar for cp in cps])
        self.cp_p_kw = mult * base_p  # forecast net import of each connection point
        self.cp_q_kvar = q_mult * base_q

    # ------------------------------------------------------------------ base case
    def base(self, on_step: Callable[[int], None] | None = None) -> HorizonStates:
        """Forecast base case over the horizon, controls acting; captures their states."""
        eng = self.engine
        eng.set_control_mode("static")
        eng.command(f"set mode=yearly stepsize={self._sec}s number=1")
        col = StepCollector(eng, self.index, self.n_steps)
        sol = eng.circuit.Solution
        self._states = []
        for k in range(self.n_steps):
            self._goto(k)
            sol.Solve()
            self.n_solves += 1
            col.collect(k)
            self._states.append(capture_control_state(eng, self._regulated))
            if on_step is not None:
                on_step(k)
        self._base = HorizonStates(col.v_pu.copy(), col.i_a.astype(float),
                                   col.head_p_kw.sum(axis=1), col.converged.copy())
        return self._base

    # ------------------------------------------------------------------ zero net
    def reference(self, act_every: int | None = 6,
                  on_step: Callable[[int], None] | None = None) -> HorizonStates:
        """Every connection point at zero net import, all steps: the state the envelopes
        start from. Controls act at every ``act_every``-th step (from its base-case state)
        and the state they settle on is held for the steps up to the next one; the result
        is the control state of every later :meth:`check` (see the module docstring).
        ``act_every=None``: controls stay frozen at the base-case states."""
        if not self._states:
            raise ModelError("run base() before reference()")
        zero = np.zeros((self.n_steps, len(self.cps)))
        if act_every is None:
            self.ref_states = dict(enumerate(self._states))
            if not (self.cp_p_kw.any() or self.cp_q_kvar.any()):
                return self._base  # zero net is the base case (e.g. a new connection)
            return self.check(zero, zero, on_step=on_step)
        acted: dict[int, ControlState] = {}
        every = max(1, int(act_every))
        sampled = list(range(0, self.n_steps, every))
        first = self.check(zero, zero, sampled, controls="acting", captured=acted)
        self.ref_states = {k: acted[(k // every) * every] for k in range(self.n_steps)}
        rest = [k for k in range(self.n_steps) if k % every]
        out = HorizonStates(np.empty((self.n_steps,) + first.v_pu.shape[1:]),
                            np.empty((self.n_steps,) + first.i_a.shape[1:]),
                            np.empty(self.n_steps), np.zeros(self.n_steps, dtype=bool))
        for src, steps in ((first, sampled), (self.check(zero, zero, rest, on_step=on_step),
                                              rest)):
            out.v_pu[steps], out.i_a[steps] = src.v_pu, src.i_a
            out.head_p_kw[steps], out.converged[steps] = src.head_p_kw, src.converged
        return out

    # ------------------------------------------------------------------ check
    def check(self, p_kw: np.ndarray, q_kvar: np.ndarray, steps: Sequence[int] | None = None,
              on_step: Callable[[int], None] | None = None, *,
              controls: str = "frozen", states: dict[int, ControlState] | None = None,
              captured: dict[int, ControlState] | None = None) -> HorizonStates:
        """Solve ``steps`` (default all) with every connection point at net import
        ``p_kw[k]``, ``q_kvar[k]`` (arrays (T, n_cp)); rows of the result follow ``steps``.

        Each step starts from its control state (given in ``states``, else the zero-net
        reference's, else the base case's); ``controls="frozen"`` keeps it, ``"acting"`` lets regulators and
        capacitors respond within the step. ``captured`` (a dict) receives each step's
        control state after the solve."""
        if not self._states:
            raise ModelError("run base() before check()")
        steps = list(range(self.n_steps)) if steps is None else list(steps)
        eng, c = self.engine, self.engine.circuit
        ls = c.LoadShapes
        for k in range(len(self.cps)):
            ls.Name = f"{_COMPANION}{k}"
            ls.Pmult = np.ascontiguousarray(p_kw[:, k], dtype=float)
            ls.Qmult = np.ascontiguousarray(q_kvar[:, k], dtype=float)
        self._swap(companions=True)
        eng.set_control_mode("off" if controls == "frozen" else "static")
        col = StepCollector(eng, self.index, len(steps))
        sol = c.Solution
        try:
            for row, k in enumerate(steps):
                state = (states or {}).get(k) or self.ref_states.get(k) or self._states[k]
                restore_control_state(eng, state)
                self._goto(k)
                sol.Solve()
                self.n_solves += 1
                col.collect(row)
                if captured is not None:
                    captured[k] = capture_control_state(eng, self._regulated)
                if on_step is not None:
                    on_step(row)
        finally:
            self._swap(companions=False)
        return HorizonStates(col.v_pu.copy(), col.i_a.astype(float),
                             col.head_p_kw.sum(axis=1), col.converged.copy())

    def _goto(self, step: int) -> None:
        sec = step * self._sec
        h = int(sec // 3600)
        self.engine.command(f"set time=({h},{sec - 3600 * h:g})")

    def _swap(self, *, companions: bool) -> None:
        c = self.engine.circuit
        el = c.ActiveCktElement
        for k, cp in enumerate(self.cps):
            if c.SetActiveElement(cp.load) < 0:
                raise ModelError(f"connection point load {cp.load} vanished from the circuit")
            el.Enabled = not companions
            c.SetActiveElement(f"load.{_COMPANION}{k}")
            el.Enabled = companions


def _base_mult(profiles: Profiles, element: str, *, q: bool = False) -> np.ndarray:
    """An element's multiplier over the horizon (1 where the profiles do not name it)."""
    try:
        j = profiles.elements.index(element)
    except ValueError:
        return np.ones(profiles.n_steps)
    arr = profiles.q_mult if (q and profiles.q_mult is not None) else profiles.p_mult
    return np.asarray(arr[:, j], dtype=float)


def require_converged(states: HorizonStates, what: str) -> None:
    """Raise :class:`ConvergenceError` naming the first step that did not converge."""
    bad = np.flatnonzero(~states.converged)
    if bad.size:
        raise ConvergenceError(f"{what}: the AC solve of step {int(bad[0])} did not converge "
                               f"({bad.size} steps in all)")
