"""The metering mirror (IEEE 2030.5 §10.11): clients POST MirrorUsagePoints and their
MirrorMeterReadings; the readings go into the derms historian.

- ``POST …/mup`` (MirrorUsagePoint): the ``deviceLFDI`` must be a registered end device that
  is the client or one it aggregates (else 403); 201 with ``Location: …/mup/N``. The same
  mRID again from the same client updates that MUP (new MirrorMeterReadings registered) and
  answers 201 with the same Location; from another client 403 (2023 edition §10.11.3 e).
- ``POST …/mup/N`` (MirrorMeterReading or MirrorMeterReadingList): readings of registered
  MirrorMeterReadings (a new mRID must bring its ReadingType, a known one may not change
  it: 400); 201 with the MUP's Location once stored. Another client's MUP: 404.
- ``GET …/mup`` (paged) and ``GET …/mup/N``: the client's MUPs with their reading types.

Which store series a reading belongs to (documented in the README): a usage point with
roleFlags isPremisesAggregationPoint is the site's meter — ``meter_id`` of the end device
(given at pre-registration) or, without one, its connection point id (NMI), which must then
be a meter in the store; any other usage point (the DER) is the end device's ``der_id``.
A reading whose owner is not set, or not in the store, is refused (400) and nothing of that
POST is stored. Quantities, units and signs: :mod:`.mirror_map`.

Every POST is validated whole before anything is stored; the database write runs in a
worker thread (``asyncio.to_thread``), never on the listener's event loop, and the answer
is sent after the commit.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from lxml import etree

from derms.errors import InputError
from derms.protocols.ieee2030_5 import mirror_map as mm
from derms.protocols.ieee2030_5.http11 import Request, Response
from derms.protocols.ieee2030_5.model import (
    EndDeviceRecord,
    MirrorReadingRecord,
    MirrorUsagePointRecord,
)
from derms.protocols.ieee2030_5.resources import HttpError, page_of, require_sep_xml
from derms.protocols.ieee2030_5.resources import xml_response as _xml
from derms.protocols.ieee2030_5.sep_xml import E, SepDocumentError, parse
from derms.protocols.ieee2030_5.telemetry import SOURCE
from derms.store.timeseries import ReadingRow

log = logging.getLogger(__name__)


def _named(mmr) -> None:
    """A MirrorMeterReading needs a non-empty mRID (it names the reading type later)."""
    if not mm.mmr_mrid(mmr):
        raise HttpError(400, 1, "MirrorMeterReading: empty mRID")


async def _resolved(result: Response | Awaitable[Response]) -> Response:
    return await result if inspect.isawaitable(result) else result


class MirrorUsagePoints:
    """A mixin of :class:`~derms.protocols.ieee2030_5.app.SepApp` (uses its ``repo``,
    ``paths``, ``settings``, ``telemetry`` and ``_visible``)."""

    def _visible_mups(self, request: Request) -> list[MirrorUsagePointRecord]:
        mine = [e.edev_id for e in self.repo.end_devices_visible_to(request.client.lfdi)]
        return sorted(self.repo.mirror_usage_points(mine), key=lambda m: m.mup_id)

    def _mup(self, request: Request, mup_id: int) -> MirrorUsagePointRecord:
        mup = self.repo.mirror_usage_point(mup_id)
        if mup is None:
            raise HttpError(404)
        self._visible(request, mup.edev_id)  # 404 for another client's
        return mup

    def _get_mup_list(self, request: Request) -> Response:
        page = page_of(request.query)
        mups = self._visible_mups(request)
        items = [mm.mirror_usage_point(self.paths.mup(m.mup_id), m)
                 for m in mups[page.start:page.start + page.limit]]
        el = E("MirrorUsagePointList", href=self.paths.mup_list, all=len(mups),
               results=len(items), pollRate=self.settings.list_poll_rate_s)
        for item in items:
            el.append(item)
        return _xml(el)

    def _get_mup(self, request: Request, mup_id: int) -> Response:
        return _xml(mm.mirror_usage_point(self.paths.mup(mup_id), self._mup(request, mup_id)))

    @staticmethod
    def _parse(request: Request, roots: str | tuple[str, ...]) -> etree._Element:
        require_sep_xml(request)
        try:
            return parse(request.body, roots)
        except SepDocumentError as exc:
            raise HttpError(400, 0, str(exc)) from None

    def _post_mup_list(self, request: Request) -> Response | Awaitable[Response]:
        doc = self._parse(request, "MirrorUsagePoint")
        fields = mm.mup_fields(doc)
        if not fields["mrid"]:  # the schema allows an empty hexBinary; an identity it is not
            raise HttpError(400, 1, "MirrorUsagePoint: empty mRID")
        rec = self.repo.end_device_by_lfdi(fields["device_lfdi"])
        client = request.client.lfdi
        if rec is None or (rec.lfdi != client and rec.owner_lfdi != client):
            raise HttpError(403, detail=f"client {client} may not mirror for "
                                        f"{fields['device_lfdi']}")
        mmrs = mm.mirror_readings(doc)
        regs = []
        for el in mmrs:
            _named(el)
            reg = mm.mmr_record(el)
            if reg is None:
                raise HttpError(400, 1, f"MirrorMeterReading {mm.mmr_mrid(el)}: no "
                                        "ReadingType")
            regs.append(reg)
        draft = MirrorUsagePointRecord(0, creator_lfdi=client, edev_id=rec.edev_id,
                                       readings=tuple(regs), **fields)

        async def register() -> Response:  # the repository write may reach the database
            try:
                mup, _ = await asyncio.to_thread(self.repo.add_mirror_usage_point, draft)
            except PermissionError as exc:
                raise HttpError(403, detail=str(exc)) from None
            except ValueError as exc:
                raise HttpError(400, 1, str(exc)) from None
            return await _resolved(self._store(request, mup, rec, mmrs, regs))

        return register()

    def _post_mup(self, request: Request, mup_id: int) -> Response | Awaitable[Response]:
        mup = self._mup(request, mup_id)
        doc = self._parse(request, ("MirrorMeterReadingList", "MirrorMeterReading"))
        mmrs = mm.mirror_readings(doc)
        regs: list[MirrorReadingRecord] = []
        for el in mmrs:
            _named(el)
            reg = mm.mmr_record(el)
            known = mup.reading(mm.mmr_mrid(el))
            if reg is None and known is None:
                raise HttpError(400, 1, f"MirrorMeterReading {mm.mmr_mrid(el)}: not "
                                        "registered and no ReadingType")
            if reg is not None and known is not None and known.reading_type != reg.reading_type:
                raise HttpError(400, 1, f"MirrorMeterReading {reg.mrid}: its ReadingType "
                                        "cannot change")
            regs.append(reg or known)
        new = [r for r in regs if mup.reading(r.mrid) is None]
        if not new:
            return self._store(request, mup, self.repo.end_device(mup.edev_id), mmrs, regs)

        async def register() -> Response:  # the repository write may reach the database
            try:
                added = await asyncio.to_thread(self.repo.add_mirror_readings, mup_id, new)
            except ValueError as exc:
                raise HttpError(400, 1, str(exc)) from None
            rec = self.repo.end_device(added.edev_id)
            return await _resolved(self._store(request, added, rec, mmrs, regs))

        return register()

    def _owner(self, mup: MirrorUsagePointRecord, rec: EndDeviceRecord) -> dict[str, str] | None:
        if mup.is_site:
            meter = rec.meter_id or rec.nmi
            return {"meter_id": meter} if meter else None
        return {"der_id": rec.der_id} if rec.der_id else None

    def _store(self, request: Request, mup: MirrorUsagePointRecord, rec: EndDeviceRecord,
               mmrs: Sequence[etree._Element], regs: Sequence[MirrorReadingRecord]
               ) -> Response | Awaitable[Response]:
        done = Response(201, headers=(("location", self.paths.mup(mup.mup_id)),))
        received = datetime.now(UTC).replace(microsecond=0)
        try:
            flows = [(v, reg.reading_type.flow_direction) for el, reg in zip(mmrs, regs,
                                                                              strict=True)
                     for v in mm.values_of(el, reg.reading_type, mup, received)]
            values = [v for v, _f in flows]
        except (OverflowError, OSError, ValueError) as exc:  # a time beyond any calendar
            raise HttpError(400, 1, f"reading time: {exc}") from None
        if not values:
            return done
        owner = self._owner(mup, rec)
        if owner is None:
            raise HttpError(400, 1, f"end device {rec.edev_id}: no "
                                    f"{'meter' if mup.is_site else 'DER device'} to store its "
                                    "readings under (set it at pre-registration)")
        rows = [ReadingRow(v.quantity, v.t, v.value, source=SOURCE, quality=v.quality, **owner)
                for v in _net_power(flows)]
        return self._write_rows(request, rows, done)

    def _write_rows(self, request: Request, rows: list[ReadingRow], done: Response
                    ) -> Response | Awaitable[Response]:
        sink = self.telemetry
        if sink is None:
            log.debug("event=ieee2030_5_readings_dropped reason=no_sink n=%d", len(rows))
            return done

        async def write() -> Response:
            try:
                result = await asyncio.to_thread(sink.write, rows)
            except InputError as exc:  # e.g. the mapped device or meter is not in the store
                raise HttpError(400, 1, str(exc)) from None
            log.debug("event=ieee2030_5_readings_stored lfdi=%s inserted=%d duplicates=%d",
                      request.client.lfdi, result.inserted, result.duplicates)
            return done

        return write()


def _net_power(flows: list) -> list:
    """A post's forward (1) and reverse (19) power registers of one quantity at one time
    summed into the net value: a site's import (+) and export (-) W registers both map to
    ``p_kw``, and the historian keeps the first value of a (series, time), so the export
    was lost (0 and -2 kW stored as 0). Only such a pair is summed (average, maximum and
    minimum readings of one time are not: 3 + 4 + 2 kW became 9); everything else passes
    through. ``flows``: (value, its reading type's flowDirection) pairs."""
    out, at = [], {}
    for v, flow in flows:
        key = (v.quantity, v.t)
        if v.quantity.startswith(("p_", "q_")) and key in at and flow in (1, 19) \
                and at[key][1] in (1, 19) and at[key][1] != flow:
            k = at[key][0]
            out[k] = replace(out[k], value=out[k].value + v.value,
                              quality=max(out[k].quality, v.quality))
            at[key] = (k, 0)  # the pair is complete
            continue
        if key not in at:
            at[key] = (len(out), flow)
        out.append(v)
    return out
