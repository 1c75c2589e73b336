"""Durations written as people write them ("15min", "1h", "300s")."""

from __future__ import annotations

import re
from datetime import timedelta

from derms.errors import InputError

_STEP_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|hour)?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "hour": 3600}


def parse_duration(text: str, name: str = "--step") -> timedelta:
    """Parse "15min", "1h", "60s", "5m" (bare numbers are minutes); InputError otherwise."""
    m = _STEP_RE.match(text)
    if not m:
        raise InputError(f"{name} {text!r}: expected a duration like 15min, 1h or 300s")
    value, unit = float(m.group(1)), (m.group(2) or "min").lower()
    return timedelta(seconds=value * _SECONDS[unit])
