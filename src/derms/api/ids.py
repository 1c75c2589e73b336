"""Integer ids at the API boundary: ``DbId`` is an ``int`` within the database's 64-bit
integer range, so an id past it is a 422 (problem+json) at validation, never an
``OverflowError`` from the database driver (a 500, seen on SQLite with
``/v1/envelopes/sets/99999999999999999999999``)."""

from __future__ import annotations

from typing import Annotated

import annotated_types as at

DbId = Annotated[int, at.Interval(ge=-(2**63), le=2**63 - 1)]

__all__ = ["DbId"]
