"""Hosting capacity over time: the snapshot method at chosen intervals of a horizon.

For each chosen interval the feeder's loads, PV systems and generators are set to their
profile values (base x multiplier, as in a QSTS), controls settle and are frozen
(:func:`derms.powerflow.control_state.freeze_base_case`, every snapshot starting from the
engine's control state as given, so the result does not depend on the order of the
snapshots), and the snapshot method
(:func:`derms.analysis.hosting_capacity.hosting_capacity_fast`) runs with that interval as
its base case (pre-existing violations are those of the interval). The hosting capacity
over the horizon is, per site, the smallest of its snapshot values, with the interval
where it binds.

Interval choice (:func:`pick_steps`): ``"minmax"`` — the intervals of lowest and highest
total load (a planner's two day-type extremes: light load for generation, peak for load);
``"all"`` — every interval (hourly over a day gives the daily profile).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from derms.analysis.hosting_capacity import (
    HostingCriteria,
    HostingResult,
    Kind,
    Site,
    hosting_capacity_fast,
)
from derms.errors import InputError
from derms.powerflow.collect import build_index
from derms.powerflow.control_state import (
    capture_control_state,
    freeze_base_case,
    restore_control_state,
)
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.profiles import Profiles

_ATTR = {"load": ("Loads", "kW"), "pvsystem": ("PVSystems", "Irradiance"),
         "generator": ("Generators", "kW")}


def pick_steps(engine: OpenDSSEngine, profiles: Profiles, mode: str) -> list[int]:
    """Intervals to study: ``minmax`` (lowest and highest total load kW) or ``all``."""
    if mode == "all":
        return list(range(profiles.n_steps))
    if mode != "minmax":
        raise InputError(f"snapshot choice {mode!r}: expected minmax or all")
    base = _base_values(engine, profiles)
    is_load = np.array([e.startswith("load.") for e in profiles.elements])
    total = profiles.p_mult[:, is_load] @ base[is_load]
    lo, hi = int(np.argmin(total)), int(np.argmax(total))
    return sorted({lo, hi})


def hosting_capacity_over_time(
    engine: OpenDSSEngine, profiles: Profiles, sites: Sequence[Site], kind: Kind,
    criteria: HostingCriteria | None = None, *, steps: Sequence[int] | None = None,
    verify: bool | str = "groups", on_progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, HostingResult]:
    """Snapshot hosting capacity at each of ``steps`` (default: every interval).

    Returns (per-interval table: the snapshot table's columns + ``timestamp``; the
    horizon's result: per site the row of the interval with the smallest value). The
    engine's elements are put back to their base values afterwards (controls frozen).
    """
    t0 = time.perf_counter()
    steps = list(range(profiles.n_steps)) if steps is None else [int(k) for k in steps]
    if not steps or min(steps) < 0 or max(steps) >= profiles.n_steps:
        raise InputError(f"steps must be in [0, {profiles.n_steps - 1}], got {steps}")
    base = _base_values(engine, profiles)
    initial = capture_control_state(engine)  # every snapshot's controls start from here
    index = None
    frames, pre, solves = [], [], 0
    try:
        for n, k in enumerate(steps):
            _apply(engine, profiles, base * profiles.p_mult[k])
            restore_control_state(engine, initial)
            freeze_base_case(engine)
            index = index or build_index(engine)
            res = hosting_capacity_fast(engine, sites, kind, criteria, verify=verify,
                                        index=index)
            t = profiles.times[k]
            frames.append(res.table.assign(timestamp=t))
            pre.append(res.pre_existing.assign(timestamp=t))
            solves += res.n_ac_solves
            if on_progress:
                on_progress(n + 1, len(steps))
    finally:
        _apply(engine, profiles, base)
        restore_control_state(engine, initial)
    per_step = pd.concat(frames, ignore_index=True)
    worst = (per_step.sort_values(["hc_kw", "timestamp"])
             .drop_duplicates(["bus", "phases", "kind"])
             .set_index(["bus", "phases"]).loc[[(s.bus, s.phases) for s in sites]]
             .reset_index().drop(columns="timestamp"))
    result = HostingResult(worst, pd.concat(pre, ignore_index=True),
                           criteria or HostingCriteria(), time.perf_counter() - t0, solves,
                           (f"minimum over {len(steps)} snapshot(s) of the horizon",))
    return per_step, result


def _base_values(engine: OpenDSSEngine, profiles: Profiles) -> np.ndarray:
    """Base value of each profiled element (load kW, PV irradiance, generator kW)."""
    c = engine.circuit
    out = np.empty(len(profiles.elements))
    for j, el in enumerate(profiles.elements):
        cls, name = el.split(".", 1)
        coll, attr = _ATTR[cls]
        obj = getattr(c, coll)
        obj.Name = name
        out[j] = float(getattr(obj, attr))
    return out


def _apply(engine: OpenDSSEngine, profiles: Profiles, values: np.ndarray) -> None:
    """Set every profiled element to ``values`` (loads keep their power factor)."""
    c = engine.circuit
    engine.command("set mode=snapshot")
    for el, v in zip(profiles.elements, values, strict=True):
        cls, name = el.split(".", 1)
        coll, attr = _ATTR[cls]
        obj = getattr(c, coll)
        obj.Name = name
        if cls == "load":
            pf = obj.PF
            obj.kW = float(v)
            obj.PF = pf
        else:
            setattr(obj, attr, float(v))
