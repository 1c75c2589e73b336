"""Study profiles: customer load shapes from the bundled 8760-h shapes, and clear-sky PV.

Load shapes are the five 8760-hour shapes of the OpenDSS examples (BSD-3, bundled in
``derms/data/loadshapes``), each normalised to a peak of 1 so a load's base kW is its
peak. PV output is a clear-sky shape from solar geometry (no clouds), normalised to 1 at
solar noon with the sun overhead; it is an upper envelope of real PV output.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from derms.grid.bundled import data_dir

_SHAPE_FILES = ("LoadShape1.CSV", "LoadShape2.CSV", "LoadShape3.CSV", "LoadShape4.CSV",
                "LoadShape5_P.CSV")


@lru_cache(maxsize=1)
def hourly_load_shapes() -> np.ndarray:
    """(8760, 5) hourly load multipliers, each column normalised to a peak of 1."""
    folder = data_dir() / "loadshapes"
    cols = [np.loadtxt(folder / f, dtype=float)[:8760] for f in _SHAPE_FILES]
    mat = np.column_stack(cols)
    return mat / mat.max(axis=0)


def load_shapes_at(times_utc: pd.DatetimeIndex, utc_offset_h: float) -> np.ndarray:
    """Multipliers of the bundled shapes at ``times_utc`` (interval starts) -> (T, 5).

    The shapes are in local standard time; hour-of-year is taken from local time and
    interpolated linearly between hourly values (wrapping at the year's end).
    """
    shapes = hourly_load_shapes()
    local = times_utc + pd.Timedelta(hours=utc_offset_h)
    start_of_year = pd.DatetimeIndex(
        [pd.Timestamp(year=int(y), month=1, day=1, tz=local.tz) for y in local.year]
    )
    hour = ((local - start_of_year) / pd.Timedelta(hours=1)).to_numpy(dtype=float) % 8760.0
    lo = np.floor(hour).astype(int)
    frac = (hour - lo)[:, None]
    return shapes[lo] * (1 - frac) + shapes[(lo + 1) % 8760] * frac


def clear_sky_pv(times_utc: pd.DatetimeIndex, dt_h: float, latitude_deg: float,
                 longitude_deg: float) -> np.ndarray:
    """Clear-sky PV output per unit of rating, averaged over each interval -> (T,).

    Solar elevation from the NOAA low-precision formulas; output ~ sin(elevation) ** 1.15
    (a horizontal array with a mild air-mass loss). Sampled at 5-min points inside each
    interval and averaged, so hourly steps keep the right energy.
    """
    n_sub = max(1, int(round(dt_h * 12)))
    offsets = (np.arange(n_sub) + 0.5) / n_sub * dt_h
    t = times_utc.to_numpy(dtype="datetime64[s]").astype(np.int64)[:, None] + offsets * 3600
    day = (t / 86400.0) % 365.2422
    gamma = 2 * np.pi / 365.2422 * day
    decl = (0.006918 - 0.399912 * np.cos(gamma) + 0.070257 * np.sin(gamma)
            - 0.006758 * np.cos(2 * gamma) + 0.000907 * np.sin(2 * gamma))
    eqtime = 229.18 * (0.000075 + 0.001868 * np.cos(gamma) - 0.032077 * np.sin(gamma)
                       - 0.014615 * np.cos(2 * gamma) - 0.040849 * np.sin(2 * gamma))
    minutes_utc = (t % 86400) / 60.0
    true_solar_min = minutes_utc + eqtime + 4 * longitude_deg
    hour_angle = np.radians(true_solar_min / 4.0 - 180.0)
    lat = np.radians(latitude_deg)
    sin_elev = np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.cos(hour_angle)
    out = np.clip(sin_elev, 0.0, None) ** 1.15
    return out.mean(axis=1)
