"""Files of an interconnection check (documented in docs/data-formats.md).

``intervals.csv``: per method, direction and interval ``method,direction,timestamp,
available_kw,allowed_kw,curtailed_kw`` (timestamp ISO 8601 UTC, interval start; device
output or consumption [kW], >= 0). ``summary.json``: the static limit and whether the
size fits, the flexible connection's curtailed energy and share per direction, and, with
the reference, the difference of the annual curtailment [%]. ``report.html``: available
and allowed power over the horizon and the curtailment duration curve.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from derms.analysis.interconnection import InterconnectionResult
from derms.reports.html_format import fmt_value, write_html
from derms.reports.study_html import PLOT_CONFIG, _html_document


def write_interconnect_outputs(results: dict[str, InterconnectionResult], feeder: str,
                               master: str, out: Path) -> dict:
    """Write intervals.csv, summary.json and report.html; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = [r.intervals.assign(method=m) for m, r in results.items()]
    table = pd.concat(frames, ignore_index=True)
    table = table[["method", "direction", "timestamp", "available_kw", "allowed_kw",
                   "curtailed_kw"]]
    table["timestamp"] = pd.DatetimeIndex(table["timestamp"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    table.to_csv(out / "intervals.csv", index=False, float_format="%.6g")
    fast = results["fast"]
    summ: dict = {
        "feeder": feeder, "master": master, "bus": fast.site.bus, "phases": fast.site.phases,
        "kind": fast.kind, "p_kw": fast.p_kw, "intervals": int(len(fast.intervals)
                                                              / len(fast.static_limit_kw)),
        "dt_h": fast.dt_h, "static_limit_kw": fast.static_limit_kw,
        "static_ok": fast.static_ok, "flexible": fast.annual(),
        "runtime_s": {m: round(r.runtime_s, 3) for m, r in results.items()},
        "ac_solves": {m: r.n_ac_solves for m, r in results.items()},
    }
    if "reference" in results:
        ref = results["reference"].annual()
        summ["reference"] = ref
        summ["reference_static_limit_kw"] = results["reference"].static_limit_kw
        diffs = []
        for d, a in fast.annual().items():
            r = ref[d]["curtailed_kwh"]
            diffs.append(100 * (a["curtailed_kwh"] - r) / r if r > 0 else
                         (0.0 if a["curtailed_kwh"] == 0 else float("inf")))
        summ["reference_difference_pct"] = round(max(diffs, key=abs), 3)
    (out / "summary.json").write_text(json.dumps(summ, indent=2), encoding="utf-8")
    write_html(out / "report.html", _page(summ, table))
    return summ


def _page(summ: dict, table: pd.DataFrame) -> str:
    rows = {k: v for k, v in summ.items() if not isinstance(v, dict)}
    for d, a in summ["flexible"].items():
        rows[f"{d}: static limit [kW]"] = round(summ["static_limit_kw"][d], 1)
        rows[f"{d}: flexible, curtailed kWh / share"] = (
            f"{a['curtailed_kwh']:,.0f} of {a['available_kwh']:,.0f} kWh "
            f"({100 * a['curtailed_share']:.2f} %), {a['curtailed_hours']:.0f} h")
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt_value(v))}</td></tr>"
                   for k, v in rows.items())
    fast = table[table["method"] == "fast"]
    fig = go.Figure()
    for d, g in fast.groupby("direction"):
        fig.add_trace(go.Scattergl(x=g["timestamp"], y=g["available_kw"], name=f"{d} available"))
        fig.add_trace(go.Scattergl(x=g["timestamp"], y=g["allowed_kw"], name=f"{d} allowed"))
    dur = go.Figure()
    for (m, d), g in table.groupby(["method", "direction"]):
        c = np.sort(g["curtailed_kw"].to_numpy())[::-1]
        dur.add_trace(go.Scatter(y=c[c > 0], name=f"{m} {d}"))
    dur.update_layout(xaxis_title="hours", yaxis_title="curtailed kW")
    figs = "".join(
        f'<h2>{t}</h2><div class="figure">{f.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG, div_id=k, default_height="420px")}</div>'
        for t, f, k in (("Available and allowed power", fig, "fig-power"),
                        ("Curtailment duration", dur, "fig-duration")))
    doc = _html_document(f"Interconnection — {summ['feeder']} {summ['bus']}", summ["feeder"],
                         f'<h2>Summary</h2><table class="summary"><tbody>{body}</tbody></table>'
                         + figs, True)
    return doc.replace("quasi-static time-series study · times in UTC · substation power "
                       "import-positive", "interconnection check · times in UTC · device "
                       "power [kW], >= 0")
