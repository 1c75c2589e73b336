"""The IEEE 2030.5 resources: routing, access rules and list paging over a repository.

Who may see what (IEEE 2030.5 §6.11.7, CSIP): the client is the LFDI of its TLS certificate.
It sees the EndDevice with its own LFDI and, when it is an aggregator, the EndDevices it
registered; any other EndDevice — and everything below it — answers 404, so existence is not
revealed. DERPrograms are reached through the device's FunctionSetAssignments; a DERControl
with an ``edev_id`` is seen by that device only, one with a ``connection_point`` (a site's
operating envelope) only by the devices registered at that connection point (NMI).

Status codes: 400 for malformed or schema-invalid documents (with an ``Error`` body), 403 for
a registration the client may not make, 404 for unknown or hidden resources, 405 with
``Allow`` for a method a resource does not take, 413 for oversized bodies (transport),
415 for a body that is not ``application/sep+xml``. A client PUTs its DER's capability,
settings, status and availability (``…/der/1/dercap|derg|ders|dera``): 204 once validated
and stored. DERControls carry ``replyTo`` (the ResponseList) and ``responseRequired``; a
device POSTs its (DERControl)Response there: 201, 403 for a device not its own, 400 for an
event it was not sent.

DERPrograms link their DERCurveList (volt-var, volt-watt, freq-watt curves that controls
and the default control turn on through DERCurveLinks). Events follow the rules in
:mod:`events`: a newer overlapping event of the same program supersedes an older one
(EventStatus 4). Each EndDevice links its LogEventList (the device POSTs LogEvents) and its
SubscriptionList (POST a Subscription to an EndDeviceList, FunctionSetAssignmentsList,
DERProgramList, DERProgram, (Active)DERControlList or DefaultDERControl; DELETE to end it);
:mod:`notify` delivers the Notifications. Incoming documents may carry the 2023 edition's
``schemaVer`` attribute on their root.

Paging (§4.4): ``s`` start index (default 0), ``l`` limit (default 1, at most
``MAX_PAGE``), ``a`` after: only items changed (EndDevice) or created (DERControl) at or after
that epoch second; ``all`` counts the items after the ``a`` filter.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from derms.protocols.ieee2030_5 import mappers as m
from derms.protocols.ieee2030_5.client_reports import ClientReports
from derms.protocols.ieee2030_5.events import superseded_times
from derms.protocols.ieee2030_5.http11 import Request, Response
from derms.protocols.ieee2030_5.identity import sfdi_from_lfdi
from derms.protocols.ieee2030_5.mirror import MirrorUsagePoints
from derms.protocols.ieee2030_5.model import ControlRecord, EndDeviceRecord
from derms.protocols.ieee2030_5.repository import SepRepository
from derms.protocols.ieee2030_5.resources import (
    HttpError,
    error_response,
    offloaded,
    page_of,
    require_sep_xml,
)
from derms.protocols.ieee2030_5.resources import xml_response as _xml
from derms.protocols.ieee2030_5.sep_xml import SepDocumentError, child_text, parse
from derms.protocols.ieee2030_5.subscriptions import ClientLogsAndSubscriptions
from derms.protocols.ieee2030_5.telemetry import ReadingSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SepSettings:
    dcap_path: str = "/dcap"
    dcap_poll_rate_s: int = 900
    list_poll_rate_s: int = 300
    allow_self_registration: bool = False  # devices not pre-registered may POST their EndDevice
    # hosts a subscription's notificationURI may name: names and/or networks ("10.0.0.0/8");
    # empty: any (a device could make the server send notifications anywhere it can reach)
    notify_hosts: tuple[str, ...] = ()

    def notify_host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a notificationURI's) is in :attr:`notify_hosts`."""
        if not self.notify_hosts:
            return True
        import ipaddress

        host = host.lower().strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        for allowed in self.notify_hosts:
            allowed = allowed.strip().lower()
            if ip is not None and "/" in allowed:
                try:
                    if ip in ipaddress.ip_network(allowed, strict=False):
                        return True
                except ValueError:
                    continue
            elif host == allowed or (allowed.startswith(".") and host.endswith(allowed)):
                return True
        return False

    @property
    def prefix(self) -> str:
        if not self.dcap_path.startswith("/") or not self.dcap_path.endswith("/dcap"):
            raise ValueError(f"dcap path {self.dcap_path!r}: expected /…/dcap")
        return self.dcap_path.removesuffix("/dcap")


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
        (r"/edev/(\d+)/der", "der_list"), (r"/edev/(\d+)/der/(\d+)", "der"),
        *((rf"/edev/(\d+)/der/(\d+)/{kind}", f"der_{kind}") for kind in m.DER_PARTS),
        (r"/rsps/1/rsp", "responses"), (r"/rsps/1/rsp/(\d+)", "response"),
        (r"/mup", "mup_list"), (r"/mup/(\d+)", "mup"),
        (r"/edev/(\d+)/derp/(\d+)/dc", "curves"), (r"/edev/(\d+)/derp/(\d+)/dc/(\d+)", "curve"),
        (r"/edev/(\d+)/lel", "log_events"), (r"/edev/(\d+)/lel/(\d+)", "log_event"),
        (r"/edev/(\d+)/sub", "subscriptions"), (r"/edev/(\d+)/sub/(\d+)", "subscription"),
    ]
]
#: resource → its POST handler
_POSTABLE = {"edev_list": "_post_edev", "responses": "_post_response",
             "mup_list": "_post_mup_list", "mup": "_post_mup",
             "log_events": "_post_log_event", "subscriptions": "_post_subscription"}
_PUTTABLE = {f"der_{kind}" for kind in m.DER_PARTS}
_DELETABLE = {"subscription": "_delete_subscription"}
_LIST_CACHE_MAX = 100_000  # rendered DERControlLists kept (cleared when full)



class SepApp(ClientReports, MirrorUsagePoints, ClientLogsAndSubscriptions):
    """Handles one request: ``SepApp(repo, settings)(request) -> Response``, or an
    awaitable of it when the request writes to the database (the listener awaits it; the
    write itself runs in a worker thread). ``telemetry``: where mirrored readings go
    (None: validated, then dropped)."""

    def __init__(self, repo: SepRepository, settings: SepSettings | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 telemetry: ReadingSink | None = None) -> None:
        self.repo = repo
        self.settings = settings or SepSettings()
        self.paths = m.Paths(self.settings.prefix)
        self._clock = clock
        self.telemetry = telemetry
        #: (list href, page) → (repository version, valid until epoch s, rendered response)
        self._list_cache: dict[tuple, tuple[int, int, Response]] = {}

    def __call__(self, request: Request) -> Response | Awaitable[Response]:
        try:
            response = self._dispatch(request)
        except HttpError as exc:
            return self._rejected(request, exc)
        if inspect.isawaitable(response):
            return self._finish(request, response)
        return response

    async def _finish(self, request: Request, pending: Awaitable[Response]) -> Response:
        try:
            return await pending
        except HttpError as exc:
            return self._rejected(request, exc)

    @staticmethod
    def _rejected(request: Request, exc: HttpError) -> Response:
        if exc.status >= 400:
            log.info("event=ieee2030_5_rejected method=%s path=%s status=%d lfdi=%s "
                     "detail=%r", request.method, request.path, exc.status,
                     request.client.lfdi, str(exc))
        return error_response(exc)

    def _dispatch(self, request: Request) -> Response:
        name, ids = self._route(request.path)
        allow = ("GET, POST" if name in _POSTABLE else "GET, PUT" if name in _PUTTABLE
                 else "GET, DELETE" if name in _DELETABLE else "GET")
        if request.method == "POST" and name in _POSTABLE:
            return getattr(self, _POSTABLE[name])(request, *ids)
        if request.method == "DELETE" and name in _DELETABLE:
            return getattr(self, _DELETABLE[name])(request, *ids)
        if request.method == "PUT" and name in _PUTTABLE:
            return self._put_der_part(request, *ids, name.removeprefix("der_"))
        if request.method != "GET":
            raise HttpError(405, allow=allow)
        if name in _PUTTABLE:
            return self._get_der_part(request, *ids, name.removeprefix("der_"))
        return getattr(self, f"_get_{name}")(request, *ids)

    def _route(self, path: str) -> tuple[str, list[int]]:
        """(route name, ids in the path); HttpError 404 for a path the server does not have."""
        prefix = self.paths.prefix
        if not path.startswith(prefix + "/"):
            raise HttpError(404)
        local = path[len(prefix):].rstrip("/") or "/"
        for pattern, name in _ROUTES:
            match = pattern.fullmatch(local)
            if match:
                return name, [int(g) for g in match.groups()]
        raise HttpError(404)

    def _route_name(self, path: str) -> str | None:
        try:
            return self._route(path)[0]
        except HttpError:
            return None

    # --- helpers ---------------------------------------------------------------------------------
    def _visible(self, request: Request, edev_id: int) -> EndDeviceRecord:
        rec = self.repo.end_device(edev_id)
        lfdi = request.client.lfdi
        if rec is None or (rec.lfdi != lfdi and rec.owner_lfdi != lfdi):
            raise HttpError(404)
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
            raise HttpError(404)
        return rec, program

    def _device_controls(self, program_id: int, edev_id: int) -> list[ControlRecord]:
        """Controls of a program that this device sees (program-wide ones, its own, and its
        connection point's), in IEEE 2030.5 event order: start ascending, then creation
        time descending, then mRID descending."""
        rec = self.repo.end_device(edev_id)
        nmi = rec.nmi if rec is not None else None
        controls = self.repo.device_controls(program_id, edev_id, nmi)
        controls.sort(key=lambda c: c.mrid, reverse=True)
        controls.sort(key=lambda c: c.creation_time, reverse=True)
        controls.sort(key=lambda c: c.start)
        return controls

    def _program_el(self, edev_id: int, program) -> etree._Element:
        return m.program(self.paths, edev_id, program,
                         n_controls=len(self._current(self._device_controls(
                             program.program_id, edev_id))),
                         has_default=self.repo.default_control(program.program_id) is not None,
                         n_curves=len(self.repo.curves(program.program_id)))

    def _current(self, controls: list[ControlRecord]) -> list[ControlRecord]:
        """Controls not yet over (completed events leave the list)."""
        now = m.epoch(self._clock())
        return [c for c in controls if m.epoch(c.start) + c.duration_s > now]

    @staticmethod
    def _superseded(everything: list[ControlRecord], current: list[ControlRecord]
                    ) -> dict[int, datetime]:
        """Superseded current events (see :mod:`events`); only events that can overlap a
        current one take part."""
        if not current:
            return {}
        first = min(m.epoch(c.start) for c in current)
        candidates = [c for c in everything if m.epoch(c.start) + c.duration_s > first]
        return superseded_times(candidates)

    def _curve_href(self, edev_id: int, program_id: int):
        return lambda curve_id: self.paths.curve(edev_id, program_id, curve_id)

    # --- resources -------------------------------------------------------------------------------
    def _get_dcap(self, request: Request) -> Response:
        count = len(self.repo.end_devices_visible_to(request.client.lfdi))
        return _xml(m.device_capability(self.paths, count, self.settings.dcap_poll_rate_s,
                                        mup_count=len(self._visible_mups(request))))

    def _get_tm(self, request: Request) -> Response:
        return _xml(m.time_resource(self.paths, self._clock(), self.settings.dcap_poll_rate_s))

    def _get_edev_list(self, request: Request) -> Response:
        page = page_of(request.query)
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
            raise HttpError(404)
        return _xml(m.registration(self.paths, rec))

    def _get_cp(self, request: Request, edev_id: int) -> Response:
        rec = self._visible(request, edev_id)
        if not rec.nmi:
            raise HttpError(404)
        return _xml(m.connection_point(self.paths, rec))

    def _get_fsa_list(self, request: Request, edev_id: int) -> Response:
        rec = self._visible(request, edev_id)
        page = page_of(request.query)
        fsas = [f for f in (self.repo.fsa(i) for i in rec.fsa_ids) if f is not None]
        items = fsas[page.start:page.start + page.limit]
        return _xml(m.fsa_list(self.paths, edev_id, items, len(fsas),
                               self.settings.list_poll_rate_s))

    def _get_fsa(self, request: Request, edev_id: int, fsa_id: int) -> Response:
        rec = self._visible(request, edev_id)
        fsa = self.repo.fsa(fsa_id)
        if fsa is None or fsa_id not in rec.fsa_ids:
            raise HttpError(404)
        return _xml(m.fsa(self.paths, edev_id, fsa))

    def _get_fsa_programs(self, request: Request, edev_id: int, fsa_id: int) -> Response:
        rec = self._visible(request, edev_id)
        fsa = self.repo.fsa(fsa_id)
        if fsa is None or fsa_id not in rec.fsa_ids:
            raise HttpError(404)
        page = page_of(request.query)
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
        """A device's (Active)DERControlList. What devices poll most: the rendered answer
        is cached per list and page until the repository changes or the clock reaches the
        next start or end of one of the device's events (access is checked every time)."""
        self._program(request, edev_id, program_id)
        page = page_of(request.query)
        version = self.repo.version  # before reading: a change meanwhile misses the cache
        now = self._clock()
        now_s = m.epoch(now)
        key = (href, page)
        hit = self._list_cache.get(key)
        if hit is not None and hit[0] == version and now_s < hit[1]:
            return hit[2]
        everything = self._device_controls(program_id, edev_id)
        controls = self._current(everything)
        superseded = self._superseded(everything, controls)
        if active_only:
            controls = [c for c in controls
                        if m.control_status(c, now, superseded.get(c.control_id)) == m.ACTIVE]
        if page.after is not None:
            controls = [c for c in controls if m.epoch(c.creation_time) >= page.after]
        curve_href = self._curve_href(edev_id, program_id)
        items = [m.der_control(self.paths.control(edev_id, program_id, c.control_id), c, now,
                               self.paths.responses, superseded_time=superseded.get(c.control_id),
                               curve_href=curve_href)
                 for c in controls[page.start:page.start + page.limit]]
        response = _xml(m.der_control_list(href, items, len(controls)))
        edges = [t for c in everything for t in (m.epoch(c.start), m.epoch(c.start) + c.duration_s)
                 if t > now_s]
        if len(self._list_cache) >= _LIST_CACHE_MAX:
            self._list_cache.clear()
        self._list_cache[key] = (version, min(edges, default=2**62), response)
        return response

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
        everything = self._device_controls(program_id, edev_id)
        control = next((c for c in everything if c.control_id == control_id), None)
        if control is None:
            raise HttpError(404)
        superseded = self._superseded(everything, [control])
        return _xml(m.der_control(self.paths.control(edev_id, program_id, control_id), control,
                                  self._clock(), self.paths.responses,
                                  superseded_time=superseded.get(control_id),
                                  curve_href=self._curve_href(edev_id, program_id)))

    def _get_default_control(self, request: Request, edev_id: int, program_id: int) -> Response:
        self._program(request, edev_id, program_id)
        default = self.repo.default_control(program_id)
        if default is None:
            raise HttpError(404)
        return _xml(m.default_der_control(self.paths.default_control(edev_id, program_id),
                                          default, self._curve_href(edev_id, program_id)))

    def _get_curves(self, request: Request, edev_id: int, program_id: int) -> Response:
        self._program(request, edev_id, program_id)
        page = page_of(request.query)
        curves = self.repo.curves(program_id)
        items = [m.curve(self.paths.curve(edev_id, program_id, c.curve_id), c)
                 for c in curves[page.start:page.start + page.limit]]
        return _xml(m.curve_list(self.paths.curves(edev_id, program_id), items, len(curves)))

    def _get_curve(self, request: Request, edev_id: int, program_id: int,
                   curve_id: int) -> Response:
        self._program(request, edev_id, program_id)
        curve = self.repo.curve(curve_id)
        if curve is None or curve.program_id != program_id:
            raise HttpError(404)
        return _xml(m.curve(self.paths.curve(edev_id, program_id, curve_id), curve))

    # --- registration ----------------------------------------------------------------------------
    def _post_edev(self, request: Request) -> Response | Awaitable[Response]:
        """POST EndDevice to the EndDeviceList (§8.5.3): a device registers itself, an
        aggregator the devices behind it. 201 with ``Location`` (also when the LFDI is already
        registered to this client: pre-registration by the operator)."""
        require_sep_xml(request)
        try:
            doc = parse(request.body, "EndDevice")
        except SepDocumentError as exc:
            raise HttpError(400, 0, str(exc)) from None
        lfdi = (child_text(doc, "lFDI") or "").upper() or None
        sfdi = int(child_text(doc, "sFDI") or "0")
        client = request.client
        if lfdi is not None and sfdi != sfdi_from_lfdi(lfdi):
            raise HttpError(400, 1, f"sFDI {sfdi} does not match lFDI {lfdi}")
        aggregator = self.repo.is_aggregator(client.lfdi)
        if lfdi is None:
            if aggregator or sfdi != client.sfdi:
                raise HttpError(400 if aggregator else 403, 1 if aggregator else None,
                                 "EndDevice without lFDI")
            lfdi = client.lfdi
        if not aggregator and lfdi != client.lfdi:
            raise HttpError(403, detail=f"device {client.lfdi} may not register {lfdi}")
        existing = self.repo.end_device_by_lfdi(lfdi)
        if existing is not None:
            if existing.lfdi != client.lfdi and existing.owner_lfdi != client.lfdi:
                raise HttpError(403, detail=f"end device {lfdi} belongs to another client")
            rec = existing
        elif aggregator or self.settings.allow_self_registration:
            owner = client.lfdi if aggregator else None

            def register() -> Response:
                try:
                    return self._created_edev(self.repo.add_end_device(lfdi, owner_lfdi=owner))
                except ValueError as exc:  # e.g. registered meanwhile by another request
                    raise HttpError(400, 1, str(exc)) from None

            return offloaded(register)
        else:
            raise HttpError(403, detail=f"end device {lfdi} is not pre-registered")
        return self._created_edev(rec)

    def _created_edev(self, rec: EndDeviceRecord) -> Response:
        return Response(201, headers=(("location", self.paths.edev(rec.edev_id)),))
