"""The ``derms`` command line. Thin: parses arguments, calls the layers below, prints.

Every :class:`~derms.errors.DermsError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from derms.cli.common import (  # shared with the sub-command modules
    ForceOpt,
    MasterArg,
    MaxIterOpt,
    OutOpt,
    err_console,
    out_console,
    output_folder,
    parse_step,
    refuse_early,
)
from derms.cli.common import handle_errors as _handle_errors
from derms.errors import InputError

MIN_PERIOD_S = 0.5  # serve's cycle periods: 0 (off) or at least this

app = typer.Typer(
    help="derms: Distributed Energy Resource Management System (feeder studies).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _parse_start(text: str) -> datetime:
    from derms.cli.common import parse_start

    return parse_start(text)


@app.command()
@_handle_errors
def feeders() -> None:
    """List the feeders bundled with derms."""
    from derms.grid.bundled import BUNDLED_FEEDERS, data_dir

    for name, rel in BUNDLED_FEEDERS.items():
        out_console.print(f"{name:10s} {data_dir() / 'feeders' / rel}", highlight=False)


@app.command()
@_handle_errors
def model(
    master: MasterArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Load a feeder and print its element counts, total load and notes."""
    from derms.grid.bundled import resolve_master
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine

    with OpenDSSEngine(resolve_master(master)) as engine:
        fm = read_feeder(engine.ctx, engine.source_master)
    info = {"name": fm.name, **fm.counts(), "total_load_kw": round(fm.total_load_kw, 3),
            "total_load_kvar": round(fm.total_load_kvar, 3), "source_bus": fm.head.bus,
            "notes": list(fm.notes)}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"feeder {fm.name}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for k, v in info.items():
        if k != "notes":
            table.add_row(k, str(v))
    out_console.print(table)
    for note in fm.notes:
        out_console.print(f"note: {note}", highlight=False)


@app.command()
@_handle_errors
def powerflow(
    master: MasterArg,
    out: OutOpt,
    controls: Annotated[str, typer.Option(
        help="Regulator/capacitor controls: static, time or off (frozen).")] = "static",
    max_iterations: MaxIterOpt = 100,
    force: ForceOpt = False,
) -> None:
    """Solve a snapshot power flow and write its tables to OUT.

    Files: voltages.csv (bus, phase, v_pu, ...), branches.csv (element, phase, loading_pct,
    ...), transformers.csv, head.csv, violations.csv (ANSI Range A, 100 % of normal rating)
    and summary.json.
    """
    from derms.analysis.constraints import Limits, snapshot_violations
    from derms.grid.bundled import resolve_master
    from derms.powerflow.engine import OpenDSSEngine, SolveSettings
    from derms.powerflow.snapshot import solve_snapshot

    refuse_early(out, force, master)  # (it wrote into any folder, over what was there)
    settings = SolveSettings(max_iterations=max_iterations, control_mode=_control_mode(controls))
    path = resolve_master(master)
    with OpenDSSEngine(path, settings) as engine:
        res = solve_snapshot(engine)
    report = snapshot_violations(res, Limits.ansi_range_a())
    with output_folder(out, force, feeder=path) as tmp:
        res.voltages.to_csv(tmp / "voltages.csv", index=False)
        res.branches.to_csv(tmp / "branches.csv", index=False)
        res.transformers.to_csv(tmp / "transformers.csv", index=False)
        res.head.to_csv(tmp / "head.csv", index=False)
        report.events.to_csv(tmp / "violations.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps({**res.totals, **report.counts},
                                                     indent=2))
    t = res.totals
    out_console.print(
        f"solved in {t['iterations']:.0f} iterations: head {t['head_p_kw']:.1f} kW "
        f"{t['head_q_kvar']:.1f} kvar, losses {t['losses_kw']:.1f} kW, "
        f"V {t['v_min_pu']:.4f}..{t['v_max_pu']:.4f} pu; violations (ANSI A, 100 % rating): "
        f"{report.counts['violations_voltage']} voltage, {report.counts['violations_thermal']} "
        f"thermal; results in {out}", highlight=False)


def _control_mode(text: str):
    mode = text.strip().lower()
    if mode not in ("static", "time", "off"):
        raise InputError(f"--controls {text!r}: expected static, time or off")
    return mode


@app.command()
@_handle_errors
def study(
    master: MasterArg,
    out: OutOpt,
    days: Annotated[float, typer.Option(help="Length of the study in days.")] = 1.0,
    step: Annotated[str, typer.Option(help="Time step, 1min .. 1h (e.g. 15min, 1h).")] = "15min",
    pv_penetration: Annotated[float, typer.Option(
        help="Share of customers (loads) that get PV, 0..1.")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed for profile and PV draws.")] = 0,
    start: Annotated[str | None, typer.Option(
        help="Start, ISO 8601 (UTC if no zone); default 2026-07-01, or the --profiles "
             "file's first timestamp.")] = None,
    controls: Annotated[str, typer.Option(help="static, time or off.")] = "static",
    voltage_range: Annotated[str, typer.Option(
        "--range", help="ANSI C84.1 voltage range: A (0.95-1.05) or B.")] = "A",
    reverse_power: Annotated[bool, typer.Option(
        help="Flag reverse power flow at the substation as a violation.")] = False,
    max_iterations: MaxIterOpt = 100,
    profiles: Annotated[Path | None, typer.Option(
        help="CSV of profiles: 'timestamp' + one column per element (load.x, pvsystem.y, "
             "generator.z) with multipliers of the base value; sets --start, and must "
             "cover --days at --step.")] = None,
    force: ForceOpt = False,
) -> None:
    """Run a QSTS study with load profiles (and PV); write an HTML report, CSV and Parquet."""
    refuse_early(out, force, master, (profiles,))
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from derms.analysis.constraints import Limits
    from derms.grid.bundled import resolve_master
    from derms.reports.study_outputs import write_study_outputs
    from derms.studies.profile_files import read_profiles_csv
    from derms.studies.qsts_study import StudyConfig, run_study

    rng = voltage_range.strip().upper()
    if rng not in ("A", "B"):
        raise InputError(f"--range {voltage_range!r}: expected A or B")
    limit_kw = {"reverse_power_kw": 0.0} if reverse_power else {}
    limits = Limits.ansi_range_a(**limit_kw) if rng == "A" else Limits.ansi_range_b(**limit_kw)
    user = read_profiles_csv(profiles) if profiles is not None else None
    t0 = _parse_start(start if start is not None else "2026-07-01")
    if user is not None and start is not None and t0 != user.start:
        # (the file's start was taken and --start silently ignored)
        raise InputError(f"--start {start}: the profiles file {profiles} starts at "
                         f"{user.start.isoformat()} (leave --start out, or give that)")
    config = StudyConfig(days=days, step=parse_step(step),
                         start=user.start if user else t0, profiles=user,
                         pv_penetration=pv_penetration, seed=seed,
                         control_mode=_control_mode(controls), limits=limits,
                         max_iterations=max_iterations)
    path = resolve_master(master)
    runs = 2 if pv_penetration > 0 else 1
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} steps"), TimeRemainingColumn(),
                  console=err_console, transient=False) as progress:
        task = progress.add_task(f"QSTS {path.name}", total=config.n_steps * runs)
        result = run_study(path, config, on_step=lambda _k: progress.advance(task))
    with output_folder(out, force, feeder=path, seed=seed,
                       inputs=(profiles,) if profiles else ()) as tmp:
        paths = write_study_outputs(result, tmp)
    paths = {k: out / p.name for k, p in paths.items()}
    c = result.violations.counts
    out_console.print(
        f"{result.result.n_steps} steps in {result.runtime_s:.1f} s; violations: "
        f"{c['violations_voltage']} voltage, {c['violations_thermal']} thermal "
        f"(pre-existing: {c['pre_existing_voltage']} voltage, {c['pre_existing_thermal']} "
        f"thermal)", highlight=False)
    bad = int((~result.result.converged).sum())
    if bad:
        err_console.print(f"[yellow]warning:[/] {bad} steps did not converge (see summary.json)")
    out_console.print(f"report: {paths['report'].resolve()}", highlight=False)


db_app = typer.Typer(help="Database: migrations.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")


@db_app.command("upgrade")
@_handle_errors
def db_upgrade() -> None:
    """Create or migrate the database at DERMS_DATABASE_URL (default: SQLite in the data dir)."""
    from sqlalchemy.exc import SQLAlchemyError

    from derms.config import get_settings
    from derms.store.migrate import current_revision, upgrade

    url = get_settings().database_url
    try:
        upgrade(url)
        rev = current_revision(url)
    except SQLAlchemyError as exc:  # unreachable server, a folder or a file not a database
        raise _db_error(url, exc) from None
    out_console.print(f"database at revision {rev}", highlight=False)


def _db_error(url: str, exc: Exception) -> InputError:
    """InputError naming the database URL and the driver's first line of the error."""
    return InputError(f"cannot open the database {url!r}: "
                      f"{str(getattr(exc, 'orig', exc) or exc).splitlines()[0]}")


@token_app.command("create")
@_handle_errors
def token_create(
    scope: Annotated[str, typer.Option(help="read, operate or admin.")] = "read",
    name: Annotated[str, typer.Option(help="What the token is for.")] = "",
) -> None:
    """Mint an API token; it is printed once and stored only as a hash."""
    from sqlalchemy.exc import SQLAlchemyError

    from derms.api.auth import SCOPES, mint_token
    from derms.config import get_settings
    from derms.store.migrate import current_revision, head_revision

    if scope not in SCOPES:
        raise InputError(f"--scope {scope!r}: expected one of {', '.join(SCOPES)}")
    url = get_settings().database_url
    try:
        rev, head = current_revision(url), head_revision()
    except SQLAlchemyError as exc:  # unreachable server, a folder that does not exist
        raise _db_error(url, exc) from None
    if rev is None:   # an empty database: no api_tokens table yet (was a traceback)
        raise InputError("the database has no derms schema yet: run `derms db upgrade` "
                         "first")
    if rev != head:
        raise InputError(f"the database is at schema {rev}, expected {head}: run "
                         "`derms db upgrade` first")
    typer.echo(mint_token(url, scope, name))


@app.command()
@_handle_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 8000,
    mqtt: Annotated[bool, typer.Option(help="Run the MQTT telemetry subscriber.")] = True,
    monitor_period_s: Annotated[float, typer.Option(
        help="Seconds between the monitoring cycle's state estimates (every feeder with an "
             "OpenDSS model version; alarms); 0 (default): no monitoring cycle. Without it, "
             "GET /v1/feeders/{id}/state serves the --control-feeder's state from the "
             "control loop's last estimate (no alarms) and answers 503 for other "
             "feeders.")] = 0.0,
    ieee2030_5_port: Annotated[int | None, typer.Option(
        "--ieee2030-5-port", min=0, max=65535,
        help="Serve IEEE 2030.5 (CSIP / CSIP-AUS) over mutual TLS on this port (off when "
             "not given); needs --ieee2030-5-cert, --ieee2030-5-key and "
             "--ieee2030-5-client-ca.")] = None,
    ieee2030_5_cert: Annotated[Path | None, typer.Option(
        "--ieee2030-5-cert", help="Server certificate (PEM) of the IEEE 2030.5 listener.")] = None,
    ieee2030_5_key: Annotated[Path | None, typer.Option(
        "--ieee2030-5-key", help="Its private key (PEM, unencrypted).")] = None,
    ieee2030_5_client_ca: Annotated[Path | None, typer.Option(
        "--ieee2030-5-client-ca",
        help="CA certificate(s) (PEM) that client certificates must chain to.")] = None,
    ieee2030_5_dcap_path: Annotated[str, typer.Option(
        "--ieee2030-5-dcap-path", help="Path of DeviceCapability (…/dcap); the other "
                                       "resources are served beside it.")] = "/dcap",
    ieee2030_5_host: Annotated[str | None, typer.Option(
        "--ieee2030-5-host", help="Address of the IEEE 2030.5 listener (default: --host).")
    ] = None,
    # --- ADMS interface on the message bus (derms.control.adms_mqtt) ---
    adms_mqtt: Annotated[bool, typer.Option(
        "--adms-mqtt/--no-adms-mqtt",
        help="Take ADMS messages on <DERMS_MQTT_TOPIC_ROOT>/adms/<sender>/requests (client "
             "id <DERMS_MQTT_CLIENT_ID>-adms).")] = False,
    # --- the control loop (derms.control.loop) ---
    control_feeder: Annotated[str | None, typer.Option(
        "--control-feeder", metavar="FEEDER_ID",
        help="Run the control loop on this feeder (its registered OpenDSS model version, or "
             "a bundled feeder name); off when not given. With --ieee2030-5-port its "
             "commands go out as DERControls of the 'derms control' program. Its state "
             "estimate of every cycle is served at GET /v1/feeders/{id}/state "
             "(source control_loop) unless the monitoring cycle has a state for the "
             "feeder.")] = None,
    control_period_s: Annotated[float, typer.Option(
        "--control-period-s", min=0.5, help="Seconds between control cycles.")] = 5.0,
    control_replan_s: Annotated[float, typer.Option(
        "--control-replan-s", min=0.0, metavar="SECONDS",
        help="Seconds between re-plans of the control loop (the next 6 h from forecasts, "
             "network-constrained, on the feeder's AC model; at least 60); 0 = off.")] = 900.0,
    control_act_probability: Annotated[float | None, typer.Option(
        "--control-act-probability", min=1e-6, max=0.5, metavar="P",
        help="Act on rows the state estimate cannot rule out: hold each branch so that "
             "it is over its rating with probability at most P (the estimate plus its "
             "posterior spread); default: act on the estimate alone (rows within the "
             "spread are reported, not acted on).")] = None,
) -> None:
    """Run the API, the MQTT ingest, with --monitor-period-s the monitoring cycle (a state
    estimate per feeder with an OpenDSS model version registered, alarms), with
    --control-feeder the control loop (whose estimate of every cycle is the feeder's
    state when no monitoring cycle runs for it) and, with --ieee2030-5-port, the IEEE
    2030.5 server, on the database at DERMS_DATABASE_URL."""
    import logging

    import uvicorn

    from derms.api.app import create_app
    from derms.config import get_settings
    from derms.ingest.mqtt import MqttIngest
    from derms.store.migrate import upgrade

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    for name, value in (("--monitor-period-s", monitor_period_s),
                        ("--control-period-s", control_period_s),
                        ("--control-replan-s", control_replan_s)):
        # nan or a negative period silently turned the cycle off, 1e-9 spun a busy loop
        if not math.isfinite(value) or value < 0 or 0 < value < MIN_PERIOD_S:
            raise InputError(f"{name} {value:g}: expected 0 (off) or at least "
                             f"{MIN_PERIOD_S:g} s")
    replan_config = None  # checked before anything starts
    if control_feeder is not None and control_replan_s > 0:
        from derms.control.replan import ReplanConfig

        replan_config = ReplanConfig(period_s=control_replan_s)
    sep_config = _ieee2030_5_config(ieee2030_5_port, ieee2030_5_cert, ieee2030_5_key,
                                    ieee2030_5_client_ca, ieee2030_5_dcap_path,
                                    ieee2030_5_host or host)
    if ieee2030_5_port is not None and ieee2030_5_port == port and \
            (ieee2030_5_host or host) == host:
        raise InputError(f"--ieee2030-5-port {ieee2030_5_port} is the API's --port too")
    _port_free(host, port, "--port")  # before anything starts (uvicorn exited 3 after the
    if ieee2030_5_port:                # control loop had already run a cycle)
        _port_free(ieee2030_5_host or host, ieee2030_5_port, "--ieee2030-5-port")
    settings = get_settings()
    upgrade(settings.database_url)
    api = create_app(settings)
    sep_server = None
    if sep_config is not None:
        from derms.protocols.ieee2030_5 import start_ieee2030_5_server
        from derms.protocols.ieee2030_5.sql_repository import PersistentRepository
        from derms.protocols.ieee2030_5.telemetry import StoreReadingSink

        # one repository: the listener serves what the management API (/v1/ieee2030-5) writes
        api.state.ieee2030_5_repo = repo = PersistentRepository(api.state.engine)
        try:
            # mirrored readings (MirrorUsagePoints) go into the historian of the API's database
            sep_server = start_ieee2030_5_server(sep_config, repo,
                                                 telemetry=StoreReadingSink(api.state.engine))
        except OSError as exc:
            raise InputError(f"--ieee2030-5-port {sep_config.port}: cannot listen on "
                             f"{sep_config.host} ({exc.strerror or exc})") from None
        logging.getLogger("derms.cli").info(
            "event=ieee2030_5_listening host=%s port=%d dcap=%s", sep_config.host,
            sep_server.port, sep_config.settings.dcap_path)
    ingest = None
    if mqtt:
        sink = api.state.sink
        ingest = MqttIngest(sink, host=settings.mqtt_host, port=settings.mqtt_port,
                            client_id=settings.mqtt_client_id, known_series=sink.is_known,
                            topic_root=settings.mqtt_topic_root,
                            max_payload_bytes=settings.max_body_bytes)
        ingest.start()
        api.state.metrics.watch_mqtt(ingest)
    loop = None
    if monitor_period_s > 0:
        from derms.monitoring.process import MonitorProcess

        # the cycle's OpenDSS engines live in a child process (see docs/ARCHITECTURE.md)
        loop = MonitorProcess(settings.database_url, monitor_period_s)
        api.state.monitor = loop
        loop.start()
    from derms.monitoring.forecast_schedule import ForecastSchedule

    # None unless DERMS_FORECAST_PERIOD_S > 0 and DERMS_FORECAST_TARGETS are set
    forecast_schedule = ForecastSchedule.from_settings(settings, api.state.engine,
                                                       service=api.state.forecasts)
    if forecast_schedule is not None:
        api.state.forecast_schedule = forecast_schedule
        forecast_schedule.start()
    # --- the control loop: its own thread builds and uses its OpenDSS engine ---
    control_loop = None
    if control_feeder is not None:
        from derms.control.fast_cycle import FastCycleConfig
        from derms.control.loop import ControlLoop, LoopConfig
        from derms.grid.bundled import BUNDLED_FEEDERS
        from derms.monitoring.cycle import model_path_of

        master = None
        if model_path_of(api.state.engine, control_feeder) is None:
            if control_feeder.lower() not in BUNDLED_FEEDERS:
                raise InputError(f"--control-feeder {control_feeder}: no OpenDSS model version "
                                 "registered for it and not a bundled feeder name")
            master = control_feeder
        control_loop = ControlLoop(api.state.engine, control_feeder, master=master,
                                   repo=getattr(api.state, "ieee2030_5_repo", None),
                                   config=LoopConfig(
                                       period_s=control_period_s,
                                       replan=replan_config,
                                       fast=FastCycleConfig(
                                           act_probability=control_act_probability)))
        api.state.control_loop = control_loop
        control_loop.start()
        logging.getLogger("derms.cli").info(
            "event=control_loop_started feeder=%s period_s=%s replan_s=%s",
            control_feeder, control_period_s, control_replan_s or "off")

    def _on_topology(fid: str) -> None:
        if api.state.monitor is not None:
            api.state.monitor.notify_topology_change(fid)
        if control_loop is not None:
            control_loop.notify_topology_change(fid)

    # --- ADMS interface on the message bus ---
    adms_sub = None
    if adms_mqtt:
        from derms.control.adms_mqtt import AdmsMqtt

        adms_sub = AdmsMqtt(api.state.sessions, host=settings.mqtt_host, port=settings.mqtt_port,
                            client_id=settings.mqtt_client_id + "-adms",
                            topic_root=settings.mqtt_topic_root,
                            on_topology=_on_topology)
        adms_sub.start()
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default
    # handler that killed the process before this block's cleanup, orphaning the monitor
    # child (≈ 300 MB and its database sessions each): make it an orderly exit instead
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(api, host=host, port=port, log_level="info")
    finally:
        if control_loop is not None:  # before the listener and the database go
            control_loop.close()
        if adms_sub is not None:  # ADMS interface
            adms_sub.stop()
        if sep_server is not None:
            sep_server.stop()
        if ingest is not None:
            ingest.stop()
        if loop is not None:
            loop.close()
        if forecast_schedule is not None:
            forecast_schedule.stop()


def _port_free(host: str, port: int, option: str) -> None:
    """InputError naming ``option`` when ``host:port`` cannot be listened on now."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise InputError(f"{option} {port}: cannot listen on {host}:{port} "
                         f"({exc.strerror or exc})") from None


def _ieee2030_5_config(port: int | None, cert: Path | None, key: Path | None,
                       client_ca: Path | None, dcap_path: str, host: str):
    """The IEEE 2030.5 listener's configuration from ``serve``'s options, every file checked
    (exists, readable, a PEM certificate/key pair, a CA) before anything starts; None when
    the listener is off. InputError (exit 2) names the option and the file."""
    files = {"--ieee2030-5-cert": cert, "--ieee2030-5-key": key,
             "--ieee2030-5-client-ca": client_ca}
    if port is None:
        given = [name for name, path in files.items() if path is not None]
        if given:
            raise InputError(f"{given[0]} is given without --ieee2030-5-port")
        return None
    missing = [name for name, path in files.items() if path is None]
    if missing:
        raise InputError(f"--ieee2030-5-port needs {', '.join(missing)}")
    for name, path in files.items():
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise InputError(f"{name} {path}: cannot be read ({exc.strerror or exc})") from None
    import ssl

    from derms.protocols.ieee2030_5 import Ieee2030_5Config, SepSettings

    try:
        ssl.create_default_context().load_verify_locations(str(client_ca))
    except (ssl.SSLError, ValueError) as exc:
        raise InputError(f"--ieee2030-5-client-ca {client_ca}: no PEM CA certificate "
                         f"({exc})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key),
                                                                password=lambda: b"")
    except ssl.SSLError as exc:
        raise InputError(f"--ieee2030-5-cert {cert} / --ieee2030-5-key {key}: not a PEM "
                         f"certificate and its unencrypted private key ({exc})") from None
    from derms.config import get_settings

    settings = SepSettings(dcap_path=dcap_path,
                           notify_hosts=tuple(get_settings().ieee2030_5_notify_hosts))
    try:
        settings.prefix  # noqa: B018 - validates the path
    except ValueError as exc:
        raise InputError(f"--ieee2030-5-dcap-path: {exc}") from None
    return Ieee2030_5Config(cert=cert, key=key, client_ca=client_ca, host=host, port=port,
                            settings=settings)


from derms.cli import (  # sub-commands on `app`
    certs_cmd,
    constraints_cmd,
    demo_cmd,
    dispatch_cmd,
    envelopes_cmd,
    forecast_cmd,
    growth_cmd,
    hosting_cmd,
    interconnect_cmd,
    sim_cmd,
)

app.add_typer(forecast_cmd.app, name="forecast")
app.add_typer(constraints_cmd.app, name="constraints")
app.command(name="growth")(growth_cmd.growth)
app.command(name="dispatch")(dispatch_cmd.dispatch)
app.command(name="hosting-capacity")(hosting_cmd.hosting_capacity)
app.command(name="envelopes")(envelopes_cmd.envelopes)
app.command(name="interconnect")(interconnect_cmd.interconnect)
app.command(name="certs")(certs_cmd.certs)
app.command(name="sim")(sim_cmd.sim)
app.command(name="demo")(demo_cmd.demo)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
