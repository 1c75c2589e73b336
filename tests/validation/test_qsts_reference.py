"""derms QSTS against the same time series driven directly in OpenDSS's yearly mode."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from derms.errors import ModelError
from derms.grid.bundled import resolve_master
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.profiles import Profiles
from derms.powerflow.qsts import run_qsts
from tests.validation.conftest import reference_v_pu

N = 24


def _profiles(loads: list[str], seed: int = 1) -> Profiles:
    rng = np.random.default_rng(seed)
    base = 0.6 + 0.4 * np.sin(np.linspace(0, 2 * np.pi, N))[:, None]
    mult = np.clip(base * rng.uniform(0.7, 1.3, size=(1, len(loads))), 0.05, None)
    return Profiles(start=datetime(2026, 3, 1, tzinfo=UTC), step=timedelta(hours=1),
                    elements=tuple(loads), p_mult=mult)


def _native(master, profiles: Profiles, controls: str) -> np.ndarray:
    """Same study through OpenDSS text commands and its own yearly stepping."""
    with OpenDSSEngine(master) as eng:  # only for its private copy + context
        ctx = eng.ctx
        cmd = lambda s: setattr(ctx.Text, "Command", s)  # noqa: E731
        for j, el in enumerate(profiles.elements):
            vals = " ".join(f"{x:.17g}" for x in profiles.p_mult[:, j])
            cmd(f"new loadshape.n{j} npts={N} interval=1 mult=[{vals}] qmult=[{vals}]")
            cmd(f"edit {el} yearly=n{j}")
        cmd(f"set controlmode={controls}")
        cmd("set mode=yearly stepsize=1h number=1")
        cmd("set time=(0,0)")
        out = np.empty((N, ctx.ActiveCircuit.NumNodes))
        names = [n.lower() for n in ctx.ActiveCircuit.AllNodeNames]
        pair = eng.voltage_pairs()  # ungrounded areas: OpenDSS's own puVLL there
        ll = {names[k] for k in np.flatnonzero(pair >= 0)}
        for k in range(N):
            ctx.ActiveCircuit.Solution.Solve()
            out[k] = reference_v_pu(ctx.ActiveCircuit, names, ll)
        return out


@pytest.mark.parametrize("feeder,controls", [("ieee13", "static"), ("ieee13", "off"),
                                             ("ieee123", "static")])
def test_qsts_matches_native_yearly_mode(feeder, controls):
    master = resolve_master(feeder)
    with OpenDSSEngine(master) as eng:
        loads = [n.lower() for n in eng.circuit.AllElementNames if n.lower().startswith("load.")]
        prof = _profiles(loads)
        res = run_qsts(eng, prof, control_mode=controls)
    ref = _native(master, prof, controls)
    assert res.converged.all()
    assert np.abs(res.v_pu - ref).max() < 1e-9
    # the profile really drives the feeder: head power follows the load shape
    p = res.head_p_kw.sum(axis=1)
    assert np.corrcoef(p, prof.p_mult.mean(axis=1))[0, 1] > 0.99


def test_unprofiled_loads_are_held_at_base():
    master = resolve_master("ieee13")
    with OpenDSSEngine(master) as eng:
        eng.solve_snapshot()
        p_snap = -sum(eng.circuit.Vsources.First and eng.circuit.ActiveCktElement.Powers[0:6:2])
        prof = Profiles(start=datetime(2026, 1, 1, tzinfo=UTC), step=timedelta(minutes=15),
                        elements=("load.671",), p_mult=np.ones((4, 1)))
        res = run_qsts(eng, prof, control_mode="static")
    assert res.head_p_kw.sum(axis=1) == pytest.approx(np.full(4, p_snap), rel=1e-4)


def test_unknown_profile_element_raises():
    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        prof = Profiles(start=datetime(2026, 1, 1, tzinfo=UTC), step=timedelta(hours=1),
                        elements=("load.nosuch",), p_mult=np.ones((2, 1)))
        with pytest.raises(ModelError, match="load.nosuch"):
            run_qsts(eng, prof)


def test_tidy_tables_shapes_and_units():
    master = resolve_master("ieee13")
    with OpenDSSEngine(master) as eng:
        prof = Profiles(start=datetime(2026, 1, 1, tzinfo=UTC), step=timedelta(minutes=1),
                        elements=("load.671",), p_mult=np.linspace(0.5, 1.0, 5)[:, None])
        res = run_qsts(eng, prof, control_mode="off")
    v = res.voltages_long()
    assert len(v) == 5 * 41 and str(v.t.dt.tz) == "UTC"
    row = v[(v.bus == "650") & (v.phase == 1)].iloc[0]
    assert row.v_v == pytest.approx(row.v_pu * 4160 / np.sqrt(3), rel=1e-9)
    b = res.branches_long()
    assert (b.loading_emerg_pct <= b.loading_pct + 1e-9).all()
    x = res.transformers_long()
    assert set(x.element) == {"transformer.sub", "transformer.reg1", "transformer.reg2",
                              "transformer.reg3", "transformer.xfm1"}
    tot = res.totals()
    assert len(tot) == 5 and tot.converged.all()
    assert np.all(np.diff(tot.head_p_kw) > 0)  # load 671 ramps up, so does the head
