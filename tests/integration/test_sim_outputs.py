"""``derms sim`` offline (no DERMS): its files match docs/data-formats.md, and bad options
exit 2 naming the option."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from derms.cli.main import app
from tests.data_formats import check_file


def test_offline_run_writes_the_documented_files(tmp_path):
    out = tmp_path / "sim"
    r = CliRunner().invoke(app, ["sim", "--out", str(out), "--devices", "20", "--seed", "1",
                                 "--duration", "10min", "--step", "60s", "--speed", "10000"])
    assert r.exit_code == 0, r.output
    for name in ("timeseries.csv", "timeseries.parquet", "devices.csv"):
        check_file(out / name, "derms sim")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 20 and summary["steps"] == 10
    assert (out / "report.html").stat().st_size > 1000 and (out / "manifest.json").exists()


def test_bad_options_exit_2(tmp_path):
    for args, text in ((["--telemetry", "carrier-pigeon"], "--telemetry"),
                       (["--mqtt", "nohost", "--telemetry", "mqtt"], "--mqtt"),
                       (["--feeder-id", "ieee123"], "--feeder-id")):
        r = CliRunner().invoke(app, ["sim", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2, (args, r.output)
        assert text in r.output, (args, r.output)


def test_unreachable_ieee2030_5_server_is_a_clear_error(tmp_path):
    """The useful error (DeviceCapability unreachable) was masked by 'Event loop is
    closed' from the clean-up, a traceback and exit 1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                       # closed again: nothing listens
    r = CliRunner().invoke(app, ["certs", str(tmp_path / "pki"), "--device", "d1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["sim", "--out", str(tmp_path / "x"), "--devices", "5",
                                 "--duration", "1min", "--ieee2030-5", f"127.0.0.1:{port}",
                                 "--pki", str(tmp_path / "pki")])
    assert r.exit_code == 2, r.output
    assert "unreachable" in r.output.lower() and "Event loop is closed" not in r.output


def test_the_twin_sun_follows_the_given_site(tmp_path):
    """The twin's location was fixed at 37 N -120 E (UTC-8): a European feeder's run at
    local noon had no PV at all, without a warning (independent test)."""
    import pandas as pd

    def pv_kw(*extra):
        out = tmp_path / f"sim{len(extra)}"
        r = CliRunner().invoke(app, ["sim", "--out", str(out), "--devices", "20", "--seed", "1",
                                     "--duration", "5min", "--step", "60s", "--speed", "10000",
                                     "--mix", "pv=1", "--start", "2026-06-21T12:00:00Z",
                                     *extra])
        assert r.exit_code == 0, r.output
        return pd.read_csv(out / "timeseries.csv")["pv_avail_kw"].mean()

    assert pv_kw() == 0.0                                  # 04:00 at -120 deg: night
    assert pv_kw("--latitude", "51.5", "--longitude", "0") > 50.0  # noon in London
