"""Durations written as people write them ("15min", "1h", "300s"); the years a study may
start in."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from derms.errors import InputError

_STEP_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|hour)?\s*$", re.IGNORECASE)
MAX_DURATION_S = 3660 * 86400  # ten years and a bit: any longer step or bucket is a typo
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "hour": 3600}


def parse_duration(text: str, name: str = "--step") -> timedelta:
    """Parse "15min", "1h", "60s", "5m" (bare numbers are minutes); InputError otherwise."""
    m = _STEP_RE.match(text)
    if not m:
        raise InputError(f"{name} {text!r}: expected a duration like 15min, 1h or 300s")
    value, unit = float(m.group(1)), (m.group(2) or "min").lower()
    seconds = value * _SECONDS[unit]
    if not seconds <= MAX_DURATION_S:
        raise InputError(f"{name} {text!r}: longer than {MAX_DURATION_S // 86400} days")
    return timedelta(seconds=seconds)


STUDY_YEARS = (1900, 2199)  # a study's start: the profiles are read hours around it, and
# year 1 or 9999 ran off datetime's range (a traceback / a 500, an independent sweep)


def check_study_start(start: datetime, name: str = "--start") -> datetime:
    """``start`` if its year is within ``STUDY_YEARS``, else InputError naming ``name``."""
    lo, hi = STUDY_YEARS
    if not lo <= start.year <= hi:
        raise InputError(f"{name} {start.isoformat()}: expected a year from {lo} to {hi}")
    return start
