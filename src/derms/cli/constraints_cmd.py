"""``derms constraints forecast``: predicted voltage/thermal violations over the next hours.

Reads a load history and a PV history (CSV ``timestamp,value``, timestamps with a zone),
forecasts both (quantiles, data before the origin only), places PV on a share of the
feeder's loads, pushes the forecast scenarios through QSTS and writes
``violations_forecast.csv``, ``hourly.csv`` and ``report.html`` to ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from derms.cli.common import (
    ForceOpt,
    MasterArg,
    OutOpt,
    handle_errors,
    out_console,
    output_folder,
    refuse_early,
)
from derms.errors import InputError
from derms.forecast.series import clean_series
from derms.studies.series_files import read_series_csv
from derms.timeutil import parse_duration

app = typer.Typer(help="Constraint forecasts (predicted violations).", no_args_is_help=True)


def _parse_origin(text: str | None, load: pd.Series, pv: pd.Series) -> pd.Timestamp:
    """Given origin (UTC if no zone) or, by default, the end of the shorter history."""
    if text is None:   # on the histories' grid (timestamps with clock jitter snap to it)
        cl, cp = clean_series(load, "load history"), clean_series(pv, "pv history")
        return min(cl.values.index[-1], cp.values.index[-1]) + cl.step
    try:
        ts = pd.Timestamp(text)
    except ValueError:
        raise InputError(f"--origin {text!r}: expected an ISO 8601 datetime") from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


@app.command("forecast")
@handle_errors
def forecast(
    master: MasterArg,
    out: OutOpt,
    load_history: Annotated[Path, typer.Option(
        help="CSV timestamp,value of the feeder's load (any power unit, import positive); "
             "normalised by its peak to a multiplier of each load's base kW.")],
    pv_history: Annotated[Path, typer.Option(
        help="CSV timestamp,value of measured PV output (any unit); normalised by "
             "--pv-capacity to per unit of each PV system's rating.")],
    pv_penetration: Annotated[float, typer.Option(
        help="Share of customers (loads) with PV, 0..1, sized as in `derms study`.")] = 0.5,
    origin: Annotated[str | None, typer.Option(
        help="Forecast origin, ISO 8601 (UTC if no zone); default: end of the histories.")
    ] = None,
    horizon: Annotated[str, typer.Option(help="Horizon, e.g. 24h or 48h.")] = "24h",
    pv_capacity: Annotated[float | None, typer.Option(
        help="PV capacity in the history's unit; default its 99.9th percentile.")] = None,
    latitude: Annotated[float | None, typer.Option(help="PV site latitude [deg].")] = None,
    longitude: Annotated[float | None, typer.Option(help="PV site longitude [deg].")] = None,
    tz: Annotated[str, typer.Option(help="Local time zone for calendar features.")] = "UTC",
    method: Annotated[str, typer.Option(help="Scenarios: grid (3x3) or copula.")] = "grid",
    samples: Annotated[int, typer.Option(help="Samples of the copula method.")] = 100,
    threshold: Annotated[float, typer.Option(
        help="Probability at or above which an hour is predicted in violation.")] = 0.5,
    seed: Annotated[int, typer.Option(min=0, help="Seed for PV placement and samples.")] = 0,
    force: ForceOpt = False,
) -> None:
    """Forecast violations (over/undervoltage, thermal) with their probability."""
    from derms.grid.bundled import resolve_master
    from derms.reports.constraint_forecast_html import write_constraint_forecast_report
    from derms.studies.constraint_study import run_constraint_forecast

    refuse_early(out, force, master, (load_history, pv_history))  # before the long work
    if method not in ("grid", "copula"):
        raise InputError(f"--method {method!r}: expected grid or copula")
    load = read_series_csv(load_history).dropna()
    pv_s = read_series_csv(pv_history).dropna()
    if len(load) < 2 or len(pv_s) < 2:
        raise InputError("histories need at least 2 values each")
    t0 = _parse_origin(origin, load, pv_s)
    for name, file, hist in (("load", load_history, load), ("pv", pv_history, pv_s)):
        if t0 <= hist.index[0]:
            raise InputError(f"--origin {t0.isoformat()} is not after the start of "
                             f"--{name}-history {file} ({hist.index[0].isoformat()}): a "
                             "forecast needs history before its origin")
    if pv_capacity is None and not (pv_s > 0).any():
        raise InputError(f"--pv-history {pv_history}: no value above 0, so there is no PV "
                         "capacity to scale by; give --pv-capacity")
    h = pd.Timedelta(parse_duration(horizon, "--horizon"))
    if not pd.Timedelta("1h") <= h <= pd.Timedelta("7D"):
        raise InputError(f"--horizon {horizon!r}: expected between 1h and 168h")
    path = resolve_master(master)
    kw = {"n_samples": samples} if method == "copula" else {}
    fc, feeder_name, n_pv = run_constraint_forecast(
        path, load, pv_s, pv_penetration=pv_penetration, seed=seed, origin=t0, horizon=h,
        pv_capacity=pv_capacity, latitude=latitude, longitude=longitude, tz=tz,
        method=method, threshold=threshold, **kw)
    with output_folder(out, force, feeder=path, seed=seed,
                       inputs=(load_history, pv_history),
                       extra={"pv_penetration": pv_penetration, "pv_capacity": pv_capacity,
                              "method": method, "threshold": threshold,
                              "origin": t0.isoformat(), "horizon": horizon}) as tmp:
        fc.violations.to_csv(tmp / "violations_forecast.csv", index=False)
        fc.pre_existing.to_csv(tmp / "pre_existing.csv", index=False)
        fc.hourly.to_csv(tmp / "hourly.csv", index=False)
        fc.pv_systems.to_csv(tmp / "pv_systems.csv", index=False)
        write_constraint_forecast_report(fc, tmp / "report.html", feeder=feeder_name)
    report = out / "report.html"
    hot = fc.hourly[fc.hourly["probability"] >= threshold]
    by_kind = ", ".join(f"{k}: {n}" for k, n in hot.groupby("kind").size().items()) or "none"
    out_console.print(
        f"{n_pv} PV systems; {len(fc.scenarios)} scenarios over {len(fc.t)} intervals "
        f"from {fc.t[0].isoformat()} in {fc.runtime_s:.1f} s; hours with probability >= "
        f"{threshold:g}: {by_kind}", highlight=False)
    if len(fc.pre_existing):
        pre = fc.pre_existing.groupby("kind")["element"].nunique()
        out_console.print("the forecast load by itself (PV at zero) breaks: " + ", ".join(
            f"{k}: {n} element(s)" for k, n in pre.items()) + " (pre_existing.csv)",
            highlight=False)
    for note in fc.notes:
        out_console.print(f"note: {note}", highlight=False)
    out_console.print(f"report: {report.resolve()}", highlight=False)
