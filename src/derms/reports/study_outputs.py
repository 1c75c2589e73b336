"""Write a study's results: summary JSON, CSV tables, Parquet time series and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from derms.reports.study_html import StudyReportData, write_study_report
from derms.studies.qsts_study import StudyResult


def node_summary(study: StudyResult) -> pd.DataFrame:
    """Per bus-node: distance and min/mean/max voltage over the study [pu]."""
    r, m = study.result, study.model
    dist = {b.name: b.distance_km for b in m.buses}
    v = np.where(r.v_pu > 0, r.v_pu, np.nan)
    with np.errstate(all="ignore"):
        df = pd.DataFrame({
            "bus": r.index.node_bus.astype(str),
            "phase": r.index.node_phase,
            "distance_km": [dist.get(b, np.nan) for b in r.index.node_bus],
            "v_pu_min": np.nanmin(v, axis=0) if len(v) else np.nan,
            "v_pu_mean": np.nanmean(v, axis=0) if len(v) else np.nan,
            "v_pu_max": np.nanmax(v, axis=0) if len(v) else np.nan,
        })
    return df


def branch_summary(study: StudyResult) -> pd.DataFrame:
    """Per branch: max loading over phases and steps [% of normal rating], max current [A]."""
    r = study.result
    ix = r.index
    loading = r.loading_pct()
    df = pd.DataFrame({
        "element": ix.branch_element.astype(str),
        "bus1": ix.branch_bus1.astype(str),
        "bus2": ix.branch_bus2.astype(str),
        "norm_amps": ix.branch_norm_a,
        "i_a_max": r.i_a.max(axis=0).astype(float) if r.n_steps else np.nan,
        "loading_pct_max": np.nanmax(np.nan_to_num(loading, nan=0.0), axis=0),
    })
    return (df.groupby(["element", "bus1", "bus2"], sort=False, as_index=False)
            .agg(norm_amps=("norm_amps", "max"), i_a_max=("i_a_max", "max"),
                 loading_pct_max=("loading_pct_max", "max")))


def summary_figures(study: StudyResult) -> dict[str, float | int | str]:
    """Key figures of the study (for summary.json and the report's header)."""
    r, cfg = study.result, study.config
    p = r.head_p_kw.sum(axis=1)
    v = r.v_pu[(r.v_pu > cfg.limits.energised_min_pu)]
    out: dict[str, float | int | str] = {
        "feeder": study.model.name,
        "start_utc": r.t[0].isoformat() if r.n_steps else "",
        "steps": r.n_steps,
        "step_minutes": r.step.total_seconds() / 60,
        "control_mode": r.control_mode,
        "pv_penetration": cfg.pv_penetration,
        "pv_systems": len(study.pv),
        "pv_pmpp_kw": float(study.pv["pmpp_kw"].sum()) if len(study.pv) else 0.0,
        "head_energy_kwh": float(p.sum() * r.dt_h),
        "head_peak_kw": float(p.max()),
        "head_min_kw": float(p.min()),
        "losses_kwh": float(r.losses_kw.sum() * r.dt_h),
        "v_min_pu": float(v.min()) if v.size else float("nan"),
        "v_max_pu": float(v.max()) if v.size else float("nan"),
        "steps_not_converged": int((~r.converged).sum()),
        "runtime_s": round(study.runtime_s, 3),
    }
    out.update(study.violations.counts)
    return out


def violations_long(events: pd.DataFrame, step) -> pd.DataFrame:
    """One row per (interval, kind, element, phase) in violation, expanded from the events.

    Columns ``t, kind, element, phase, limit, pre_existing, worsened``; ``t`` is the UTC
    interval start. The values themselves are in voltages.parquet / branch_loading.parquet.
    """
    cols = ["t", "kind", "element", "phase", "limit", "pre_existing", "worsened"]
    if events.empty:
        return pd.DataFrame(columns=cols)
    n = events["n_steps"].to_numpy(int)
    rep = events.loc[events.index.repeat(n)].reset_index(drop=True)
    offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    rep["t"] = pd.to_datetime(rep["start"], utc=True) + pd.to_timedelta(step) * offset
    return rep[cols]


def write_study_outputs(study: StudyResult, out: Path) -> dict[str, Path]:
    """Write every output of ``study`` below ``out``; return the paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    r = study.result
    nodes, branches = node_summary(study), branch_summary(study)
    paths = {
        "summary": out / "summary.json", "nodes": out / "nodes.csv",
        "branches": out / "branches.csv", "head": out / "head.csv",
        "violations": out / "violations.csv", "pv": out / "pv_systems.csv",
        "voltages": out / "voltages.parquet", "loading": out / "branch_loading.parquet",
        "violations_long": out / "violations.parquet", "report": out / "report.html",
    }
    summary = summary_figures(study)
    paths["summary"].write_text(json.dumps(summary, indent=2, default=str))
    nodes.to_csv(paths["nodes"], index=False)
    branches.to_csv(paths["branches"], index=False)
    head = r.head_long()
    head.to_csv(paths["head"], index=False)
    study.violations.events.to_csv(paths["violations"], index=False)
    study.pv.to_csv(paths["pv"], index=False)
    r.voltages_long().to_parquet(paths["voltages"], index=False)
    r.branches_long().to_parquet(paths["loading"], index=False)
    violations_long(study.violations.events, r.step).to_parquet(paths["violations_long"],
                                                                index=False)
    xy = pd.DataFrame(
        [(b.name, b.x, b.y) for b in study.model.buses if b.x is not None and (b.x or b.y)],
        columns=["bus", "x", "y"],
    )
    notes = list(study.model.notes) + [
        ("Loading is % of each element's normal rating in the model (OpenDSS NormAmps); "
        "transformers' normal rating is OpenDSS's normhkVA (110 % of kVA unless given)."),
        "Load profiles: bundled 8760-h shapes (one per load, seeded); PV: clear-sky shape.",
    ]
    if study.base is not None:
        notes.append("Pre-existing violations are those present in the same interval of the "
                     "base case without PV; they are held to their base-case value.")
    write_study_report(paths["report"], StudyReportData(
        title=f"QSTS study: {study.model.name}", feeder=study.model.name,
        summary=summary, voltage_profile=nodes, limits=(study.config.limits.v_min_pu,
                                                         study.config.limits.v_max_pu),
        head=head, bus_xy=xy, branches=branches, violations=study.violations.events,
        notes=notes,
    ))
    return paths
