"""Calibrating the pseudo-measurement (prior) uncertainty of a state estimate from the data.

A WLS state estimate with pseudo-measurements is a Gaussian prior ``x ~ N(x_p, P)`` updated
by measurements ``z = h(x) + e``, ``e ~ N(0, R)``. The prior's spread is rarely known: a
utility's profiles may be 10 % or 50 % off a customer's load at a given instant, and an
overstated spread lets each meter's noise move its own load (IEEE 8500, voltages only:
0.0175 pu largest error with a 50 % prior on an 11.5 % truth, 0.0056 pu with the right one).

Here the prior covariance is scaled, ``P -> beta P``. The data's estimate of ``beta`` is
its maximum-likelihood value given the innovation at the prior,
``d = z - h(x_p) ~ N(0, beta A + R)`` with ``A = H P H^T`` (type-II maximum likelihood,
"empirical Bayes"; one variance component).
Whitened by ``R^-1/2`` and rotated onto the eigenvectors of ``R^-1/2 A R^-1/2``
(eigenvalues ``lam``, rotated innovation ``e``), the negative log-likelihood is::

    NLL(beta) = 1/2 sum_i [ log(beta lam_i + 1) + e_i^2 / (beta lam_i + 1) ]

Only a few directions carry information on ``beta`` (``beta lam_i`` not small: the feeder
aggregate and the customers with long service drops), so the ``K_TOP`` largest eigenpairs
are found by a randomised range finder (seeded, deterministic) and the remaining
directions are replaced by ``n_t`` equal ones that match their first two spectral moments
(``sum lam = tr A~ - sum lam_top``, ``sum lam^2 = |A~|_F^2 - sum lam_top^2``) and their
innovation's ``sum lam e^2 = e~^T A~ e~ - ...``: the same form as the exact sum, so it
stays bounded at any ``beta``. ``O(m^2 K_TOP)`` work instead of a full eigen-decomposition
(IEEE 8500, ``m`` = 1,186: ≈ 0.05 s against 0.32 s), and ``beta`` within 3 % of the exact
maximum on IEEE 8500's steep spectrum (3 seeds); on flatter synthetic spectra up to 0.23
in ``log beta`` off (about 2 Fisher sds; a second-order Taylor tail was worse). Feeders
with fewer than ``3 K_TOP`` rows get the exact spectrum. The 1-D minimum is bounded to
``[BETA_MIN, BETA_MAX]``.

The information is limited, and how much depends on the feeder: the Fisher standard
deviation of ``log beta`` is 0.25-0.35 on IEEE 8500 (voltages at all 1,177 service
transformers) but 0.6-0.8 on IEEE 34/37, EPRI ckt5/ckt7/ckt24, so one snapshot pins the
sigma scale to ±15 % on one feeder and only to a factor 1.5-2 on others. The scale is
therefore the posterior of ``log beta`` under a prior centred on the sigmas as given
(standard deviation ``PRIOR_SD_LOG_BETA`` = 0.7: the given variance right to within a
factor 2 at one sd): where the data say little, it stays near what the caller gave. The
loss of a wrong scale is not symmetric on the large feeders (an overstated prior lets
each meter's noise move its own load), so the posterior mean is shaded down by
``SHADE_SD`` = 1 posterior standard deviation times the data's share ``w`` of the
posterior (``w = s0^2 / (s0^2 + sd^2)``): a snapshot that says nothing (measurements that
do not see the loads at all) leaves the prior's mean as it was, unshaded.

Measured (voltages only, sigma = 1 %, 5 seeds, largest node error; truth = base x
U(1 - s, 1 + s); "given" = the sigma passed, taken as is; "right" = the truth's sd as
given; reproduced by bench/bench_state_estimation.py and bench/bench_se_feeders.py):

* IEEE 8500, s = 0.2 / 0.3 / 0.5, from 30 %: 0.0056 / 0.0078 / 0.0131 pu (right: 0.0056 /
  0.0078 / 0.0123; 30 % given: 0.0104 / 0.0110 / 0.0123; 50 % given: 0.0175 / 0.0179 /
  0.0187).
* s = 0.3, 30 % given: IEEE 34 0.0101 (given 0.0083, right 0.0093), IEEE 37 0.0035
  (0.0028 / 0.0034), ckt5 0.0068 (0.0071 / 0.0062), ckt7 0.0136 (0.0144 / 0.0136), ckt24
  0.0166 (0.0189 / 0.0125).
* s = 0.2, 50 % given: IEEE 34 0.0081 (given 0.0077, right 0.0085), IEEE 37 0.0026
  (0.0041 / 0.0028), ckt5 0.0083 (0.0090 / 0.0041), ckt7 0.0096 (0.0134 / 0.0092), ckt24
  0.0176 (0.0233 / 0.0087).

Without the prior on ``log beta`` (pure maximum likelihood, shaded), IEEE 34 got 0.0158
and IEEE 37 0.0043 at s = 0.3: the scale followed a noisy estimate far down. Shading by
the whole posterior sd instead of the data's share of it gave ckt5 0.0058 and ckt24
0.0163 at s = 0.2 from 50 % (IEEE 8500 unchanged), but cut an uninformed scale by 30 %.

A monitoring loop estimates the same feeder again and again, and the loads' spread around
their profiles changes slowly: :class:`ScaleTracker` starts each snapshot from the last
one's posterior (widened by a random-walk drift) instead of from the sigmas as given, so
the scale is pinned by many snapshots. Ten snapshots in a row (s = 0.2, 50 % given;
largest error of each snapshot, max over the last five, calibrated alone / tracked;
``bench/bench_se_feeders.py --track 10``): IEEE 8500 0.0058 / 0.0051 pu, IEEE 37 0.0036 /
0.0026, ckt5 0.0107 / 0.0067, ckt7 0.0196 / 0.0152, ckt24 0.0173 / 0.0149, IEEE 34 0.0074
both; the sigma used moves from 18-26 % (ckt5 36 %) at the first snapshot to 11-14 %
(ckt5 30 %) by the tenth (truth 11.5 %). On a ±50 % truth (IEEE 8500, 30 % given) it
settles at 23-25 % and the error stays at the information limit (0.0137 / 0.0136).

Gross errors (bad data) would inflate ``beta``: each whitened innovation is clipped at
``CLIP_SIGMAS`` of its own predicted standard deviation (first at ``beta = 1``, then twice
at the estimate); one meter 200 sigma off then moves the maximum-likelihood ``beta`` by
less than its own uncertainty (unclipped: to the bound). The largest-normalised-residual
test after the estimate still sees the full residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.optimize import minimize_scalar

#: Bounds on the variance scale (0.05x to 5x the given pseudo sigma).
BETA_MIN = 0.05**2
BETA_MAX = 5.0**2
#: A whitened innovation beyond this many predicted standard deviations counts as this many.
CLIP_SIGMAS = 3.0
#: Fewer measurement rows than this: the given sigmas are kept (too few to estimate from).
MIN_ROWS = 50
#: Eigenpairs taken exactly; the rest enter through their first two spectral moments.
K_TOP = 40
#: A priori the given sigmas are right to within this standard deviation of log beta
#: (0.7: the variance within a factor 2, the sigma within 1.4, at one sd).
PRIOR_SD_LOG_BETA = 0.7
#: The scale used is the posterior mean of log beta less SHADE_SD x w posterior sds (w: the
#: data's share of the posterior, so a snapshot that says nothing shades nothing).
SHADE_SD = 1.0
_OVERSAMPLE = 10
_NO_INFORMATION = 1e-12  # mean whitened prior variance per row below which A is nothing
_POWER_ITERATIONS = 2


@dataclass(frozen=True)
class PriorScale:
    """Outcome of :func:`calibrate_prior`: ``beta`` multiplies the prior variances
    (``sqrt(beta)`` the pseudo sigmas); ``beta_ml`` is the maximum-likelihood value and
    ``sd_log_beta`` its Fisher standard deviation (in ``log beta``); ``beta`` is the
    posterior mean of ``log beta`` (prior: the sigmas as given, ``PRIOR_SD_LOG_BETA``)
    shaded down by ``SHADE_SD`` x w posterior sds, w the data's share of the posterior
    (0 where the measurements do not see the prior: then ``beta`` is the prior's mean and
    ``sd_log_beta`` infinite); ``at_bound`` is True when a bound stopped the
    maximum-likelihood search."""

    beta: float
    beta_ml: float
    sd_log_beta: float
    at_bound: bool
    log_beta_post: float = 0.0
    sd_log_beta_post: float = PRIOR_SD_LOG_BETA


def calibrate_prior(a_lower: np.ndarray, r_diag: np.ndarray, d: np.ndarray,
                    prior: tuple[float, float] = (0.0, PRIOR_SD_LOG_BETA)) -> PriorScale:
    """Scale of the prior variance given the innovation ``d`` (module docstring).

    Parameters
    ----------
    a_lower : ndarray (m, m)
        Lower triangle of ``A = H P H^T`` in the rows' units squared (upper not read).
    r_diag : ndarray (m,)
        Measurement variances (diagonal of ``R``), in the rows' units squared.
    d : ndarray (m,)
        Innovation ``z - h(x_p)`` at the prior's AC solution, in the rows' units.
    prior : (mean, sd) of log beta
        What is believed before this snapshot: by default the sigmas as given, to within
        ``PRIOR_SD_LOG_BETA``; a :class:`ScaleTracker` passes what earlier snapshots said.
    """
    m0, s0 = float(prior[0]), float(prior[1])
    if not (np.isfinite(m0) and np.isfinite(s0) and s0 > 0):
        raise ValueError(f"prior on log beta must be finite with a positive sd, got {prior}")
    rs = 1.0 / np.sqrt(r_diag)
    e_w = d * rs
    if not float(np.sum((np.diag(a_lower) * rs) * rs)) > _NO_INFORMATION * max(rs.size, 1):
        # the measurements do not see the prior at all: nothing to learn, keep the prior
        return PriorScale(beta=float(np.exp(m0)), beta_ml=float(np.exp(m0)),
                          sd_log_beta=float("inf"), at_bound=False, log_beta_post=m0,
                          sd_log_beta_post=s0)
    spec = _Spectrum(a_lower, rs, min(K_TOP, rs.size))
    ae = spec.mul(e_w[:, None])[:, 0]
    beta = 1.0
    for _ in range(3):  # clip at beta = 1, then twice at the estimate
        lim = CLIP_SIGMAS * np.sqrt(beta * spec.diag + 1.0)
        e_c = np.clip(e_w, -lim, lim)
        beta = spec.ml_beta(e_c, spec.mul_changed(e_w, ae, e_c))
    sd = spec.sd_log_beta(beta)
    # posterior of log beta: the data's estimate (sd ``sd``) combined with the prior; the
    # shading is the data's share w of the posterior sd (none where the data say nothing)
    w = s0**2 / (s0**2 + sd**2)
    mean_post = m0 + w * (np.log(beta) - m0)
    sd_post = float(np.sqrt(w) * sd)  # = (1/s0^2 + 1/sd^2)^-1/2
    used = float(np.exp(mean_post - SHADE_SD * w * sd_post))
    at_bound = bool(beta <= BETA_MIN * 1.001 or beta >= BETA_MAX * 0.999)
    return PriorScale(beta=min(max(used, BETA_MIN), BETA_MAX), beta_ml=beta, sd_log_beta=sd,
                      at_bound=at_bound, log_beta_post=float(mean_post),
                      sd_log_beta_post=sd_post)


@dataclass
class ScaleTracker:
    """What successive snapshots of one feeder say about log beta (a monitoring loop).

    One snapshot pins the scale only loosely on most feeders (module docstring); the
    spread of the loads around their profiles changes slowly, so each estimate starts from
    the previous posterior, widened by ``drift_sd`` per snapshot (a random walk), instead
    of from the sigmas as given. ``prior()`` is what to pass to the next estimate;
    ``update(mean, sd)`` takes its posterior (``StateEstimate.prior_log_scale_post``).
    """

    mean: float = 0.0
    sd: float = PRIOR_SD_LOG_BETA
    drift_sd: float = 0.1
    n_updates: int = 0

    def prior(self) -> tuple[float, float]:
        """(mean, sd) of log beta before the next snapshot."""
        return self.mean, float(min(np.hypot(self.sd, self.drift_sd), PRIOR_SD_LOG_BETA))

    def update(self, mean: float, sd: float) -> None:
        """Take a snapshot's posterior (ignored unless finite with a positive sd)."""
        if np.isfinite(mean) and np.isfinite(sd) and sd > 0:
            self.mean, self.sd = float(mean), float(sd)
            self.n_updates += 1

    def reset(self) -> None:
        """Back to the sigmas as given (e.g. after the pseudo-load profiles change)."""
        self.mean, self.sd, self.n_updates = 0.0, PRIOR_SD_LOG_BETA, 0


def tril_inplace(a: np.ndarray, block: int = 64) -> np.ndarray:
    """Zero the strictly upper triangle of the square ``a`` in place; returns ``a``
    (``np.tril`` without its copy: a memset of the upper blocks)."""
    m = a.shape[0]
    for lo in range(0, m, block):
        hi = min(lo + block, m)
        a[lo:hi, hi:] = 0.0
        a[lo:hi, lo:hi][np.triu_indices(hi - lo, 1)] = 0.0
    return a


def _whiten_lower(a_lower: np.ndarray, rs: np.ndarray, block: int = 64) -> np.ndarray:
    """``diag(rs) A diag(rs)``'s lower triangle from ``A``'s (upper not read), upper zero:
    a fresh array, one pass over the lower half by row blocks."""
    m = a_lower.shape[0]
    at = np.empty((m, m))
    for lo in range(0, m, block):
        hi = min(lo + block, m)
        np.multiply(a_lower[lo:hi, :hi], rs[lo:hi, None], out=at[lo:hi, :hi])
        at[lo:hi, :hi] *= rs[None, :hi]
        at[lo:hi, hi:] = 0.0
        at[lo:hi, lo:hi][np.triu_indices(hi - lo, 1)] = 0.0
    return at


def _whitened_frob2(a_lower: np.ndarray, rs: np.ndarray, block: int = 64) -> float:
    """``|diag(rs) A diag(rs)|_F^2`` from ``A``'s lower triangle, by row blocks (no m x m
    temporary; the upper triangle is not read)."""
    m = a_lower.shape[0]
    lower, diag = 0.0, 0.0
    for lo in range(0, m, block):
        hi = min(lo + block, m)
        w = a_lower[lo:hi, :hi] * rs[lo:hi, None]
        w *= rs[None, :hi]
        w[:, lo:hi][np.triu_indices(hi - lo, 1)] = 0.0
        lower += float(np.einsum("ij,ij->", w, w))
        d = np.diagonal(w[:, lo:hi])
        diag += float(d @ d)
    return 2.0 * lower - diag


class _Spectrum:
    """Top eigenpairs of the whitened ``A~ = diag(rs) A diag(rs)`` (``A``'s lower triangle
    given, the upper not read; ``A~`` is never formed on large feeders: products scale
    their operand and result by ``rs``) and the first two spectral moments of the rest
    (``tr1`` = sum lam, ``tr2`` = sum lam^2)."""

    def __init__(self, a_lower: np.ndarray, rs: np.ndarray, k: int) -> None:
        m = a_lower.shape[0]
        self._a, self._rs = a_lower, rs
        self.diag = (np.diag(a_lower) * rs) * rs
        if k >= m // 3:  # small: the whole spectrum, exactly
            at = _whiten_lower(a_lower, rs)
            lam, u = np.linalg.eigh(at, UPLO="L")
            frob2 = 2.0 * float(np.sum(at * at)) - float(self.diag @ self.diag)
            k = m
        else:  # randomised range finder with power iterations (seeded: deterministic)
            rng = np.random.default_rng(0)
            q = np.linalg.qr(self.mul(rng.standard_normal((m, k + _OVERSAMPLE))))[0]
            for _ in range(_POWER_ITERATIONS):
                q = np.linalg.qr(self.mul(q))[0]
            lam, v = np.linalg.eigh(q.T @ self.mul(q))
            u = q @ v
            frob2 = _whitened_frob2(a_lower, rs)
        order = np.argsort(lam)[::-1][:k]
        self.lam_top = np.maximum(lam[order], 0.0)
        self.u_top = u[:, order]
        tr1 = max(float(self.diag.sum()) - float(self.lam_top.sum()), 0.0)
        tr2 = max(frob2 - float(self.lam_top @ self.lam_top), 0.0)
        # the rest as n_t equal directions matching its first two moments (sum lam, sum
        # lam^2): the same form as the exact sum, so it stays bounded at any beta
        scale = max(float(self.diag.sum()), 1e-300)
        small = k == m or tr1 <= 1e-12 * scale or tr2 <= 1e-24 * scale**2
        self.tr1 = tr1
        self.lam_t = 0.0 if small else tr2 / tr1
        self.n_t = 0.0 if small else tr1**2 / tr2

    def sd_log_beta(self, beta: float) -> float:
        """Fisher standard deviation of ``log beta`` at ``beta``."""
        x, x_t = beta * self.lam_top, beta * self.lam_t
        info = 0.5 * float(np.sum((x / (x + 1.0)) ** 2) + self.n_t * (x_t / (x_t + 1.0)) ** 2)
        return 1.0 / np.sqrt(max(info, 1e-12))

    def mul(self, x: np.ndarray) -> np.ndarray:
        """``A~ x`` for ``x`` (m, p)."""
        rs = self._rs[:, None]
        return rs * sla.blas.dsymm(1.0, self._a, rs * x, side=0, lower=1)

    def mul_changed(self, e: np.ndarray, ae: np.ndarray, e_new: np.ndarray) -> np.ndarray:
        """``A~ e_new`` from ``ae = A~ e`` where ``e_new`` differs from ``e`` in few
        entries (the clipped ones): their columns only, instead of a pass over ``A``."""
        idx = np.flatnonzero(e_new != e)
        if idx.size > max(1, e.size // 20):
            return self.mul(e_new[:, None])[:, 0]
        cols = np.empty((e.size, idx.size))
        for c, j in enumerate(idx):  # column j of the symmetric A from its lower triangle
            cols[j:, c] = self._a[j:, j]
            cols[:j, c] = self._a[j, :j]
        return ae + self._rs * (cols @ (self._rs[idx] * (e_new[idx] - e[idx])))

    def ml_beta(self, e_w: np.ndarray, ae: np.ndarray) -> float:
        """Minimiser of the negative log-likelihood for a whitened innovation ``e_w``
        (``ae = A~ e_w``)."""
        e_top = self.u_top.T @ e_w
        lam = self.lam_top
        s1 = max(float(e_w @ ae) - float(np.sum(lam * e_top**2)), 0.0)  # rest: sum lam e^2
        lam_t, n_t = self.lam_t, self.n_t
        e2_t = s1 / self.tr1 if n_t > 0 else 0.0  # the rest's innovation, matching s1

        def nll(t: float) -> float:
            b = np.exp(t)
            c = b * lam + 1.0
            c_t = b * lam_t + 1.0
            return 0.5 * float(np.sum(np.log(c) + e_top**2 / c)
                               + n_t * (np.log(c_t) + e2_t / c_t))

        r = minimize_scalar(nll, bounds=(np.log(BETA_MIN), np.log(BETA_MAX)),
                            method="bounded", options={"xatol": 1e-3})
        return float(np.exp(r.x))


__all__ = ["BETA_MAX", "BETA_MIN", "CLIP_SIGMAS", "K_TOP", "MIN_ROWS", "PRIOR_SD_LOG_BETA",
           "SHADE_SD", "PriorScale", "ScaleTracker", "calibrate_prior", "tril_inplace"]
