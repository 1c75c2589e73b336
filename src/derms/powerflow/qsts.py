"""Quasi-static time-series (QSTS) power flow over per-element profiles.

Profiles are loaded into the engine as OpenDSS load shapes (one per distinct profile) and
the engine steps through them in its own yearly mode, so the per-step cost is the engine's
solve plus three vectorised reads. Elements without a profile are held at their base value
(a flat shape), so a model's own shapes never leak into a study by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
import pandas as pd

from derms.errors import ModelError
from derms.powerflow.collect import NetworkIndex, StepCollector, build_index
from derms.powerflow.control_state import ControlState, restore_control_state
from derms.powerflow.engine import ControlMode, OpenDSSEngine
from derms.powerflow.profiles import SUPPORTED_CLASSES, Profiles, shared_shapes

_FLAT = "derms_flat"


@dataclass(frozen=True)
class QSTSResult:
    """Arrays of a QSTS run, step on axis 0, with the index that names their columns.

    ``v_pu`` (n_steps, n_nodes); ``i_a`` (n_steps, n_branch_conductors) float32;
    ``head_p_kw``/``head_q_kvar`` (n_steps, n_source_phases), import positive;
    ``losses_kw``/``losses_kvar`` (n_steps,); ``converged`` (n_steps,) bool.
    """

    t: pd.DatetimeIndex
    step: timedelta
    index: NetworkIndex
    v_pu: np.ndarray
    i_a: np.ndarray
    head_p_kw: np.ndarray
    head_q_kvar: np.ndarray
    losses_kw: np.ndarray
    losses_kvar: np.ndarray
    converged: np.ndarray
    control_mode: str

    @property
    def n_steps(self) -> int:
        return len(self.t)

    def take(self, steps: np.ndarray) -> QSTSResult:
        """The result restricted to ``steps`` (indices or a bool mask), in that order."""
        return replace(self, t=self.t[steps], v_pu=self.v_pu[steps], i_a=self.i_a[steps],
                       head_p_kw=self.head_p_kw[steps], head_q_kvar=self.head_q_kvar[steps],
                       losses_kw=self.losses_kw[steps], losses_kvar=self.losses_kvar[steps],
                       converged=self.converged[steps])

    @property
    def dt_h(self) -> float:
        return self.step.total_seconds() / 3600.0

    def loading_pct(self, rating: str = "normal") -> np.ndarray:
        """Branch conductor loading [% of the normal or emergency rating]; nan without one."""
        amps = self.index.branch_norm_a if rating == "normal" else self.index.branch_emerg_a
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(amps > 0, self.i_a / amps * 100.0, np.nan)

    def transformer_loading_pct(self) -> np.ndarray:
        """Transformer phase current as % of nameplate current (nan for other branches)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.i_a / self.index.xfmr_rated_a * 100.0

    def voltages_long(self) -> pd.DataFrame:
        """Tidy table ``t, bus, phase, v_pu, v_v``: v_v the magnitude [V] v_pu measures,
        line to ground, or line to line on ungrounded areas
        (:mod:`derms.powerflow.voltage_measure`)."""
        n_t, n_n = self.v_pu.shape
        base = self.index.node_kv_base_ln * 1e3
        if self.index.v_pair is not None:
            base = base * np.where(self.index.v_pair >= 0, np.sqrt(3.0), 1.0)
        return pd.DataFrame({
            "t": self.t.repeat(n_n),
            "bus": np.tile(self.index.node_bus, n_t),
            "phase": np.tile(self.index.node_phase, n_t),
            "v_pu": self.v_pu.ravel(),
            "v_v": (self.v_pu * base).ravel(),
        })

    def branches_long(self) -> pd.DataFrame:
        """Tidy table ``t, element, phase, i_a, loading_pct, loading_emerg_pct``."""
        n_t, n_b = self.i_a.shape
        return pd.DataFrame({
            "t": self.t.repeat(n_b),
            "element": np.tile(self.index.branch_element, n_t),
            "phase": np.tile(self.index.branch_phase, n_t),
            "i_a": self.i_a.ravel(),
            "loading_pct": self.loading_pct().ravel(),
            "loading_emerg_pct": self.loading_pct("emergency").ravel(),
        })

    def transformers_long(self) -> pd.DataFrame:
        """Tidy table ``t, element, phase, i_a, loading_pct`` (% of nameplate current)."""
        is_x = ~np.isnan(self.index.xfmr_rated_a)
        n_t, n_x = self.n_steps, int(is_x.sum())
        return pd.DataFrame({
            "t": self.t.repeat(n_x),
            "element": np.tile(self.index.branch_element[is_x], n_t),
            "phase": np.tile(self.index.branch_phase[is_x], n_t),
            "i_a": self.i_a[:, is_x].ravel(),
            "loading_pct": self.transformer_loading_pct()[:, is_x].ravel(),
        })

    def totals(self) -> pd.DataFrame:
        """Per step: ``t, head_p_kw, head_q_kvar, losses_kw, losses_kvar, converged``."""
        return pd.DataFrame({
            "t": self.t, "head_p_kw": self.head_p_kw.sum(axis=1),
            "head_q_kvar": self.head_q_kvar.sum(axis=1), "losses_kw": self.losses_kw,
            "losses_kvar": self.losses_kvar, "converged": self.converged,
        })

    def head_long(self) -> pd.DataFrame:
        """Tidy table ``t, phase, p_kw, q_kvar`` at the feeder head (import positive)."""
        n_t, n_p = self.head_p_kw.shape
        return pd.DataFrame({
            "t": self.t.repeat(n_p),
            "phase": np.tile(np.arange(1, n_p + 1), n_t),
            "p_kw": self.head_p_kw.ravel(),
            "q_kvar": self.head_q_kvar.ravel(),
        })


def _resume_yearly(engine: OpenDSSEngine, step_s: float) -> None:
    """After a step's solve raised (the engine then refuses every later solve, error #99,
    and its clock stops), restart yearly mode at the clock the failed step had reached, so
    the next solve takes the next profile row. The failed step's values stay as solved
    and it is flagged not converged."""
    sol = engine.circuit.Solution
    hour, sec = sol.Hour, sol.Seconds
    engine.command(f"set mode=yearly stepsize={step_s}s number=1")
    engine.command(f"set time=({hour},{sec})")


def load_profiles_into_engine(engine: OpenDSSEngine, profiles: Profiles) -> None:
    """Create one OpenDSS load shape per distinct profile and assign it (``yearly=``).

    Elements of the supported classes without a profile get a flat shape (held at base).
    Unknown elements raise :class:`ModelError` naming them.
    """
    c = engine.circuit
    known = {n.lower() for n in c.AllElementNames}
    missing = [e for e in profiles.elements if e not in known]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"profile names an element not in the feeder: {missing[0]}{more}")
    sec = profiles.step.total_seconds()
    engine.command(f"new loadshape.{_FLAT} npts=1 sinterval={sec} mult=[1] qmult=[1]")
    for cls in SUPPORTED_CLASSES:
        if any(n.startswith(cls + ".") for n in known):
            engine.command(f"batchedit {cls}..* yearly={_FLAT}")
    shapes, of_element = shared_shapes(profiles)
    for i, (p_col, q_col) in enumerate(shapes):
        engine.command(f"new loadshape.derms_p{i} npts={profiles.n_steps} sinterval={sec}")
        ls = c.LoadShapes
        ls.Name = f"derms_p{i}"
        ls.Pmult = p_col
        ls.Qmult = q_col
    for element, i in zip(profiles.elements, of_element, strict=True):
        engine.command(f"edit {element} yearly=derms_p{i}")


def run_qsts(
    engine: OpenDSSEngine,
    profiles: Profiles,
    *,
    control_mode: ControlMode = "static",
    index: NetworkIndex | None = None,
    on_step: Callable[[int], None] | None = None,
    restart: ControlState | None = None,
    restart_at: np.ndarray | None = None,
) -> QSTSResult:
    """Run a QSTS study over ``profiles`` and collect every step.

    ``control_mode`` "static" lets regulators and capacitors act within each step (taps
    carry over between steps), "time" applies their delays, "off" freezes them.
    ``restart``: the steps flagged in ``restart_at`` ((n_steps,) bool; default every step)
    start from these taps and capacitor states instead of the last step's, so each run of
    steps from one restart to the next depends on its own loads only, not on what was
    solved before it (a regulator settles anywhere inside its band, so a chained run's
    voltages carry the earlier steps' history). ``on_step(k)`` is called
    after step k (e.g. to advance a progress bar). Steps that do not converge, or whose
    controls do not settle within the iteration limit (OpenDSS error #485), are kept and
    flagged in ``converged``.
    """
    load_profiles_into_engine(engine, profiles)
    index = index or build_index(engine)
    engine.set_control_mode(control_mode)
    sec = profiles.step.total_seconds()
    engine.command(f"set mode=yearly stepsize={sec}s number=1")
    engine.command("set time=(0,0)")
    col = StepCollector(engine, index, profiles.n_steps)
    sol = engine.circuit.Solution
    at = np.ones(profiles.n_steps, dtype=bool) if restart_at is None else np.asarray(
        restart_at, dtype=bool)
    if at.shape != (profiles.n_steps,):
        raise ValueError(f"restart_at has shape {at.shape}, expected ({profiles.n_steps},)")
    from dss import DSSException  # lazily, as the engine: it loads the native library

    unsettled = []
    for k in range(profiles.n_steps):
        if restart is not None and at[k]:
            restore_control_state(engine, restart)
        try:
            sol.Solve()
        except DSSException:  # e.g. #485, controls hunting past the iteration limit
            _resume_yearly(engine, sec)
            unsettled.append(k)
        col.collect(k)
        if on_step is not None:
            on_step(k)
    col.converged[unsettled] = False
    return QSTSResult(
        t=profiles.times, step=profiles.step, index=index, v_pu=col.v_pu, i_a=col.i_a,
        head_p_kw=col.head_p_kw, head_q_kvar=col.head_q_kvar, losses_kw=col.losses_kw,
        losses_kvar=col.losses_kvar, converged=col.converged, control_mode=control_mode,
    )
