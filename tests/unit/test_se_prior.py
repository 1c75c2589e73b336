"""Prior-scale calibration (derms.analysis.se_prior) against a brute-force likelihood.

The reference minimises the exact Gaussian negative log-likelihood
``1/2 (log det C + d^T C^-1 d)``, ``C = beta A + R``, over a fine grid of ``beta`` with a
Cholesky factorisation per point; the calibration's truncated spectrum (top eigenpairs +
second-order tail) must land on the same ``beta``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

from derms.analysis import se_prior
from derms.analysis.se_prior import (
    BETA_MAX,
    BETA_MIN,
    PRIOR_SD_LOG_BETA,
    ScaleTracker,
    calibrate_prior,
)


def _problem(seed: int, m: int = 300, n: int = 600, beta_true: float = 0.3):
    """A = G G^T with a spectrum like a feeder's (a few large directions, a long small tail)."""
    rng = np.random.default_rng(seed)
    scales = np.r_[30.0, 12.0, 5.0, np.geomspace(2.0, 0.01, n - 3)]
    g = rng.standard_normal((m, n)) * scales[None, :] / np.sqrt(m)
    r = rng.uniform(0.5, 2.0, m)
    a = g @ g.T
    d = np.linalg.cholesky(beta_true * a + np.diag(r)) @ rng.standard_normal(m)
    return a, r, d


def _brute_force_beta(a, r, d) -> float:
    grid = np.exp(np.linspace(np.log(BETA_MIN), np.log(BETA_MAX), 1500))
    nll = []
    for b in grid:
        c = sla.cho_factor(b * a + np.diag(r), lower=True)
        logdet = 2 * np.sum(np.log(np.diag(c[0])))
        nll.append(0.5 * (logdet + d @ sla.cho_solve(c, d)))
    return float(grid[int(np.argmin(nll))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_exact_maximum_likelihood(seed, monkeypatch):
    a, r, d = _problem(seed)
    got = calibrate_prior(np.tril(a), r, d)
    ref = _brute_force_beta(a, r, d)
    # top eigenpairs + moment-matched rest, on a flatter spectrum than a feeder's: within
    # a tenth, a fraction of the estimate's own uncertainty (sd of log beta ~ 0.35 here)
    assert got.beta_ml == pytest.approx(ref, rel=0.1)
    assert not got.at_bound and 0 < got.sd_log_beta < 1
    w = se_prior.PRIOR_SD_LOG_BETA**2 / (se_prior.PRIOR_SD_LOG_BETA**2 + got.sd_log_beta**2)
    want = np.exp(w * np.log(got.beta_ml) - se_prior.SHADE_SD * w * np.sqrt(w) * got.sd_log_beta)
    assert got.beta == pytest.approx(want)
    monkeypatch.setattr(se_prior, "K_TOP", 100)  # >= m / 3: the exact spectrum
    assert calibrate_prior(np.tril(a), r, d).beta_ml == pytest.approx(ref, rel=0.01)


def test_the_scale_used_leans_on_the_sigmas_given_as_the_data_say_less():
    """Lots of rows: the scale used follows the data; few informative rows: it stays
    nearer the sigmas as given (the prior on log beta weighs more)."""
    a, r, d = _problem(5, beta_true=0.05)
    rich = calibrate_prior(np.tril(a), r, d)
    a, r, d = _problem(5, m=60, n=60, beta_true=0.05)
    poor = calibrate_prior(np.tril(a), r, d)
    assert poor.sd_log_beta > rich.sd_log_beta
    share = [np.log(x.beta) / np.log(x.beta_ml) for x in (rich, poor)]  # how far it follows
    assert share[0] > share[1]


def test_recovers_the_true_scale_on_average():
    betas = [calibrate_prior(np.tril(a), r, d).beta_ml
             for a, r, d in (_problem(s, beta_true=4.0) for s in range(20))]
    assert np.exp(np.mean(np.log(betas))) == pytest.approx(4.0, rel=0.15)


def test_one_gross_error_moves_it_less_than_its_own_uncertainty(monkeypatch):
    a, r, d = _problem(3)
    clean = calibrate_prior(np.tril(a), r, d)
    bad = d.copy()
    bad[17] += 200 * np.sqrt(r[17] + 0.3 * a[17, 17])  # a meter 200 sigma off
    got = calibrate_prior(np.tril(a), r, bad).beta_ml
    assert abs(np.log(got / clean.beta_ml)) < clean.sd_log_beta
    monkeypatch.setattr(se_prior, "CLIP_SIGMAS", np.inf)  # the guard is what holds it
    assert calibrate_prior(np.tril(a), r, bad).beta_ml > 10 * clean.beta_ml


def test_bounds_hold_when_the_innovation_is_pure_noise():
    a, r, _ = _problem(4)
    d = np.sqrt(r) * np.random.default_rng(9).standard_normal(r.size) * 0.3  # below noise
    got = calibrate_prior(np.tril(a), r, d)
    assert got.beta_ml == pytest.approx(BETA_MIN, rel=0.01) and got.at_bound
    assert BETA_MIN <= got.beta < 1.0  # pulled toward the sigmas given, never out of bounds


def test_tracker_widens_between_snapshots_and_ignores_bad_posteriors():
    t = ScaleTracker(drift_sd=0.1)
    assert t.prior() == (0.0, pytest.approx(PRIOR_SD_LOG_BETA))  # capped at the default
    t.update(-1.0, 0.2)
    assert t.prior() == (-1.0, pytest.approx(np.hypot(0.2, 0.1)))
    for bad in ((np.nan, 0.2), (-1.0, 0.0), (-1.0, np.inf)):
        t.update(*bad)
    assert (t.mean, t.sd, t.n_updates) == (-1.0, 0.2, 1)
    t.reset()
    assert (t.mean, t.sd, t.n_updates) == (0.0, PRIOR_SD_LOG_BETA, 0)


def test_tracked_snapshots_pin_the_scale_better_than_one():
    """Snapshots of one feeder-like problem (beta 0.3, i.e. the sigma given 1.8x too wide):
    started from each previous posterior, the scale used scatters far less from snapshot to
    snapshot than what single snapshots give, stays near the truth, and its posterior sd
    shrinks below one snapshot's."""
    t = ScaleTracker(drift_sd=0.05)
    alone, tracked = [], []
    for seed in range(12):
        a, r, d = _problem(seed, m=200, n=400, beta_true=0.3)
        one = calibrate_prior(np.tril(a), r, d)
        got = calibrate_prior(np.tril(a), r, d, prior=t.prior())
        t.update(got.log_beta_post, got.sd_log_beta_post)
        alone.append(np.log(one.beta))
        tracked.append(np.log(got.beta))
    assert np.std(tracked[6:]) < 0.5 * np.std(alone[6:])
    assert abs(np.mean(tracked[6:]) - np.log(0.3)) < 0.25  # the tail's bias, not the spread
    assert t.sd < 0.5 * one.sd_log_beta_post
    assert t.n_updates == 12


def test_measurements_that_do_not_see_the_prior_keep_it():
    """A = 0: the likelihood is flat in beta; the prior's mean is used, unshaded, and
    nothing claims a bound."""
    m = 80
    got = calibrate_prior(np.zeros((m, m)), np.ones(m), np.random.default_rng(1).normal(size=m),
                          prior=(np.log(0.4), 0.2))
    assert got.beta == pytest.approx(0.4) and not got.at_bound
    assert np.isinf(got.sd_log_beta) and got.sd_log_beta_post == 0.2


def test_a_bad_prior_on_the_scale_is_refused():
    a, r, d = _problem(0)
    with pytest.raises(ValueError, match="prior on log beta"):
        calibrate_prior(np.tril(a), r, d, prior=(0.0, 0.0))
