"""``derms dispatch``: network-constrained DER dispatch on a feeder with a seeded scenario.

Places PV, batteries and EV chargers on a share of the feeder's customers, simulates the
uncontrolled case, a rule-based peak-shaving baseline and the optimised plan on the full
AC model (OpenDSS), and writes ``summary.json``, ``report.html``, the schedules, DER
table and ledger as CSV, a README and an OpenDSS replay set (``opendss/``) to ``--out``
(written to a temporary sibling folder and renamed into place; a non-empty ``--out``
needs ``--force``). Register in main.py with ``app.command(name="dispatch")(dispatch_cmd.dispatch)``.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated

import typer

from derms.cli.common import (
    ForceOpt,
    MasterArg,
    OutOpt,
    err_console,
    handle_errors,
    out_console,
    output_folder,
)

app = typer.Typer(help="Network-constrained DER dispatch.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


class PolicyChoice(str, Enum):
    """Curtailment fairness policies of the planner."""

    equal_proportional = "equal_proportional"
    proportional_to_capacity = "proportional_to_capacity"
    cost_minimal = "cost_minimal"


class ForecastChoice(str, Enum):
    """Knowledge of PV and load the optimised case plans with."""

    noisy = "noisy"
    model = "model"
    perfect = "perfect"


Share = Annotated[float, typer.Option(min=0.0, max=1.0)]


@app.command()
@handle_errors
def dispatch(
    master: MasterArg,
    out: OutOpt,
    pv: Annotated[float, typer.Option(
        "--pv", help="Share of customers (loads) with PV, 0..1.")] = 0.3,
    battery: Annotated[float, typer.Option(
        "--battery", help="Share of customers with a battery, 0..1.")] = 0.25,
    ev: Annotated[float, typer.Option("--ev", help="Share of customers with an EV, 0..1.")
                  ] = 0.2,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the placement and sizing draws.")] = 1,
    horizon: Annotated[str, typer.Option(
        help="Planning horizon, e.g. 24h (a whole number of steps).")] = "24h",
    step: Annotated[str, typer.Option(help="Interval length, e.g. 15min or 1h.")] = "15min",
    policy: Annotated[PolicyChoice, typer.Option(
        help="Curtailment policy: how PV curtailment is shared.")] = PolicyChoice.cost_minimal,
    export_limit_kw: Annotated[float | None, typer.Option(
        "--export-limit-kw", help="Largest export at the substation [kW] (head import >= "
                                  "-X; a negative X asks for an import of at least |X|). "
                                  "Default: none.")] = None,
    forecast: Annotated[ForecastChoice, typer.Option(
        help="'perfect': one plan with perfect knowledge (exported as schedule.csv and the "
             "OpenDSS replay); 'noisy' / 'model': also re-plan on a rolling basis (every "
             "--replan-every) with noisy forecasts "
             "(AR(1) errors) or derms's own load forecasts and report that executed peak as "
             "peak_optimised_kw (summary 'rolling' block).")] = ForecastChoice.perfect,
    replan_every: Annotated[str | None, typer.Option(
        "--replan-every", help="Re-plan period of the rolling run (--forecast noisy or "
                               "model), a whole number of steps, e.g. 15min or 1h. Default: "
                               "15min, or one step when steps are longer.")] = None,
    group: Annotated[str, typer.Option(
        "--group", help="Plan DERs in groups of about N (compatible DERs near each other "
                        "moving in fixed proportion): a smaller LP for large fleets; the AC "
                        "check, the repair, the schedule and the ledger stay per DER. "
                        "The rolling run (--forecast noisy/model) plans in the same "
                        "groups. 1 = every DER on its own; auto = groups of 4 from 500 "
                        "DERs, else 1.")] = "auto",
    realtime: Annotated[bool, typer.Option(
        "--realtime/--no-realtime", help="The rolling run (--forecast noisy/model) "
        "executes each interval on the AC model and corrects the ones that break a limit "
        "(PV, batteries, EV charging), as the fast corrective cycle does; "
        "--no-realtime executes the re-plans as planned.")] = True,
    force: ForceOpt = False,
) -> None:
    """Plan the DERs' dispatch within voltage and thermal limits, verify it on the AC
    model and compare it with the uncontrolled and rule-based cases."""
    from datetime import timedelta

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from derms.dispatch import EXPORT_LIMIT_MAX_KW
    from derms.dispatch.plan import ObjectiveConfig
    from derms.errors import InputError
    from derms.reports.dispatch_outputs import (
        parse_horizon,
        parse_replan,
        run_dispatch_study,
        write_dispatch_outputs,
    )
    from derms.studies.dispatch_scenario import ScenarioConfig

    for name, value in (("--pv", pv), ("--battery", battery), ("--ev", ev)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name} {value:g}: expected a share of customers in [0, 1]")
    if export_limit_kw is not None and not (math.isfinite(export_limit_kw)
                                            and abs(export_limit_kw) < EXPORT_LIMIT_MAX_KW):
        raise InputError(f"--export-limit-kw {export_limit_kw:g}: expected a finite number "
                         f"within ±{EXPORT_LIMIT_MAX_KW:g} kW")
    if seed < 0:
        raise InputError(f"--seed {seed}: expected a non-negative integer")
    group_size = _group_size(group)
    step_td, n_steps = parse_horizon(horizon, step)
    if step_td < timedelta(minutes=1):
        raise InputError(f"--step {step!r}: expected at least 1 minute")
    ignored = [o for o, given in (("--replan-every", replan_every is not None),
                                  ("--no-realtime", not realtime)) if given]
    if ignored and forecast.value == "perfect":
        err_console.print(f"[yellow]note:[/] {' and '.join(ignored)} apply to the rolling "
                          "run (--forecast noisy or model); ignored with --forecast perfect")
    replan_every = parse_replan(replan_every, step_td)
    cfg = ScenarioConfig(pv_penetration=pv, battery_penetration=battery, ev_penetration=ev,
                         seed=seed, step=step_td, n_steps=n_steps)
    objective = ObjectiveConfig(export_limit_kw=export_limit_kw,
                                curtailment_policy=policy.value)
    from derms.grid.bundled import resolve_master

    with output_folder(out, force, feeder=resolve_master(master), seed=seed) as tmp, Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=err_console, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        study = run_dispatch_study(master, cfg, objective, forecast=forecast.value,
                                   replan_every=replan_every, opendss_dir=tmp / "opendss",
                                   on_stage=lambda s: bar.update(task, description=s),
                                   group_size=group_size, realtime=realtime)
        bar.update(task, description="write outputs")
        write_dispatch_outputs(study, tmp)
    s = study.summary
    out_console.print(
        f"{study.feeder}: {s['n_controllable_ders']} DERs ({s['n_pv']} PV, {s['n_battery']} "
        f"batteries, {s['n_ev']} EVs"
        + (f"; {s['n_ders_outside_horizon']} outside the horizon, not counted"
           if s["n_ders_outside_horizon"] else "")
        + f"), {s['n_steps']} intervals"
        + (f", planned as {s['n_planned_ders']} groups of about {s['group_size']}"
           f" ({s['group_size_from']})" if s["group_size"] > 1 else ""), highlight=False)
    out_console.print(
        f"peak kW: uncontrolled {s['peak_uncontrolled_kw']:.1f}, rule-based "
        f"{s['peak_rule_based_kw']:.1f}, optimised {s['peak_optimised_kw']:.1f} "
        f"({s['optimised_mode']})", highlight=False)
    out_console.print(
        f"violations (AC): uncontrolled {s['violations_uncontrolled']}, rule-based "
        f"{s['violations_rule_based']}, optimised {s['violations_optimised']}; solve "
        f"{s['solve_s']:.2f} s, AC verify {s['ac_verify_s']:.2f} s, total "
        f"{s['runtime_s']:.1f} s", highlight=False)
    if s["violations_optimised"]:
        err_console.print(f"[yellow]warning:[/] the optimised plan still has "
                          f"{s['violations_optimised']} violations in the AC simulation "
                          "(violations.csv names them)")
    for note in s.get("plan_notes", ()):
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    if s.get("n_ev_short"):
        err_console.print(f"[yellow]warning:[/] {s['n_ev_short']} EV session(s) end "
                          f"{s['ev_short_kwh']:.1f} kWh short of their energy: a network "
                          "limit leaves no other way (ledger_ev_shortfalls.csv names it)")
    out_console.print(f"report: {(out / 'report.html').resolve()}", highlight=False)


def _group_size(text: str) -> int | None:
    """``--group``: "auto" -> None (chosen from the fleet's size), else a size >= 1."""
    from derms.errors import InputError

    if text.strip().lower() == "auto":
        return None
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise InputError(f"--group {text!r}: expected 'auto' or a group size of at least 1")
    return size
