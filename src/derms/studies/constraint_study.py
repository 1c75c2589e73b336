"""A constraint forecast on a feeder with PV placed as in ``derms study`` (CLI and API).

Compiles the feeder, places PV on a share of its loads (seeded), and hands the load and
PV histories to :func:`derms.analysis.constraint_forecast.forecast_constraints_from_history`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from derms.analysis.constraint_forecast import (
    ConstraintForecast,
    forecast_constraints_from_history,
)
from derms.errors import InputError
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.qsts_study import StudyConfig, add_pv, place_pv

STALE_HISTORY = pd.Timedelta("2D")  # an origin this far past the histories' end is warned


def run_constraint_forecast(master: Path, load_history: pd.Series, pv_history: pd.Series, *,
                            pv_penetration: float, seed: int, origin: pd.Timestamp,
                            horizon: pd.Timedelta, **options
                            ) -> tuple[ConstraintForecast, str, int]:
    """Forecast violations over [origin, origin + horizon) -> (forecast, feeder name, n PV).

    ``load_history`` (any power unit, import positive) becomes a multiplier of each
    load's base kW; ``pv_history`` (generation >= 0) per unit of ``pv_capacity``.
    ``options`` go to ``forecast_constraints_from_history`` (pv_capacity, latitude,
    longitude, tz, method, threshold, n_samples, ...). ``seed`` places the PV and, with
    ``method="copula"``, draws the sample paths. The PV systems placed are in the
    forecast's ``pv_systems`` table; thermal rows say whether their rating is an
    OpenDSS default (``rating_is_default``, DESIGN.md: reports must say so).
    """
    if options.get("method") == "copula":
        options.setdefault("seed", seed)
    tz = options.get("tz", "UTC")
    try:
        pd.Timestamp("2026-01-01").tz_localize(tz)
    except Exception:  # noqa: BLE001 - zoneinfo/pytz raise several kinds
        raise InputError(f"time zone {tz!r} is unknown (use an IANA name such as "
                         "Europe/Paris or America/New_York)") from None
    threshold = options.get("threshold", 0.5)
    if not 0 < threshold <= 1:   # before compiling and forecasting, not after
        raise InputError(f"threshold must be in (0, 1], got {threshold}")
    notes = []
    end = min(load_history.index.max(), pv_history.index.max())
    if origin - end > STALE_HISTORY:
        notes.append(f"the histories end at {end.isoformat()}, {(origin - end).days} days "
                     f"before the origin {origin.isoformat()}: the forecast has no recent "
                     "data (seasonal patterns only)")
    with OpenDSSEngine(master) as engine:
        model = read_feeder(engine.ctx, engine.source_master)
        pv = place_pv(model, StudyConfig(pv_penetration=pv_penetration, seed=seed))
        add_pv(engine, pv)
        engine.solve_snapshot()
        fc = forecast_constraints_from_history(engine, load_history, pv_history,
                                               list(pv["pv"]), origin=origin, horizon=horizon,
                                               **options)
    default = {ln.name for ln in model.lines if ln.rating_is_default}
    frames = {}
    for name in ("violations", "pre_existing"):
        f = getattr(fc, name).copy()
        f["rating_is_default"] = (f["kind"] == "thermal") & f["element"].str.lower().isin(
            default)
        frames[name] = f
    n_def = int(frames["violations"]["rating_is_default"].sum()
                + frames["pre_existing"]["rating_is_default"].sum())
    if n_def:
        els = sorted(set(frames["violations"].loc[frames["violations"]["rating_is_default"],
                                                  "element"])
                     | set(frames["pre_existing"].loc[
                         frames["pre_existing"]["rating_is_default"], "element"]))
        notes.append(f"thermal limits of {len(els)} element(s) are OpenDSS default ratings "
                     f"(the model gives none: 400 A normal): {', '.join(els[:10])}"
                     + (" ..." if len(els) > 10 else "") + " (rating_is_default)")
    fc = replace(fc, notes=(*notes, *fc.notes), pv_systems=pv.copy(), **frames)
    return fc, model.name, len(pv)
