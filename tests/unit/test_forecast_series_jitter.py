"""Series with a few seconds of clock jitter (AMI/SCADA exports): snapped to the grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from derms.errors import InputError
from derms.forecast import clean_series


def _jittered(step: str, n: int, seconds: float = 5.0, seed: int = 0, tz: str = "UTC",
              start: str = "2024-01-01") -> tuple[pd.Series, pd.Series]:
    """(jittered series, the same values on the exact grid): jitter uniform in
    [-seconds, seconds], whole seconds as meters stamp them."""
    grid = pd.date_range(start, periods=n, freq=step, tz=tz)
    rng = np.random.default_rng(seed)
    jitter = pd.to_timedelta(rng.integers(-int(seconds), int(seconds) + 1, n), unit="s")
    values = rng.normal(100, 10, n)
    return pd.Series(values, index=grid + jitter), pd.Series(values, index=grid)


@pytest.mark.parametrize("step", ["15min", "1h"])
def test_jitter_of_a_few_seconds_is_snapped_to_the_grid(step):
    s, exact = _jittered(step, 400)
    assert ((s.index - exact.index) != pd.Timedelta(0)).any()
    clean = clean_series(s)
    assert clean.step == pd.Timedelta(step)
    pd.testing.assert_series_equal(clean.values, exact, check_names=False, check_freq=False)
    moved = [w for w in clean.warnings if "moved to the nearest grid point" in w]
    assert len(moved) == 1 and len(clean.warnings) == 1, clean.warnings
    n = int(((s.index - exact.index) != pd.Timedelta(0)).sum())
    largest = (s.index - exact.index).to_series().abs().max().total_seconds()
    assert f"{n} timestamps" in moved[0] and f"up to {largest:g} s" in moved[0]


def test_jitter_on_a_local_time_series_across_dst_and_with_a_gap():
    s, exact = _jittered("15min", 96 * 12, tz="Europe/Paris", start="2024-03-25", seed=3)
    s, exact = s.drop(s.index[100:104]), exact.drop(exact.index[100:104])
    clean = clean_series(s)
    assert clean.step == pd.Timedelta("15min")
    assert clean.values.isna().sum() == 4
    assert clean.values.index[0] == exact.index[0].tz_convert("UTC")
    np.testing.assert_array_equal(clean.values.dropna().to_numpy(), exact.to_numpy())
    assert any("missing intervals" in w for w in clean.warnings)


def test_millisecond_jitter_and_a_given_step():
    grid = pd.date_range("2024-01-01", periods=300, freq="15min", tz="UTC")
    rng = np.random.default_rng(1)
    idx = grid + pd.to_timedelta(rng.uniform(-4000, 4000, len(grid)).round(), unit="ms")
    s = pd.Series(np.arange(len(grid), dtype=float), index=idx)
    for given in (None, pd.Timedelta("15min")):
        clean = clean_series(s, step=given)
        assert clean.values.index.equals(grid) and clean.values.isna().sum() == 0
        np.testing.assert_array_equal(clean.values.to_numpy(), s.to_numpy())


def test_two_readings_snapping_onto_one_grid_point_are_averaged_like_duplicates():
    s, exact = _jittered("15min", 200)
    extra = pd.Series([50.0], index=[exact.index[10] + pd.Timedelta(seconds=4)])
    clean = clean_series(pd.concat([s, extra]))
    assert len(clean.values) == len(exact) and clean.values.isna().sum() == 0
    assert clean.values.iloc[10] == pytest.approx((exact.iloc[10] + 50.0) / 2)
    assert any("1 readings landed on a grid point that already had one" in w
               and "averaged" in w for w in clean.warnings), clean.warnings


def test_readings_beyond_the_tolerance_follow_the_off_grid_rule_and_are_named():
    s, exact = _jittered("15min", 200)
    late = exact.index[20] + pd.Timedelta(minutes=4)   # 4 min > 90 s: not jitter
    s = s.drop(s.index[20])
    s[late] = 77.0
    s = s.sort_index()
    clean = clean_series(s)
    # averaged into the interval that contains it (the rule for any off-grid reading)
    assert clean.values.iloc[20] == 77.0
    far = [w for w in clean.warnings if "more than 90 s off" in w]
    assert len(far) == 1, clean.warnings
    assert "1 timestamps" in far[0] and late.isoformat() in far[0] and "77" in far[0]
    assert "averaged into the interval that contains them" in far[0]


def test_jitter_too_large_to_tell_a_grid_is_refused():
    # stamps wandering by up to ±4 min around a 15-min grid: most are farther from it
    # than the 90 s tolerance, so no grid can be trusted: refused, naming one of them
    grid = pd.date_range("2024-01-01", periods=200, freq="15min", tz="UTC")
    rng = np.random.default_rng(2)
    idx = grid + pd.to_timedelta(rng.uniform(-240, 240, len(grid)).round(1), unit="s")
    s = pd.Series(np.arange(200.0), index=idx)
    with pytest.raises(InputError, match="on no regular grid") as err:
        clean_series(s, name="meter.csv")
    text = str(err.value)
    assert text.startswith("meter.csv:") and "0 days 00:15:00" in text and "90 s" in text
    first = int(np.flatnonzero(abs(idx - grid) > pd.Timedelta(seconds=90))[0])
    assert f"first {idx[first].isoformat()}, value {first:g}" in text


def test_regular_series_are_untouched():
    grid = pd.date_range("2024-01-01 00:07", periods=300, freq="15min", tz="UTC")
    s = pd.Series(np.arange(300, dtype=float), index=grid)
    clean = clean_series(s)
    assert clean.values.index.equals(grid) and not clean.warnings
    seven = pd.date_range("2024-01-01", periods=50, freq="7min", tz="UTC")
    with pytest.raises(InputError, match="does not divide a day"):
        clean_series(pd.Series(1.0, index=seven))


def test_forecast_from_a_jittered_history_starts_at_the_origin():
    from derms.forecast import ForecastWarning, forecast_quantiles

    s, exact = _jittered("1h", 30 * 24, seed=5)
    origin = exact.index[-1] + pd.Timedelta("1h")
    # the origin's own reading, stamped 2 s early: before the origin, but not history
    s[origin - pd.Timedelta(seconds=2)] = 1e6
    with pytest.warns(ForecastWarning, match="moved to the nearest grid point"):
        fc = forecast_quantiles(s, kind="load", origin=origin, n_rounds=10)
    assert fc.index[0] == origin and len(fc) == 24
    assert fc["p50"].max() < 1e3


def test_constraint_forecast_default_origin_is_on_the_grid():
    from derms.cli.constraints_cmd import _parse_origin

    load, exact = _jittered("15min", 200, seed=6)
    pv, _ = _jittered("15min", 200, seed=7)
    assert _parse_origin(None, load, pv) == exact.index[-1] + pd.Timedelta("15min")
