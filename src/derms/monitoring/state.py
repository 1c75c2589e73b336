"""The typed result of one monitoring run of a feeder, and its JSON view."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from derms.monitoring.availability import summarise_availability


@dataclass(frozen=True)
class FeederState:
    """One monitoring result of a feeder at time ``t``.

    ``v_pu`` per node (``node_names`` "bus.node", engine order) [pu]; ``branch_loading_pct``
    per branch conductor (``branch_names`` "element.node") [% of normal rating];
    ``violations`` is the event table of :func:`detect_violations`; ``availability`` one
    row per DER device (:data:`~derms.monitoring.availability.AVAILABILITY_COLUMNS`);
    ``estimation`` the estimator's statistics; ``alarms`` ids raised / cleared this run.
    """

    feeder_id: str
    t: datetime
    node_names: list[str]
    v_pu: np.ndarray
    branch_names: list[str]
    branch_loading_pct: np.ndarray
    violations: pd.DataFrame
    availability: pd.DataFrame
    estimation: dict[str, Any]
    alarms: dict[str, Any]
    topology: dict[str, str]
    notes: list[str]

    @property
    def live(self) -> np.ndarray:
        return self.v_pu >= 0.1

    @property
    def v_min_pu(self) -> float:
        return float(self.v_pu[self.live].min())

    @property
    def v_max_pu(self) -> float:
        return float(self.v_pu[self.live].max())

    @property
    def branch_loading_max_pct(self) -> float:
        return float(np.nanmax(self.branch_loading_pct)) if self.branch_loading_pct.size else 0.0

    def to_dict(self, *, nodes: bool = True) -> dict[str, Any]:
        """JSON-ready view (per-node voltages and per-conductor loading [% of the normal
        rating; null where there is none] when ``nodes``)."""
        live = self.live
        names = np.asarray(self.node_names, dtype=object)
        i_lo = int(np.flatnonzero(live)[np.argmin(self.v_pu[live])])
        i_hi = int(np.flatnonzero(live)[np.argmax(self.v_pu[live])])
        load = np.nan_to_num(self.branch_loading_pct, nan=-1.0)
        i_br = int(np.argmax(load)) if load.size else None
        viol = self.violations[["kind", "element", "phase", "worst", "limit"]].copy()
        out: dict[str, Any] = {
            "feeder_id": self.feeder_id, "t": self.t.isoformat(),
            "voltage": {"v_min_pu": self.v_min_pu, "v_min_node": names[i_lo],
                        "v_max_pu": self.v_max_pu, "v_max_node": names[i_hi]},
            "branch_loading": {
                "max_pct": self.branch_loading_max_pct,
                "max_element": None if i_br is None else self.branch_names[i_br]},
            "violations": _records(viol),
            "availability": {"summary": summarise_availability(self.availability),
                             "devices": _records(self.availability)},
            "estimation": self.estimation, "alarms": self.alarms, "topology": self.topology,
            "notes": self.notes,
        }
        if nodes:
            out["nodes"] = {"node": list(names), "v_pu": [float(v) for v in self.v_pu]}
            out["branches"] = {"branch": list(self.branch_names), "loading_pct": [
                None if not np.isfinite(x) else float(x) for x in self.branch_loading_pct]}
        return out


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    clean = frame.astype(object).where(frame.notna(), None)
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}
            for r in clean.to_dict(orient="records")]


__all__ = ["FeederState"]
