"""The derms command run as a user runs it: a real subprocess, real files, real engine."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.data_formats import check_file

COMMANDS = ["feeders", "model", "powerflow", "study"]


def derms(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "derms.cli.main", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = " ".join((proc.stderr + proc.stdout).split())
    assert "Traceback" not in text
    for frag in fragments:
        assert frag in text, text


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_everywhere(cmd):
    proc = derms(*([cmd] if cmd else []), "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_powerflow_writes_tables(tmp_path):
    proc = derms("powerflow", "ieee13", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    v = pd.read_csv(tmp_path / "voltages.csv")
    assert {"bus", "phase", "v_pu"} <= set(v.columns)
    assert len(v) == 41 and v.phase.isin([1, 2, 3]).all()
    b = pd.read_csv(tmp_path / "branches.csv")
    assert {"element", "loading_pct"} <= set(b.columns)
    assert json.loads((tmp_path / "summary.json").read_text())["head_p_kw"] > 3000
    # like every command: a non-empty --out is refused without --force (it wrote over it)
    (tmp_path / "keep.txt").write_text("mine")
    proc = derms("powerflow", "ieee13", "--out", tmp_path)
    assert proc.returncode == 2 and "--force" in proc.stderr + proc.stdout
    assert (tmp_path / "keep.txt").exists()
    assert derms("powerflow", "ieee13", "--out", tmp_path, "--force").returncode == 0
    assert (tmp_path / "manifest.json").exists() and not (tmp_path / "keep.txt").exists()


def test_force_never_replaces_the_current_folder_or_the_inputs(tmp_path):
    """``--out . --force`` deleted every file of the current folder, and ``--out`` set to
    the feeder's own folder deleted the model (an independent sweep): both refused now,
    whatever ``--force`` says, and nothing is touched."""
    import shutil

    from tests.conftest import shared_master

    src = shared_master("ieee13")
    feeder = tmp_path / "feeder"
    shutil.copytree(src.parent, feeder)
    master = feeder / src.name
    before = sorted(p.name for p in feeder.iterdir())
    for out, cwd, fragment in ((".", feeder, "current folder"),
                               (str(tmp_path), feeder, "current folder"),
                               (str(feeder), tmp_path, "holds")):
        proc = subprocess.run([sys.executable, "-m", "derms.cli.main", "powerflow",
                               str(master), "--out", out, "--force"], cwd=cwd,
                              capture_output=True, text=True, timeout=300, check=False)
        assert_clean_error(proc, fragment)
        assert sorted(p.name for p in feeder.iterdir()) == before


def test_the_feeder_hash_leaves_output_folders_inside_it_out(tmp_path):
    """The manifest's hash of the feeder's folder took in the run's own output when
    ``--out`` was inside that folder, so a second run over it named another feeder hash
    (an independent sweep). Output folders (the run's own, any earlier run's, whose
    manifest.json marks it) are not the feeder's; everything else in the folder is."""
    import hashlib
    import shutil

    from derms.grid.bundled import resolve_master

    src = resolve_master("ieee13")
    feeder = tmp_path / "feeder"
    shutil.copytree(src.parent, feeder)
    shutil.copy(src.parent.parent / "IEEELineCodes.DSS", tmp_path)  # its redirect's target
    master = feeder / src.name
    own = sorted(p for p in feeder.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in own:
        h.update(str(p.relative_to(feeder)).encode() + b"\0")
        h.update(p.read_bytes())
    hashes = []
    for args in (("--out", feeder / "runs" / "a"), ("--out", feeder / "runs" / "a", "--force"),
                 ("--out", feeder / "b")):
        assert derms("powerflow", master, *args).returncode == 0
        man = json.loads((args[1] / "manifest.json").read_text())
        hashes.append((man["feeder"]["folder_sha256"], man["feeder"]["n_files"]))
    assert hashes == [(h.hexdigest(), len(own))] * 3
    # a file that is not a run's output still counts, and so does a folder whose
    # manifest.json is not one derms wrote (a vendor's load shapes: a review found them
    # left out)
    (feeder / "runs" / "notes.txt").write_text("x")
    (feeder / "shapes").mkdir()
    (feeder / "shapes" / "manifest.json").write_text('{"vendor": "x"}')
    (feeder / "shapes" / "day.csv").write_text("1.0\n")
    assert derms("powerflow", master, "--out", feeder / "c").returncode == 0
    man = json.loads((feeder / "c" / "manifest.json").read_text())
    assert man["feeder"]["n_files"] == len(own) + 3


def test_force_needs_a_manifest_derms_wrote(tmp_path):
    """--force replaced any non-empty folder holding a file named manifest.json (a
    vendor's too); the same check now decides it as the feeder hash's skip rule."""
    out = tmp_path / "someone"
    out.mkdir()
    (out / "manifest.json").write_text('{"vendor": "x"}')
    (out / "data.csv").write_text("1\n")
    assert_clean_error(derms("powerflow", "ieee13", "--out", out, "--force"),
                       "not a derms output folder")
    assert (out / "data.csv").exists()


def test_an_out_holding_the_feeder_is_refused_before_the_work(tmp_path):
    """The refusal came from the output step, after the run: a feeder folder that looks
    like an output (a manifest.json in it) with a master that cannot compile gave the
    compile error, not the refusal."""
    feeder = tmp_path / "feeder"
    feeder.mkdir()
    (feeder / "manifest.json").write_text("{}")
    (feeder / "bad.dss").write_text("this is ((( not an OpenDSS script\n")
    for cmd in (["powerflow"], ["study"], ["hosting-capacity"]):
        proc = derms(*cmd, feeder / "bad.dss", "--out", feeder, "--force")
        assert_clean_error(proc, "holds")
        assert "cannot compile" not in proc.stderr


def test_model_json():
    proc = derms("model", "ieee13", "--json")
    info = json.loads(proc.stdout)
    assert info["loads"] == 15 and info["total_load_kw"] == pytest.approx(3466.0)


def test_missing_file(tmp_path):
    assert_clean_error(derms("powerflow", tmp_path / "nope.dss", "--out", tmp_path / "o"),
                       "not found", "nope.dss")


def test_malformed_file(tmp_path):
    bad = tmp_path / "bad.dss"
    bad.write_text("this is ((( not an OpenDSS script\n")
    proc = derms("powerflow", bad, "--out", tmp_path / "o")
    assert_clean_error(proc, "bad.dss", "cannot compile")
    assert "derms-dss-" not in proc.stderr  # the user's file, not the private copy


def test_a_bad_value_is_one_line_naming_it(tmp_path):
    """OpenDSS's error for a bad value was eight lines of boilerplate ("Probable Cause")."""
    bad = tmp_path / "bad.dss"
    bad.write_text("Clear\nNew Circuit.c basekv=12.47 bus1=src\n"
                   "New Load.l1 bus1=src kV=12.47 kW=100 kvar=NOT_A_NUM\n")
    proc = derms("model", bad)
    assert_clean_error(proc, "NOT_A_NUM", "line: 3", "New Load.l1")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Probable" not in proc.stderr


def test_binary_file(tmp_path):
    bad = tmp_path / "bin.dss"
    bad.write_bytes(b"\x00\x01\x02garbage")
    assert_clean_error(derms("powerflow", bad, "--out", tmp_path / "o"), "binary")


def test_unknown_element_in_feeder_file(tmp_path):
    bad = tmp_path / "unk.dss"
    bad.write_text("new circuit.t basekv=12.47\nnew line.l1 bus1=sourcebus bus2=b nosuchprop=3\n")
    assert_clean_error(derms("powerflow", bad, "--out", tmp_path / "o"), "nosuchprop")


def test_non_convergence(tmp_path):
    assert_clean_error(derms("powerflow", "ieee123", "--max-iterations", "1", "--out",
                             tmp_path), "did not converge")


@pytest.mark.parametrize("args,fragment", [
    (["--step", "2h"], "outside 1 minute"),
    (["--step", "fast"], "--step"),
    (["--pv-penetration", "1.5"], "penetration"),
    (["--start", "yesterday"], "--start"),
    (["--start", "0001-01-01"], "expected a year from 1900"),  # was a traceback
    (["--controls", "maybe"], "--controls"),
    (["--range", "C"], "--range"),
])
def test_study_bad_options(tmp_path, args, fragment):
    assert_clean_error(derms("study", "ieee13", "--out", tmp_path, *args), fragment)


def _profiles_csv(path, n, columns):
    t = pd.date_range("2026-07-01", periods=n, freq="15min", tz="UTC")
    df = pd.DataFrame({"timestamp": t.strftime("%Y-%m-%dT%H:%M:%SZ")})
    for c in columns:
        df[c] = np.linspace(0.5, 1.0, n)
    df.to_csv(path, index=False)
    return path


def test_study_profiles_wrong_length(tmp_path):
    csv = _profiles_csv(tmp_path / "p.csv", 50, ["load.671"])
    assert_clean_error(derms("study", "ieee13", "--profiles", csv, "--out", tmp_path / "o"),
                       "50 steps", "96")


def test_study_profiles_unknown_element(tmp_path):
    csv = _profiles_csv(tmp_path / "p.csv", 96, ["load.nosuch"])
    assert_clean_error(derms("study", "ieee13", "--profiles", csv, "--out", tmp_path / "o"),
                       "load.nosuch")


def test_study_profiles_bad_value(tmp_path):
    csv = _profiles_csv(tmp_path / "p.csv", 96, ["load.671"])
    text = csv.read_text().splitlines()
    text[5] = text[5].rsplit(",", 1)[0] + ",lots"
    csv.write_text("\n".join(text))
    assert_clean_error(derms("study", "ieee13", "--profiles", csv, "--out", tmp_path / "o"),
                       "load.671", "row 6", "lots")


def test_study_profiles_repeated_column(tmp_path):
    """``load.671`` and ``"LOAD.671 "``: one element twice (a TypeError traceback)."""
    csv = _profiles_csv(tmp_path / "p.csv", 96, ["load.671", "LOAD.671 "])
    assert_clean_error(derms("study", "ieee13", "--profiles", csv, "--out", tmp_path / "o"),
                       "more than once")


def test_study_start_that_disagrees_with_the_profiles_file(tmp_path):
    """--start was ignored without a word when --profiles set another start."""
    csv = _profiles_csv(tmp_path / "p.csv", 96, ["load.671"])
    assert_clean_error(derms("study", "ieee13", "--profiles", csv, "--start",
                             "2025-07-01", "--out", tmp_path / "o"), "starts at 2026-07-01")
    proc = derms("study", "ieee13", "--profiles", csv, "--start", "2026-07-01T00:00Z",
                 "--out", tmp_path / "o2")
    assert proc.returncode == 0, proc.stderr


def test_study_end_to_end(tmp_path):
    csv = _profiles_csv(tmp_path / "p.csv", 96, ["load.671"])
    proc = derms("study", "ieee13", "--pv-penetration", "0.5", "--profiles", csv,
                 "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "o"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 96 and summary["pv_systems"] == 8
    html = (out / "report.html").read_text()
    assert "Voltage profile" in html and "Feeder map" in html
    v = pd.read_parquet(out / "voltages.parquet")
    assert len(v) == 96 * 41
    assert "report:" in proc.stdout
    pv = pd.read_csv(out / "pv_systems.csv")
    assert (pv.pmpp_kw > 0).all() and len(pv) == 8
    for name in ("violations.csv", "violations.parquet", "voltages.parquet",
                 "branch_loading.parquet", "nodes.csv", "branches.csv", "head.csv"):
        check_file(out / name, "derms study")


@pytest.mark.parametrize("args", [
    ["study", "ieee13"], ["growth", "ieee13"], ["envelopes", "ieee13"],
    ["interconnect", "ieee13", "--bus", "675", "--kw", "5"],
    ["hosting-capacity", "ieee13"], ["dispatch", "ieee13"],
])
def test_a_negative_seed_is_a_usage_error(tmp_path, args):
    """``--seed -1`` ended in numpy's traceback (exit 1) on five commands."""
    proc = derms(*args, "--seed", "-1", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "--seed" in proc.stderr + proc.stdout
