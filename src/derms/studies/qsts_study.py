"""A QSTS feeder study: load profiles, optional PV at a share of customers, violations.

PV placement (``pv_penetration``): that share of enabled loads, drawn with ``seed``, each
gets one PV system at the load's own bus and nodes, with DC rating
``pmpp_kw = U(pv_size_min, pv_size_max) x the load's peak kW`` and an inverter of
``1.1 x pmpp_kw`` kVA at unity power factor. With PV, the same study is first run
without it (the base case) so that pre-existing violations are told apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits, ViolationReport, detect_violations
from derms.errors import InputError
from derms.grid.model import FeederModel
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import ControlMode, OpenDSSEngine, SolveSettings
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import QSTSResult, run_qsts
from derms.studies.profiles_library import clear_sky_pv, load_shapes_at

PV_SHAPE_COLUMNS = ["pv", "load", "bus", "nodes", "phases", "kv", "pmpp_kw", "kva"]


@dataclass(frozen=True)
class StudyConfig:
    """Settings of a QSTS study. ``start`` is a UTC datetime (interval start)."""

    days: float = 1.0
    step: timedelta = timedelta(minutes=15)
    start: datetime = datetime(2026, 7, 1, tzinfo=UTC)
    pv_penetration: float = 0.0
    pv_size_min: float = 0.5
    pv_size_max: float = 1.2
    seed: int = 0
    control_mode: ControlMode = "static"
    limits: Limits = field(default_factory=Limits)
    latitude_deg: float = 37.0
    longitude_deg: float = -120.0
    utc_offset_h: float = -8.0
    max_iterations: int = 100
    profiles: Profiles | None = None  # user profiles; override the bundled shapes per element

    @property
    def solve_settings(self) -> SolveSettings:
        return SolveSettings(max_iterations=self.max_iterations, control_mode=self.control_mode)

    def __post_init__(self) -> None:
        if not timedelta(minutes=1) <= self.step <= timedelta(hours=1):
            raise InputError(f"step {self.step} is outside 1 minute .. 1 hour")
        if not 0 < self.days <= 366:
            raise InputError(f"days must be in (0, 366], got {self.days}")
        steps = self.days * 86400 / self.step.total_seconds()
        if abs(steps - round(steps)) > 1e-6 or round(steps) < 1:
            # n_steps rounded it: 24 h of 7 min became 206 intervals ending at 24:02
            raise InputError(f"the horizon ({self.days * 24:g} h) is not a whole number of "
                             f"{self.step.total_seconds() / 60:g}-min steps ({steps:.4g})")
        if not 0.0 <= self.pv_penetration <= 1.0:
            raise InputError(f"pv penetration must be in [0, 1], got {self.pv_penetration}")
        if self.start.tzinfo is None:
            raise InputError("study start must be timezone-aware")
        if not 0 < self.pv_size_min <= self.pv_size_max:
            raise InputError("PV size factors must satisfy 0 < min <= max")
        p = self.profiles
        if p is not None:
            if p.step != self.step:
                raise InputError(f"profiles have a {p.step} step; the study's step is {self.step}")
            if p.n_steps != self.n_steps:
                raise InputError(f"profiles have {p.n_steps} steps; the study needs "
                                 f"{self.n_steps} ({self.days:g} days of {self.step})")

    @property
    def n_steps(self) -> int:
        return max(1, int(round(self.days * 86400 / self.step.total_seconds())))


@dataclass(frozen=True)
class StudyResult:
    """Everything a study produced; ``base`` is the run without PV (None without PV)."""

    model: FeederModel
    config: StudyConfig
    result: QSTSResult
    base: QSTSResult | None
    violations: ViolationReport
    pv: pd.DataFrame
    runtime_s: float


def study_profiles(model: FeederModel, config: StudyConfig) -> tuple[Profiles, np.ndarray]:
    """Load profiles (one bundled shape per load, drawn with the seed) and the PV shape."""
    times = pd.date_range(config.start, periods=config.n_steps, freq=config.step)
    shapes = load_shapes_at(times, config.utc_offset_h)
    rng = np.random.default_rng(config.seed)
    loads = [ld for ld in model.loads if ld.enabled]
    if not loads:
        raise InputError(f"feeder {model.name} has no enabled loads to give profiles to")
    pick = rng.integers(0, shapes.shape[1], size=len(loads))
    user = config.profiles
    given = set(user.elements) if user is not None else set()
    keep = [i for i, ld in enumerate(loads) if ld.name not in given]
    elements = tuple(loads[i].name for i in keep)
    p_mult = shapes[:, pick[keep]]
    if user is not None:
        elements += user.elements
        p_mult = np.column_stack([p_mult, user.p_mult])
    profiles = Profiles(start=config.start, step=config.step, elements=elements, p_mult=p_mult)
    pv = clear_sky_pv(times, config.step.total_seconds() / 3600, config.latitude_deg,
                      config.longitude_deg)
    return profiles, pv


def place_pv(model: FeederModel, config: StudyConfig) -> pd.DataFrame:
    """Choose the loads that get PV and size them (see module docstring)."""
    loads = [ld for ld in model.loads if ld.enabled and ld.p_kw > 0]
    rng = np.random.default_rng(config.seed + 1)
    n = int(round(config.pv_penetration * len(loads)))
    chosen = sorted(rng.choice(len(loads), size=n, replace=False)) if n else []
    size = rng.uniform(config.pv_size_min, config.pv_size_max, size=len(chosen))
    rows = []
    for k, i in enumerate(chosen):
        ld = loads[i]
        pmpp = round(float(size[k] * ld.p_kw), 3)
        rows.append({
            "pv": f"pvsystem.pv_{ld.name.split('.', 1)[1]}", "load": ld.name, "bus": ld.bus,
            "nodes": ".".join(str(n) for n in ld.nodes),  # the load's conductors, neutral too
            "phases": ld.phases, "kv": ld.kv, "pmpp_kw": pmpp, "kva": round(1.1 * pmpp, 3),
            "conn": ld.conn,
        })
    return pd.DataFrame(rows, columns=[*PV_SHAPE_COLUMNS, "conn"])


def add_pv(engine: OpenDSSEngine, pv: pd.DataFrame) -> None:
    """Create the PV systems of ``pv`` (from :func:`place_pv`) in the engine."""
    for row in pv.itertuples(index=False):
        bus = f"{row.bus}.{row.nodes}" if row.nodes else row.bus
        engine.command(
            f"new {row.pv} bus1={bus} phases={row.phases} kv={row.kv} kva={row.kva} "
            f"pmpp={row.pmpp_kw} irradiance=1 pf=1 conn={row.conn} %cutin=0.01 %cutout=0.01"
        )


def run_study(
    master: str | Path,
    config: StudyConfig,
    *,
    on_step: Callable[[int], None] | None = None,
) -> StudyResult:
    """Run the study on the feeder ``master``; ``on_step`` advances a progress bar
    (called once per solved step, for the base case and the PV case)."""
    t0 = time.perf_counter()
    base_engine = OpenDSSEngine(master, config.solve_settings)
    try:
        model = read_feeder(base_engine.ctx, base_engine.source_master)
        base_engine.solve_snapshot()  # a case that cannot converge fails here, clearly
        profiles, pv_shape = study_profiles(model, config)
        pv = place_pv(model, config)
        base = run_qsts(base_engine, profiles, control_mode=config.control_mode,
                        on_step=on_step)
    finally:
        base_engine.close()
    result, base_case = base, None
    if len(pv):
        with OpenDSSEngine(master, config.solve_settings) as engine:
            add_pv(engine, pv)
            pv_prof = Profiles(
                start=profiles.start, step=profiles.step,
                elements=profiles.elements + tuple(pv["pv"]),
                p_mult=np.column_stack([profiles.p_mult, np.repeat(pv_shape[:, None],
                                                                    len(pv), axis=1)]),
            )
            result = run_qsts(engine, pv_prof, control_mode=config.control_mode,
                              on_step=on_step)
        base_case = base
    violations = study_violations(result, base_case, config.limits)
    return StudyResult(model=model, config=config, result=result, base=base_case,
                       violations=violations, pv=pv, runtime_s=time.perf_counter() - t0)


def study_violations(result: QSTSResult, base: QSTSResult | None, limits: Limits
                     ) -> ViolationReport:
    """Violations of ``result``, pre-existing ones judged against ``base`` when given."""
    ix = result.index
    return detect_violations(
        result.t, result.dt_h,
        v_pu=result.v_pu, node_names=ix.node_bus, node_phases=ix.node_phase,
        loading_pct=result.loading_pct(), branch_names=ix.branch_element,
        branch_phases=ix.branch_phase, head_p_kw=result.head_p_kw.sum(axis=1), limits=limits,
        base_v_pu=None if base is None else base.v_pu,
        base_loading_pct=None if base is None else base.loading_pct(),
        base_head_p_kw=None if base is None else base.head_p_kw.sum(axis=1),
    )
