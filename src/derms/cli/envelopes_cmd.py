"""``derms envelopes``: dynamic operating envelopes per connection point over a horizon.

Registered in main.py as ``app.command(name="envelopes")(envelopes_cmd.envelopes)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from derms.cli.common import (
    ForceOpt,
    MasterArg,
    MaxIterOpt,
    OutOpt,
    handle_errors,
    out_console,
    output_folder,
    parse_start,
    parse_step,
    refuse_early,
    stage_progress,
)
from derms.errors import InputError

POLICIES = ("equal", "proportional", "max_total")


def pick_loads(spec: str, names: list[str], seed: int) -> list[str] | None:
    """``all`` -> None (every load); ``N`` -> N loads drawn with the seed; else a list."""
    text = spec.strip()
    if text.lower() == "all":
        return None
    if text.isdigit():
        n = int(text)
        if not 1 <= n <= len(names):
            raise InputError(f"--connection-points {n}: the feeder has {len(names)} enabled "
                             "loads")
        rng = np.random.default_rng(seed)
        return [names[i] for i in sorted(rng.choice(len(names), n, replace=False))]
    items = [s.strip() for s in text.replace(";", ",").split(",")]
    if any(not s for s in items):
        raise InputError(f"--connection-points {spec!r}: empty item in the list")
    return items


@handle_errors
def envelopes(
    master: MasterArg,
    out: OutOpt,
    policy: Annotated[str, typer.Option(
        help="equal (same kW for all), proportional (to capacity) or max_total (largest "
             "sum; some may get nothing).")] = "equal",
    connection_points: Annotated[str, typer.Option(
        help="all, a number N (N loads drawn with --seed) or load names: load1,load2.")
    ] = "all",
    start: Annotated[str, typer.Option(help="Horizon start, ISO 8601 (UTC if no zone).")
                     ] = "2026-07-01",
    hours: Annotated[float, typer.Option(help="Horizon length [h].")] = 24.0,
    step: Annotated[str, typer.Option(help="Interval, 1min .. 1h.")] = "5min",
    profiles: Annotated[Path | None, typer.Option(
        help="CSV forecast: 'timestamp' + one column per element (load.x, pvsystem.y) with "
             "multipliers of the base value; sets --start, --hours and --step. Elements "
             "without a column get a bundled load shape.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed for load shapes and picks.")] = 0,
    capacity_kw: Annotated[float, typer.Option(
        help="Smallest connection capacity [kW]; a connection point's capacity is the "
             "larger of this and 2 x its load's base kW.")] = 20.0,
    direction: Annotated[str, typer.Option(help="both, export or import.")] = "both",
    voltage_range: Annotated[str, typer.Option(
        help="A (0.95-1.05 pu) or B (0.917-1.058 pu), ANSI C84.1.")] = "A",
    controls: Annotated[str, typer.Option(
        help="acting (regulators/capacitors respond) or frozen (base-case state).")
    ] = "acting",
    reverse_flow: Annotated[bool, typer.Option(
        "--reverse-flow", help="Also forbid export at the feeder head.")] = False,
    skip_default_ratings: Annotated[bool, typer.Option(
        "--skip-default-ratings",
        help="Leave lines with OpenDSS's default rating (400/600 A) out of the thermal "
             "criterion.")] = False,
    static_kw: Annotated[float, typer.Option(
        help="Static per-connection limit the envelopes are compared with [kW].")] = 5.0,
    max_iterations: MaxIterOpt = 100,
    force: ForceOpt = False,
) -> None:
    """Operating envelopes: export and import limits [kW] per connection point (customer
    load) and interval, such that every connection point at its envelope at once keeps
    the feeder within its limits (AC-checked). Writes envelopes.csv/.parquet/.geojson,
    intervals.csv, connection_points.csv, pre_existing.csv, summary.json and report.html.
    """
    policy = policy.strip().lower()
    if policy not in POLICIES:
        raise InputError(f"--policy {policy!r}: expected one of {', '.join(POLICIES)}")
    dirs = {"both": ("export", "import"), "export": ("export",), "import": ("import",)}.get(
        direction.strip().lower())
    if dirs is None:
        raise InputError(f"--direction {direction!r}: expected both, export or import")
    rng = voltage_range.strip().upper()
    if rng not in ("A", "B"):
        raise InputError(f"--voltage-range {voltage_range!r}: expected A or B")
    if controls not in ("acting", "frozen"):
        raise InputError(f"--controls {controls!r}: expected acting or frozen")
    if not 0 < capacity_kw < math.inf:
        raise InputError(f"--capacity-kw {capacity_kw}: must be positive and finite")
    if not 0 < static_kw < math.inf:
        raise InputError(f"--static-kw {static_kw}: must be positive and finite")
    if not 0 < hours <= 168:
        raise InputError(f"--hours {hours}: must be in (0, 168]")
    dt = parse_step(step)
    refuse_early(out, force, master)
    from derms.analysis.constraints import Limits
    from derms.analysis.envelope_network import connection_points as make_cps
    from derms.analysis.envelopes import EnvelopeCriteria, compute_envelopes
    from derms.grid.bundled import resolve_master
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine, SolveSettings
    from derms.reports.envelopes_out import EnvelopeReport, write_envelope_outputs
    from derms.studies.profile_files import read_profiles_csv
    from derms.studies.qsts_study import StudyConfig, study_profiles

    user = read_profiles_csv(profiles) if profiles is not None else None
    if user is not None:
        dt, hours = user.step, user.n_steps * user.step.total_seconds() / 3600
    cfg = StudyConfig(days=hours / 24, step=dt, start=user.start if user else parse_start(start),
                      seed=seed, profiles=user, max_iterations=max_iterations)
    limits = Limits.ansi_range_a(reverse_power_kw=0.0 if reverse_flow else None) \
        if rng == "A" else Limits.ansi_range_b(reverse_power_kw=0.0 if reverse_flow else None)
    criteria = EnvelopeCriteria(limits=limits, policy=policy, directions=dirs,
                                reverse_flow=reverse_flow, controls=controls,
                                skip_default_ratings=skip_default_ratings)
    path = resolve_master(master)
    with OpenDSSEngine(path, SolveSettings(max_iterations=max_iterations)) as engine:
        engine.solve_snapshot()
        feeder = read_feeder(engine.ctx, engine.source_master)
        forecast, _pv = study_profiles(feeder, cfg)
        names = [ld.name for ld in feeder.loads if ld.enabled]
        cps = make_cps(feeder, pick_loads(connection_points, names, seed),
                       min_capacity_kw=capacity_kw)
        with stage_progress() as progress:
            result = compute_envelopes(engine, forecast, cps, criteria, progress=progress)
    report = EnvelopeReport(feeder, result, str(path), static_kw)
    with output_folder(out, force, feeder=path, seed=seed,
                       inputs=(profiles,) if profiles else ()) as tmp:
        paths = write_envelope_outputs(report, tmp)
    iv = result.intervals
    for d in dirs:
        g = iv[iv["direction"] == d]
        x = result.export_kw if d == "export" else result.import_kw
        out_console.print(
            f"{feeder.name} {d}: {len(cps)} connection points x {len(result.times)} intervals "
            f"({policy}); mean {np.nanmean(x):.2f} kW, min {np.nanmin(x):.2f}, "
            f"{result.static_ratio(static_kw, d):.2f} x a static {static_kw:g} kW; AC check: "
            f"largest excess {g['ac_v_excess_pu'].max():+.2e} pu, "
            f"{g['ac_thermal_excess_pct'].max():+.2e} % (<= 0: within the limits)"
            + (f"; {int(g['held_at_zero_v'].max())} node-phases and "
               f"{int(g['held_at_zero_thermal'].max())} branch conductors already outside "
               "their limits at zero net, held there (pre-existing)"
               if (g["held_at_zero_v"].max() > 0 or g["held_at_zero_thermal"].max() > 0)
               else ""), highlight=False)
    out_console.print(f"{result.n_ac_solves} AC solves in {result.runtime_s:.1f} s",
                      highlight=False)
    out_console.print(f"envelopes: {(out / paths['csv'].name).resolve()}", highlight=False)
    out_console.print(f"report: {(out / paths['report'].name).resolve()}", highlight=False)
