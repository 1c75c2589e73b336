"""Files of a hosting-capacity study: CSV, Parquet, GeoJSON and a self-contained HTML map.

``hosting_capacity.csv`` / ``.parquet``: one row per site (bus and phases) and kind, the
columns of :data:`derms.analysis.hosting_capacity.RESULT_COLUMNS` plus ``kv_base_ln``,
``x``, ``y`` (bus coordinates, empty when the model has none). ``hc_kw`` is the total over
the site's phases [kW]: three-phase kW at a three-phase bus, the sum over the phases
present otherwise; it is the device's own output (PV export, load import), >= 0.
``pre_existing.csv``: base-case violations held to their base value.
``hosting_capacity.geojson``: the same rows as points (buses without coordinates left out;
coordinates as the model gives them, not necessarily longitude/latitude).
``report.html``: the feeder map coloured by ``hc_kw`` (one map per kind), the criteria, the
pre-existing violations and the summary; plotly.js embedded, opens offline.
"""

from __future__ import annotations

import html
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from derms.analysis.hosting_capacity import HostingResult
from derms.grid.model import FeederModel
from derms.reports.html_format import fmt_value, note, write_html
from derms.reports.study_html import PLOT_CONFIG, _html_document

__all__ = ["HostingReport", "hosting_table", "write_hosting_outputs"]

GL_POINT_THRESHOLD = 5000


@dataclass(frozen=True)
class HostingReport:
    """What the files need: the feeder, one result per kind, runtime and method notes."""

    feeder: FeederModel
    results: dict[str, HostingResult]
    method: str
    master: str


def hosting_table(report: HostingReport) -> pd.DataFrame:
    """All kinds' rows with each bus's base kV (line to neutral) and coordinates."""
    buses = pd.DataFrame([(b.name, b.kv_base_ln, b.x, b.y) for b in report.feeder.buses],
                         columns=["bus", "kv_base_ln", "x", "y"]).drop_duplicates("bus")
    frames = [r.table for r in report.results.values()]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table.merge(buses, on="bus", how="left")


def write_hosting_outputs(report: HostingReport, out: Path) -> dict[str, Path]:
    """Write hosting_capacity.csv/.parquet/.geojson, pre_existing.csv and report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = hosting_table(report)
    paths = {"csv": out / "hosting_capacity.csv", "parquet": out / "hosting_capacity.parquet",
             "geojson": out / "hosting_capacity.geojson", "pre_existing": out / "pre_existing.csv",
             "report": out / "report.html"}
    table.to_csv(paths["csv"], index=False)
    table.to_parquet(paths["parquet"], index=False)
    paths["geojson"].write_text(json.dumps(_geojson(table)), encoding="utf-8")
    pre = [r.pre_existing.assign(kind_hosted=k) for k, r in report.results.items()]
    pd.concat(pre, ignore_index=True).drop_duplicates(["kind", "element"]).drop(
        columns="kind_hosted").to_csv(paths["pre_existing"], index=False)
    write_html(paths["report"], _page(report, table))
    return paths


def _geojson(table: pd.DataFrame) -> dict:
    rows = table.dropna(subset=["x", "y"])
    props = rows.drop(columns=["x", "y"])
    features = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
         "properties": {k: (None if isinstance(v, float) and np.isnan(v) else
                            v.item() if isinstance(v, np.generic) else v)
                        for k, v in rec.items()}}
        for x, y, rec in zip(rows["x"], rows["y"], props.to_dict("records"))
    ]
    return {"type": "FeatureCollection", "features": features}


def _page(report: HostingReport, table: pd.DataFrame) -> str:
    sections = [f"<h2>Summary</h2>\n{_summary(report, table)}"]
    any_fig = False
    for kind in report.results:
        label = "PV (generation, export)" if kind == "pv" else "Load (EV charging, import)"
        fig = _map(report.feeder, table[table["kind"] == kind])
        if fig is None:
            body = note("No bus coordinates in the model: see hosting_capacity.csv.")
        else:
            any_fig = True
            div = fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                              div_id=f"fig-{kind}", default_height="700px")
            body = f'<div class="figure">{div}</div>'
        sections.append(f"<h2>Hosting capacity map: {html.escape(label)}</h2>\n{body}")
    sections.append(f"<h2>Pre-existing violations (held to their base-case value)</h2>\n"
                    f"{_pre_table(report)}")
    doc = _html_document(f"Hosting capacity — {report.feeder.name}", report.feeder.name,
                         "\n".join(sections), any_fig)
    return doc.replace("quasi-static time-series study · times in UTC · substation power "
                       "import-positive", "snapshot hosting capacity · controls frozen at "
                       "the base case · sizes are device output [kW]")


def _summary(report: HostingReport, table: pd.DataFrame) -> str:
    c = next(iter(report.results.values())).criteria
    lim = c.limits
    rows: dict[str, object] = {
        "feeder file": report.master, "method": report.method,
        "sites": int(table[["bus", "phases"]].drop_duplicates().shape[0]),
        "voltage band [pu]": f"{lim.v_min_pu}–{lim.v_max_pu} (tolerance {lim.v_tol_pu})",
        "voltage deviation [pu]": "not checked" if c.v_deviation_pu is None
        else c.v_deviation_pu,
        "thermal [% of normal rating]": f"{lim.thermal_pct} (tolerance {lim.thermal_tol_pct})"
        if c.thermal else "not checked",
        "engine-default ratings": "skipped" if c.skip_default_ratings else "checked",
        "reverse flow at the head": f"import >= -{lim.reverse_power_kw or 0} kW"
        if c.reverse_flow else "not checked",
        "size range [kW]": f"0–{c.p_max_kw} (resolution {c.tol_kw})",
    }
    for kind, res in report.results.items():
        hc = res.table["hc_kw"]
        rows[f"{kind}: runtime [s]"] = round(res.runtime_s, 2)
        rows[f"{kind}: AC solves"] = res.n_ac_solves
        rows[f"{kind}: hc_kw min / median / max"] = (
            f"{hc.min():,.0f} / {hc.median():,.0f} / {hc.max():,.0f}" if len(hc) else "n/a")
        rows[f"{kind}: most frequent binding"] = ", ".join(
            f"{k} ({v})" for k, v in res.table["binding"].value_counts().head(3).items())
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt_value(v))}</td></tr>"
                   for k, v in rows.items())
    return f'<table class="summary"><tbody>{body}</tbody></table>'


def _pre_table(report: HostingReport) -> str:
    pre = pd.concat([r.pre_existing for r in report.results.values()], ignore_index=True)
    pre = pre.drop_duplicates(["kind", "element"])
    if pre.empty:
        return note("None.")
    head = "".join(f"<th>{c}</th>" for c in pre.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt_value(v))}</td>" for v in rec) + "</tr>"
        for rec in pre.head(300).itertuples(index=False))
    more = note(f"{len(pre) - 300} more in pre_existing.csv") if len(pre) > 300 else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _map(feeder: FeederModel, rows: pd.DataFrame) -> go.Figure | None:
    """Lines in grey, buses coloured by hc_kw (sites aggregated per bus: the maximum)."""
    xy = {b.name: (b.x, b.y) for b in feeder.buses if b.x is not None and b.y is not None}
    if not xy:
        return None
    fig = go.Figure()
    xs: list = []
    ys: list = []
    for ln in feeder.lines:
        a, b = xy.get(ln.bus1), xy.get(ln.bus2)
        if a and b:
            xs += [a[0], b[0], None]
            ys += [a[1], b[1], None]
    for tr in feeder.transformers:
        pts = [xy[b] for b in tr.buses if b in xy]
        for p, q in itertools.pairwise(pts):
            xs += [p[0], q[0], None]
            ys += [p[1], q[1], None]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#b0b0b0", "width": 1},
                             hoverinfo="skip", name="lines"))
    pts = rows.dropna(subset=["x", "y"]).sort_values("hc_kw").drop_duplicates(
        "bus", keep="last")
    if len(pts):
        text = (pts["bus"].map(html.escape) + " (phases " + pts["phases"].astype(str) + ")<br>"
                + pts["hc_kw"].map(lambda v: f"{v:,.0f} kW") + "<br>binding: "
                + pts["binding"].astype(str) + " " + pts["binding_element"].fillna("")
                .astype(str).map(html.escape))
        scatter = go.Scattergl if len(pts) > GL_POINT_THRESHOLD else go.Scatter
        fig.add_trace(scatter(
            x=pts["x"], y=pts["y"], mode="markers", name="bus (hc_kw)", text=text.tolist(),
            hoverinfo="text", marker={
                "size": 8 if len(pts) < 500 else 5, "color": pts["hc_kw"].tolist(),
                "colorscale": "Viridis", "cmin": 0, "line": {"width": 0.5, "color": "#555"},
                "showscale": True, "colorbar": {"title": {"text": "hosting capacity [kW]"}},
            }))
    fig.update_layout(template="plotly_white", height=700, showlegend=False,
                      margin={"l": 30, "r": 30, "t": 30, "b": 30})
    fig.update_xaxes(showgrid=False, zeroline=False, showticklabels=False)
    fig.update_yaxes(showgrid=False, zeroline=False, showticklabels=False,
                     scaleanchor="x", scaleratio=1)
    return fig

