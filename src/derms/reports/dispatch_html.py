"""Self-contained HTML report of a dispatch study (plotly.js embedded once, opens offline).

Sections: key figures; substation import before/after (uncontrolled, rule-based,
optimised; AC); violations per case; battery state of charge; EV charging; curtailment
per PV; the ledger (per interval the binding constraints and the DERs moved, by how
much and why; per DER its cumulative share of moves and of curtailment). Power is
import-positive [kW]; times are UTC.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from derms.reports.html_format import fmt_time, fmt_value, note, write_html
from derms.reports.study_html import CSS, PLOT_CONFIG

if TYPE_CHECKING:
    from derms.reports.dispatch_outputs import DispatchStudy

__all__ = ["write_dispatch_report"]

CASE_COLOURS = {"uncontrolled": "#d55e00", "rule-based": "#e69f00", "optimised": "#0072b2"}
MAX_LEDGER_ROWS = 400
TOP_PER_INTERVAL = 4
HEIGHT = 420
NUM_CELL = '<td class="num">'


def write_dispatch_report(path: Path, study: DispatchStudy) -> Path:
    """Write the report of ``study`` at ``path`` (parents created)."""
    return write_html(path, _page(study))


def _page(st: DispatchStudy) -> str:
    s = st.summary
    parts = [f"<h2>Key figures</h2>\n{_kv_table(s)}"]
    if s.get("optimised_mode") == "perfect_foresight":
        parts.append(note("Optimised = the plan with perfect knowledge of PV and load over "
                          "the horizon (no forecast error)."))
    sections = [
        ("Substation import: uncontrolled, rule-based, optimised (AC)", _head_fig(st)),
        ("Battery state of charge (optimised plan)", _soc_fig(st)),
        ("EV charging", _ev_fig(st)),
        ("Curtailment per PV system (optimised plan)", _curtail_fig(st)),
    ]
    if st.rolling is not None:
        title = ("Rolling re-plans with forecasts: executed import and each plan's peak "
                 "target (AC)")
        sections.insert(1, (title, _rolling_fig(st)))
    for title, fig in sections:
        body = _figure(fig) if fig is not None else note("Nothing to draw.")
        parts.append(f"<h2>{html.escape(title)}</h2>\n{body}")
        if title.startswith("Substation"):
            parts.append(f"<h3>Violations (AC simulation)</h3>\n{_violations(st)}")
    parts.append("<h2>Ledger: per interval</h2>\n" + note(
        "Binding constraints: LP rows with a nonzero dual (kind, element, limit, AC value). "
        "Moves: net import of a DER against the uncontrolled case [kW, consumption +], "
        "with the constraint it serves most (or 'shift for …' when energy is moved to "
        "serve a constraint at another interval, or 'objective').") + _interval_ledger(st))
    parts.append("<h2>Ledger: cumulative per DER</h2>\n" + _der_ledger(st))
    if len(st.ledger.ev_shortfalls):
        parts.append("<h2>EV sessions short of their energy</h2>\n" + note(
            "A network limit leaves no way to give these sessions their full energy by "
            "departure: the grid limit comes first, and the constraint named is the one in "
            "the plug-in window that weighs most on the session's charging.")
            + _table(st.ledger.ev_shortfalls))
    title = f"Dispatch — {st.feeder}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n"
            f"<script>{get_plotlyjs()}</script>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class=\"subtitle\">Network-constrained DER "
            "dispatch · times in UTC · power import-positive (consumption +)</p>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def _kv_table(summary: dict) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt_value(v))}</td>"
                   "</tr>" for k, v in _flat(summary) if k != "violation_definition")
    return f"<table class=\"summary\"><tbody>{body}</tbody></table>"


def _flat(d: dict, prefix: str = ""):
    """(dotted key, value) of a summary, nested blocks (e.g. ``rolling``) one row per
    figure instead of one dict's text."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _figure(fig: go.Figure) -> str:
    return "<div class=\"figure\">" + fig.to_html(
        full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
        default_height=f"{fig.layout.height or HEIGHT}px") + "</div>"


def _layout(fig: go.Figure, y_title: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height, xaxis_title="time (UTC)",
                      yaxis_title=y_title, margin={"l": 60, "r": 30, "t": 30, "b": 50})
    return fig


def _times(st: DispatchStudy) -> pd.DatetimeIndex:
    return st.uncontrolled.result.t


def _head_fig(st: DispatchStudy) -> go.Figure:
    t = _times(st)
    fig = go.Figure()
    for name, case in (("uncontrolled", st.uncontrolled), ("rule-based", st.rule_based),
                       ("optimised", st.optimised)):
        fig.add_trace(go.Scatter(x=t, y=case.head_kw, mode="lines", name=name,
                                 line={"color": CASE_COLOURS[name], "shape": "hv"}))
    lim = st.objective.export_limit_kw
    if lim is not None:
        fig.add_hline(y=-lim, line={"color": "#a50026", "dash": "dash"},
                      annotation_text=f"export limit {lim:g} kW")
    return _layout(fig, "substation import kW")


def _rolling_fig(st: DispatchStudy) -> go.Figure:
    """The executed schedule's head import (AC) against the uncontrolled case and the
    perfect-knowledge plan, with the peak each re-plan aimed at (held until the next)."""
    r = st.rolling
    t = _times(st)
    n = min(len(t), r.head_kw.size)
    fig = go.Figure()
    for name, y in (("uncontrolled", st.uncontrolled.head_kw[:n]),
                    ("perfect knowledge", st.optimised.head_kw[:n]),
                    ("executed (rolling)", r.head_kw[:n])):
        fig.add_trace(go.Scatter(x=t[:n], y=y, mode="lines", name=name,
                                 line={"shape": "hv"}))
    every = max(1, -(-n // max(r.n_replans, 1)))
    target = np.repeat(np.where(np.isfinite(r.target_kw_at_replan), r.target_kw_at_replan,
                                np.nan), every)[:n]
    fig.add_trace(go.Scatter(x=t[:n], y=target, mode="lines", name="plan's peak target",
                             line={"shape": "hv", "dash": "dot", "color": "#000000"}))
    c = [x for x in r.corrections if x.t < n]
    if c:  # the intervals the real-time AC correction acted on, and what it did
        k = np.array([x.t for x in c])
        fig.add_trace(go.Scatter(
            x=t[k], y=r.head_kw[k], mode="markers", name="real-time AC correction",
            marker={"symbol": "x", "size": 8, "color": "#d62728"},
            text=[f"rows beyond a limit {x.rows_before} -> {x.rows_after}; moved "
                  f"{x.kw_moved:.1f} kW, {x.kvar_moved:.1f} kvar" for x in c],
            hovertemplate="%{x}<br>%{text}<extra></extra>"))
    return _layout(fig, "substation import kW")


def _soc_fig(st: DispatchStudy) -> go.Figure | None:
    f = st.scenario.fleet
    if not f.batteries:
        return None
    s = st.optimised.schedule
    e_max = np.array([b.e_max_kwh for b in f.batteries])
    soc = s.e_kwh / e_max
    t = _times(st)
    fig = go.Figure([go.Scatter(x=t, y=soc[:, j], mode="lines", name=b.der_id,
                                line={"width": 1})
                     for j, b in enumerate(f.batteries)])
    rb = st.rule_based.schedule.e_kwh / e_max
    fig.add_trace(go.Scatter(x=t, y=rb.mean(axis=1), mode="lines", name="rule-based (mean)",
                             line={"color": "#000000", "dash": "dash", "width": 2}))
    return _layout(fig, "state of charge (fraction of usable capacity)")


def _ev_fig(st: DispatchStudy) -> go.Figure | None:
    f = st.scenario.fleet
    if not f.evs:
        return None
    t = _times(st)
    opt, unc = st.optimised.schedule.ev_kw, st.uncontrolled.schedule.ev_kw
    fig = go.Figure()
    for j, e in enumerate(f.evs):
        fig.add_trace(go.Scatter(x=t, y=opt[:, j], mode="lines", name=e.der_id,
                                 stackgroup="ev", line={"width": 0.5, "shape": "hv"}))
    fig.add_trace(go.Scatter(x=t, y=unc.sum(axis=1), mode="lines",
                             name="uncontrolled (total)",
                             line={"color": CASE_COLOURS["uncontrolled"], "dash": "dash",
                                   "width": 2, "shape": "hv"}))
    return _layout(fig, "EV charging kW (optimised, stacked per EV)")


def _curtail_fig(st: DispatchStudy) -> go.Figure | None:
    f = st.scenario.fleet
    if not f.pv:
        return None
    dt = f.horizon.dt_h
    curt = st.optimised.schedule.curtail_kw.sum(axis=0) * dt
    avail = np.array([p.p_avail_kw.sum() for p in f.pv]) * dt
    pct = np.divide(100 * curt, avail, out=np.zeros_like(curt), where=avail > 0)
    ids = [p.der_id for p in f.pv]
    fig = go.Figure([go.Bar(x=ids, y=curt, name="curtailed kWh", marker_color="#0072b2",
                            customdata=pct,
                            hovertemplate="%{x}: %{y:.2f} kWh (%{customdata:.1f} % of "
                                          "available)<extra></extra>")])
    _layout(fig, "curtailed energy kWh over the horizon")
    fig.update_layout(xaxis_title="PV system")
    return fig


def _violations(st: DispatchStudy) -> str:
    rows = []
    for name, case in (("uncontrolled", st.uncontrolled), ("rule-based", st.rule_based),
                       ("optimised", st.optimised)):
        c = case.violations.counts
        rows.append({"case": name, "peak kW": float(case.head_kw.max()),
                     "voltage": c["violations_voltage"],
                     "undervoltage": c["violations_undervoltage"],
                     "overvoltage": c["violations_overvoltage"],
                     "thermal": c["violations_thermal"],
                     "pre-existing voltage": c["pre_existing_voltage"],
                     "pre-existing thermal": c["pre_existing_thermal"]})
    html = note("Counts of (node-phase or branch-conductor × interval) pairs; pre-existing: "
                "already beyond the limit without DERs, held to that base-case value and "
                "listed separately. Every event is in violations.csv.") \
        + _table(pd.DataFrame(rows))
    ev = st.optimised.violations.events
    left = ev[~ev["pre_existing"].astype(bool) | ev["worsened"].astype(bool)] if len(ev) else ev
    if len(left):  # what the AC check still finds in the plan, by name
        left = left.head(50).copy()  # worst/limit in full: 101.0018 % is over, "101.0" not
        left["worst"], left["limit"] = (left[c].map(lambda v: f"{v:.4f}")
                                        for c in ("worst", "limit"))
        html += "<h3>Left in the optimised plan</h3>\n" + _table(left)
    return html


def _interval_ledger(st: DispatchStudy) -> str:
    led = st.ledger
    t = _times(st)
    b, m = led.binding, led.moves
    b_txt: dict = {}
    if len(b):
        lab = b["kind"].astype(str) + " " + b["element"].astype(str)
        for ts, g in lab.groupby(b["t"]):
            items = list(dict.fromkeys(g))
            extra = f" (+{len(items) - TOP_PER_INTERVAL} more)" if len(items) > TOP_PER_INTERVAL \
                else ""
            b_txt[ts] = "; ".join(items[:TOP_PER_INTERVAL]) + extra
    m_txt, n_moved, tot = {}, {}, {}
    if len(m):
        mm = m.assign(abs_kw=m["delta_kw"].abs()).sort_values(["t", "abs_kw"],
                                                              ascending=[True, False])
        for ts, g in mm.groupby("t", sort=False):
            top = g.head(TOP_PER_INTERVAL)
            m_txt[ts] = "; ".join(f"{r.der_id} {r.delta_kw:+.2f} kW ({r.reason})"
                                  for r in top.itertuples(index=False))
            n_moved[ts], tot[ts] = len(g), float(g["abs_kw"].sum())
    rows = [{"interval start": fmt_time(ts), "binding constraints": b_txt.get(ts, ""),
             "DERs moved": n_moved.get(ts, 0), "sum |Δ| kW": tot.get(ts, 0.0),
             "largest moves (Δ net import, reason)": m_txt.get(ts, "")}
            for ts in t if ts in b_txt or ts in m_txt]
    if not rows:
        return note("No constraint binds and no DER is moved.")
    frame = pd.DataFrame(rows)
    more = note(f"{len(frame) - MAX_LEDGER_ROWS} more intervals in ledger_*.csv.") \
        if len(frame) > MAX_LEDGER_ROWS else ""
    return _table(frame.head(MAX_LEDGER_ROWS)) + more


def _der_ledger(st: DispatchStudy) -> str:
    led, f = st.ledger, st.scenario.fleet
    dt = f.horizon.dt_h
    ids = f.der_ids
    frame = pd.DataFrame({"der_id": ids, "kind": f.kinds})
    m = led.moves
    if len(m):
        moved = (m["delta_kw"].abs() * dt).groupby(m["der_id"]).sum()
        reason = m.groupby("der_id")["reason"].agg(lambda r: r.value_counts().index[0])
    else:
        moved, reason = pd.Series(dtype=float), pd.Series(dtype=object)
    frame["moved kWh (Σ|Δ|·dt)"] = frame["der_id"].map(moved).fillna(0.0)
    total = frame["moved kWh (Σ|Δ|·dt)"].sum()
    frame["share of moves"] = frame["moved kWh (Σ|Δ|·dt)"] / total if total > 0 else 0.0
    frame["main reason"] = frame["der_id"].map(reason).astype(object).fillna("")
    c = led.curtailment
    if len(c):
        last = c[c["t"] == c["t"].max()].set_index("der_id")
        frame["curtailed kWh"] = frame["der_id"].map(last["curtailed_kwh_cum"])
        frame["share of curtailment"] = frame["der_id"].map(last["share_cum"])
    frame = frame.sort_values("moved kWh (Σ|Δ|·dt)", ascending=False)
    return _table(frame)


def _table(frame: pd.DataFrame) -> str:
    if frame is None or frame.empty:
        return note("None.")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            text = "" if v is None or (num and np.isnan(v)) else fmt_value(v)
            cells.append((NUM_CELL if num else "<td>") + html.escape(text) + "</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
