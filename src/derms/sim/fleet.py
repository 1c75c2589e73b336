"""Vectorised models of a simulated DER fleet: PV inverters, batteries, EV chargers and
flexible loads, N devices as numpy arrays (one entry per device, no per-device objects).

Sign convention (DESIGN.md): a device's own output ``p_out_kw`` is positive when it
generates or discharges and negative when it charges or consumes; its reactive output
``q_out_kvar`` is positive when it injects (capacitive). At the connection point (the
*site*: the customer's house load plus its device) import is positive:
``site_p_kw = house_kw - p_out_kw``.

Each device obeys its effective IEEE 2030.5 control (:class:`Controls`, kW; NaN = not
set): ``exp_lim_kw`` / ``imp_lim_kw`` limit the *site's* export / import (CSIP-AUS
opModExpLimW / opModImpLimW), ``gen_lim_kw`` / ``load_lim_kw`` the device's own output /
consumption (opModGenLimW / opModLoadLimW), ``target_kw`` sets its output (opModTargetW,
positive = generating/discharging; for PV a cap), ``connect`` / ``energize`` false stop it.

Inverters (PV and batteries) follow IEEE 1547-2018 Category B volt-var (default curve
V = 0.92/0.98/1.02/1.08 pu, Q = +0.44/0/0/-0.44 of the VA rating, reactive power
priority) and optionally volt-watt (1.06 → 1.10 pu, P from the rating to 0), in steady
state (the step is much longer than the 10 s open-loop response time). Validated against
EPRI's ``opender`` in tests/unit/test_sim_fleet.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from derms.errors import InputError

KINDS = ("pv", "battery", "ev", "flex")
PV, BATTERY, EV, FLEX = range(4)


@dataclass(frozen=True)
class VoltVar:
    """IEEE 1547-2018 volt-var curve (pu voltage, Q as a fraction of the VA rating,
    positive = injecting). Defaults: Category B."""

    v: tuple[float, float, float, float] = (0.92, 0.98, 1.02, 1.08)
    q: tuple[float, float, float, float] = (0.44, 0.0, 0.0, -0.44)

    def __post_init__(self) -> None:
        if list(self.v) != sorted(self.v) or len(self.v) != 4 or len(self.q) != 4:
            raise InputError(f"volt-var curve: 4 increasing voltages needed, got {self.v}")


@dataclass(frozen=True)
class VoltWatt:
    """IEEE 1547-2018 volt-watt curve: the output limit falls from ``p1`` (of the rating)
    at ``v1`` to ``p2`` at ``v2`` (pu). Defaults: Category B for a DER that cannot absorb."""

    v1: float = 1.06
    v2: float = 1.10
    p1: float = 1.0
    p2: float = 0.0


@dataclass
class FleetSpec:
    """Static description of N devices (arrays of length N, device order fixed).

    ``kind``: index into :data:`KINDS`. ``s_kva``: inverter/charger rating. ``p_max_kw``:
    PV array size (output at irradiance multiplier 1), battery charge/discharge limit, EV
    charger limit, flexible load's rated draw. ``e_max_kwh``: battery capacity (0 else).
    ``site``: index of the customer load (house) the device sits behind; ``house_share``
    the share of that customer load's kW that is this device's house.
    """

    der_id: np.ndarray  # (N,) str
    kind: np.ndarray  # (N,) int
    s_kva: np.ndarray
    p_max_kw: np.ndarray
    e_max_kwh: np.ndarray
    load_index: np.ndarray  # (N,) int: the feeder load the device's site belongs to
    house_share: np.ndarray  # (N,) fraction of that load
    soc_min_frac: np.ndarray
    eta: np.ndarray  # one-way efficiency (battery, EV)
    ev_arrival_h: np.ndarray  # local hour of plug-in (EV), nan else
    ev_departure_h: np.ndarray  # local hour of departure on the next day
    ev_need_kwh: np.ndarray  # energy to deliver per session
    flex_frac: np.ndarray  # flexible load: draw as a fraction of p_max_kw (of its shape)
    volt_var: VoltVar = field(default_factory=VoltVar)
    volt_watt: VoltWatt | None = None

    def __post_init__(self) -> None:
        n = len(self.der_id)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and len(value) != n:
                raise InputError(f"fleet field {f.name}: {len(value)} values for {n} devices")
        bad = np.flatnonzero((self.kind < 0) | (self.kind >= len(KINDS)))
        if bad.size:
            raise InputError(f"device {self.der_id[bad[0]]}: unknown kind {self.kind[bad[0]]}")
        bad = np.flatnonzero(~(self.s_kva > 0) | ~(self.p_max_kw >= 0))
        if bad.size:
            raise InputError(f"device {self.der_id[bad[0]]}: s_kva must be > 0 and p_max_kw "
                             f">= 0 (got {self.s_kva[bad[0]]}, {self.p_max_kw[bad[0]]})")
        bat = self.kind == BATTERY
        bad = np.flatnonzero(bat & ~(self.e_max_kwh > 0))
        if bad.size:
            raise InputError(f"battery {self.der_id[bad[0]]}: e_max_kwh must be > 0")
        bad = np.flatnonzero(~((self.eta > 0) & (self.eta <= 1)))
        if bad.size:
            raise InputError(f"device {self.der_id[bad[0]]}: efficiency {self.eta[bad[0]]} "
                             "not in (0, 1]")

    @property
    def n(self) -> int:
        return len(self.der_id)

    def mask(self, kind: int) -> np.ndarray:
        return self.kind == kind


_LIMITS = ("exp_lim_kw", "imp_lim_kw", "gen_lim_kw", "load_lim_kw", "target_kw")


@dataclass
class Controls:
    """Per-device control values (kW; NaN = not set) and flags (see module docstring)."""

    exp_lim_kw: np.ndarray
    imp_lim_kw: np.ndarray
    gen_lim_kw: np.ndarray
    load_lim_kw: np.ndarray
    target_kw: np.ndarray
    connect: np.ndarray  # bool
    energize: np.ndarray  # bool

    @classmethod
    def none(cls, n: int) -> Controls:
        nan = np.full(n, np.nan)
        return cls(*(nan.copy() for _ in _LIMITS), np.ones(n, bool), np.ones(n, bool))

    def copy(self) -> Controls:
        return Controls(*(getattr(self, f.name).copy() for f in fields(self)))

    def set_row(self, i: int, *, exp_lim_kw=None, imp_lim_kw=None, gen_lim_kw=None,
                load_lim_kw=None, target_kw=None, connect=None, energize=None) -> None:
        """Device ``i`` gets exactly these values (None = not set / flag true)."""
        for name, value in (("exp_lim_kw", exp_lim_kw), ("imp_lim_kw", imp_lim_kw),
                            ("gen_lim_kw", gen_lim_kw), ("load_lim_kw", load_lim_kw),
                            ("target_kw", target_kw)):
            getattr(self, name)[i] = np.nan if value is None else float(value)
        self.connect[i] = True if connect is None else bool(connect)
        self.energize[i] = True if energize is None else bool(energize)

    def active(self) -> np.ndarray:
        """Devices with any control set -> (N,) bool."""
        anyset = np.zeros(len(self.connect), bool)
        for name in _LIMITS:
            anyset |= ~np.isnan(getattr(self, name))
        return anyset | ~self.connect | ~self.energize


def effective_controls(event: Controls, event_active: np.ndarray, default: Controls,
                       contact_age_s: np.ndarray, comm_timeout_s: float) -> Controls:
    """What each device applies: its active event's control, except when it has no active
    event or its communication has been lost for longer than ``comm_timeout_s`` (then the
    DefaultDERControl it last received: fail-safe); a mode the active event does not set
    takes the default's value. ``contact_age_s``: seconds since each
    device's last successful exchange with the server (inf: never)."""
    use_event = event_active & (contact_age_s <= comm_timeout_s)

    def pick(a, b):  # a mode the active event leaves unset takes the default's value
        if a.dtype.kind == "f":           # (an event with no modes -- a DERMS release --
            return np.where(use_event & ~np.isnan(a), a, b)   # is the default control)
        return np.where(use_event, a, b)
    return Controls(*(pick(getattr(event, f.name), getattr(default, f.name))
                      for f in fields(Controls)))


@dataclass
class FleetState:
    """Dynamic state: battery energy [kWh], EV energy still needed this session [kWh],
    which devices are online (producing and answering), and last outputs."""

    e_kwh: np.ndarray
    ev_remaining_kwh: np.ndarray
    ev_plugged: np.ndarray  # bool
    online: np.ndarray  # bool
    p_out_kw: np.ndarray
    q_out_kvar: np.ndarray

    @classmethod
    def initial(cls, spec: FleetSpec, soc0_frac: float = 0.5) -> FleetState:
        n = spec.n
        return cls(e_kwh=spec.e_max_kwh * soc0_frac, ev_remaining_kwh=np.zeros(n),
                   ev_plugged=np.zeros(n, bool), online=np.ones(n, bool),
                   p_out_kw=np.zeros(n), q_out_kvar=np.zeros(n))


@dataclass(frozen=True)
class StepInputs:
    """What the world gives the fleet for one step (arrays (N,)): ``pv_avail_kw`` (PV: the
    array's available output; 0 for others), ``house_kw`` (the site's own load, import),
    ``flex_base_kw`` (flexible load's baseline draw), ``v_pu`` (terminal voltage, from the
    previous power flow), ``local_hour`` (scalar, local time of day [h])."""

    pv_avail_kw: np.ndarray
    house_kw: np.ndarray
    flex_base_kw: np.ndarray
    v_pu: np.ndarray
    local_hour: float


def volt_var_q_frac(v_pu: np.ndarray, curve: VoltVar) -> np.ndarray:
    """Reactive power [fraction of the VA rating, + = injecting] of the volt-var curve at
    ``v_pu`` (flat beyond the end points), IEEE 1547-2018 §5.3.3."""
    return np.interp(v_pu, curve.v, curve.q)


def volt_watt_p_frac(v_pu: np.ndarray, curve: VoltWatt) -> np.ndarray:
    """Active power limit [fraction of the rating] of the volt-watt curve at ``v_pu``,
    IEEE 1547-2018 §5.4.2."""
    return np.interp(v_pu, (curve.v1, curve.v2), (curve.p1, curve.p2))


def inverter_pq(p_want_kw: np.ndarray, v_pu: np.ndarray, s_kva: np.ndarray,
                p_rated_kw: np.ndarray, volt_var: VoltVar | None,
                volt_watt: VoltWatt | None) -> tuple[np.ndarray, np.ndarray]:
    """Steady-state output of 1547 inverters: active power wanted ``p_want_kw`` (+ =
    output), terminal voltage, VA rating and active-power rating -> (p_kw, q_kvar).
    Volt-watt caps positive output; volt-var sets Q; reactive power has priority within
    the VA rating (|p| <= sqrt(S^2 - q^2))."""
    p = p_want_kw.copy()
    if volt_watt is not None:
        cap = volt_watt_p_frac(v_pu, volt_watt) * p_rated_kw
        p = np.where(p > 0, np.minimum(p, cap), p)
    q = (volt_var_q_frac(v_pu, volt_var) * s_kva if volt_var is not None
         else np.zeros_like(p))
    q = np.clip(q, -s_kva, s_kva)
    p_room = np.sqrt(np.maximum(s_kva**2 - q**2, 0.0))
    return np.clip(p, -p_room, p_room), q


def _min_nan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise min treating NaN in ``b`` as 'no limit'."""
    return np.where(np.isnan(b), a, np.minimum(a, b))


def _max_nan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(b), a, np.maximum(a, b))


def ev_plugged_in(spec: FleetSpec, local_hour: float) -> np.ndarray:
    """EVs plugged in at ``local_hour`` (sessions from the arrival hour in the evening to
    the departure hour next morning) -> (N,) bool."""
    h = local_hour % 24.0
    arr, dep = spec.ev_arrival_h, spec.ev_departure_h
    with np.errstate(invalid="ignore"):
        return (spec.kind == EV) & ((h >= arr) | (h < dep))


def step_fleet(spec: FleetSpec, state: FleetState, controls: Controls, inputs: StepInputs,
               dt_s: float) -> FleetState:
    """Advance every device by ``dt_s`` seconds under ``controls``; returns the new state
    (outputs ``p_out_kw`` / ``q_out_kvar`` held over the step). Pure numpy, no loops."""
    if dt_s <= 0:
        raise InputError(f"step must be > 0 s, got {dt_s}")
    dt_h = dt_s / 3600.0
    k = spec.kind
    is_pv, is_bat, is_ev, is_flex = (k == PV), (k == BATTERY), (k == EV), (k == FLEX)
    hour = inputs.local_hour % 24.0

    # EV sessions: a new plug-in starts with the session's energy need
    plugged = ev_plugged_in(spec, hour)
    new = plugged & ~state.ev_plugged
    ev_rem = np.where(new, spec.ev_need_kwh, np.where(plugged, state.ev_remaining_kwh, 0.0))

    # capability bounds of p_out [kW] over this step (output positive)
    e_min = spec.e_max_kwh * spec.soc_min_frac
    dis_max = np.minimum(spec.p_max_kw, np.maximum(state.e_kwh - e_min, 0) * spec.eta / dt_h)
    ch_max = np.minimum(spec.p_max_kw,
                        np.maximum(spec.e_max_kwh - state.e_kwh, 0) / spec.eta / dt_h)
    ev_max = np.where(plugged, np.minimum(spec.p_max_kw, ev_rem / spec.eta / dt_h), 0.0)
    p_hi = np.select([is_pv, is_bat], [inputs.pv_avail_kw, dis_max], 0.0)
    p_lo = np.select([is_bat, is_ev, is_flex], [-ch_max, -ev_max, -inputs.flex_base_kw], 0.0)

    # native behaviour: PV at its available power; batteries on a time-of-use schedule
    # (charge 10-15 h at half rate, discharge 17-21 h); EVs charge flat out; flexible
    # loads draw their baseline
    bat_native = np.where((hour >= 17) & (hour < 21), spec.p_max_kw,
                          np.where((hour >= 10) & (hour < 15), -0.5 * spec.p_max_kw, 0.0))
    p = np.select([is_pv, is_bat, is_ev, is_flex],
                  [inputs.pv_avail_kw, bat_native, -ev_max, -inputs.flex_base_kw], 0.0)

    # controls: target replaces the native set-point, then the device and site limits
    c = controls
    p = np.where(np.isnan(c.target_kw), p,
                 np.where(is_pv, np.minimum(p, np.maximum(c.target_kw, 0.0)), c.target_kw))
    p = _min_nan(p, c.gen_lim_kw)
    p = _max_nan(p, -c.load_lim_kw)
    p = _min_nan(p, inputs.house_kw + c.exp_lim_kw)  # site export <= limit
    need = inputs.house_kw - c.imp_lim_kw  # site import <= limit: p_out >= house - limit
    p = _max_nan(p, np.minimum(need, p_hi))
    p = np.clip(p, p_lo, p_hi)

    # inverters: volt-watt, volt-var with reactive power priority
    inv = is_pv | is_bat
    p_inv, q_inv = inverter_pq(p, inputs.v_pu, spec.s_kva, spec.p_max_kw, spec.volt_var,
                               spec.volt_watt)
    p = np.where(inv, p_inv, p)
    # a PV inverter without DC power sleeps (no reactive power at night), as opender does
    q = np.where(inv & ~(is_pv & (inputs.pv_avail_kw <= 0)), q_inv, 0.0)

    on = state.online & c.connect & c.energize
    p = np.where(on, p, 0.0)
    q = np.where(on, q, 0.0)

    # energy: batteries (one-way efficiencies), EVs (energy delivered to the car)
    e = np.where(is_bat, state.e_kwh - np.where(p > 0, p / spec.eta, p * spec.eta) * dt_h,
                 state.e_kwh)
    e = np.where(is_bat, np.clip(e, e_min, spec.e_max_kwh), e)
    ev_rem = np.where(is_ev, np.maximum(ev_rem + p * spec.eta * dt_h, 0.0), ev_rem)
    return FleetState(e_kwh=e, ev_remaining_kwh=ev_rem, ev_plugged=plugged,
                      online=state.online.copy(), p_out_kw=p, q_out_kvar=q)


def soc_frac(spec: FleetSpec, state: FleetState) -> np.ndarray:
    """State of charge of batteries (NaN for other devices)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(spec.kind == BATTERY, state.e_kwh / spec.e_max_kwh, np.nan)
