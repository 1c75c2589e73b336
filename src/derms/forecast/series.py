"""Input series made safe to forecast: UTC index on a regular grid, with plain warnings.

Every problem a real meter or SCADA series has is handled here, once, before any model
sees it: timestamps without a zone (error), duplicate timestamps (averaged, warned),
clock jitter (timestamps within a tenth of a step of the grid, as AMI/SCADA exports stamp
00:15:02, 00:29:58: moved onto the grid, warned once; readings farther off averaged into
the interval that contains them, warned, naming the first; timestamps on no grid at all:
error), gaps (kept as NaN on the regular grid, warned), NaN or infinite values (treated as gaps,
warned), a constant series (warned: only the baselines are meaningful), a history too
short for the forecast asked (error naming what is missing). Weather inputs get the same
clock-jitter rule on their own grid (:func:`clean_weather`, through :func:`snap_to_grid`,
which :func:`clean_series` uses too). DST needs no special case:
timestamps are converted to UTC and calendar features are taken in the series' own
time zone, so a 23- or 25-hour local day is just a day with fewer or more intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from derms.errors import InputError

#: A timestamp within this share of a step of a grid point is that point's reading, moved
#: onto it (clock jitter: ±90 s at 15 min, ±6 min at 1 h). Anything farther is a reading
#: of its own, averaged into the interval that contains it. A tenth keeps a snapped
#: reading nine tenths of a step closer to its own point than to its neighbour.
SNAP_TOLERANCE = 0.1
_DAY_DIVISORS_S = np.arange(1, 86401, dtype=np.int64)[86400 % np.arange(1, 86401) == 0]


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

    The step is the most common spacing of the timestamps unless given; for timestamps
    with clock jitter, the median spacing (see :func:`_grid`). Readings that end on one
    grid point (duplicates, or snapped onto one) are averaged. Raises
    :class:`InputError` for a naive index, an empty or all-missing series, or
    timestamps on no regular grid (a step that does not divide a day, or more than half
    of them beyond the jitter tolerance of the typical spacing's grid).
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
    if step is None and len(values) < 3:
        raise InputError(f"{name}: {len(values)} timestamps are too few to tell the step")
    values, step = snap_to_grid(values, name, series.index.tz, warnings,
                                None if step is None else pd.Timedelta(step))
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


def clean_weather(weather: pd.DataFrame, name: str = "weather"
                  ) -> tuple[pd.DataFrame, list[str]]:
    """``weather`` (one column per variable, tz-aware timestamps) with its clock jitter
    repaired by the rule of :func:`clean_series` (:func:`snap_to_grid`, on the weather's
    own grid, whose step need not be the series'), and the warnings saying what was done.

    Returns ``(frame, warnings)``. A frame whose timestamps are all on their grid is
    returned as given (the same object: regular weather is used bit for bit as before);
    otherwise the frame is numeric, UTC, one row per timestamp (repeated timestamps and
    readings moved onto one grid point averaged, column by column). Rows without any
    value do not count towards the grid. Fewer than three timestamps, or timestamps all
    on the grid of their most common spacing, are returned as given. Raises
    :class:`InputError` when the timestamps are on no regular grid.
    """
    if not isinstance(weather.index, pd.DatetimeIndex) or weather.index.tz is None:
        raise InputError(f"{name}: the index must be tz-aware timestamps")
    frame = weather.apply(pd.to_numeric, errors="coerce").astype(float)
    frame.index = weather.index.tz_convert("UTC")
    frame = frame[np.isfinite(frame.to_numpy()).any(axis=1)]
    if frame.index.has_duplicates:
        frame = frame.groupby(level=0).mean()
    frame = frame.sort_index()
    if len(frame) < 3:
        return weather, []
    ns = frame.index.as_unit("ns").asi8
    mode = int(pd.Series(np.diff(ns)).value_counts().index[0])
    if not ((ns - ns[0]) % mode).any():
        return weather, []   # regular (the weather's step need not divide a day)
    warnings: list[str] = []
    snapped, _ = snap_to_grid(frame, name, weather.index.tz, warnings)
    if snapped is frame:   # every timestamp on the grid: nothing to repair
        return weather, warnings
    return snapped, warnings


def snap_to_grid(values: pd.Series | pd.DataFrame, name: str, tz, warnings: list[str],
                 step: pd.Timedelta | None = None
                 ) -> tuple[pd.Series | pd.DataFrame, pd.Timedelta]:
    """``values`` (UTC, sorted, unique timestamps; a series or a frame of columns sharing
    them) on their regular grid, and its step: the grid inference of :func:`_grid` and the
    jitter rule of :func:`_onto_grid`, shared by :func:`clean_series` and
    :func:`clean_weather`. Warnings are appended to ``warnings`` (``tz``: the zone the
    input wrote its timestamps in, for the messages). Values already on the grid are
    returned as given (the same object)."""
    step, anchor = _grid(values, name, step, tz)
    return _onto_grid(values, step, anchor, name, tz, warnings), step


def _grid(values: pd.Series | pd.DataFrame, name: str, step: pd.Timedelta | None, tz
          ) -> tuple[pd.Timedelta, pd.Timestamp]:
    """The series' grid: its step and one grid point (``anchor``).

    First the most common spacing (or the step given) from the first timestamp, when more
    than half of the timestamps sit exactly on it: a regular series (any others are
    repaired by :func:`_onto_grid`). Otherwise clock jitter: the step is the median
    spacing rounded to a whole number of seconds dividing a day, the grid points on whole
    minutes (whole seconds below a one-minute step) nearest the timestamps' median phase,
    kept when more than half of the timestamps lie within :data:`SNAP_TOLERANCE` of it.
    No grid either way is an :class:`InputError`.
    """
    index = values.index
    ns = index.as_unit("ns").asi8
    diffs = np.diff(ns)
    mode = step
    if mode is None:
        counts = pd.Series(diffs).value_counts()
        mode = pd.Timedelta(int(counts.index[0]), unit="ns")
        if mode <= pd.Timedelta(0):
            raise InputError(f"{name}: cannot tell the step from the timestamps")
    divides = step is not None or pd.Timedelta(hours=24) % mode == pd.Timedelta(0)
    if divides and np.mean((ns - ns[0]) % mode.value == 0) > 0.5:
        return mode, index[0]
    jitter_step = step if step is not None else _day_divisor(float(np.median(diffs)))
    typical, anchor_ns = mode, int(ns[0])
    if jitter_step is not None:
        s = jitter_step.value
        ref = int(ns[0])
        for _ in range(2):   # twice: a first timestamp far off the grid cannot skew it
            ref += int(np.median(_centred(ns - ref, s)))
        unit = (pd.Timedelta(minutes=1) if jitter_step >= pd.Timedelta(minutes=1)
                else pd.Timedelta(seconds=1)).value
        typical, anchor_ns = jitter_step, (ref + unit // 2) // unit * unit
        if np.mean(np.abs(_centred(ns - anchor_ns, s)) <= _tolerance(typical).value) > 0.5:
            return jitter_step, pd.Timestamp(anchor_ns, unit="ns", tz="UTC")
    if not divides and step is None and np.all(diffs % mode.value == 0):
        raise InputError(f"{name}: step {mode} does not divide a day; resample to 1–60 min")
    tol = _tolerance(typical)
    far = np.flatnonzero(np.abs(_centred(ns - anchor_ns, typical.value)) > tol.value)
    first = (f" (first {_stamp(index[far[0]], tz)}, {_reading(values, int(far[0]))})"
             if far.size else "")
    raise InputError(f"{name}: the timestamps are on no regular grid: the typical spacing is "
                     f"{typical}, but {far.size} of {len(index)} timestamps lie more than "
                     f"{_seconds(tol)} from its grid{first}; resample the series to a "
                     "regular step of 1–60 min")


def _onto_grid(values: pd.Series | pd.DataFrame, step: pd.Timedelta, anchor: pd.Timestamp,
               name: str, tz, warnings: list[str]) -> pd.Series | pd.DataFrame:
    """``values`` moved onto the grid ``anchor + k * step``: a timestamp within the
    tolerance of a grid point is that point's reading (snapped, warned once with the
    count and the largest offset); one farther off is averaged into the interval that
    contains it. Readings that end on one grid point are averaged, like duplicates."""
    ns = values.index.as_unit("ns").asi8
    s, a = step.value, anchor.as_unit("ns").value
    off = _centred(ns - a, s)
    if not off.any():
        return values
    tol = _tolerance(step)
    far = np.abs(off) > tol.value
    moved = (off != 0) & ~far
    k = np.where(far, (ns - a) // s, (ns - off - a) // s)
    target = pd.DatetimeIndex(a + k * s, tz="UTC").as_unit("ns")
    if moved.any():
        largest = pd.Timedelta(int(np.abs(off[moved]).max()), unit="ns")
        warnings.append(f"{name}: {int(moved.sum())} timestamps up to {_seconds(largest)} off "
                        f"the {step} grid (clock jitter, tolerance ±{_seconds(tol)}) were "
                        "moved to the nearest grid point")
        landed = target[~far]
        n_hit = int(landed.duplicated().sum())
        if n_hit:
            warnings.append(f"{name}: {n_hit} readings landed on a grid point that already had "
                            "one; their values were averaged")
    if far.any():
        i = int(np.flatnonzero(far)[0])
        warnings.append(f"{name}: {int(far.sum())} timestamps more than {_seconds(tol)} off "
                        f"the {step} grid (first {_stamp(values.index[i], tz)}, "
                        f"{_reading(values, i)}) were averaged into the interval that "
                        "contains them")
    return values.set_axis(target.as_unit(values.index.unit)).groupby(level=0).mean()


def _centred(rel: np.ndarray, s: int) -> np.ndarray:
    """Offsets (ns) of ``rel`` from the nearest multiple of ``s``, in [-s/2, s/2)."""
    return (rel + s // 2) % s - s // 2


def _tolerance(step: pd.Timedelta) -> pd.Timedelta:
    return pd.Timedelta(int(step.value * SNAP_TOLERANCE), unit="ns")


def _day_divisor(spacing_ns: float) -> pd.Timedelta | None:
    """The whole number of seconds dividing a day nearest ``spacing_ns``, or None when the
    spacing is under a second or over a day."""
    if not 1e9 <= spacing_ns <= 86400e9:
        return None
    best = _DAY_DIVISORS_S[int(np.argmin(np.abs(_DAY_DIVISORS_S * 1e9 - spacing_ns)))]
    return pd.Timedelta(seconds=int(best))


def _reading(values: pd.Series | pd.DataFrame, i: int) -> str:
    """The ``i``-th reading for a message: ``value 77`` (a series) or ``values temp=3.5,
    ghi=120`` (the columns of a frame)."""
    if isinstance(values, pd.Series):
        return f"value {values.iloc[i]:g}"
    row = values.iloc[i]
    return (f"value{'s' if len(row) > 1 else ''} "
            + ", ".join(f"{c}={v:g}" for c, v in row.items()))


def _seconds(td: pd.Timedelta) -> str:
    return f"{td.total_seconds():g} s"


def _stamp(t: pd.Timestamp, tz) -> str:
    """``t`` as the input wrote it (its own zone), ISO 8601."""
    return (t.tz_convert(tz) if tz is not None else t).isoformat()


def _longest_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[0::2]).max())
