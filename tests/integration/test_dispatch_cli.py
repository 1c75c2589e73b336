"""``derms dispatch`` through its Typer app (registered in main.py by the lead): real IEEE 123
feeder, real OpenDSS, real files; bad input and infeasible plans exit 2 with a message."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from derms.cli.dispatch_cmd import app
from tests.data_formats import check_file

runner = CliRunner()
SUMMARY_KEYS = ("peak_uncontrolled_kw", "peak_rule_based_kw", "peak_optimised_kw",
                "peak_perfect_foresight_kw", "violations_uncontrolled", "violations_optimised",
                "solve_s", "ac_verify_s", "n_controllable_ders")


def _run(*args) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("dispatch")
    code, text = _run("ieee123", "--horizon", "12h", "--step", "30min", "--seed", "1",
                      "--policy", "equal_proportional", "--out", path)
    assert code == 0, text
    assert "report:" in text and "peak kW" in text
    return path


def test_summary(out):
    s = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in s and s[key] is not None, key
    assert s["n_steps"] == 24 and s["step_s"] == 1800 and s["curtailment_policy"] == \
        "equal_proportional"
    assert s["n_controllable_ders"] == s["n_pv"] + s["n_battery"] + s["n_ev"] > 0
    assert s["violations_optimised"] == 0
    assert s["peak_optimised_kw"] <= s["peak_uncontrolled_kw"] + 1e-6
    assert s["horizon_start"].endswith("Z")
    # --group auto (the default): IEEE 123's 68 DERs are each planned on their own
    assert s["group_size"] == 1 and s["group_size_from"] == "auto"
    assert s["n_planned_ders"] == s["n_controllable_ders"]
    if s["optimised_mode"] == "perfect_foresight":
        assert s["peak_optimised_kw"] == s["peak_perfect_foresight_kw"]


def test_tables(out):
    s = json.loads((out / "summary.json").read_text())
    n, T = s["n_controllable_ders"], s["n_steps"]
    ders = pd.read_csv(out / "ders.csv")
    assert len(ders) == n and ders["der_id"].is_unique
    assert {"der_id", "kind", "bus", "phases", "p_max_kw", "e_max_kwh"} <= set(ders.columns)
    assert (ders.loc[ders["kind"] == "battery", "e_max_kwh"] > 0).all()
    for name in ("schedule", "schedule_rule_based", "schedule_uncontrolled"):
        sched = pd.read_csv(out / f"{name}.csv")
        assert list(sched.columns[:3]) == ["der_id", "kind", "timestamp"]
        assert {"p_kw", "q_kvar", "soc_frac"} <= set(sched.columns)
        assert len(sched) == n * T
        assert sched["timestamp"].str.endswith("Z").all()
        soc = sched.loc[sched["kind"] == "battery", "soc_frac"]
        assert soc.between(0.0, 1.0).all()
        assert sched.loc[sched["kind"] != "battery", "soc_frac"].isna().all()
    # PV net import is export (<= 0): the DESIGN sign convention
    pv = pd.read_csv(out / "schedule.csv").query("kind == 'pv'")
    assert (pv["p_kw"] <= 1e-9).all()
    head = pd.read_csv(out / "head.csv")
    assert np.isclose(head["p_uncontrolled_kw"].max(), s["peak_uncontrolled_kw"])
    assert np.isclose(head["p_optimised_kw"].max(), s["peak_perfect_foresight_kw"])
    moves = pd.read_csv(out / "ledger_moves.csv")
    assert {"timestamp", "der_id", "delta_kw", "reason"} <= set(moves.columns) and len(moves)
    assert set(moves["der_id"]) <= set(ders["der_id"])
    assert len(pd.read_csv(out / "ledger_binding.csv"))
    readme = (out / "README.md").read_text()
    assert "import (consumption) is positive" in readme and "schedule.csv" in readme


def test_files_match_the_data_formats_doc(out):
    for name in ("ders.csv", "schedule.csv", "schedule_rule_based.csv",
                 "schedule_uncontrolled.csv", "head.csv", "ledger_binding.csv",
                 "ledger_moves.csv", "ledger_curtailment.csv", "violations.csv"):
        check_file(out / name, "derms dispatch")


def test_violations_table_names_what_the_counts_count(out):
    """summary.json gave only counts: which elements the AC check still found in a plan
    was nowhere in the outputs. violations.csv lists every event of the three cases."""
    s = json.loads((out / "summary.json").read_text())
    ev = pd.read_csv(out / "violations.csv")
    assert set(ev["case"]) <= {"uncontrolled", "rule_based", "optimised"}
    assert s["violations_uncontrolled"] > 0  # IEEE 123 at 12 h: the case has some
    for case in ("uncontrolled", "rule_based", "optimised"):
        g = ev[ev["case"] == case]
        new = int(g.loc[~g["pre_existing"], "n_steps"].sum())
        worse = int(g.loc[g["pre_existing"] & g["worsened"], "n_steps"].sum())
        assert new <= s[f"violations_{case}"] <= new + worse, case


def test_report_and_opendss_set(out):
    html = (out / "report.html").read_text()
    for text in ("Substation import", "Battery state of charge", "EV charging",
                 "Curtailment per PV", "Ledger: per interval", "Ledger: cumulative per DER"):
        assert text in html, text
    assert "<script src=" not in html  # self-contained
    for name in ("run_uncontrolled.dss", "run_optimised.dss", "apply_schedule.dss",
                 "der_elements.dss", "settings.dss", "customer_shapes.dss"):
        assert (out / "opendss" / name).is_file(), name
    assert any((out / "opendss" / "feeder").rglob("*.dss"))


@pytest.mark.parametrize(("args", "fragment"), [
    (["--pv", "1.5"], "--pv"),
    (["--horizon", "25min"], "whole number"),
    (["--step", "fortnight"], "--step"),
    (["--replan-every", "often"], "--replan-every"),
    (["--step", "1h", "--replan-every", "90min"], "--replan-every"),
    (["--policy", "random"], "random"),
    (["--horizon", "30d", "--step", "1h"], "--horizon"),
    (["--pv", "0", "--battery", "0", "--ev", "0"], "nothing to dispatch"),
    (["--seed", "-1"], "--seed"),                       # was numpy's traceback
    (["--group", "0"], "--group"),
    (["--group", "some"], "--group"),
    # HiGHS reads a bound of 1e20 as none: this asked for an impossible import and got a
    # plan worse than the uncontrolled one, exit 0 (an independent sweep)
    (["--export-limit-kw=-1e20"], "within ±1e+09 kW"),
    (["--horizon", "24"], "a bare number is minutes"),  # it hid the missing unit
])
def test_bad_input_exits_2(tmp_path, args, fragment):
    code, text = _run("ieee123", *args, "--out", tmp_path)
    assert code == 2, text
    assert fragment in text and "Traceback" not in text


def test_missing_feeder_exits_2(tmp_path):
    code, text = _run(tmp_path / "nosuch.dss", "--out", tmp_path / "o")
    assert code == 2 and "not found" in text


def test_infeasible_exits_2_with_explanation(tmp_path):
    code, text = _run("ieee13", "--horizon", "6h", "--step", "1h", "--export-limit-kw",
                      "-20000", "--out", tmp_path)
    assert code == 2, text
    assert "no dispatch meets every constraint" in text and "export_limit" in text
    # said as the head import in kW, not in LP row units
    flat = " ".join(text.split())
    assert "head import at best" in flat and "minimum of 20000.0 kW" in flat


def test_summary_counts_the_plans_export_limit_misses(tmp_path):
    """With an export limit the summary counts the intervals whose AC head import is below
    its minimum (beside the violations; none here), and proportional_to_capacity keeps
    every PV's curtailment per kVA equal."""
    code, text = _run("ieee13", "--horizon", "6h", "--step", "1h", "--pv", "1", "--battery",
                      "0.2", "--ev", "0", "--policy", "proportional_to_capacity",
                      "--export-limit-kw", "-1500", "--out", tmp_path)
    assert code == 0, text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["export_limit_missed_intervals"] == 0 and s["export_limit_missed_kw_max"] == 0.0
    assert s["min_import_optimised_kw"] >= 1500.0 - 0.5
    sched = pd.read_csv(tmp_path / "schedule.csv").query("kind == 'pv'")
    kva = pd.read_csv(tmp_path / "ders.csv").set_index("der_id")["s_kva"]
    per_kva = sched["curtail_kw"] / sched["der_id"].map(kva).to_numpy()
    spread = per_kva.groupby(sched["timestamp"]).agg(lambda v: v.max() - v.min())
    assert spread.max() <= 0.01 * max(per_kva.max(), 1e-9)


def test_non_empty_out_needs_force(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    code, text = _run("ieee13", "--horizon", "2h", "--step", "1h", "--out", tmp_path)
    assert code == 2 and "--force" in text
    code, text = _run("ieee13", "--horizon", "2h", "--step", "1h", "--force", "--out",
                      tmp_path)  # --force replaces derms output folders only
    assert code == 2 and "manifest.json" in text and (tmp_path / "old.txt").exists()
    (tmp_path / "old.txt").unlink()
    code, text = _run("ieee13", "--horizon", "2h", "--step", "1h", "--out", tmp_path)
    assert code == 0, text
    (tmp_path / "old.txt").write_text("x")
    code, text = _run("ieee13", "--horizon", "2h", "--step", "1h", "--force", "--out",
                      tmp_path)
    assert code == 0, text
    assert not (tmp_path / "old.txt").exists() and (tmp_path / "summary.json").is_file()
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # nothing left aside


def test_out_as_a_symlink_writes_into_its_target(tmp_path):
    """``--out link --force`` where ``link`` points at an earlier output folder: the renames
    acted on the link (it was moved aside, a real folder took its name, the target kept
    its old outputs)."""
    target, link = tmp_path / "runs" / "res", tmp_path / "link"
    args = ("ieee13", "--horizon", "2h", "--step", "1h")
    code, text = _run(*args, "--out", target)
    assert code == 0, text
    (target / "old.txt").write_text("x")
    link.symlink_to(target, target_is_directory=True)
    code, text = _run(*args, "--seed", "2", "--force", "--out", link)
    assert code == 0, text
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert not (target / "old.txt").exists()
    assert json.loads((target / "summary.json").read_text())["seed"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["res"]  # nothing aside


def test_out_pointing_at_a_file_is_refused_even_with_force(tmp_path):
    """--force replaces output folders, never a file (it deleted the file before)."""
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for extra in ((), ("--force",)):
        code, text = _run("ieee13", "--horizon", "2h", "--step", "1h", *extra, "--out", f)
        assert code == 2 and "is a file" in text, text
    assert f.read_text() == "keep me"


def test_rolling_forecast_run_is_reported_with_its_targets(tmp_path):
    code, text = _run("ieee123", "--horizon", "6h", "--step", "30min", "--seed", "2",
                      "--forecast", "noisy", "--out", tmp_path)
    assert code == 0, text
    s = json.loads((tmp_path / "summary.json").read_text())
    r = s["rolling"]
    assert s["optimised_mode"] == "rolling_noisy_forecast" and r["n_replans"] == 12  # every 30-min step
    assert s["peak_optimised_kw"] == pytest.approx(r["peak_executed_kw"])
    assert s["peak_optimised_at"].endswith(("Z", "+00:00"))
    html = (tmp_path / "report.html").read_text()
    assert "Rolling re-plans with forecasts" in html and "peak target" in html
    # the key-figures table lists the rolling block figure by figure, not as a dict's text
    assert "<th>rolling.reduction_ratio</th>" in html
    assert "<th>rolling.realtime_correction.intervals_corrected</th>" in html
    assert "{&#x27;forecast&#x27;" not in html and "{'forecast'" not in html
    assert set(r["realtime_correction"]) == {"intervals_corrected", "rows_beyond_before",
                                             "rows_beyond_after", "kw_moved", "kvar_moved",
                                             "s"}
    code, text = _run("ieee123", "--horizon", "6h", "--step", "30min", "--seed", "2",
                      "--forecast", "noisy", "--no-realtime", "--force", "--out", tmp_path)
    assert code == 0, text
    assert json.loads((tmp_path / "summary.json").read_text())["rolling"][
        "realtime_correction"] is None


def test_rolling_peak_time_is_the_executed_peaks():
    """peak_optimised_kw is the executed peak under --forecast; its time was the
    perfect-knowledge plan's."""
    import numpy as np
    import pandas as pd

    from derms.dispatch.plan import ObjectiveConfig
    from derms.reports.dispatch_study import run_dispatch_study
    from derms.studies.dispatch_scenario import ScenarioConfig

    study = run_dispatch_study("ieee123", ScenarioConfig(seed=2, n_steps=12,
                                                         step=pd.Timedelta("30min")),
                               ObjectiveConfig(), forecast="noisy", replan_every="30min")
    r = study.rolling
    h = r.executed.fleet.horizon
    t = pd.date_range(h.start, periods=len(r.head_kw), freq=h.step)[int(np.argmax(r.head_kw))]
    assert pd.Timestamp(study.summary["peak_optimised_at"]) == t


def test_a_rolling_run_worse_than_uncontrolled_says_so(tmp_path):
    """An independent sweep's case: the noisy-forecast rolling run's executed peak above
    the uncontrolled one, with no note; now a plan note says so, with the figures."""
    code, text = _run("ieee123", "--forecast", "noisy", "--out", tmp_path)
    assert code == 0, text
    s = json.loads((tmp_path / "summary.json").read_text())
    r = s["rolling"]
    worse = r["peak_executed_kw"] > r["peak_uncontrolled_kw"]
    noted = any("above the uncontrolled" in n for n in s["plan_notes"])
    assert worse and noted


def test_rolling_note_names_the_replan_period(tmp_path):
    """optimised_note said "hourly re-plans" whatever --replan-every was (15 min by
    default); it names the period the run used."""
    code, text = _run("ieee123", "--horizon", "6h", "--step", "30min", "--seed", "2",
                      "--forecast", "noisy", "--replan-every", "1h", "--out", tmp_path)
    assert code == 0, text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rolling"]["replan_every"] == "1h"
    assert "every 1h" in s["optimised_note"] and "hourly" not in s["optimised_note"]


def test_out_below_a_file_names_the_file(tmp_path):
    """--out some/file.txt/sub said "cannot write there (File exists)": which file? The
    message is one line, the path whole however long (rich folded it at the console's
    width, mid-name)."""
    deep = tmp_path / ("a_rather_long_folder_name_" * 4)
    deep.mkdir()
    (deep / "file.txt").write_text("x")
    res = runner.invoke(app, ["ieee13", "--horizon", "2h", "--step", "1h",
                              "--out", str(deep / "file.txt" / "sub")])
    assert res.exit_code == 2
    assert f"{deep / 'file.txt'} is a file, not a folder" in res.output, res.output


def test_grouped_plan_is_clean_and_explained_per_der(tmp_path):
    """``--group 4``: fewer planned DERs, the same DERs in the schedule and the ledger
    (members named, never groups), clean in the AC check."""
    code, text = _run("ieee123", "--horizon", "12h", "--step", "30min", "--seed", "1",
                      "--group", "4", "--out", tmp_path)
    assert code == 0, text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_planned_ders"] < s["n_controllable_ders"]
    assert s["violations_optimised"] == 0
    ders = set(pd.read_csv(tmp_path / "ders.csv")["der_id"])
    moves = pd.read_csv(tmp_path / "ledger_moves.csv")
    assert len(moves) and set(moves["der_id"]) <= ders
    sched = pd.read_csv(tmp_path / "schedule.csv")
    assert set(sched["der_id"]) == ders


def test_auto_groups_follow_the_fleet_size_in_both_runs(monkeypatch):
    """``group_size`` None (auto) groups a fleet from ``AUTO_GROUP_MIN_DERS`` DERs (500,
    lowered here to IEEE 123's fleet), and the rolling run plans in the same groups: its
    own draw over twice the horizon is not sized again."""
    import derms.der.aggregate as aggmod
    from derms.dispatch.plan import ObjectiveConfig
    from derms.reports.dispatch_study import run_dispatch_study
    from derms.studies.dispatch_scenario import ScenarioConfig

    monkeypatch.setattr(aggmod, "AUTO_GROUP_MIN_DERS", 20)
    study = run_dispatch_study("ieee123", ScenarioConfig(seed=1, n_steps=8,
                                                         step=pd.Timedelta("1h")),
                               ObjectiveConfig(), forecast="noisy", replan_every="1h")
    s = study.summary
    assert s["group_size"] == aggmod.AUTO_GROUP_SIZE and s["group_size_from"] == "auto"
    assert s["n_planned_ders"] < s["n_controllable_ders"]
    assert study.rolling.executed.p_kw.shape[1] == s["n_planned_ders"]
    assert s["violations_optimised"] == 0


def test_grouped_rolling_run_plans_the_groups_on_two_levels():
    """``--group`` with ``--forecast``: the rolling run plans the same groups (it planned
    every DER on its own, 882 on IEEE 8500: minutes per full re-plan); with 30-min
    re-plans every other one covers the whole horizon, the rest 4 h anchored to it."""
    from derms.dispatch.plan import ObjectiveConfig
    from derms.reports.dispatch_study import run_dispatch_study
    from derms.studies.dispatch_scenario import ScenarioConfig

    study = run_dispatch_study("ieee123", ScenarioConfig(seed=1, n_steps=12,
                                                         step=pd.Timedelta("30min")),
                               ObjectiveConfig(), forecast="noisy", replan_every="30min",
                               group_size=4)
    r, s = study.rolling, study.summary
    assert r.executed.p_kw.shape[1] == s["n_planned_ders"] < s["n_controllable_ders"]
    assert s["rolling"]["n_replans"] == 12 and s["rolling"]["n_full_replans"] == 6
    assert s["rolling"]["replan_short_s_median"] is not None
    assert s["rolling"]["violations_executed"] == 0


def test_a_rolling_run_with_violations_says_so(tmp_path):
    """The rolling run's executed schedule is simulated once on the AC model; where it
    breaks limits (IEEE 13 seed 3 with the noisy forecast, executed as planned) a plan
    note says how many and why, next to the perfect-knowledge plan's clean count. With the
    real-time correction (the default) the same run is clean and says what it moved."""
    from derms.dispatch.plan import ObjectiveConfig
    from derms.reports.dispatch_study import run_dispatch_study
    from derms.studies.dispatch_scenario import ScenarioConfig

    study = run_dispatch_study("ieee13", ScenarioConfig(seed=3), ObjectiveConfig(),
                               forecast="noisy", realtime=False)
    s = study.summary
    n = s["rolling"]["violations_executed"]
    assert n > 0 and s["violations_optimised"] == 0
    assert s["rolling"]["realtime_correction"] is None
    assert any(f"executed schedule has {n} violations" in note
               and "without the real-time correction" in note for note in s["plan_notes"])
    study = run_dispatch_study("ieee13", ScenarioConfig(seed=3), ObjectiveConfig(),
                               forecast="noisy")
    s = study.summary
    rt = s["rolling"]["realtime_correction"]
    from derms.reports.dispatch_html import write_dispatch_report
    html = write_dispatch_report(tmp_path / "report.html", study).read_text()
    assert "real-time AC correction" in html and "rows beyond a limit" in html
    assert s["rolling"]["violations_executed"] == 0
    assert rt["intervals_corrected"] > 0 and rt["rows_beyond_after"] == 0
    assert rt["kw_moved"] + rt["kvar_moved"] > 0
    assert not any("executed schedule has" in note for note in s["plan_notes"])
