"""Seeded placement and sizing of a simulated fleet on a feeder's customer loads.

Each feeder load stands for ``max(1, round(p_kw / house_peak_kw))`` houses (IEEE 123's
spot loads are 20-40 kW: several houses). Devices are dealt to loads in proportion to
their kW (every device its own house, so a load gets more houses when it gets more
devices than it has), each house's own consumption being an equal share of its load: its
peak ``P``. So the fleet's size follows the feeder's load, however many devices there are.
Kinds are drawn with the ``mix`` shares; sizes relative to ``P``:

* PV: array ``U(0.8, 2.0) P`` kW, inverter ``1.1 x`` that in kVA.
* Battery: ``U(0.6, 1.0) P`` kW, 2-4 h of energy, 10 % minimum SOC, 95 % one-way efficiency.
* EV charger: 7.2 or 11 kW (at most ``2.5 P``), plugged in at U(17, 20) h local until
  U(6, 8) h, needs U(8, 25) kWh per session, 92 % efficiency.
* Flexible load: ``U(0.2, 0.4) P`` kW drawn on the house's own shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from derms.errors import InputError
from derms.sim.fleet import BATTERY, EV, FLEX, KINDS, PV, FleetSpec, VoltVar, VoltWatt

DEFAULT_MIX: dict[str, float] = {"pv": 0.6, "battery": 0.2, "ev": 0.15, "flex": 0.05}


def place_fleet(load_kw: Sequence[float], n_devices: int, seed: int = 0,
                mix: Mapping[str, float] | None = None, house_peak_kw: float = 5.0,
                volt_watt: bool = False) -> FleetSpec:
    """``n_devices`` devices on the loads with base kW ``load_kw`` (see module docstring);
    device ids ``<kind>-<k>`` in device order."""
    load_kw = np.asarray(load_kw, dtype=float)
    if n_devices < 0:
        raise InputError(f"--devices must be >= 0, got {n_devices}")
    if load_kw.size == 0 or not (load_kw > 0).any():
        raise InputError("the feeder has no customer loads (p_kw > 0) to place devices at")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise InputError(f"device mix: unknown kind {sorted(unknown)[0]!r} "
                         f"(known: {', '.join(KINDS)})")
    shares = np.array([max(float(mix.get(k, 0.0)), 0.0) for k in KINDS])
    if shares.sum() <= 0:
        raise InputError("device mix: the shares sum to 0")
    rng = np.random.default_rng(seed)
    n = n_devices
    weights = np.where(load_kw > 0, load_kw, 0.0)
    load_index = rng.choice(load_kw.size, size=n, p=weights / weights.sum())
    houses = np.maximum(1, np.round(load_kw / house_peak_kw)).astype(int)
    per_load = np.bincount(load_index, minlength=load_kw.size)
    houses = np.maximum(houses, per_load)
    house_share = 1.0 / houses[load_index]
    kind = rng.choice(len(KINDS), size=n, p=shares / shares.sum())
    P = load_kw[load_index] * house_share  # each device's house peak [kW]
    u = rng.uniform(size=(n, 4))
    pv_kw = (0.8 + 1.2 * u[:, 0]) * P
    bat_kw = (0.6 + 0.4 * u[:, 0]) * P
    ev_kw = np.minimum(np.where(u[:, 1] < 0.5, 7.2, 11.0), 2.5 * P)
    flex_kw = (0.2 + 0.2 * u[:, 0]) * P
    p_max = np.select([kind == PV, kind == BATTERY, kind == EV, kind == FLEX],
                      [pv_kw, bat_kw, ev_kw, flex_kw])
    s_kva = np.where(kind == PV, 1.1 * pv_kw, p_max)
    e_max = np.where(kind == BATTERY, bat_kw * (2.0 + 2.0 * u[:, 2]), 0.0)
    is_ev = kind == EV
    counters = {k: 0 for k in KINDS}
    ids = []
    for kd in kind:
        name = KINDS[kd]
        counters[name] += 1
        ids.append(f"{name}-{counters[name]}")
    return FleetSpec(
        der_id=np.array(ids, dtype=object), kind=kind, s_kva=s_kva, p_max_kw=p_max,
        e_max_kwh=e_max, load_index=load_index, house_share=house_share,
        soc_min_frac=np.where(kind == BATTERY, 0.1, 0.0),
        eta=np.select([kind == BATTERY, is_ev], [0.95, 0.92], 1.0),
        ev_arrival_h=np.where(is_ev, 17.0 + 3.0 * u[:, 3], np.nan),
        ev_departure_h=np.where(is_ev, 6.0 + 2.0 * u[:, 2], np.nan),
        ev_need_kwh=np.where(is_ev, 8.0 + 17.0 * u[:, 1], 0.0),
        flex_frac=np.where(kind == FLEX, 1.0, 0.0),
        volt_var=VoltVar(), volt_watt=VoltWatt() if volt_watt else None,
    )
