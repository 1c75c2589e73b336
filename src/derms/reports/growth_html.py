"""Self-contained HTML report and table files of a load-growth study.

One HTML file that opens offline (plotly.js embedded once): the feeder-head peak per year,
the peak kW per year of the most loaded transformers against their rating, the loading of the
most loaded elements against 100 %, and the table of the year each limit is first exceeded
(pre-existing base-year violations listed separately). Power is import-positive [kW];
times are UTC.
"""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from derms.reports.html_format import fmt_value, note, write_html
from derms.reports.study_html import CSS, PLOT_CONFIG
from derms.studies.load_growth import GrowthResult

__all__ = ["write_growth_outputs", "write_growth_report"]

N_TOP = 10  # elements drawn per figure
MAX_TABLE_ROWS = 300
NUM_CELL = '<td class="num">'
COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442",
           "#000000", "#7f7f7f", "#8c564b"]


def write_growth_outputs(result: GrowthResult, out: Path) -> dict[str, Path]:
    """Write peaks / first_exceeded / extremes as CSV and Parquet, and ``report.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in ("peaks", "first_exceeded", "extremes"):
        frame = getattr(result, name)
        paths[f"{name}_csv"] = out / f"{name}.csv"
        frame.to_csv(paths[f"{name}_csv"], index=False)
        paths[f"{name}_parquet"] = out / f"{name}.parquet"
        frame.to_parquet(paths[f"{name}_parquet"], index=False)
    paths["report"] = write_growth_report(out / "report.html", result)
    return paths


def write_growth_report(path: Path, result: GrowthResult) -> Path:
    """Write the study's HTML report at ``path`` (parents created)."""
    return write_html(path, _page(result))


def _page(r: GrowthResult) -> str:
    figs = [("Feeder head peak per year", _head_figure(r.peaks)),
            ("Transformer peaks per year against rating", _transformer_figure(r.peaks)),
            ("Most loaded elements (AC loading, % of normal rating)", _loading_figure(r.peaks))]
    parts = [f"<h2>Scenario</h2>\n{_summary(r)}"]
    for title, fig in figs:
        body = _figure(fig) if fig is not None else note("Nothing to draw.")
        parts.append(f"<h2>{html.escape(title)}</h2>\n{body}")
    fe = r.first_exceeded
    new = fe[~fe["pre_existing"]]
    pre = fe[fe["pre_existing"]]
    parts.append("<h2>First year each limit is exceeded</h2>\n" + note(
        "Thermal: % of the engine's normal rating (AC, solved intervals), tolerance "
        f"{r.limits.thermal_tol_pct:g} %; voltage: ANSI limits {r.limits.v_min_pu:g}–"
        f"{r.limits.v_max_pu:g} pu, tolerance {r.limits.v_tol_pu:g} pu; reverse power: head "
        "(AC) and transformers (screened net kW).") + _table(
        new.dropna(subset=["year"]), "No limit is exceeded over the study."))
    parts.append("<h2>Pre-existing violations (base year)</h2>\n" + note(
        "Held to their base-year value: first exceeded only in a year they get worse.")
        + _table(pre, "None."))
    parts.append("<h2>Extremes at the peak-load and peak-export instants</h2>\n"
                 + _table(r.extremes, "No results."))
    items = "".join(f"<li>{html.escape(n)}</li>" for n in r.notes) or "<li>None.</li>"
    parts.append(f"<h2>Notes</h2>\n<ul class=\"notes\">{items}</ul>")
    title = f"Load growth — {r.feeder}"
    js = f"<script>{get_plotlyjs()}</script>\n"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n{js}</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class=\"subtitle\">Feeder "
            f"<b>{html.escape(r.feeder)}</b> · load-growth scenario · times in UTC · power "
            "import-positive</p>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def _summary(r: GrowthResult) -> str:
    sc = r.scenario
    rows = {
        "years": f"{sc.start_year}–{sc.start_year + sc.years} (base year {sc.start_year})",
        "EV share (base → final)": f"{sc.ev.shares[0]:.0%} → {sc.ev.shares[-1]:.0%}",
        "heat-pump share": f"{sc.hp.shares[0]:.0%} → {sc.hp.shares[-1]:.0%}",
        "PV share": f"{sc.pv.shares[0]:.0%} → {sc.pv.shares[-1]:.0%}",
        "organic growth": f"{sc.growth_pct:g} %/yr",
        "new connections": len(sc.new_connections),
        "profile step": f"{sc.step_min} min",
        "seed": sc.seed,
        "AC solves": r.n_ac_solves,
        "non-converged solves": r.n_not_converged,
        "runtime": f"{r.runtime_s:.1f} s",
    }
    for k, v in asdict(sc.ev_params).items():
        rows[f"EV {k}"] = str(v)
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt_value(v))}</td></tr>"
                   for k, v in rows.items())
    return f"<table class=\"summary\"><tbody>{body}</tbody></table>"


def _figure(fig: go.Figure) -> str:
    return "<div class=\"figure\">" + fig.to_html(
        full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
        default_height=f"{fig.layout.height or 450}px") + "</div>"


def _layout(fig: go.Figure, y_title: str) -> go.Figure:
    fig.update_layout(template="plotly_white", height=450, xaxis_title="year",
                      yaxis_title=y_title, margin={"l": 60, "r": 30, "t": 30, "b": 50},
                      legend={"orientation": "v"})
    return fig


def _head_figure(peaks: pd.DataFrame) -> go.Figure | None:
    h = peaks[peaks["kind"] == "feeder"]
    if h.empty:
        return None
    fig = go.Figure([
        go.Scatter(x=h["year"], y=h["peak_kw"], mode="lines+markers", name="peak import"),
        go.Scatter(x=h["year"], y=h["min_kw"], mode="lines+markers", name="minimum (export < 0)"),
    ])
    return _layout(fig, "head kW (AC)")


def _top(peaks: pd.DataFrame, kinds: tuple[str, ...]) -> pd.DataFrame:
    p = peaks[peaks["kind"].isin(kinds)]
    if p.empty:
        return p
    last = p[p["year"] == p["year"].max()]
    names = last.sort_values("loading_pct", ascending=False)["element"].head(N_TOP)
    return p[p["element"].isin(names)]


def _transformer_figure(peaks: pd.DataFrame) -> go.Figure | None:
    p = _top(peaks, ("transformer",))
    if p.empty:
        return None
    fig = go.Figure()
    for i, (name, g) in enumerate(p.groupby("element", sort=False)):
        colour = COLOURS[i % len(COLOURS)]
        fig.add_trace(go.Scatter(x=g["year"], y=g["peak_kw"], mode="lines+markers",
                                 name=str(name), line={"color": colour}, legendgroup=str(name)))
        fig.add_trace(go.Scatter(x=g["year"], y=g["rating"], mode="lines", showlegend=False,
                                 name=f"{name} rating", legendgroup=str(name),
                                 line={"color": colour, "dash": "dash"}))
    return _layout(fig, "peak kW (screened) · dashed: normal rating kVA")


def _loading_figure(peaks: pd.DataFrame) -> go.Figure | None:
    p = _top(peaks, ("transformer", "line"))
    if p.empty:
        return None
    fig = go.Figure()
    for i, (name, g) in enumerate(p.groupby("element", sort=False)):
        fig.add_trace(go.Scatter(x=g["year"], y=g["loading_pct"], mode="lines+markers",
                                 name=str(name), line={"color": COLOURS[i % len(COLOURS)]}))
    fig.add_hline(y=100.0, line={"color": "#a50026", "dash": "dash"},
                  annotation_text="100 % rating")
    return _layout(fig, "loading %")


def _table(frame: pd.DataFrame, empty: str) -> str:
    if frame is None or frame.empty:
        return note(empty)
    shown = frame.head(MAX_TABLE_ROWS)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    for row in shown.itertuples(index=False):
        cells = []
        for v in row:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            text = "" if v is pd.NA or v is None else fmt_value(v)
            cls = NUM_CELL if num else "<td>"
            cells.append(f"{cls}{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = note(f"{len(frame) - MAX_TABLE_ROWS} more rows in the CSV file.") \
        if len(frame) > MAX_TABLE_ROWS else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"
