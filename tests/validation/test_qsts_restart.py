"""QSTS steps as independent snapshots (``run_qsts(restart=...)``) against chained steps.

A regulator settles anywhere inside its band, so a chained QSTS's voltages at one load
carry the earlier steps' taps: on IEEE 13 the same load after a light step and after a
heavy one differs by 0.014 pu. With ``restart`` every step starts from the same taps and capacitor states and
gives what a lone snapshot from that state gives, whatever came before it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from derms.grid.bundled import resolve_master
from derms.powerflow.collect import build_index
from derms.powerflow.control_state import capture_control_state, regulated_transformers
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import run_qsts


def _profiles(engine: OpenDSSEngine, levels: list[float]) -> Profiles:
    loads = tuple(f"load.{n.lower()}" for n in engine.circuit.Loads.AllNames)
    mult = np.repeat(np.asarray(levels, dtype=float)[:, None], len(loads), axis=1)
    return Profiles(start=datetime(2026, 1, 1, tzinfo=UTC), step=timedelta(hours=1),
                    elements=loads, p_mult=mult)


def _run(levels: list[float], restart: bool) -> np.ndarray:
    with OpenDSSEngine(resolve_master("ieee13"), SolveSettings(max_control_iterations=100)
                       ) as engine:
        engine.solve_snapshot()
        state = capture_control_state(engine, regulated_transformers(engine))
        index = build_index(engine)
        res = run_qsts(engine, _profiles(engine, levels), index=index,
                       restart=state if restart else None)
        return res.v_pu


def test_chained_steps_carry_the_taps_and_restarted_steps_do_not():
    levels = [0.5, 1.0, 1.5, 1.0]
    chained = _run(levels, restart=False)
    # the premise: the same load after a light step and after a heavy one sits elsewhere
    # in the regulator band (measured 0.014 pu)
    assert np.max(np.abs(chained[1] - chained[3])) > 5e-3
    restarted = _run(levels, restart=True)
    np.testing.assert_allclose(restarted[3], restarted[1], atol=2e-4)  # the engine's own tolerance (1e-4)
    lone = _run([1.0], restart=True)
    np.testing.assert_allclose(restarted[1], lone[0], atol=2e-4)  # the engine's own tolerance (1e-4)


def test_a_step_whose_controls_hunt_is_flagged_and_the_run_goes_on():
    """OpenDSS raises #485 when the controls do not settle within the iteration limit, and
    then refuses every later solve (#99) with its clock stopped: a load-growth study on
    IEEE 8500 died with the raw exception (review). The step is flagged not converged and
    the next steps take their own profile rows."""
    levels = [1.0, 0.3, 1.6, 0.3, 1.0]
    with OpenDSSEngine(resolve_master("ieee13"), SolveSettings(max_control_iterations=2)
                       ) as engine:
        index = build_index(engine)
        res = run_qsts(engine, _profiles(engine, levels), index=index)
    head = res.head_p_kw.sum(axis=1)
    assert not res.converged.all()
    assert head[2] > 1.4 * head[0] and head[1] < 0.4 * head[0]  # rows kept their loads
    assert abs(head[4] - head[0]) < 0.01 * head[0] and abs(head[3] - head[1]) < 0.01 * head[1]
