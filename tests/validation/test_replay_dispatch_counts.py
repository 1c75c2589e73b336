"""``derms dispatch`` run as a command, then its ``opendss/`` folder counted without derms.

Issue 11 acceptance: the CLI (a subprocess of the venv's ``derms``) writes ``summary.json``
and ``opendss/``; the folder is zipped and unpacked elsewhere, and each case is solved in
a fresh dss-python context through the text interface only (``compile``, ``Solve``),
reading the engine's own result arrays (``AllNodeNames``, ``AllBusVmagPu``,
``CktElement.CurrentsMagAng``) and the set's head monitor. The violation counts are
computed here with numpy from those values, ``limits.json``, ``monitored_nodes.csv`` and
``monitored_branches.csv`` (the rule of docs/data-formats.md, written out below — no
derms code), and must equal ``violations_uncontrolled``, ``violations_rule_based`` and
``violations_optimised``; the substation peaks must match within 0.1 %.

Unavoidable difference at a tolerance boundary: derms keeps branch currents in float32
(relative error <= 6e-8), the replay in float64, so a pair whose loading lies within
~1e-5 % of a threshold could be counted differently. The test counts such *marginal*
pairs and allows at most that many differences (measured: 0 on IEEE 123, so the counts
match exactly). IEEE 8500: the same test, marked slow (``make test-all``): the
8500 dispatch alone takes 17-20 min on this 2-core machine. Run by hand on the CLI's IEEE 8500 output (24 h x
1 h, seed 1) the same functions reproduce every count exactly with no marginal pair:
uncontrolled 1000 (784 over-voltage + 216 thermal, 3235 pre-existing voltage pairs),
rule-based 775, optimised 881 (725 + 156; pre-existing 659 voltage, 100 thermal); peaks
within 2.4e-8.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.data_formats import check_file

DERMS = Path(sys.executable).parent / "derms"
REL_TOL = 1e-3  # peaks within 0.1 %
CASES = ("uncontrolled", "rule_based", "optimised")
MARGIN_V_PU = 1e-9  # voltages come from the same engine in float64 on both sides
MARGIN_PCT = 1e-4  # loading [%]: float32 currents in derms (6e-8 relative of ~100-200 %)


# -- running the command ---------------------------------------------------------------

def run_dispatch(root: Path, feeder: str, *args: str, timeout: float = 600) -> Path:
    """``derms dispatch FEEDER ARGS --out root/out``; zip ``opendss/`` and unpack it
    elsewhere (the original is deleted, so the copy must stand alone). Returns the
    output folder (``opendss/`` inside is the moved copy)."""
    out = root / "out"
    t0 = time.perf_counter()
    res = subprocess.run([str(DERMS), "dispatch", feeder, *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=timeout, cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"derms dispatch {feeder}: {time.perf_counter() - t0:.1f} s")
    archive = shutil.make_archive(str(root / "replay"), "zip", out / "opendss")
    shutil.rmtree(out / "opendss")
    shutil.unpack_archive(archive, root / "elsewhere" / "opendss")
    return out


# -- plain OpenDSS: solve and read (no derms code from here on) ------------------------

@dataclass
class Replay:
    v_pu: np.ndarray  # (T, monitored nodes)
    i_a: np.ndarray  # (T, monitored conductors)
    head_kw: np.ndarray  # (T,) substation import, import positive
    converged: np.ndarray  # (T,) bool


def replay_case(folder: Path, case: str, nodes: pd.DataFrame, branches: pd.DataFrame,
                n_steps: int) -> Replay:
    """Compile ``case_<case>.dss`` in a fresh engine context and ``Solve`` one interval
    at a time, reading node voltages [pu], conductor currents [A] and the head monitor."""
    import dss

    ctx = dss.DSS.NewContext()
    cwd = os.getcwd()
    try:
        ctx.AllowForms = False
        ctx.Text.Command = f'compile "{folder / f"case_{case}.dss"}"'
        ckt = ctx.ActiveCircuit
        pos = {n.lower(): k for k, n in enumerate(ckt.AllNodeNames)}
        node_pos = np.array([pos[n] for n in nodes["node"].str.lower()])
        # ungrounded 3-wire areas (measure "ll"): line to line against the partner node
        ll = np.flatnonzero(nodes.get("measure", pd.Series("ln", index=nodes.index))
                            .to_numpy() == "ll")
        partner_pos = np.array([pos[n] for n in nodes["partner"].iloc[ll].str.lower()],
                               dtype=int) if ll.size else np.zeros(0, dtype=int)
        ll_base = nodes["kv_base_ln"].to_numpy(float)[ll] * 1000.0 * np.sqrt(3.0)
        groups = [(e, g.index.to_numpy(), 2 * (g["conductor"].to_numpy() - 1))
                  for e, g in branches.groupby("element", sort=False)]
        v = np.empty((n_steps, len(nodes)))
        i = np.empty((n_steps, len(branches)))
        conv = np.zeros(n_steps, dtype=bool)
        for k in range(n_steps):
            ctx.Text.Command = "Solve"
            conv[k] = ckt.Solution.Converged
            v[k] = np.asarray(ckt.AllBusVmagPu)[node_pos]
            if ll.size:
                volts = np.asarray(ckt.AllBusVolts)
                cv = volts[0::2] + 1j * volts[1::2]
                v[k, ll] = np.abs(cv[node_pos[ll]] - cv[partner_pos]) / ll_base
            for element, rows, mag in groups:
                ckt.SetActiveElement(element)
                i[k, rows] = np.asarray(ckt.ActiveCktElement.CurrentsMagAng)[mag]
        m = ckt.Monitors
        m.Name = "derms_head"
        cols = [c + 1 for c, h in enumerate(m.Header) if h.strip().upper().startswith("P")]
        head = -np.sum([np.asarray(m.Channel(c), dtype=float) for c in cols], axis=0)
        return Replay(v, i, head, conv)
    finally:
        os.chdir(cwd)
        ctx.ClearAll()


def count_violations(case: Replay, base: Replay, lim: dict, norm_amps: np.ndarray
                     ) -> tuple[dict[str, int], int]:
    """The rule of ``limits.json``: per (node-phase or conductor, interval) pair, a value
    beyond a limit counts unless the base case is beyond the same limit in that interval
    (pre-existing), in which case it counts only when worse than the base by more than
    the tolerance. Returns the counts and the number of marginal pairs (within
    MARGIN_* of a threshold the rule compares with)."""
    lo = lim["v_min_pu"] - lim["v_tol_pu"]
    hi = lim["v_max_pu"] + lim["v_tol_pu"]
    th = lim["thermal_pct"] + lim["thermal_tol_pct"]
    e_min, v_tol, t_tol = lim["energised_min_pu"], lim["v_tol_pu"], lim["thermal_tol_pct"]
    v, vb = case.v_pu, base.v_pu
    live = v >= e_min
    under = live & (v < lo)
    pre_u = under & (vb < lo) & (vb >= e_min)
    over = live & (v > hi)
    pre_o = over & (vb > hi)
    load, load_b = 100.0 * case.i_a / norm_amps, 100.0 * base.i_a / norm_amps
    hot = load > th
    pre_t = hot & (load_b > th)
    worse_u = pre_u & (v < vb - v_tol)
    worse_o = pre_o & (v > vb + v_tol)
    worse_t = pre_t & (load > load_b + t_tol)
    counts = {
        "undervoltage": int((under & ~pre_u).sum() + worse_u.sum()),
        "overvoltage": int((over & ~pre_o).sum() + worse_o.sum()),
        "thermal": int((hot & ~pre_t).sum() + worse_t.sum()),
        "pre_existing_voltage": int(pre_u.sum() + pre_o.sum()),
        "pre_existing_thermal": int(pre_t.sum()),
        "worsened": int(worse_u.sum() + worse_o.sum() + worse_t.sum()),  # included above
    }
    def near(a, b, m):
        return np.abs(a - b) < m

    # only the comparisons that decide a pair: its own value against the limit, and for
    # pairs beyond it, the base against the limit and (pre-existing) the value against
    # the base plus the tolerance
    near_v = near(v, lo, MARGIN_V_PU) | near(v, hi, MARGIN_V_PU) \
        | (under & near(vb, lo, MARGIN_V_PU)) | (over & near(vb, hi, MARGIN_V_PU)) \
        | (pre_u & near(v, vb - v_tol, MARGIN_V_PU)) \
        | (pre_o & near(v, vb + v_tol, MARGIN_V_PU))
    near_t = near(load, th, MARGIN_PCT) | (hot & near(load_b, th, MARGIN_PCT)) \
        | (pre_t & near(load, load_b + t_tol, MARGIN_PCT))
    return counts, int(near_v.sum() + near_t.sum())


def replay_and_count(out: Path) -> dict:
    """Everything the acceptance compares, from ``out/opendss`` alone (moved copy)."""
    folder = out.parent / "elsewhere" / "opendss"
    lim = json.loads((folder / "limits.json").read_text())
    nodes = pd.read_csv(folder / "monitored_nodes.csv",   # names such as 610.2 are text
                        dtype={"node": str, "bus": str, "partner": str}, keep_default_na=False)
    branches = pd.read_csv(folder / "monitored_branches.csv")
    T = lim["n_steps"]
    runs = {c: replay_case(folder, c, nodes, branches, T) for c in ("base", *CASES)}
    norm = branches["norm_amps"].to_numpy(dtype=float)
    result = {"runs": runs, "nodes": nodes, "branches": branches}
    for c in CASES:
        counts, marginal = count_violations(runs[c], runs["base"], lim, norm)
        result[c] = {"counts": counts, "marginal": marginal,
                     "violations": counts["undervoltage"] + counts["overvoltage"]
                     + counts["thermal"], "peak_kw": float(runs[c].head_kw.max())}
    return result


def assert_reproduced(out: Path, replay: dict) -> None:
    s = json.loads((out / "summary.json").read_text())
    for c in ("base", *CASES):
        assert replay["runs"][c].converged.all(), c
    report = []
    for c in CASES:
        r = replay[c]
        derms_n = s[f"violations_{c}"]
        report.append(f"{c}: derms {derms_n}, replay {r['violations']} {r['counts']}, "
                      f"marginal {r['marginal']}")
        assert abs(r["violations"] - derms_n) <= r["marginal"], report[-1]
        peak = s["peak_perfect_foresight_kw" if c == "optimised" else f"peak_{c}_kw"]
        rel = abs(r["peak_kw"] - peak) / abs(peak)
        report.append(f"  peak derms {peak:.3f} kW, replay {r['peak_kw']:.3f} kW, "
                      f"rel {rel:.1e}")
        assert rel < REL_TOL, report[-1]
    opt = replay["optimised"]["counts"]
    assert s["violations_optimised_voltage"] == opt["undervoltage"] + opt["overvoltage"]
    assert s["violations_optimised_thermal"] == opt["thermal"]
    assert s["pre_existing_voltage"] == opt["pre_existing_voltage"]
    assert s["pre_existing_thermal"] == opt["pre_existing_thermal"]
    if s["optimised_mode"] == "perfect_foresight":
        assert s["peak_optimised_kw"] == s["peak_perfect_foresight_kw"]
    print("\n".join(report))


# -- IEEE 123 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ieee123(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay123")
    # 24 h from local noon, so the EV sessions charge inside the horizon; 1 h steps keep
    # the run short. Uncontrolled EVs push the pre-existing overloads of the feeder head
    # further (pre-existing pairs that got worse count).
    out = run_dispatch(root, "ieee123", "--horizon", "24h", "--step", "1h", "--seed", "1",
                       "--pv", "0.3", "--battery", "0.25", "--ev", "0.6")
    return out, replay_and_count(out)


def test_ieee123_counts_and_peaks_reproduced(ieee123):
    out, replay = ieee123
    assert_reproduced(out, replay)
    s = json.loads((out / "summary.json").read_text())
    # not vacuous: the uncontrolled case has violations, some of them pre-existing pairs
    # that got worse, and the base case has pre-existing overloads the rule holds
    assert s["violations_uncontrolled"] > 0
    unc = replay["uncontrolled"]["counts"]
    assert unc["pre_existing_thermal"] > 0 and unc["worsened"] > 0
    assert unc["thermal"] > unc["worsened"]  # and new overloads
    assert all(replay[c]["marginal"] == 0 for c in CASES)  # the match is exact, not bounded


def test_ieee123_monitored_files(ieee123):
    out, replay = ieee123
    folder = out.parent / "elsewhere" / "opendss"
    for name in ("monitored_nodes.csv", "monitored_branches.csv"):
        check_file(folder / name, "derms dispatch")
    nodes, br = replay["nodes"], replay["branches"]
    assert len(nodes) == 278 and nodes["phase"].between(1, 3).all()
    assert (br["norm_amps"] > 0).all() and br["rating_is_default"].all()  # IEEE 123: all
    for c in ("base", *CASES):
        assert (folder / f"case_{c}.dss").is_file() and (folder / f"run_{c}.dss").is_file()


# -- IEEE 37: ungrounded, measured line to line -----------------------------------------

def test_ieee37_counts_reproduced_with_line_to_line_nodes(tmp_path):
    """IEEE 37 is a 3-wire delta feeder: derms judges its nodes line to line. The replay
    recipe read node-to-ground voltages (0/27/8 violations against derms's 1/1/0);
    monitored_nodes.csv now says which nodes are measured line to line and against which
    partner, and counting that way reproduces summary.json."""
    from tests.conftest import shared_master

    out = run_dispatch(tmp_path, str(shared_master("ieee37")), "--horizon", "24h",
                       "--step", "1h", "--seed", "1")
    replay = replay_and_count(out)
    nodes = replay["nodes"]
    assert (nodes["measure"] == "ll").sum() > 0.8 * len(nodes)   # all but the source bus
    check_file(out.parent / "elsewhere" / "opendss" / "monitored_nodes.csv", "derms dispatch")
    assert_reproduced(out, replay)


# -- IEEE 8500 ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(3600)  # the 8500 dispatch alone takes 17-20 min here
def test_ieee8500_counts_and_peaks_reproduced(tmp_path):
    out = run_dispatch(tmp_path, "ieee8500", "--horizon", "24h", "--step", "1h", "--seed",
                       "1", timeout=3000)
    replay = replay_and_count(out)
    assert_reproduced(out, replay)
    s = json.loads((out / "summary.json").read_text())
    assert s["pre_existing_voltage"] > 0  # IEEE 8500's base case breaks voltage limits
