"""Input series made safe to forecast: UTC index on a regular grid, with plain warnings.

Every problem a real meter or SCADA series has is handled here, once, before any model
sees it: timestamps without a zone (error), duplicate timestamps (averaged, warned), gaps
(kept as NaN on the regular grid, warned), NaN or infinite values (treated as gaps,
warned), a constant series (warned: only the baselines are meaningful), a history too
short for the forecast asked (error naming what is missing). DST needs no special case:
timestamps are converted to UTC and calendar features are taken in the series' own
time zone, so a 23- or 25-hour local day is just a day with fewer or more intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from derms.errors import InputError


@dataclass(frozen=True)
class CleanSeries:
    """A series on a regular UTC grid.

    ``values`` is indexed by interval start (UTC), one row per ``step``; missing
    intervals are NaN. ``warnings`` lists what was repaired, in words a user can act on.
    """

    values: pd.Series
    step: pd.Timedelta
    warnings: list[str] = field(default_factory=list)

    @property
    def is_constant(self) -> bool:
        v = self.values.dropna().to_numpy()
        return v.size > 0 and float(np.ptp(v)) == 0.0


def clean_series(series: pd.Series, name: str = "series", step: pd.Timedelta | None = None
                 ) -> CleanSeries:
    """Validate and regularise ``series`` (values indexed by tz-aware timestamps).

    The step is the most common spacing of the timestamps unless given. Raises
    :class:`InputError` for a naive index, an empty or all-missing series, or an
    irregular spacing that matches no step.
    """
    warnings: list[str] = []
    if not isinstance(series.index, pd.DatetimeIndex):
        raise InputError(f"{name}: the index must be timestamps, got {type(series.index).__name__}")
    if series.index.tz is None:
        raise InputError(f"{name}: timestamps have no time zone; write them in ISO 8601 with "
                         "an offset (e.g. 2024-03-31T02:00:00+02:00) or Z")
    values = pd.to_numeric(series, errors="coerce").astype(float)
    values.index = series.index.tz_convert("UTC")
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        warnings.append(f"{name}: {int(bad.sum())} missing, NaN or infinite values treated as gaps")
        values = values[~bad]
    if values.empty:
        raise InputError(f"{name}: no finite values")
    if values.index.has_duplicates:
        n_dup = int(values.index.duplicated().sum())
        warnings.append(f"{name}: {n_dup} duplicate timestamps; their values were averaged")
        values = values.groupby(level=0).mean()
    values = values.sort_index()
    if step is None:
        step = _infer_step(values.index, name)
    off_grid = (values.index - values.index[0]) % step != pd.Timedelta(0)
    if off_grid.any():
        warnings.append(f"{name}: {int(off_grid.sum())} timestamps off the {step} grid were "
                        "averaged into the interval that contains them")
        values = values.groupby(values.index.floor(step)).mean()
    grid = pd.date_range(values.index[0], values.index[-1], freq=step)
    regular = values.reindex(grid)
    n_gap = int(regular.isna().sum())
    if n_gap:
        longest = _longest_run(regular.isna().to_numpy())
        warnings.append(f"{name}: {n_gap} missing intervals of {step} (longest gap "
                        f"{longest * step}); forecasts skip targets without an actual and "
                        "features that fall in a gap are left missing")
    out = CleanSeries(values=regular, step=pd.Timedelta(step), warnings=warnings)
    if out.is_constant:
        warnings.append(f"{name}: every value is {float(regular.dropna().iloc[0])!r}; the "
                        "series carries no pattern to learn (forecasts equal that value)")
    return out


def require_history(clean: CleanSeries, needed: pd.Timedelta, name: str, purpose: str) -> None:
    """Raise :class:`InputError` when ``clean`` spans less than ``needed``."""
    span = clean.values.index[-1] - clean.values.index[0] + clean.step
    if span < needed:
        raise InputError(f"{name}: {purpose} needs at least {needed} of history, the series "
                         f"spans {span}")


def _infer_step(index: pd.DatetimeIndex, name: str) -> pd.Timedelta:
    if len(index) < 3:
        raise InputError(f"{name}: {len(index)} timestamps are too few to tell the step")
    diffs = pd.Series(np.diff(index.as_unit("ns").asi8)).value_counts()
    step = pd.Timedelta(int(diffs.index[0]), unit="ns")
    if step <= pd.Timedelta(0):
        raise InputError(f"{name}: cannot tell the step from the timestamps")
    if pd.Timedelta(hours=24) % step != pd.Timedelta(0):
        raise InputError(f"{name}: step {step} does not divide a day; resample to 1–60 min")
    return step


def _longest_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[0::2]).max())
