"""Split-half dispersion (pipeline/social/calibrate.py): fitted from the other half's observed
orders, it recovers the noise the data were drawn with, and the precision estimate reports empty
input as empty."""

import numpy as np

from pipeline.social.calibrate import estimated_precision, fit_dispersion


def _halves(scale: float, seed: int = 0):
    """300 groups of 8 images, theta ~ Gamma(4, 4); each half sees E = 60 and its engagement is
    scale x Poisson(theta E / scale) (variance scale x mean: quasi-Poisson with phi = scale)."""
    rng = np.random.default_rng(seed)
    n_groups, size = 300, 8
    n = n_groups * size
    theta = rng.gamma(4.0, 0.25, n)
    e = np.full((2, n), 60.0)
    k = scale * rng.poisson(theta[None, :] * e / scale)
    ia, ib, g = [], [], []
    for grp in range(n_groups):
        idx = np.arange(grp * size, (grp + 1) * size)
        a, b = np.triu_indices(size, 1)
        ia.append(idx[a])
        ib.append(idx[b])
        g.append(np.full(a.size, grp))
    return k, e, np.concatenate(ia), np.concatenate(ib), np.concatenate(g)


def test_poisson_data_give_phi_near_one():
    k, e, ia, ib, g = _halves(1.0)
    d = fit_dispersion(4.0, 4.0, k, e, ia, ib, g)
    assert 0.6 <= d.phi <= 1.6 and d.low <= d.phi <= d.high
    assert d.groups == 300 and 0.5 < d.agreement < 1.0


def test_overdispersed_data_give_phi_above_one():
    k, e, ia, ib, g = _halves(4.0)
    d = fit_dispersion(4.0, 4.0, k, e, ia, ib, g)
    assert 2.5 <= d.phi <= 6.5 and d.low > 1.5


def test_estimated_precision_edges():
    assert estimated_precision(np.zeros(0)) == {"pairs": 0, "precision": None, "interval": None}
    est = estimated_precision(np.array([0.9, 0.8, 1.0, 0.7]), np.array([0.8, 0.7, 0.95, 0.6]))
    assert abs(est["precision"] - 0.85) < 1e-12 and est["interval"][0] < 0.7625 and est["interval"][1] > 0.85
