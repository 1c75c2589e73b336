"""Backtest outputs: metrics.json, forecasts.csv/.parquet and a self-contained HTML report.

``forecasts.csv`` is the whole evidence: one row per method, origin and target time
(``origin,timestamp,method,p10,p50,p90,actual,daylight``; times ISO 8601 UTC; values in
the series' unit; baselines leave p10/p90 empty). ``metrics.json`` is recomputed from it
by :func:`derms.forecast.metrics.metrics_from_table`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from derms.forecast.backtest import MODEL_NAME, BacktestResult
from derms.reports.html_format import fmt_value


def write_backtest_outputs(result: BacktestResult, out: Path, kind: str, unit: str,
                           capacity: float | None, source: str) -> dict[str, Path]:
    """Write metrics.json, forecasts.csv, forecasts.parquet and report.html into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table = result.forecasts.copy()
    for col in ("origin", "timestamp"):
        table[col] = table[col].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    paths = {"forecasts_csv": out / "forecasts.csv", "forecasts_parquet": out / "forecasts.parquet",
             "metrics": out / "metrics.json", "report": out / "report.html"}
    table.to_csv(paths["forecasts_csv"], index=False, float_format="%.17g")
    result.forecasts.to_parquet(paths["forecasts_parquet"], index=False)
    doc = {
        "source": source, "kind": kind, "unit": unit, "capacity": capacity,
        "test_start": result.test_start.isoformat(), "test_end": result.test_end.isoformat(),
        "definitions": "MAE/RMSE over all intervals with an actual; nRMSE = RMSE / capacity "
                       "(pv) or / peak actual of the test period (load); CRPS = 2 x mean "
                       "pinball loss over the quantiles produced (point forecasts: their "
                       "MAE); coverage_p10_p90 = share of actuals in [p10, p90] (pv: sun up).",
        "warnings": result.warnings,
        "methods": result.metrics,
        "fits": result.fits,
    }
    from derms.jsonutil import jsonable

    paths["metrics"].write_text(json.dumps(jsonable(doc), indent=2, default=str,
                                           allow_nan=False))
    paths["report"].write_text(_report_html(result, kind, unit, source))
    return paths


def _metrics_table(metrics: dict[str, dict], kind: str) -> str:
    head = ("<tr><th>method</th><th>MAE</th><th>RMSE</th><th>nRMSE</th><th>CRPS</th>"
            "<th>P10–P90 coverage</th><th>MAE vs best seasonal naive</th>"
            "<th>MAE vs persistence</th><th>n</th></tr>")
    naive = [metrics[m]["mae"] for m in ("seasonal_naive_day", "seasonal_naive_week")
             if m in metrics and metrics[m].get("n")]
    best_naive = min(naive) if naive else np.nan
    pers = metrics.get("persistence", {}).get("mae", np.nan)
    rows = []
    for name, m in metrics.items():
        if not m.get("n"):
            continue
        rel_n = (m["mae"] / best_naive - 1) * 100 if best_naive else np.nan
        rel_p = (m["mae"] / pers - 1) * 100 if pers else np.nan
        cov = m.get("coverage_p10_p90")
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{fmt_value(m['mae'])}</td>"
            f"<td>{fmt_value(m['rmse'])}</td><td>{_pct(m.get('nrmse'))}</td>"
            f"<td>{fmt_value(m['crps'])}</td><td>{_pct(cov)}</td>"
            f"<td>{_rel(rel_n)}</td><td>{_rel(rel_p)}</td><td>{m['n']}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _pct(v) -> str:
    return "" if v is None or not np.isfinite(v) else f"{100 * v:.1f} %"


def _report_html(result: BacktestResult, kind: str, unit: str, source: str) -> str:
    fc = result.forecasts
    model = fc[fc["method"] == MODEL_NAME]
    figs = []
    if not model.empty:
        # a fortnight in the middle of the test period, as issued day-ahead
        mid = model["origin"].sort_values().iloc[len(model) // 2].normalize()
        window = model[(model["timestamp"] >= mid) & (model["timestamp"] < mid + pd.Timedelta(days=14))]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=window["timestamp"], y=window["p90"], line={"width": 0},
                                 name="P90", showlegend=False))
        fig.add_trace(go.Scatter(x=window["timestamp"], y=window["p10"], fill="tonexty",
                                 line={"width": 0}, name="P10–P90", fillcolor="rgba(31,119,180,0.25)"))
        fig.add_trace(go.Scatter(x=window["timestamp"], y=window["p50"], name="P50 (model)"))
        fig.add_trace(go.Scatter(x=window["timestamp"], y=window["actual"], name="actual",
                                 line={"color": "black", "width": 1}))
        naive = fc[(fc["method"] == "seasonal_naive_day") & fc["timestamp"].isin(window["timestamp"])]
        fig.add_trace(go.Scatter(x=naive["timestamp"], y=naive["p50"], name="seasonal naive (day)",
                                 line={"dash": "dot", "width": 1}))
        fig.update_layout(title="Day-ahead forecasts, two weeks of the test period (UTC)",
                          yaxis_title=unit, height=420, margin={"t": 50})
        figs.append(fig)
    lead = fc.assign(lead_h=(fc["timestamp"] - fc["origin"]) / pd.Timedelta(hours=1),
                     abs_err=(fc["p50"] - fc["actual"]).abs())
    by_lead = lead.groupby(["method", "lead_h"], sort=True)["abs_err"].mean().reset_index()
    fig = go.Figure()
    for name, g in by_lead.groupby("method", sort=False):
        fig.add_trace(go.Scatter(x=g["lead_h"], y=g["abs_err"], name=name))
    fig.update_layout(title="Mean absolute error by lead time", xaxis_title="hours ahead",
                      yaxis_title=f"MAE ({unit})", height=380, margin={"t": 50})
    figs.append(fig)
    monthly = lead.assign(month=lead["timestamp"].dt.strftime("%Y-%m")).groupby(
        ["method", "month"])["abs_err"].mean().reset_index()
    fig = go.Figure()
    for name, g in monthly.groupby("method", sort=False):
        fig.add_trace(go.Bar(x=g["month"], y=g["abs_err"], name=name))
    fig.update_layout(title="MAE by month", yaxis_title=f"MAE ({unit})", barmode="group",
                      height=380, margin={"t": 50})
    figs.append(fig)
    body = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figs)
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in result.warnings)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>derms forecast backtest"
            f"</title><script>{get_plotlyjs()}</script><style>body{{font-family:sans-serif;"
            f"margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;"
            f"padding:4px 8px;text-align:right}}</style></head><body>"
            f"<h1>Forecast backtest — {html.escape(kind)}</h1>"
            f"<p>Series: {html.escape(source)}. Test period {result.test_start:%Y-%m-%d %H:%M} "
            f"to {result.test_end:%Y-%m-%d %H:%M} UTC; origins every local midnight; each "
            f"forecast uses only data before its origin; the model is refitted every 30 days "
            f"(expanding window).</p>"
            f"{'<h2>Warnings</h2><ul>' + warn + '</ul>' if warn else ''}"
            f"<h2>Accuracy</h2>{_metrics_table(result.metrics, kind)}"
            f"<p>Negative percentages: lower MAE than the reference.</p>{body}</body></html>")


def _rel(x: float) -> str:
    """A relative difference [%] with its sign; "n/a" where it has no reference (a zero or
    missing baseline MAE)."""
    return f"{x:+.1f} %" if np.isfinite(x) else "n/a"
