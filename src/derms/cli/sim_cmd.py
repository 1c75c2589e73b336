"""``derms sim``: the digital-twin feeder with a simulated DER fleet (see derms.sim)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from derms.cli.common import (
    ForceOpt,
    err_console,
    handle_errors,
    out_console,
    output_folder,
    parse_start,
)
from derms.errors import InputError
from derms.timeutil import parse_duration


def _endpoint(text: str, option: str = "--ieee2030-5") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{option} {text!r}: expected HOST:PORT (e.g. 127.0.0.1:8443)")
    return host.strip("[]"), int(port)


def _mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--mix {text!r}: expected kind=share pairs, e.g. "
                             "pv=0.6,battery=0.2,ev=0.15,flex=0.05") from None
        if not eq:
            raise InputError(f"--mix {text!r}: expected kind=share pairs")
    return out


@handle_errors
def sim(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")],
    feeder: Annotated[str, typer.Option(
        help="Bundled feeder (ieee13, ieee123, ieee8500) or an OpenDSS master file.")
    ] = "ieee123",
    devices: Annotated[int, typer.Option(min=1, max=200_000, help="Simulated devices.")] = 50,
    seed: Annotated[int, typer.Option(min=0, help="Placement, sizes, shapes, randomisation.")] = 0,
    speed: Annotated[float, typer.Option(
        min=0.001, help="Simulated seconds per wall-clock second (60: an hour per minute).")
    ] = 60.0,
    duration: Annotated[str, typer.Option(help="Simulated time, e.g. 2h, 30min.")] = "1h",
    step: Annotated[str, typer.Option(help="Simulation step, e.g. 60s, 5min.")] = "60s",
    start: Annotated[str | None, typer.Option(
        help="Simulated start (ISO 8601, UTC unless zoned); default: now.")] = None,
    scenario: Annotated[Path | None, typer.Option(
        help="Scripted events (JSON; see derms.sim.scenario).")] = None,
    ieee2030_5: Annotated[str | None, typer.Option(
        "--ieee2030-5", help="HOST:PORT of the DERMS's IEEE 2030.5 listener; without it "
                             "the devices run on their own (no protocol).")] = None,
    dcap_path: Annotated[str, typer.Option(help="Path of DeviceCapability.")] = "/dcap",
    pki: Annotated[Path | None, typer.Option(
        help="Folder with ca.pem/ca.key and the aggregators' certificates (created if "
             "missing; the server must trust its ca.pem).")] = None,
    aggregators: Annotated[int | None, typer.Option(
        min=1, help="Aggregator clients (default: one per 500 devices).")] = None,
    connections: Annotated[int, typer.Option(
        min=1, max=64, help="Keep-alive TLS connections per aggregator.")] = 2,
    api: Annotated[str | None, typer.Option(
        help="derms API URL (http://host:port): pre-register the fleet's end devices, DER "
             "devices and meters first.")] = None,
    token: Annotated[str | None, typer.Option(
        envvar="DERMS_TOKEN", help="API token with scope admin (or DERMS_TOKEN).")] = None,
    fsa_id: Annotated[list[int] | None, typer.Option(
        "--fsa-id", help="Function set assignment(s) for the end devices (repeatable; "
                         "default: a new program and FSA).")] = None,
    post_rate: Annotated[int, typer.Option(
        min=1, help="Simulated seconds between a device's mirrored readings.")] = 300,
    poll_rate: Annotated[float | None, typer.Option(
        min=1, help="Simulated seconds between control polls (default: the server's "
                    "pollRate).")] = None,
    telemetry: Annotated[str, typer.Option(
        help="How readings reach the DERMS: ieee2030_5 (MirrorUsagePoints) or mqtt (its "
             "MQTT ingest, see --mqtt); controls come over IEEE 2030.5 either way.")
                         ] = "ieee2030_5",
    mqtt: Annotated[str, typer.Option(
        help="MQTT broker HOST:PORT for --telemetry mqtt.")] = "127.0.0.1:1883",
    mqtt_topic_root: Annotated[str, typer.Option(
        help="Topic root of the DERMS's MQTT ingest (readings on <root>/telemetry/sim).")
                               ] = "derms/v1",
    subscribe: Annotated[bool, typer.Option(
        help="Subscribe each device's DERControlList and DefaultDERControl: the server "
             "POSTs Notifications to each aggregator's listener on 127.0.0.1 (mutual TLS "
             "with the aggregator's certificate); polling continues as a fallback.")
                         ] = False,
    comm_timeout: Annotated[float, typer.Option(
        min=1, help="Simulated seconds without contact before a device falls back to its "
                    "DefaultDERControl.")] = 900,
    volt_watt: Annotated[bool, typer.Option(help="Enable 1547 volt-watt on inverters.")
                         ] = False,
    mix: Annotated[str | None, typer.Option(
        help="Device kinds' shares, e.g. pv=0.6,battery=0.2,ev=0.15,flex=0.05.")] = None,
    feeder_id: Annotated[str | None, typer.Option(
        "--feeder-id", help="Register the fleet on this feeder of the DERMS for its control "
                            "loop (`derms serve --control-feeder ID`): sites and meters with "
                            "bus and phase, each DER's own output mirrored (its telemetry), "
                            "the feeder-head SCADA mirrored by a head RTU; needs --api. "
                            "Readings are then stamped with wall-clock UTC.")] = None,
    wall_clock: Annotated[bool | None, typer.Option(
        "--wall-clock/--sim-clock", help="Stamp mirrored readings with wall-clock UTC or "
                                         "simulated time (default: wall clock with "
                                         "--feeder-id, else simulated).")] = None,
    latitude: Annotated[float, typer.Option(
        min=-90.0, max=90.0, help="Site latitude of the PV [deg] (the sun's path).")] = 37.0,
    longitude: Annotated[float, typer.Option(
        min=-180.0, max=180.0, help="Site longitude of the PV [deg, east positive].")
    ] = -120.0,
    utc_offset_h: Annotated[float | None, typer.Option(
        "--utc-offset-h", min=-12.0, max=14.0,
        help="Local standard time of the load shapes [h from UTC]; default: the "
             "longitude's (-120 deg: -8).")] = None,
    force: ForceOpt = False,
) -> None:
    """Run a feeder in real time or faster with a simulated DER fleet (PV with IEEE 1547
    volt-var, batteries, EV chargers, flexible loads) that talks to the DERMS over IEEE
    2030.5 (mutual TLS, aggregator clients), and write what happened: timeseries.csv /
    .parquet, devices.csv, summary.json and report.html."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from derms.grid.bundled import resolve_master
    from derms.sim.runner import SepEndpoint, SimConfig, run_sim, write_outputs
    from derms.sim.scenario import Scenario, load_scenario

    dur_s = parse_duration(duration, "--duration").total_seconds()
    step_s = parse_duration(step, "--step").total_seconds()
    scen = load_scenario(scenario) if scenario is not None else Scenario()
    cfg = SimConfig(feeder=feeder, devices=devices, seed=seed, speed=speed, duration_s=dur_s,
                    step_s=step_s, start=parse_start(start) if start else None,
                    comm_timeout_s=comm_timeout, post_rate_s=post_rate, poll_rate_s=poll_rate,
                    subscribe=subscribe, volt_watt=volt_watt, telemetry=telemetry,
                    mqtt_host=_endpoint(mqtt, "--mqtt")[0],
                    mqtt_port=_endpoint(mqtt, "--mqtt")[1], mqtt_topic_root=mqtt_topic_root, mix=_mix(mix), scenario=scen,
                    feeder_id=feeder_id, wall_clock=wall_clock, latitude_deg=latitude,
                    longitude_deg=longitude,
                    utc_offset_h=round(longitude / 15.0) if utc_offset_h is None
                    else utc_offset_h)
    if feeder_id is not None and (api is None or ieee2030_5 is None):
        raise InputError("--feeder-id needs --api and --ieee2030-5 (the fleet is registered "
                         "on the feeder and reports over IEEE 2030.5)")
    master = resolve_master(feeder)
    sep = None
    if ieee2030_5 is not None:
        host, port = _endpoint(ieee2030_5)
        if pki is None:
            raise InputError("--ieee2030-5 needs --pki (the folder of the CA and the "
                             "aggregators' certificates)")
        if not dcap_path.startswith("/") or not dcap_path.endswith("/dcap"):
            raise InputError(f"--dcap-path {dcap_path!r}: expected /…/dcap")
        from derms.sim.provision import ensure_pki

        n_agg = aggregators or max(1, math.ceil(devices / 500))
        ca, aggs = ensure_pki(pki, n_agg)
        sep = SepEndpoint(host, port, ca, tuple(aggs), dcap_path, connections)
    elif api is not None:
        raise InputError("--api needs --ieee2030-5 (pre-registration is for the protocol "
                         "path)")
    registered: dict = {}

    def on_fleet(spec, lfdis, buses, info):
        if api is None:
            return
        from derms.sim.provision import Api, register_fleet

        client = Api(api, token)
        try:
            owner = [sep.aggregators[i % len(sep.aggregators)][3] for i in range(spec.n)]
            registered.update(register_fleet(
                client, spec, lfdis, owner, buses, fsa_id, feeder_id=feeder_id,
                phases=info["phases"] if feeder_id else None, head_lfdi=info["head_lfdi"],
                head_bus=info["head_bus"]))
        finally:
            client.close()

    with output_folder(out, force, feeder=master, seed=seed,
                       inputs=(scenario,) if scenario else ()) as tmp, Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
            console=err_console) as bar:
        task = bar.add_task("simulating", total=int(dur_s // step_s))
        result = run_sim(cfg, sep=sep, on_fleet=on_fleet,
                         on_progress=lambda k, n: bar.update(task, completed=k, total=n))
        if registered:
            result.summary["registration"] = {k: v for k, v in registered.items()
                                              if k != "der_ids"}
        write_outputs(result, tmp)
    s = result.summary
    out_console.print(f"{s['devices']} devices, {s['steps']} steps of {step_s:g} s at "
                      f"{speed:g}x; physics step median {s['physics_step_ms']['median']:.1f} ms,"
                      f" max lag {s['max_lag_s']:.2f} s")
    if s.get("protocol"):
        out_console.print("protocol: " + json.dumps(s["protocol"]))
    out_console.print(f"outputs in {out}")

