"""Self-contained HTML report of a quasi-static time-series (QSTS) feeder study.

One file that opens offline: plotly.js is embedded once in the page head, every figure
refers to it, and no external CSS or JS is loaded. All text from the study is escaped.

Conventions (see docs/DESIGN): power at the substation is import-positive (kW, kvar);
times are shown in UTC ISO 8601; voltages in per unit of the nominal voltage.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.offline import get_plotlyjs

from derms.errors import InputError
from derms.reports.html_format import fmt_value as _fmt_value
from derms.reports.html_format import is_empty as _is_empty
from derms.reports.html_format import note as _note
from derms.reports.violations_html import violations_html

__all__ = ["StudyReportData", "write_study_report"]

GL_POINT_THRESHOLD = 5000  # above this many points a trace uses WebGL (scattergl)
PHASE_NAMES = {1: "A", 2: "B", 3: "C"}
PHASE_COLOURS = {1: "#d55e00", 2: "#0072b2", 3: "#009e73"}  # Okabe-Ito, colour-blind safe
OTHER_PHASE_COLOUR = "#7f7f7f"
LOADING_MAX_PCT = 120.0
LOADING_SCALE = [[0.0, "#4575b4"], [0.5, "#fee090"], [100 / 120, "#f46d43"], [1.0, "#a50026"]]
# (label, lower edge, upper edge, colour value, line width) of the loading bins of the map
LOADING_BINS = [
    ("< 40 %", -np.inf, 40.0, 20.0, 1.5),
    ("40–60 %", 40.0, 60.0, 50.0, 1.5),
    ("60–80 %", 60.0, 80.0, 70.0, 2.0),
    ("80–100 %", 80.0, 100.0, 90.0, 2.5),
    ("100–120 %", 100.0, 120.0, 110.0, 3.5),
    ("≥ 120 %", 120.0, np.inf, 120.0, 4.5),
]
SECTION_TITLES = {
    "voltage": "Voltage profile against distance",
    "head": "Feeder head load over time",
    "map": "Feeder map",
    "violations": "Violations",
}
REQUIRED_COLUMNS = {
    "voltage_profile": ("bus", "phase", "distance_km", "v_pu_min", "v_pu_max"),
    "head": ("t", "phase", "p_kw", "q_kvar"),
    "bus_xy": ("bus", "x", "y"),
    "branches": ("element", "bus1", "bus2", "loading_pct_max"),
    "violations": (
        "kind", "element", "phase", "start", "end", "duration_h", "worst", "limit", "pre_existing",
    ),
}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0 auto; max-width: 1200px; padding: 1.5rem 2rem 3rem; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; font-size: 1.7rem; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.25rem; margin-top: 2.2rem;
     font-size: 1.3rem; }
h3 { font-size: 1.05rem; margin-bottom: 0.4rem; }
.subtitle, .note { color: #555; }
.note { font-style: italic; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.5rem 0; }
th, td { border: 1px solid #d6d6d6; padding: 0.25rem 0.6rem; text-align: left;
         vertical-align: top; }
th { background: #f2f4f7; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { width: 16rem; }
.figure { width: 100%; }
ul.notes li { margin: 0.2rem 0; }
"""


@dataclass(frozen=True)
class StudyReportData:
    """Everything a QSTS study report shows; all DataFrames are long (tidy).

    Attributes
    ----------
    title, feeder : str
        Report title and feeder id.
    summary : dict
        Key figures (steps, step size, PV penetration, energy [kWh], peak [kW], ...),
        shown in order as a table; keys should carry their unit.
    voltage_profile : DataFrame
        ``bus, phase, distance_km, v_pu_min, v_pu_max``: one row per bus-node, the min and
        max voltage [pu] over the study; ``phase`` 1, 2, 3 = A, B, C.
    limits : tuple of float
        ``(v_min_pu, v_max_pu)`` voltage limits [pu].
    head : DataFrame
        ``t, phase, p_kw, q_kvar``: feeder-head power per phase and step [kW, kvar],
        import (from the substation into the feeder) positive; ``t`` UTC datetime.
    bus_xy : DataFrame
        ``bus, x, y`` coordinates; empty when the model has none.
    branches : DataFrame
        ``element, bus1, bus2, loading_pct_max``: max loading over the study and phases
        [% of normal rating].
    violations : DataFrame
        ``kind, element, phase, start, end, duration_h, worst, limit, pre_existing``; kind is
        undervoltage / overvoltage (pu), thermal (%) or reverse_power (kW, import +).
    notes : list of str
        Free text shown at the bottom (e.g. which ratings are engine defaults).
    """

    title: str
    feeder: str
    summary: dict[str, str | float | int] = field(default_factory=dict)
    voltage_profile: pd.DataFrame = field(default_factory=pd.DataFrame)
    limits: tuple[float, float] = (0.95, 1.05)
    head: pd.DataFrame = field(default_factory=pd.DataFrame)
    bus_xy: pd.DataFrame = field(default_factory=pd.DataFrame)
    branches: pd.DataFrame = field(default_factory=pd.DataFrame)
    violations: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)


def write_study_report(path: Path, data: StudyReportData) -> Path:
    """Write ``data`` as one self-contained HTML file at ``path`` (parents created).

    Raises
    ------
    InputError
        A non-empty DataFrame lacks one of its required columns.
    """
    for name, columns in REQUIRED_COLUMNS.items():
        _check_columns(getattr(data, name), name, columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(data), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- page assembly


def _page(data: StudyReportData) -> str:
    figures = {
        "voltage": _voltage_figure(data.voltage_profile, data.limits),
        "head": _head_figure(data.head),
        "map": _map_figure(data.bus_xy, data.branches, data.voltage_profile, data.limits),
    }
    empty_notes = {
        "voltage": "No voltage results in this study.",
        "head": "No time steps in this study.",
        "map": "No bus coordinates in the model." if _is_empty(data.bus_xy)
        else "No branches or buses to draw.",
    }
    sections = [f"<h2>Summary</h2>\n{_summary_table(data.summary)}"]
    for key, fig in figures.items():
        body = _figure_html(fig, key) if fig is not None else _note(empty_notes[key])
        sections.append(f"<h2>{html.escape(SECTION_TITLES[key])}</h2>\n{body}")
    sections.append(f"<h2>{SECTION_TITLES['violations']}</h2>\n{violations_html(data.violations)}")
    sections.append(f"<h2>Notes</h2>\n{_notes_html(data.notes)}")
    any_figure = any(fig is not None for fig in figures.values())
    return _html_document(data.title, data.feeder, "\n".join(sections), any_figure)


def _html_document(title: str, feeder: str, body: str, with_plotlyjs: bool) -> str:
    plotlyjs = (
        "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script>{get_plotlyjs()}</script>\n" if with_plotlyjs else ""
    )
    subtitle = (
        f"Feeder <b>{html.escape(feeder)}</b> · quasi-static time-series study · "
        "times in UTC · substation power import-positive"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n{plotlyjs}</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"subtitle\">{subtitle}</p>\n{body}\n"
        "</body>\n</html>\n"
    )


def _figure_html(fig: go.Figure, key: str) -> str:
    height = fig.layout.height or 500
    div = fig.to_html(
        full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
        div_id=f"fig-{key}", default_height=f"{height}px",
    )
    return f"<div class=\"figure\">{div}</div>"


def _summary_table(summary: dict[str, str | float | int]) -> str:
    if not summary:
        return _note("No summary figures.")
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt_value(v))}</td></tr>"
        for k, v in summary.items()
    )
    return f"<table class=\"summary\"><tbody>{rows}</tbody></table>"


def _notes_html(notes: list[str]) -> str:
    if not notes:
        return _note("No notes.")
    items = "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
    return f"<ul class=\"notes\">{items}</ul>"


# ----------------------------------------------------------------------------- figures


def _voltage_figure(profile: pd.DataFrame, limits: tuple[float, float]) -> go.Figure | None:
    """Min and max voltage [pu] of every bus-node against distance [km], by phase."""
    if _is_empty(profile):
        return None
    fig = go.Figure()
    for phase, group in profile.groupby("phase", sort=True):
        name, colour = _phase_name(phase), PHASE_COLOURS.get(_as_int(phase), OTHER_PHASE_COLOUR)
        text = _escape_series(group["bus"].astype(str) + "." + str(phase))
        for column, symbol, label in (("v_pu_max", "triangle-up", "max"),
                                      ("v_pu_min", "triangle-down", "min")):
            scatter = go.Scattergl if len(group) > GL_POINT_THRESHOLD else go.Scatter
            fig.add_trace(scatter(
                x=group["distance_km"], y=group[column], mode="markers", text=text,
                name=f"{name} {label}", legendgroup=name,
                marker={"color": colour, "symbol": symbol, "opacity": 0.8,
                        "size": 7 if len(group) < 2000 else 4},
                hovertemplate="%{text}<br>%{x:.3f} km<br>%{y:.4f} pu<extra>" + label + "</extra>",
            ))
    for v_pu in limits:
        fig.add_hline(y=v_pu, line_dash="dash", line_color="#c00", line_width=1.5,
                      annotation_text=f"{v_pu:g} pu", annotation_position="top left")
    fig.update_layout(xaxis_title="distance from substation [km]", yaxis_title="voltage [pu]",
                      **_base_layout(480))
    return fig


def _head_figure(head: pd.DataFrame) -> go.Figure | None:
    """Total P, Q and per-phase P at the feeder head [kW, kvar], import positive."""
    if _is_empty(head):
        return None
    frame = head.assign(t=_utc_naive(head["t"]))
    total = frame.groupby("t", sort=True)[["p_kw", "q_kvar"]].sum()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=total.index, y=total["p_kw"], name="P total [kW]",
                             line={"color": "#222", "width": 3}))
    fig.add_trace(go.Scatter(x=total.index, y=total["q_kvar"], name="Q total [kvar]",
                             line={"color": "#8c564b", "width": 2, "dash": "dash"}))
    for phase, group in frame.groupby("phase", sort=True):
        per_phase = group.groupby("t", sort=True)["p_kw"].sum()
        fig.add_trace(go.Scatter(
            x=per_phase.index, y=per_phase.values, name=f"P {_phase_name(phase)} [kW]",
            line={"color": PHASE_COLOURS.get(_as_int(phase), OTHER_PHASE_COLOUR), "width": 1.5},
        ))
    fig.update_layout(xaxis_title="time (UTC)", yaxis_title="kW / kvar (import +)",
                      hovermode="x unified", **_base_layout(440))
    return fig


def _map_figure(bus_xy: pd.DataFrame, branches: pd.DataFrame, profile: pd.DataFrame,
                limits: tuple[float, float]) -> go.Figure | None:
    """Branches coloured by max loading [%] and buses by worst voltage [pu], on bus x/y."""
    if _is_empty(bus_xy):
        return None
    xy = (bus_xy.assign(key=_bus_key(bus_xy["bus"])).dropna(subset=["x", "y"])
          .drop_duplicates("key").set_index("key"))
    if xy.empty:
        return None
    fig = go.Figure()
    segments = _branch_segments(branches, xy) if not _is_empty(branches) else pd.DataFrame()
    for trace in _segment_traces(segments):
        fig.add_trace(trace)
    fig.add_trace(_bus_trace(xy, profile, limits))
    dropped = 0 if _is_empty(branches) else len(branches) - len(segments)
    title = f"{dropped} branches without coordinates not drawn" if dropped else None
    fig.update_layout(**_base_layout(700), title=title, showlegend=True)
    fig.update_layout(legend={"orientation": "h", "y": -0.05, "x": 0, "title": "max loading"})
    fig.update_xaxes(showgrid=False, zeroline=False, showticklabels=False)
    fig.update_yaxes(showgrid=False, zeroline=False, showticklabels=False,
                     scaleanchor="x", scaleratio=1)
    return fig


def _branch_segments(branches: pd.DataFrame, xy: pd.DataFrame) -> pd.DataFrame:
    """Branches with end coordinates ``x1, y1, x2, y2``; branches lacking either end dropped."""
    seg = branches.assign(k1=_bus_key(branches["bus1"]), k2=_bus_key(branches["bus2"]))
    seg = seg.join(xy[["x", "y"]].rename(columns={"x": "x1", "y": "y1"}), on="k1")
    seg = seg.join(xy[["x", "y"]].rename(columns={"x": "x2", "y": "y2"}), on="k2")
    return seg.dropna(subset=["x1", "y1", "x2", "y2"])


def _segment_traces(seg: pd.DataFrame) -> list[go.Scatter]:
    """One line trace per loading bin (None-separated), plus a hidden trace for the colour bar."""
    if seg.empty:
        return []
    loading = pd.to_numeric(seg["loading_pct_max"], errors="coerce").to_numpy(float)
    traces = []
    for label, lo, hi, colour_value, width in LOADING_BINS:
        mask = (loading >= lo) & (loading < hi)
        colour = sample_colorscale(LOADING_SCALE, [colour_value / LOADING_MAX_PCT])[0]
        traces.append(_line_trace(seg[mask], loading[mask], label, colour, width))
    unknown = np.isnan(loading)
    traces.append(_line_trace(seg[unknown], loading[unknown], "no rating", "#b0b0b0", 1.0))
    traces = [t for t in traces if t is not None]
    traces.append(go.Scatter(
        x=[seg["x1"].iloc[0]], y=[seg["y1"].iloc[0]], mode="markers", showlegend=False,
        hoverinfo="skip", marker={
            "size": 0, "opacity": 0, "color": [0.0], "cmin": 0, "cmax": LOADING_MAX_PCT,
            "colorscale": LOADING_SCALE, "showscale": True,
            "colorbar": {"title": {"text": "max loading [%]"}, "x": 1.02, "y": 0.76, "len": 0.46,
                         "tickvals": [0, 20, 40, 60, 80, 100, 120],
                         "ticktext": ["0", "20", "40", "60", "80", "100", "120+"]},
        },
    ))
    return traces


def _line_trace(seg: pd.DataFrame, loading: np.ndarray, label: str, colour: str,
                width: float) -> go.Scatter | None:
    """Segments as one trace: per segment start, midpoint (for hover), end, gap."""
    if seg.empty:
        return None
    n = len(seg)
    x = np.empty((n, 4), dtype=object)
    y = np.empty((n, 4), dtype=object)
    x1, x2 = seg["x1"].to_numpy(float), seg["x2"].to_numpy(float)
    y1, y2 = seg["y1"].to_numpy(float), seg["y2"].to_numpy(float)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = x1, (x1 + x2) / 2, x2, None
    y[:, 0], y[:, 1], y[:, 2], y[:, 3] = y1, (y1 + y2) / 2, y2, None
    pct = np.where(np.isnan(loading), "no rating", np.char.mod("%.1f %%", np.nan_to_num(loading)))
    names = _escape_series(seg["element"].astype(str)).to_numpy(dtype=object)
    text = np.empty((n, 4), dtype=object)
    for j in range(3):
        text[:, j] = names + "<br>" + pct.astype(object)
    text[:, 3] = None
    return go.Scatter(
        x=x.ravel().tolist(), y=y.ravel().tolist(), text=text.ravel().tolist(), mode="lines",
        name=label, line={"color": colour, "width": width}, hoverinfo="text",
    )


def _bus_trace(xy: pd.DataFrame, profile: pd.DataFrame,
               limits: tuple[float, float]) -> go.Scatter:
    """Bus markers coloured by the voltage farthest from 1 pu over the study [pu]."""
    worst = _worst_voltage(profile).reindex(xy.index)
    v_lo, v_hi = limits
    span = max(1.0 - v_lo, v_hi - 1.0) * 2
    text = (_escape_series(xy["bus"].astype(str)) + "<br>worst "
            + worst.map(lambda v: "n/a" if pd.isna(v) else f"{v:.4f} pu"))
    scatter = go.Scattergl if len(xy) > GL_POINT_THRESHOLD else go.Scatter
    return scatter(
        x=xy["x"], y=xy["y"], mode="markers", name="bus (worst V)", text=text.tolist(),
        hoverinfo="text", marker={
            "size": 6 if len(xy) < 500 else 4, "color": worst.fillna(1.0).tolist(),
            "colorscale": "RdBu_r",
            "cmin": 1.0 - span, "cmax": 1.0 + span, "line": {"width": 0.5, "color": "#555"},
            "colorbar": {"title": {"text": "worst V [pu]"}, "x": 1.02, "y": 0.24, "len": 0.46},
            "showscale": True,
        },
    )


def _worst_voltage(profile: pd.DataFrame) -> pd.Series:
    """Per bus key, the extreme (min of v_pu_min or max of v_pu_max) farthest from 1 pu."""
    if _is_empty(profile):
        return pd.Series(dtype=float)
    by_bus = profile.assign(key=_bus_key(profile["bus"])).groupby("key")
    v_min, v_max = by_bus["v_pu_min"].min(), by_bus["v_pu_max"].max()
    return pd.Series(np.where(1.0 - v_min >= v_max - 1.0, v_min, v_max), index=v_min.index)


def _base_layout(height: int) -> dict:
    return {"template": "plotly_white", "height": height,
            "margin": {"l": 60, "r": 30, "t": 40, "b": 50},
            "legend": {"orientation": "h", "y": 1.08, "x": 0}}


# ----------------------------------------------------------------------------- helpers


def _check_columns(frame: pd.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"StudyReportData.{name} must be a DataFrame, got {type(frame).__name__}")
    if len(frame.columns) == 0:
        return
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"StudyReportData.{name} lacks column(s) {missing}")


def _bus_key(buses: pd.Series) -> pd.Series:
    """OpenDSS bus name without node suffix, lower-case ('Bus7.1.2' -> 'bus7')."""
    return buses.astype(str).str.split(".").str[0].str.strip().str.lower()


def _escape_series(values: pd.Series) -> pd.Series:
    return values.map(html.escape)


def _utc_naive(times: pd.Series) -> pd.Series:
    """UTC wall-clock times without tz (plotly draws them as given); naive input taken as UTC."""
    return pd.to_datetime(times, utc=True).dt.tz_localize(None)


def _as_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _phase_name(phase) -> str:
    return PHASE_NAMES.get(_as_int(phase), f"phase {phase}")
