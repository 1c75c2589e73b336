"""Per-unit availability profiles of a new device for interconnection studies.

PV: the bundled measured PVDAQ system 50 series (2013, per unit of its 99.9th percentile);
EV home charging: sessions drawn with the seed (:mod:`derms.studies.growth_profiles`);
battery: None (its full size in every interval). Hour of year in local standard time, as
the bundled load shapes (UTC-8, :class:`derms.studies.qsts_study.StudyConfig`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from derms.errors import InputError
from derms.studies.growth_profiles import EVParams, ev_profiles_kw, pv_pu


def device_profile(kind: str, start: datetime, n_steps: int, step: timedelta,
                   seed: int) -> np.ndarray | None:
    """Per-unit availability: PV measured (PVDAQ system 50), EV home charging drawn with
    the seed (load), None (battery: full size always). Hour of year in local standard
    time, as the bundled load shapes."""
    if kind == "battery":
        return None
    per_day = int(round(86400 / step.total_seconds()))
    if 86400 % step.total_seconds() or 96 % per_day:
        raise InputError(f"device profile step {step}: must divide 15 min .. 1 day evenly (15min, 30min, "
                         "1h ...)")
    year = pv_pu(per_day) if kind == "pv" else ev_profiles_kw(
        np.array([1.0]), np.random.default_rng(seed), EVParams(), per_day)[0]
    local = pd.Timestamp(start) - pd.Timedelta(hours=8)  # the study's local standard time
    first = int(((local - pd.Timestamp(year=local.year, month=1, day=1, tz=local.tz))
                 .total_seconds()) // step.total_seconds())
    idx = (first + np.arange(n_steps)) % year.size
    return np.asarray(year[idx], dtype=float)
