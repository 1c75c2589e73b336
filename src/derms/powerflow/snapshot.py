"""Snapshot power flow with its results as tidy tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from derms.powerflow.collect import NetworkIndex, StepCollector, build_index
from derms.powerflow.engine import OpenDSSEngine

_DEFAULT_RATING = (400.0, 600.0)


@dataclass(frozen=True)
class SnapshotResult:
    """One solved operating point.

    ``voltages``: bus, phase, v_pu, v_v, angle_deg, kv_base_ln, v_measure ("ln" node to
    ground; "ll" line to line, nodes of ungrounded areas, :mod:`voltage_measure`: then
    ``v_v`` is the line-to-line magnitude [V] and ``v_pu`` it over sqrt(3) kVBase;
    ``angle_deg`` stays the node's own).
    ``branches``: element, phase, bus1, bus2, i_a, norm_amps, emerg_amps, loading_pct,
    loading_emerg_pct, rating_is_default (loading is % of the engine's rating).
    ``transformers``: element, phase, i_a, rated_a, kva, loading_pct (% of nameplate).
    ``head``: phase, p_kw, q_kvar (import positive).  ``totals``: scalar figures.
    """

    voltages: pd.DataFrame
    branches: pd.DataFrame
    transformers: pd.DataFrame
    head: pd.DataFrame
    totals: dict[str, float]
    index: NetworkIndex


def solve_snapshot(engine: OpenDSSEngine, index: NetworkIndex | None = None) -> SnapshotResult:
    """Solve a snapshot power flow and return its tables (raises ConvergenceError)."""
    engine.solve_snapshot()
    index = index or build_index(engine)
    col = StepCollector(engine, index, 1)
    col.collect(0)
    v = engine.node_voltages_v()
    v_v = np.abs(v)
    if index.v_pair is not None and (index.v_pair >= 0).any():  # line to line, as v_pu
        ll = np.flatnonzero(index.v_pair >= 0)
        v_v[ll] = np.abs(v[ll] - v[index.v_pair[ll]])
    voltages = pd.DataFrame({
        "bus": index.node_bus.astype(str),
        "phase": index.node_phase,
        "v_pu": col.v_pu[0],
        "v_v": v_v,
        "angle_deg": np.degrees(np.angle(v)),
        "kv_base_ln": index.node_kv_base_ln,
        # "ll": a node of an ungrounded area, v_pu is line to line (voltage_measure)
        "v_measure": np.where(index.v_pair >= 0, "ll", "ln") if index.v_pair is not None
        else "ln",
    })
    i_a = col.i_a[0].astype(float)
    norm, emerg = index.branch_norm_a, index.branch_emerg_a
    with np.errstate(divide="ignore", invalid="ignore"):
        branches = pd.DataFrame({
            "element": index.branch_element.astype(str),
            "phase": index.branch_phase,
            "bus1": index.branch_bus1.astype(str),
            "bus2": index.branch_bus2.astype(str),
            "i_a": i_a,
            "norm_amps": norm,
            "emerg_amps": emerg,
            "loading_pct": np.where(norm > 0, i_a / norm * 100.0, np.nan),
            "loading_emerg_pct": np.where(emerg > 0, i_a / emerg * 100.0, np.nan),
            "rating_is_default": (norm == _DEFAULT_RATING[0]) & (emerg == _DEFAULT_RATING[1])
            & np.char.startswith(index.branch_element.astype(str), "line."),
        })
        is_x = ~np.isnan(index.xfmr_rated_a)
        transformers = pd.DataFrame({
            "element": index.branch_element[is_x].astype(str),
            "phase": index.branch_phase[is_x],
            "i_a": i_a[is_x],
            "rated_a": index.xfmr_rated_a[is_x],
            "kva": index.xfmr_kva[is_x],
            "loading_pct": i_a[is_x] / index.xfmr_rated_a[is_x] * 100.0,
        })
    n_ph = index.source_phases
    head = pd.DataFrame({
        "phase": np.arange(1, n_ph + 1), "p_kw": col.head_p_kw[0], "q_kvar": col.head_q_kvar[0],
    })
    v_live = col.v_pu[0][col.v_pu[0] > 0]
    totals = {
        "head_p_kw": float(col.head_p_kw[0].sum()),
        "head_q_kvar": float(col.head_q_kvar[0].sum()),
        "losses_kw": float(col.losses_kw[0]),
        "losses_kvar": float(col.losses_kvar[0]),
        "v_min_pu": float(v_live.min()) if v_live.size else float("nan"),
        "v_max_pu": float(v_live.max()) if v_live.size else float("nan"),
        "iterations": float(engine.circuit.Solution.Iterations),
    }
    return SnapshotResult(voltages, branches, transformers, head, totals, index)
