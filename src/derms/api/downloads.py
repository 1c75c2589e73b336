"""Tabular downloads: a result table as CSV or Parquet (the columns of docs/data-formats.md).

``?download=csv`` answers ``text/csv`` (times ISO 8601 UTC, ``…Z``), ``?download=parquet``
answers ``application/vnd.apache.parquet`` with native types; both as an attachment named
after the result.
"""

from __future__ import annotations

import io
from typing import Literal

import pandas as pd
from fastapi import Response

Download = Literal["csv", "parquet"]
MEDIA = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


def table_response(frame: pd.DataFrame, fmt: Download, name: str) -> Response:
    """``frame`` as a CSV or Parquet attachment ``name.csv`` / ``name.parquet``."""
    if fmt == "csv":
        out = frame.copy()
        for c in out.columns:
            if pd.api.types.is_datetime64_any_dtype(out[c]):
                out[c] = pd.DatetimeIndex(out[c]).tz_convert("UTC").strftime(
                    "%Y-%m-%dT%H:%M:%SZ")
        body = out.to_csv(index=False).encode()
    else:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        body = buf.getvalue()
    return Response(body, media_type=MEDIA[fmt], headers={
        "Content-Disposition": f'attachment; filename="{name}.{fmt}"'})


def columns_frame(cols: dict) -> pd.DataFrame:
    """A page of columns as returned by the JSON routes (``total``, ``offset``, ``limit``,
    ``rows`` and one list per column) back to a DataFrame (time columns parsed as UTC)."""
    data = {k: v for k, v in cols.items() if isinstance(v, list)}
    frame = pd.DataFrame(data)
    for c in ("timestamp", "start", "t"):
        if c in frame:
            frame[c] = pd.to_datetime(frame[c], utc=True)
    return frame
