"""Intraday error feedback: weights from the history's day-over-day persistence, the
observed error carried into the next leads, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from derms.errors import InputError
from derms.forecast.feedback import ErrorFeedback, deviation_acf

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
