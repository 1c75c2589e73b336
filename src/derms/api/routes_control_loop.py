"""The control loop's status and its tracked commands.

``GET /v1/control/loop`` (read): whether the loop runs, its feeder and period, the last
cycle's summary (status, stage timings, violations, commands issued, DERs held as stale or
escalated, delivery verdicts, notes) and the IEEE 2030.5 program it uses; 503 when
``derms serve`` runs no loop (``--control-feeder``).

``GET /v1/control/commands?der_id=&state=&feeder_id=&limit=&offset=`` (read): tracked
commands, newest first (states of :mod:`derms.store.commands`); an unknown ``der_id`` is
404, an unknown ``state`` 422. ``GET /v1/control/commands/{command_id}``: one (404 if
unknown).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from derms.api.auth import Principal, require
from derms.api.json_body import StrictJsonRoute
from derms.api.paging import Offset
from derms.api.problems import Problem
from derms.store import commands as store
from derms.store.models import DerDevice

router = APIRouter(tags=["control"], route_class=StrictJsonRoute)

State = StrEnum("State", {s: s for s in store.COMMAND_STATES})  # type: ignore[misc]


@router.get("/control/loop")
def get_loop(request: Request, principal: Annotated[Principal, Depends(require("read"))]
             ) -> dict[str, Any]:
    """Status of the control loop and its last cycle."""
    loop = getattr(request.app.state, "control_loop", None)
    if loop is None:
        raise Problem(503, "the control loop is not running on this server "
                           "(derms serve --control-feeder FEEDER_ID)")
    return loop.status()


@router.get("/control/commands")
def list_commands(request: Request, principal: Annotated[Principal, Depends(require("read"))],
                  der_id: str | None = None, state: State | None = None,
                  feeder_id: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                  offset: Offset = 0) -> dict[str, Any]:
    """Tracked commands, newest first."""
    with request.app.state.sessions() as s:
        if der_id is not None and s.get(DerDevice, der_id) is None:
            raise Problem(404, f"unknown DER device {der_id!r}")
        total, rows = store.list_commands(s, der_id=der_id,
                                          state=None if state is None else state.value,
                                          feeder_id=feeder_id, limit=limit, offset=offset)
        items = [r.to_dict() for r in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/control/commands/{command_id}")
def get_command(request: Request, command_id: str,
                principal: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    """One tracked command."""
    with request.app.state.sessions() as s:
        rec = store.get_command(s, command_id)
        if rec is None:
            raise Problem(404, f"unknown command {command_id!r}")
        return rec.to_dict()
