"""ADMS interface and operator overrides (REST); the arbiter's requests and decisions.

* ``POST /v1/adms/messages`` — one ADMS message (the same JSON as the bus topic
  ``<root>/adms/<sender>/requests``, see :mod:`derms.control.adms`): block DER dispatch,
  export/import limits, abnormal configuration, switching (switch states → topology
  events, the monitor re-estimates), withdrawal. 201 when something new was stored, 200
  for an idempotent resend (same ``message_id``, same content; or switching whose switch
  states are all stored, also when two arrive at once), 409 for a reused id with other
  content.
* ``POST /v1/operator/overrides`` — an operator override (device setpoint in kW,
  import-positive; block; limit) with an expiry; ``POST /v1/operator/overrides/{id}/withdraw``.
* ``GET /v1/control/requests``, ``GET /v1/control/requests/{id}`` — stored requests.
* ``GET /v1/control/decisions/{der_id}?t=`` — what governs a device at ``t`` (default now)
  and why (read only; the control loop audits its decisions).

Scopes: ADMS messages and operator overrides need ``operate`` (an ADMS integration gets
its own ``operate`` token; the audit log names the token); reads need ``read``.
Every write is audited with its reason. Errors are problem+json: validation 422, an
unknown feeder/device/connection point 422, an unknown request 404, a conflict 409.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request, Response
from pydantic import AwareDatetime, ConfigDict, Field

from derms.api.auth import Principal, require
from derms.api.conflicts import unique_transaction
from derms.api.json_body import StrictJsonRoute
from derms.api.paging import Limit, Offset
from derms.api.problems import Problem
from derms.control import persistence
from derms.control.adms import AdmsMessage, Applied, OperatorOverrideIn, apply_adms, apply_override
from derms.control.arbiter import Arbiter, RequestConflict
from derms.control.requests import Source
from derms.store.types import ensure_utc
from derms.strict import StrictScalars

router = APIRouter(tags=["control"], route_class=StrictJsonRoute)


class WithdrawIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=500)


def _write(request: Request, response: Response, fn) -> dict[str, Any]:
    """Run ``fn(session)`` in one transaction; map conflicts and unknown ids; 200 on resend.
    Two requests storing the same new request id at once: the second runs again and
    answers as a resend (200) or a conflict (409), never the database's error (500)."""
    try:
        applied: Applied = unique_transaction(request.app.state.sessions, fn,
                                              "control request")
    except RequestConflict as exc:
        raise Problem(409, str(exc)) from None
    except persistence.UnknownRequest as exc:
        raise Problem(404, str(exc)) from None
    for name in ("monitor", "control_loop"):  # both re-read the topology at once
        listener = getattr(request.app.state, name, None)
        if listener is not None:
            for fid in applied.feeders_switched:
                listener.notify_topology_change(fid)
    if not (applied.created or applied.withdrawn):
        response.status_code = 200
    return applied.to_dict()


@router.post("/adms/messages", status_code=201)
def post_adms_message(request: Request, response: Response,
                      body: Annotated[AdmsMessage, Body()],
                      principal: Annotated[Principal, Depends(require("operate"))]
                      ) -> dict[str, Any]:
    """Apply one ADMS message (module docstring); the answer lists what was stored."""
    now = datetime.now(UTC)
    return _write(request, response, lambda s: apply_adms(
        s, body, actor=f"api:{principal.token_id}", now=now))


@router.post("/operator/overrides", status_code=201)
def post_operator_override(request: Request, response: Response, body: OperatorOverrideIn,
                           principal: Annotated[Principal, Depends(require("operate"))]
                           ) -> dict[str, Any]:
    """Store an operator override (it outranks optimisation, yields to safety and ADMS)."""
    now = datetime.now(UTC)
    return _write(request, response, lambda s: apply_override(
        s, body, actor=f"api:{principal.token_id}", now=now))


@router.post("/operator/overrides/{request_id}/withdraw")
def withdraw_operator_override(request: Request, response: Response, request_id: str,
                               principal: Annotated[Principal, Depends(require("operate"))],
                               body: WithdrawIn | None = None) -> dict[str, Any]:
    """End an operator override now (200 also when it had already ended)."""
    now = datetime.now(UTC)

    def fn(s):
        req, changed = persistence.withdraw(s, request_id, now, actor=f"api:{principal.token_id}",
                                            reason=body.reason if body else "",
                                            sources=[Source.OPERATOR])
        return Applied(requests=[req], withdrawn=[req.request_id] if changed else [])

    return _write(request, response, fn)


@router.get("/control/requests")
def list_control_requests(request: Request,
                          _p: Annotated[Principal, Depends(require("read"))],
                          open: bool = False,
                          source: Literal["safety", "adms", "operator", "optimisation"] | None = None,
                          limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    """Stored requests, newest start first; ``open=true``: only those not yet ended."""
    with request.app.state.sessions() as s:
        reqs = persistence.list_requests(
            s, open_at=datetime.now(UTC) if open else None,
            source=Source(source) if source else None, limit=limit, offset=offset)
    return {"limit": limit, "offset": offset, "items": [r.to_dict() for r in reqs]}


@router.get("/control/requests/{request_id}")
def get_control_request(request: Request, request_id: str,
                        _p: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    with request.app.state.sessions() as s:
        try:
            return persistence.get(s, request_id).to_dict()
        except persistence.UnknownRequest as exc:
            raise Problem(404, str(exc)) from None


@router.get("/control/decisions/{der_id}")
def get_decision(request: Request, der_id: str,
                 _p: Annotated[Principal, Depends(require("read"))],
                 t: AwareDatetime | None = None) -> dict[str, Any]:
    """The device's effective command at ``t`` (aware; default now): block, setpoint
    (import-positive kW), limits, and a ruling with the reason for every request. Built
    from the requests not ended now-or-at-``t``: for a past ``t`` requests withdrawn or
    expired since are left out (the audit log has what was decided then)."""
    at = ensure_utc(t, "t") if t is not None else datetime.now(UTC)
    with request.app.state.sessions() as s:
        locs = persistence.device_locations(s, [der_id])
        if not locs:
            raise Problem(404, f"unknown device {der_id!r}")
        arbiter = Arbiter(persistence.load_open(s, at))
    return arbiter.resolve(locs[0], at).to_dict()
