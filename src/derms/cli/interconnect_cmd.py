"""``derms interconnect``: static and flexible interconnection check for a new device.

Registered in main.py as ``app.command(name="interconnect")(interconnect_cmd.interconnect)``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import numpy as np
import typer

from derms.analysis.constraints import MAX_SIZE_KW
from derms.cli.common import (
    ForceOpt,
    MasterArg,
    MaxIterOpt,
    OutOpt,
    handle_errors,
    out_console,
    output_folder,
    parse_start,
    refuse_early,
    stage_progress,
)
from derms.errors import InputError

KINDS = ("pv", "load", "battery")


@handle_errors
def interconnect(
    master: MasterArg,
    out: OutOpt,
    bus: Annotated[str, typer.Option(help="Bus of the connection, optionally with phases: "
                                          "671 or 611.3 or 684.1.3.")],
    kw: Annotated[float, typer.Option(help="Device size [kW] (PV/battery inverter, charger).")],
    kind: Annotated[str, typer.Option(help="pv, load (EV charging) or battery.")] = "pv",
    start: Annotated[str, typer.Option(help="Horizon start, ISO 8601 (UTC if no zone).")
                     ] = "2026-01-01T08:00:00Z",
    days: Annotated[float, typer.Option(help="Horizon [days] (365 = a year).")] = 365.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed for the load shapes and EV sessions.")] = 0,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Also run the reference (QSTS with AC bisection of every "
                            "limited interval) and report the difference.")] = False,
    max_iterations: MaxIterOpt = 100,
    force: ForceOpt = False,
) -> None:
    """Can KW of PV, battery or EV charging connect at BUS with a static limit, and how much
    would a flexible connection be curtailed over the horizon (hourly QSTS of the feeder's
    load shapes, measured PV)? Writes intervals.csv, summary.json and report.html."""
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise InputError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not np.isfinite(kw) or not 0 < kw <= MAX_SIZE_KW:
        raise InputError(f"--kw {kw}: the device size must be positive and at most "
                         f"{MAX_SIZE_KW:g} kW")
    if not 0 < days <= 366:
        raise InputError(f"--days {days}: must be in (0, 366]")
    t0 = parse_start(start)
    refuse_early(out, force, master)
    from derms.analysis.hosting_capacity import resolve_sites
    from derms.analysis.interconnection import curtailment_reference, flexible_connection
    from derms.grid.bundled import resolve_master
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine, SolveSettings
    from derms.reports.interconnect_out import write_interconnect_outputs
    from derms.studies.device_profiles import device_profile
    from derms.studies.qsts_study import StudyConfig, study_profiles

    cfg = StudyConfig(days=days, step=timedelta(hours=1), start=t0, seed=seed,
                      max_iterations=max_iterations)
    pu = device_profile(kind, t0, cfg.n_steps, cfg.step, seed)
    path = resolve_master(master)
    results = {}
    runs = [("fast", flexible_connection)] + ([("reference", curtailment_reference)]
                                              if reference else [])
    with stage_progress() as progress:
        for name, fn in runs:
            with OpenDSSEngine(path, SolveSettings(max_iterations=max_iterations)) as engine:
                engine.solve_snapshot()
                feeder = read_feeder(engine.ctx, engine.source_master)
                site = resolve_sites(engine, [bus])[0]
                profiles, _ = study_profiles(feeder, cfg)
                kwargs = {"progress": progress} if name == "fast" else {}
                results[name] = fn(engine, profiles, site, kind, kw, pu, **kwargs)
    with output_folder(out, force, feeder=path, seed=seed) as tmp:
        summ = write_interconnect_outputs(results, feeder.name, str(path), tmp)
    fast = results["fast"]
    for d, a in fast.annual().items():
        out_console.print(
            f"{feeder.name} {kind} {kw:g} kW at {site.bus}.{site.phases} ({d}): static limit "
            f"{fast.static_limit_kw[d]:,.1f} kW -> {'fits' if kw <= fast.static_limit_kw[d] + 1e-9 else 'needs a flexible connection'}; "
            f"flexible: {a['curtailed_kwh']:,.0f} of {a['available_kwh']:,.0f} kWh curtailed "
            f"({100 * a['curtailed_share']:.2f} %) in {a['curtailed_hours']:.0f} h",
            highlight=False)
    if reference:
        out_console.print(f"reference curtailment differs by {summ['reference_difference_pct']}"
                          " %", highlight=False)
    out_console.print(f"report: {(out / 'report.html').resolve()}", highlight=False)

