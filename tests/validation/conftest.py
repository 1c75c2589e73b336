"""Engines frozen at their solved operating point, shared by the linear-model and
state-estimation validations."""

from __future__ import annotations

import numpy as np
import pytest

from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from tests.conftest import shared_master


def frozen_engine(name: str) -> OpenDSSEngine:
    """A reference feeder solved once with controls acting, then controls frozen."""
    from derms.powerflow.control_state import freeze_base_case

    engine = OpenDSSEngine(shared_master(name), SolveSettings(tolerance=1e-8))
    freeze_base_case(engine)
    return engine


@pytest.fixture(scope="module")
def ieee13():
    engine = frozen_engine("ieee13")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ieee123():
    engine = frozen_engine("ieee123")
    yield engine
    engine.close()


def reference_v_pu(circuit, node_names: list[str], line_to_line: set[str]) -> np.ndarray:
    """A reference engine's own voltage magnitudes [pu] in ``node_names`` order: node to
    ground (``AllBusVmagPu``), and for the nodes in ``line_to_line`` (ungrounded areas)
    OpenDSS's own ``Bus.puVLL`` (3 nodes: 1 -> ab, 2 -> bc, 3 -> ca; 2 nodes: their one
    line-to-line value)."""
    ref = dict(zip((n.lower() for n in circuit.AllNodeNames), circuit.AllBusVmagPu,
                   strict=True))
    out = np.array([ref[n] for n in node_names], dtype=float)
    by_bus: dict[str, list[int]] = {}
    for k, n in enumerate(node_names):
        if n in line_to_line:
            by_bus.setdefault(n.split(".")[0], []).append(k)
    for bus, ks in by_bus.items():
        circuit.SetActiveBus(bus)
        vll = np.asarray(circuit.ActiveBus.puVLL, dtype=float)
        mags = np.abs(vll[0::2] + 1j * vll[1::2])
        ks = sorted(ks, key=lambda k: node_names[k])
        for i, k in enumerate(ks):
            out[k] = mags[min(i, mags.size - 1)]
    return out


def tangent_errors(engine, terms: list[str]):
    """Yield (term, p_kw, q_kvar, err, change) for 1 kW and -1 kvar at each injection term:
    the tangent linear model (``load_band_pu=0``) against the AC change; its
    ``v0_pu`` must equal the engine's voltages."""
    from derms.powerflow.linear import build_linear_model, solve_ac_with_injections

    model = build_linear_model(engine, terms, load_band_pu=0.0)
    v0 = engine.node_voltages_pu()
    np.testing.assert_allclose(model.v0_pu, v0, atol=1e-12)
    for k in range(len(terms)):
        for p_kw, q_kvar in ((1.0, 0.0), (0.0, -1.0)):
            p, q = np.zeros(len(terms)), np.zeros(len(terms))
            p[k], q[k] = p_kw, q_kvar
            dv_ac = solve_ac_with_injections(engine, terms, p, q) - v0
            dv_lin = model.dv_dp_pu_per_kw @ p + model.dv_dq_pu_per_kvar @ q
            yield terms[k], p_kw, q_kvar, np.abs(dv_ac - dv_lin).max(), np.abs(dv_ac).max()
