"""What clients write besides registration: their DER's capability, settings, status and
availability (PUT, §10.10.4) and their responses to events (POST, §8.10.3).

A mixin of :class:`~derms.protocols.ieee2030_5.app.SepApp` (it uses the app's ``repo``,
``paths``, ``settings`` and its access rules ``_visible``, ``_program_ids``,
``_device_controls``); kept apart so each file holds one kind of resource.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime

from derms.protocols.ieee2030_5 import mappers as m
from derms.protocols.ieee2030_5.http11 import Request, Response
from derms.protocols.ieee2030_5.model import EndDeviceRecord
from derms.protocols.ieee2030_5.resources import (
    HttpError,
    offloaded,
    page_of,
    require_sep_xml,
)
from derms.protocols.ieee2030_5.resources import xml_response as _xml
from derms.protocols.ieee2030_5.sep_xml import (
    MEDIA_TYPE,
    NS,
    SepDocumentError,
    child_text,
    parse,
    to_bytes,
)
from derms.protocols.ieee2030_5.telemetry import SOURCE
from derms.store.timeseries import Quality, ReadingRow

DER_ID = 1  # one DER per EndDevice (CSIP: the site's DER, aggregated)


class ClientReports:
    # --- DER: what the client reports -----------------------------------------------------------
    def _get_der_list(self, request: Request, edev_id: int) -> Response:
        self._visible(request, edev_id)
        page = page_of(request.query)
        items = [m.der(self.paths, edev_id, DER_ID)][page.start:page.start + page.limit]
        return _xml(m.der_list(self.paths, edev_id, items, 1, self.settings.list_poll_rate_s))

    def _der(self, request: Request, edev_id: int, der_id: int) -> EndDeviceRecord:
        rec = self._visible(request, edev_id)
        if der_id != DER_ID:
            raise HttpError(404)
        return rec

    def _get_der(self, request: Request, edev_id: int, der_id: int) -> Response:
        self._der(request, edev_id, der_id)
        return _xml(m.der(self.paths, edev_id, der_id))

    def _get_der_part(self, request: Request, edev_id: int, der_id: int, kind: str) -> Response:
        self._der(request, edev_id, der_id)
        stored = self.repo.der_document(edev_id, kind)
        if stored is None:
            raise HttpError(404)
        return Response(200, stored[0], MEDIA_TYPE)  # validated and given its href at PUT

    def _put_der_part(self, request: Request, edev_id: int, der_id: int, kind: str
                      ) -> Response | Awaitable[Response]:
        """PUT DERCapability / DERSettings / DERStatus / DERAvailability (§10.10.4): the
        device (or its aggregator) reports; validated, then stored; 204. A DERStatus's
        ``stateOfChargeStatus`` (hundredths of a percent at its ``dateTime``) also becomes a
        ``soc_frac`` reading of the end device's ``der_id`` (when it has one)."""
        rec = self._der(request, edev_id, der_id)
        require_sep_xml(request)
        try:
            doc = parse(request.body, m.DER_PARTS[kind])
        except SepDocumentError as exc:
            raise HttpError(400, 0, str(exc)) from None
        soc = doc.find(f"{{{NS}}}stateOfChargeStatus") if kind == "ders" else None
        row = None
        if soc is not None and rec.der_id is not None:
            try:
                t = datetime.fromtimestamp(int(child_text(soc, "dateTime")), UTC)
            except (OverflowError, OSError, ValueError):
                raise HttpError(400, 1, "stateOfChargeStatus dateTime out of range") from None
            value = int(child_text(soc, "value")) / 10_000
            row = ReadingRow("soc_frac", t, value, der_id=rec.der_id, source=SOURCE,
                             quality=0 if 0 <= value <= 1 else int(Quality.OUT_OF_RANGE))
        xml = to_bytes(m.with_href(doc, self.paths.der_part(edev_id, der_id, kind)))
        if row is not None:
            self.repo.put_der_document(edev_id, kind, xml)
            return self._write_rows(request, [row], Response(204))
        return offloaded(lambda: (self.repo.put_der_document(edev_id, kind, xml),
                                  Response(204))[1])

    # --- responses to events (§8.10.3) ------------------------------------------------------------
    def _get_responses(self, request: Request) -> Response:
        page = page_of(request.query)
        mine = [e.edev_id for e in self.repo.end_devices_visible_to(request.client.lfdi)]
        recs = self.repo.responses(edev_ids=mine)
        if page.after is not None:
            recs = [r for r in recs if m.epoch(r.received_time) >= page.after]
        return _xml(m.response_list(self.paths, recs[page.start:page.start + page.limit],
                                    len(recs)))

    def _get_response(self, request: Request, response_id: int) -> Response:
        rec = self.repo.response(response_id)
        if rec is None:
            raise HttpError(404)
        self._visible(request, rec.edev_id)
        return _xml(m.response(self.paths, rec))

    def _post_response(self, request: Request) -> Awaitable[Response]:
        """POST a (DERControl)Response to an event the device sees: 201 with ``Location``;
        the device must be the client or one of its aggregated devices (else 403), the
        subject an event it was sent (else 400)."""
        require_sep_xml(request)
        try:
            doc = parse(request.body, ("DERControlResponse", "Response"))
        except SepDocumentError as exc:
            raise HttpError(400, 0, str(exc)) from None
        lfdi = (child_text(doc, "endDeviceLFDI") or "").upper()
        rec = self.repo.end_device_by_lfdi(lfdi)
        client = request.client.lfdi
        if rec is None or (rec.lfdi != client and rec.owner_lfdi != client):
            raise HttpError(403, detail=f"client {client} may not respond for {lfdi}")
        subject = (child_text(doc, "subject") or "").upper()
        control = self.repo.control_by_mrid(subject)
        if control is None or control.program_id not in self._program_ids(rec) or all(
                c.control_id != control.control_id
                for c in self._device_controls(control.program_id, rec.edev_id)):
            raise HttpError(400, 1, f"subject {subject}: no such event for {lfdi}")
        status = child_text(doc, "status")
        created = child_text(doc, "createdDateTime")
        try:
            created_time = (datetime.fromtimestamp(int(created), UTC) if created is not None
                            else None)
        except (OverflowError, OSError, ValueError):
            raise HttpError(400, 1, "createdDateTime out of range") from None

        def store() -> Response:
            saved, _ = self.repo.add_response(
                control.control_id, rec.edev_id, int(status) if status is not None else None,
                created_time)
            return Response(201, headers=(("location",
                                           self.paths.response(saved.response_id)),))

        return offloaded(store)
