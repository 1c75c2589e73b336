"""The IEEE 2030.5 resources: routing, access rules and list paging over a repository.

Who may see what (IEEE 2030.5 §6.11.7, CSIP): the client is the LFDI of its TLS certificate.
It sees the EndDevice with its own LFDI and, when it is an aggregator, the EndDevices it
registered; any other EndDevice — and everything below it — answers 404, so existence is not
revealed. DERPrograms are reached through the device's FunctionSetAssignments; a DERControl
with an ``edev_id`` (a site's operating envelope) is seen by that device only.

Status codes: 400 for malformed or schema-invalid documents (with an ``Error`` body), 403 for
a registration the client may not make, 404 for unknown or hidden resources, 405 with
``Allow`` for a method a resource does not take, 413 for oversized bodies (transport),
415 for a body that is not ``application/sep+xml``.

Paging (§4.4): ``s`` start index (default 0), ``l`` limit (default 1, at most
``MAX_PAGE``), ``a`` after: only items changed (EndDevice) or created (DERControl) at or after
that epoch second; ``all`` counts the items after the ``a`` filter.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from derms.protocols.ieee2030_5 import mappers as m
from derms.protocols.ieee2030_5.http11 import Request, Response
from derms.protocols.ieee2030_5.identity import sfdi_from_lfdi
from derms.protocols.ieee2030_5.model import ControlRecord, EndDeviceRecord
from derms.protocols.ieee2030_5.repository import SepRepository
from derms.protocols.ieee2030_5.sep_xml import (
    MEDIA_TYPE,
    SepDocumentError,
    E,
    child_text,
    parse,
    to_bytes,
)

log = logging.getLogger(__name__)
MAX_PAGE = 100


@dataclass(frozen=True)
class SepSettings:
    dcap_path: str = "/dcap"
    dcap_poll_rate_s: int = 900
    list_poll_rate_s: int = 300
    allow_self_registration: bool = False  # devices not pre-registered may POST their EndDevice

    @property
    def prefix(self) -> str:
        if not self.dcap_path.startswith("/") or not self.dcap_path.endswith("/dcap"):
            raise ValueError(f"dcap path {self.dcap_path!r}: expected /…/dcap")
        return self.dcap_path.removesuffix("/dcap")


class _HttpError(Exception):
    def __init__(self, status: int, reason_code: int | None = None, detail: str = "",
                 allow: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason_code, self.allow = status, reason_code, allow


def _xml(el: etree._Element, status: int = 200) -> Response:
    return Response(status, to_bytes(el), MEDIA_TYPE)


def _error(exc: _HttpError) -> Response:
    headers = (("allow", exc.allow),) if exc.allow else ()
    if exc.reason_code is None:
        return Response(exc.status, headers=headers)
    return Response(exc.status, to_bytes(E("Error", E("reasonCode", exc.reason_code))),
                    MEDIA_TYPE, headers)


@dataclass(frozen=True)
class _Page:
    start: int
    limit: int
    after: int | None


def _page(query: dict[str, str]) -> _Page:
    def num(name: str, default: int | None) -> int | None:
        text = query.get(name)
        if text is None:
            return default
        if not text.isdigit():
            raise _HttpError(400, 0, f"query {name}={text!r}: expected a non-negative integer")
        return int(text)

    return _Page(num("s", 0), min(num("l", 1), MAX_PAGE), num("a", None))


_ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), name) for p, name in [
        (r"/dcap", "dcap"), (r"/tm", "tm"), (r"/edev", "edev_list"),
        (r"/edev/(\d+)", "edev"), (r"/edev/(\d+)/rg", "reg"), (r"/edev/(\d+)/cp", "cp"),
        (r"/edev/(\d+)/fsa", "fsa_list"), (r"/edev/(\d+)/fsa/(\d+)", "fsa"),
        (r"/edev/(\d+)/fsa/(\d+)/derp", "fsa_programs"), (r"/edev/(\d+)/derp/(\d+)", "program"),
        (r"/edev/(\d+)/derp/(\d+)/derc", "controls"),
        (r"/edev/(\d+)/derp/(\d+)/actderc", "active_controls"),
        (r"/edev/(\d+)/derp/(\d+)/derc/(\d+)", "control"),
        (r"/edev/(\d+)/derp/(\d+)/dderc", "default_control"),
    ]
]
_POSTABLE = {"edev_list"}


class SepApp:
    """Handles one request: ``SepApp(repo, settings)(request) -> Response``."""

    def __init__(self, repo: SepRepository, settings: SepSettings | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.repo = repo
        self.settings = settings or SepSettings()
        self.paths = m.Paths(self.settings.prefix)
        self._clock = clock

    def __call__(self, request: Request) -> Response:
        try:
            response = self._dispatch(request)
        except _HttpError as exc:
            response = _error(exc)
            if exc.status >= 400:
                log.info("event=ieee2030_5_rejected method=%s path=%s status=%d lfdi=%s "
                         "detail=%r", request.method, request.path, exc.status,
                         request.client.lfdi, str(exc))
        return response

    def _dispatch(self, request: Request) -> Response:
        prefix = self.paths.prefix
        if not request.path.startswith(prefix + "/"):
            raise _HttpError(404)
        local = request.path[len(prefix):].rstrip("/") or "/"
        for pattern, name in _ROUTES:
            match = pattern.fullmatch(local)
            if match:
                break
        else:
            raise _HttpError(404)
        ids = [int(g) for g in match.groups()]
        allow = "GET, POST" if name in _POSTABLE else "GET"
        if request.method == "POST" and name in _POSTABLE:
            return self._post_edev(request)
        if request.method != "GET":
            raise _HttpError(405, allow=allow)
        return getattr(self, f"_get_{name}")(request, *ids)

    # --- helpers ---------------------------------------------------------------------------------
    def _visible(self, request: Request, edev_id: int) -> EndDeviceRecord:
        rec = self.repo.end_device(edev_id)
        lfdi = request.client.lfdi
        if rec is None or (rec.lfdi != lfdi and rec.owner_lfdi != lfdi):
            raise _HttpError(404)
        return rec

    def _program_ids(self, rec: EndDeviceRecord) -> list[int]:
        ids: list[int] = []
        for fsa_id in rec.fsa_ids:
            fsa = self.repo.fsa(fsa_id)
            ids += [p for p in (fsa.program_ids if fsa else ()) if p not in ids]
        return ids

    def _program(self, request: Request, edev_id: int, program_id: int):
        rec = self._visible(request, edev_id)
        program = self.repo.program(program_id)
        if program is None or program_id not in self._program_ids(rec):
            raise _HttpError(404)
        return rec, program

    def _device_controls(self, program_id: int, edev_id: int) -> list[ControlRecord]:
        """Controls of a program that this device sees, in IEEE 2030.5 event order: start
        ascending, then creation time descending, then mRID descending."""
        controls = [c for c in self.repo.controls(program_id)
                    if c.edev_id is None or c.edev_id == edev_id]
        controls.sort(key=lambda c: c.mrid, reverse=True)
        controls.sort(key=lambda c: c.creation_time, reverse=True)
        controls.sort(key=lambda c: c.start)
        return controls

    def _program_el(self, edev_id: int, program) -> etree._Element:
        return m.program(self.paths, edev_id, program,
                         n_controls=len(self._current(self._device_controls(
                             program.program_id, edev_id))),
                         has_default=self.repo.default_control(program.program_id) is not None)

    def _current(self, controls: list[ControlRecord]) -> list[ControlRecord]:
        """Controls not yet over (completed events leave the list)."""
        now = m.epoch(self._clock())
        return [c for c in controls if m.epoch(c.start) + c.duration_s > now]

    # --- resources -------------------------------------------------------------------------------
    def _get_dcap(self, request: Request) -> Response:
        count = len(self.repo.end_devices_visible_to(request.client.lfdi))
        return _xml(m.device_capability(self.paths, count, self.settings.dcap_poll_rate_s))

    def _get_tm(self, request: Request) -> Response:
        return _xml(m.time_resource(self.paths, self._clock(), self.settings.dcap_poll_rate_s))

    def _get_edev_list(self, request: Request) -> Response:
        page = _page(request.query)
        recs = self.repo.end_devices_visible_to(request.client.lfdi)
        if page.after is not None:
            recs = [r for r in recs if m.epoch(r.changed_time) >= page.after]
        items = recs[page.start:page.start + page.limit]
        return _xml(m.end_device_list(self.paths, items, len(recs),
                                      self.settings.list_poll_rate_s))

    def _get_edev(self, request: Request, edev_id: int) -> Response:
        return _xml(m.end_device(self.paths, self._visible(request, edev_id)))

    def _get_reg(self, request: Request, edev_id: int) -> Response:
        rec = self._visible(request, edev_id)
        if rec.pin is None:
            raise _HttpError(404)
        return _xml(m.registration(self.paths, rec))

    def _get_cp(self, request: Request, edev_id: int) -> Response:
        rec = self._visible(request, edev_id)
        if not rec.nmi:
            raise _HttpError(404)
        return _xml(m.connection_point(self.paths, rec))

    def _get_fsa_list(self, request: Request, edev_id: int) -> Response:
        rec = self._visible(request, edev_id)
        page = _page(request.query)
        fsas = [f for f in (self.repo.fsa(i) for i in rec.fsa_ids) if f is not None]
        items = fsas[page.start:page.start + page.limit]
        return _xml(m.fsa_list(self.paths, edev_id, items, len(fsas),
                               self.settings.list_poll_rate_s))

    def _get_fsa(self, request: Request, edev_id: int, fsa_id: int) -> Response:
        rec = self._visible(request, edev_id)
        fsa = self.repo.fsa(fsa_id)
        if fsa is None or fsa_id not in rec.fsa_ids:
            raise _HttpError(404)
        return _xml(m.fsa(self.paths, edev_id, fsa))

    def _get_fsa_programs(self, request: Request, edev_id: int, fsa_id: int) -> Response:
        rec = self._visible(request, edev_id)
        fsa = self.repo.fsa(fsa_id)
        if fsa is None or fsa_id not in rec.fsa_ids:
            raise _HttpError(404)
        page = _page(request.query)
        programs = [p for p in (self.repo.program(i) for i in fsa.program_ids) if p is not None]
        programs.sort(key=lambda p: (p.primacy, p.program_id))  # §10.10: primacy ascending
        items = [self._program_el(edev_id, p) for p in programs[page.start:page.start + page.limit]]
        return _xml(m.program_list(self.paths.fsa_programs(edev_id, fsa_id), items, len(programs),
                                   self.settings.list_poll_rate_s))

    def _get_program(self, request: Request, edev_id: int, program_id: int) -> Response:
        _, program = self._program(request, edev_id, program_id)
        return _xml(self._program_el(edev_id, program))

    def _control_list(self, request: Request, edev_id: int, program_id: int, href: str,
                      active_only: bool) -> Response:
        self._program(request, edev_id, program_id)
        page = _page(request.query)
        now = self._clock()
        controls = self._current(self._device_controls(program_id, edev_id))
        if active_only:
            controls = [c for c in controls if m.control_status(c, now) == m.ACTIVE]
        if page.after is not None:
            controls = [c for c in controls if m.epoch(c.creation_time) >= page.after]
        items = [m.der_control(self.paths.control(edev_id, program_id, c.control_id), c, now)
                 for c in controls[page.start:page.start + page.limit]]
        return _xml(m.der_control_list(href, items, len(controls)))

    def _get_controls(self, request: Request, edev_id: int, program_id: int) -> Response:
        return self._control_list(request, edev_id, program_id,
                                  self.paths.controls(edev_id, program_id), active_only=False)

    def _get_active_controls(self, request: Request, edev_id: int, program_id: int) -> Response:
        return self._control_list(request, edev_id, program_id,
                                  self.paths.active_controls(edev_id, program_id),
                                  active_only=True)

    def _get_control(self, request: Request, edev_id: int, program_id: int,
                     control_id: int) -> Response:
        self._program(request, edev_id, program_id)
        control = next((c for c in self._device_controls(program_id, edev_id)
                        if c.control_id == control_id), None)
        if control is None:
            raise _HttpError(404)
        return _xml(m.der_control(self.paths.control(edev_id, program_id, control_id), control,
                                  self._clock()))

    def _get_default_control(self, request: Request, edev_id: int, program_id: int) -> Response:
        self._program(request, edev_id, program_id)
        default = self.repo.default_control(program_id)
        if default is None:
            raise _HttpError(404)
        return _xml(m.default_der_control(self.paths.default_control(edev_id, program_id),
                                          default))

    # --- registration ----------------------------------------------------------------------------
    def _post_edev(self, request: Request) -> Response:
        """POST EndDevice to the EndDeviceList (§8.5.3): a device registers itself, an
        aggregator the devices behind it. 201 with ``Location`` (also when the LFDI is already
        registered to this client: pre-registration by the operator)."""
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != MEDIA_TYPE:
            raise _HttpError(415, detail=f"content type {content_type!r}")
        try:
            doc = parse(request.body, "EndDevice")
        except SepDocumentError as exc:
            raise _HttpError(400, 0, str(exc)) from None
        lfdi = (child_text(doc, "lFDI") or "").upper() or None
        sfdi = int(child_text(doc, "sFDI") or "0")
        client = request.client
        if lfdi is not None and sfdi != sfdi_from_lfdi(lfdi):
            raise _HttpError(400, 1, f"sFDI {sfdi} does not match lFDI {lfdi}")
        aggregator = self.repo.is_aggregator(client.lfdi)
        if lfdi is None:
            if aggregator or sfdi != client.sfdi:
                raise _HttpError(400 if aggregator else 403, 1 if aggregator else None,
                                 "EndDevice without lFDI")
            lfdi = client.lfdi
        if not aggregator and lfdi != client.lfdi:
            raise _HttpError(403, detail=f"device {client.lfdi} may not register {lfdi}")
        existing = self.repo.end_device_by_lfdi(lfdi)
        if existing is not None:
            if existing.lfdi != client.lfdi and existing.owner_lfdi != client.lfdi:
                raise _HttpError(403, detail=f"end device {lfdi} belongs to another client")
            rec = existing
        elif aggregator or self.settings.allow_self_registration:
            rec = self.repo.add_end_device(lfdi, owner_lfdi=client.lfdi if aggregator else None)
        else:
            raise _HttpError(403, detail=f"end device {lfdi} is not pre-registered")
        return Response(201, headers=(("location", self.paths.edev(rec.edev_id)),))
