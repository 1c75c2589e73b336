"""Inputs, settings and report of the fast corrective cycle
(:class:`derms.control.fast_cycle.FastCycle`): the DER registry, what the DERs report this
cycle, the cycle's settings and its report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from derms.analysis.constraints import Limits
from derms.control.commands import DeviceCommand
from derms.control.requests import DeviceLocation
from derms.dispatch.corrective import CorrectiveConfig, CorrectiveResult
from derms.errors import InputError

STAGES = ("se_s", "detect_s", "arbiter_s", "sensitivity_s", "lp_s", "ac_check_s", "commands_s",
          "total_s")


@dataclass(frozen=True)
class DerRegistry:
    """The DERs the loop may command (static part), arrays (n,) in one order.

    ``kind``: "pv", "battery", "ev" or other (decides the command mode); ``point``: index
    into ``points``, each a tuple of "bus.node" sharing the DER's power equally (node to
    ground, as :attr:`derms.der.models.Connection.injection_nodes`); ``locations``: for the
    arbiter (feeder, bus, connection point), ``None`` = not covered by any scope but the
    device itself.
    """

    der_id: np.ndarray
    kind: np.ndarray
    point: np.ndarray
    points: Sequence[tuple[str, ...]]
    locations: Sequence[DeviceLocation] | None = None

    def __post_init__(self) -> None:
        n = np.asarray(self.der_id).size
        if len(set(np.asarray(self.der_id).tolist())) != n:
            raise InputError("DER registry: der_id values must be unique")
        for name in ("kind", "point"):
            if np.asarray(getattr(self, name)).size != n:
                raise InputError(f"DER registry: {name} has "
                                 f"{np.asarray(getattr(self, name)).size} values for {n} DERs")
        pt = np.asarray(self.point)
        if n and (pt.min() < 0 or pt.max() >= len(self.points)):
            raise InputError(f"DER registry: point indices must lie in [0, {len(self.points)})")
        if self.locations is not None and len(self.locations) != n:
            raise InputError("DER registry: one location per DER")


@dataclass(frozen=True)
class FleetNow:
    """What the DERs report / can do this cycle, arrays (n,) in registry order; net import
    (consumption positive) [kW], [kvar]; ``score`` the delivery score in (0, 1]."""

    p_kw: np.ndarray
    q_kvar: np.ndarray
    p_min_kw: np.ndarray
    p_max_kw: np.ndarray
    q_min_kvar: np.ndarray
    q_max_kvar: np.ndarray
    score: np.ndarray
    fixed: np.ndarray | None = None  # (n,) bool: held at p_kw, never commanded (not relied on)


@dataclass(frozen=True)
class FastCycleConfig:
    """Settings of the fast cycle (module docstring); units in the names."""

    period_s: float = 5.0
    limits: Limits = field(default_factory=Limits)
    near_v_pu: float = 0.01
    near_i_frac: float = 0.05
    max_v_rows: int = 300
    max_i_rows: int = 150
    trend_cycles: int = 3
    lead_cycles: float = 2.0
    hold_s: float = 300.0
    deadband_kw: float = 0.1
    min_score: float = 0.05
    der_sigma_frac: float = 0.02
    der_sigma_min_kw: float = 0.05
    ac_rounds: int = 3
    corrective: CorrectiveConfig = field(default_factory=CorrectiveConfig)
    # rows estimated at this fraction of their limit or more (not over it) get the
    # estimate's posterior spread; over it with this probability: reported (notes and
    # estimation["possible_overloads"])
    possible_from_frac: float = 0.8
    possible_probability: float = 0.1
    # None: act on the estimate. A probability p in (0, 0.5]: act so that each such row is
    # over its limit with probability at most p (a chance constraint: the estimate plus
    # z sd, z = Phi^-1(1 - p), is held to the limit) -- fewer overloads the estimate
    # cannot see, more DER curtailed where the load is unmetered
    act_probability: float | None = None

    def __post_init__(self) -> None:
        p = self.act_probability
        if p is not None and not 0 < p <= 0.5:
            raise InputError(f"act_probability must be in (0, 0.5], got {p}")
        if not 0 < self.possible_probability <= 1:
            raise InputError(f"possible_probability must be in (0, 1], got "
                             f"{self.possible_probability}")


@dataclass
class CycleReport:
    """One cycle: its id and time, stage times [s] (``STAGES``), what was found
    (``violations``: counts of present violations by kind; ``imminent``: rows projected
    beyond a limit; their labels in ``violated_rows``), the corrective result (``None``
    when nothing was violated or imminent), ``ac_check`` (the model's AC solve with the
    new setpoints: ``rounds`` and the violation counts it predicts), commands issued,
    and notes. ``v_pu`` (per node, the engine's node order) [pu] and
    ``branch_loading_pct`` (per branch conductor) [% of the normal rating; 0 where there
    is none] are the state the cycle detected on (the estimate, before any action)."""

    cycle_id: str
    t: datetime
    timings: dict[str, float]
    violations: dict[str, int]
    imminent: int
    violated_rows: list[str]
    n_rows: int
    status: str
    corrective: CorrectiveResult | None
    commands: list[DeviceCommand]
    n_fixed: int
    estimation: dict[str, Any]
    ac_check: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    v_pu: np.ndarray | None = None
    branch_loading_pct: np.ndarray | None = None
