"""Typed, engine-independent network model of one distribution feeder.

Names are OpenDSS's, lower case (``bus``, ``line.650632``). Node numbers are OpenDSS's
(1, 2, 3 = phases A, B, C; 0 = ground; 4+ = neutrals or secondary conductors).
Powers follow the DESIGN convention: a load's ``p_kw`` is consumption (>= 0); a PV
system's or generator's rating is output (>= 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Bus:
    """A bus: its nodes, voltage base, coordinates (when the model gives them) and the
    shortest electrical-path distance from the feeder head [km]."""

    name: str
    nodes: tuple[int, ...]
    kv_base_ln: float
    x: float | None
    y: float | None
    distance_km: float


@dataclass(frozen=True, slots=True)
class Line:
    """A line or cable section. Ampacities [A]; ``rating_is_default`` is True when the
    model gave no rating and OpenDSS's defaults (400 A / 600 A) apply."""

    name: str
    bus1: str
    bus2: str
    nodes1: tuple[int, ...]
    nodes2: tuple[int, ...]
    phases: int
    length_km: float
    norm_amps: float
    emerg_amps: float
    rating_is_default: bool
    is_switch: bool
    enabled: bool


@dataclass(frozen=True, slots=True)
class Transformer:
    """A transformer (power or service). Per winding: bus, rated kV (line-to-line for
    multi-phase, winding kV for single-phase), connection and tap [pu]."""

    name: str
    phases: int
    kva: float
    buses: tuple[str, ...]
    kv: tuple[float, ...]
    conns: tuple[str, ...]
    taps_pu: tuple[float, ...]
    norm_amps: float
    emerg_amps: float
    regulated: bool


@dataclass(frozen=True, slots=True)
class Regulator:
    """A voltage regulator control acting on a transformer winding's tap.
    ``vreg_v`` and ``band_v`` are on the PT secondary (120 V base usually)."""

    name: str
    transformer: str
    winding: int
    vreg_v: float
    band_v: float
    pt_ratio: float
    tap_pu: float
    min_tap_pu: float
    max_tap_pu: float
    num_taps: int


@dataclass(frozen=True, slots=True)
class Capacitor:
    """A shunt capacitor bank: total rated kvar, kV and the state of each step."""

    name: str
    bus: str
    phases: int
    kvar: float
    kv: float
    states: tuple[int, ...]
    controller: str | None


@dataclass(frozen=True, slots=True)
class Switch:
    """A switching device (switch line or element under a switch control) and its state."""

    name: str
    element: str
    bus1: str
    bus2: str
    closed: bool
    normally_closed: bool


@dataclass(frozen=True, slots=True)
class Load:
    """A load. ``p_kw``/``q_kvar`` are its base consumption (>= 0 when consuming).
    ``kv`` is rated kV (line-to-line for multi-phase); ``model`` is the OpenDSS load model."""

    name: str
    bus: str
    nodes: tuple[int, ...]
    phases: int
    conn: str
    kv: float
    p_kw: float
    q_kvar: float
    model: int
    yearly: str
    daily: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class PVSystem:
    """A PV system: inverter ``kva``, array ``pmpp_kw`` at 1 kW/m2, base irradiance [kW/m2]."""

    name: str
    bus: str
    nodes: tuple[int, ...]
    phases: int
    kv: float
    kva: float
    pmpp_kw: float
    irradiance_kw_m2: float
    enabled: bool


@dataclass(frozen=True, slots=True)
class Storage:
    """A battery: rated power [kW], energy [kWh], inverter [kVA], stored energy [kWh]."""

    name: str
    bus: str
    nodes: tuple[int, ...]
    phases: int
    kv: float
    kw_rated: float
    kwh_rated: float
    kva: float
    kwh_stored: float
    enabled: bool


@dataclass(frozen=True, slots=True)
class Generator:
    """A distributed generator: base output ``p_gen_kw`` >= 0 and ``q_kvar``."""

    name: str
    bus: str
    nodes: tuple[int, ...]
    phases: int
    kv: float
    p_gen_kw: float
    q_kvar: float
    enabled: bool


@dataclass(frozen=True, slots=True)
class FeederHead:
    """The substation source: Thevenin source ``vsource.<name>`` at ``bus``."""

    source: str
    bus: str
    base_kv_ll: float
    v_pu: float
    angle_deg: float
    frequency_hz: float


@dataclass(frozen=True)  # no slots: cached_property needs __dict__
class FeederModel:
    """One feeder as loaded from a model file. Immutable: studies never write into it."""

    name: str
    source_file: Path
    head: FeederHead
    buses: tuple[Bus, ...]
    lines: tuple[Line, ...]
    transformers: tuple[Transformer, ...]
    regulators: tuple[Regulator, ...]
    capacitors: tuple[Capacitor, ...]
    switches: tuple[Switch, ...]
    loads: tuple[Load, ...]
    pv_systems: tuple[PVSystem, ...]
    storage: tuple[Storage, ...]
    generators: tuple[Generator, ...]
    n_nodes: int
    notes: tuple[str, ...] = field(default=())

    @cached_property
    def bus_index(self) -> dict[str, int]:
        """Position of each bus name in :attr:`buses`."""
        return {b.name: i for i, b in enumerate(self.buses)}

    def bus(self, name: str) -> Bus:
        """The bus called ``name`` (case-insensitive); KeyError naming it if unknown."""
        try:
            return self.buses[self.bus_index[name.lower()]]
        except KeyError:
            raise KeyError(f"unknown bus {name!r} in feeder {self.name}") from None

    @property
    def total_load_kw(self) -> float:
        """Sum of enabled loads' base consumption [kW]."""
        return float(sum(ld.p_kw for ld in self.loads if ld.enabled))

    @property
    def total_load_kvar(self) -> float:
        """Sum of enabled loads' base reactive consumption [kvar]."""
        return float(sum(ld.q_kvar for ld in self.loads if ld.enabled))

    def counts(self) -> dict[str, int]:
        """Number of elements of each kind (for summaries and validation)."""
        return {
            "buses": len(self.buses),
            "nodes": self.n_nodes,
            "lines": len(self.lines),
            "transformers": len(self.transformers),
            "regulators": len(self.regulators),
            "capacitors": len(self.capacitors),
            "switches": len(self.switches),
            "loads": len(self.loads),
            "pv_systems": len(self.pv_systems),
            "storage": len(self.storage),
            "generators": len(self.generators),
        }
