"""Engines frozen at their solved operating point, shared by the linear-model and
state-estimation validations."""

from __future__ import annotations

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
