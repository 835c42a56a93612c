import numpy as np
import pytest

from pipeline.social.bayes import fit_beta_prior, prob_greater, prob_greater_normal, prob_greater_quadrature

CASES = [
    (30, 70, 20, 80),
    (3, 50, 1.5, 60),
    (300, 7000, 250, 7100),
    (1.2, 20, 1.1, 25),
    (5, 5, 5, 5),
    (80, 20, 20, 80),
]


@pytest.mark.parametrize("a1,b1,a2,b2", CASES)
def test_prob_greater_matches_monte_carlo(a1, b1, a2, b2):
    rng = np.random.default_rng(0)
    mc = (rng.beta(a1, b1, 400_000) > rng.beta(a2, b2, 400_000)).mean()
    q = prob_greater_quadrature(a1, b1, a2, b2)[0]
    assert abs(q - mc) < 0.004
    assert abs(prob_greater_normal(a1, b1, a2, b2) - mc) < 0.03  # the approximation is rougher
    assert abs(q + prob_greater(a2, b2, a1, b1)[0] - 1) < 1e-6  # P(A>B) + P(B>A) = 1


def test_prob_greater_exact_closed_form_for_integers():
    # Evan Miller's closed form for integer parameters: P(X2 > X1) = sum_{i<a2} B(a1+i, b1+b2) /
    # ((b2+i) B(1+i, b2) B(a1, b1))
    from scipy.special import betaln

    a1, b1, a2, b2 = 12, 40, 7, 45
    total = sum(
        np.exp(betaln(a1 + i, b1 + b2) - np.log(b2 + i) - betaln(1 + i, b2) - betaln(a1, b1))
        for i in range(a2)
    )
    assert abs(prob_greater_quadrature(a1, b1, a2, b2)[0] - (1 - total)) < 1e-6


def test_prob_greater_is_vectorised_and_symmetric_on_ties():
    p = prob_greater(np.full(5, 20.0), np.full(5, 80.0), np.full(5, 20.0), np.full(5, 80.0))
    assert p.shape == (5,) and np.allclose(p, 0.5, atol=1e-6)


def test_fit_beta_prior_recovers_a_known_prior():
    rng = np.random.default_rng(1)
    rates = rng.beta(4.0, 36.0, 5000)  # mean 0.1, concentration 40
    n = rng.integers(200, 2000, 5000)
    k = rng.binomial(n, rates)
    prior = fit_beta_prior(k, n)
    assert abs(prior.mean - 0.1) < 0.005
    assert 30 < prior.concentration < 52


def test_fit_beta_prior_without_spread_is_concentrated():
    n = np.full(200, 500)
    k = np.random.default_rng(2).binomial(n, 0.2)
    assert fit_beta_prior(k, n).concentration > 1000
