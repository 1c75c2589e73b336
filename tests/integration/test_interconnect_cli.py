"""``derms interconnect`` through the main CLI: files checked against docs/data-formats.md,
bad input exits 2 with a clear message."""

from __future__ import annotations

import json

import numpy as np
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
    # the CSV keeps 6 significant digits (%.6g): the sum agrees within their rounding
    v = fast["curtailed_kw"].abs().to_numpy()
    ulp = np.where(v > 0, 0.5 * 10.0 ** (np.floor(np.log10(np.where(v > 0, v, 1.0))) - 5), 0.0)
    assert abs(summ["flexible"]["export"]["curtailed_kwh"] - fast["curtailed_kw"].sum()) \
        <= ulp.sum() + 1e-9
    assert abs(summ["reference_difference_pct"]) <= 10.0
    assert "Interconnection" in (out / "report.html").read_text()
    assert "needs a flexible connection" in text


@pytest.mark.parametrize(("args", "message"), [
    (("--bus", "nosuch", "--kw", "10"), "unknown bus 'nosuch'"),
    (("--bus", "11.2", "--kw", "10"), "bus '11' has no phase 2"),
    (("--bus", "67", "--kw", "-10"), "--kw -10.0"),
    (("--bus", "67", "--kw", "1e308"), "--kw 1e+308"),  # exit 0 with Infinity in the JSON
    (("--bus", "67", "--kw", "inf"), "--kw inf"),
    (("--bus", "67", "--kw", "10", "--kind", "wind"), "--kind 'wind'"),
    (("--bus", "67", "--kw", "10", "--days", "0"), "--days 0.0"),
])
def test_bad_input_exits_2(tmp_path, args, message):
    code, text = _run("ieee123", "--out", tmp_path / "x", "--days", "1", *args)
    assert code == 2, text
    assert message in text


def test_manifest_records_version_command_feeder_hash_and_seed(tmp_path):
    """Issue 11: every output folder carries manifest.json (docs/data-formats.md)."""
    import hashlib
    from pathlib import Path

    out = tmp_path / "m"
    code, text = _run("ieee13", "--bus", "675", "--kw", "10", "--days", "1", "--seed", "7",
                      "--out", out)
    assert code == 0, text
    man = json.loads((out / "manifest.json").read_text())
    assert set(man) == {"derms_version", "command", "created_utc", "seed", "feeder",
                        "inputs", "files"}
    assert man["seed"] == 7 and man["created_utc"].endswith("Z")
    assert man["files"] == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    master = Path(man["feeder"]["master"])
    assert man["feeder"]["master_sha256"] == hashlib.sha256(master.read_bytes()).hexdigest()
    h = hashlib.sha256()
    files = sorted(p for p in master.parent.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(master.parent)).encode() + b"\0")
        h.update(p.read_bytes())
    assert man["feeder"]["folder_sha256"] == h.hexdigest()
    assert man["feeder"]["n_files"] == len(files)
