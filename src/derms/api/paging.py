"""Pagination query parameters shared by every list route."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

MAX_OFFSET = 2**62  # beyond SQL's int64 an offset gave a 500; past the end is just empty

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
LongLimit = Annotated[int, Query(ge=1, le=10_000)]  # IEEE 2030.5 management lists
