"""``derms forecast``: backtests of the quantile forecaster against the baselines."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.progress import Progress

from derms.cli.common import (
    ForceOpt,
    OutOpt,
    err_console,
    handle_errors,
    out_console,
    output_folder,
    refuse_early,
)
from derms.errors import InputError
from derms.forecast import ForecastSpec, backtest
from derms.reports.forecast_html import write_backtest_outputs
from derms.studies.series_files import (
    duplicate_times_note,
    read_series_csv,
    read_weather_csv,
)
from derms.timeutil import parse_duration

app = typer.Typer(help="Load and PV forecasts: backtests.", no_args_is_help=True)


@app.command("backtest")
@handle_errors
def backtest_cmd(
    series: Annotated[Path, typer.Option(
        "--series", help="CSV with columns timestamp,value (ISO 8601 with zone).")],
    out: OutOpt,
    kind: Annotated[str, typer.Option(help="load or pv.")] = "load",
    capacity_kw: Annotated[float | None, typer.Option(
        "--capacity-kw", help="PV capacity in the series' unit (normalises PV nRMSE).")] = None,
    horizon: Annotated[str, typer.Option(help="Forecast horizon, e.g. 24h or 48h.")] = "24h",
    tz: Annotated[str, typer.Option(
        help="IANA time zone of the calendar and of the midnight origins.")] = "UTC",
    latitude: Annotated[float | None, typer.Option(help="Site latitude (PV clear sky).")] = None,
    longitude: Annotated[float | None, typer.Option(help="Site longitude.")] = None,
    holidays: Annotated[str | None, typer.Option(help="Holiday calendar: US.")] = None,
    test_days: Annotated[int, typer.Option(min=1, help="Length of the test period, days.")] = 365,
    rounds: Annotated[int, typer.Option(min=10, max=5000, help="Boosting rounds.")] = 200,
    weather: Annotated[Path | None, typer.Option(
        help="CSV: timestamp + weather columns at target times (forecasts, not observations, "
             "for an honest backtest).")] = None,
    force: ForceOpt = False,
) -> None:
    """Rolling-origin backtest; writes metrics.json, forecasts.csv/.parquet and report.html."""
    if kind not in ("load", "pv"):
        raise InputError(f"--kind {kind!r}: expected load or pv")
    _check_tz(tz)
    _check_location(kind, latitude, longitude)
    spec = ForecastSpec(kind=kind, horizon=pd.Timedelta(parse_duration(horizon, "--horizon")),
                        tz=tz, latitude=latitude, longitude=longitude, holidays=holidays,
                        n_rounds=rounds)
    refuse_early(out, force, inputs=(series, weather))  # before the long work
    values = read_series_csv(series)
    if tz == "UTC" and (off := _local_offset(series)):
        err_console.print(f"[yellow]warning:[/] {series} carries the UTC offset {off}, but "
                          "--tz is UTC: origins are UTC midnights and calendar features UTC "
                          "hours; pass --tz (e.g. America/New_York) for local midnights",
                          highlight=False)
    exog = read_weather_csv(weather) if weather is not None else None
    note = None if exog is None else duplicate_times_note(exog, weather)
    if note:
        err_console.print(f"[yellow]warning:[/] {note}", highlight=False)
    with warnings.catch_warnings(), Progress(console=err_console, transient=True) as bar:
        warnings.simplefilter("ignore", RuntimeWarning)
        task = bar.add_task("backtest (model refits)", total=None)
        result = backtest(values, spec, capacity=capacity_kw,
                          test_length=pd.Timedelta(days=test_days),
                          progress=lambda i, n: bar.update(task, completed=i, total=n),
                          weather=exog)
    for msg in result.warnings:
        err_console.print(f"[yellow]warning:[/] {msg}", highlight=False, markup=True)
    with output_folder(out, force, inputs=(series,) + ((weather,) if weather else ())) as tmp:
        write_backtest_outputs(result, tmp, kind, "value", capacity_kw, str(series))
    for name, m in result.metrics.items():
        if m.get("n"):
            cov = m.get("coverage_p10_p90")
            nrmse = "n/a" if m.get("nrmse") is None else f"{m['nrmse']:.3%}"
            out_console.print(f"{name:24s} MAE {m['mae']:.4g}  nRMSE {nrmse}  "
                              f"CRPS {m['crps']:.4g}" + (f"  P10–P90 coverage {cov:.1%}"
                                                         if cov is not None else ""))
    out_console.print(f"report: {out / 'report.html'}")


def _local_offset(path: Path) -> str | None:
    """The UTC offset the file's first timestamps carry, when it is not zero."""
    import re

    with open(path, encoding="utf-8", errors="replace") as fh:
        for _, line in zip(range(50), fh, strict=False):
            m = re.search(r"([+-]\d{2}:?\d{2})\s*(?:[,;]|$)", line.split(",")[0] + ",")
            if m and m.group(1).replace(":", "") not in ("+0000", "-0000"):
                return m.group(1)
    return None


def _check_tz(tz: str) -> None:
    from zoneinfo import available_timezones

    if tz not in available_timezones() and tz != "UTC":
        raise InputError(f"--tz {tz!r}: not a time zone name (e.g. UTC, Europe/Paris, "
                         "America/Denver, Etc/GMT+7)")


def _check_location(kind: str, latitude: float | None, longitude: float | None) -> None:
    """--latitude / --longitude (:func:`derms.forecast.features.check_location`, named as
    the options); a warning where --kind load does not use them."""
    from derms.forecast.features import check_location

    check_location(latitude, longitude, ("--latitude", "--longitude"))
    if latitude is not None and kind != "pv":
        err_console.print("[yellow]warning:[/] --latitude/--longitude are used with --kind pv "
                          "only (the clear-sky features); ignored for --kind load",
                          highlight=False)
