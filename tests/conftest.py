"""Shared fixtures: paths of the shared reference feeders and of the bundled ones."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FEEDERS = (REPO.parent / "shared" / "feeders").resolve()

SHARED_MASTERS = {
    "ieee13": "IEEETestCases/13Bus/IEEE13Nodeckt.dss",
    "ieee34": "IEEETestCases/34Bus/ieee34Mod1.dss",
    "ieee37": "IEEETestCases/37Bus/ieee37.dss",
    "ieee123": "IEEETestCases/123Bus/IEEE123Master.dss",
    "ieee8500": "IEEETestCases/8500-Node/Master.dss",
    "ckt5": "EPRITestCircuits/ckt5/Master_ckt5.dss",
    "ckt24": "EPRITestCircuits/ckt24/master_ckt24.dss",
}


def shared_master(name: str) -> Path:
    """Path of a reference feeder in ../shared/feeders; skips the test if it is absent."""
    path = SHARED_FEEDERS / SHARED_MASTERS[name]
    if not path.exists():
        pytest.skip(f"reference feeder not available: {path}")
    return path


@pytest.fixture
def ieee13_path() -> Path:
    from derms.grid.bundled import resolve_master

    return resolve_master("ieee13")
