"""``derms interconnect`` through the main CLI: files checked against docs/data-formats.md,
bad input exits 2 with a clear message."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from derms.cli.main import app
from tests.data_formats import check_file

runner = CliRunner()


def _run(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["interconnect", *[str(a) for a in args]])
    return res.exit_code, " ".join(res.output.split())


def test_interconnect_writes_documented_files(tmp_path):
    out = tmp_path / "ic"
    code, text = _run("ieee123", "--bus", "67", "--kw", "1500", "--days", "3",
                      "--start", "2026-06-01T08:00Z", "--reference", "--out", out)
    assert code == 0, text
    check_file(out / "intervals.csv", "derms interconnect")
    table = pd.read_csv(out / "intervals.csv")
    assert set(table["method"]) == {"fast", "reference"} and len(table) == 2 * 72
    summ = json.loads((out / "summary.json").read_text())
    assert summ["static_ok"] is False and summ["kind"] == "pv"
    fast = table[table["method"] == "fast"]
    assert abs(summ["flexible"]["export"]["curtailed_kwh"] - fast["curtailed_kw"].sum()) < 1e-3
    assert abs(summ["reference_difference_pct"]) <= 10.0
    assert "Interconnection" in (out / "report.html").read_text()
    assert "needs a flexible connection" in text


@pytest.mark.parametrize(("args", "message"), [
    (("--bus", "nosuch", "--kw", "10"), "unknown bus 'nosuch'"),
    (("--bus", "11.2", "--kw", "10"), "bus '11' has no phase 2"),
    (("--bus", "67", "--kw", "-10"), "--kw -10.0"),
    (("--bus", "67", "--kw", "10", "--kind", "wind"), "--kind 'wind'"),
    (("--bus", "67", "--kw", "10", "--days", "0"), "--days 0.0"),
])
def test_bad_input_exits_2(tmp_path, args, message):
    code, text = _run("ieee123", "--out", tmp_path / "x", "--days", "1", *args)
    assert code == 2, text
    assert message in text
