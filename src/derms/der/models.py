"""DER models: capabilities and constraints as typed data, fleet arrays, groups (VPPs).

Pure data and math (layer 3): no power-flow imports. Sign convention (DESIGN.md): at a
connection point import (consumption) is positive; a DER's own output is
``p_gen_kw >= 0`` and its charging ``p_charge_kw >= 0``. Energies are kWh, state of
charge ``soc_frac`` is a fraction of the usable capacity ``e_max_kwh``.

Time: a :class:`Horizon` is ``n_steps`` intervals ``[start + k*step, start + (k+1)*step)``
with a timezone-aware UTC ``start``. Forecast series (available PV power, a flexible
load's baseline) are arrays of one value per interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from derms.errors import InfeasibleError, InputError

PHASE_NODES = (1, 2, 3)


@dataclass(frozen=True, slots=True)
class Horizon:
    """Planning horizon: ``n_steps`` intervals of ``step`` from ``start`` (UTC, aware)."""

    start: datetime
    step: timedelta
    n_steps: int

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise InputError("horizon start must be timezone-aware (UTC)")
        if self.step <= timedelta(0) or self.n_steps < 1:
            raise InputError(f"horizon needs a positive step and >= 1 step, got {self.step}, "
                             f"{self.n_steps}")

    @property
    def dt_h(self) -> float:
        """Interval length [h]."""
        return self.step.total_seconds() / 3600.0

    @property
    def end(self) -> datetime:
        return self.start + self.n_steps * self.step

    def step_at(self, t: datetime, *, ceil: bool) -> int:
        """Index of the interval boundary at or after (``ceil``) / before ``t`` (unclipped)."""
        if t.tzinfo is None:
            raise InputError(f"time {t} must be timezone-aware (UTC)")
        k = (t - self.start) / self.step
        return math.ceil(k - 1e-9) if ceil else math.floor(k + 1e-9)


@dataclass(frozen=True, slots=True)
class Connection:
    """Where a DER connects: bus, conductor nodes (OpenDSS numbers, 0 = ground), phases,
    rated kV (line-to-line for 3-phase and delta, line-to-neutral for 1-phase wye), conn."""

    bus: str
    nodes: tuple[int, ...]
    phases: int
    kv: float
    conn: str = "wye"

    @property
    def injection_nodes(self) -> tuple[str, ...]:
        """Phase nodes "bus.n" that share the DER's power equally (ground/neutral left out)."""
        own = tuple(f"{self.bus}.{int(n)}" for n in self.nodes if int(n) in PHASE_NODES)
        return own or tuple(f"{self.bus}.{n}" for n in PHASE_NODES[: self.phases])

    @property
    def injection_terminals(self) -> tuple[str, ...]:
        """Where the DER's power goes, shared equally: its phase nodes "bus.n" (wye), or,
        for a delta connection, the node pairs "bus.a.b" it sits across (3 phases: a-b, b-c,
        c-a; 2 phases on 3 nodes: a-b, b-c; 1 phase on 2 nodes: a-b). A delta DER puts no
        current into ground, which on an ungrounded (3-wire) feeder is the difference
        between meaningful sensitivities and none (see :mod:`derms.powerflow.linear`)."""
        nodes = self.injection_nodes
        if self.conn.lower() != "delta" or len(nodes) < 2:
            return nodes
        from derms.powerflow.voltage_measure import delta_terms

        ph = [int(n.rsplit(".", 1)[1]) for n in nodes]
        return tuple(delta_terms(self.bus, ph, self.phases))


@dataclass(frozen=True, slots=True)
class Battery:
    """Battery storage. ``p_max_kw`` charge and discharge limit [kW], ``e_max_kwh`` usable
    capacity, SOC bounds and ``reserve_frac`` (kept for backup: the lower energy bound is
    ``max(soc_min_frac, reserve_frac) * e_max_kwh``), one-way efficiencies, initial SOC and
    the SOC it must at least end the horizon with (default: the initial one)."""

    der_id: str
    connection: Connection
    p_max_kw: float
    e_max_kwh: float
    soc0_frac: float = 0.5
    soc_min_frac: float = 0.1
    soc_max_frac: float = 1.0
    reserve_frac: float = 0.0
    eta_charge: float = 0.95
    eta_discharge: float = 0.95
    soc_end_min_frac: float | None = None
    cycle_cost_per_kwh: float = 0.0  # owner preference: cost of throughput [per kWh]

    def __post_init__(self) -> None:
        if self.p_max_kw < 0 or self.e_max_kwh <= 0:
            raise InputError(f"battery {self.der_id}: p_max_kw must be >= 0 and e_max_kwh > 0")
        lo = max(self.soc_min_frac, self.reserve_frac)
        if not 0 <= lo <= self.soc_max_frac <= 1:
            raise InputError(f"battery {self.der_id}: SOC bounds {lo}..{self.soc_max_frac}")
        if not lo - 1e-9 <= self.soc0_frac <= self.soc_max_frac + 1e-9:
            raise InputError(f"battery {self.der_id}: initial SOC {self.soc0_frac} outside "
                             f"{lo}..{self.soc_max_frac}")
        for eta in (self.eta_charge, self.eta_discharge):
            if not 0 < eta <= 1:
                raise InputError(f"battery {self.der_id}: efficiency {eta} not in (0, 1]")

    @property
    def e_min_kwh(self) -> float:
        return max(self.soc_min_frac, self.reserve_frac) * self.e_max_kwh


@dataclass(frozen=True, slots=True)
class EVSession:
    """An EV charging session: plugged in over ``[arrival, departure)`` (UTC), needs
    ``e_needed_kwh`` delivered to the battery by departure, at most ``p_max_kw`` drawn."""

    der_id: str
    connection: Connection
    arrival: datetime
    departure: datetime
    e_needed_kwh: float
    p_max_kw: float
    eta_charge: float = 0.92

    def __post_init__(self) -> None:
        if self.departure <= self.arrival:
            raise InputError(f"EV {self.der_id}: departure {self.departure} is not after "
                             f"arrival {self.arrival}")
        if self.e_needed_kwh < 0 or self.p_max_kw < 0:
            raise InputError(f"EV {self.der_id}: energy and rate must be >= 0")


@dataclass(frozen=True, slots=True)
class PVInverter:
    """PV with inverter: ``p_avail_kw`` (n_steps,) the forecast available power [kW, output
    >= 0]; output may be curtailed below it. Reactive power within the inverter's
    ``s_kva`` (the plan uses ``|q| <= sqrt(s_kva^2 - p_avail^2)``, conservative) and
    ``q_max_frac * s_kva``. ``curtail_cost_per_kwh`` is the owner's price of curtailment."""

    der_id: str
    connection: Connection
    s_kva: float
    p_avail_kw: np.ndarray
    q_max_frac: float = 0.44
    curtail_cost_per_kwh: float = 0.0

    def __post_init__(self) -> None:
        p = np.asarray(self.p_avail_kw, dtype=float)
        if p.ndim != 1 or (p < -1e-9).any() or not np.isfinite(p).all():
            raise InputError(f"PV {self.der_id}: p_avail_kw must be finite, >= 0, one per step")
        object.__setattr__(self, "p_avail_kw", np.minimum(np.maximum(p, 0.0), self.s_kva))


@dataclass(frozen=True, slots=True)
class FlexibleLoad:
    """A load that can shed part of its baseline inside ``[window_start, window_end)``
    (at most ``shed_max_frac`` of it) and must take back ``rebound_frac`` x the shed
    energy inside the same window, at most ``p_rebound_max_kw`` above its baseline.
    ``p_base_kw`` (n_steps,) is the baseline consumption [kW, import >= 0]."""

    der_id: str
    connection: Connection
    p_base_kw: np.ndarray
    window_start: datetime
    window_end: datetime
    shed_max_frac: float = 0.5
    rebound_frac: float = 1.0
    p_rebound_max_kw: float | None = None
    shed_cost_per_kwh: float = 0.0

    def __post_init__(self) -> None:
        p = np.asarray(self.p_base_kw, dtype=float)
        if p.ndim != 1 or (p < 0).any():
            raise InputError(f"flexible load {self.der_id}: p_base_kw must be >= 0 per step")
        object.__setattr__(self, "p_base_kw", p)
        if not 0 <= self.shed_max_frac <= 1 or self.rebound_frac < 0:
            raise InputError(f"flexible load {self.der_id}: shed_max_frac in [0, 1], "
                             "rebound_frac >= 0")


@dataclass(frozen=True, slots=True)
class ControllableGenerator:
    """A dispatchable generator: output ``p_gen_kw`` in ``[p_min_kw, p_max_kw]`` at
    ``cost_per_kwh``; uncontrolled it runs at ``p_min_kw``."""

    der_id: str
    connection: Connection
    p_min_kw: float
    p_max_kw: float
    cost_per_kwh: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.p_min_kw <= self.p_max_kw:
            raise InputError(f"generator {self.der_id}: need 0 <= p_min_kw <= p_max_kw")


@dataclass(frozen=True, slots=True)
class GroupRequest:
    """A request to a DER group (VPP): net export ``p_export_kw`` (>= 0; export = minus
    net import) of its members together in every interval of ``[start, end)``."""

    group_id: str
    start: datetime
    end: datetime
    p_export_kw: float


@dataclass(frozen=True, slots=True)
class DERGroup:
    """A group of DERs (a VPP) addressed as one; ``members`` are der_ids."""

    group_id: str
    members: tuple[str, ...]


DER = Battery | EVSession | PVInverter | FlexibleLoad | ControllableGenerator


@dataclass(frozen=True)
class Fleet:
    """All DERs of one plan over one horizon, in a fixed order: PV, batteries, EVs,
    flexible loads, generators (the order of :attr:`der_ids` and of every array)."""

    horizon: Horizon
    pv: tuple[PVInverter, ...] = ()
    batteries: tuple[Battery, ...] = ()
    evs: tuple[EVSession, ...] = ()
    flex: tuple[FlexibleLoad, ...] = ()
    generators: tuple[ControllableGenerator, ...] = ()
    groups: tuple[DERGroup, ...] = ()
    requests: tuple[GroupRequest, ...] = field(default=())

    def __post_init__(self) -> None:
        ids = self.der_ids
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"der_id {dup!r} is used twice")
        T = self.horizon.n_steps
        for d in (*self.pv, *self.flex):
            n = len(d.p_avail_kw if isinstance(d, PVInverter) else d.p_base_kw)
            if n != T:
                raise InputError(f"DER {d.der_id}: series has {n} values, the horizon {T}")
        known = set(ids)
        gids = {g.group_id for g in self.groups}
        for g in self.groups:
            bad = [m for m in g.members if m not in known]
            if bad:
                raise InputError(f"group {g.group_id}: unknown member {bad[0]!r}")
        for r in self.requests:
            if r.group_id not in gids:
                raise InputError(f"request for unknown group {r.group_id!r}")

    @property
    def ders(self) -> tuple[DER, ...]:
        return (*self.pv, *self.batteries, *self.evs, *self.flex, *self.generators)

    @property
    def der_ids(self) -> list[str]:
        return [d.der_id for d in self.ders]

    @property
    def kinds(self) -> list[str]:
        return (["pv"] * len(self.pv) + ["battery"] * len(self.batteries) + ["ev"] * len(self.evs)
                + ["flex"] * len(self.flex) + ["generator"] * len(self.generators))

    def with_horizon(self, horizon: Horizon, pv_avail_kw: np.ndarray | None = None,
                     flex_base_kw: np.ndarray | None = None,
                     soc0_frac: np.ndarray | None = None) -> Fleet:
        """The same fleet for another horizon with new forecasts (T, n_pv) / (T, n_flex) and
        initial SOCs (n_bat,) — the input of a rolling re-plan."""
        from dataclasses import replace
        pv = self.pv if pv_avail_kw is None else tuple(
            replace(p, p_avail_kw=pv_avail_kw[:, j]) for j, p in enumerate(self.pv))
        fl = self.flex if flex_base_kw is None else tuple(
            replace(f, p_base_kw=flex_base_kw[:, j]) for j, f in enumerate(self.flex))
        bt = self.batteries if soc0_frac is None else tuple(
            replace(b, soc0_frac=float(soc0_frac[j])) for j, b in enumerate(self.batteries))
        return replace(self, horizon=horizon, pv=pv, flex=fl, batteries=bt)


@dataclass(frozen=True)
class FleetArrays:
    """The fleet as numpy arrays (hot-loop form). Series are (T, n) with the interval on
    axis 0; EV/flex windows are boolean masks (T, n) of the intervals they may act in."""

    dt_h: float
    pv_avail_kw: np.ndarray
    pv_s_kva: np.ndarray
    pv_q_max_kvar: np.ndarray
    pv_curtail_cost: np.ndarray
    bat_p_max_kw: np.ndarray
    bat_e_max_kwh: np.ndarray
    bat_e_min_kwh: np.ndarray
    bat_e0_kwh: np.ndarray
    bat_e_end_min_kwh: np.ndarray
    bat_eta_ch: np.ndarray
    bat_eta_dis: np.ndarray
    bat_cycle_cost: np.ndarray
    ev_window: np.ndarray
    ev_p_max_kw: np.ndarray
    ev_e_required_kwh: np.ndarray  # [kWh] to charge within the horizon (the rest after it)
    ev_eta: np.ndarray
    flex_base_kw: np.ndarray
    flex_window: np.ndarray
    flex_shed_max_kw: np.ndarray
    flex_rebound_max_kw: np.ndarray
    flex_rebound_frac: np.ndarray
    flex_shed_cost: np.ndarray
    gen_p_min_kw: np.ndarray
    gen_p_max_kw: np.ndarray
    gen_cost: np.ndarray
    # [kWh] each session's whole need (the uncontrolled case charges it from arrival)
    ev_e_needed_kwh: np.ndarray | None = None


def _window_mask(h: Horizon, start: datetime, end: datetime) -> np.ndarray:
    """Intervals that lie wholly inside [start, end) -> (T,) bool."""
    k = np.arange(h.n_steps)
    lo, hi = h.step_at(start, ceil=True), h.step_at(end, ceil=False)
    return (k >= lo) & (k < hi)


def fleet_arrays(fleet: Fleet) -> FleetArrays:
    """Vectorise a fleet; check EV sessions can get their energy (else
    :class:`InfeasibleError` naming the EV and the numbers)."""
    h, T = fleet.horizon, fleet.horizon.n_steps
    dt = h.dt_h

    def col(items, attr, dtype=float):
        return np.array([getattr(x, attr) for x in items], dtype=dtype)

    def series(items, attr):
        return (np.column_stack([getattr(x, attr) for x in items]) if items
                else np.zeros((T, 0)))

    pv, bt, ev, fl, gn = fleet.pv, fleet.batteries, fleet.evs, fleet.flex, fleet.generators
    avail = series(pv, "p_avail_kw")
    s = col(pv, "s_kva")
    q_cap = np.minimum(np.sqrt(np.maximum(s**2 - avail**2, 0.0)), col(pv, "q_max_frac") * s)
    e_max = col(bt, "e_max_kwh")
    e_min = np.array([b.e_min_kwh for b in bt], dtype=float)
    e0 = col(bt, "soc0_frac") * e_max
    e_end = np.array([b.e_max_kwh * (b.soc0_frac if b.soc_end_min_frac is None
                                     else b.soc_end_min_frac) for b in bt], dtype=float)
    ev_win = (np.column_stack([_window_mask(h, e.arrival, e.departure) for e in ev])
              if ev else np.zeros((T, 0), dtype=bool))
    ev_req = np.zeros(len(ev))
    for j, e in enumerate(ev):
        after_h = max(0.0, (e.departure - h.end).total_seconds() / 3600.0)
        need = max(0.0, e.e_needed_kwh - e.p_max_kw * e.eta_charge * after_h)
        can = ev_win[:, j].sum() * dt * e.p_max_kw * e.eta_charge
        if need > can + 1e-6:
            plugged = ev_win[:, j].sum() * dt
            raise InfeasibleError(
                f"EV {e.der_id}: needs {need:.2f} kWh by {min(e.departure, h.end).isoformat()} "
                f"but can get at most {can:.2f} kWh ({e.p_max_kw:g} kW x {plugged:g} h plugged "
                f"in within the horizon x efficiency {e.eta_charge:g})")
        ev_req[j] = need
    fl_win = (np.column_stack([_window_mask(h, f.window_start, f.window_end) for f in fl])
              if fl else np.zeros((T, 0), dtype=bool))
    base = series(fl, "p_base_kw")
    rb_max = np.array([f.p_rebound_max_kw if f.p_rebound_max_kw is not None
                       else float(f.p_base_kw.max()) for f in fl], dtype=float)
    return FleetArrays(
        dt_h=dt, pv_avail_kw=avail, pv_s_kva=s, pv_q_max_kvar=q_cap,
        pv_curtail_cost=col(pv, "curtail_cost_per_kwh"), bat_p_max_kw=col(bt, "p_max_kw"),
        bat_e_max_kwh=col(bt, "soc_max_frac") * e_max, bat_e_min_kwh=e_min, bat_e0_kwh=e0,
        bat_e_end_min_kwh=e_end, bat_eta_ch=col(bt, "eta_charge"),
        bat_eta_dis=col(bt, "eta_discharge"), bat_cycle_cost=col(bt, "cycle_cost_per_kwh"),
        ev_window=ev_win, ev_p_max_kw=col(ev, "p_max_kw"), ev_e_required_kwh=ev_req,
        ev_eta=col(ev, "eta_charge"), flex_base_kw=base, flex_window=fl_win,
        flex_shed_max_kw=base * col(fl, "shed_max_frac") * fl_win,
        flex_rebound_max_kw=rb_max[None, :] * fl_win, flex_rebound_frac=col(fl, "rebound_frac"),
        flex_shed_cost=col(fl, "shed_cost_per_kwh"), gen_p_min_kw=col(gn, "p_min_kw"),
        gen_p_max_kw=col(gn, "p_max_kw"), gen_cost=col(gn, "cost_per_kwh"),
        ev_e_needed_kwh=col(ev, "e_needed_kwh"),
    )


def export_capability_kw(fleet: Fleet, arrays: FleetArrays | None = None) -> np.ndarray:
    """Largest net export [kW] each DER can give in each interval -> (T, n_der), from power
    limits only (battery energy is checked by the optimiser): PV its available power, a
    battery its discharge rate, a generator its maximum, a flexible load minus its
    baseline plus the sheddable part, an EV 0 (no V2G)."""
    a = arrays or fleet_arrays(fleet)
    T = fleet.horizon.n_steps
    return np.column_stack([
        a.pv_avail_kw, np.broadcast_to(a.bat_p_max_kw, (T, a.bat_p_max_kw.size)),
        np.zeros((T, a.ev_p_max_kw.size)), -(a.flex_base_kw - a.flex_shed_max_kw),
        np.broadcast_to(a.gen_p_max_kw, (T, a.gen_p_max_kw.size)),
    ]) if len(fleet.ders) else np.zeros((T, 0))


def controllable_in_horizon(fleet: Fleet, arrays: FleetArrays | None = None) -> np.ndarray:
    """(n_der,) bool, in :attr:`Fleet.der_ids` order: the DER has an interval of the horizon
    in which the plan can move it. An EV session or a flexible load whose window lies wholly
    outside the horizon cannot (a PV inverter can, by its reactive power, also at night)."""
    a = arrays or fleet_arrays(fleet)
    return np.r_[
        (a.pv_avail_kw > 0).any(axis=0) | (a.pv_q_max_kvar > 0).any(axis=0),
        a.bat_p_max_kw > 0,
        a.ev_window.any(axis=0) & (a.ev_p_max_kw > 0),
        (a.flex_shed_max_kw > 0).any(axis=0) | (a.flex_rebound_max_kw > 0).any(axis=0),
        a.gen_p_max_kw > a.gen_p_min_kw,
    ].astype(bool)


def check_group_requests(fleet: Fleet, arrays: FleetArrays | None = None) -> None:
    """Raise :class:`InfeasibleError` naming the group, the interval and the kW when a
    request exceeds what its members can export (power limits)."""
    if not fleet.requests:
        return
    cap = export_capability_kw(fleet, arrays)
    pos = {d: k for k, d in enumerate(fleet.der_ids)}
    groups = {g.group_id: g for g in fleet.groups}
    h = fleet.horizon
    for r in fleet.requests:
        cols = [pos[m] for m in groups[r.group_id].members]
        win = _window_mask(h, r.start, r.end)
        if not win.any():
            raise InputError(f"request to group {r.group_id}: window {r.start}..{r.end} holds "
                             "no whole interval of the horizon")
        total = cap[:, cols].sum(axis=1)
        short = win & (total < r.p_export_kw - 1e-6)
        if short.any():
            k = int(np.flatnonzero(short)[0])
            raise InfeasibleError(
                f"group {r.group_id}: asked for {r.p_export_kw:.1f} kW export but its "
                f"{len(cols)} members can give at most {total[k]:.1f} kW at "
                f"{(h.start + k * h.step).isoformat()} ({int(short.sum())} intervals short)")


def disaggregate(group_id: str, request_kw: float, headroom_kw: Sequence[float] | np.ndarray,
                 members: Sequence[str]) -> np.ndarray:
    """Split a group request [kW] among members in proportion to their headroom [kW].

    Returns each member's share [kW] (sums to ``request_kw``). Raises
    :class:`InfeasibleError` naming the group and numbers when the request exceeds the
    summed headroom.
    """
    h = np.maximum(np.asarray(headroom_kw, dtype=float), 0.0)
    total = float(h.sum())
    if request_kw > total + 1e-9:
        raise InfeasibleError(f"group {group_id}: asked for {request_kw:.1f} kW but its "
                              f"{len(members)} members have {total:.1f} kW of headroom")
    return h * (request_kw / total) if total > 0 else np.zeros_like(h)
