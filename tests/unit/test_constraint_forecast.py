"""Scenario construction of constraint forecasts (pure: no engine)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from derms.analysis.constraint_scenarios import (
    build_scenarios,
    level_weights,
    quantile_levels,
)
from derms.errors import InputError

T = pd.date_range("2026-07-01", periods=8, freq="15min", tz="UTC")


def _q(p10, p50, p90):
    return pd.DataFrame({"p10": p10, "p50": p50, "p90": p90}, index=T)


def test_level_weights_are_swanson_for_p10_p50_p90():
    assert np.allclose(level_weights(np.array([0.1, 0.5, 0.9])), [0.3, 0.4, 0.3])
    assert np.isclose(level_weights(np.array([0.05, 0.25, 0.5, 0.75, 0.95])).sum(), 1.0)
    assert np.allclose(level_weights(np.array([0.5])), [1.0])


def test_grid_has_every_combination_with_product_weights():
    sc = build_scenarios(_q(0.3, 0.5, 0.7), _q(0.0, 0.4, 0.9))
    assert sc.n_scenarios == 9 and np.isclose(sc.weight.sum(), 1.0)
    # high PV + low load (overvoltage) and low PV + high load (undervoltage/thermal) exist
    i = sc.label.index("load p10 / pv p90")
    assert np.allclose(sc.load_mult[i], 0.3) and np.allclose(sc.pv_pu[i], 0.9)
    assert np.isclose(sc.weight[i], 0.09)
    assert sc.load_mult.shape == (9, len(T), 1) and len(np.unique(sc.load_id)) == 3


def test_crossing_quantiles_are_sorted_and_groups_move_together():
    sc = build_scenarios({"res": _q(0.6, 0.5, 0.7), "com": _q(0.1, 0.2, 0.3)},
                         _q(0.1, 0.2, 0.3))
    lo = sc.label.index("load p10 / pv p50")
    assert np.allclose(sc.load_mult[lo, :, 0], 0.5) and np.allclose(sc.load_mult[lo, :, 1], 0.1)


def test_copula_samples_match_the_quantiles():
    sc = build_scenarios(_q(0.3, 0.5, 0.7), _q(0.2, 0.4, 0.6), method="copula",
                         n_samples=4000, seed=1)
    pv = sc.pv_pu[:, 0]
    assert np.isclose(np.quantile(pv, 0.1), 0.2, atol=0.02)
    assert np.isclose(np.median(pv), 0.4, atol=0.02)
    assert np.isclose(np.quantile(pv, 0.9), 0.6, atol=0.02)
    assert (sc.pv_pu >= 0).all() and np.isclose(sc.weight.sum(), 1.0)
    # AR(1) in time: neighbouring steps of one path are strongly correlated
    assert np.corrcoef(sc.pv_pu[:, 0], sc.pv_pu[:, 1])[0, 1] > 0.9


@pytest.mark.parametrize("bad, match", [
    (pd.DataFrame({"q10": [1.0]}, index=T[:1]), "not a quantile column"),
    (pd.DataFrame({"p50": [1.0]}, index=T[:1].tz_localize(None)), "timezone-aware"),
    (pd.DataFrame({"p50": [-1.0]}, index=T[:1]), "negative value"),
    (pd.DataFrame({"p50": [np.nan]}, index=T[:1]), "non-finite"),
])
def test_bad_quantile_frames_are_named(bad, match):
    with pytest.raises(InputError, match=match):
        build_scenarios(bad, bad)


def test_misaligned_load_and_pv_forecasts_are_rejected():
    with pytest.raises(InputError, match="timestamps differ"):
        build_scenarios(_q(1, 1, 1).iloc[:4], _q(0, 0, 0))
    with pytest.raises(InputError, match="expected 'grid' or 'copula'"):
        build_scenarios(_q(1, 1, 1), _q(0, 0, 0), method="mc")
    assert list(quantile_levels(_q(1, 1, 1), "x")) == [0.1, 0.5, 0.9]


def test_normalisers_use_only_the_history_before_the_origin():
    """A forecast at an origin inside the history must not see later data: a load that
    grows 60 % after the origin (or a brighter PV summer) changed the multipliers of the
    forecast made before it (found by an independent test with --origin)."""
    from derms.analysis.constraint_forecast import normalise_histories

    t = pd.date_range("2026-01-01", periods=20, freq="h", tz="UTC")
    load = pd.Series(np.r_[np.full(10, 100.0), np.full(10, 160.0)], index=t)
    pv = pd.Series(np.r_[np.full(10, 5.0), np.full(10, 50.0)], index=t)
    origin = t[10]
    lm, pu = normalise_histories(load, pv, before=origin)
    assert np.allclose(lm[lm.index < origin], 1.0)
    assert np.allclose(pu[pu.index < origin], 1.0)
    lm_all, _ = normalise_histories(load, pv)           # no origin: the whole history
    assert np.isclose(lm_all.iloc[0], 100.0 / 160.0)
    with pytest.raises(InputError, match="no values before the origin"):
        normalise_histories(load, pv, before=t[0])


def test_infinite_history_values_are_named():
    """An Infinity in the load history said "its peak must be positive, got inf"."""
    from derms.analysis.constraint_forecast import normalise_histories

    t = pd.date_range("2026-01-01", periods=5, freq="h", tz="UTC")
    load = pd.Series([1.0, 2.0, np.inf, 1.0, 1.0], index=t)
    pv = pd.Series(np.ones(5), index=t)
    with pytest.raises(InputError, match=r"load history: value inf at 2026-01-01T02:00:00\+00:00"
                       r" is not finite"):
        normalise_histories(load, pv)
