"""A minimal IEEE 2030.5 client transport: HTTP/1.1 (h11) over mutual TLS on asyncio,
keep-alive connections in a small pool, and the documents a simulated device sends.

Standard library ``ssl`` + ``asyncio`` and ``h11`` only; from derms.protocols just the
identity helpers and the XML namespace constants (the client must not lean on the
server's internals).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import h11
from lxml import etree

from derms.protocols.ieee2030_5.identity import sfdi_from_lfdi
from derms.protocols.ieee2030_5.sep_xml import CSIPAUS_NS, NS

log = logging.getLogger(__name__)
Q = f"{{{NS}}}"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
A = f"{{{CSIPAUS_NS}}}"
MEDIA = "application/sep+xml"
CIPHERS = ("ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:"
           "ECDHE-ECDSA-AES256-GCM-SHA384")


def client_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Client context: the server must chain to ``ca``; our certificate and key; the CSIP
    TLS 1.2 suites offered (TLS 1.3 when the server prefers it)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def xml(self) -> etree._Element:
        return etree.fromstring(self.body, _PARSER)


_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


class _Connection:
    """One keep-alive HTTPS connection (reconnects when the server closed it)."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, timeout_s: float) -> None:
        self.host, self.port, self.ctx, self.timeout_s = host, port, ctx, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h11: h11.Connection | None = None

    async def _open(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=self.ctx,
            server_hostname="localhost" if self.host in ("127.0.0.1", "::1") else self.host),
            self.timeout_s)
        self.h11 = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = self.h11 = None

    async def request(self, method: str, target: str, body: bytes | None) -> HttpResult:
        for attempt in (0, 1):
            fresh = self.h11 is None
            if fresh:
                await self._open()
            try:
                return await asyncio.wait_for(self._exchange(method, target, body),
                                              self.timeout_s)
            except (ConnectionError, OSError, h11.ProtocolError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt:  # a new connection failed: give up
                    raise
            except TimeoutError:
                self.close()
                raise
        raise ConnectionError("unreachable")

    async def _exchange(self, method: str, target: str, body: bytes | None) -> HttpResult:
        conn = self.h11
        headers = [("host", self.host), ("accept", MEDIA)]
        if body is not None:
            headers += [("content-type", MEDIA), ("content-length", str(len(body)))]
        data = conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        self.writer.write(data)
        await self.writer.drain()
        status, hdrs, chunks = 0, {}, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                raw = await self.reader.read(65536)
                if not raw:
                    raise ConnectionError("server closed the connection")
                conn.receive_data(raw)
            elif isinstance(event, h11.Response):
                status = event.status_code
                hdrs = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            self.close()
        else:
            conn.start_next_cycle()
        return HttpResult(status, hdrs, b"".join(chunks))


class ConnectionPool:
    """``size`` keep-alive connections of one client certificate; a request waits for a
    free one, so ``size`` bounds this client's concurrency."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, size: int = 2,
                 timeout_s: float = 15.0) -> None:
        self._free: asyncio.Queue[_Connection] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(_Connection(host, port, ctx, timeout_s))
        self._all = list(self._free._queue)  # noqa: SLF001 - for close()
        self.latency_s: list[float] = []

    async def request(self, method: str, target: str, body: bytes | None = None
                      ) -> HttpResult:
        conn = await self._free.get()
        t0 = time.perf_counter()
        try:
            return await conn.request(method, target, body)
        finally:
            if len(self.latency_s) < 200_000:
                self.latency_s.append(time.perf_counter() - t0)
            self._free.put_nowait(conn)

    def close(self) -> None:
        for c in self._all:
            c.close()


# --- documents ---------------------------------------------------------------------------------


def device_lfdi(aggregator_lfdi: str, der_id: str) -> str:
    """A stable LFDI for a device behind an aggregator (aggregated devices have no
    certificate of their own; CSIP lets the aggregator name them)."""
    return hashlib.sha256(f"{aggregator_lfdi}/{der_id}".encode()).hexdigest()[:40].upper()


def mrid(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:32].upper()


def end_device_xml(lfdi: str) -> bytes:
    return (f'<EndDevice xmlns="{NS}"><lFDI>{lfdi}</lFDI><sFDI>{sfdi_from_lfdi(lfdi)}'
            f"</sFDI><changedTime>0</changedTime></EndDevice>").encode()


def response_xml(lfdi: str, subject: str, status: int, created_s: int) -> bytes:
    return (f'<DERControlResponse xmlns="{NS}"><createdDateTime>{created_s}'
            f"</createdDateTime><endDeviceLFDI>{lfdi}</endDeviceLFDI><status>{status}"
            f"</status><subject>{subject}</subject></DERControlResponse>").encode()


#: site readings: (key, uom, power of ten, kind) — W and var import positive (forward =
#: delivered to the customer, the sign on the value), V in tenths of a volt
SITE_READINGS = (("p", 38, 0, 37), ("q", 63, 0, 37), ("v", 29, -1, 0))
#: a DER's own usage point (roleFlags isMirror + isDER): W and var *forward* = the DER's
#: output (generating/discharging positive, charging negative), as CSIP-AUS clients post it
DER_READINGS = (("p", 38, 0, 37), ("q", 63, 0, 37))
#: feeder-head SCADA mirrored per phase (PhaseCode A 128, B 64, C 32): W and var import
#: positive at the head (roleFlags isMirror + isPremisesAggregationPoint)
PHASE_CODES = {"a": 128, "b": 64, "c": 32}
HEAD_READINGS = tuple((f"{q}_{ph}", uom, 0, 37, code) for q, uom in (("p", 38), ("q", 63))
                      for ph, code in PHASE_CODES.items())
SITE_FLAGS, DER_FLAGS = "0003", "0009"


def _reading_type(uom: int, mult: int, kind: int, phase: int = 0) -> str:
    ph = f"<phase>{phase}</phase>" if phase else ""
    return (f"<ReadingType><accumulationBehaviour>12</accumulationBehaviour>"
            f"<commodity>1</commodity><dataQualifier>12</dataQualifier>"
            f"<flowDirection>1</flowDirection><kind>{kind}</kind>{ph}"
            f"<powerOfTenMultiplier>{mult}</powerOfTenMultiplier><uom>{uom}</uom>"
            f"</ReadingType>")


def _mmr_mrid(lfdi: str, name: str, key: str) -> str:
    return mrid(lfdi, key) if name == "site" else mrid(lfdi, name, key)


def mup_xml(lfdi: str, post_rate_s: int, name: str = "site", role_flags: str = SITE_FLAGS,
            readings: tuple = SITE_READINGS) -> bytes:
    """A MirrorUsagePoint ``name`` of the device (``site``: the premises aggregation point,
    roleFlags 0003; ``der``: the DER's own, 0009) with one MirrorMeterReading per entry
    of ``readings`` ((key, uom, power of ten, kind[, phase code]))."""
    mmrs = "".join(
        f"<MirrorMeterReading><mRID>{_mmr_mrid(lfdi, name, r[0])}</mRID><description>"
        f"{name} {r[0]}</description>{_reading_type(*r[1:])}</MirrorMeterReading>"
        for r in readings)
    return (f'<MirrorUsagePoint xmlns="{NS}"><mRID>{mrid(lfdi, name)}</mRID>'
            f"<description>{name}</description><roleFlags>{role_flags}</roleFlags>"
            f"<serviceCategoryKind>0</serviceCategoryKind><status>1</status>"
            f"<deviceLFDI>{lfdi}</deviceLFDI>{mmrs}<postRate>{post_rate_s}</postRate>"
            f"</MirrorUsagePoint>").encode()


def readings_xml(lfdi: str, t_s: int, values: dict[str, int], name: str = "site") -> bytes:
    """A MirrorMeterReadingList of wire values (already scaled) keyed like the MUP's."""
    mmrs = "".join(
        f"<MirrorMeterReading><mRID>{_mmr_mrid(lfdi, name, key)}</mRID><description>{name} "
        f"{key}</description><Reading><timePeriod><duration>0</duration><start>{t_s}</start>"
        f"</timePeriod><value>{value}</value></Reading></MirrorMeterReading>"
        for key, value in values.items())
    return (f'<MirrorMeterReadingList xmlns="{NS}" all="{len(values)}" '
            f'results="{len(values)}">{mmrs}</MirrorMeterReadingList>').encode()


def site_mup_xml(lfdi: str, post_rate_s: int, keys: tuple[str, ...] = ("p", "q", "v")
                 ) -> bytes:
    """The site's MirrorUsagePoint (roleFlags: mirror + premises aggregation point) with
    its MirrorMeterReadings (P, Q, V, or the ``keys`` among them)."""
    return mup_xml(lfdi, post_rate_s, readings=tuple(r for r in SITE_READINGS
                                                     if r[0] in keys))


def site_readings_xml(lfdi: str, t_s: int, p_w: float, q_var: float, v_v: float,
                      keys: tuple[str, ...] = ("p", "q", "v")) -> bytes:
    values = {"p": round(p_w), "q": round(q_var), "v": round(v_v * 10)}
    return readings_xml(lfdi, t_s, {k: values[k] for k, *_ in SITE_READINGS if k in keys})


def der_mup_xml(lfdi: str, post_rate_s: int) -> bytes:
    return mup_xml(lfdi, post_rate_s, "der", DER_FLAGS, DER_READINGS)


def der_readings_xml(lfdi: str, t_s: int, p_out_w: float, q_out_var: float) -> bytes:
    return readings_xml(lfdi, t_s, {"p": round(p_out_w), "q": round(q_out_var)}, "der")


def head_mup_xml(lfdi: str, post_rate_s: int, phases: int = 3) -> bytes:
    keep = tuple(r for r in HEAD_READINGS if r[0][-1] in "abc"[:phases])
    return mup_xml(lfdi, post_rate_s, "head", SITE_FLAGS, keep)


def head_readings_xml(lfdi: str, t_s: int, p_w, q_var) -> bytes:
    values = {f"p_{ph}": round(float(x)) for ph, x in zip("abc", p_w, strict=False)}
    values |= {f"q_{ph}": round(float(x)) for ph, x in zip("abc", q_var, strict=False)}
    return readings_xml(lfdi, t_s, values, "head")


def _power_w(el: etree._Element | None) -> float | None:
    if el is None:
        return None
    return float(el.findtext(f"{Q}value")) * 10.0 ** int(el.findtext(f"{Q}multiplier") or 0)


def _flag(el: etree._Element, tag: str) -> bool | None:
    text = el.findtext(f"{Q}{tag}")
    return None if text is None else text.strip() in ("true", "1")


def control_limits(base: etree._Element | None) -> dict:
    """DERControlBase → the fleet's control row (kW; flags), see derms.sim.fleet.Controls."""
    if base is None:
        return {}
    kw = lambda el: None if (w := _power_w(el)) is None else w / 1000.0  # noqa: E731
    return {"exp_lim_kw": kw(base.find(f"{A}opModExpLimW")),
            "imp_lim_kw": kw(base.find(f"{A}opModImpLimW")),
            "gen_lim_kw": kw(base.find(f"{A}opModGenLimW")),
            "load_lim_kw": kw(base.find(f"{A}opModLoadLimW")),
            "target_kw": kw(base.find(f"{Q}opModTargetW")),
            "connect": _flag(base, "opModConnect"), "energize": _flag(base, "opModEnergize")}


def subscription_xml(resource: str, notification_uri: str, limit: int = 100) -> bytes:
    """A non-conditional XML Subscription to ``resource`` (§9.2)."""
    return (f'<Subscription xmlns="{NS}"><subscribedResource>{resource}'
            f"</subscribedResource><encoding>0</encoding><level>+S1</level>"
            f"<limit>{limit}</limit><notificationURI>{notification_uri}</notificationURI>"
            "</Subscription>").encode()
