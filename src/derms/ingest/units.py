"""Quantities and units of telemetry, translated once at the boundary.

A reading arrives as ``(quantity, unit, value)`` — e.g. ``("p", "W", 1500)`` — and is stored
as a canonical quantity whose unit is in its name (``p_kw`` = 1.5). Unknown quantities or
units are rejected, never guessed. Sign: at a connection point import (consumption) is
positive, as everywhere in derms.
"""

from __future__ import annotations

from dataclasses import dataclass

from derms.errors import InputError


@dataclass(frozen=True, slots=True)
class Quantity:
    """A canonical stored quantity: name (unit in the name), plausible physical range."""

    name: str
    lo: float
    hi: float


QUANTITIES: dict[str, Quantity] = {q.name: q for q in (
    Quantity("p_kw", -1e6, 1e6),
    Quantity("q_kvar", -1e6, 1e6),
    Quantity("s_kva", 0.0, 1e6),
    Quantity("v_v", 0.0, 1e6),
    Quantity("v_pu", 0.0, 2.0),
    Quantity("i_a", 0.0, 1e5),
    Quantity("e_kwh", -1e9, 1e9),
    Quantity("soc_frac", 0.0, 1.0),
    Quantity("f_hz", 40.0, 70.0),
    Quantity("pf", -1.0, 1.0),
    Quantity("tap_pu", 0.5, 1.5),  # a regulator winding's tap ratio (SCADA)
    # per phase (a feeder head's SCADA, a multi-phase meter): the phase in the name
    *(Quantity(f"p_{ph}_kw", -1e6, 1e6) for ph in "abc"),
    *(Quantity(f"q_{ph}_kvar", -1e6, 1e6) for ph in "abc"),
    *(Quantity(f"v_{ph}_v", 0.0, 1e6) for ph in "abc"),
    *(Quantity(f"v_{ph}_pu", 0.0, 2.0) for ph in "abc"),
)}

# (quantity alias, unit) -> (canonical quantity, factor to multiply the value by)
_UNITS: dict[tuple[str, str], tuple[str, float]] = {}


def _add(aliases: tuple[str, ...], canonical: str, units: dict[str, float]) -> None:
    for a in aliases:
        for u, f in units.items():
            _UNITS[(a, u)] = (canonical, f)


_add(("p", "p_kw", "active_power", "w", "kw"), "p_kw", {"w": 1e-3, "kw": 1.0, "mw": 1e3})
_add(("q", "q_kvar", "reactive_power", "var", "kvar"), "q_kvar",
     {"var": 1e-3, "kvar": 1.0, "mvar": 1e3})
_add(("s", "s_kva", "apparent_power"), "s_kva", {"va": 1e-3, "kva": 1.0, "mva": 1e3})
_add(("v", "v_v", "voltage"), "v_v", {"v": 1.0, "kv": 1e3})
_add(("v", "v_pu", "voltage"), "v_pu", {"pu": 1.0})
_add(("i", "i_a", "current"), "i_a", {"a": 1.0, "ka": 1e3})
_add(("e", "e_kwh", "energy"), "e_kwh", {"wh": 1e-3, "kwh": 1.0, "mwh": 1e3})
_add(("soc", "soc_frac", "state_of_charge"), "soc_frac", {"%": 0.01, "frac": 1.0, "": 1.0})
_add(("f", "f_hz", "frequency"), "f_hz", {"hz": 1.0})
_add(("pf", "power_factor"), "pf", {"": 1.0})
_add(("tap", "tap_pu", "tap_ratio"), "tap_pu", {"pu": 1.0, "": 1.0})
for _ph in "abc":
    _add((f"p_{_ph}", f"p_{_ph}_kw"), f"p_{_ph}_kw", {"w": 1e-3, "kw": 1.0, "mw": 1e3})
    _add((f"q_{_ph}", f"q_{_ph}_kvar"), f"q_{_ph}_kvar", {"var": 1e-3, "kvar": 1.0,
                                                           "mvar": 1e3})
    _add((f"v_{_ph}", f"v_{_ph}_v"), f"v_{_ph}_v", {"v": 1.0, "kv": 1e3})
    _add((f"v_{_ph}", f"v_{_ph}_pu"), f"v_{_ph}_pu", {"pu": 1.0})


def canonical(quantity: str, unit: str | None) -> tuple[str, float]:
    """Canonical quantity name and scale factor for ``(quantity, unit)``.

    A canonical name given without a unit (``"p_kw"``) is taken as is. InputError names the
    pair when it is unknown.
    """
    q = quantity.strip().lower()
    u = (unit or "").strip().lower()
    if not u and q in QUANTITIES:
        return q, 1.0
    found = _UNITS.get((q, u))
    if found is None:
        raise InputError(f"unknown quantity/unit {quantity!r}/{unit!r}")
    return found
