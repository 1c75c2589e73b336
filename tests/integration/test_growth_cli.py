"""``derms growth`` through its Typer app (registered in main.py by the lead): real feeder,
real engine, real files."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from derms.cli.growth_cmd import app
from tests.data_formats import check_file

runner = CliRunner()


def _run(*args) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())


def test_growth_writes_tables_and_report(tmp_path):
    code, text = _run("ieee13", "--years", "4", "--ev-share-final", "0.6", "--seed", "3",
                      "--connect", "675:400:ev:2028", "--out", tmp_path)
    assert code == 0, text
    for name in ("peaks", "first_exceeded", "extremes"):
        csv = pd.read_csv(tmp_path / f"{name}.csv")
        pq = pd.read_parquet(tmp_path / f"{name}.parquet")
        assert len(csv) == len(pq) > 0
        check_file(tmp_path / f"{name}.csv", "derms growth")
        check_file(tmp_path / f"{name}.parquet", "derms growth")
    peaks = pd.read_parquet(tmp_path / "peaks.parquet")
    assert set(peaks["year"]) == set(range(2026, 2031))
    assert {"year", "element", "kind", "peak_kw", "peak_time", "rating", "loading_pct"} <= \
        set(peaks.columns)
    assert str(peaks["peak_time"].dt.tz) == "UTC"
    first = pd.read_csv(tmp_path / "first_exceeded.csv")
    assert {"element", "limit", "year", "value", "pre_existing"} <= set(first.columns)
    html = (tmp_path / "report.html").read_text()
    assert "First year each limit is exceeded" in html and "Plotly" in html
    assert "report:" in text


def test_same_seed_same_tables(tmp_path):
    for sub in ("a", "b"):
        code, text = _run("ieee13", "--years", "2", "--seed", "5", "--out", tmp_path / sub)
        assert code == 0, text
    a = pd.read_csv(tmp_path / "a" / "peaks.csv")
    b = pd.read_csv(tmp_path / "b" / "peaks.csv")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize(("args", "fragments"), [
    (["--years", "0"], ["years", "0"]),
    (["--ev-share-final", "1.5"], ["ev final share", "1.5"]),
    (["--growth-pct", "90"], ["growth_pct", "90"]),
    (["--connect", "675:x1:ev:2028"], ["--connect", "675:x1:ev:2028", "KW must be a number"]),
    (["--connect", "nosuchbus:10:ev:2028"], ["nosuchbus", "not a bus"]),
    (["--connect", "675:10:ev:1999"], ["new_connections[0].year", "1999"]),
    (["--connect", "675:inf:ev:2028"], ["new_connections[0].p_kw", "finite"]),  # was a profile
    # error naming load.growth_0
])
def test_bad_input_exits_2_with_message(tmp_path, args, fragments):
    code, text = _run("ieee13", *args, "--out", tmp_path)
    assert code == 2, text
    assert "Traceback" not in text
    for frag in fragments:
        assert frag in text, text


def test_missing_feeder_exits_2(tmp_path):
    code, text = _run(tmp_path / "nope.dss", "--out", tmp_path / "o")
    assert code == 2 and "not found" in text
