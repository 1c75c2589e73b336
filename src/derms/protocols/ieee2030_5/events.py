"""Event rules the server applies when it lists DERControls (IEEE 2030.5 §12.1.3).

Supersession: of two events of the same DER program that a device sees and whose intervals
overlap, the one created later (creation time, then server id) supersedes the other, which is
then listed with EventStatus 4 (Superseded) for the rest of its interval. Cancelled events
supersede nothing. An event is superseded as a whole, not only where it overlaps; publishing
a fresh set of operating envelopes for the same intervals therefore replaces the old set.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np

from derms.protocols.ieee2030_5.model import ControlRecord


def superseded_times(controls: Sequence[ControlRecord]) -> dict[int, datetime]:
    """control id → creation time of the earliest newer overlapping event, for every
    superseded control among ``controls`` (the events one device sees in one program)."""
    n = len(controls)
    if n < 2:
        return {}
    start = np.array([c.start.timestamp() for c in controls])
    end = start + np.array([c.duration_s for c in controls], dtype=float)
    created = np.array([c.creation_time.timestamp() for c in controls])
    ids = np.array([c.control_id for c in controls])
    live = np.array([c.cancelled_time is None for c in controls])
    # rank by (creation time, id): newer[i, j] — j is newer than i
    order = np.lexsort((ids, created))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    overlap = (start[:, None] < end[None, :]) & (start[None, :] < end[:, None])
    newer = rank[None, :] > rank[:, None]
    by = overlap & newer & live[None, :]
    np.fill_diagonal(by, False)
    rows = np.flatnonzero(by.any(axis=1) & live)
    out: dict[int, datetime] = {}
    for i in rows:  # the earliest superseding event's creation time
        j = np.flatnonzero(by[i])
        k = j[np.argmin(rank[j])]
        out[int(ids[i])] = controls[int(k)].creation_time
    return out
