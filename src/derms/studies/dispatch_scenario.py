"""Seeded dispatch scenarios: PV, batteries, EV chargers and flexible loads on a feeder.

Penetration (DESIGN.md): the share of customers (enabled loads with ``p_kw > 0``) that get
the device, each device type drawn independently with the seed. Sizes, per customer with
peak ``P`` (the load's base kW; the bundled shapes peak at 1):

* PV: ``pmpp = U(pv_size_min, pv_size_max) P`` (default U(0.5, 1.2)), inverter ``1.1 pmpp`` kVA; available power = clear-sky
  shape x ``pmpp`` x a per-system derate ``U(0.75, 1.0)`` (orientation, soiling), so
  systems differ in available power per kVA.
* Battery: ``U(0.3, 0.6) P`` kW, ``U(2, 4)`` hours of energy, SOC 50 % at the start and at
  least at the end, bounds 10-100 %, 10 % reserve, 95 % one-way efficiencies.
* EV: charger 7.2 or 11 kW (not scaled), arrives ``U(17, 20)`` h local, leaves ``U(6, 8)``
  h next morning, needs ``U(8, 25)`` kWh (capped at what the session can take).
* Flexible load: an added appliance of ``0.2 P`` following the customer's own shape,
  sheddable up to 100 % in 14:00-22:00 local, energy taken back in the same window.

The default horizon is 24 h x 15 min from local noon, so the evening peak, the EV
sessions and both PV middays lie inside it. A longer horizon (``n_steps``) gives every EV
customer one session per night (ids ``ev_<load>_n<k>`` after the first night, drawn
from their own generator so the first night's draws do not change).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from derms.der.models import (
    Battery,
    Connection,
    EVSession,
    Fleet,
    FlexibleLoad,
    Horizon,
    PVInverter,
)
from derms.errors import InputError
from derms.grid.model import FeederModel, Load
from derms.powerflow.profiles import Profiles
from derms.studies.qsts_study import StudyConfig, study_profiles


@dataclass(frozen=True)
class ScenarioConfig:
    """Penetrations (shares of customers in [0, 1]), seed and horizon (UTC start)."""

    pv_penetration: float = 0.3
    battery_penetration: float = 0.25
    ev_penetration: float = 0.2
    flex_penetration: float = 0.0
    seed: int = 0
    start: datetime = datetime(2026, 7, 1, 20, tzinfo=UTC)  # 12:00 at UTC-8
    step: timedelta = timedelta(minutes=15)
    n_steps: int = 96
    utc_offset_h: float = -8.0
    latitude_deg: float = 37.0
    longitude_deg: float = -120.0
    pv_size_min: float = 0.5  # PV pmpp as a multiple of the customer's peak kW
    pv_size_max: float = 1.2

    def __post_init__(self) -> None:
        for name in ("pv_penetration", "battery_penetration", "ev_penetration",
                     "flex_penetration"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {v}")
        if self.start.tzinfo is None:
            raise InputError("scenario start must be timezone-aware (UTC)")


@dataclass(frozen=True)
class DispatchScenario:
    """A fleet on a feeder, the feeder's own load profiles, and the placement table
    (``der_id, kind, load, bus, size_kw, size_kwh``)."""

    fleet: Fleet
    customer_profiles: Profiles
    placements: pd.DataFrame


def _connection(ld: Load) -> Connection:
    nodes = tuple(int(n) for n in ld.nodes)
    return Connection(ld.bus, nodes, ld.phases, ld.kv, ld.conn)


def _pick(rng: np.random.Generator, n: int, share: float) -> np.ndarray:
    k = round(share * n)
    return np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, dtype=int)


def generate_scenario(model: FeederModel, config: ScenarioConfig | None = None
                      ) -> DispatchScenario:
    """Place and size the DERs of ``config`` on ``model`` (see module docstring)."""
    cfg = config or ScenarioConfig()
    h = Horizon(cfg.start, cfg.step, cfg.n_steps)
    study = StudyConfig(days=cfg.n_steps * cfg.step.total_seconds() / 86400, step=cfg.step,
                        start=cfg.start, seed=cfg.seed, latitude_deg=cfg.latitude_deg,
                        longitude_deg=cfg.longitude_deg, utc_offset_h=cfg.utc_offset_h)
    profiles, pv_shape = study_profiles(model, study)
    shape_of = {e: profiles.p_mult[:, j] for j, e in enumerate(profiles.elements)}
    loads = [ld for ld in model.loads if ld.enabled and ld.p_kw > 0]
    if not loads:
        raise InputError(f"feeder {model.name} has no customer loads to place DERs at")
    rng = np.random.default_rng(cfg.seed + 7)
    rows = []

    def tag(ld: Load) -> str:
        return ld.name.split(".", 1)[1]

    pv = []
    for i in _pick(rng, len(loads), cfg.pv_penetration):
        ld = loads[i]
        pmpp = float(rng.uniform(cfg.pv_size_min, cfg.pv_size_max)) * ld.p_kw
        derate = float(rng.uniform(0.75, 1.0))
        pv.append(PVInverter(f"pv_{tag(ld)}", _connection(ld), round(1.1 * pmpp, 3),
                             pv_shape * pmpp * derate))
        rows.append((pv[-1].der_id, "pv", ld.name, ld.bus, pmpp, np.nan))
    bat = []
    for i in _pick(rng, len(loads), cfg.battery_penetration):
        ld = loads[i]
        p = float(rng.uniform(0.3, 0.6)) * ld.p_kw
        e = p * float(rng.uniform(2.0, 4.0))
        bat.append(Battery(f"bat_{tag(ld)}", _connection(ld), round(p, 3), round(e, 3),
                           soc0_frac=0.5, soc_min_frac=0.1, reserve_frac=0.1))
        rows.append((bat[-1].der_id, "battery", ld.name, ld.bus, p, e))
    local0 = cfg.start + timedelta(hours=cfg.utc_offset_h)
    day0 = datetime(local0.year, local0.month, local0.day, tzinfo=UTC) - timedelta(
        hours=cfg.utc_offset_h)  # local midnight of the start day, in UTC
    ev = []
    for i in _pick(rng, len(loads), cfg.ev_penetration):
        ld = loads[i]
        rate = float(rng.choice([7.2, 11.0]))
        arr = day0 + timedelta(hours=float(rng.uniform(17, 20)))
        dep = day0 + timedelta(hours=24 + float(rng.uniform(6, 8)))
        arr = h.start + h.step * h.step_at(arr, ceil=True)  # whole intervals
        dep = h.start + h.step * h.step_at(dep, ceil=False)
        hours = (dep - arr).total_seconds() / 3600
        e_need = min(float(rng.uniform(8, 25)), 0.9 * rate * 0.92 * hours)
        ev.append(EVSession(f"ev_{tag(ld)}", _connection(ld), arr, dep, round(e_need, 3), rate))
        rows.append((ev[-1].der_id, "ev", ld.name, ld.bus, rate, e_need))
    # later nights of a multi-day horizon: one more session per EV customer and night,
    # drawn from their own generator so the first night's draws never change
    rng_ev = np.random.default_rng(cfg.seed + 11)
    first = list(ev)
    night = 1
    while day0 + timedelta(days=night, hours=17) < h.end:
        for e0 in first:
            arr = day0 + timedelta(days=night, hours=float(rng_ev.uniform(17, 20)))
            dep = day0 + timedelta(days=night + 1, hours=float(rng_ev.uniform(6, 8)))
            arr = h.start + h.step * h.step_at(arr, ceil=True)
            dep = h.start + h.step * h.step_at(dep, ceil=False)
            if arr >= h.end:
                continue
            hours = (dep - arr).total_seconds() / 3600
            e_need = min(float(rng_ev.uniform(8, 25)), 0.9 * e0.p_max_kw * 0.92 * hours)
            ev.append(EVSession(f"{e0.der_id}_n{night}", e0.connection, arr, dep,
                                round(e_need, 3), e0.p_max_kw))
            rows.append((ev[-1].der_id, "ev", rows[[r[0] for r in rows].index(e0.der_id)][2],
                         e0.connection.bus, e0.p_max_kw, e_need))
        night += 1
    flex = []
    for i in _pick(rng, len(loads), cfg.flex_penetration):
        ld = loads[i]
        base = 0.2 * ld.p_kw * shape_of.get(ld.name, np.ones(h.n_steps))
        flex.append(FlexibleLoad(f"flex_{tag(ld)}", _connection(ld), base,
                                 day0 + timedelta(hours=14), day0 + timedelta(hours=22),
                                 shed_max_frac=1.0, rebound_frac=1.0))
        rows.append((flex[-1].der_id, "flex", ld.name, ld.bus, 0.2 * ld.p_kw, np.nan))
    fleet = Fleet(h, tuple(pv), tuple(bat), tuple(ev), tuple(flex))
    table = pd.DataFrame(rows, columns=["der_id", "kind", "load", "bus", "size_kw", "size_kwh"])
    return DispatchScenario(fleet, profiles, table)


def open_dispatch_case(master: str | Path, config: ScenarioConfig | None = None, *,
                       control_mode: str = "static", aggregation=None):
    """Compile ``master``, generate the scenario and prepare the AC network
    (``aggregation``: an :class:`~derms.der.aggregate.AggregationConfig` to plan groups of
    DERs, see :class:`~derms.dispatch.verify.ACNetwork`).

    Returns ``(engine, scenario, ac)``; the caller closes ``engine``.
    """
    from derms.dispatch.verify import ACNetwork
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine

    engine = OpenDSSEngine(master)
    try:
        model = read_feeder(engine.ctx, engine.source_master)
        scenario = generate_scenario(model, config)
        ac = ACNetwork(engine, scenario.fleet, scenario.customer_profiles,
                       control_mode=control_mode, aggregation=aggregation)
    except Exception:
        engine.close()
        raise
    return engine, scenario, ac
