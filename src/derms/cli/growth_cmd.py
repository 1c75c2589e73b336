"""``derms growth``: load-growth scenarios (EV, heat-pump, PV adoption, organic growth, new
connections) → peaks per year per feeder / transformer / line and the year each limit is
first exceeded. Register in main.py with ``app.command(name="growth")(growth_cmd.growth)``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from derms.cli.common import (
    ForceOpt,
    MasterArg,
    MaxIterOpt,
    OutOpt,
    err_console,
    handle_errors,
    out_console,
    output_folder,
    refuse_early,
)
from derms.errors import InputError

app = typer.Typer(help="Load-growth planning study.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

ConnectOpt = Annotated[list[str] | None, typer.Option(
    "--connect", help="New connection BUS:KW:PROFILE:YEAR (PROFILE flat, load, ev, heat_pump "
                      "or pv; YEAR calendar year). Repeatable.")]


def parse_connection(text: str):
    """``"675:500:ev:2029"`` -> NewConnection (InputError naming the text when malformed)."""
    from derms.studies.load_growth import NewConnection

    parts = text.split(":")
    if len(parts) != 4:
        raise InputError(f"--connect {text!r}: expected BUS:KW:PROFILE:YEAR")
    bus, kw, profile, year = parts
    try:
        return NewConnection(bus=bus.strip(), p_kw=float(kw), profile=profile.strip().lower(),
                             year=int(year))
    except ValueError:
        raise InputError(f"--connect {text!r}: KW must be a number and YEAR an integer") from None


@app.command()
@handle_errors
def growth(
    master: MasterArg,
    out: OutOpt,
    years: Annotated[int, typer.Option(help="Years of growth after the base year.")] = 10,
    start_year: Annotated[int, typer.Option(help="Calendar year of the base year.")] = 2026,
    ev_share_final: Annotated[float, typer.Option(
        help="Share of customers with an EV in the last year (0..1; 0 in the base year, "
             "logistic in between).")] = 0.5,
    hp_share_final: Annotated[float, typer.Option(help="Heat-pump share, last year.")] = 0.3,
    pv_share_final: Annotated[float, typer.Option(help="PV share, last year.")] = 0.4,
    growth_pct: Annotated[float, typer.Option(
        help="Organic growth of existing base load, %/yr.")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the customer and device draws.")] = 1,
    step_min: Annotated[int, typer.Option(help="Profile step: 15, 30 or 60 minutes.")] = 60,
    customer_peak_kw: Annotated[float, typer.Option(
        help="Peak kW of one customer: a load stands for max(1, round(kW / this)) "
             "customers.")] = 10.0,
    connect: ConnectOpt = None,
    max_iterations: MaxIterOpt = 100,
    force: ForceOpt = False,
) -> None:
    """Run a load-growth study; write peaks, first_exceeded and extremes (CSV + Parquet) and
    report.html to OUT."""
    refuse_early(out, force, master)
    from rich.progress import BarColumn, Progress, TextColumn

    from derms.grid.bundled import resolve_master
    from derms.reports.growth_html import write_growth_outputs
    from derms.studies.load_growth import GrowthScenario, run_load_growth

    scenario = GrowthScenario.simple(
        years, ev_final=ev_share_final, hp_final=hp_share_final, pv_final=pv_share_final,
        growth_pct=growth_pct, seed=seed, start_year=start_year, step_min=step_min,
        customer_peak_kw=customer_peak_kw,
        new_connections=tuple(parse_connection(c) for c in connect or ()))
    path = resolve_master(master)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), console=err_console) as bar:
        tasks = {"screen": bar.add_task("screening years", total=scenario.years + 1),
                 "ac": bar.add_task("AC solves", total=None)}

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(tasks[stage], completed=done, total=total)

        result = run_load_growth(path, scenario, max_iterations=max_iterations,
                                 on_progress=progress)
    with output_folder(out, force, feeder=path, seed=seed) as tmp:
        paths = write_growth_outputs(result, tmp)
    paths = {k: out / p.name for k, p in paths.items()}
    fe = result.first_exceeded
    hit = fe[fe["year"].notna() & (fe["kind"] != "bus")]
    out_console.print(
        f"{result.feeder}: {scenario.years + 1} years, {result.n_ac_solves} AC solves in "
        f"{result.runtime_s:.1f} s; {len(hit)} element limits exceeded "
        f"({int(hit['pre_existing'].sum())} pre-existing that got worse)", highlight=False)
    for row in hit.head(10).itertuples(index=False):
        out_console.print(f"  {row.year}: {row.element} {row.limit} ({row.value:.4g} {row.unit})",
                          highlight=False)
    if result.n_not_converged:
        err_console.print(f"[yellow]warning:[/] {result.n_not_converged} AC solves did not "
                          "converge; those intervals are left out of every table")
    out_console.print(f"report: {paths['report'].resolve()}", highlight=False)
