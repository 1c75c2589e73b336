"""Day-ahead load backtests on an evaluation set of real shapes (1 and 2 years, 1 h and 15 min).

    python bench/bench_forecast_eval.py [OUT_DIR] [NAME_SUBSTRING ...]

Series (all real measured shapes; no noise added):

- 1 year, hourly: EPRI ckt24 feeder, OpenDSS LoadShape1/4/5_P, EPRI ckt5 residential and
  small-commercial, EPRI ckt7 transformer 25607 (``/work/shared/feeders``);
- 2 years, hourly: a real year A followed by a real year B — another phase or transformer
  of the same EPRI circuit (shared weather), or another utility's feeder (independent
  weather, other daily profile);
- 1 and 2 years, 15 min: SimBench's aggregate 2016 profiles (``LoadProfile.csv`` of
  ``1-complete_data-mixed-all-0-sw`` in the simbench wheel; set ``SIMBENCH_PROFILES`` to the
  file, or install simbench); skipped when absent.

Year B is rolled by 0-6 whole days so that its weekly pattern falls on A's calendar and
is rescaled to A's mean x 1.02 (2 % growth). Every backtest is ``derms forecast
backtest``'s: daily local-midnight origins over the last 12 months, 24 h horizon, monthly
refits (LightGBM limited to 1 thread here). The table gives the model's MAE against the
best seasonal naive (day or week) and persistence, and its P10-P90 coverage.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from derms.forecast import ForecastSpec, backtest
from derms.forecast import model as _model

SHARED = Path(os.environ.get("DERMS_SHARED_FEEDERS",
                             Path(__file__).resolve().parents[2] / "shared" / "feeders"))
US_TZ, DE_TZ = "Etc/GMT+5", "Etc/GMT-1"
ONE_YEAR = ("ckt24_LS_ThreePhase", "LoadShape1", "LoadShape4", "LoadShape5_P",
            "ckt5_Residential", "ckt5_Commercial_SM", "ckt7_25607")
TWO_YEARS = (("ckt24_LS_PhaseA", "ckt24_LS_PhaseC"), ("ckt7_25609", "ckt7_25615"),
             ("ckt7_25617_A", "ckt7_25621_B"), ("LoadShape2", "LoadShape3"),
             ("ckt5_Residential", "ckt24_LS_ThreePhase"), ("LoadShape1", "ckt7_25607"))
SB_ONE_YEAR = ("mv_urban", "lv_rural1", "mv_comm")
SB_TWO_YEARS = (("hv_urban", "mv_semiurb"), ("lv_semiurb4", "lv_urban6"))


def dss_shapes(path: Path) -> dict[str, np.ndarray]:
    """Inline ``mult=(...)`` lists of the ``New Loadshape`` lines of an OpenDSS file."""
    text = path.read_text()
    out = {}
    for m in re.finditer(r"new\s+loadshape\.(\S+)[^(]*\(", text, re.IGNORECASE):
        end = text.index(")", m.end())
        out[m.group(1)] = np.array(text[m.end():end].replace(",", " ").split(), float)
    return out


def hourly_shapes() -> dict[str, np.ndarray]:
    """The 8760-h shapes of ../shared/feeders by name (a missing last hour repeated)."""
    out = {}
    for n in ("LoadShape1", "LoadShape2", "LoadShape3", "LoadShape4", "LoadShape5_P"):
        out[n] = np.loadtxt(SHARED / "Examples/Loadshapes" / f"{n}.CSV")
    for n in ("LS_PhaseA", "LS_PhaseC", "LS_ThreePhase"):
        out[f"ckt24_{n}"] = np.loadtxt(SHARED / "EPRITestCircuits/ckt24" / f"{n}.txt")
    for ckt in ("ckt5", "ckt7"):
        for k, v in dss_shapes(SHARED / f"EPRITestCircuits/{ckt}/Loadshapes_{ckt}.dss").items():
            out[f"{ckt}_{k}"] = v
    return {k: np.resize(v, 8760) for k, v in out.items()}


def _weekly_pattern(x: np.ndarray, n_day: int) -> np.ndarray:
    """(7,) mean of the daily means by position in the week (day index mod 7), relative."""
    days = x[: len(x) // n_day * n_day].reshape(-1, n_day).mean(axis=1)
    return np.array([days[i::7].mean() for i in range(7)]) / days.mean()


def append_year(a: np.ndarray, b: np.ndarray, n_day: int, growth: float = 0.02) -> np.ndarray:
    """``a`` then ``b`` rolled by the whole days that best put b's weekly pattern on a's
    calendar (the days cut from b's start are filled with the days a week before b's
    end), rescaled to a's mean x (1 + growth)."""
    bd = b[: len(b) // n_day * n_day].reshape(-1, n_day)
    target = _weekly_pattern(a, n_day)
    shift = (len(a) // n_day) % 7

    def rolled(r: int) -> np.ndarray:
        return np.concatenate([bd[r:], bd[len(bd) - 7: len(bd) - 7 + r]]) if r else bd

    err = [np.sum((np.roll(_weekly_pattern(rolled(r).ravel(), n_day), shift) - target) ** 2)
           for r in range(7)]
    bb = rolled(int(np.argmin(err))).ravel()
    return np.concatenate([a, bb * (a.mean() * (1 + growth) / bb.mean())])


def _series(v: np.ndarray, step: str, tz: str, start: str) -> pd.Series:
    idx = pd.date_range(start, periods=len(v), freq=step, tz=tz).tz_convert("UTC")
    return pd.Series(v.astype(float), index=idx)


def simbench_profiles() -> pd.DataFrame | None:
    """SimBench's aggregate active-power load profiles (per unit, 15 min, 2016), or None."""
    path = os.environ.get("SIMBENCH_PROFILES")
    if not path and importlib.util.find_spec("simbench") is not None:
        root = Path(importlib.util.find_spec("simbench").origin).parent
        path = str(root / "networks/1-complete_data-mixed-all-0-sw/LoadProfile.csv")
    if not path or not Path(path).exists():
        return None
    d = pd.read_csv(path, sep=";")
    return d[[c for c in d.columns if c.endswith("_pload")]]


def evaluation_set() -> dict[str, tuple[pd.Series, str]]:
    """{name: (series indexed by UTC interval start, IANA zone of its calendar)}."""
    h = hourly_shapes()
    out = {f"1y-h {n}": (_series(h[n], "h", US_TZ, "2011-01-01"), US_TZ) for n in ONE_YEAR}
    for a, b in TWO_YEARS:
        out[f"2y-h {a}>{b}"] = (_series(append_year(h[a], h[b], 24), "h", US_TZ,
                                        "2011-01-01"), US_TZ)
    sb = simbench_profiles()
    if sb is None:
        print("SimBench profiles not found: 15-min series skipped", file=sys.stderr)
        return out
    for n in SB_ONE_YEAR:
        out[f"1y-15 sb_{n}"] = (_series(sb[f"{n}_pload"].to_numpy(), "15min", DE_TZ,
                                        "2016-01-01"), DE_TZ)
    for a, b in SB_TWO_YEARS:
        v = append_year(sb[f"{a}_pload"].to_numpy(), sb[f"{b}_pload"].to_numpy(), 96)
        out[f"2y-15 sb_{a}>{b}"] = (_series(v, "15min", DE_TZ, "2016-01-01"), DE_TZ)
    return out


def main(out_dir: Path, only: list[str]) -> None:
    _model.DEFAULT_PARAMS["num_threads"] = 1
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (series, tz) in evaluation_set().items():
        if only and not any(s in name for s in only):
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = backtest(series, ForecastSpec(kind="load", tz=tz))
        m = r.metrics
        model = m["lightgbm_quantile"]
        naive = min(m["seasonal_naive_day"]["mae"], m["seasonal_naive_week"]["mae"])
        pers = m["persistence"]["mae"]
        rows.append({"series": name, "test_days": (r.test_end - r.test_start).days,
                     "mae_model": model["mae"], "mae_best_naive": naive, "mae_persistence": pers,
                     "vs_naive": model["mae"] / naive - 1,
                     "vs_persistence": model["mae"] / pers - 1,
                     "coverage_p10_p90": model["coverage_p10_p90"],
                     "seconds": time.perf_counter() - t0})
        r.forecasts.to_parquet(out_dir / (re.sub(r"[^\w.-]", "_", name) + ".parquet"))
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                         for v in rows[-1].values()), flush=True)
    tab = pd.DataFrame(rows)
    tab.to_csv(out_dir / "table.csv", index=False)
    print("\n| series | test days | MAE model | best seasonal naive | persistence | "
          "vs naive | vs persistence | P10-P90 cov. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['series']} | {r['test_days']} | {r['mae_model']:.4g} | "
              f"{r['mae_best_naive']:.4g} | {r['mae_persistence']:.4g} | {r['vs_naive']:+.1%} | "
              f"{r['vs_persistence']:+.1%} | {r['coverage_p10_p90']:.1%} |")
    print(f"\nmean vs naive {tab.vs_naive.mean():+.1%}, worst {tab.vs_naive.max():+.1%}; "
          f"mean vs persistence {tab.vs_persistence.mean():+.1%}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench_forecast_eval"),
         sys.argv[2:])
