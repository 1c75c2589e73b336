"""Files of an operating-envelope computation (documented in docs/data-formats.md).

``envelopes.csv`` / ``.parquet``: ``connection_point,bus,phase,timestamp,export_limit_kw,
import_limit_kw`` — one row per connection point and interval (timestamp = interval start,
ISO 8601 UTC); limits are site totals over the connection point's phases [kW], >= 0.
``intervals.csv``: per direction and interval, the totals, the binding constraint and the
AC check (excess over the limit: > 0 = violated). ``connection_points.csv``: the
connection points (load, bus, phases, capacity, mean/min envelopes) with bus coordinates.
``envelopes.geojson``: the connection points as points (coordinates as the model gives
them), their mean and minimum envelopes as properties. ``pre_existing.csv``: base-case
violations held to their base value. ``summary.json``: headline figures.
``report.html``: totals over time, the spread across connection points, the map.
"""

from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from derms.analysis.envelopes import EnvelopeResult
from derms.grid.model import FeederModel
from derms.reports.html_format import fmt_value, note, write_html
from derms.reports.study_html import PLOT_CONFIG, _html_document

__all__ = ["EnvelopeReport", "cp_table", "summary", "write_envelope_outputs"]


@dataclass(frozen=True)
class EnvelopeReport:
    """What the files need: the feeder, the result, the static reference and the source."""

    feeder: FeederModel
    result: EnvelopeResult
    master: str
    static_kw: float = 5.0


def cp_table(report: EnvelopeReport) -> pd.DataFrame:
    """One row per connection point with its envelopes' mean/min and bus coordinates."""
    r = report.result
    xy = {b.name: (b.x, b.y) for b in report.feeder.buses}
    with warnings.catch_warnings():  # a direction not computed is all nan
        warnings.simplefilter("ignore", RuntimeWarning)
        return pd.DataFrame({
            "connection_point": [c.id for c in r.cps],
            "load": [c.load for c in r.cps],
            "bus": [c.bus for c in r.cps],
            "phase": [c.phase_label for c in r.cps],
            "capacity_kw": [c.capacity_kw for c in r.cps],
            "forecast_peak_kw": np.nanmax(r.forecast_p_kw, axis=0),
            "export_mean_kw": np.nanmean(r.export_kw, axis=0),
            "export_min_kw": np.nanmin(r.export_kw, axis=0),
            "import_mean_kw": np.nanmean(r.import_kw, axis=0),
            "import_min_kw": np.nanmin(r.import_kw, axis=0),
            "x": [xy.get(c.bus, (None, None))[0] for c in r.cps],
            "y": [xy.get(c.bus, (None, None))[1] for c in r.cps],
        })


def summary(report: EnvelopeReport) -> dict:
    """Headline figures (summary.json)."""
    r = report.result
    iv = r.intervals
    out: dict[str, object] = {
        "feeder": report.feeder.name, "master": report.master,
        "connection_points": len(r.cps), "intervals": len(r.times),
        "start": r.times[0].isoformat(), "step_s": float((r.times[1] - r.times[0])
                                                          .total_seconds())
        if len(r.times) > 1 else None,
        "policy": r.criteria.policy, "controls": r.criteria.controls,
        "v_min_pu": r.criteria.limits.v_min_pu, "v_max_pu": r.criteria.limits.v_max_pu,
        "runtime_s": round(r.runtime_s, 3), "ac_solves": r.n_ac_solves,
        "static_reference_kw": report.static_kw,
    }
    for d in ("export", "import"):
        g = iv[iv["direction"] == d]
        if g.empty:
            continue
        x = r.export_kw if d == "export" else r.import_kw
        out[d] = {
            "ratio_vs_static": r.static_ratio(report.static_kw, d),
            "total_kwh": float(np.nansum(x) * out["step_s"] / 3600) if out["step_s"] else None,
            "mean_kw_per_connection_point": float(np.nanmean(x)),
            "min_kw": float(np.nanmin(x)), "max_kw": float(np.nanmax(x)),
            "ac_max_v_excess_pu": float(g["ac_v_excess_pu"].max()),
            "ac_max_thermal_excess_pct": float(g["ac_thermal_excess_pct"].max()),
            "ac_all_converged": bool(g["ac_converged"].all()),
            "infeasible_intervals": int(g["infeasible"].sum()),
            "backed_off_intervals": int((g["binding"] == "ac_backoff").sum()),
            "binding": {str(k): int(v) for k, v in g["binding"].value_counts().items()},
        }
    return out


def write_envelope_outputs(report: EnvelopeReport, out: Path) -> dict[str, Path]:
    """Write every file of the module docstring into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    r = report.result
    paths = {k: out / n for k, n in (
        ("csv", "envelopes.csv"), ("parquet", "envelopes.parquet"),
        ("intervals", "intervals.csv"), ("cps", "connection_points.csv"),
        ("geojson", "envelopes.geojson"), ("pre_existing", "pre_existing.csv"),
        ("summary", "summary.json"), ("report", "report.html"))}
    table = r.table()
    table["timestamp"] = table["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    table.to_csv(paths["csv"], index=False, float_format="%.6g")
    table.to_parquet(paths["parquet"], index=False)
    iv = r.intervals.copy()
    iv["timestamp"] = pd.DatetimeIndex(iv["timestamp"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    iv.to_csv(paths["intervals"], index=False)
    cps = cp_table(report)
    cps.to_csv(paths["cps"], index=False)
    paths["geojson"].write_text(json.dumps(_geojson(cps)), encoding="utf-8")
    r.pre_existing.to_csv(paths["pre_existing"], index=False)
    summ = summary(report)
    paths["summary"].write_text(json.dumps(summ, indent=2), encoding="utf-8")
    write_html(paths["report"], _page(report, cps, summ))
    return paths


def _geojson(cps: pd.DataFrame) -> dict:
    rows = cps.dropna(subset=["x", "y"])
    props = rows.drop(columns=["x", "y"])
    feats = [{"type": "Feature",
              "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
              "properties": {k: (None if isinstance(v, float) and np.isnan(v) else
                                 v.item() if isinstance(v, np.generic) else v)
                             for k, v in rec.items()}}
             for x, y, rec in zip(rows["x"], rows["y"], props.to_dict("records"))]
    return {"type": "FeatureCollection", "features": feats}


def _page(report: EnvelopeReport, cps: pd.DataFrame, summ: dict) -> str:
    r = report.result
    rows = {k: v for k, v in summ.items() if not isinstance(v, dict)}
    for d in ("export", "import"):
        if d in summ:
            s = summ[d]
            rows[f"{d}: envelope energy vs static {report.static_kw:g} kW"] = \
                f"{s['ratio_vs_static']:.2f} x"
            rows[f"{d}: kW per connection point mean / min / max"] = \
                f"{s['mean_kw_per_connection_point']:.2f} / {s['min_kw']:.2f} / {s['max_kw']:.2f}"
            rows[f"{d}: AC check, largest excess"] = (
                f"{s['ac_max_v_excess_pu']:.4f} pu voltage, "
                f"{s['ac_max_thermal_excess_pct']:.2f} % thermal")
            rows[f"{d}: binding"] = ", ".join(f"{k} ({v})" for k, v in s["binding"].items())
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt_value(v))}</td></tr>"
                   for k, v in rows.items())
    sections = [f'<h2>Summary</h2>\n<table class="summary"><tbody>{body}</tbody></table>',
                note("Envelopes are site limits on net export / import [kW] that hold with "
                     "every connection point at its envelope at once (AC-checked). Pre-"
                     "existing violations (base case) and rows already broken with every "
                     "connection point at zero net are held to that value.")]
    figs = [("totals", _totals(r)), ("spread", _spread(r)), ("map", _map(cps))]
    any_fig = False
    titles = {"totals": "Total envelope over the horizon",
              "spread": "Envelope per connection point (min, median, max)",
              "map": "Mean export envelope by connection point"}
    for key, fig in figs:
        if fig is None:
            sections.append(f"<h2>{titles[key]}</h2>\n" + note("No coordinates in the model."))
            continue
        any_fig = True
        div = fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                          div_id=f"fig-{key}", default_height="480px")
        sections.append(f'<h2>{titles[key]}</h2>\n<div class="figure">{div}</div>')
    pre = r.pre_existing
    sections.append("<h2>Pre-existing violations (base case, held to their value)</h2>\n" + (
        note("None.") if pre.empty else
        pre.groupby("kind").agg(elements=("element", "size"),
                                intervals=("n_intervals", "sum")).to_html()))
    doc = _html_document(f"Operating envelopes — {report.feeder.name}", report.feeder.name,
                         "\n".join(sections), any_fig)
    return doc.replace("quasi-static time-series study · times in UTC · substation power "
                       "import-positive", "dynamic operating envelopes · times in UTC · "
                       "site limits [kW], >= 0")


def _totals(r: EnvelopeResult) -> go.Figure:
    fig = go.Figure()
    for d, x in (("export", r.export_kw), ("import", r.import_kw)):
        if np.isfinite(x).any():
            fig.add_trace(go.Scatter(x=r.times, y=np.nansum(x, axis=1), name=f"{d} total [kW]"))
    fig.update_layout(yaxis_title="kW (sum over connection points)", xaxis_title="UTC")
    return fig


def _spread(r: EnvelopeResult) -> go.Figure:
    fig = go.Figure()
    for d, x in (("export", r.export_kw), ("import", r.import_kw)):
        if not np.isfinite(x).any():
            continue
        q = np.nanpercentile(x, [0, 50, 100], axis=1)
        for lab, row in zip(("min", "median", "max"), q):
            fig.add_trace(go.Scatter(x=r.times, y=row, name=f"{d} {lab}",
                                     line={"dash": "solid" if lab == "median" else "dot"}))
    fig.update_layout(yaxis_title="kW per connection point", xaxis_title="UTC")
    return fig


def _map(cps: pd.DataFrame) -> go.Figure | None:
    rows = cps.dropna(subset=["x", "y"])
    if rows.empty:
        return None
    fig = go.Figure(go.Scattergl(
        x=rows["x"], y=rows["y"], mode="markers",
        marker={"color": rows["export_mean_kw"], "colorscale": "Viridis", "size": 6,
                "colorbar": {"title": "kW"}},
        text=[f"{c} @ {b}: export {e:.1f} kW, import {i:.1f} kW" for c, b, e, i in
              zip(rows["connection_point"], rows["bus"], rows["export_mean_kw"],
                  rows["import_mean_kw"])],
        hoverinfo="text"))
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False,
                                                       "scaleanchor": "x"})
    return fig
