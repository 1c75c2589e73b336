"""Readings: bulk ingest (JSON or CSV) and time-range queries with downsampling."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from derms.api.auth import Principal, require
from derms.api.json_body import StrictJsonRoute
from derms.api.problems import Problem
from derms.ingest.parse import parse_csv, parse_json
from derms.store.timeseries import check_quantity, read_readings
from derms.store.types import ensure_utc
from derms.timeutil import parse_duration

router = APIRouter(tags=["readings"], route_class=StrictJsonRoute)


async def _body(request: Request) -> bytes:
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/readings")
async def post_readings(request: Request,
                        principal: Annotated[Principal, Depends(require("operate"))],
                        source: str = "api") -> dict:
    """Store a batch of readings (all or nothing; see ``derms.ingest.parse``).

    ``Content-Type: application/json`` (rows or columns) or ``text/csv``. Resending a batch
    is safe: readings already stored are counted as duplicates, not stored twice.
    """
    body = await _body(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    sink = request.app.state.sink
    if ctype in ("application/json", ""):
        parse = parse_json
    elif ctype in ("text/csv", "application/csv"):
        parse = parse_csv
    else:
        raise Problem(415, f"unsupported content type {ctype!r}: use application/json or "
                           "text/csv")

    def parse_and_write():  # CPU and database work off the event loop
        batch = parse(body, source=source, known_series=sink.is_known)
        return batch, sink.write(batch)

    batch, result = await run_in_threadpool(parse_and_write)
    metrics = request.app.state.metrics
    metrics.readings.labels("rest").inc(len(batch))
    metrics.inserted.labels("rest").inc(result.inserted)
    return {"accepted": len(batch), "inserted": result.inserted,
            "duplicates": result.duplicates}


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise Problem(422, f"{name} {value.isoformat()} has no time zone")
    return ensure_utc(value, name)  # 422 when out of range in UTC (year 1 at +05:00)


@router.get("/readings")
def get_readings(request: Request, principal: Annotated[Principal, Depends(require("read"))],
                 series: str, quantity: str, start: datetime, end: datetime,
                 bucket: Annotated[str | None, Query(description="e.g. 15min, 1h")] = None,
                 source: str | None = None) -> dict:
    """Readings of one device or meter and quantity in ``[start, end)``, as columns;
    with ``bucket``, the mean per bucket (aligned to UTC) and the count."""
    start, end = _aware(start, "start"), _aware(end, "end")
    check_quantity(quantity)  # an ingest alias ("p") or a typo is no empty answer
    if end <= start:
        raise Problem(422, "end must be after start")
    owner = request.app.state.sink.owner(series)
    if owner is None:
        raise Problem(404, f"unknown series {series!r}")
    step = parse_duration(bucket, "bucket") if bucket else None
    frame = read_readings(request.app.state.engine, quantity=quantity, start=start, end=end,
                          source=source, bucket=step, **owner)
    out = {c: frame[c].tolist() for c in frame.columns if c != "t"}
    out["t"] = [t.isoformat() for t in frame["t"]]
    return {"series": series, "quantity": quantity, "rows": len(frame), **out}
