"""A constraint forecast on a feeder with PV placed as in ``derms study`` (CLI and API).

Compiles the feeder, places PV on a share of its loads (seeded), and hands the load and
PV histories to :func:`derms.analysis.constraint_forecast.forecast_constraints_from_history`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from derms.analysis.constraint_forecast import (
    ConstraintForecast,
    forecast_constraints_from_history,
)
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.qsts_study import StudyConfig, add_pv, place_pv


def run_constraint_forecast(master: Path, load_history: pd.Series, pv_history: pd.Series, *,
                            pv_penetration: float, seed: int, origin: pd.Timestamp,
                            horizon: pd.Timedelta, **options
                            ) -> tuple[ConstraintForecast, str, int]:
    """Forecast violations over [origin, origin + horizon) -> (forecast, feeder name, n PV).

    ``load_history`` (any power unit, import positive) becomes a multiplier of each
    load's base kW; ``pv_history`` (generation >= 0) per unit of ``pv_capacity``.
    ``options`` go to ``forecast_constraints_from_history`` (pv_capacity, latitude,
    longitude, tz, method, threshold, n_samples, ...).
    """
    with OpenDSSEngine(master) as engine:
        model = read_feeder(engine.ctx, engine.source_master)
        pv = place_pv(model, StudyConfig(pv_penetration=pv_penetration, seed=seed))
        add_pv(engine, pv)
        engine.solve_snapshot()
        fc = forecast_constraints_from_history(engine, load_history, pv_history,
                                               list(pv["pv"]), origin=origin, horizon=horizon,
                                               **options)
    return fc, model.name, len(pv)
