"""Monitoring results: the latest state of a feeder (in memory) and alarms (from the store).

The state of a feeder comes from the monitoring cycle (``derms serve --monitor-period-s``)
when it has one for the feeder, else from the control loop's last estimate when the loop
runs on that feeder (``--control-feeder``; its fast cycle estimates the state every
cycle, :mod:`derms.control.loop_state`). ``source`` says which (``"monitor"`` or
``"control_loop"``). 503 only when the server runs neither for the feeder.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import func, select

from derms.api.auth import Principal, require
from derms.api.json_body import StrictJsonRoute
from derms.api.paging import Limit, Offset
from derms.api.problems import Problem
from derms.store.models import Alarm

router = APIRouter(tags=["monitoring"], route_class=StrictJsonRoute)



def _sources(request: Request, feeder_id: str) -> list[tuple[str, Any, Any]]:
    """(name, latest, last_error) of each source that covers ``feeder_id``, in order of
    preference: the monitoring cycle (alarms, every device), then the control loop."""
    out: list[tuple[str, Any, Any]] = []
    monitor = getattr(request.app.state, "monitor", None)
    if monitor is not None:
        out.append(("monitor", monitor.latest, monitor.last_error))
    loop = getattr(request.app.state, "control_loop", None)
    if loop is not None and loop.feeder_id == feeder_id:
        out.append(("control_loop", loop.latest_state, loop.latest_state_error))
    return out


@router.get("/feeders/{feeder_id}/state")
def get_feeder_state(request: Request, feeder_id: str,
                     principal: Annotated[Principal, Depends(require("read"))],
                     nodes: bool = True) -> dict[str, Any]:
    """The latest state of a feeder: node voltages (per node when ``nodes``), branch
    loading, violations, DER availability and headroom, estimation statistics; from the
    monitoring cycle, else the control loop's last estimate (``source``). ``stale`` is
    true (with ``last_error``) when the runs since this state failed."""
    sources = _sources(request, feeder_id)
    if not sources:
        raise Problem(503, "monitoring is not running on this server (derms serve "
                           "--monitor-period-s SECONDS, or --control-feeder for one feeder)")
    for name, latest, last_error in sources:
        state = latest(feeder_id)
        if state is not None:
            break
    else:
        detail = f"feeder {feeder_id!r}: no state computed yet"
        monitor = getattr(request.app.state, "monitor", None)
        if len(sources) == 1 and sources[0][0] == "monitor" and \
                feeder_id not in monitor.monitors:
            detail = f"feeder {feeder_id!r} is not monitored"
        err = next((e for e in (s[2](feeder_id) for s in sources) if e is not None), None)
        raise Problem(404, detail + (f" (last run failed: {err.error})" if err else ""))
    out = {"source": name, **state.to_dict(nodes=nodes)}
    err = last_error(feeder_id)
    # a failed run leaves the last good state in place: say so, never serve it as fresh
    out["stale"] = err is not None and err.t >= state.t
    if out["stale"]:
        out["last_error"] = {"t": err.t.isoformat(), "error": err.error}
    return out


def _alarm(a: Alarm) -> dict[str, Any]:
    return {
        "id": a.id, "kind": a.kind, "severity": str(a.severity.value), "feeder_id": a.feeder_id,
        "der_id": a.der_id, "meter_id": a.meter_id, "message": a.message,
        "t_raised": a.t_raised.isoformat(),
        "t_cleared": a.t_cleared.isoformat() if a.t_cleared else None,
        "t_acked": a.t_acked.isoformat() if a.t_acked else None, "acked_by": a.acked_by,
    }


@router.get("/alarms")
def list_alarms(request: Request, principal: Annotated[Principal, Depends(require("read"))],
                open: bool | None = None, feeder_id: str | None = None,
                limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    """Alarms, newest first; ``open=true`` only uncleared ones, ``open=false`` only cleared."""
    where = []
    if open is not None:
        where.append(Alarm.t_cleared.is_(None) if open else Alarm.t_cleared.is_not(None))
    if feeder_id is not None:
        where.append(Alarm.feeder_id == feeder_id)
    with request.app.state.sessions() as s:
        total = s.scalar(select(func.count()).select_from(Alarm).where(*where))
        rows = s.scalars(select(Alarm).where(*where).order_by(Alarm.t_raised.desc(), Alarm.id.desc())
                         .limit(limit).offset(offset)).all()
        items = [_alarm(a) for a in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}
