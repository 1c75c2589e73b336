"""The protocol side of the simulated fleet: IEEE 2030.5 aggregator clients on asyncio.

Why aggregators: CSIP lets an aggregator register and serve the end devices behind it over
its own TLS connection, which is how fleets of thousands reach a utility server; 10,000
devices each holding a TLS session and polling on its own would cost 10,000 handshakes
and sockets on a 2-core machine for no behavioural difference (DESIGN.md). So each
aggregator (``agg-<k>``, its own certificate) owns a share of the devices and a small pool
of keep-alive connections; every device is still an EndDevice of its own (LFDI derived from
the aggregator's LFDI and its der_id) with its own discovery walk, control list, responses
and mirror usage point.

Per device:

* discovery, following hrefs only: DeviceCapability → EndDeviceList (registration by
  POST EndDevice) → the EndDevice → FunctionSetAssignmentsList → DERProgramList →
  DERControlList and DefaultDERControl of each program (lowest ``primacy`` wins);
* polling of each DERControlList at the DERProgramList's ``pollRate`` divided by the sim
  speed (the DefaultDERControl every fourth poll);
* event handling on the *server's* clock (offset from ``Time``): an event applies over
  ``[start + r_s, start + duration + r_d)`` where ``r_s``/``r_d`` are drawn once per device
  in ``[0, randomizeStart]``/``[0, randomizeDuration]``, unless it is cancelled or
  superseded; responses (``received`` on first sight, ``started``, ``completed``,
  ``cancelled``/``superseded``) are POSTed to its ``replyTo`` as ``responseRequired`` asks;
* a site MirrorUsagePoint (P, Q, V; import positive; or only the ``site_keys`` asked for)
  and its readings every post period (time stamps as the physics loop stamped the
  measurements: simulated time, or wall-clock UTC when the twin runs against a live
  DERMS's control loop);
* with ``der_mirror``, a second MirrorUsagePoint for the DER itself (roleFlags isDER,
  P and Q forward = the device's output), which the DERMS stores under the ``der_id``: the
  telemetry its control loop reads and verifies delivery against.

An aggregator may also carry the feeder-head RTU (``head``: an end device whose site
MirrorUsagePoint mirrors per-phase P and Q at the substation, import positive), which the
DERMS stores under the meter ``<feeder_id>-head``: its head SCADA.

Poll and post periods and the fail-safe timeout are durations of *simulated* time (they
shrink with the speed); event windows are absolute times, as the server publishes them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from derms.sim import sep_client as sc
from derms.sim.board import ControlBoard
from derms.sim.notify_listener import NotifyListener

log = logging.getLogger(__name__)

RECEIVED, STARTED, COMPLETED, CANCELLED_R, SUPERSEDED_R = 1, 2, 3, 6, 7
EV_SCHEDULED, EV_ACTIVE, EV_CANCELLED, EV_CANCELLED_RANDOM, EV_SUPERSEDED = 0, 1, 2, 3, 4


@dataclass
class SimEvent:
    mrid: str
    start_s: float  # with this device's randomisation
    end_s: float
    status: int
    limits: dict
    reply_to: str | None
    response_required: int
    primacy: int
    sent: set[int] = field(default_factory=set)


@dataclass
class Program:
    href: str
    primacy: int
    controls_href: str | None
    default_href: str | None


@dataclass
class DeviceAgent:
    """One simulated end device as its aggregator tracks it."""

    index: int  # position in the fleet
    der_id: str
    lfdi: str
    edev_href: str | None = None
    programs: list[Program] = field(default_factory=list)
    events: dict[str, SimEvent] = field(default_factory=dict)
    mup_href: str | None = None
    rand: random.Random = field(default_factory=random.Random)
    list_poll_s: float = 300.0
    polls: int = 0
    subscriptions: int = 0
    applied: str | None = None  # mRID of the event applied now
    der_mup_href: str | None = None


@dataclass(frozen=True)
class AgentSettings:
    speed: float = 1.0
    post_rate_s: int = 300  # simulated seconds between readings
    poll_rate_s: float | None = None  # override of the servers' pollRate (simulated s)
    connections: int = 2
    dcap_path: str = "/dcap"
    tick_s: float = 0.25  # wall seconds between event evaluations
    #: subscribe each device's DERControlList and DefaultDERControl; the server then POSTs
    #: Notifications to the aggregator's listener (needs ``listener_ctx``), polling goes on
    #: at the list pollRate as a fallback
    subscribe: bool = False
    #: the site's mirrored quantities (``p``, ``q``, ``v``)
    site_keys: tuple[str, ...] = ("p", "q", "v")
    #: also mirror the DER's own P/Q on a DER usage point (the control loop's telemetry)
    der_mirror: bool = False
    #: phases of the feeder-head RTU's readings
    head_phases: int = 3
    #: mirror readings over IEEE 2030.5 (MirrorUsagePoints); False when the telemetry goes
    #: over MQTT instead (controls still come over 2030.5)
    mirror: bool = True


class Aggregator:
    """An aggregator client and its devices (see module docstring)."""

    def __init__(self, name: str, host: str, port: int, ctx, devices: list[DeviceAgent],
                 board: ControlBoard, settings: AgentSettings, listener_ctx=None,
                 head: DeviceAgent | None = None) -> None:
        self.name, self.devices, self.board, self.s = name, devices, board, settings
        self.head = head
        self.pool = sc.ConnectionPool(host, port, ctx, settings.connections)
        self._by_index = {d.index: d for d in devices}
        self.listener = (NotifyListener(listener_ctx, self._on_notification)
                         if settings.subscribe and listener_ctx is not None else None)
        self.offset_s = 0.0  # server clock - our clock
        self.mup_list: str | None = None
        self.walked = 0  # devices whose discovery walk has ended
        self._responses: asyncio.Queue = asyncio.Queue()

    # --- plumbing --------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self.offset_s

    async def _req(self, dev: DeviceAgent | None, method: str, href: str,
                   body: bytes | None = None) -> sc.HttpResult | None:
        c = self.board.counters
        c.requests += 1
        try:
            res = await self.pool.request(method, href, body)
        except (OSError, ConnectionError, TimeoutError) as exc:
            c.errors += 1
            log.debug("event=sim_request_failed agg=%s %s %s err=%r", self.name, method,
                      href, exc)
            return None
        if dev is not None and res.status < 500:
            self.board.contact(dev.index)
        if res.status >= 400:
            c.errors += 1
            log.info("event=sim_request_refused agg=%s %s %s status=%d body=%r", self.name,
                     method, href, res.status, res.body[:300])
        return res

    async def _get(self, dev: DeviceAgent | None, href: str, page: int = 100):
        sep = "&" if "?" in href else "?"
        res = await self._req(dev, "GET", f"{href}{sep}s=0&l={page}")
        return res.xml() if res is not None and res.status == 200 else None

    # --- discovery -------------------------------------------------------------------------
    async def discover(self) -> None:
        """The aggregator's walk, then each device's (bounded by the connection pool)."""
        dcap = await self._get(None, self.s.dcap_path)
        if dcap is None:
            raise ConnectionError(f"{self.name}: DeviceCapability unreachable")
        tm = dcap.find(f"{sc.Q}TimeLink")
        if tm is not None:
            doc = await self._get(None, tm.get("href"))
            if doc is not None:
                self.offset_s = float(doc.findtext(f"{sc.Q}currentTime")) - time.time()
        edev_list = dcap.find(f"{sc.Q}EndDeviceListLink").get("href")
        mups = dcap.find(f"{sc.Q}MirrorUsagePointListLink")
        self.mup_list = mups.get("href") if mups is not None else None
        sem = asyncio.Semaphore(4 * self.s.connections)

        async def one(dev: DeviceAgent) -> None:
            async with sem:
                try:
                    await self._discover_device(dev, edev_list)
                finally:
                    self.walked += 1

        await asyncio.gather(*(one(d) for d in self.devices))

    async def _discover_device(self, dev: DeviceAgent, edev_list: str) -> None:
        res = await self._req(dev, "POST", edev_list, sc.end_device_xml(dev.lfdi))
        if res is None or res.status != 201:
            return
        dev.edev_href = res.headers.get("location")
        edev = await self._get(dev, dev.edev_href)
        if edev is None:
            return
        fsa_link = edev.find(f"{sc.Q}FunctionSetAssignmentsListLink")
        programs: list[Program] = []
        if fsa_link is not None:
            fsas = await self._get(dev, fsa_link.get("href"))
            for fsa in (fsas if fsas is not None else []):
                link = fsa.find(f"{sc.Q}DERProgramListLink")
                if link is None:
                    continue
                plist = await self._get(dev, link.get("href"))
                if plist is None:
                    continue
                if plist.get("pollRate"):
                    dev.list_poll_s = float(plist.get("pollRate"))
                for p in plist.findall(f"{sc.Q}DERProgram"):
                    ctl = p.find(f"{sc.Q}DERControlListLink")
                    dflt = p.find(f"{sc.Q}DefaultDERControlLink")
                    programs.append(Program(p.get("href"), int(p.findtext(f"{sc.Q}primacy")),
                                            ctl.get("href") if ctl is not None else None,
                                            dflt.get("href") if dflt is not None else None))
        dev.programs = sorted(programs, key=lambda p: p.primacy)
        await self._poll_default(dev)
        await self._poll_controls(dev)
        sub_link = edev.find(f"{sc.Q}SubscriptionListLink")
        if self.listener is not None and sub_link is not None:
            await self._subscribe(dev, sub_link.get("href"))
        if self.mup_list is not None and self.s.mirror:
            res = await self._req(dev, "POST", self.mup_list,
                                  sc.site_mup_xml(dev.lfdi, self.s.post_rate_s,
                                                  self.s.site_keys))
            if res is not None and res.status == 201:
                dev.mup_href = res.headers.get("location")
            if self.s.der_mirror:
                res = await self._req(dev, "POST", self.mup_list,
                                      sc.der_mup_xml(dev.lfdi, self.s.post_rate_s))
                if res is not None and res.status == 201:
                    dev.der_mup_href = res.headers.get("location")
        self.board.counters.discovered += 1

    async def _discover_head(self) -> None:
        """The feeder-head RTU: registration and its per-phase MirrorUsagePoint."""
        head = self.head
        edevs = await self._get(None, self.s.dcap_path)
        link = edevs.find(f"{sc.Q}EndDeviceListLink") if edevs is not None else None
        if link is None or self.mup_list is None:
            return
        res = await self._req(None, "POST", link.get("href"), sc.end_device_xml(head.lfdi))
        if res is None or res.status != 201:
            return
        res = await self._req(None, "POST", self.mup_list,
                              sc.head_mup_xml(head.lfdi, self.s.post_rate_s,
                                              self.s.head_phases))
        if res is not None and res.status == 201:
            head.mup_href = res.headers.get("location")

    # --- subscriptions and notifications ----------------------------------------------------
    async def _subscribe(self, dev: DeviceAgent, sub_list: str) -> None:
        """Subscribe the device's DERControlLists and DefaultDERControls (§9.2)."""
        assert self.listener is not None
        uri = self.listener.uri(dev.index)
        for prog in dev.programs:
            for href in (prog.controls_href, prog.default_href):
                if href is None:
                    continue
                res = await self._req(dev, "POST", sub_list,
                                      sc.subscription_xml(href, uri, limit=100))
                if res is not None and res.status == 201:
                    dev.subscriptions += 1

    def _on_notification(self, index: int, root) -> None:
        """A Notification for one of our devices: take the resource as if polled."""
        dev = self._by_index.get(index)
        if dev is None:
            raise KeyError(f"no device {index} behind {self.name}")
        self.board.contact(dev.index)
        self.board.counters.notifications += 1
        resource = root.find(f"{sc.Q}Resource")
        href = root.findtext(f"{sc.Q}subscribedResource")
        prog = next((p for p in dev.programs if href in (p.controls_href, p.default_href)),
                    None)
        if resource is None or prog is None:
            return
        kind = resource.get(f"{{{sc.XSI}}}type", "")
        if kind.endswith("DefaultDERControl"):
            self.board.set_default(dev.index,
                                   sc.control_limits(resource.find(f"{sc.Q}DERControlBase")))
        elif kind.endswith("DERControlList"):
            for el in resource.findall(f"{sc.Q}DERControl"):
                self._update_event(dev, el, prog.primacy)
            self.evaluate(dev)

    # --- controls --------------------------------------------------------------------------
    async def _poll_default(self, dev: DeviceAgent) -> None:
        for prog in dev.programs:  # lowest primacy first: the first default found wins
            if prog.default_href is None:
                continue
            doc = await self._get(dev, prog.default_href)
            if doc is not None:
                self.board.set_default(dev.index,
                                       sc.control_limits(doc.find(f"{sc.Q}DERControlBase")))
                return

    async def _poll_controls(self, dev: DeviceAgent) -> None:
        seen: set[str] = set()
        for prog in dev.programs:
            if prog.controls_href is None:
                continue
            doc = await self._get(dev, prog.controls_href)
            if doc is None:
                continue
            for el in doc.findall(f"{sc.Q}DERControl"):
                self._update_event(dev, el, prog.primacy)
                seen.add(el.findtext(f"{sc.Q}mRID"))
        # events gone from the lists are over (completed events leave them)
        for m in [m for m in dev.events if m not in seen]:
            ev = dev.events[m]
            if self.now() < ev.start_s:  # withdrawn before it began
                del dev.events[m]
        dev.polls += 1
        self.board.counters.polls += 1

    def _update_event(self, dev: DeviceAgent, el, primacy: int) -> None:
        m = el.findtext(f"{sc.Q}mRID")
        status = int(el.findtext(f"{sc.Q}EventStatus/{sc.Q}currentStatus"))
        ev = dev.events.get(m)
        if ev is None:
            start = float(el.findtext(f"{sc.Q}interval/{sc.Q}start"))
            dur = float(el.findtext(f"{sc.Q}interval/{sc.Q}duration"))
            rs = int(el.findtext(f"{sc.Q}randomizeStart") or 0)
            rd = int(el.findtext(f"{sc.Q}randomizeDuration") or 0)
            r_s = dev.rand.uniform(min(0, rs), max(0, rs))
            r_d = dev.rand.uniform(min(0, rd), max(0, rd))
            ev = SimEvent(m, start + r_s, start + dur + r_s + r_d, status,
                          sc.control_limits(el.find(f"{sc.Q}DERControlBase")),
                          el.get("replyTo"), int(el.get("responseRequired") or "0", 16),
                          primacy)
            dev.events[m] = ev
            self._respond(dev, ev, RECEIVED)
        ev.status = status

    def _respond(self, dev: DeviceAgent, ev: SimEvent, code: int) -> None:
        wanted = (ev.response_required & 0x01) if code == RECEIVED else (
            ev.response_required & 0x02)
        if not wanted or ev.reply_to is None or code in ev.sent:
            return
        ev.sent.add(code)
        self._responses.put_nowait((dev, ev.reply_to, ev.mrid, code, int(self.now())))

    def evaluate(self, dev: DeviceAgent) -> None:
        """Which event applies to ``dev`` now; board row and responses follow."""
        now = self.now()
        best: SimEvent | None = None
        for ev in list(dev.events.values()):
            if ev.status in (EV_CANCELLED, EV_CANCELLED_RANDOM, EV_SUPERSEDED):
                code = SUPERSEDED_R if ev.status == EV_SUPERSEDED else CANCELLED_R
                self._respond(dev, ev, code)
                if STARTED not in ev.sent or now >= ev.end_s:
                    del dev.events[ev.mrid]
                continue
            if now >= ev.end_s:
                if ev.start_s <= now and STARTED in ev.sent:
                    self._respond(dev, ev, COMPLETED)
                del dev.events[ev.mrid]
                continue
            if ev.start_s <= now and (best is None or (ev.primacy, -ev.start_s) <
                                      (best.primacy, -best.start_s)):
                best = ev
        new = best.mrid if best is not None else None
        if new != dev.applied:
            if best is not None:
                self._respond(dev, best, STARTED)
            self.board.set_event(dev.index, best.limits if best is not None else None)
            dev.applied = new

    # --- loops -----------------------------------------------------------------------------
    def _talking(self, dev: DeviceAgent) -> bool:
        return not (self.board.silenced[dev.index] or self.board.offline[dev.index])

    async def _poll_loop(self, dev: DeviceAgent, stop: asyncio.Event) -> None:
        period = (self.s.poll_rate_s or dev.list_poll_s) / self.s.speed
        await _sleep(stop, dev.rand.uniform(0, period))
        while not stop.is_set():
            if dev.edev_href is not None and self._talking(dev):
                await self._poll_controls(dev)
                if dev.polls % 4 == 0:
                    await self._poll_default(dev)
            await _sleep(stop, period)

    async def _post_loop(self, dev: DeviceAgent, stop: asyncio.Event) -> None:
        period = self.s.post_rate_s / self.s.speed
        await _sleep(stop, dev.rand.uniform(0, period))
        last_t = None
        while not stop.is_set():
            t, p, q, v = self.board.measurements(dev.index)
            if dev.mup_href and t is not None and t != last_t and self._talking(dev):
                res = await self._req(dev, "POST", dev.mup_href,
                                      sc.site_readings_xml(dev.lfdi, t, p, q, v,
                                                           self.s.site_keys))
                if res is not None and res.status == 201:
                    self.board.counters.readings_posts += 1
                    last_t = t
                if dev.der_mup_href:
                    _, p_out, q_out = self.board.der_measurements(dev.index)
                    res = await self._req(dev, "POST", dev.der_mup_href,
                                          sc.der_readings_xml(dev.lfdi, t, p_out, q_out))
                    if res is not None and res.status == 201:
                        self.board.counters.readings_posts += 1
            await _sleep(stop, period)

    async def _head_loop(self, stop: asyncio.Event) -> None:
        """The head RTU's readings every post period (as the devices')."""
        period = self.s.post_rate_s / self.s.speed
        last_t = None
        while not stop.is_set():
            t, p, q = self.board.head_measurements()
            if self.head.mup_href and t is not None and t != last_t:
                res = await self._req(None, "POST", self.head.mup_href,
                                      sc.head_readings_xml(self.head.lfdi, t, p, q))
                if res is not None and res.status == 201:
                    self.board.counters.readings_posts += 1
                    last_t = t
            await _sleep(stop, period)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for dev in self.devices:
                if dev.events or dev.applied is not None:
                    if self.board.offline[dev.index]:
                        continue
                    self.evaluate(dev)
            await _sleep(stop, self.s.tick_s)

    async def _response_worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                dev, href, subject, code, created = await asyncio.wait_for(
                    self._responses.get(), 0.5)
            except TimeoutError:
                continue
            if not self._talking(dev):
                continue  # a silent device cannot answer (the server sees no response)
            res = await self._req(dev, "POST", href,
                                  sc.response_xml(dev.lfdi, subject, code, created))
            if res is not None and res.status == 201:
                self.board.counters.responses += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Discover, then poll, evaluate, respond and post until ``stop`` is set."""
        try:
            if self.listener is not None:
                await self.listener.start()
            await self.discover()
            tasks = [asyncio.create_task(self._tick_loop(stop))]
            if self.head is not None and self.s.mirror:
                await self._discover_head()
                tasks.append(asyncio.create_task(self._head_loop(stop)))
            tasks += [asyncio.create_task(self._response_worker(stop))
                      for _ in range(self.s.connections)]
            for dev in self.devices:
                tasks.append(asyncio.create_task(self._poll_loop(dev, stop)))
                if self.s.mirror:
                    tasks.append(asyncio.create_task(self._post_loop(dev, stop)))
            await asyncio.gather(*tasks)
        finally:
            self.board.counters.latency_s.extend(self.pool.latency_s)
            self.pool.close()
            if self.listener is not None:
                await self.listener.close()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), max(seconds, 0.0))
    except TimeoutError:
        pass
