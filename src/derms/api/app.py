"""The FastAPI application: ``create_app(settings)`` builds it; nothing is built at import.

Routes (``/v1``): readings (bulk ingest JSON/CSV, time-range query with downsampling),
devices and feeders (registry), plus ``/health``, ``/ready`` and ``/metrics``. Every
route but those three needs a bearer token (:mod:`derms.api.auth`); every error is
problem+json (:mod:`derms.api.problems`).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from sqlalchemy import text

from derms.api import problems
from derms.api.auth import TokenRecord
from derms.api.engine_pool import EnginePool
from derms.api.gate import RequestGate
from derms.api.placement import ElementsCache
from derms.api.routes_adms import router as adms_router
from derms.api.routes_capacity import router as capacity_router
from derms.api.routes_constraints import router as constraints_router
from derms.api.routes_control_loop import router as control_loop_router
from derms.api.routes_dispatch import router as dispatch_router
from derms.api.routes_forecasts import router as forecasts_router
from derms.api.routes_ieee2030_5 import router as ieee2030_5_router
from derms.api.routes_ieee2030_5_dispatch import router as ieee2030_5_dispatch_router
from derms.api.routes_ieee2030_5_envelopes import router as ieee2030_5_envelopes_router
from derms.api.routes_ieee2030_5_events import router as ieee2030_5_events_router
from derms.api.routes_models import router as models_router
from derms.api.routes_readings import router as readings_router
from derms.api.routes_registry import router as registry_router
from derms.api.routes_state import router as state_router
from derms.config import Settings
from derms.ingest.store_sink import StoreSink
from derms.monitoring.forecasting import ForecastService
from derms.store.db import make_engine, make_session_factory
from derms.store.migrate import current_revision, head_revision
from derms.store.models import ApiToken

log = logging.getLogger(__name__)


class Metrics:
    """Prometheus metrics of one app (own registry: several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("derms_http_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("derms_http_request_seconds", "HTTP request latency",
                                 ["route"], registry=self.registry)
        self.readings = Counter("derms_readings_ingested_total", "Readings accepted",
                                ["path"], registry=self.registry)
        self.inserted = Counter("derms_readings_inserted_total", "Readings newly stored",
                                ["path"], registry=self.registry)

    def watch_mqtt(self, ingest) -> None:
        """Expose an MQTT ingest's counters (read at each scrape): messages acknowledged
        and rejected, readings written and newly stored, messages received and not yet
        handled, and the broker's own rate of dropped messages (Mosquitto ``$SYS``,
        broker-wide: above 0, a session's queue is full somewhere)."""
        self.registry.register(_MqttCollector(ingest))


class _MqttCollector:
    def __init__(self, ingest) -> None:
        self.ingest = ingest

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.ingest.stats
        for name, doc, value in (
                ("derms_mqtt_messages",
                 "MQTT telemetry messages acknowledged (after their commit, or refused)",
                 st.messages),
                ("derms_mqtt_messages_rejected",
                 "MQTT telemetry messages refused (reported on the errors topic)", st.rejected),
                ("derms_mqtt_readings", "Readings written from MQTT", st.readings),
                ("derms_mqtt_readings_inserted", "Readings from MQTT newly stored", st.inserted)):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("derms_mqtt_queue_messages", "MQTT messages received and not "
                                "yet handled", value=self.ingest.queued())
        if st.broker_dropped_per_min is not None:
            yield GaugeMetricFamily("derms_mqtt_broker_dropped_per_minute", "The broker's "
                                    "1-minute rate of dropped messages (broker-wide)",
                                    value=st.broker_dropped_per_min)


def create_app(settings: Settings) -> FastAPI:
    """Build the API for ``settings`` (database URL, limits)."""
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        pool.close()
        engine.dispose()

    app = FastAPI(title="derms", version="0.1.0", lifespan=lifespan,
                  description="Distributed Energy Resource Management System API")
    problems.install(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.engine_pool = pool = EnginePool()  # OpenDSS work of requests, in a process
    app.state.sessions = make_session_factory(engine)
    # model versions' buses and transformers, read once each (registration checks)
    app.state.model_elements = ElementsCache()
    app.state.sink = StoreSink(engine)
    app.state.metrics = metrics = Metrics()
    app.state.monitor = None  # a derms.monitoring.MonitorLoop when `derms serve` runs one
    app.state.forecasts = ForecastService(settings, engine)  # shared by the API and the schedule
    app.state.forecast_schedule = None  # a ForecastSchedule when `derms serve` runs one

    def token_lookup(token_id: str) -> TokenRecord | None:
        with app.state.sessions() as session:
            tok = session.get(ApiToken, token_id)
            if tok is None:
                return None
            return TokenRecord(tok.token_id, tok.secret_sha256, tok.scope, bool(tok.revoked))

    app.state.token_lookup = token_lookup
    app.add_middleware(RequestGate, max_body_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    @app.api_route("/health", methods=["GET", "HEAD"], tags=["operations"])
    def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"], tags=["operations"])
    def ready() -> dict:
        """Readiness: the database answers and its schema is at this version's head."""
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            rev, head = current_revision(settings.database_url), head_revision()
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            raise problems.Problem(503, f"database not reachable: {type(exc).__name__}") from None
        if rev != head:
            raise problems.Problem(503, f"database schema at {rev}, expected {head}: "
                                        "run `derms db upgrade`")
        return {"status": "ready", "schema": rev, "time": datetime.now().astimezone().isoformat()}

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus metrics."""
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    app.include_router(readings_router, prefix="/v1")
    app.include_router(registry_router, prefix="/v1")
    app.include_router(models_router, prefix="/v1")  # feeder model versions
    app.include_router(state_router, prefix="/v1")
    app.include_router(forecasts_router, prefix="/v1")
    app.include_router(constraints_router, prefix="/v1")
    app.include_router(dispatch_router, prefix="/v1")
    app.include_router(capacity_router, prefix="/v1")
    app.include_router(ieee2030_5_events_router, prefix="/v1")
    app.include_router(ieee2030_5_dispatch_router, prefix="/v1")
    app.include_router(ieee2030_5_envelopes_router, prefix="/v1")
    app.include_router(ieee2030_5_router, prefix="/v1")  # app.state.ieee2030_5_repo: serve
    app.include_router(adms_router, prefix="/v1")  # ADMS interface, operator overrides
    app.include_router(control_loop_router, prefix="/v1")  # control loop, tracked commands
    return app
