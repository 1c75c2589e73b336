"""The simulation loop: physics on the calling thread, the IEEE 2030.5 agents on an
asyncio loop in one background thread, the :class:`ControlBoard` between them.

The OpenDSS engine is created, used and closed on the calling thread only (dss-python
contexts must stay on one thread, docs/ARCHITECTURE.md). Each step of ``step_s`` simulated
seconds is paced to ``step_s / speed`` wall seconds (when the physics is slower, the run
falls behind and says so: ``lag_s``). Per step: scenario values → effective controls
(events, or the default control after a communication loss) → fleet step (terminal
voltages of the previous solve) → twin solve → measurements onto the board → one row of
the time series.

Clock: simulated time ``t`` drives the profiles (load shapes, the sun, the scenario). The
measurements the devices mirror are stamped with ``t`` in an offline run (future-dated
above speed 1), but with the **wall-clock UTC** time of the step when ``wall_clock`` is set
(the default with ``feeder_id``, i.e. against a live DERMS whose control loop judges
staleness by its own clock). Against a control loop with a 5 s cycle, run at ``speed`` 1
with a 1 s step (or a faster profile clock: the stamps stay wall-clock either way).

Control mode (``feeder_id``): the devices are registered on that feeder of the DERMS
(sites with bus and phase, meters with bus and phase), each device mirrors its own output
on a DER usage point (the loop's telemetry, under its ``der_id``), the site usage point
mirrors only the voltage (a net site power would read as the customer load to the loop's
estimator, which adds the DER it already sees), a feeder-head RTU behind the first
aggregator mirrors per-phase P/Q at the head (meter ``<feeder_id>-head``: head SCADA), and
the twin's regulators and capacitors are settled once on the base case and then held, as
the loop's model holds them (no tap SCADA reaches the DERMS yet).
"""

from __future__ import annotations

import asyncio
import json
import random
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from derms.errors import InputError
from derms.grid.bundled import resolve_master
from derms.sim import fleet as F
from derms.sim.board import ControlBoard
from derms.sim.placement import place_fleet
from derms.sim.scenario import Scenario, Timeline
from derms.sim.twin import FeederTwin
from derms.studies.profiles_library import clear_sky_pv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SepEndpoint:
    """Where and as whom the agents connect: aggregator (name, cert, key, LFDI) tuples."""

    host: str
    port: int
    ca: Path
    aggregators: tuple[tuple[str, Path, Path, str], ...]
    dcap_path: str = "/dcap"
    connections: int = 2


@dataclass(frozen=True)
class SimConfig:
    feeder: str = "ieee123"
    devices: int = 50
    seed: int = 0
    speed: float = 60.0
    duration_s: float = 3600.0
    step_s: float = 60.0
    start: datetime | None = None  # default: the current minute (UTC)
    utc_offset_h: float = -8.0
    latitude_deg: float = 37.0
    longitude_deg: float = -120.0
    comm_timeout_s: float = 900.0  # simulated s without contact before the fail-safe
    post_rate_s: int = 300
    poll_rate_s: float | None = None
    subscribe: bool = False  # IEEE 2030.5 subscriptions: controls arrive by Notification
    volt_watt: bool = False
    mix: dict[str, float] | None = None
    scenario: Scenario = field(default_factory=Scenario)
    #: the DERMS feeder the fleet is registered on (control mode, module docstring)
    feeder_id: str | None = None
    #: stamp readings with wall-clock UTC (None: when ``feeder_id`` is set)
    wall_clock: bool | None = None
    #: how readings reach the DERMS: "ieee2030_5" (MirrorUsagePoints) or "mqtt" (the MQTT
    #: ingest, :mod:`derms.sim.mqtt_telemetry`); controls come over IEEE 2030.5 either way
    telemetry: str = "ieee2030_5"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_topic_root: str = "derms/v1"

    @property
    def stamps_wall_clock(self) -> bool:
        return self.feeder_id is not None if self.wall_clock is None else self.wall_clock

    def __post_init__(self) -> None:
        if self.telemetry not in ("ieee2030_5", "mqtt"):
            raise InputError(f"--telemetry {self.telemetry!r}: expected ieee2030_5 or mqtt")
        if not self.speed > 0:
            raise InputError(f"--speed must be > 0, got {self.speed}")
        if not 1 <= self.step_s <= 3600:
            raise InputError(f"--step must be within 1 s .. 1 h, got {self.step_s} s")
        if not self.duration_s >= self.step_s:
            raise InputError(f"--duration ({self.duration_s} s) is shorter than --step "
                             f"({self.step_s} s)")
        if self.devices < 1:
            raise InputError(f"--devices must be >= 1, got {self.devices}")


@dataclass
class SimResult:
    timeseries: pd.DataFrame
    devices: pd.DataFrame
    summary: dict


class ProtocolThread:
    """The agents' asyncio loop in a daemon thread; ``stop()`` ends and joins it."""

    def __init__(self, make_aggregators: Callable[[], list]) -> None:
        self._make = make_aggregators
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="derms-sim-agents",
                                        daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.aggregators: list = []

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported to the physics thread
            self.error = exc
            self.ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.aggregators = self._make()
        runs = [asyncio.create_task(a.run(self._stop)) for a in self.aggregators]
        waiter = asyncio.create_task(self._discovered())
        await asyncio.gather(*runs)
        waiter.cancel()

    async def _discovered(self) -> None:
        """Ready once every device's discovery walk has ended (well or not)."""
        total = sum(len(a.devices) for a in self.aggregators)
        while sum(a.walked for a in self.aggregators) < total:
            await asyncio.sleep(0.05)
        self.ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop already ended (the server was unreachable):
                pass              # its error, not this one, is what the user must see
        self._thread.join(timeout=30)


def run_sim(config: SimConfig, *, sep: SepEndpoint | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            on_fleet: Callable[..., None] | None = None,
            discovery_timeout_s: float = 120.0) -> SimResult:
    """Run the simulation (see module docstring). ``on_fleet`` is called once the fleet is
    placed, before the agents start (the pre-registration hook); ``sep``
    None runs the physics alone (devices on their native behaviour); ``on_fleet(spec,
    lfdis, buses, info)`` gets each device's LFDI and bus, and ``info``: ``phases`` (each
    device's phase letters, e.g. ``a``, ``abc``), ``head_lfdi`` (the head RTU's LFDI in
    control mode, else None), ``head_bus`` (the source bus)."""
    cfg = config
    master = resolve_master(cfg.feeder)
    start = cfg.start or datetime.now(UTC).replace(second=0, microsecond=0)
    n_steps = int(cfg.duration_s // cfg.step_s)
    twin = FeederTwin(master, seed=cfg.seed, utc_offset_h=cfg.utc_offset_h,
                      overload_buses=cfg.scenario.overload_buses,
                      frozen_controls=cfg.feeder_id is not None,
                      check_violations=cfg.feeder_id is not None)
    proto: ProtocolThread | None = None
    phases: dict[str, float] = {}
    try:
        for ev in cfg.scenario.events:
            if getattr(ev, "kind", "") == "switch" and not twin.has_element(ev.element):
                raise InputError(f"scenario: switch element {ev.element!r} is not in the "
                                 "feeder")
        spec = place_fleet(twin.base_kw, cfg.devices, seed=cfg.seed, mix=cfg.mix,
                           volt_watt=cfg.volt_watt)
        timeline = Timeline(cfg.scenario, spec.der_id, spec.kind, seed=cfg.seed)
        board = ControlBoard(spec.n)
        lfdis: list[str] = []
        if sep is not None:
            from derms.sim.agents import AgentSettings, Aggregator, DeviceAgent
            from derms.sim.notify_listener import listener_ssl_context
            from derms.sim.sep_client import client_ssl_context, device_lfdi

            k_agg = len(sep.aggregators)
            owner = np.arange(spec.n) % k_agg
            lfdis = [device_lfdi(sep.aggregators[owner[i]][3], spec.der_id[i])
                     for i in range(spec.n)]
            head_lfdi = (device_lfdi(sep.aggregators[0][3], "feeder-head")
                         if cfg.feeder_id is not None else None)
            t_reg = time.monotonic()
            if on_fleet is not None:
                on_fleet(spec, lfdis, [twin.loads[i].bus for i in spec.load_index],
                         _fleet_info(twin, spec, head_lfdi))
            phases["registration_s"] = time.monotonic() - t_reg
            settings = AgentSettings(speed=cfg.speed, post_rate_s=cfg.post_rate_s,
                                     poll_rate_s=cfg.poll_rate_s,
                                     connections=sep.connections, dcap_path=sep.dcap_path,
                                     subscribe=cfg.subscribe,
                                     site_keys=("v",) if cfg.feeder_id else ("p", "q", "v"),
                                     der_mirror=cfg.feeder_id is not None,
                                     head_phases=twin.n_source_phases,
                                     mirror=cfg.telemetry == "ieee2030_5")

            def make() -> list:
                aggs = []
                for a, (name, cert, key, _lfdi) in enumerate(sep.aggregators):
                    ctx = client_ssl_context(sep.ca, cert, key)
                    lctx = listener_ssl_context(sep.ca, cert, key) if cfg.subscribe else None
                    devs = [DeviceAgent(int(i), str(spec.der_id[i]), lfdis[i],
                                        rand=random.Random(cfg.seed * 7919 + int(i)))
                            for i in np.flatnonzero(owner == a)]
                    head = (DeviceAgent(-1, "feeder-head", head_lfdi)
                            if a == 0 and head_lfdi is not None else None)
                    aggs.append(Aggregator(name, sep.host, sep.port, ctx, devs, board,
                                           settings, listener_ctx=lctx, head=head))
                return aggs

            proto = ProtocolThread(make)
            t_disc = time.monotonic()
            proto.start()
            if not proto.ready.wait(discovery_timeout_s):
                raise InputError(f"IEEE 2030.5 server {sep.host}:{sep.port}: discovery of "
                                 f"{spec.n} devices not done within {discovery_timeout_s} s")
            if proto.error is not None:
                raise InputError(f"IEEE 2030.5 server {sep.host}:{sep.port}: "
                                 f"{proto.error}") from None
            phases["discovery_s"] = time.monotonic() - t_disc
            phases["discovery_requests"] = board.counters.requests
        elif on_fleet is not None:
            on_fleet(spec, lfdis, [twin.loads[i].bus for i in spec.load_index],
                     _fleet_info(twin, spec, None))
        if cfg.telemetry == "mqtt":
            from derms.sim.mqtt_telemetry import MqttTelemetry

            mqtt_out = MqttTelemetry(cfg.mqtt_host, cfg.mqtt_port, cfg.mqtt_topic_root,
                                     client_id=f"derms-sim-{cfg.seed}-{time.time_ns()}")
        else:
            mqtt_out = None
        try:
            rows, devices = _loop(cfg, twin, spec, timeline, board, start, n_steps,
                                  on_progress, mqtt_out)
        finally:
            if mqtt_out is not None:
                phases["mqtt_readings"] = mqtt_out.published
                mqtt_out.close()
    finally:
        if proto is not None:
            proto.stop()
        twin.close()
    ts = pd.DataFrame(rows)
    c = board.counters
    lat = np.array(c.latency_s) if c.latency_s else np.zeros(1)
    summary = {
        "feeder": str(master), "devices": int(spec.n), "seed": cfg.seed, "speed": cfg.speed,
        "step_s": cfg.step_s, "steps": int(len(ts)), "start": start.isoformat(),
        "feeder_id": cfg.feeder_id, "wall_clock_stamps": cfg.stamps_wall_clock,
        "kinds": {k: int((spec.kind == j).sum()) for j, k in enumerate(F.KINDS)},
        "physics_step_ms": _stats(ts["step_ms"].to_numpy()) if len(ts) else {},
        "max_lag_s": float(ts["lag_s"].max()) if len(ts) else 0.0,
        "protocol": None if sep is None else {
            "aggregators": len(sep.aggregators), "connections_each": sep.connections,
            "requests": c.requests, "errors": c.errors, "polls": c.polls,
            "notifications": c.notifications, "subscribe": cfg.subscribe,
            "responses": c.responses, "readings_posts": c.readings_posts,
            "discovered": c.discovered, "latency_ms": _stats(lat * 1e3),
            **phases,
            "error": None if proto is None or proto.error is None else repr(proto.error),
            "requests_per_wall_s_while_stepping": (
                c.requests - phases.get("discovery_requests", 0)) / max(
                    float(ts["wall_s"].max()) + cfg.step_s / cfg.speed, 1e-9)
            if len(ts) else 0.0,
        },
    }
    return SimResult(ts, devices, summary)


def _stats(x: np.ndarray) -> dict:
    return {"median": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "max": float(np.max(x))}


def _loop(cfg: SimConfig, twin: FeederTwin, spec: F.FleetSpec, timeline: Timeline,
          board: ControlBoard, start: datetime, n_steps: int,
          on_progress: Callable[[int, int], None] | None, mqtt_out=None):
    state = F.FleetState.initial(spec)
    v_dev = np.ones(spec.n)
    kind = spec.kind
    is_pv, is_flex = kind == F.PV, kind == F.FLEX
    li = spec.load_index
    bus_v_base = np.array([twin.model.bus(ld.bus).kv_base_ln * 1000.0 for ld in twin.loads])
    base_v = bus_v_base[li]  # volts per pu at each device's terminal (line to neutral)
    wall0 = time.monotonic()
    epoch0 = time.time()
    rows = []
    for k in range(n_steps):
        t = start + timedelta(seconds=k * cfg.step_s)
        t_s = k * cfg.step_s
        due = wall0 + t_s / cfg.speed
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        lag = max(0.0, -pause)
        t0 = time.perf_counter()
        for sw in timeline.switching_due(t_s):
            twin.set_switch(sw.element, sw.closed)
        dropped, silenced = timeline.dropped(t_s), timeline.comm_lost(t_s)
        controls, fallback = board.effective(cfg.speed, cfg.comm_timeout_s)
        shape = twin.load_shape(t)
        load_mult = shape * timeline.load_multiplier(t_s)
        house_kw = twin.base_kw[li] * load_mult[li] * spec.house_share
        sun = clear_sky_pv(pd.DatetimeIndex([pd.Timestamp(t)]), cfg.step_s / 3600,
                           cfg.latitude_deg, cfg.longitude_deg)[0]
        cloud = timeline.cloud(t_s)
        pv_avail = np.where(is_pv, spec.p_max_kw * sun * cloud * _derate(spec), 0.0)
        flex_base = np.where(is_flex, spec.p_max_kw * spec.flex_frac * shape[li], 0.0)
        local_hour = ((t.hour + t.minute / 60 + cfg.utc_offset_h) % 24.0)
        state.online = ~dropped
        inputs = F.StepInputs(pv_avail, house_kw, flex_base, v_dev, local_hour)
        state = F.step_fleet(spec, state, controls, inputs, cfg.step_s)
        der_p = np.bincount(li, weights=-state.p_out_kw, minlength=twin.n_loads)
        der_q = np.bincount(li, weights=-state.q_out_kvar, minlength=twin.n_loads)
        res = twin.step(load_mult, der_p, der_q, timeline.overload_kw(t_s))
        v_dev = res.v_load_pu[li]
        site_p = house_kw - state.p_out_kw
        site_q = -state.q_out_kvar  # the house load's own reactive power is left out
        stamp = int(time.time()) if cfg.stamps_wall_clock else int(t.timestamp())
        board.publish(stamp, site_p * 1000, site_q * 1000, v_dev * base_v, silenced, dropped,
                      der_p_w=state.p_out_kw * 1000, der_q_var=state.q_out_kvar * 1000,
                      head_p_w=None if res.head_p_phase_kw is None else res.head_p_phase_kw * 1000,
                      head_q_var=None if res.head_q_phase_kvar is None
                      else res.head_q_phase_kvar * 1000)
        if mqtt_out is not None and (t_s % cfg.post_rate_s) < cfg.step_s:
            der_ids = [f"sim-{d}" for d in spec.der_id]  # as provision.register_fleet
            mqtt_out.publish(
                stamp, der_ids, -state.p_out_kw, -state.q_out_kvar,
                [f"{d}-site"[:32] for d in der_ids], v_dev * base_v, ~(dropped | silenced),
                head_id=f"{cfg.feeder_id}-head" if cfg.feeder_id else None,
                head_p_kw=res.head_p_phase_kw, head_q_kvar=res.head_q_phase_kvar)
        step_ms = (time.perf_counter() - t0) * 1e3
        has_exp = ~np.isnan(controls.exp_lim_kw)
        over = (-site_p - controls.exp_lim_kw)[has_exp & ~dropped]
        rows.append({
            "t": t, "wall_s": time.monotonic() - wall0,
            "wall_time": datetime.fromtimestamp(epoch0 + (time.monotonic() - wall0), UTC),
            "head_p_kw": res.head_p_kw, "head_q_kvar": res.head_q_kvar,
            "v_min_pu": res.v_min_pu, "v_max_pu": res.v_max_pu, "load_kw": res.load_kw,
            "der_p_out_kw": float(state.p_out_kw.sum()),
            "der_q_out_kvar": float(state.q_out_kvar.sum()),
            **{f"{name}_p_out_kw": float(state.p_out_kw[kind == j].sum())
               for j, name in enumerate(F.KINDS)},
            "pv_avail_kw": float(pv_avail.sum()),
            "site_export_kw": float(np.maximum(-site_p, 0).sum()),
            "active_controls": int(board.event_active.sum()),
            "limited_devices": int(controls.active().sum()),
            "fallback_devices": int(fallback.sum()),
            "export_over_limit_kw": float(over.max()) if over.size else 0.0,
            "online_devices": int((~dropped).sum()), "silenced_devices": int(silenced.sum()),
            "cloud": cloud, "load_multiplier": timeline.load_multiplier(t_s),
            "overload_kw": float(timeline.overload_kw(t_s).sum()),
            "step_ms": step_ms, "lag_s": lag,
            **({} if res.violations is None else {
                "der_violations": res.violations.count,
                "der_overvoltage": res.violations.n_overvoltage,
                "der_undervoltage": res.violations.n_undervoltage,
                "der_thermal": res.violations.n_thermal,
                "der_v_excess_pu": res.violations.v_excess_pu,
                "der_loading_excess_pct": res.violations.loading_excess_pct,
                "der_violated": " ".join(res.violations.elements)}),
        })
        if on_progress is not None:
            on_progress(k + 1, n_steps)
    devices = pd.DataFrame({
        "der_id": spec.der_id.astype(str), "kind": [F.KINDS[j] for j in kind],
        "load": [twin.loads[i].name for i in li], "bus": [twin.loads[i].bus for i in li],
        "s_kva": spec.s_kva, "p_max_kw": spec.p_max_kw, "e_max_kwh": spec.e_max_kwh,
        "house_peak_kw": twin.base_kw[li] * spec.house_share,
        "final_p_out_kw": state.p_out_kw, "final_q_out_kvar": state.q_out_kvar,
        "final_soc_frac": F.soc_frac(spec, state), "final_v_pu": v_dev,
    })
    return rows, devices


_LETTER = {1: "a", 2: "b", 3: "c"}
_PHASES = {"a", "b", "c", "ab", "bc", "ca", "abc"}


def _phase_letters(nodes) -> str:
    """Phase letters of a load's nodes as the DERMS registry spells them (``ac`` → ``ca``;
    no phase node: ``abc``)."""
    text = "".join(_LETTER[n] for n in sorted(set(nodes)) if n in _LETTER) or "abc"
    return text if text in _PHASES else "ca"


def _fleet_info(twin: FeederTwin, spec: F.FleetSpec, head_lfdi: str | None) -> dict:
    return {"phases": [_phase_letters(twin.loads[i].nodes) for i in spec.load_index],
            "head_lfdi": head_lfdi, "head_bus": twin.source_bus}


def _derate(spec: F.FleetSpec) -> np.ndarray:
    """Per-system PV derate U(0.75, 1.0) (orientation, soiling), fixed by device order."""
    return 0.75 + 0.25 * np.random.default_rng(12345).uniform(size=spec.n)


def write_outputs(result: SimResult, folder: Path) -> list[Path]:
    """``timeseries.csv`` / ``.parquet``, ``devices.csv``, ``summary.json`` and
    ``report.html`` (plotly) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ts = result.timeseries
    ts.to_csv(folder / "timeseries.csv", index=False)
    ts.to_parquet(folder / "timeseries.parquet", index=False)
    result.devices.to_csv(folder / "devices.csv", index=False)
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str))
    _report(result, folder / "report.html")
    return [folder / n for n in ("timeseries.csv", "timeseries.parquet", "devices.csv",
                                 "summary.json", "report.html")]


def _report(result: SimResult, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs
    from plotly.subplots import make_subplots

    ts = result.timeseries
    viol = "der_violations" in ts.columns
    titles = ("Feeder head (import +)", "Voltage range [pu]",
              "DER output by kind (generation +)", "Devices under control")
    if viol:
        titles += ("Violations the devices cause (node-phases and conductors)",)
    fig = make_subplots(rows=len(titles), cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=titles)
    x = ts["t"]
    for col, name in (("head_p_kw", "P [kW]"), ("head_q_kvar", "Q [kvar]")):
        fig.add_trace(go.Scatter(x=x, y=ts[col], name=name), row=1, col=1)
    for col in ("v_min_pu", "v_max_pu"):
        fig.add_trace(go.Scatter(x=x, y=ts[col], name=col), row=2, col=1)
    for col in [c for c in ts.columns if c.endswith("_p_out_kw") and c != "der_p_out_kw"]:
        fig.add_trace(go.Scatter(x=x, y=ts[col], name=col, stackgroup="der"), row=3, col=1)
    fig.add_trace(go.Scatter(x=x, y=ts["pv_avail_kw"], name="PV available",
                             line={"dash": "dot"}), row=3, col=1)
    for col in ("active_controls", "fallback_devices", "online_devices"):
        fig.add_trace(go.Scatter(x=x, y=ts[col], name=col), row=4, col=1)
    if viol:
        for col in ("der_overvoltage", "der_undervoltage", "der_thermal"):
            fig.add_trace(go.Scatter(x=x, y=ts[col], name=col), row=5, col=1)
    fig.update_layout(height=1100 + (250 if viol else 0),
                      title=f"derms sim: {result.summary['devices']} devices")
    s = json.dumps(result.summary, indent=2, default=str)
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>derms sim</title>"
            f"<script>{get_plotlyjs()}</script></head><body style='font-family:sans-serif'>"
            f"{fig.to_html(full_html=False, include_plotlyjs=False)}"
            f"<h2>Summary</h2><pre>{s}</pre></body></html>")
    path.write_text(html, encoding="utf-8")
