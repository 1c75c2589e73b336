"""What clients create under their EndDevice besides DER reports: LogEvents (§10.15, POST to
``…/edev/N/lel``) and Subscriptions (§9.2, POST to ``…/edev/N/sub``, DELETE to cancel).

A mixin of :class:`~derms.protocols.ieee2030_5.app.SepApp`. The resources a client may
subscribe to are the ones the server marks ``subscribable``: EndDeviceList,
FunctionSetAssignmentsList, DERProgramList, DERControlList (and ActiveDERControlList),
DefaultDERControl and DERProgram. Only XML (``encoding`` 0) and non-conditional
subscriptions are supported; the ``notificationURI`` must be ``https://``. The Notification
itself is sent by :class:`~derms.protocols.ieee2030_5.notify.SepNotifier`.

Status codes: 201 with ``Location``; 400 with an Error reasonCode — 0 malformed, 1 a value
the server does not accept (unknown or unsubscribable resource, EXI, not https), 2 too many
subscriptions, 3 conditional subscriptions; 404 for another client's end device.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime
from urllib.parse import urlsplit

from derms.protocols.ieee2030_5 import mappers as m
from derms.protocols.ieee2030_5.http11 import Request, Response
from derms.protocols.ieee2030_5.model import LogEventRecord, SubscriptionRecord
from derms.protocols.ieee2030_5.resources import (
    MAX_PAGE,
    HttpError,
    offloaded,
    page_of,
    require_sep_xml,
)
from derms.protocols.ieee2030_5.resources import xml_response as _xml
from derms.protocols.ieee2030_5.sep_xml import NS, SepDocumentError, child_text, parse

#: route names (see app._ROUTES) a client may subscribe to
SUBSCRIBABLE_ROUTES = frozenset({"edev_list", "fsa_list", "fsa_programs", "controls",
                                 "active_controls", "default_control", "program"})


class ClientLogsAndSubscriptions:
    # --- LogEvents ------------------------------------------------------------------------------
    def _get_log_events(self, request: Request, edev_id: int) -> Response:
        self._visible(request, edev_id)
        page = page_of(request.query)
        recs = self.repo.log_events(edev_id)
        if page.after is not None:
            recs = [r for r in recs if m.epoch(r.created_time) >= page.after]
        items = [m.log_event(self.paths.log_event(edev_id, r.log_event_id), r)
                 for r in recs[page.start:page.start + page.limit]]
        return _xml(m.log_event_list(self.paths.log_events(edev_id), items, len(recs),
                                     self.settings.list_poll_rate_s))

    def _get_log_event(self, request: Request, edev_id: int, log_id: int) -> Response:
        self._visible(request, edev_id)
        rec = next((r for r in self.repo.log_events(edev_id) if r.log_event_id == log_id), None)
        if rec is None:
            raise HttpError(404)
        return _xml(m.log_event(self.paths.log_event(edev_id, log_id), rec))

    def _post_log_event(self, request: Request, edev_id: int) -> Awaitable[Response]:
        """POST a LogEvent: validated, stored; 201 with ``Location``."""
        self._visible(request, edev_id)
        require_sep_xml(request)
        try:
            doc = parse(request.body, "LogEvent")
        except SepDocumentError as exc:
            raise HttpError(400, 0, str(exc)) from None
        try:
            created = datetime.fromtimestamp(int(child_text(doc, "createdDateTime")), UTC)
        except (OverflowError, OSError, ValueError):
            raise HttpError(400, 1, "createdDateTime out of range") from None
        extended = child_text(doc, "extendedData")
        rec = LogEventRecord(
            0, edev_id, created, int(child_text(doc, "functionSet")),
            int(child_text(doc, "logEventCode")), int(child_text(doc, "logEventID")),
            int(child_text(doc, "logEventPEN")), int(child_text(doc, "profileID")),
            details=child_text(doc, "details"),
            extended_data=int(extended) if extended is not None else None)

        def store() -> Response:
            saved = self.repo.add_log_event(rec)
            return Response(201, headers=(
                ("location", self.paths.log_event(edev_id, saved.log_event_id)),))

        return offloaded(store)

    # --- Subscriptions --------------------------------------------------------------------------
    def _get_subscriptions(self, request: Request, edev_id: int) -> Response:
        self._visible(request, edev_id)
        page = page_of(request.query)
        recs = self.repo.subscriptions(edev_id)
        items = [m.subscription(self.paths.subscription(edev_id, r.subscription_id), r)
                 for r in recs[page.start:page.start + page.limit]]
        return _xml(m.subscription_list(self.paths.subscriptions(edev_id), items, len(recs)))

    def _own_subscription(self, request: Request, edev_id: int, sub_id: int
                          ) -> SubscriptionRecord:
        self._visible(request, edev_id)
        rec = self.repo.subscription(sub_id)
        if rec is None or rec.edev_id != edev_id:
            raise HttpError(404)
        return rec

    def _get_subscription(self, request: Request, edev_id: int, sub_id: int) -> Response:
        rec = self._own_subscription(request, edev_id, sub_id)
        return _xml(m.subscription(self.paths.subscription(edev_id, sub_id), rec))

    def _delete_subscription(self, request: Request, edev_id: int, sub_id: int
                             ) -> Awaitable[Response]:
        self._own_subscription(request, edev_id, sub_id)
        return offloaded(lambda: (self.repo.delete_subscription(sub_id), Response(204))[1])

    def _post_subscription(self, request: Request, edev_id: int) -> Awaitable[Response]:
        """POST a Subscription: the subscribed resource must be one the client can read and
        that is subscribable; a repeat (same resource and notificationURI) renews it."""
        self._visible(request, edev_id)
        require_sep_xml(request)
        try:
            doc = parse(request.body, "Subscription")
        except SepDocumentError as exc:
            raise HttpError(400, 0, str(exc)) from None
        if doc.find(f"{{{NS}}}Condition") is not None:
            raise HttpError(400, 3, "conditional subscriptions are not supported")
        encoding = int(child_text(doc, "encoding"))
        if encoding != 0:
            raise HttpError(400, 1, f"encoding {encoding}: only 0 (XML) is supported")
        uri = child_text(doc, "notificationURI") or ""
        parts = urlsplit(uri)
        if parts.scheme != "https" or not parts.hostname:
            raise HttpError(400, 1, f"notificationURI {uri!r}: expected an https:// URL")
        if not self.settings.notify_host_allowed(parts.hostname):
            raise HttpError(400, 1, f"notificationURI {uri!r}: host not allowed "
                                    "(the server's notify_hosts)")
        resource = child_text(doc, "subscribedResource") or ""
        path = urlsplit(resource).path
        route = self._route_name(path)
        if route not in SUBSCRIBABLE_ROUTES:
            raise HttpError(400, 1, f"subscribedResource {resource!r}: not subscribable")
        probe = Request("GET", path, {}, {}, b"", request.client)
        try:
            self._dispatch(probe)  # the client must be able to read it
        except HttpError:
            raise HttpError(400, 1, f"subscribedResource {resource!r}: not found") from None
        rec = SubscriptionRecord(0, edev_id, request.client.lfdi, path, uri,
                                 limit=min(int(child_text(doc, "limit")), MAX_PAGE),
                                 level=child_text(doc, "level") or "+S1", encoding=encoding)

        def store() -> Response:
            try:
                saved, _ = self.repo.add_subscription(rec)
            except ValueError as exc:
                raise HttpError(400, 2, str(exc)) from None
            return Response(201, headers=(
                ("location", self.paths.subscription(edev_id, saved.subscription_id)),))

        return offloaded(store)
