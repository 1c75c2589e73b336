"""AC verification: simulate a schedule on the full OpenDSS model, re-plan until clean.

:class:`ACNetwork` holds one compiled engine with the customer load profiles and one
OpenDSS ``Load`` per DER (constant P/Q at all voltages, ``kW = kvar = 1`` scaled by its
own load shape = the DER's net import, consumption positive; a generating DER is a
negative load). Simulating a schedule rewrites those shapes and steps the engine's
yearly mode (controls as ``control_mode``; "static": regulators and capacitors act).

:func:`plan_and_verify`: solve the LP (network rows centred on the uncontrolled AC
result), simulate, and while the AC check finds violations (DESIGN.md definitions,
pre-existing ones held to the base case) re-centre the rows on the plan's AC result, add
rows for the violating (interval, element) pairs, tighten rows that were violated twice,
and re-solve warm — at most ``max_ac_rounds`` times; then report what still binds.
On large feeders (elastic network rows) each re-solve after an AC round is held in a
trust region around the plan just simulated (``TRUST_FRAC`` of each DER column's range,
shrunk by 0.7 every round), and when rounds run out the plan with the fewest AC
violations is returned (``VerifiedPlan.rounds_log`` lists every round). A round whose AC
violations are not fewer than the best's is rejected: the rows are re-centred on the best
plan and the trust region around it is halved (so the rounds cannot drift away from the
best plan as they did: 380 -> 1,544 -> ... -> 11,428 on IEEE 8500); an accepted round
shrinks it by 0.7. Each AC round re-solves with at most ``LARGE_LINEAR_ROUNDS`` linear
rounds (twice that for the first solve).

With ``ACNetwork(aggregation=...)`` the loop plans groups of DERs moving in fixed
proportion (:mod:`derms.der.aggregate`) and the AC repair then moves each DER on its own
(:class:`~derms.dispatch.members.MemberView`); the plan returned is per DER.

Every simulation starts from one control state (``ACNetwork.control_state``: where a
warm-up base-case pass leaves the taps and capacitors). On large feeders the rows use
sensitivities from ``OPERATING_POINTS`` intervals of the uncontrolled QSTS
(:meth:`ACNetwork.operating_points`; thermal rows from the point where each branch is
most loaded), and from the second AC round on a re-plan is a local repair
(:func:`repair_movers`): only the DERs that act on what is still violated move, the
others keep the centre plan (a move of every DER flips taps and capacitors elsewhere).
A regulator whose band sits so high that one tap step up from its lower edge lands above
the voltage limit holds its monitored node above that edge (``STEP_UP_GUARD``,
:meth:`ACNetwork._guard_step_up`); where the AC check still finds such a regulator's tap above
the base case's in an interval with violations, that interval is re-centred on the base
case with its guard tightened (``STEP_HOLD``, :mod:`derms.dispatch.step_hold`).

A kvar-type capacitor control whose capacitor, in a plan's AC run, is in another state
than in the base case where that difference makes up the violations of an interval is
held at the base case's state there (``CAP_HOLD``, :mod:`derms.dispatch.control_rows`):
the rows see the capacitor's linear effect in that state and one row keeps its monitored
kvar on that side of its setting; ``REPAIR_WIDE`` (off) would also move every DER in an
interval whose violated rows its 10 most sensitive DERs cannot fix.

Two options, off by default (one IEEE 8500 run each made the rounds worse, see
bench/README.md): ``LEARN_MARGINS`` gives a row the AC check finds violated a back-off
margin at once, how much the linear model under-predicted it (:func:`learn_margins`),
instead of at its second violation; ``HOLD_REGULATOR_BANDS`` holds every regulator's
monitored voltage inside its band in the intervals with AC violations
(:meth:`ACNetwork.regulator_bands`), so the taps stay where the reference's AC run put
them and the frozen-control rows stay valid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from derms.analysis.constraints import Limits, ViolationReport, detect_violations
from derms.der.aggregate import Aggregation, AggregationConfig, aggregate, singletons
from derms.der.models import Fleet
from derms.dispatch.ac_repair import RepairConfig, repair_plan
from derms.dispatch.control_rows import (
    HOLD_TOP,
    CapControls,
    CapHold,
    cap_sensitivity,
    cap_states,
    monitored_kvar,
    read_cap_controls,
)
from derms.dispatch.members import MemberView, member_schedule
from derms.dispatch.network import (
    NetworkLimits,
    Reference,
    SensitivitySet,
    der_map,
    der_sensitivity,
    is_large,
    network_limits,
    rows_dense,
    thermal_rows_from_loaded_points,
)
from derms.dispatch.plan import (
    GridContext,
    ObjectiveConfig,
    Planner,
    Schedule,
    uncontrolled_schedule,
)
from derms.dispatch.realtime import RealTimeConfig, correct_in_sequence
from derms.dispatch.step_hold import hold_steps, step_movers, stepped_intervals, with_intervals
from derms.errors import InfeasibleError, InputError
from derms.powerflow.collect import StepCollector, build_index
from derms.powerflow.control_state import (
    capture_control_state,
    regulated_transformers,
    restore_control_state,
)
from derms.powerflow.engine import ControlMode, OpenDSSEngine
from derms.powerflow.linear import build_linear_model
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import QSTSResult, load_profiles_into_engine

log = logging.getLogger(__name__)
_PREFIX = "der_"
EXPORT_TOL_KW = 0.5  # AC head export beyond the limit that triggers another round
LARGE_LINEAR_ROUNDS = 4  # linear re-solves per AC round on large feeders (elastic rows)
HOLD_REGULATOR_BANDS = False  # hold regulator bands where the AC check fails (module doc)
LEARN_MARGINS = False  # large feeders: margins at a row's first AC violation (module doc)
BAND_KEEP = 0.7  # share of a regulator's band the LP may use (the rest absorbs linear error)
TRUST_FRAC = 0.5  # large feeders: share of each DER column's range a re-plan may move
STEP_UP_GUARD = True  # lower limit at regulators a step up would take over v_max
STEP_GUARD_PU = 0.0005  # ... this much above the band's lower edge
STEP_HOLD = True  # such a regulator's tap the plan stepped up: centre on the base (step_hold)
THERMAL_FROM_LOADED = True  # thermal rows from the point where the branch is most loaded
OPERATING_POINTS = 4  # large feeders: operating points of the row sensitivities
LOCAL_REPAIR = True  # large feeders, from the 2nd AC round: only DERs acting on what is left
REPAIR_WIDE = False  # ... and every DER in the intervals of rows those cannot fix
REPAIR_TOP = 10  # ... the most sensitive ones of each violated row
CAP_HOLD = True  # hold kvar-controlled capacitors at the base case's state (control_rows)
AC_REPAIR = True  # correct the intervals still violated at their own AC state (ac_repair)
AC_SEQUENTIAL = True  # then in sequence, each at the state the ones before it left (realtime)
HOLD_FROM_ROUND = 2  # ... from this AC round on (the local repair's)


class ACNetwork:
    """A compiled feeder prepared for a fleet (see module docstring).

    Parameters
    ----------
    engine : OpenDSSEngine
        Freshly compiled, not yet modified; the caller closes it.
    fleet : Fleet
        The DERs (their connections) and the horizon.
    customer_profiles : Profiles
        Multipliers of the feeder's own loads over the horizon (same start, step, length).
    aggregation : AggregationConfig, optional
        Plan DERs in groups (:mod:`derms.der.aggregate`; its ``size`` None: chosen from the
        fleet's size, the choice in ``group_size``): ``fleet`` is then the groups and
        ``members`` the DERs given; schedules of the groups are injected member by member
        (each its share, at its own bus), ``simulate_members`` / ``simulate_schedule``
        take the members' own schedules.
    """

    def __init__(self, engine: OpenDSSEngine, fleet: Fleet, customer_profiles: Profiles, *,
                 control_mode: ControlMode = "static", limits: Limits | None = None,
                 aggregation: AggregationConfig | None = None) -> None:
        h = fleet.horizon
        if customer_profiles.n_steps != h.n_steps or customer_profiles.step != h.step:
            raise InputError(f"customer profiles ({customer_profiles.n_steps} x "
                             f"{customer_profiles.step}) do not match the horizon "
                             f"({h.n_steps} x {h.step})")
        self.engine, self.fleet, self.control_mode = engine, fleet, control_mode
        self.limits = limits or Limits()
        engine.solve_snapshot()  # operating point of the sensitivities: base (peak) load
        engine.set_control_mode("off")
        engine.solve_snapshot()
        nodes = sorted({n for d in fleet.ders for n in d.connection.injection_terminals})
        # kvar-type capacitor controls: their capacitors' nodes are injection columns and
        # their monitored flows are linearised too (``control_rows``)
        # (the index only for its branch names; self.index is built after the DER loads)
        self.capctl = (read_cap_controls(engine, build_index(engine))
                       if CAP_HOLD and engine.circuit.CapControls.Count else CapControls.empty())
        extra = [n for n in dict.fromkeys(self.capctl.node) if n not in set(nodes)]
        self._flows = self.capctl.flow_rows if self.capctl.n else None
        self.lin = build_linear_model(engine, nodes + extra, branches=True, flows=self._flows)
        self._loss_w = self._loss_weights()  # at the linearisation point (control off)
        self.head_lin_kw = float(-np.sum(np.asarray(engine.circuit.TotalPower)[0]))
        self.watched: list[str] = []
        self._last_flows: tuple[object, dict[str, np.ndarray]] = (None, {})
        self._last_caps: tuple[object, np.ndarray | None, np.ndarray | None] = (None, None,
                                                                                  None)
        self._last_taps: tuple[object, np.ndarray | None] = (None, None)
        self._cap_parts: tuple = ()
        engine.set_control_mode(control_mode)
        self.shapes = []
        for k, d in enumerate(fleet.ders):  # one load per member DER
            c = d.connection
            bus = ".".join([c.bus, *(str(int(n)) for n in c.nodes)])
            engine.command(f"new load.{_PREFIX}{k} bus1={bus} phases={c.phases} kv={c.kv} "
                           f"conn={c.conn} model=1 kw=1 kvar=1 vminpu=0 vmaxpu=1000 vlowpu=0")
            self.shapes.append(f"{_PREFIX}{k}")
        load_profiles_into_engine(engine, customer_profiles)
        sec = h.step.total_seconds()
        for k, name in enumerate(self.shapes):
            engine.command(f"new loadshape.{name} npts={h.n_steps} sinterval={sec}")
            engine.command(f"edit load.{name} yearly={name}")
        self.index = build_index(engine)
        if self.index.n_nodes != len(self.lin.node_names):
            raise InputError("node count changed after adding the DER loads")
        self.agg = self._aggregate(fleet, aggregation)  # DER loads stay one per member
        self.members, self.fleet = fleet, self.agg.fleet
        # every simulation starts from one control state (taps and capacitor states carry
        # over from one run's last step into the next otherwise: on IEEE 8500 the plan's
        # AC run started 1-3 taps away from its reference's, a difference the plan never
        # made). The state: where the base case leaves the controls after one pass over
        # the horizon (a warm-up; for a day it is the state a day of operation leads to)
        self.control_state = None
        self.runs = 0  # simulations run (an ACStepper checks that none ran beside it)
        self.hazard_regs, self.hazard_node, _lo = self._step_up_hazards()
        T, n = h.n_steps, len(self.fleet.ders)
        self.simulate(np.zeros((T, n)), np.zeros((T, n)))
        self.control_state = capture_control_state(engine, regulated_transformers(engine))
        self.base_result = self.simulate(np.zeros((T, n)), np.zeros((T, n)))
        self.base = self._reference(self.base_result, np.zeros((T, n)), np.zeros((T, n)))
        self.net_limits = network_limits(self.base, self.index.node_phase,
                                         self.index.branch_norm_a, self.limits)
        if STEP_UP_GUARD:
            self.net_limits = self._guard_step_up(self.net_limits, self.base.v_pu)
        if HOLD_REGULATOR_BANDS:  # read only when used (engine queries per regulator)
            node, lo, hi, _step = self.regulator_bands()
            if node.size:
                self.net_limits = replace(self.net_limits, band_node=node, band_lo_pu=lo,
                                          band_hi_pu=hi)

    def _aggregate(self, fleet: Fleet, cfg: AggregationConfig | None) -> Aggregation:
        """Group the fleet's DERs (:mod:`derms.der.aggregate`), located by their columns of
        the base-case voltage sensitivities at the primary nodes (above 1 kV to neutral;
        every node on a feeder without any), projected on 32 random directions. (The
        secondary nodes would keep apart DERs under two service transformers side by
        side: each one's own transformer and service drop dominate its column there.)"""
        if cfg is not None:
            cfg = cfg.resolved(len(fleet.ders))
        self.group_size = 1 if cfg is None else cfg.size  # as planned (auto resolved)
        if cfg is None or cfg.size <= 1 or not fleet.ders:
            return singletons(fleet)
        w = der_map(self.lin, fleet)
        ix = self.index
        kv_of = {f"{b}.{p}": kv for b, p, kv in zip(ix.node_bus, ix.node_phase,
                                                    ix.node_kv_base_ln, strict=True)}
        prim = np.array([kv_of.get(n, 0.0) > 1.0 for n in self.lin.node_names])
        rows = self.lin.dv_dp_pu_per_kw[prim] if prim.any() else self.lin.dv_dp_pu_per_kw
        cols = np.asarray(w.T @ rows.T)  # (n_der, n_primary_nodes)
        proj = np.random.default_rng(cfg.seed).standard_normal((cols.shape[1], 32))
        agg = aggregate(fleet, cols @ proj, cfg)
        log.info("dispatch aggregation: %d DERs planned as %d groups (largest %d)",
                 len(fleet.ders), len(agg.fleet.ders), int(agg.sizes.max()))
        return agg

    def der_map(self, lin=None) -> sp.csc_matrix:
        """(n_inj, n_der) map of the planned DERs (groups spread over their members) to
        ``lin``'s injection nodes (default the base-case linear model)."""
        return der_map(lin or self.lin, self.fleet, self.agg.parts)

    def _rhs_per_der(self) -> tuple[np.ndarray, list[str]] | None:
        """Right-hand sides of a linearisation, one per planned DER (its injection pattern)
        plus one per capacitor node, when that is fewer than one per injection node
        (groups of DERs, or many nodes per DER): ``(groups, names)`` for
        :func:`~derms.powerflow.linear.build_linear_model`, else None."""
        W = self.der_map()
        cap = list(dict.fromkeys(self.capctl.node)) if self.capctl.n else []
        m = W.shape[1] + len(cap)
        if m >= W.shape[0]:
            return None
        pos = {n: k for k, n in enumerate(self.lin.injection_nodes)}
        g = np.zeros((W.shape[0], m))
        g[:, :W.shape[1]] = W.toarray()
        g[[pos[n] for n in cap], W.shape[1] + np.arange(len(cap))] = 1.0
        return g, [f"der#{j}" for j in range(W.shape[1])] + cap

    def simulate_schedule(self, sched: Schedule) -> QSTSResult:
        """:meth:`simulate` of a schedule of the planned DERs or of their members."""
        if self.agg.of_members(sched.fleet):
            return self.simulate_members(sched.p_kw, sched.q_kvar)
        return self.simulate(sched.p_kw, sched.q_kvar)

    def simulate_members(self, p_kw: np.ndarray, q_kvar: np.ndarray) -> QSTSResult:
        """:meth:`simulate` of a schedule of the member DERs (T, n_member)."""
        return self._run(np.asarray(p_kw, float), np.asarray(q_kvar, float), (),
                         members=True)[0]

    def _step_up_hazards(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """RegControls (names), their monitored nodes and band lower edges [pu] where one
        tap step up from that edge lands above the upper voltage limit; their taps are
        recorded in every simulation (``Reference.taps``) for ``STEP_HOLD``."""
        if not (STEP_UP_GUARD and self.engine.circuit.RegControls.Count):
            return [], np.zeros(0, dtype=np.int64), np.zeros(0)
        node, lo, _hi, step, names = self.regulator_bands(keep=1.0, with_names=True)
        hazard = lo + step > self.limits.v_max_pu
        return [str(x) for x in names[hazard]], node[hazard], lo[hazard]

    def _guard_step_up(self, lim: NetworkLimits, base_v: np.ndarray) -> NetworkLimits:
        """Raise the lower voltage limit of a regulator's monitored node to its band's
        lower edge where one tap step up from that edge lands above the upper voltage
        limit (IEEE 8500's substation regulator: 126.5 V ± 1 V on a 60:1 PT holds its bus
        in 1.0458-1.0625 pu, one 0.00625 pu step from 1.0458 lands at 1.052): a plan whose
        load pulls the bus under the edge makes the regulator step up into an
        overvoltage, which the frozen-tap rows cannot see. Never tighter than the base
        case's value."""
        _names, node, lo = self._step_up_hazards()
        if not node.size:
            return lim
        guard = lo + STEP_GUARD_PU
        v_min = lim.v_min.copy()
        v_min[:, node] = np.maximum(v_min[:, node],
                                    np.minimum(guard[None, :], base_v[:, node]))
        log.info("dispatch step_up_guard nodes=%s v_min_pu=%s", node.tolist(),
                 np.round(guard, 4).tolist())
        return replace(lim, v_min=v_min)

    def regulator_bands(self, keep: float | None = None, *, with_names: bool = False
                        ) -> tuple[np.ndarray, ...]:
        """Monitored node (index order), band [pu] and tap step [pu] of every RegControl
        the LP can hold inside its band (no line-drop compensation, no remote bus, a wye
        winding, the PT on the winding's first node): ``vreg ± band/2`` [V on the PT's secondary] times the PT
        ratio over the node's base, narrowed to ``keep`` of its width (``BAND_KEEP``) so the
        linear error does not take the voltage out. Holding it there keeps the taps the AC
        simulation of the reference found (static control acts only outside the band), so
        the frozen-control sensitivities stay valid for the plan (IEEE 8500: with taps
        acting, the linear model was 0.006-0.016 pu optimistic on the plans' overvoltages;
        with them frozen 0-0.006). ``with_names``: the RegControls' names (lower case) as
        a fifth array."""
        keep = BAND_KEEP if keep is None else keep
        c, ix = self.engine.circuit, self.index
        pos = {(b, int(p)): k for k, (b, p) in enumerate(zip(ix.node_bus, ix.node_phase))}
        rc, tr = c.RegControls, c.Transformers
        nodes, lo, hi, step, names = [], [], [], [], []
        k = rc.First
        while k > 0:
            name = rc.Name.lower()
            ok = (rc.ForwardR == 0 and rc.ForwardX == 0 and rc.PTratio > 0
                  and not rc.MonitoredBus)
            ptphase = self.engine.command(f"? regcontrol.{name}.ptphase").strip()
            tr.Name = rc.Transformer
            tr.Wdg = rc.Winding
            if ok and ptphase == "1" and not tr.IsDelta:
                c.SetActiveElement(f"transformer.{rc.Transformer}")
                bus = c.ActiveCktElement.BusNames[rc.Winding - 1].lower().split(".")
                node = pos.get((bus[0], int(bus[1]) if len(bus) > 1 else 1))
                if node is not None and ix.node_kv_base_ln[node] > 0:
                    scale = rc.PTratio / (ix.node_kv_base_ln[node] * 1e3)
                    half = 0.5 * rc.ForwardBand * scale * keep
                    nodes.append(node)
                    lo.append(rc.ForwardVreg * scale - half)
                    hi.append(rc.ForwardVreg * scale + half)
                    step.append((tr.MaxTap - tr.MinTap) / max(tr.NumTaps, 1))
                    names.append(name)
                    k = rc.Next
                    continue
            log.info("regulator %s: band not modelled (LDC, remote bus, delta or PT phase)",
                     name)
            k = rc.Next
        out = (np.asarray(nodes, dtype=np.int64), np.asarray(lo, dtype=float),
               np.asarray(hi, dtype=float), np.asarray(step, dtype=float))
        return (*out, np.asarray(names, dtype=object)) if with_names else out

    def _loss_weights(self) -> np.ndarray:
        """Per branch conductor ``2 R_k I0_k / 1000`` [kW of losses per A of |I| change]:
        ``R`` of each element from its losses and currents at the operating point (all
        its terminal-1 conductors share one R; transformer no-load losses are folded in,
        so the proxy slightly overstates them)."""
        c = self.engine.circuit
        names = [n.lower() for n in c.AllElementNames]
        loss = np.asarray(c.AllElementLosses, dtype=float)[0::2]  # kW per element
        pos = {n: k for k, n in enumerate(names)}
        b = self.lin.branches
        el = np.array([e.lower() for e in b.element])
        ue, inv = np.unique(el, return_inverse=True)
        le = np.array([loss[pos[e]] if e in pos else 0.0 for e in ue])
        i2 = np.bincount(inv, weights=b.i0_a**2, minlength=ue.size)
        r_ohm = np.where(i2 > 0, le * 1e3 / np.maximum(i2, 1e-12), 0.0)[inv]
        return 2.0 * r_ohm * b.i0_a / 1e3

    def watch(self, element: str) -> None:
        """Record the active power into ``element``'s terminal 1 [kW, from its source
        side] at every simulated step (for ``ObjectiveConfig.peak_element``)."""
        name = element.lower()
        self.engine.circuit.SetActiveElement(name)
        if self.engine.circuit.ActiveCktElement.Name.lower() != name:
            raise InputError(f"element {element!r} is not in the circuit")
        if name not in self.watched:
            self.watched.append(name)

    def element_coef(self, element: str, sens) -> np.ndarray:
        """(n_der,) 1 for the DERs downstream of ``element`` (their |I| sensitivity on its
        terminal-1 conductors is at least 20 % of the largest), else 0."""
        b = self.lin.branches
        k = np.flatnonzero(np.char.lower(b.element.astype(str)) == element.lower())
        if k.size == 0:
            raise InputError(f"element {element!r} is not a branch of the linear model")
        score = np.abs(rows_dense(sens.hi_p, k)).sum(axis=0)
        return (score >= 0.2 * max(score.max(), 1e-12)).astype(float) if score.max() > 1e-9 \
            else np.zeros(score.size)

    def simulate(self, p_kw: np.ndarray, q_kvar: np.ndarray) -> QSTSResult:
        """AC QSTS of a schedule: DER net import ``p_kw``/``q_kvar`` (T, n_der), from the
        control state captured at set-up (``control_state``: regulator taps, capacitors)."""
        return self._run(p_kw, q_kvar, ())[0]

    @property
    def cap_parts(self) -> tuple:
        """The capacitor controls' sensitivities of the last grid context (one per
        operating point; empty before a plan was built)."""
        return self._cap_parts

    def taps_of(self, res: QSTSResult) -> np.ndarray | None:
        """(T, n_hazard) hazard regulators' taps recorded in the simulation that gave
        ``res`` (None when ``res`` is not the last simulation)."""
        return self._last_taps[1] if self._last_taps[0] is res else None

    def caps_of(self, res: QSTSResult) -> np.ndarray | None:
        """(T, n_ctl) kvar-controlled capacitors' states (share of steps on) recorded in
        the simulation that gave ``res`` (None when ``res`` is not the last one)."""
        return self._last_caps[1] if self._last_caps[0] is res else None

    def simulate_with(self, p_kw: np.ndarray, q_kvar: np.ndarray,
                      at_step: dict[int, Callable[[OpenDSSEngine], None]], *,
                      members: bool = False) -> QSTSResult:
        """:meth:`simulate`, calling ``at_step[k](engine)`` right after interval ``k`` is
        solved (controls as they acted there); the callback must leave the engine's state
        as it found it (read only). ``members``: a schedule of the member DERs."""
        return self._run(p_kw, q_kvar, (), at_step, members=members)[0]

    def _run(self, p_kw: np.ndarray, q_kvar: np.ndarray, linearise_at,
             at_step: dict[int, Callable[[OpenDSSEngine], None]] | None = None, *,
             members: bool = False, rhs: tuple[np.ndarray, list[str]] | None = None
             ) -> tuple[QSTSResult, dict[int, object]]:
        """:meth:`simulate`, plus a linear model of the DER connection points built at the
        solved state (controls as they acted) of each interval in ``linearise_at`` (with
        ``rhs``: one column per planned DER and capacitor node, :meth:`_rhs_per_der`)."""
        c = self.engine.circuit
        grouped = self.agg.grouped
        n = len((self.members if members else self.fleet).ders)
        if np.shape(p_kw)[1:] != (n,) or np.shape(q_kvar)[1:] != (n,):
            raise InputError(  # a member schedule given as the groups' would be misread
                f"a schedule of {n} {'member ' if members and grouped else ''}DERs expected"
                f" (T, {n}), got {np.shape(p_kw)} / {np.shape(q_kvar)}"
                + (" (schedules of the members: simulate_members / simulate_schedule)"
                   if grouped and not members else ""))
        if self.control_state is not None:
            restore_control_state(self.engine, self.control_state)
        if not members and grouped:  # each member its share
            p_kw, q_kvar = self.agg.expand(p_kw), self.agg.expand(q_kvar)
        ls = c.LoadShapes
        for k, name in enumerate(self.shapes):
            ls.Name = name
            ls.Pmult = np.ascontiguousarray(p_kw[:, k], dtype=float)
            ls.Qmult = np.ascontiguousarray(q_kvar[:, k], dtype=float)
        h = self.fleet.horizon
        self.engine.set_control_mode(self.control_mode)
        self.engine.command(f"set mode=yearly stepsize={h.step.total_seconds()}s number=1")
        self.engine.command("set time=(0,0)")
        col = StepCollector(self.engine, self.index, h.n_steps)
        sol = c.Solution
        flows = {e: np.empty(h.n_steps) for e in self.watched}
        cap_on, ctl_kvar = np.zeros((h.n_steps, self.capctl.n)), np.zeros((h.n_steps,
                                                                             self.capctl.n))
        at = {int(k) for k in linearise_at}
        models: dict[int, object] = {}
        rc = c.RegControls
        taps = np.zeros((h.n_steps, len(self.hazard_regs)), dtype=np.int64)
        for k in range(h.n_steps):
            sol.Solve()
            col.collect(k)
            for j, name in enumerate(self.hazard_regs):
                rc.Name = name
                taps[k, j] = rc.TapNumber
            if self.capctl.n:
                cap_on[k] = cap_states(self.engine, self.capctl)
                ctl_kvar[k] = monitored_kvar(self.engine, self.capctl, self.index)
            if k in at:
                g, names = rhs or (None, None)
                models[k] = build_linear_model(self.engine, self.lin.injection_nodes,
                                               branches=True, flows=self._flows, groups=g,
                                               group_names=names)
            if at_step and k in at_step:
                at_step[k](self.engine)
            for e, f in flows.items():
                c.SetActiveElement(e)
                pw = np.asarray(c.ActiveCktElement.Powers)
                nc = c.ActiveCktElement.NumConductors
                f[k] = pw[0:2 * nc:2].sum()
        t = pd.date_range(h.start, periods=h.n_steps, freq=h.step)
        out = QSTSResult(t=t, step=h.step, index=self.index, v_pu=col.v_pu, i_a=col.i_a,
                          head_p_kw=col.head_p_kw, head_q_kvar=col.head_q_kvar,
                          losses_kw=col.losses_kw, losses_kvar=col.losses_kvar,
                          converged=col.converged, control_mode=self.control_mode)
        self._last_flows = (out, flows)
        self._last_caps = (out, cap_on, ctl_kvar)
        self._last_taps = (out, taps)
        self.runs += 1
        return out, models

    def _reference(self, res: QSTSResult, p_kw, q_kvar) -> Reference:
        flows = self._last_flows[1] if self._last_flows[0] is res else {}
        caps = self._last_caps[1:] if self._last_caps[0] is res else (None, None)
        taps = self._last_taps[1] if self._last_taps[0] is res else None
        return Reference(p_kw, q_kvar, res.v_pu, res.i_a.astype(float),
                         res.head_p_kw.sum(axis=1), dict(flows), *caps, taps=taps)

    def reference(self, sched: Schedule, res: QSTSResult | None = None
                  ) -> tuple[Reference, QSTSResult]:
        """AC reference of a schedule (simulated unless ``res`` is given; a given result
        is re-simulated when watched element flows are missing for it)."""
        if res is not None and self.watched and self._last_flows[0] is not res:
            res = None
        res = res or self.simulate_schedule(sched)
        if self.agg.of_members(sched.fleet):
            # a schedule of the member DERs (e.g. uncontrolled): the groups' totals
            return self._reference(res, self.agg.collect(sched.p_kw),
                                   self.agg.collect(sched.q_kvar)), res
        return self._reference(res, sched.p_kw, sched.q_kvar), res

    def violations(self, res: QSTSResult) -> ViolationReport:
        """DESIGN.md violations of a simulated schedule, pre-existing held to the base."""
        ix, b = res.index, self.base_result
        return detect_violations(
            res.t, res.dt_h, v_pu=res.v_pu, node_names=ix.node_bus, node_phases=ix.node_phase,
            loading_pct=res.loading_pct(), branch_names=ix.branch_element,
            branch_phases=ix.branch_phase, limits=self.limits, base_v_pu=b.v_pu,
            base_loading_pct=b.loading_pct())

    def over_limit(self, res: QSTSResult) -> dict[str, np.ndarray]:
        """(T, n) masks of AC values beyond the LP's limits (no tolerance) per row kind."""
        lim = self.net_limits
        live = lim.node_ok[None, :]
        return {"v_max": live & (res.v_pu > lim.v_max + 1e-5),
                "v_min": live & (res.v_pu < lim.v_min - 1e-5),
                "i_max": res.i_a > lim.i_max * (1 + 1e-4)}

    def operating_points(self, ref: Reference, points: int) -> SensitivitySet:
        """Sensitivities at ``points`` operating points of ``ref`` (cached per reference):
        the intervals whose head import sits at the middle quantiles ``(i + 1/2)/points``
        of ``ref``'s, each linearised at its state in a re-run of ``ref``'s QSTS (taps
        and capacitors as they acted there); every interval is served by the point with
        the nearest head import (see :class:`~derms.dispatch.network.SensitivitySet`)."""
        cached = getattr(self, "_op", None)   # (reference, points, set); by identity
        if cached is not None and cached[0] is ref and cached[1] == points:
            return cached[2]
        head = np.asarray(ref.head_kw, dtype=float)
        targets = np.quantile(head, (np.arange(points) + 0.5) / points)
        picks = np.unique([int(np.argmin(np.abs(head - v))) for v in targets])
        of_t = np.argmin(np.abs(head[:, None] - head[picks][None, :]), axis=1)
        t0 = time.perf_counter()
        rhs = self._rhs_per_der()
        res, models = self._run(ref.p_kw, ref.q_kvar, picks, rhs=rhs)
        n_der = len(self.fleet.ders)
        # per-DER columns already (one RHS per DER): the map is the identity
        W = self.der_map() if rhs is None else sp.eye(rhs[0].shape[1], n_der, format="csc")
        parts = tuple(der_sensitivity(models[int(k)], self.fleet, W=W) for k in picks)
        if self.capctl.n:
            self._cap_parts = tuple(cap_sensitivity(models[int(k)], W, self.capctl)
                                    for k in picks)
        if THERMAL_FROM_LOADED:
            parts = thermal_rows_from_loaded_points(parts, np.asarray(res.i_a)[picks])
        log.info("dispatch operating_points=%d intervals=%s head_kw=%s s=%.2f", len(picks),
                 picks.tolist(), np.round(head[picks]).tolist(), time.perf_counter() - t0)
        self._op = (ref, points, SensitivitySet(parts, of_t.astype(np.int64), picks))
        return self._op[2]

    def grid_context(self, uncontrolled: Reference, points: int = 1) -> GridContext:
        """Everything the planner needs (sensitivities computed once and cached).
        ``points`` > 1: row sensitivities from that many operating points of
        ``uncontrolled`` (:meth:`operating_points`); 1: the base-case linearisation."""
        if getattr(self, "_sens", None) is None:
            self._sens = der_sensitivity(self.lin, self.fleet, self.agg.parts)
            w = self._loss_w
            self._loss = (np.asarray(self._sens.hi_p.T @ w).ravel(),
                          np.asarray(self._sens.hi_q.T @ w).ravel())
            self._names = (np.array([f"{b}.{p}" for b, p in zip(self.index.node_bus,
                                                                 self.index.node_phase)]),
                           np.array([f"{e}.{p}" for e, p in zip(self.index.branch_element,
                                                                 self.index.branch_phase)]))
        sens = self._sens
        coef = {e: self.element_coef(e, sens) for e in self.watched}
        rows_sens = self.operating_points(uncontrolled, points) if points > 1 else sens
        if points <= 1 and self.capctl.n:
            self._cap_parts = (cap_sensitivity(self.lin, self.der_map(), self.capctl),)
        return GridContext(rows_sens, self.net_limits, *self._names, uncontrolled,
                           loss_p=np.asarray(self._loss[0]).ravel(),
                           loss_q=np.asarray(self._loss[1]).ravel(),
                           head_lin_kw=self.head_lin_kw, element_coef=coef,
                           v_nominal_pu=(self.limits.v_min_pu, self.limits.v_max_pu),
                           large=is_large(self.index.n_nodes, len(self.members.ders)))


@dataclass
class VerifiedPlan:
    """A plan and its AC verification: ``counts`` from the final AC simulation,
    ``rounds`` (AC simulations of plans), timing [s]."""

    planner: Planner
    schedule: Schedule
    result: QSTSResult
    violations: ViolationReport
    rounds: int
    timing_s: dict[str, float] = field(default_factory=dict)
    rounds_log: list[dict] = field(default_factory=list)  # per AC round: counts, rows, s
    notes: list[str] = field(default_factory=list)  # why the loop stopped short of clean
    repair_log: list[dict] = field(default_factory=list)  # AC repair rounds (ac_repair)

    @property
    def clean(self) -> bool:
        c = self.violations.counts
        return c["violations_voltage"] + c["violations_thermal"] == 0


def learn_margins(planner: Planner, res: QSTSResult, over: dict[str, np.ndarray],
                  pad_pu: float = 5e-4, pad_a: float = 0.5) -> None:
    """Back-off margins from the AC-vs-linear difference (large feeders, before the rows
    are re-centred): wherever the AC simulation of the plan breaks a limit (``over``,
    (T, n) masks per row kind), the margin of that row becomes at least how much the
    linear model at the previous reference under-predicted it (the AC value minus the
    linear prediction of the plan, pu or A) plus a pad; margins only grow."""
    net, x = planner.net, planner.x
    for kind, mask in over.items():
        if not mask.any():
            continue
        pred = net.lhs(kind, x) - net.at_ref(kind)  # linear change from the old reference
        if kind == "i_max":
            err = res.i_a - (net.ref.i_a + pred)
            pad = pad_a
        else:
            v_pred = net.ref.v_pu + pred
            err = res.v_pu - v_pred if kind == "v_max" else v_pred - res.v_pu
            pad = pad_pu
        m = net.margin[kind]
        m[mask] = np.maximum(m[mask], np.maximum(err[mask], 0.0) + pad)


def repair_movers(planner: Planner, over: dict[str, np.ndarray], res: QSTSResult,
                  lim, top: int = REPAIR_TOP) -> np.ndarray:
    """(T, n_der) bool: which DER may move in which interval in a local repair: for every
    row in ``over`` ((T, n) masks per row kind; AC result ``res`` against the LP limits
    ``lim``) its ``top`` most sensitive DERs (the interval's own sensitivities), in every
    interval; and where those together could not move the row by its excess (a row every
    DER acts on alike: the substation bus), every DER in that row's interval when
    ``REPAIR_WIDE``. Off: with the capacitor holds and the thermal rows' kvar rule
    (``NetworkRows.q_abs``) IEEE 8500 ends at 23 without it and 31 with it (20 with it
    before the kvar rule, 38 without the holds; before the step-up guard it left 46
    against 37, the wide moves flipping the substation regulator's taps). The rounds
    are chaotic: one switching moved reshuffles every later round."""
    net = planner.net
    T, n = planner.lay.T, len(planner.fleet.ders)
    span = np.max(net.box[1] - net.box[0], axis=0)           # kW per DER
    local = np.zeros(n, dtype=bool)
    wide = np.zeros(T, dtype=bool)
    for kind, mask in over.items():
        t, e = np.nonzero(mask)
        if t.size == 0:
            continue
        if kind == "i_max":
            excess = res.i_a[t, e] - lim.i_max[t, e]
        elif kind == "v_max":
            excess = res.v_pu[t, e] - lim.v_max[t, e]
        else:
            excess = lim.v_min[t, e] - res.v_pu[t, e]
        part_of = net.sset.of_t[t]
        for c in np.unique(part_of):
            k = np.flatnonzero(part_of == c)
            part = net.sset.parts[int(c)]
            a = np.abs(rows_dense(part.hi_p if kind == "i_max" else part.hv_p, e[k]))
            m = min(top, a.shape[1])
            best = np.argpartition(-a, m - 1, axis=1)[:, :m]
            local[np.unique(best[np.take_along_axis(a, best, axis=1) > 0])] = True
            reach = (np.take_along_axis(a, best, axis=1) * span[best]).sum(axis=1)
            wide[t[k][reach < excess[k]]] = True
    out = np.zeros((T, n), dtype=bool)
    out[:, local] = True
    if REPAIR_WIDE:
        out[wide] = True
    log.info("dispatch repair local_movers=%d of %d, every DER in %d intervals",
             int(local.sum()), n, int(wide.sum()))
    return out


def _export_over(objective: ObjectiveConfig, head_kw: np.ndarray) -> float:
    """Largest head export beyond the objective's export limit [kW] (0 without one;
    negative when the export stays inside it)."""
    if objective.export_limit_kw is None:
        return 0.0
    return float(np.max(-np.asarray(head_kw)) - objective.export_limit_kw)


def export_misses(objective: ObjectiveConfig, head_kw: np.ndarray) -> tuple[int, float]:
    """Intervals whose AC head import is below the export limit's minimum by more than
    ``EXPORT_TOL_KW`` and the largest shortfall [kW] (0, 0.0 without a limit or a miss)."""
    if objective.export_limit_kw is None:
        return 0, 0.0
    short = -objective.export_limit_kw - np.asarray(head_kw, dtype=float)
    n = int((short > EXPORT_TOL_KW).sum())
    return n, float(short.max()) if n else 0.0


def _left_text(n_viol: int, objective: ObjectiveConfig, head_kw: np.ndarray) -> str:
    """What a kept plan leaves in its AC simulation, for a note (or that it is clean)."""
    n_miss, kw = export_misses(objective, head_kw)
    parts = ([f"{n_viol} voltage/thermal violation(s)"] if n_viol else []) + (
        [(f"the head import below the export limit's {-objective.export_limit_kw:g} kW in "
          f"{n_miss} interval(s) (by up to {kw:.1f} kW)")] if n_miss else [])
    return (", which leaves " + " and ".join(parts) + " in the AC simulation") if parts \
        else ", which the AC simulation finds within every limit"


def plan_and_verify(ac: ACNetwork, objective: ObjectiveConfig | None = None, *,
                    fleet: Fleet | None = None, uncontrolled: tuple | None = None,
                    max_ac_rounds: int = 8) -> VerifiedPlan:
    """Plan the fleet's dispatch and verify it on the AC model (see module docstring).

    ``uncontrolled``: (Reference, QSTSResult) of the uncontrolled schedule when already
    simulated. Raises :class:`~derms.errors.InfeasibleError` naming what binds when no
    plan meets the constraints.
    """
    objective = objective or ObjectiveConfig()
    fleet = fleet or ac.fleet
    grouped = fleet is ac.fleet and ac.agg.grouped
    own = ac.members if grouped else fleet  # the DERs themselves (members of the groups)
    if (grouped and objective.curtailment_policy == "proportional_to_capacity"
            and not ac.agg.pv_follows_capacity()):
        raise InputError("the curtailment policy proportional_to_capacity needs PV groups "
                         "whose members' shares are their shares of the group's kVA: build "
                         "the ACNetwork with AggregationConfig(pv_by_capacity=True)")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    if objective.peak_element is not None and objective.peak_element.lower() not in ac.watched:
        ac.watch(objective.peak_element)
        uncontrolled = None  # its element flow is needed
    if uncontrolled is None or (ac.watched and not all(
            e in uncontrolled[0].element_kw for e in ac.watched)):
        uncontrolled = ac.reference(uncontrolled_schedule(own))
    timing["uncontrolled_ac_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    big = is_large(ac.index.n_nodes, len(own.ders))  # the members: see GridContext.large
    planner = Planner(fleet, ac.grid_context(uncontrolled[0],
                                             OPERATING_POINTS if big else 1), objective)
    timing["build_s"] = time.perf_counter() - t1
    planner.solve_linear(2 * LARGE_LINEAR_ROUNDS if big else None)
    hold = CapHold(planner, ac.capctl, ac._cap_parts, ac.base.cap_on) if (
        CAP_HOLD and ac.capctl.n and ac.base.cap_on is not None) else None
    ac_s, seen = 0.0, {k: np.zeros(m.shape, dtype=bool) for k, m in planner.net.margin.items()}
    log_rounds: list[dict] = []
    notes: list[str] = []
    best = None  # ((violations, export excess), round, schedule, result, report, ref, x)
    large = big  # (not net.elastic: a small feeder's rows can turn elastic as a fallback)
    frac = TRUST_FRAC
    for rounds in range(1, max_ac_rounds + 1):
        sched = planner.schedule()
        t2 = time.perf_counter()
        ref, res = ac.reference(sched)
        ac_s += time.perf_counter() - t2
        rep = ac.violations(res)
        export_over = _export_over(objective, ref.head_kw)
        n_viol = rep.counts["violations_voltage"] + rep.counts["violations_thermal"]
        key = (n_viol, max(export_over - EXPORT_TOL_KW, 0.0))
        improved = best is None or key < best[0]
        log_rounds.append({"round": rounds, **rep.counts, "export_over_kw": export_over,
                           "lp_rows": planner.lp.n_rows,
                           "network_rows": int(sum((r >= 0).sum()
                                                   for r in planner.net.row.values())),
                           "lazy_near_rows": planner.net.n_lazy_near,
                           "lp_solve_s": planner.lp.solve_s, "lp_solves": planner.lp.n_solves,
                           "ac_s": ac_s, "accepted": improved, "trust_frac": frac,
                           "elapsed_s": time.perf_counter() - t0})
        log.info("dispatch ac_round=%d violations=%d (voltage %d, thermal %d) rows=%d "
                 "(lazy near %d) accepted=%s elapsed_s=%.2f", rounds, n_viol,
                 rep.counts["violations_voltage"], rep.counts["violations_thermal"],
                 planner.lp.n_rows, planner.net.n_lazy_near, improved,
                 time.perf_counter() - t0)
        over = ac.over_limit(res)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dispatch ac_round=%d intervals_over=%s", rounds, np.flatnonzero(
                np.logical_or.reduce([m.any(axis=1) for m in over.values()])).tolist())
        if improved:
            best = (key, rounds, sched, res, rep, ref,
                    None if planner.x is None else planner.x.copy(), over)
        if n_viol == 0 and export_over <= EXPORT_TOL_KW:
            break
        if rounds == max_ac_rounds:
            log.warning("dispatch ac_rounds=%d still_violating=%s", rounds, rep.counts)
            # a later round can be worse than an earlier one (the regulators and
            # capacitors answer a changed plan with other taps/states): keep the best
            sched, res, rep = best[2], best[3], best[4]
            break
        centre_ref, centre_x = ref, planner.x
        centre_over, centre_res = over, res  # the AC run the rows are re-centred on
        if large:
            if planner.x is not None and LEARN_MARGINS:
                learn_margins(planner, res, over)
            if not improved:  # trust-region step rejected: back to the best plan, smaller
                centre_ref, centre_x = best[5], best[6]
                centre_over, centre_res = best[7], best[3]
                frac *= 0.5
            elif rounds > 1:
                frac *= 0.7
        step_hit, step_move = np.zeros(len(sched.p_kw), dtype=bool), None
        if STEP_HOLD and ac.hazard_node.size:  # a tap the plan stepped up: see step_hold
            step_hit = stepped_intervals(centre_ref, ac.base, centre_over)
            if step_hit.any():
                step_move = step_movers(centre_ref, step_hit)
                centre_ref = with_intervals(centre_ref, ac.base, step_hit)
        if HOLD_REGULATOR_BANDS and planner.net.lim.band_node.size:
            planner.net.band_on |= np.logical_or.reduce([m.any(axis=1) for m in over.values()])
        if hold is not None and centre_ref.cap_on is not None:
            if rounds >= HOLD_FROM_ROUND:  # what the centre's AC run found
                hold.note(centre_ref, centre_over, centre_res, ac.net_limits)
            centre_ref = hold.offset(centre_ref)
        planner.recenter(centre_ref)
        if step_hit.any():
            hold_steps(planner.net, step_hit, ac.hazard_node)
        for kind, mask in over.items():
            val = res.v_pu if kind != "i_max" else res.i_a
            lim = getattr(ac.net_limits, kind)
            again = mask & seen[kind]  # the linear model was optimistic here twice
            if kind == "v_max":  # a stepped tap's overvoltage is not the linear model's
                again &= ~step_hit[:, None]
            if again.any() and not (large and LEARN_MARGINS):
                planner.net.margin[kind][again] += np.abs(val - lim)[again] + (
                    5e-4 if kind != "i_max" else 0.5)
            seen[kind] |= mask
            planner.net.add_lazy(kind, mask, score=np.abs(val - lim))
        planner.recenter(centre_ref)  # margins enter the bounds
        if hold is not None:
            hold.recenter(centre_ref)
        if large and centre_x is not None:
            movers = None
            if LOCAL_REPAIR and rounds >= 2:  # only the DERs that act on what is left
                movers = repair_movers(planner, over if improved else best[7],
                                       res if improved else best[3], ac.net_limits)
                if hold is not None:
                    movers[:, hold.movers(HOLD_TOP)] = True
                if step_move is not None:
                    movers[:, step_move] = True
            planner.trust_region(centre_x, frac, movers)
        # large feeders: a warm re-solve with dense rows costs more than an AC round, and
        # the AC round finds most of what more linear rounds would: fewer of them
        try:
            try:
                planner.solve_linear(LARGE_LINEAR_ROUNDS if large else None)
            except InfeasibleError:
                if not (large and centre_x is not None):
                    raise
                # the trust region (column bounds) may be what leaves no room: the
                # DERs' own ranges once before giving up (the diagnosis then speaks of
                # what the DERs can do, not of what the region let them do)
                log.info("dispatch ac_round=%d re-plan infeasible in the trust region "
                         "(frac %.3f): re-solved in the DERs' own ranges", rounds, frac)
                log_rounds[-1]["trust_region_lifted"] = True
                planner.trust_region(None, 1.0)
                planner.solve_linear(LARGE_LINEAR_ROUNDS)
        except InfeasibleError as exc:
            # the rows and margins this loop added (what the AC check found the linear
            # model missed) left no room: the plan that met the linear model is still the
            # best one simulated, so report it with what is left instead of nothing
            sched, res, rep = best[2], best[3], best[4]
            notes.append(f"stopped after AC round {rounds}: the tightened re-plan has no "
                         f"solution ({exc}); the plan of round {best[1]} is kept"
                         f"{_left_text(best[0][0], objective, best[5].head_kw)}")
            log.warning("dispatch ac_round=%d tightened LP infeasible; keeping round %d",
                        rounds, best[1])
            break
    if large:
        planner.trust_region(None, 1.0)  # later re-plans (update) start unrestricted
    timing["solve_s"] = planner.lp.solve_s
    left = rep.counts["violations_voltage"] + rep.counts["violations_thermal"]
    repair_log: list[dict] = []
    if AC_REPAIR and left:  # the last mile, interval by interval at its own AC state
        t3 = time.perf_counter()
        # each DER on its own (the members of a group need not move in proportion here)
        fixed = repair_plan(MemberView(ac) if grouped else ac,
                            member_schedule(ac.agg, sched) if grouped else sched, res,
                            RepairConfig(pv_up=objective.export_limit_kw is None))
        timing["ac_repair_s"] = time.perf_counter() - t3
        ac_s += timing["ac_repair_s"]
        after = (fixed.report.counts["violations_voltage"]
                 + fixed.report.counts["violations_thermal"])
        if after < left:
            notes.append(f"AC repair: the intervals still violated were corrected at their "
                         f"own AC state with PV output and reactive power and EV charging "
                         f"moved within its session ({len(fixed.log)} round(s)): {left} -> "
                         f"{after} violations (the ledger is the plan's before it)")
            sched, res, rep = fixed.schedule, fixed.result, fixed.report
            best = ((after, best[0][1]), *best[1:])
        repair_log = fixed.log
    left = rep.counts["violations_voltage"] + rep.counts["violations_thermal"]
    if AC_SEQUENTIAL and left:  # the last mile in sequence: each interval at the state
        t3 = time.perf_counter()  # the corrected ones before it left (taps, capacitors)
        view = MemberView(ac) if grouped else ac
        s_in = member_schedule(ac.agg, sched) if grouped and sched.fleet is not own else sched
        seq, corr = correct_in_sequence(
            view, s_in, float(np.max(res.head_p_kw.sum(axis=1))),
            RealTimeConfig(pv_up=objective.export_limit_kw is None))
        res_q = view.simulate(seq.p_kw, seq.q_kvar)
        rep_q = ac.violations(res_q)
        after = rep_q.counts["violations_voltage"] + rep_q.counts["violations_thermal"]
        # it does not see the head's export: an EV charging cut may add to it
        export_q = max(_export_over(objective, res_q.head_p_kw.sum(axis=1)) - EXPORT_TOL_KW,
                       0.0)
        timing["ac_sequence_s"] = time.perf_counter() - t3
        ac_s += timing["ac_sequence_s"]
        log.info("dispatch ac_sequence: %d intervals corrected, violations %d -> %d (%.1f s)",
                 len(corr), left, after, timing["ac_sequence_s"])
        if after < left and export_q <= best[0][1] + 1e-9:
            notes.append(f"AC correction in sequence: each interval still violated was "
                         f"corrected at the state the corrected intervals before it left "
                         f"(PV, reactive power, EV charging moved later; {len(corr)} "
                         f"intervals): {left} -> {after} violations (the ledger is the "
                         "plan's before it)")
            sched, res, rep = seq, res_q, rep_q
            best = ((after, best[0][1]), *best[1:])
    timing["ac_verify_s"] = ac_s
    timing["total_s"] = time.perf_counter() - t0
    left = rep.counts["violations_voltage"] + rep.counts["violations_thermal"]
    if left:  # never hand out a plan the AC check finds worse than leaving the DERs alone
        u_rep = ac.violations(uncontrolled[1])
        u_export = _export_over(objective, uncontrolled[0].head_kw)
        u_key = (u_rep.counts["violations_voltage"] + u_rep.counts["violations_thermal"],
                 max(u_export - EXPORT_TOL_KW, 0.0))
        b_key = best[0]  # no worse on both counts (violations, export excess), better on one
        if u_key[0] <= b_key[0] and u_key[1] <= b_key[1] and u_key != b_key:
            notes.append(f"every plan the AC check saw breaks more limits than the "
                         f"uncontrolled case ({best[0][0]} against {u_key[0]} violations): "
                         "the uncontrolled schedule is returned (no DER is moved; the "
                         "ledger's binding rows are those of the last linear plan)")
            log.warning("dispatch falls back to the uncontrolled schedule (%d < %d "
                        "violations)", u_key[0], best[0][0])
            sched, res, rep = uncontrolled_schedule(own), uncontrolled[1], u_rep
            left = u_key[0]
    elif objective.weights.price_per_kwh is None and objective.peak_element is None:
        # a clean plan whose head peak is above the uncontrolled one, when the uncontrolled
        # case is clean too, is worse than leaving the DERs alone (a 1-h IEEE 13 plan
        # charged a battery to meet a thermal row held at its base value: 2,539 kW against
        # 2,514): the uncontrolled schedule is returned
        u_rep = ac.violations(uncontrolled[1])
        u_clean = u_rep.counts["violations_voltage"] + u_rep.counts["violations_thermal"] == 0
        u_export_ok = _export_over(objective, uncontrolled[0].head_kw) <= EXPORT_TOL_KW
        peak, u_peak = float(np.max(res.head_p_kw.sum(axis=1))), float(
            np.max(uncontrolled[1].head_p_kw.sum(axis=1)))
        if u_clean and u_export_ok and peak > u_peak + 1e-6:
            notes.append(f"the plan's AC peak {peak:.1f} kW is above the uncontrolled "
                         f"{u_peak:.1f} kW, which breaks no limit either: the uncontrolled "
                         "schedule is returned (no DER is moved)")
            log.warning("dispatch falls back to the uncontrolled schedule (peak %.1f > %.1f "
                        "kW)", peak, u_peak)
            sched, res, rep = uncontrolled_schedule(own), uncontrolled[1], u_rep
    if grouped and sched.fleet is not own:
        sched = member_schedule(ac.agg, sched)
    if left and not notes:
        notes.append(f"{rounds} AC rounds used (the most allowed); the plan of round {best[1]}"
                     f", the one with the fewest AC violations, is kept")
    n_miss, miss_kw = export_misses(objective, res.head_p_kw.sum(axis=1))
    if n_miss and not any("below the export limit" in n for n in notes):
        notes.append(f"the plan's AC head import is below the export limit's "
                     f"{-objective.export_limit_kw:g} kW in {n_miss} interval(s) (by up to "
                     f"{miss_kw:.1f} kW)")
    return VerifiedPlan(planner, sched, res, rep, rounds, timing, log_rounds,
                        [*planner.notes, *notes], repair_log)
