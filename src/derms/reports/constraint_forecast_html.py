"""Self-contained HTML report of a constraint forecast: hourly probabilities per kind, a
heat map of probability by hour x element, and the hourly table. Times in UTC."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from derms.analysis.constraint_forecast import ConstraintForecast
from derms.reports.html_format import fmt_fixed, fmt_time, note
from derms.reports.study_html import CSS, PLOT_CONFIG
from derms.reports.violations_html import KIND_UNITS

MAX_HEAT_ELEMENTS = 40
KIND_COLOURS = {"overvoltage": "#d55e00", "undervoltage": "#0072b2", "thermal": "#cc79a7",
                "reverse_power": "#009e73"}


def _fig_div(fig: go.Figure, key: str, include_js: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=include_js, config=PLOT_CONFIG,
                       div_id=f"fig-{key}")


def _hourly_figure(hourly: pd.DataFrame, threshold: float) -> go.Figure:
    fig = go.Figure()
    for kind, g in hourly.groupby("kind", sort=False):
        fig.add_bar(x=g["hour"], y=g["probability"], name=str(kind),
                    marker_color=KIND_COLOURS.get(str(kind), "#7f7f7f"))
    fig.add_hline(y=threshold, line_dash="dash", annotation_text=f"threshold {threshold:g}")
    fig.update_layout(template="plotly_white", height=360, barmode="group",
                      yaxis={"title": "probability", "range": [0, 1.05]},
                      xaxis={"title": "hour start (UTC)"},
                      margin={"l": 60, "r": 30, "t": 30, "b": 50})
    return fig


def _heat_figure(violations: pd.DataFrame, kind: str) -> go.Figure | None:
    v = violations[violations["kind"] == kind]
    if v.empty:
        return None
    v = v.assign(hour=pd.to_datetime(v["start"]).dt.floor("h"),
                 node=v["element"].astype(str) + "." + v["phase"].astype(str))
    grid = v.pivot_table(index="node", columns="hour", values="probability", aggfunc="max")
    top = grid.max(axis=1).sort_values(ascending=False).index[:MAX_HEAT_ELEMENTS]
    grid = grid.loc[top].fillna(0.0)
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=grid.columns, y=list(grid.index),
                               zmin=0, zmax=1, colorscale="Reds",
                               colorbar={"title": "probability"}))
    fig.update_layout(template="plotly_white", height=max(300, 18 * len(grid) + 120),
                      xaxis={"title": "hour start (UTC)"},
                      yaxis={"title": "element.phase", "autorange": "reversed"},
                      margin={"l": 140, "r": 30, "t": 30, "b": 50})
    return fig


def _hourly_table(hourly: pd.DataFrame, threshold: float) -> str:
    rows = hourly[hourly["probability"] > 0]
    if rows.empty:
        return note("No violation has a positive probability over the horizon.")
    head = ("<tr><th>hour (UTC)</th><th>kind</th><th>probability</th><th>predicted</th>"
            "<th>elements</th><th>worst element</th><th>phase</th><th>its probability</th>"
            "<th>expected excess</th><th>unit</th></tr>")
    body = []
    for r in rows.itertuples(index=False):
        unit = "pct points" if r.kind == "thermal" else KIND_UNITS.get(str(r.kind), "")
        cells = [fmt_time(r.hour), str(r.kind), fmt_fixed(r.probability, 2),
                 "yes" if r.probability >= threshold else "", str(r.n_elements),
                 str(r.worst_element), str(r.worst_phase), fmt_fixed(r.worst_probability, 2),
                 fmt_fixed(r.expected_excess, 4), unit]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _pre_existing_table(pre: pd.DataFrame) -> str:
    """Per (kind, element, phase): its probability, its hours and the worst value."""
    if pre.empty:
        return note("The forecast load breaks no limit by itself over the horizon.")
    g = pre.assign(hour=pd.to_datetime(pre["start"]).dt.floor("h")).groupby(
        ["kind", "element", "phase"], sort=False)
    rows = g.agg(probability=("probability", "max"), first=("start", "min"),
                 last=("end", "max"), hours=("hour", "nunique"),
                 limit=("limit", "first")).reset_index()
    rows = rows.sort_values(["probability", "hours"], ascending=False).head(MAX_HEAT_ELEMENTS)
    head = ("<tr><th>kind</th><th>element</th><th>phase</th><th>largest probability</th>"
            "<th>hours</th><th>from</th><th>to</th><th>limit</th></tr>")
    body = []
    for r in rows.itertuples(index=False):
        cells = [str(r.kind), str(r.element), str(r.phase), fmt_fixed(r.probability, 2),
                 str(r.hours), fmt_time(r.first), fmt_time(r.last), fmt_fixed(r.limit, 3)]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    more = len(g) - len(rows)
    tail = note(f"{more} more element-phases in pre_existing.csv") if more > 0 else ""
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>{tail}"


def constraint_forecast_html(fc: ConstraintForecast, *, feeder: str, title: str | None = None
                             ) -> str:
    """The report as one HTML string (plotly.js embedded once; opens offline)."""
    title = title or f"Constraint forecast — {feeder}"
    parts, js = [], True
    figs = [("hourly", _hourly_figure(fc.hourly, fc.threshold))] if len(fc.hourly) else []
    for kind in ("overvoltage", "undervoltage", "thermal", "reverse_power"):
        f = _heat_figure(fc.violations, kind)
        if f is not None:
            figs.append((kind, f))
    for key, fig in figs:
        heading = ("Probability of a violation per hour" if key == "hourly" else
                   f"{key}: probability by hour and element (top {MAX_HEAT_ELEMENTS})")
        parts.append(f"<h2>{html.escape(heading)}</h2>\n<div class=\"figure\">"
                     f"{_fig_div(fig, key, js)}</div>")
        js = False
    parts.append("<h2>Hourly summary</h2>\n" + _hourly_table(fc.hourly, fc.threshold))
    parts.append("<h2>What the forecast load breaks by itself (PV at zero)</h2>\n"
                 + _pre_existing_table(fc.pre_existing))
    n_pre = int(fc.violations["pre_existing"].astype(bool).sum()) if len(fc.violations) else 0
    notes = [*fc.notes,
             (f"horizon {fmt_time(fc.t[0])} to {fmt_time(fc.t[-1])} (interval starts), "
             f"{len(fc.scenarios)} scenarios, {fc.runtime_s:.1f} s"),
             (f"{n_pre} element-intervals are pre-existing violations (already in the base "
             "case), counted only where worse than it"),
             "expected excess: mean distance beyond the limit in the scenarios in violation"]
    if fc.n_not_converged:
        notes.append(f"{fc.n_not_converged} QSTS steps did not converge")
    parts.append("<h2>Notes</h2>\n" + "\n".join(note(n) for n in notes))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"subtitle\">Feeder <b>"
        f"{html.escape(feeder)}</b> · forecast scenarios through QSTS · times in UTC</p>\n"
        + "\n".join(parts) + "\n</body>\n</html>\n")


def write_constraint_forecast_report(fc: ConstraintForecast, path: Path, *, feeder: str
                                     ) -> Path:
    """Write the report to ``path``; return it."""
    path.write_text(constraint_forecast_html(fc, feeder=feeder), encoding="utf-8")
    return path
