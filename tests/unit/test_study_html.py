"""Tests of the self-contained QSTS study HTML report."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from derms.errors import InputError
from derms.reports.study_html import (
    SECTION_TITLES,
    StudyReportData,
    write_study_report,
)
from derms.reports.violations_html import MAX_VIOLATION_ROWS

BUSES = ["sourcebus", "b1", "b2", "b3", "b4"]
T0 = pd.Timestamp("2024-06-01T00:00:00Z")


def _violations(n_extra: int = 0) -> pd.DataFrame:
    rows = [
        ("undervoltage", "b4.3", 3, T0 + pd.Timedelta(hours=18), T0 + pd.Timedelta(hours=20),
         2.0, 0.941, 0.95, False),
        ("overvoltage", "b3.1", 1, T0 + pd.Timedelta(hours=12), T0 + pd.Timedelta(hours=13),
         1.0, 1.061, 1.05, False),
        ("thermal", "line.l_head", 1, T0 + pd.Timedelta(hours=19), T0 + pd.Timedelta(hours=20),
         1.0, 131.5, 100.0, True),
        ("reverse_power", "vsource.source", 0, T0 + pd.Timedelta(hours=12),
         T0 + pd.Timedelta(hours=14), 2.0, -85.0, 0.0, False),
    ]
    rows += [("undervoltage", f"x{i}.1", 1, T0, T0 + pd.Timedelta(hours=1), 1.0, 0.94, 0.95,
              False) for i in range(n_extra)]
    return pd.DataFrame(rows, columns=["kind", "element", "phase", "start", "end",
                                       "duration_h", "worst", "limit", "pre_existing"])


def _data(title: str = "QSTS study", n_extra_violations: int = 0) -> StudyReportData:
    rng = np.random.default_rng(1)
    profile = pd.DataFrame(
        [(b, ph, 0.5 * i, 0.99 - 0.012 * i + 0.002 * ph, 1.01 + 0.011 * i)
         for i, b in enumerate(BUSES) for ph in (1, 2, 3)],
        columns=["bus", "phase", "distance_km", "v_pu_min", "v_pu_max"],
    )
    t = pd.date_range(T0, periods=24, freq="h")
    head = pd.DataFrame(
        [(ti, ph, 300 + 100 * np.sin(k / 4) + rng.normal(0, 5), 40.0)
         for k, ti in enumerate(t) for ph in (1, 2, 3)],
        columns=["t", "phase", "p_kw", "q_kvar"],
    )
    bus_xy = pd.DataFrame({"bus": BUSES, "x": [0.0, 1, 2, 3, 2], "y": [0.0, 0, 0, 0, 1]})
    branches = pd.DataFrame({
        "element": ["line.l_head", "line.l2", "line.l3", "transformer.t4"],
        "bus1": ["sourcebus", "b1.1.2.3", "b2", "b2"],
        "bus2": ["b1", "b2", "b3", "b4"],
        "loading_pct_max": [131.5, 85.0, 20.0, np.nan],
    })
    return StudyReportData(
        title=title, feeder="test_feeder",
        summary={"steps": 24, "step size [min]": 60, "PV penetration [%]": 30.0,
                 "runtime [s]": 1.234},
        voltage_profile=profile, limits=(0.95, 1.05), head=head, bus_xy=bus_xy,
        branches=branches, violations=_violations(n_extra_violations),
        notes=["line.l_head rating is the engine default (400 A)."],
    )


def test_report_has_sections_and_violations(tmp_path):
    out = write_study_report(tmp_path / "sub" / "report.html", _data())
    assert out.exists()
    text = out.read_text(encoding="utf-8")
    for title in SECTION_TITLES.values():
        assert title in text
    for element in ["b4.3", "b3.1", "line.l_head", "vsource.source"]:
        assert f"<td>{element}</td>" in text
    assert "2024-06-01T18:00:00Z" in text
    assert "Pre-existing violations" in text
    assert "engine default (400 A)" in text


def test_plotlyjs_embedded_once_and_no_external_resources(tmp_path):
    text = write_study_report(tmp_path / "r.html", _data()).read_text(encoding="utf-8")
    assert text.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", text)
    assert "<link" not in text
    assert text.count('class="plotly-graph-div"') == 3


def test_title_is_escaped(tmp_path):
    data = _data(title="<script>alert('x')</script> study")
    text = write_study_report(tmp_path / "r.html", data).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; study" in text
    assert "<script>alert" not in text


def test_violation_table_capped(tmp_path):
    data = _data(n_extra_violations=MAX_VIOLATION_ROWS + 20)
    text = write_study_report(tmp_path / "r.html", data).read_text(encoding="utf-8")
    assert "23 more not shown" in text  # 523 new violations, 500 shown


def test_empty_report_still_writes(tmp_path):
    data = StudyReportData(title="empty", feeder="f")
    text = write_study_report(tmp_path / "empty.html", data).read_text(encoding="utf-8")
    assert "No violations" in text
    assert "No bus coordinates in the model." in text
    assert "No time steps in this study." in text
    assert text.rstrip().endswith("</html>")


def test_empty_frames_with_columns_still_write(tmp_path):
    full = _data()
    data = StudyReportData(
        title="no steps", feeder="f", voltage_profile=full.voltage_profile.iloc[:0],
        head=full.head.iloc[:0], bus_xy=full.bus_xy.iloc[:0], branches=full.branches.iloc[:0],
        violations=full.violations.iloc[:0],
    )
    text = write_study_report(tmp_path / "r.html", data).read_text(encoding="utf-8")
    assert "No violations" in text
    assert "plotly.js v" not in text


def test_missing_column_raises(tmp_path):
    data = _data()
    bad = StudyReportData(title="x", feeder="f", head=data.head.drop(columns="q_kvar"))
    with pytest.raises(InputError, match="q_kvar"):
        write_study_report(tmp_path / "r.html", bad)


def test_large_map_uses_few_traces(tmp_path):
    n = 3000
    rng = np.random.default_rng(0)
    buses = [f"n{i}" for i in range(n + 1)]
    data = StudyReportData(
        title="big", feeder="f",
        bus_xy=pd.DataFrame({"bus": buses, "x": rng.random(n + 1), "y": rng.random(n + 1)}),
        branches=pd.DataFrame({"element": [f"line.l{i}" for i in range(n)], "bus1": buses[:-1],
                               "bus2": buses[1:], "loading_pct_max": rng.random(n) * 150}),
    )
    text = write_study_report(tmp_path / "r.html", data).read_text(encoding="utf-8")
    # 6 loading bins + colour-bar trace + bus markers, whatever the number of branches
    match = re.search(r'Plotly\.newPlot\(\s*"fig-map",\s*(\[.*?\]),\s*\{"template"', text, re.S)
    assert match is not None
    assert match.group(1).count('"type":"scatter') == 8
