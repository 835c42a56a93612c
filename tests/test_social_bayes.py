"""The Beta and Gamma evidence against scipy, for prior parameters from 0.1 to 10 (below 1 the
densities are infinite at an end of their range) and for posteriors with thousands of counts."""

import itertools

import numpy as np
import pytest
from scipy import integrate, special, stats

from pipeline.social.bayes import (
    fit_beta_prior,
    fit_gamma_prior,
    prob_greater,
    prob_greater_gamma,
    prob_greater_normal,
    prob_greater_quadrature,
)

GRID = (0.1, 0.3, 0.9, 1.0, 3.0, 10.0)


def _scipy_prob_greater_beta(a1, b1, a2, b2):
    """P(X1 > X2) for Betas by scipy's adaptive quadrature (QUADPACK), split at 1/2 and in the
    variables u = x**a1 (left half) and v = (1-x)**b1 (right half), where pdf_1 dx = du / (a1 B)
    and dv / (b1 B): no singular weight left. CDF_2 near 1 from its complement."""
    lnb = special.betaln(a1, b1)

    def left(u):
        x = u ** (1 / a1)
        return special.betainc(a2, b2, x) * (1 - x) ** (b1 - 1) / a1

    def right(v):
        one_minus_x = v ** (1 / b1)
        return (1 - special.betainc(b2, a2, one_minus_x)) * (1 - one_minus_x) ** (a1 - 1) / b1

    lo, _ = integrate.quad(left, 0, 0.5**a1, epsabs=1e-13, epsrel=1e-12, limit=400)
    hi, _ = integrate.quad(right, 0, 0.5**b1, epsabs=1e-13, epsrel=1e-12, limit=400)
    return (lo + hi) / np.exp(lnb)


def test_beta_prob_greater_matches_scipy_for_parameters_from_0_1_to_10():
    cases = np.array(list(itertools.product(GRID, repeat=4)))  # 1296 combinations
    ours = prob_greater_quadrature(*cases.T)
    ref = np.array([_scipy_prob_greater_beta(*c) for c in cases])
    assert np.max(np.abs(ours - ref)) < 1e-6


def test_beta_prob_greater_matches_scipy_on_posteriors():
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(100):
        a1, b1, a2, b2 = np.exp(rng.uniform(np.log(0.1), np.log(10), 4))
        k1, k2 = rng.integers(0, 400, 2)
        n1, n2 = rng.integers(400, 20_000, 2)
        cases.append((a1 + k1, b1 + n1 - k1, a2 + k2, b2 + n2 - k2))
    cases = np.array(cases)
    ours = prob_greater_quadrature(*cases.T)
    ref = []
    for a1, b1, a2, b2 in cases:  # concentrated: plain adaptive quadrature over +-15 sd, break at the means
        m, sd = a1 / (a1 + b1), np.sqrt(stats.beta.var(a1, b1))
        lo, hi = max(0.0, m - 15 * sd), min(1.0, m + 15 * sd)
        pts = [p for p in (m, a2 / (a2 + b2)) if lo < p < hi]
        v, _ = integrate.quad(
            lambda x, a1=a1, b1=b1, a2=a2, b2=b2: stats.beta.pdf(x, a1, b1) * stats.beta.cdf(x, a2, b2),
            lo,
            hi,
            points=pts,
            limit=400,
        )
        ref.append(v)
    assert np.max(np.abs(ours - np.array(ref))) < 1e-6


@pytest.mark.parametrize(
    "a1,b1,a2,b2", [(0.1, 0.1, 0.3, 0.3), (0.5, 3, 0.2, 0.9), (10, 0.1, 3, 0.3), (0.3, 10, 0.9, 10)]
)
def test_beta_prob_greater_matches_monte_carlo_below_one(a1, b1, a2, b2):
    rng = np.random.default_rng(1)
    x1 = stats.beta.rvs(a1, b1, size=1_000_000, random_state=rng)
    x2 = stats.beta.rvs(a2, b2, size=1_000_000, random_state=rng)
    assert abs(prob_greater_quadrature(a1, b1, a2, b2)[0] - (x1 > x2).mean()) < 0.002  # 4 standard errors


def test_beta_prob_greater_symmetry_and_ties():
    cases = np.array(list(itertools.product(GRID, repeat=4)))
    p = prob_greater(*cases.T)
    q = prob_greater(cases[:, 2], cases[:, 3], cases[:, 0], cases[:, 1])
    assert np.max(np.abs(p + q - 1)) < 1e-9
    same = prob_greater(np.array(GRID), np.array(GRID[::-1]), np.array(GRID), np.array(GRID[::-1]))
    assert np.allclose(same, 0.5, atol=1e-9)


def test_prob_greater_exact_closed_form_for_integers():
    # Evan Miller's closed form for integer parameters: P(X2 > X1) = sum_{i<a2} B(a1+i, b1+b2) /
    # ((b2+i) B(1+i, b2) B(a1, b1))
    a1, b1, a2, b2 = 12, 40, 7, 45
    total = sum(
        np.exp(
            special.betaln(a1 + i, b1 + b2)
            - np.log(b2 + i)
            - special.betaln(1 + i, b2)
            - special.betaln(a1, b1)
        )
        for i in range(a2)
    )
    assert abs(prob_greater_quadrature(a1, b1, a2, b2)[0] - (1 - total)) < 1e-9


def test_normal_approximation_is_rough_but_close_for_large_counts():
    a = prob_greater_quadrature(300, 7000, 250, 7100)[0]
    assert abs(prob_greater_normal(300, 7000, 250, 7100) - a) < 0.01


def test_gamma_prob_greater_matches_scipy():
    rng = np.random.default_rng(2)
    cases = np.exp(rng.uniform(np.log(0.1), np.log(10), (100, 4)))
    cases = np.vstack([cases, np.array(list(itertools.product(GRID, repeat=2)))[:, [0, 1, 1, 0]]])
    ours = prob_greater_gamma(*cases.T)
    ref = []
    for a1, b1, a2, b2 in cases:
        # integral of pdf_1 * CDF_2; x**(a1-1) goes into QUADPACK's algebraic weight
        top = special.gammaincinv(a1, 1 - 1e-15) / b1
        v, _ = integrate.quad(
            lambda x, a2=a2, b1=b1, b2=b2: special.gammainc(a2, b2 * x) * np.exp(-b1 * x),
            0,
            top,
            weight="alg",
            wvar=(a1 - 1, 0),
            epsabs=1e-14,
            limit=400,
        )
        ref.append(v * np.exp(a1 * np.log(b1) - special.gammaln(a1)))
    assert np.max(np.abs(ours - np.array(ref))) < 1e-7
    # posteriors with large counts, against Monte Carlo
    g = np.random.default_rng(3)
    x1 = g.gamma(1500.5, 1 / 1400.0, 1_000_000)
    x2 = g.gamma(1420.2, 1 / 1390.0, 1_000_000)
    assert abs(prob_greater_gamma(1500.5, 1400.0, 1420.2, 1390.0)[0] - (x1 > x2).mean()) < 0.002


@pytest.mark.parametrize("a,b", list(itertools.product((0.1, 0.3, 1.0, 3.0, 10.0), repeat=2)))
def test_fit_beta_prior_recovers_known_priors_from_0_1_to_10(a, b):
    rng = np.random.default_rng(int(a * 100 + b * 10))
    rates = stats.beta.rvs(a, b, size=3000, random_state=rng)
    n = rng.integers(200, 3000, 3000)
    k = rng.binomial(n, rates)
    prior = fit_beta_prior(k, n)
    assert abs(np.log(prior.alpha / a)) < np.log(1.25)
    assert abs(np.log(prior.beta / b)) < np.log(1.25)


def test_fit_beta_prior_agrees_with_scipy_fit_on_the_latent_rates():
    rng = np.random.default_rng(4)
    for a, b in ((0.52, 0.9), (0.2, 5.0), (4.0, 36.0)):
        rates = stats.beta.rvs(a, b, size=4000, random_state=rng)
        n = rng.integers(2000, 5000, 4000)
        sa, sb, _, _ = stats.beta.fit(np.clip(rates, 1e-12, 1 - 1e-12), floc=0, fscale=1)
        prior = fit_beta_prior(rng.binomial(n, rates), n)
        assert abs(np.log(prior.alpha / sa)) < np.log(1.15) and abs(np.log(prior.beta / sb)) < np.log(1.15)


def test_fit_beta_prior_without_spread_is_concentrated():
    n = np.full(200, 500)
    k = np.random.default_rng(2).binomial(n, 0.2)
    assert fit_beta_prior(k, n).concentration > 1000


@pytest.mark.parametrize("shape", (0.1, 0.3, 1.0, 3.0, 10.0))
def test_fit_gamma_prior_recovers_known_priors_from_0_1_to_10(shape):
    rng = np.random.default_rng(int(shape * 10))
    theta = stats.gamma.rvs(shape, scale=1 / shape, size=3000, random_state=rng)  # mean 1
    offsets = rng.uniform(20, 300, 3000)
    prior = fit_gamma_prior(rng.poisson(theta * offsets), offsets)
    assert abs(np.log(prior.alpha / shape)) < np.log(1.2)
    assert abs(prior.mean - 1.0) < 0.1


def test_fit_gamma_prior_without_spread_is_concentrated():
    offsets = np.full(300, 200.0)
    k = np.random.default_rng(5).poisson(offsets * 0.1)
    assert fit_gamma_prior(k, offsets).alpha > 1000
