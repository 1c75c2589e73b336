"""Flexible-connection estimate against the reference QSTS with per-interval AC bisection
(IEEE 123, a week of hourly forecasts; the year is in bench/bench_interconnection.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from derms.analysis.hosting_capacity import resolve_sites
from derms.analysis.interconnection import (
    curtailment_reference,
    flexible_connection,
    new_connection,
)
from derms.errors import InputError
from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.device_profiles import device_profile
from derms.studies.qsts_study import StudyConfig, study_profiles

START = datetime(2026, 6, 1, 8, tzinfo=UTC)
CFG = StudyConfig(days=7, step=timedelta(hours=1), start=START)


def _run(fn, bus: str, kind: str, kw: float):
    with OpenDSSEngine(resolve_master("ieee123")) as eng:
        eng.solve_snapshot()
        model = read_feeder(eng.ctx, eng.source_master)
        prof, _ = study_profiles(model, CFG)
        site = resolve_sites(eng, [bus])[0]
        pu = device_profile(kind, START, CFG.n_steps, CFG.step, seed=0)
        return fn(eng, prof, site, kind, kw, pu)


@pytest.mark.parametrize(("bus", "kind", "kw"), [("67", "pv", 1500.0), ("300", "load", 900.0)])
def test_fast_curtailment_agrees_with_the_reference(bus, kind, kw):
    fast = _run(flexible_connection, bus, kind, kw)
    ref = _run(curtailment_reference, bus, kind, kw)
    (d, a), = fast.annual().items()
    r = ref.annual()[d]
    assert r["curtailed_kwh"] > 0.02 * r["available_kwh"], "the case must curtail"
    assert abs(a["curtailed_kwh"] - r["curtailed_kwh"]) <= 0.10 * r["curtailed_kwh"]
    assert not fast.static_ok and not ref.static_ok
    # hour by hour the output delivered stays close to the bisection's
    fa = fast.intervals["available_kw"] - fast.intervals["curtailed_kw"]
    ra = ref.intervals["available_kw"] - ref.intervals["curtailed_kw"]
    assert np.abs(fa.to_numpy() - ra.to_numpy()).max() <= 0.1 * kw


def test_a_small_device_fits_statically():
    fast = _run(flexible_connection, "67", "pv", 50.0)
    assert fast.static_ok
    assert fast.annual()["export"]["curtailed_kwh"] == 0


def test_bad_input():
    with OpenDSSEngine(resolve_master("ieee123")) as eng:
        eng.solve_snapshot()
        site = resolve_sites(eng, ["67"])[0]
        with pytest.raises(InputError, match="positive"):
            new_connection(eng, site, -5.0)
        with pytest.raises(InputError, match="unknown bus"):
            resolve_sites(eng, ["nosuch"])
        with pytest.raises(InputError, match="has no phase"):
            resolve_sites(eng, ["11.2"])



def test_battery_export_curtailment_follows_the_reference_on_ieee13():
    """An independent sweep: a 2.5 MW battery at IEEE 13's bus 675 over 2 days, where the
    fast method stopped refining 0.002 pu short of the limit and curtailed 13,110 kWh of
    export against the reference's 6,556 (+100 %, accepting 0.0005 pu beyond DESIGN.md's
    tolerance); it now refines to 0.0001 pu and aims that far inside the tolerance: 7,164
    (+9.3 %). Conservative, as on IEEE 123 over a year (+0.6 to +2.7 %, bench)."""
    start = datetime(2026, 1, 1, 8, tzinfo=UTC)
    cfg = StudyConfig(days=2, step=timedelta(hours=1), start=start)
    out = {}
    for name, fn in (("fast", flexible_connection), ("ref", curtailment_reference)):
        with OpenDSSEngine(resolve_master("ieee13")) as eng:
            eng.solve_snapshot()
            prof, _ = study_profiles(read_feeder(eng.ctx, eng.source_master), cfg)
            site = resolve_sites(eng, ["675"])[0]
            pu = device_profile("battery", start, cfg.n_steps, cfg.step, seed=0)
            out[name] = fn(eng, prof, site, "battery", 2500.0, pu).annual()["export"]
    f, r = out["fast"]["curtailed_kwh"], out["ref"]["curtailed_kwh"]
    assert r > 0.05 * out["ref"]["available_kwh"], "the case must curtail"
    assert r <= f <= 1.15 * r, (f, r)
