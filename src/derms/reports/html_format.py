"""Small HTML formatting helpers shared by the report modules (escaping, numbers, times)."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd


def note(text: str) -> str:
    return f"<p class=\"note\">{html.escape(text)}</p>"


def is_empty(frame: pd.DataFrame) -> bool:
    return frame is None or frame.empty


def fmt_time(value) -> str:
    """UTC ISO 8601 with a trailing Z; naive input taken as UTC; missing -> ''."""
    if value is None or pd.isna(value):
        return ""
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.isoformat().replace("+00:00", "Z")


def fmt_value(value) -> str:
    """Numbers with a precision suited to their size; datetimes as UTC ISO; others as str."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return fmt_float(float(value))
    if isinstance(value, (pd.Timestamp, np.datetime64)) or hasattr(value, "tzinfo"):
        return fmt_time(value)
    return "" if value is None else str(value)


def fmt_fixed(value, decimals: int) -> str:
    """A number with fixed decimals (aligned table columns); missing or non-numeric -> str."""
    number = pd.to_numeric(value, errors="coerce")
    if pd.isna(number):
        return "" if value is None or pd.isna(value) else str(value)
    return f"{float(number):,.{decimals}f}"


def fmt_float(value: float) -> str:
    """A table cell: "" for NaN, "inf" / "-inf", integers with thousands separators,
    large or tiny magnitudes in scientific notation, else 1-4 decimals."""
    if np.isnan(value):
        return ""
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    if abs(value) >= 1e15 or (value != 0 and abs(value) < 1e-4):
        return f"{value:.4g}"
    if value == int(value):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if abs(value) >= 10:
        return f"{value:.2f}"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def write_html(path, text: str):
    """Write an HTML page at ``path`` (parents created); returns the path."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

