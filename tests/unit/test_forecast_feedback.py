"""Intraday error feedback: weights from the history's day-over-day persistence, the
observed error carried into the next leads, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from derms.errors import InputError
from derms.forecast.feedback import ErrorFeedback, deviation_acf, deviation_regression

N_DAY = 96


def _series(days: int, phi: float, seed: int = 0) -> np.ndarray:
    """A daily shape plus an AR(1) deviation (per 15 min) that persists within days."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * N_DAY)
    shape = 100 + 30 * np.sin(2 * np.pi * t / N_DAY)
    dev = np.zeros(t.size)
    for i in range(1, t.size):
        dev[i] = phi * dev[i - 1] + rng.normal(0, 2.0)
    return shape + dev


def test_weights_follow_the_persistence_of_the_day_over_day_change():
    slow, fast = _series(60, 0.99), _series(60, 0.8)
    r_slow = deviation_acf(slow, N_DAY, 24)
    r_fast = deviation_acf(fast, N_DAY, 24)
    assert r_slow[0] == pytest.approx(1.0)
    assert np.all(np.diff(r_slow) <= 1e-12) and np.all((r_slow >= 0) & (r_slow <= 1))
    # AR(1) deviation: the day-over-day change keeps ≈ phi^k (within sampling error)
    assert r_slow[4] == pytest.approx(0.99 ** 4, abs=0.08)
    assert r_fast[4] < 0.6 and r_slow[12] > r_fast[12]


def test_a_level_error_seen_now_is_carried_into_the_next_leads():
    fb = ErrorFeedback.fit(_series(30, 0.99), N_DAY, N_DAY)
    truth = np.full(40, 115.0)             # a day 15 % above what the model expects
    forecast = np.full(40, 100.0)
    out = fb.adjust(forecast, actual_recent=np.full(4, 115.0),
                    forecast_recent=np.full(4, 100.0))
    assert np.abs(out - truth).mean() < 0.5 * np.abs(forecast - truth).mean()
    assert out[0] > out[-1] >= forecast[-1]           # decays with the lead, never overshoots
    # nothing observed (gaps): unchanged; leads beyond the weights: unchanged
    same = fb.adjust(forecast, np.full(4, np.nan), np.full(4, 100.0))
    np.testing.assert_array_equal(same, forecast)
    short = ErrorFeedback(np.array([1.0, 0.5]))
    np.testing.assert_allclose(short.adjust(np.zeros(4), [2.0], [0.0]), [2.0, 1.0, 0.0, 0.0])


def test_too_short_or_empty_history_is_a_clear_error():
    with pytest.raises(InputError, match="two days"):
        ErrorFeedback.fit(np.ones(150), N_DAY, 10)
    with pytest.raises(InputError, match="valid"):
        ErrorFeedback.fit(np.full(5 * N_DAY, np.nan), N_DAY, 10)
    flat = deviation_acf(np.ones(5 * N_DAY), N_DAY, 10)   # constant series: no feedback
    np.testing.assert_array_equal(flat, np.zeros(11))


def test_positive_series_get_a_relative_correction_net_load_an_additive_one():
    load = _series(30, 0.99)
    assert ErrorFeedback.fit(load, N_DAY, 8).relative
    assert not ErrorFeedback.fit(load - 100.0, N_DAY, 8).relative   # changes sign
    rel = ErrorFeedback(np.ones(4), relative=True)
    # 10 % above the forecast now: every lead scaled by 1.1 (a ratio, not +10 kW)
    np.testing.assert_allclose(rel.adjust(np.array([100.0, 50.0, 20.0, 10.0]), [110.0],
                                          [100.0]), [110.0, 55.0, 22.0, 11.0])
    # a non-positive reading cannot give a ratio: left out
    np.testing.assert_allclose(rel.adjust(np.array([100.0]), [0.0, 121.0], [100.0, 110.0]),
                               [110.0])


_G_KNOTS = ([0, 8, 15, 18, 20, 24], [0.0, 0.3, 1.0, 1.0, 0.0, 0.0])


def _g(hour):
    """Share of a hot day's excess at each hour: grows 08:00-15:00, gone by 20:00."""
    return np.interp(np.asarray(hour, dtype=float) % 24, *_G_KNOTS)


def _afternoon_days(days: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(series, daily shape): days whose deviation is a random level per day times
    :func:`_g` (a hot day's cooling load), relative to a daily shape."""
    rng = np.random.default_rng(seed)
    hour = np.arange(N_DAY) / 4.0
    shape = 100 + 30 * np.sin(2 * np.pi * (hour - 6) / 24)
    level = rng.normal(0.0, 0.1, days)
    y = (shape[None, :] * (1 + level[:, None] * _g(hour)[None, :])
         * (1 + rng.normal(0, 0.002, (days, N_DAY))))
    return y.ravel(), shape


def test_per_time_of_day_weights_grow_into_the_afternoon_and_fade_by_the_evening():
    y, shape = _afternoon_days(60)
    beta = deviation_regression(y, N_DAY, N_DAY, m_recent=4, relative=True)
    assert np.all((beta >= 0) & (beta <= 2.0))
    for h0, lead_h in ((12, 2), (10, 4), (15, 2)):
        expect = _g(h0 + lead_h) / _g(h0 - 1 + np.arange(4) / 4).mean()   # last hour
        assert beta[h0 * 4, lead_h * 4] == pytest.approx(min(expect, 2.0), abs=0.15)
    assert beta[9 * 4, 5 * 4] > 1.5                       # 09:00 -> 14:00: it grows
    assert beta[17 * 4, 4 * 4] < 0.1                      # 17:00 -> 21:00: it is gone
    # a 15 % hotter day seen at 17:00: the per-time-of-day weights do not carry it into
    # the night; the whole-day autocorrelation does
    fb = ErrorFeedback.fit(y, N_DAY, N_DAY, by_phase_recent=4)
    assert fb.rho_by_phase is not None and fb.relative
    o = 17 * 4
    day = np.r_[shape, shape]
    truth = day * (1 + 0.15 * _g(np.arange(2 * N_DAY) / 4.0))
    fc = day[o:o + N_DAY]
    glob = fb.adjust(fc, truth[o - 4:o], day[o - 4:o])
    byph = fb.adjust(fc, truth[o - 4:o], day[o - 4:o], phase=o)
    night = slice(16, 28)                                # 21:00-24:00
    actual = truth[o:o + N_DAY]
    assert np.abs(byph - actual)[night].mean() < 0.5 * np.abs(glob - actual)[night].mean()
    # and inside the afternoon it still corrects (17:00-18:00 keeps the excess)
    assert np.abs(byph - actual)[:4].mean() < 0.3 * np.abs(fc - actual)[:4].mean()


def test_per_time_of_day_weights_need_two_days():
    with pytest.raises(InputError, match="two days"):
        deviation_regression(np.ones(150), N_DAY, 10, m_recent=4)
