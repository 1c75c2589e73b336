"""Constraint-forecast evaluation on IEEE 123 with high PV: overvoltage hours, precision/recall.

Setup (documented, shared with tests/validation/test_constraint_forecast.py):
- Feeder: bundled IEEE 123, regulators and capacitors in their normal ("static") control.
- PV fleet: ``place_pv`` with penetration 0.6 (60 % of loads, seed 0), DC size
  U(0.5, 1.2) x the load's peak kW, inverter 1.1 x Pmpp kVA, unity power factor. The
  bundled IEEE 123 models customers at the primary; each PV system is connected through
  its own service transformer (kVA = inverter kVA, %R 3, %X 4, lumping transformer and
  secondary, to 240 V single-phase or
  480 V three-phase), whose secondary bus is the customer's point of connection. Without
  it, the feeder's line-drop-compensated regulators keep every primary node below
  1.05 pu even with 9 MW of PV on a 3.5 MW feeder (measured), so this is where PV
  overvoltage shows.
- Load: the measured feeder load shape of EPRI ckt24 (``LS_ThreePhase.txt``, 8760 h),
  laid on calendar 2012 in local standard time (UTC-07:00), interpolated to 15 min,
  normalised to its peak; every load gets it as the multiplier of its base (peak) kW.
- PV: PVDAQ system 50 measured AC power (Golden, CO), 15 min, per unit of its capacity
  (the 99.9th percentile of the record, 3.1 kW); every PV system gets it.
- Truth: QSTS with the actual load and actual PV of the day; base case without PV.
- Forecast: ``derms.forecast.forecast_quantiles`` from the 90 days before the origin only
  (origin 00:00 local = 07:00 UTC, horizon 24 h), scenario grid of p10/p50/p90.
- An hour is overvoltage when any node-phase is above 1.05 + 0.001 pu (pre-existing ones
  relative to the base case) in any interval of it; predicted when probability >= 0.5.

Run: ``.venv/bin/python bench/bench_constraint_forecast.py [--start 2012-06-01 --days 30]``
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from derms.analysis.constraint_forecast import forecast_constraints
from derms.grid.bundled import data_dir, resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.qsts_study import StudyConfig, place_pv

CKT24_SHAPE = (Path(__file__).resolve().parents[2] / "shared" / "feeders" / "EPRITestCircuits"
               / "ckt24" / "LS_ThreePhase.txt")
PV_FILE = data_dir() / "measured" / "pvdaq_system50_ac_power.parquet"
LATITUDE, LONGITUDE = 39.7406, -105.1775
LOCAL_OFFSET = pd.Timedelta(hours=-7)
STEP = pd.Timedelta(minutes=15)
DAY = pd.Timedelta("24h")
HISTORY = pd.Timedelta("90D")  # training window given to the forecaster (speed)
NAMED_DAY = pd.Timestamp("2012-06-12 07:00", tz="UTC")  # 00:00 local


def pv_pu_series() -> pd.Series:
    """Measured PV output per unit of capacity, 15-min, UTC interval starts (NaN gaps)."""
    df = pd.read_parquet(PV_FILE)
    s = df.set_index("measured_on")["ac_power_2"].astype(float)
    s.index = pd.DatetimeIndex(s.index).tz_convert("UTC")
    s = s[~s.index.duplicated()].sort_index()
    s = s.reindex(pd.date_range(s.index[0], s.index[-1], freq=STEP))
    capacity_w = float(s.quantile(0.999))
    return (s / capacity_w).clip(lower=0.0).rename("pv_pu")


def load_mult_series() -> pd.Series:
    """ckt24's measured feeder load shape on 2012 (UTC-07:00), 15-min, peak 1."""
    hourly = np.loadtxt(CKT24_SHAPE, dtype=float)[:8760]
    t0 = pd.Timestamp("2012-01-01 00:00", tz="UTC") - LOCAL_OFFSET
    h = pd.Series(hourly / hourly.max(), index=pd.date_range(t0, periods=8760, freq="h"))
    return h.resample(STEP).interpolate().rename("load_mult")


@dataclass
class Feeder:
    """IEEE 123 engine with its PV fleet (service transformers) and the fleet table."""

    engine: OpenDSSEngine
    pv: pd.DataFrame

    @property
    def pv_elements(self) -> list[str]:
        return list(self.pv["pv"])


def add_pv_service_transformers(engine: OpenDSSEngine, pv: pd.DataFrame,
                                r_pct: float = 3.0, x_pct: float = 4.0) -> None:
    """Connect each PV system of ``pv`` (from ``place_pv``) through its own transformer."""
    bases = []
    for row in pv.itertuples(index=False):
        name = row.pv.split(".", 1)[1]
        sec = f"{name}_sec"
        if row.phases == 1:
            conn, kv2, kvln, sec_nodes = row.conn, 0.24, 0.24, f"{sec}.1"
        else:
            conn, kv2, kvln, sec_nodes = "wye", 0.48, 0.48 / 3 ** 0.5, f"{sec}.1.2.3"
        engine.command(
            f"new transformer.{name}_xf phases={row.phases} windings=2 "
            f"buses=[{row.bus}.{row.nodes} {sec_nodes}] conns=[{conn} wye] "
            f"kvs=[{row.kv} {kv2}] kvas=[{row.kva} {row.kva}] %loadloss={r_pct} xhl={x_pct}")
        engine.command(
            f"new {row.pv} bus1={sec_nodes} phases={row.phases} kv={kv2} kva={row.kva} "
            f"pmpp={row.pmpp_kw} irradiance=1 pf=1 %cutin=0.01 %cutout=0.01")
        bases.append((sec, kvln))
    engine.command("makebuslist")
    for sec, kvln in bases:
        engine.command(f"setkvbase bus={sec} kvln={kvln}")


def build_feeder(penetration: float = 0.6, seed: int = 0) -> Feeder:
    """IEEE 123 with the PV fleet of the module docstring, solved once (controls acting)."""
    engine = OpenDSSEngine(resolve_master("ieee123"))
    model = read_feeder(engine.ctx, engine.source_master)
    pv = place_pv(model, StudyConfig(pv_penetration=penetration, seed=seed))
    add_pv_service_transformers(engine, pv)
    engine.solve_snapshot()
    return Feeder(engine, pv)


def _point(series: pd.Series, t: pd.DatetimeIndex) -> pd.DataFrame:
    """A one-level 'forecast' equal to the actuals: the truth run (weight 1)."""
    return pd.DataFrame({"p50": series.reindex(t).to_numpy()}, index=t)


def day_index(origin: pd.Timestamp, horizon: pd.Timedelta = DAY
              ) -> pd.DatetimeIndex:
    return pd.date_range(origin, origin + horizon, freq=STEP, inclusive="left")


def truth_hours(feeder: Feeder, load: pd.Series, pv: pd.Series, origin: pd.Timestamp,
                kind: str = "overvoltage") -> pd.DatetimeIndex:
    """Hours with a ``kind`` violation in QSTS with the actual load and PV."""
    t = day_index(origin)
    res = forecast_constraints(feeder.engine, _point(load, t), _point(pv, t),
                               feeder.pv_elements, threshold=1.0)
    return res.predicted_hours(kind)


def daily_clearness() -> pd.DataFrame:
    """Observed daily clearness index (PSM3 GHI / clear-sky GHI per local day), 30-min.

    A stand-in for a day-ahead weather forecast of the day's cloudiness (an oracle: the
    observed value), used by ``--weather`` to show what a weather forecast adds.
    """
    w = pd.read_parquet(data_dir() / "measured" / "pvdaq_system50_psm3_weather.parquet")
    w.index = pd.DatetimeIndex(pd.to_datetime(w["index"])).tz_convert("UTC")
    day = (w.index + LOCAL_OFFSET).date
    kt = (w["ghi"].groupby(day).transform("sum")
          / w["ghi_clear"].groupby(day).transform("sum")).clip(0, 1.2)
    return pd.DataFrame({"daily_clearness": kt.astype(float)})


WEATHER: pd.DataFrame | None = None   # set by --weather


def quantile_forecasts(load: pd.Series, pv: pd.Series, origin: pd.Timestamp,
                       horizon: pd.Timedelta = DAY
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load and PV quantile forecasts from history strictly before ``origin``."""
    import warnings

    from derms.forecast import forecast_quantiles

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        window = slice(origin - HISTORY, origin - pd.Timedelta(1, "ns"))
        lq = forecast_quantiles(load.loc[window], kind="load", origin=origin,
                                horizon=horizon, tz="Etc/GMT+7")
        pq = forecast_quantiles(pv.loc[window], kind="pv", origin=origin,
                                horizon=horizon, latitude=LATITUDE, longitude=LONGITUDE,
                                capacity=1.0, tz="Etc/GMT+7", weather=WEATHER)
    return lq.clip(lower=0.0), pq.clip(lower=0.0)


@dataclass
class DayScore:
    origin: pd.Timestamp
    true_hours: pd.DatetimeIndex
    predicted_hours: pd.DatetimeIndex
    forecast_s: float
    constraint_s: float
    ov_probability: pd.Series  # hourly probability of overvoltage (UTC hour starts)

    def at(self, threshold: float) -> DayScore:
        """The same day scored at another probability threshold."""
        pred = pd.DatetimeIndex(self.ov_probability.index[self.ov_probability >= threshold])
        return DayScore(self.origin, self.true_hours, pred, self.forecast_s,
                        self.constraint_s, self.ov_probability)

    @property
    def tp(self) -> int:
        return len(self.true_hours.intersection(self.predicted_hours))


def evaluate_day(feeder: Feeder, load: pd.Series, pv: pd.Series, origin: pd.Timestamp,
                 threshold: float = 0.5, method: str = "grid") -> DayScore:
    """Forecast the day from history, run the constraint forecast, compare with the truth."""
    truth = truth_hours(feeder, load, pv, origin)
    t0 = time.perf_counter()
    lq, pq = quantile_forecasts(load, pv, origin)
    t1 = time.perf_counter()
    res = forecast_constraints(feeder.engine, lq, pq, feeder.pv_elements, threshold=threshold,
                               method=method)
    h = res.hourly[res.hourly["kind"] == "overvoltage"]
    prob = pd.Series(h["probability"].to_numpy(), index=pd.DatetimeIndex(h["hour"]))
    return DayScore(origin, truth, res.predicted_hours("overvoltage"), t1 - t0, res.runtime_s,
                    prob)


def precision_recall(days: list[DayScore]) -> tuple[float, float]:
    """Micro-averaged over all hours of all days (nan when undefined)."""
    tp = sum(d.tp for d in days)
    n_pred = sum(len(d.predicted_hours) for d in days)
    n_true = sum(len(d.true_hours) for d in days)
    return (tp / n_pred if n_pred else float("nan"), tp / n_true if n_true else float("nan"))


def complete_days(load: pd.Series, pv: pd.Series, start: pd.Timestamp, n: int
                  ) -> list[pd.Timestamp]:
    """The first ``n`` origins from ``start`` whose day has complete load and PV data."""
    out, origin = [], start
    while len(out) < n and origin < pv.index[-1]:
        t = day_index(origin)
        if load.reindex(t).notna().all() and pv.reindex(t).notna().all():
            out.append(origin)
        origin += pd.Timedelta("24h")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--start", default="2012-06-01", help="first local day (UTC-07:00)")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--method", default="grid")
    ap.add_argument("--weather", action="store_true",
                    help="give the PV forecaster the observed daily clearness (oracle)")
    ap.add_argument("--history-days", type=int, default=90)
    args = ap.parse_args(argv)
    global WEATHER, HISTORY
    WEATHER = daily_clearness() if args.weather else None
    HISTORY = pd.Timedelta(days=args.history_days)
    load, pv = load_mult_series(), pv_pu_series()
    feeder = build_feeder()
    start = pd.Timestamp(args.start, tz="UTC") - LOCAL_OFFSET
    days = complete_days(load, pv, start, args.days)
    scores = []
    print(f"{'day (local)':12s} {'true':>5s} {'pred':>5s} {'tp':>4s} {'fcst s':>7s} "
          f"{'qsts s':>7s}")
    for origin in days:
        d = evaluate_day(feeder, load, pv, origin, args.threshold, args.method)
        scores.append(d)
        print(f"{(origin + LOCAL_OFFSET).date()!s:12s} {len(d.true_hours):5d} "
              f"{len(d.predicted_hours):5d} {d.tp:4d} {d.forecast_s:7.2f} "
              f"{d.constraint_s:7.2f}", flush=True)
    p, r = precision_recall(scores)
    n_true = sum(len(d.true_hours) for d in scores)
    n_pred = sum(len(d.predicted_hours) for d in scores)
    print(f"\ndays {len(scores)}  overvoltage hours true {n_true} predicted {n_pred}  "
          f"precision {p:.3f}  recall {r:.3f}  threshold {args.threshold:g}  "
          f"method {args.method}  weather {'observed daily clearness' if args.weather else 'none'}"
          f"  history {args.history_days} d")
    for th in (0.3, 0.4, 0.5, 0.6, 0.7):
        pt, rt = precision_recall([d.at(th) for d in scores])
        print(f"  threshold {th:.1f}: precision {pt:.3f} recall {rt:.3f}")
    print(f"time per day-forecast: quantile forecasts "
          f"{np.mean([d.forecast_s for d in scores]):.2f} s + constraint forecast "
          f"{np.mean([d.constraint_s for d in scores]):.2f} s (feeder compiled; 2-core machine)")
    feeder.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
