"""Weather files with a few seconds of clock jitter: the series' rule, on the weather grid."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from derms.errors import InputError
from derms.forecast import ForecastWarning, clean_weather, forecast_quantiles
from derms.forecast.features import _align
from derms.studies.series_files import read_weather_csv


def _weather_csv(path, index: pd.DatetimeIndex, frame: pd.DataFrame):
    """``frame``'s columns written at the timestamps ``index`` (ISO 8601, UTC, whole s)."""
    out = frame.set_axis(index.strftime("%Y-%m-%dT%H:%M:%SZ")).rename_axis("timestamp")
    out.round(3).to_csv(path)
    return path


def _jittered(step: str, n: int, seconds: int = 5, seed: int = 0):
    """(jittered timestamps, exact grid, values): temperature and GHI, whole-second
    jitter uniform in [-seconds, seconds]."""
    grid = pd.date_range("2024-03-01", periods=n, freq=step, tz="UTC")
    rng = np.random.default_rng(seed)
    jitter = pd.to_timedelta(rng.integers(-seconds, seconds + 1, n), unit="s")
    hour = grid.hour.to_numpy() + grid.minute.to_numpy() / 60
    values = pd.DataFrame({"temp_air": (10 + 5 * np.sin(hour / 24 * 2 * np.pi)).round(3),
                           "ghi": np.clip(800 * np.sin((hour - 6) / 12 * np.pi), 0, None
                                          ).round(3)})
    return grid + jitter, grid, values


@pytest.mark.parametrize("step", ["15min", "1h"])
def test_weather_file_with_seconds_of_jitter_lands_on_its_grid(tmp_path, step):
    stamped, grid, values = _jittered(step, 500)
    wx = read_weather_csv(_weather_csv(tmp_path / "wx.csv", stamped, values))
    clean, warned = clean_weather(wx)
    pd.testing.assert_frame_equal(clean, values.set_axis(grid), check_freq=False)
    assert len(warned) == 1, warned
    n = int((stamped != grid).sum())
    largest = (stamped - grid).to_series().abs().max().total_seconds()
    assert warned[0] == (f"weather: {n} timestamps up to {largest:g} s off the "
                         f"{pd.Timedelta(step)} grid (clock jitter, tolerance "
                         f"±{pd.Timedelta(step).total_seconds() / 10:g} s) were moved to "
                         "the nearest grid point")
    # and so the model sees each hour's own values (before: floored a step early, say
    # 01:00 stamped 00:59:57 averaged into 00:00, and 01:00 interpolated)
    times = pd.date_range(grid[0], grid[-1], freq="15min")
    for col in values:
        np.testing.assert_array_equal(_align(clean[col], times, pd.Timedelta("15min")),
                                      _align(values[col].set_axis(grid), times,
                                             pd.Timedelta("15min")))


def test_weather_readings_beyond_the_tolerance_follow_the_series_rule(tmp_path):
    stamped, grid, values = _jittered("1h", 300)
    stamped = stamped.delete(40).insert(40, grid[40] + pd.Timedelta(minutes=20))  # > 6 min
    wx = read_weather_csv(_weather_csv(tmp_path / "wx.csv", stamped, values))
    clean, warned = clean_weather(wx, "wx.csv")
    # averaged into the hour that contains it (alone there: its own values)
    pd.testing.assert_frame_equal(clean, values.set_axis(grid), check_freq=False)
    far = [w for w in warned if "more than 360 s off" in w]
    assert len(far) == 1 and len(warned) == 2, warned
    row = values.iloc[40]
    assert far[0] == (f"wx.csv: 1 timestamps more than 360 s off the 0 days 01:00:00 grid "
                      f"(first {stamped[40].isoformat()}, values temp_air={row.temp_air:g}, "
                      f"ghi={row.ghi:g}) were averaged into the interval that contains them")


def test_weather_readings_snapping_onto_one_point_are_averaged():
    stamped, grid, values = _jittered("15min", 200)
    wx = values.set_axis(stamped)
    extra = pd.DataFrame({"temp_air": [99.0], "ghi": [1.0]},
                         index=[grid[7] - pd.Timedelta(seconds=3)])
    if extra.index[0] == stamped[7]:
        extra.index = [grid[7] + pd.Timedelta(seconds=3)]
    clean, warned = clean_weather(pd.concat([wx, extra]).sort_index())
    assert clean.index.equals(grid)
    assert clean.iloc[7].tolist() == pytest.approx(((values.iloc[7] + [99.0, 1.0]) / 2).tolist())
    assert any("1 readings landed on a grid point that already had one" in w for w in warned)


def test_weather_mostly_off_any_grid_is_refused():
    grid = pd.date_range("2024-03-01", periods=200, freq="15min", tz="UTC")
    rng = np.random.default_rng(2)
    idx = grid + pd.to_timedelta(rng.uniform(-240, 240, len(grid)).round(), unit="s")
    wx = pd.DataFrame({"temp_air": np.arange(200.0)}, index=idx)
    with pytest.raises(InputError, match="on no regular grid") as err:
        clean_weather(wx, "wx.csv")
    first = int(np.flatnonzero(abs(idx - grid) > pd.Timedelta(seconds=90))[0])
    assert str(err.value).startswith("wx.csv:")
    assert f"first {idx[first].isoformat()}, value temp_air={first:g}" in str(err.value)


def test_regular_weather_is_returned_as_given():
    _, grid, values = _jittered("1h", 100)
    for wx in (values.set_axis(grid),                       # regular
               values.set_axis(grid).drop(grid[10:20]),     # with a gap
               values.set_axis(grid.tz_convert("Europe/Paris")),
               values.set_axis(pd.date_range("2024-03-01", periods=100, freq="7min",
                                             tz="UTC")),    # a step not dividing a day
               values.set_axis(grid)[:2]):                  # too few to tell
        clean, warned = clean_weather(wx)
        assert clean is wx and warned == []


def test_forecast_with_jittered_weather_equals_the_exact_one():
    idx = pd.date_range("2024-01-01", periods=30 * 24, freq="h", tz="UTC")
    rng = np.random.default_rng(5)
    load = pd.Series(50 + 10 * np.sin(idx.hour.to_numpy() / 24 * 2 * np.pi)
                     + rng.normal(0, 1, len(idx)), index=idx)
    origin = idx[-24]
    stamped, grid, values = _jittered("1h", 30 * 24, seed=6)
    exact = forecast_quantiles(load, kind="load", origin=origin, n_rounds=10,
                               weather=values.set_axis(grid))
    with pytest.warns(ForecastWarning, match="weather: .* moved to the nearest grid point"):
        jittered = forecast_quantiles(load, kind="load", origin=origin, n_rounds=10,
                                      weather=values.set_axis(stamped))
    pd.testing.assert_frame_equal(jittered, exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForecastWarning)   # regular weather: no word
        forecast_quantiles(load, kind="load", origin=origin, n_rounds=10,
                           weather=values.set_axis(grid))
