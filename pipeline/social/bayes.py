"""Bayesian evidence for preference pairs, vectorised.

Two conjugate models, each with a prior fitted to the data and P(rate_A > rate_B):

- Gamma-Poisson with offsets (what build_social_pairs uses). An image's engagement K_i is
  Poisson(theta_i * E_i): E_i is the engagement expected from the audience it really had (its real
  exposures in each stratum times that stratum's base rate) and theta_i its engagement relative to
  that expectation, theta_i ~ Gamma(alpha, beta). Posterior Gamma(alpha + K_i, beta + E_i), and
  P(theta_A > theta_B) has a closed form (a regularised incomplete beta function).
- Beta-Binomial: k_i successes in n_i trials, rate ~ Beta(alpha, beta); P(rate_A > rate_B) by
  Gauss-Legendre quadrature with endpoint transforms, so alpha or beta below 1 (a density that is
  infinite at 0 or 1) are integrated as accurately as large ones.

Both prior fits start from the method of moments (sampling noise subtracted from the spread of
the observed rates) and refine it by maximising the marginal likelihood (negative binomial /
beta-binomial), which stays accurate for shapes well below 1, where moments are noisy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

MAX_CONCENTRATION = 1e6  # prior alpha+beta (Beta) or shape (Gamma) when the data show no spread
MIN_SHAPE = 1e-3  # smallest prior parameter a fit may return


# --- Beta-Binomial ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetaPrior:
    alpha: float
    beta: float
    mean: float  # mean of the per-image rates used for the fit
    between_var: float  # their variance after removing binomial sampling noise
    n_images: int

    @property
    def concentration(self) -> float:
        return self.alpha + self.beta


def _beta_binomial_nll(params, k, n):
    a, b = np.exp(params)
    return -float(np.sum(special.betaln(a + k, b + n - k) - special.betaln(a, b)))


def fit_beta_prior(successes, trials, min_trials: float = 1.0, refine: bool = True) -> BetaPrior:
    """Beta prior of per-image rates from k_i successes in n_i trials (images with n_i >= min_trials).

    Method of moments first: the observed variance of k_i/n_i is the prior's variance plus
    binomial noise E[m(1-m)/n_i], which is subtracted. With no spread left the prior is very
    concentrated (everything shrinks to the mean, so no pair passes a test: the right answer when
    the data carry no signal). Then, with refine, the beta-binomial marginal likelihood is maximised
    from there (valid for any alpha, beta > 0, including below 1)."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    keep = n >= max(min_trials, 1e-12)
    if keep.sum() < 2:
        keep = n > 0
    if keep.sum() < 2:
        return BetaPrior(1.0, 1.0, 0.5, 1 / 12, int(keep.sum()))
    k, n = np.clip(k[keep], 0.0, n[keep]), n[keep]
    r = k / n
    m = min(max(float(np.mean(r)), 1e-9), 1 - 1e-9)
    noise = float(np.mean(m * (1 - m) / n))
    v = float(np.var(r, ddof=1)) - noise
    if v <= 0:
        return BetaPrior(m * MAX_CONCENTRATION, (1 - m) * MAX_CONCENTRATION, m, 0.0, int(keep.sum()))
    c = float(np.clip(m * (1 - m) / v - 1.0, 2 * MIN_SHAPE, MAX_CONCENTRATION))
    a, b = max(m * c, MIN_SHAPE), max((1 - m) * c, MIN_SHAPE)
    if refine:
        a, b = _refine(_beta_binomial_nll, (a, b), (k, n))
    mean = a / (a + b)
    return BetaPrior(a, b, mean, mean * (1 - mean) / (a + b + 1), int(keep.sum()))


def posterior(prior: BetaPrior, successes, trials) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    k = np.clip(k, 0.0, n)
    return prior.alpha + k, prior.beta + (n - k)


def beta_mean_var(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    s = a + b
    return a / s, a * b / (s * s * (s + 1))


def prob_greater_normal(a1, b1, a2, b2) -> np.ndarray:
    """P(X1 > X2), X_i ~ Beta(a_i, b_i) independent, by a normal approximation of each Beta
    (rough for small or skewed Betas; for checks and speed comparisons)."""
    m1, v1 = beta_mean_var(a1, b1)
    m2, v2 = beta_mean_var(a2, b2)
    z = (m1 - m2) / np.sqrt(v1 + v2)
    return special.ndtr(z)


_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)
_GL_S = (_GL_X + 1) / 2  # nodes on (0, 1)
_GL_WS = _GL_W / 2
_T = 2.0  # the power of s the endpoint transforms aim for
_TAIL = 1e-13  # probability mass of X1 left outside the integration range at each end


def _integrate_pdf_cdf(A1, B1, A2, B2):
    """integral of pdf_Beta(A1,B1)(x) * cdf_Beta(A2,B2)(x) dx over [0, 1] (column vectors in).

    The integral runs between the 1e-13 and 1 - 1e-13 quantiles of X1 (nothing measurable lies
    outside, however skewed X1 is), in two 64-point Gauss-Legendre pieces split at its mean m.
    Near 0 the integrand behaves like x**(A1 + A2 - 1) (pdf_1 ~ x**(A1-1), CDF_2 ~ x**A2) and near
    1 like (1-x)**(B1 - 1) (CDF_2 -> 1); the substitution x = lo + (m - lo) * s**p turns the first
    into s**(p * (A1 + A2) - 1), which is smooth for p = (T + 1) / (A1 + A2), and likewise
    at the right end. p, q >= 1: nodes only ever gather towards the endpoint."""
    m = beta_mean_var(A1, B1)[0]
    lo = np.minimum(special.betaincinv(A1, B1, _TAIL), m)
    hi = np.maximum(special.betainccinv(A1, B1, _TAIL), m)
    p = np.maximum(1.0, (_T + 1) / (A1 + A2))
    q = np.maximum(1.0, (_T + 1) / B1)
    s = _GL_S[None, :]
    lnb = special.betaln(A1, B1)
    total = 0.0
    # left piece x = lo + (m - lo) * s**p, right piece x = hi - (hi - m) * s**q; x and 1 - x are
    # both formed without cancellation next to the endpoint they approach (mass of a Beta with
    # a parameter below 1 reaches 1e-100 from it, far below double precision of 1 - x)
    sp, sq = s**p, s**q
    pieces = (
        (lo + (m - lo) * sp, (1 - lo) - (m - lo) * sp, (m - lo) * p * s ** (p - 1)),
        (hi - (hi - m) * sq, (1 - hi) + (hi - m) * sq, (hi - m) * q * s ** (q - 1)),
    )
    for x, one_minus_x, dx in pieces:
        x = np.maximum(x, 1e-300)
        one_minus_x = np.maximum(one_minus_x, 1e-300)
        logpdf = (A1 - 1) * np.log(x) + (B1 - 1) * np.log(one_minus_x) - lnb
        # CDF_2 from whichever end is nearer, so that 1 - x below 1e-16 still counts
        a2, b2 = np.broadcast_to(A2, x.shape), np.broadcast_to(B2, x.shape)
        near0 = x < 0.5
        cdf2 = np.empty(x.shape)
        cdf2[near0] = special.betainc(a2[near0], b2[near0], x[near0])
        cdf2[~near0] = 1.0 - special.betainc(b2[~near0], a2[~near0], one_minus_x[~near0])
        total = total + (np.exp(logpdf) * cdf2 * dx * _GL_WS[None, :]).sum(axis=1)
    return total


def prob_greater_quadrature(a1, b1, a2, b2, chunk: int = 20_000) -> np.ndarray:
    """P(X1 > X2), X_i ~ Beta(a_i, b_i) independent: the integral of pdf_1 * CDF_2 by Gauss-
    Legendre quadrature (_integrate_pdf_cdf), taken over the narrower of the two distributions
    (P(X1 > X2) = 1 - P(X2 > X1)), so that the other's CDF is smooth where the pdf has its mass.
    Accurate to ~1e-6 for alpha, beta from 0.1 to 10 and for posteriors with thousands of counts
    (tests/test_social_bayes.py checks it against scipy's adaptive quadrature)."""
    a1, b1, a2, b2 = (np.atleast_1d(np.asarray(x, dtype=np.float64)) for x in (a1, b1, a2, b2))
    a1, b1, a2, b2 = np.broadcast_arrays(a1, b1, a2, b2)
    out = np.empty(a1.shape, dtype=np.float64)
    for s in range(0, a1.size, chunk):
        sl = slice(s, s + chunk)
        A1, B1, A2, B2 = a1[sl, None], b1[sl, None], a2[sl, None], b2[sl, None]
        narrow1 = (beta_mean_var(A1, B1)[1] <= beta_mean_var(A2, B2)[1])[:, 0]
        res = np.empty(narrow1.shape)
        d, w = narrow1, ~narrow1
        res[d] = _integrate_pdf_cdf(A1[d], B1[d], A2[d], B2[d])
        res[w] = 1.0 - _integrate_pdf_cdf(A2[w], B2[w], A1[w], B1[w])
        out[sl] = np.clip(res, 0.0, 1.0)
    return out


def prob_greater(a1, b1, a2, b2, method: str = "quadrature") -> np.ndarray:
    """P(X1 > X2) for independent Beta(a1, b1) and Beta(a2, b2)."""
    if method == "normal":
        return prob_greater_normal(a1, b1, a2, b2)
    if method == "quadrature":
        return prob_greater_quadrature(a1, b1, a2, b2)
    raise ValueError(f"unknown method {method!r}")


# --- Gamma-Poisson with offsets ---------------------------------------------------------------


@dataclass(frozen=True)
class GammaPrior:
    """theta ~ Gamma(alpha, rate beta): an image's engagement relative to what its audience
    predicts (theta = 1: as engaging as the average image shown to the same audiences)."""

    alpha: float
    beta: float
    n_images: int

    @property
    def mean(self) -> float:
        return self.alpha / self.beta

    @property
    def variance(self) -> float:
        return self.alpha / self.beta**2


def _neg_binomial_nll(params, k, e):
    a, b = np.exp(params)
    # log of the Gamma-Poisson marginal without the k! term (constant in a, b); k may be fractional
    ll = special.gammaln(a + k) - special.gammaln(a) + a * np.log(b / (b + e)) - k * np.log(b + e)
    return -float(np.sum(ll))


def _refine(nll, start, data):
    """Maximise a marginal likelihood over (log a, log b) from the moments' start; the start is
    kept when the optimiser fails or does not improve on it."""
    x0 = np.log(np.asarray(start, dtype=np.float64))
    f0 = nll(x0, *data)
    lim = (np.log(MIN_SHAPE), np.log(MAX_CONCENTRATION * 10))
    try:
        res = optimize.minimize(nll, x0, args=data, method="L-BFGS-B", bounds=[lim, lim])
    except (ValueError, FloatingPointError):
        return tuple(np.exp(x0))
    if not np.isfinite(res.fun) or res.fun > f0:
        return tuple(np.exp(x0))
    return tuple(float(v) for v in np.exp(res.x))


def fit_gamma_prior(counts, offsets, min_offset: float = 0.0, refine: bool = True) -> GammaPrior:
    """Gamma prior of theta_i from engagement K_i ~ Poisson(theta_i * E_i) (images with
    E_i >= min_offset). Method of moments on K_i / E_i with the Poisson noise E[mean / E_i]
    subtracted from their variance, then (refine) maximum of the negative-binomial marginal
    likelihood. Valid for shapes from well below 1 to very concentrated priors."""
    k = np.asarray(counts, dtype=np.float64)
    e = np.asarray(offsets, dtype=np.float64)
    keep = (e >= max(min_offset, 1e-12)) & (k >= 0)
    if keep.sum() < 2:
        keep = (e > 0) & (k >= 0)
    if keep.sum() < 2:
        return GammaPrior(1.0, 1.0, int(keep.sum()))
    k, e = k[keep], e[keep]
    r = k / e
    m = max(float(np.mean(r)), 1e-9)
    v = float(np.var(r, ddof=1)) - float(np.mean(m / e))
    if v <= 0:
        return GammaPrior(MAX_CONCENTRATION, MAX_CONCENTRATION / m, int(keep.sum()))
    a = float(np.clip(m * m / v, MIN_SHAPE, MAX_CONCENTRATION))
    b = a / m
    if refine:
        a, b = _refine(_neg_binomial_nll, (a, b), (k, e))
    return GammaPrior(a, b, int(keep.sum()))


def gamma_posterior(prior: GammaPrior, counts, offsets) -> tuple[np.ndarray, np.ndarray]:
    """Posterior shape and rate: Gamma(alpha + K, beta + E)."""
    k = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    e = np.maximum(np.asarray(offsets, dtype=np.float64), 0.0)
    return prior.alpha + k, prior.beta + e


def prob_greater_gamma(a1, b1, a2, b2) -> np.ndarray:
    """P(X1 > X2) for independent X_i ~ Gamma(shape a_i, rate b_i), exactly:
    U = b1 X1 / (b1 X1 + b2 X2) ~ Beta(a1, a2) and X1 > X2 <=> U > b1 / (b1 + b2), so
    P = I_{b2 / (b1 + b2)}(a2, a1) (the regularised incomplete beta function). Valid for any
    shapes > 0."""
    a1, b1, a2, b2 = (np.asarray(x, dtype=np.float64) for x in (a1, b1, a2, b2))
    return np.atleast_1d(special.betainc(a2, a1, b2 / (b1 + b2)))
