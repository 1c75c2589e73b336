"""Per-element time profiles (multipliers of each element's base value) for QSTS.

A profile multiplies an element's base: a load's kW and kvar, a PV system's irradiance,
a generator's kW. Row ``k`` applies to the interval ``[t0 + k*step, t0 + (k+1)*step)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from derms.errors import InputError

SUPPORTED_CLASSES = ("load", "pvsystem", "generator")
MIN_STEP = timedelta(seconds=1)
MAX_STEP = timedelta(hours=24)


@dataclass(frozen=True)
class Profiles:
    """Multipliers per element and time step.

    ``p_mult`` has shape (n_steps, n_elements); ``q_mult`` (same shape) multiplies loads'
    kvar and defaults to ``p_mult``. Element names are "class.name", lower case.
    """

    start: datetime
    step: timedelta
    elements: tuple[str, ...]
    p_mult: np.ndarray
    q_mult: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise InputError("profile start time must be timezone-aware (UTC)")
        if not MIN_STEP <= self.step <= MAX_STEP:
            raise InputError(f"profile step {self.step} outside [{MIN_STEP}, {MAX_STEP}]")
        p = np.asarray(self.p_mult, dtype=float)
        if p.ndim != 2 or p.shape[1] != len(self.elements):
            raise InputError(
                f"profile array has shape {p.shape}; expected (n_steps, {len(self.elements)})"
            )
        if p.shape[0] == 0:
            raise InputError("profiles have no time steps")
        for name, arr in (("p_mult", p), ("q_mult", self.q_mult)):
            if arr is None:
                continue
            arr = np.asarray(arr, dtype=float)
            if arr.shape != p.shape:
                raise InputError(f"{name} has shape {arr.shape}; expected {p.shape}")
            bad = ~np.isfinite(arr)
            if bad.any():
                step, col = np.argwhere(bad)[0]
                raise InputError(
                    f"profile for {self.elements[col]} has a non-finite value at step {step}"
                )
        for el in self.elements:
            cls = el.split(".", 1)[0]
            if "." not in el or cls not in SUPPORTED_CLASSES:
                raise InputError(
                    f"profile element {el!r}: expected 'class.name' with class in "
                    f"{', '.join(SUPPORTED_CLASSES)}"
                )
        if len(set(self.elements)) != len(self.elements):
            raise InputError("profile elements are not unique")

    @property
    def n_steps(self) -> int:
        return int(self.p_mult.shape[0])

    @property
    def times(self) -> pd.DatetimeIndex:
        """Start of each interval (UTC)."""
        return pd.date_range(self.start, periods=self.n_steps, freq=self.step, tz=UTC)

    @property
    def dt_h(self) -> float:
        return self.step.total_seconds() / 3600.0

    @classmethod
    def from_frame(cls, df: pd.DataFrame, q_df: pd.DataFrame | None = None) -> Profiles:
        """Build from a DataFrame: a regular tz-aware DatetimeIndex, one column per element."""
        if not isinstance(df.index, pd.DatetimeIndex) or df.index.tz is None:
            raise InputError("profile frame needs a timezone-aware DatetimeIndex")
        if len(df.index) < 1:
            raise InputError("profile frame has no rows")
        step = _regular_step(df.index)
        q = None
        if q_df is not None:
            q = q_df.reindex(index=df.index, columns=df.columns).to_numpy(dtype=float)
        return cls(
            start=df.index[0].to_pydatetime().astimezone(UTC),
            step=step,
            elements=tuple(str(c).lower() for c in df.columns),
            p_mult=df.to_numpy(dtype=float),
            q_mult=q,
        )

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], *, start: datetime, step: timedelta,
        n_steps: int | None = None,
    ) -> Profiles:
        """Build from ``{element: 1-D array}``; every array must have the same length."""
        if not arrays:
            raise InputError("no profiles given")
        lengths = {k: len(np.atleast_1d(v)) for k, v in arrays.items()}
        expected = n_steps if n_steps is not None else next(iter(lengths.values()))
        for k, n in lengths.items():
            if n != expected:
                raise InputError(f"profile for {k} has {n} values, expected {expected}")
        mat = np.column_stack([np.asarray(v, dtype=float) for v in arrays.values()])
        return cls(start=start, step=step, elements=tuple(k.lower() for k in arrays), p_mult=mat)


def _regular_step(index: pd.DatetimeIndex) -> timedelta:
    if len(index) == 1:
        return timedelta(hours=1)
    diffs = np.diff(index.tz_convert(None).to_numpy()).astype("timedelta64[us]").astype(np.int64)
    if not (diffs == diffs[0]).all() or diffs[0] <= 0:
        raise InputError("profile index is not regular and increasing")
    return timedelta(microseconds=int(diffs[0]))


def shared_shapes(profiles: Profiles) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Distinct (p, q) multiplier columns of ``profiles`` and, per element, the index of its
    column: elements with identical profiles share one OpenDSS load shape."""
    q_all = profiles.q_mult if profiles.q_mult is not None else profiles.p_mult
    index: dict[bytes, int] = {}
    shapes: list[tuple[np.ndarray, np.ndarray]] = []
    of_element: list[int] = []
    for j in range(len(profiles.elements)):
        p = np.ascontiguousarray(profiles.p_mult[:, j], dtype=float)
        q = np.ascontiguousarray(q_all[:, j], dtype=float)
        key = p.tobytes() + q.tobytes()
        if key not in index:
            index[key] = len(shapes)
            shapes.append((p, q))
        of_element.append(index[key])
    return shapes, of_element

