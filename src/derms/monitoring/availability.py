"""DER availability from nameplates and the latest telemetry: online / stale / offline and
headroom up and down (pure, vectorised).

Sign conventions
----------------
* Telemetry ``p_kw`` of a device is measured **at its connection point, import positive**
  (DESIGN.md): a generating PV inverter reads ``p_kw < 0``, a charging battery ``p_kw > 0``.
* This module converts it once, explicitly, to the device's own output
  ``p_out_kw = -p_kw`` (generation positive, charging/consumption negative), bounded to
  ``[-p_charge_max_kw, p_gen_max_kw]``.
* Nameplates: ``p_gen_max_kw >= 0`` (most it can generate), ``p_charge_max_kw >= 0`` (most
  it can consume or charge).
* ``headroom_up_kw >= 0``: how much more it could generate (or less it could consume):
  ``p_gen_max_kw - p_out_kw``. ``headroom_down_kw >= 0``: how much less it could generate
  (or more it could consume): ``p_out_kw + p_charge_max_kw``. For PV the "up" headroom is
  bounded by the nameplate, not by the sun (available power is not telemetered here).

Classification (:class:`AvailabilityThresholds`), ``age`` = now - time of the last reading:
``offline`` when the device's status is not ``active``, when it has no reading, or when
``age > offline_after_s``; ``stale`` when ``age > stale_factor * expected_interval_s``;
otherwise ``online``. Headroom is reported for online devices only (stale and offline
devices are not dispatchable with confidence): 0 otherwise. A reading from the future
(clock skew) counts as age 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from derms.errors import InputError

ONLINE, STALE, OFFLINE = "online", "stale", "offline"

AVAILABILITY_COLUMNS = [
    "der_id", "state", "age_s", "p_kw", "p_out_kw", "p_gen_max_kw", "p_charge_max_kw",
    "headroom_up_kw", "headroom_down_kw",
]


@dataclass(frozen=True, slots=True)
class AvailabilityThresholds:
    """When telemetry counts as stale or the device as offline [s]."""

    expected_interval_s: float = 60.0
    stale_factor: float = 2.0
    offline_after_s: float = 900.0

    def __post_init__(self) -> None:
        if self.expected_interval_s <= 0 or self.stale_factor <= 0 or self.offline_after_s <= 0:
            raise InputError(f"availability thresholds must be positive, got {self}")

    @property
    def stale_after_s(self) -> float:
        return self.expected_interval_s * self.stale_factor


def classify_availability(
    der_id, *, active, p_gen_max_kw, p_charge_max_kw, age_s, p_kw,
    thresholds: AvailabilityThresholds = AvailabilityThresholds(),
) -> pd.DataFrame:
    """State and headroom of each device (all arguments 1-D, same length).

    Parameters
    ----------
    der_id : array of str
    active : array of bool
        Registry status is ``active``.
    p_gen_max_kw, p_charge_max_kw : array of float
        Nameplate generation / charging limits [kW], both >= 0.
    age_s : array of float
        Seconds since the last ``p_kw`` reading; NaN when there is none.
    p_kw : array of float
        Last reading [kW], **import positive** at the device's connection point
        (generating = negative); NaN when there is none.

    Returns
    -------
    DataFrame with :data:`AVAILABILITY_COLUMNS`; ``p_out_kw`` is the output (generation
    positive) derived as ``-p_kw``; headroom [kW] is 0 for devices not online.
    """
    ids = np.asarray(der_id, dtype=object).ravel()
    n = ids.size
    act = np.asarray(active, dtype=bool).ravel()
    gmax = np.asarray(p_gen_max_kw, dtype=float).ravel()
    cmax = np.asarray(p_charge_max_kw, dtype=float).ravel()
    age = np.asarray(age_s, dtype=float).ravel()
    p = np.asarray(p_kw, dtype=float).ravel()
    for name, arr in (("active", act), ("p_gen_max_kw", gmax), ("p_charge_max_kw", cmax),
                      ("age_s", age), ("p_kw", p)):
        if arr.size != n:
            raise InputError(f"availability: {name} has {arr.size} values for {n} devices")
    if (gmax < 0).any() or (cmax < 0).any():
        bad = ids[int(np.flatnonzero((gmax < 0) | (cmax < 0))[0])]
        raise InputError(f"device {bad}: nameplate limits must be >= 0")
    age = np.where(age < 0, 0.0, age)
    missing = np.isnan(age) | np.isnan(p)
    offline = ~act | missing | (np.nan_to_num(age, nan=np.inf) > thresholds.offline_after_s)
    stale = ~offline & (age > thresholds.stale_after_s)
    state = np.where(offline, OFFLINE, np.where(stale, STALE, ONLINE)).astype(object)
    p_out = np.clip(-p, -cmax, gmax)  # import-positive telemetry → output, generation positive
    online = state == ONLINE
    up = np.where(online, np.maximum(gmax - p_out, 0.0), 0.0)
    down = np.where(online, np.maximum(p_out + cmax, 0.0), 0.0)
    return pd.DataFrame({
        "der_id": ids, "state": state, "age_s": age, "p_kw": p, "p_out_kw": p_out,
        "p_gen_max_kw": gmax, "p_charge_max_kw": cmax,
        "headroom_up_kw": up, "headroom_down_kw": down,
    }, columns=AVAILABILITY_COLUMNS)


def summarise_availability(table: pd.DataFrame) -> dict:
    """Counts per state and the feeder's total headroom [kW] (online devices)."""
    counts = table["state"].value_counts()
    return {
        "n_online": int(counts.get(ONLINE, 0)), "n_stale": int(counts.get(STALE, 0)),
        "n_offline": int(counts.get(OFFLINE, 0)),
        "n_deenergised": int((~table["energised"]).sum()) if "energised" in table else 0,
        "headroom_up_kw": float(table["headroom_up_kw"].sum()),
        "headroom_down_kw": float(table["headroom_down_kw"].sum()),
    }


__all__ = ["AVAILABILITY_COLUMNS", "OFFLINE", "ONLINE", "STALE", "AvailabilityThresholds",
           "classify_availability", "summarise_availability"]
