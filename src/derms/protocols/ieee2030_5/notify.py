"""Notifications (IEEE 2030.5 §9.2): POST the subscribed resource to each subscriber's
``notificationURI`` when it changes.

A background thread renders every subscription's resource exactly as its subscriber would
GET it (the app's own handlers, with the subscriber's identity and ``l`` = the
subscription's limit) and compares it with what was last delivered; when it differs, a
``Notification`` (status 0, the resource inside as ``Resource xsi:type=…``) is POSTed. A pass
runs when the repository changed, a subscription is new or due for a retry, or the clock
passed the start or end of an event (which changes EventStatus); otherwise nothing is
rendered; after a change, only the subscriptions whose resource the changed keys can touch
(``changes_since`` of the repository: one device's controls, one program's default) are
rendered again. The first pass after a subscription is created delivers its current state.

Transport: HTTPS with mutual TLS — the server presents its own certificate and verifies the
receiver's certificate against the client CA; unless ``verify_subscriber`` is off, the
receiver's LFDI must be the subscriber's (so notifications only reach a holder of the
subscriber's key; no host name check, as device certificates carry none). A failed delivery
(connection error, non-2xx) is retried with exponential back-off (``retry_s`` doubling up to
``max_retry_s``). A resource the subscriber can no longer read gets one Notification with
status 4 (resource deleted) and the subscription is removed.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from lxml import etree

from derms.protocols.ieee2030_5 import mappers as m
from derms.protocols.ieee2030_5.http11 import Request
from derms.protocols.ieee2030_5.identity import ClientIdentity, lfdi_from_cert_der
from derms.protocols.ieee2030_5.model import SubscriptionRecord
from derms.protocols.ieee2030_5.sep_xml import MEDIA_TYPE, to_bytes
from derms.protocols.ieee2030_5.tls import TLS12_CIPHERS

log = logging.getLogger(__name__)


def notify_ssl_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """Client-side context for POSTing notifications: our certificate, the receiver's
    verified against ``client_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(client_ca))
    ctx.check_hostname = False  # identity is the certificate's LFDI, checked after connecting
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class DeliveryState:
    """Per subscription: what was last delivered and how the last attempt went."""

    digest: bytes | None = None
    attempts: int = 0  # consecutive failures
    next_try: float = 0.0  # monotonic seconds
    last_status: int | None = None  # HTTP status of the last attempt (None: no answer)
    last_error: str | None = None
    delivered: int = 0
    last_delivered: datetime | None = None


class SepNotifier:
    """Watch subscriptions of a :class:`~derms.protocols.ieee2030_5.app.SepApp` and deliver
    Notifications. ``start()`` runs :meth:`run_once` every ``period_s`` in a thread."""

    def __init__(self, app, ssl_context: ssl.SSLContext, *, period_s: float = 0.5,
                 timeout_s: float = 5.0, retry_s: float = 2.0, max_retry_s: float = 300.0,
                 workers: int = 4, verify_subscriber: bool = True,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.repo = app.repo
        self._ctx = ssl_context
        self.period_s, self.timeout_s = period_s, timeout_s
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.verify_subscriber = verify_subscriber
        self._monotonic = monotonic
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sep-notify")
        self._state: dict[int, DeliveryState] = {}
        self._deps_cache: dict[int, frozenset | None] = {}
        self._seen_version: int | None = None
        self._next_edge_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ieee2030_5-notifier",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.run_once()
            except Exception:  # keep notifying the others; the next pass retries
                log.exception("event=ieee2030_5_notify_pass_failed")

    def status(self) -> dict[int, DeliveryState]:
        """Delivery state per subscription id (for the management API)."""
        return dict(self._state)

    # --- one pass -------------------------------------------------------------------------------
    def _next_edge(self, now_s: int, keys: frozenset | None = None) -> float:
        """Epoch seconds of the next start or end of an event (EventStatus changes then):
        of every control, or only of those in the audiences ``keys`` names."""
        if keys is None:
            controls = [c for p in self.repo.programs() for c in self.repo.controls(p.program_id)]
        else:
            controls = self.repo.audience_controls(
                [k[1:] for k in keys if k and k[0] == "controls"])
        edges = [t for c in controls
                 for t in (m.epoch(c.start), m.epoch(c.start) + c.duration_s) if t > now_s]
        return float(min(edges, default=2**62))

    def run_once(self) -> int:
        """Check every subscription that may have changed and deliver; returns the number of
        Notifications delivered (2xx) in this pass."""
        subs = self.repo.subscriptions()
        live = {s.subscription_id for s in subs}
        for gone in set(self._state) - live:
            del self._state[gone]
            self._deps_cache.pop(gone, None)
        version = self.repo.version
        now_s = m.epoch(self.app._clock())
        mono = self._monotonic()
        edge = now_s >= self._next_edge_s
        keys: frozenset | None = frozenset()
        if version != self._seen_version:
            since = getattr(self.repo, "changes_since", None)
            keys = (since(self._seen_version) if since is not None
                    and self._seen_version is not None else None)
        if edge or keys is None:  # every control's edges (a scan of all of them)
            self._next_edge_s = self._next_edge(now_s)
        elif keys:  # only the changed audiences' controls can bring a new, earlier edge
            self._next_edge_s = min(self._next_edge_s, self._next_edge(now_s, keys))
        self._seen_version = version
        fresh = DeliveryState()

        def touched(sub: SubscriptionRecord) -> bool:
            if edge or keys is None:
                return True
            if not keys:
                return False
            deps = self._deps(sub)
            return deps is None or bool(deps & keys)

        due = [s for s in subs
               if (touched(s) or self._state.get(s.subscription_id, fresh).digest is None
                   or self._state.get(s.subscription_id, fresh).attempts > 0)
               and self._state.get(s.subscription_id, fresh).next_try <= mono]
        jobs = []
        for sub in due:
            body, status = self._render(sub)
            state = self._state.setdefault(sub.subscription_id, DeliveryState())
            digest = hashlib.sha256(body).digest()
            if status == m.NOTIFY_CHANGED and digest == state.digest:
                continue
            jobs.append((sub, state, digest, status,
                         self._pool.submit(self._deliver, sub, body)))
        delivered = 0
        for sub, state, digest, status, future in jobs:
            code, error = future.result()
            state.last_status, state.last_error = code, error
            if code is not None and 200 <= code < 300:
                state.digest, state.attempts, state.next_try = digest, 0, 0.0
                state.delivered += 1
                state.last_delivered = datetime.now(UTC)
                delivered += 1
                if status == m.NOTIFY_DELETED:
                    self.repo.delete_subscription(sub.subscription_id)
            else:
                state.attempts += 1
                state.next_try = mono + min(self.retry_s * 2 ** (state.attempts - 1),
                                            self.max_retry_s)
                log.info("event=ieee2030_5_notify_failed subscription=%d uri=%s status=%s "
                         "error=%s attempts=%d", sub.subscription_id, sub.notification_uri,
                         code, error, state.attempts)
        return delivered

    def _deps(self, sub: SubscriptionRecord) -> frozenset | None:
        """The repository change keys (``changes_since``) that can alter what ``sub``
        renders; None: any change (lists of end devices, function sets, programs)."""
        if sub.subscription_id in self._deps_cache:
            return self._deps_cache[sub.subscription_id]
        name = self.app._route_name(sub.subscribed_resource)
        deps: frozenset | None = None
        if name in ("controls", "active_controls", "default_control"):
            edev_id, program_id = self.app._route(sub.subscribed_resource)[1][:2]
            if name == "default_control":
                deps = frozenset({("default", program_id)})
            else:
                rec = self.repo.end_device(edev_id)
                nmi = rec.nmi if rec is not None else None
                deps = frozenset({("controls", program_id, "all", None),
                                  ("controls", program_id, "edev", edev_id),
                                  ("controls", program_id, "cp", nmi)})
        self._deps_cache[sub.subscription_id] = deps
        return deps

    def _render(self, sub: SubscriptionRecord) -> tuple[bytes, int]:
        """(Notification body, its status): the resource as the subscriber sees it now."""
        owner = ClientIdentity(lfdi=sub.owner_lfdi, sfdi=0, cert_der=b"")
        request = Request("GET", sub.subscribed_resource, {"l": str(sub.limit)}, {}, b"", owner)
        response = self.app(request)
        href = self.app.paths.subscription(sub.edev_id, sub.subscription_id)
        if getattr(response, "status", None) != 200:
            return to_bytes(m.notification(sub, href, None, m.NOTIFY_DELETED)), m.NOTIFY_DELETED
        resource = etree.fromstring(response.body)
        return to_bytes(m.notification(sub, href, resource)), m.NOTIFY_CHANGED

    def _deliver(self, sub: SubscriptionRecord, body: bytes) -> tuple[int | None, str | None]:
        parts = urlsplit(sub.notification_uri)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443,
                                           context=self._ctx, timeout=self.timeout_s)
        try:
            conn.connect()
            if self.verify_subscriber:
                peer = lfdi_from_cert_der(conn.sock.getpeercert(binary_form=True))
                if peer != sub.owner_lfdi:
                    return None, f"receiver certificate LFDI {peer} is not the subscriber's"
            conn.request("POST", path, body=body, headers={"Content-Type": MEDIA_TYPE,
                                                           "Content-Length": str(len(body))})
            resp = conn.getresponse()
            resp.read()
            return resp.status, None
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
