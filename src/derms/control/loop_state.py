"""The control loop's latest state estimate as a :class:`~derms.monitoring.FeederState`,
what ``GET /v1/feeders/{id}/state`` serves for the loop's feeder when no monitoring cycle
runs (``derms serve --control-feeder`` without ``--monitor-period-s``).

Each fast cycle estimates the feeder's state before it acts; this turns that estimate into
the monitor's state shape, built on the loop's thread (it reads the loop's engine) and
handed over as an immutable value:

* node voltages [pu] and branch-conductor loading [% of the normal rating; NaN where
  there is none] at the estimate (DER telemetry included, before any action);
* violations by the monitor's rules (:func:`~derms.analysis.constraints.detect_violations`,
  absolute limits of the fast cycle's :class:`~derms.analysis.constraints.Limits`; the
  cycle's own detection, which holds pre-existing rows to their base case, is in
  ``estimation["control"]``);
* availability of the loop's DERs from the telemetry the cycle read (import positive at
  the device; :func:`~derms.monitoring.availability.classify_availability`);
* ``alarms`` empty: alarms are raised and cleared by the monitoring cycle only
  (``--monitor-period-s``); ``estimation["source"]`` is ``"control_loop"``.

A cycle without an estimate (no fresh telemetry, or a failed cycle) leaves the previous
state in place and records a :class:`~derms.monitoring.cycle.RunError`, so the API marks
that state ``stale``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits, detect_violations
from derms.monitoring.availability import AvailabilityThresholds, classify_availability
from derms.monitoring.state import FeederState
from derms.powerflow.collect import NetworkIndex

SOURCE = "control_loop"
NOTE = ("state of the control loop's last cycle; alarms are raised by the monitoring cycle "
        "(derms serve --monitor-period-s)")


def cycle_state(feeder_id: str, now: datetime, *, index: NetworkIndex,
                node_names: Sequence[str], v_pu: np.ndarray, branch_loading_pct: np.ndarray,
                limits: Limits, der_ids: Sequence[str], active: Sequence[bool],
                p_gen_max_kw: Sequence[float], p_charge_max_kw: Sequence[float],
                telemetry: Mapping[str, tuple[datetime, float, float]],
                thresholds: AvailabilityThresholds, estimation: Mapping[str, Any],
                control: Mapping[str, Any], topology: Mapping[str, str],
                notes: Sequence[str]) -> FeederState:
    """The feeder's state at ``now`` from one fast cycle's estimate (module docstring).

    ``v_pu`` (n_nodes,) [pu] and ``branch_loading_pct`` (n_branch_conductors,) [%] in the
    engine's order of ``index``; ``telemetry``: der_id -> (time, p_kw import positive,
    q_kvar) of the cycle's latest readings; ``control``: the cycle's own findings
    (status, violation counts, commands) kept under ``estimation["control"]``.
    """
    v = np.asarray(v_pu, dtype=float).copy()
    rated = np.asarray(index.branch_norm_a) > 0
    loading = np.where(rated, np.asarray(branch_loading_pct, dtype=float), np.nan)
    report = detect_violations(
        pd.DatetimeIndex([now]), 0.0, v_pu=v[None, :], node_names=index.node_bus,
        node_phases=index.node_phase, loading_pct=loading[None, :],
        branch_names=index.branch_element, branch_phases=index.branch_phase, limits=limits)
    t_last = [telemetry[d][0] if d in telemetry else None for d in der_ids]
    avail = classify_availability(
        list(der_ids), active=list(active), p_gen_max_kw=list(p_gen_max_kw),
        p_charge_max_kw=list(p_charge_max_kw),
        age_s=[np.nan if t is None else (now - t).total_seconds() for t in t_last],
        p_kw=[telemetry[d][1] if d in telemetry else np.nan for d in der_ids],
        thresholds=thresholds)
    branch_names = [f"{e}.{p}" for e, p in zip(index.branch_element, index.branch_phase,
                                                 strict=True)]
    return FeederState(
        feeder_id=feeder_id, t=now, node_names=list(node_names), v_pu=v,
        branch_names=branch_names, branch_loading_pct=loading, violations=report.events,
        availability=avail,
        estimation={**estimation, "source": SOURCE, "control": dict(control)},
        alarms={}, topology=dict(topology),
        notes=[*notes, NOTE])


__all__ = ["SOURCE", "cycle_state"]
