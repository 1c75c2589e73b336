"""``derms hosting-capacity``: snapshot hosting capacity per bus (and phase) for PV and load.

Register in main.py with
``app.command(name="hosting-capacity")(hosting_cmd.hosting_capacity)``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from derms.analysis.constraints import MAX_SIZE_KW
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

app = typer.Typer(help="Snapshot hosting capacity.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

METHODS = ("fast", "fast-groups", "brute-force", "linear")


def parse_buses(text: str | None) -> list[str] | None:
    """``"671,675.1,611.3"`` -> ["671", "675.1", "611.3"]; None/"" = every primary bus."""
    if text is None or not text.strip():
        return None
    items = [s.strip() for s in text.replace(";", ",").split(",")]
    if any(not s for s in items):
        raise InputError(f"--buses {text!r}: empty item in the list")
    return items


@app.command()
@handle_errors
def hosting_capacity(
    master: MasterArg,
    out: OutOpt,
    kind: Annotated[str, typer.Option(
        help="pv (generation: export), load (EV charging: import) or both.")] = "pv",
    method: Annotated[str, typer.Option(
        help="fast-groups (every site's size on a batched AC power flow of the network, "
             "then OpenDSS checks one site per binding constraint until it agrees; "
             "disagreeing groups re-verified), fast (the same sizes, every site checked on "
             "OpenDSS), brute-force (OpenDSS bisection, the reference) or linear (linear "
             "sensitivities only).")] = "fast-groups",
    buses: Annotated[str | None, typer.Option(
        help="Comma-separated buses, optionally with phases: 671,611.3,684.1.3 (default: "
             "every energised primary bus, >= 1 kV line-to-neutral, but the source bus).")
    ] = None,
    max_kw: Annotated[float, typer.Option(
        help="Largest size searched [kW] (total over the site's phases).")] = 10_000.0,
    tol_kw: Annotated[float, typer.Option(
        help="Resolution of the search [kW]: the brute-force bisection's; the fast methods "
             "stop within 2 % + this of their AC-verified root, on the safe side.")] = 1.0,
    v_deviation_pu: Annotated[float, typer.Option(
        help="Largest voltage change from the base case [pu], e.g. 0.03; 0 (default) = not "
             "checked, as in the DESIGN.md definition (voltage band and thermal only).")
    ] = 0.0,
    reverse_flow: Annotated[bool, typer.Option(
        "--reverse-flow", help="Also forbid export at the feeder head.")] = False,
    skip_default_ratings: Annotated[bool, typer.Option(
        "--skip-default-ratings",
        help="Leave lines with OpenDSS's default rating (400/600 A) out of the thermal "
             "criterion.")] = False,
    over_time: Annotated[str | None, typer.Option(
        help="Hosting capacity over a horizon of load profiles instead of the model's own "
             "loads: minmax (the lowest- and highest-load intervals) or all (every "
             "interval); hosting_capacity.csv then has each site's smallest value and "
             "hosting_capacity_time.csv every interval's.")] = None,
    start: Annotated[str, typer.Option(help="With --over-time: horizon start (UTC).")
                     ] = "2026-07-01",
    days: Annotated[float, typer.Option(help="With --over-time: horizon [days].")] = 1.0,
    step: Annotated[str, typer.Option(help="With --over-time: interval (1min .. 1h).")
                    ] = "1h",
    seed: Annotated[int, typer.Option(min=0, help="With --over-time: seed of the load shapes.")] = 0,
    max_iterations: MaxIterOpt = 100,
    force: ForceOpt = False,
) -> None:
    """Hosting capacity per bus: write hosting_capacity.csv/.parquet/.geojson,
    pre_existing.csv and report.html (feeder map coloured by hc_kw) to OUT.

    hc_kw is the total over the site's phases (three-phase kW at a three-phase bus, the sum
    over the phases present or named otherwise), a balanced unity-power-factor injection
    with regulators and capacitors frozen at the base case. Limits: 0.95-1.05 pu
    (tolerance 0.001), the deviation limit, 100 % of normal ratings (tolerance 1 %);
    base-case violations are held to their base value.
    """
    kinds = {"pv": ["pv"], "load": ["load"], "both": ["pv", "load"]}.get(kind.strip().lower())
    if kinds is None:
        raise InputError(f"--kind {kind!r}: expected pv, load or both")
    method = method.strip().lower()
    if method not in METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0 < max_kw <= MAX_SIZE_KW:
        raise InputError(f"--max-kw {max_kw}: the largest size must be positive and at most "
                         f"{MAX_SIZE_KW:g} kW")
    if not tol_kw > 0:
        raise InputError(f"--tol-kw {tol_kw}: the resolution must be positive")
    if v_deviation_pu < 0:
        raise InputError(f"--v-deviation-pu {v_deviation_pu}: must be >= 0 (0 = not checked)")
    refuse_early(out, force, master)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from derms.analysis.constraints import Limits
    from derms.analysis.hosting_brute import hosting_capacity_brute
    from derms.analysis.hosting_capacity import (
        HostingCriteria,
        hosting_capacity_fast,
        resolve_sites,
    )
    from derms.grid.bundled import resolve_master
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.collect import build_index
    from derms.powerflow.control_state import freeze_base_case
    from derms.powerflow.engine import OpenDSSEngine, SolveSettings
    from derms.reports.hosting_html import HostingReport, write_hosting_outputs

    criteria = HostingCriteria(
        limits=Limits(reverse_power_kw=0.0 if reverse_flow else None),
        v_deviation_pu=v_deviation_pu or None, skip_default_ratings=skip_default_ratings,
        reverse_flow=reverse_flow, p_max_kw=max_kw, tol_kw=tol_kw)
    bus_list = parse_buses(buses)
    path = resolve_master(master)
    results = {}
    if over_time is not None:
        if over_time not in ("minmax", "all"):
            raise InputError(f"--over-time {over_time!r}: expected minmax or all")
        if method not in ("fast", "fast-groups", "linear"):
            raise InputError("--over-time runs the fast methods (fast, fast-groups, linear)")
        return _over_time(path, out, force, kinds, method, bus_list, criteria, over_time,
                          start, days, step, seed, max_iterations)
    with OpenDSSEngine(path, SolveSettings(max_iterations=max_iterations)) as engine:
        feeder = read_feeder(engine.ctx, engine.source_master)
        freeze_base_case(engine)
        sites = resolve_sites(engine, bus_list)
        index = build_index(engine)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=err_console) as bar:
            for k in kinds:
                task = bar.add_task(f"{k} sites ({method})", total=len(sites))

                def progress(done: int, total: int, task=task) -> None:
                    bar.update(task, completed=done, total=total)

                if method == "brute-force":
                    results[k] = hosting_capacity_brute(engine, sites, k, criteria, index=index,
                                                        on_progress=progress)
                else:
                    results[k] = hosting_capacity_fast(engine, sites, k, criteria,
                                                       verify={"fast": True, "fast-groups": "groups",
                                                               "linear": False}[method],
                                                       index=index,
                                                       on_progress=progress)
    report = HostingReport(feeder, results, method, str(path))
    with output_folder(out, force, feeder=path) as tmp:
        paths = write_hosting_outputs(report, tmp)
    paths = {k: out / p.name for k, p in paths.items()}
    for k, res in results.items():
        hc = res.table["hc_kw"]
        out_console.print(
            f"{feeder.name} {k}: {len(sites)} sites, {res.n_ac_solves} AC solves in "
            f"{res.runtime_s:.1f} s; hc_kw min {hc.min():,.0f}, median {hc.median():,.0f}, "
            f"max {hc.max():,.0f}; {len(res.pre_existing)} pre-existing violations held at "
            "their base value", highlight=False)
    out_console.print(f"table: {paths['csv'].resolve()}", highlight=False)
    out_console.print(f"report: {paths['report'].resolve()}", highlight=False)


def _over_time(path, out, force, kinds, method, bus_list, criteria, mode, start, days, step,
               seed, max_iterations) -> None:
    """``--over-time``: the snapshot method at chosen intervals of a horizon."""
    import pandas as pd

    from derms.analysis.hosting_capacity import resolve_sites
    from derms.analysis.hosting_series import hosting_capacity_over_time, pick_steps
    from derms.cli.common import parse_start, parse_step, stage_progress
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine, SolveSettings
    from derms.reports.hosting_html import HostingReport, write_hosting_outputs
    from derms.studies.qsts_study import StudyConfig, study_profiles

    cfg = StudyConfig(days=days, step=parse_step(step), start=parse_start(start), seed=seed)
    results, frames = {}, []
    with OpenDSSEngine(path, SolveSettings(max_iterations=max_iterations)) as engine:
        engine.solve_snapshot()
        feeder = read_feeder(engine.ctx, engine.source_master)
        profiles, _ = study_profiles(feeder, cfg)
        steps = pick_steps(engine, profiles, mode)
        sites = resolve_sites(engine, bus_list)
        verify = {"fast": True, "fast-groups": "groups", "linear": False}[method]
        with stage_progress() as progress:
            for k in kinds:
                per_step, results[k] = hosting_capacity_over_time(
                    engine, profiles, sites, k, criteria, steps=steps, verify=verify,
                    on_progress=lambda d, n, k=k: progress(f"{k}: snapshots ({method})", d, n))
                frames.append(per_step)
    report = HostingReport(feeder, results, f"{method}, over time ({mode})", str(path))
    table = pd.concat(frames, ignore_index=True)
    table["timestamp"] = pd.DatetimeIndex(table["timestamp"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    with output_folder(out, force, feeder=path, seed=seed) as tmp:
        paths = write_hosting_outputs(report, tmp)
        table[["bus", "phases", "kind", "timestamp", "hc_kw", "binding",
               "binding_element"]].to_csv(tmp / "hosting_capacity_time.csv", index=False)
    for k, res in results.items():
        hc = res.table["hc_kw"]
        out_console.print(
            f"{feeder.name} {k}: {len(sites)} sites x {len(steps)} snapshots, "
            f"{res.n_ac_solves} AC solves in {res.runtime_s:.1f} s; smallest over the "
            f"horizon: min {hc.min():,.0f}, median {hc.median():,.0f}, max {hc.max():,.0f} kW",
            highlight=False)
    out_console.print(f"table: {(out / paths['csv'].name).resolve()}", highlight=False)
