"""Split-half calibration of the engagement posterior's width, from the log alone.

The Gamma-Poisson model (pipeline/social/bayes.py) treats an image's engagement as Poisson around
what its audience predicts. A real log can be noisier than that (users who come in clusters,
surfaces the strata do not capture, a bursty feed), and a posterior that ignores it is
overconfident. This module measures that noise; it cannot see a bias that every part of the
audience shares (on simulated logs the overconfidence was such a bias, polarising images, which
pipeline/social/taste.py handles; there phi comes out 0.4-0.7, less noise than Poisson).

What this module measures, without any ground truth: users are split in two halves by a hash of
their id, so every image has two disjoint audiences. The posterior fitted on one half predicts,
for every candidate pair, the probability that the other half's observed engagement rates come
out in the same order. If the model is right those predictions are calibrated; if the log is
noisier than Poisson they are too sure. A dispersion factor phi (quasi-Poisson: Var K = phi x
mean) is fitted by maximising the likelihood of the other half's observed orders, both ways
round; phi > 1 means the log is noisier than the model assumed. The full-data posterior then uses
K / phi and E / phi (each count is worth 1 / phi of an observation), which widens it by sqrt(phi).
Its interval comes from resampling prompt groups (pairs in one group share images, so groups are
the independent units).

The same posterior gives the estimated precision of the pairs kept (1 - their mean probability of
being the wrong way round) with an interval that covers both the binomial spread and phi's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

PHI_GRID = np.geomspace(0.25, 16.0, 25)  # dispersion factors tried (1 = Poisson)
MAX_PAIRS = 100_000  # candidate pairs the fit looks at (a deterministic sample beyond that)


@dataclass(frozen=True)
class Dispersion:
    phi: float  # fitted dispersion (1 = the Poisson model is right)
    low: float  # 2.5% / 97.5% over resampled prompt groups
    high: float
    pairs: int  # candidate pairs judged (both directions)
    groups: int
    agreement: float | None  # share of pairs whose halves order the two images the same way

    def to_dict(self) -> dict:
        return {
            "phi": self.phi,
            "interval": [self.low, self.high],
            "pairs": self.pairs,
            "groups": self.groups,
            "half_agreement": self.agreement,
        }


def fit_dispersion(
    alpha: float,
    beta: float,
    score_h: np.ndarray,
    expected_h: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    group: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
) -> Dispersion:
    """phi from the split halves. score_h, expected_h: (2, n_images) engagement and offset per half;
    ia, ib: candidate pairs (image indices); group: each pair's prompt group code. alpha, beta: the
    Gamma prior of theta (for K / phi, E / phi)."""
    ia, ib, group = np.asarray(ia), np.asarray(ib), np.asarray(group)
    if ia.size > MAX_PAIRS:  # a fixed, spread-out sample: the fit needs far fewer pairs
        pick = np.linspace(0, ia.size - 1, MAX_PAIRS).astype(np.int64)
        ia, ib, group = ia[pick], ib[pick], group[pick]
    rows_ll = []  # per direction: (pairs, grid) log-likelihood
    agree_num = agree_den = 0.0
    signs = []
    for tr in (0, 1):
        te = 1 - tr
        e_te = expected_h[te]
        ok = (e_te[ia] > 0) & (e_te[ib] > 0) & (expected_h[tr][ia] > 0) & (expected_h[tr][ib] > 0)
        r_te = np.divide(score_h[te], e_te, out=np.zeros_like(e_te), where=e_te > 0)
        d = r_te[ia] - r_te[ib]
        s = np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))  # the other half's order; ties half
        signs.append((ok, s, d))
        ll = np.zeros((ia.size, PHI_GRID.size))
        for k, phi in enumerate(PHI_GRID):
            a = alpha + score_h[tr] / phi
            b = beta + expected_h[tr] / phi
            mu, v = a / b, a / (b * b)
            var_te = v + phi * mu / np.maximum(e_te, 1e-12)
            z = (mu[ia] - mu[ib]) / np.sqrt(var_te[ia] + var_te[ib])
            lp, lq = special.log_ndtr(z), special.log_ndtr(-z)
            ll[:, k] = np.where(ok, s * lp + (1 - s) * lq, 0.0)
        rows_ll.append(ll)
    ok0, _, d0 = signs[0]
    ok1, _, d1 = signs[1]
    both = ok0 & ok1 & (d0 != 0) & (d1 != 0)
    if both.any():
        # the two halves' observed orders agree (a direct, model-free figure for the card)
        agree_num = float(((d0[both] > 0) == (d1[both] > 0)).sum())
        agree_den = float(both.sum())
    ll = rows_ll[0] + rows_ll[1]
    used = ok0 | ok1
    if not used.any():
        return Dispersion(1.0, 1.0, 1.0, 0, 0, None)
    codes, inv = np.unique(group[used], return_inverse=True)
    per_group = np.zeros((codes.size, PHI_GRID.size))
    np.add.at(per_group, inv, ll[used])
    phi = float(PHI_GRID[np.argmax(per_group.sum(axis=0))])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, codes.size, codes.size), minlength=codes.size)
        boots.append(PHI_GRID[np.argmax(w @ per_group)])
    lo, hi = (float(x) for x in np.quantile(boots, [0.025, 0.975])) if boots else (phi, phi)
    return Dispersion(
        phi, lo, hi, int(used.sum()), int(codes.size), agree_num / agree_den if agree_den else None
    )


def estimated_precision(p_right: np.ndarray, p_right_low: np.ndarray | None = None) -> dict:
    """Estimated precision of the pairs kept: the mean of their posterior probability of being the
    right way round, with a 95% interval that covers the binomial spread (normal approximation of
    the Poisson-binomial count) and, when p_right_low is given (the same pairs under the wider
    posterior at phi's upper bound), the dispersion's uncertainty. Empty input: None."""
    p = np.asarray(p_right, dtype=np.float64)
    if p.size == 0:
        return {"pairs": 0, "precision": None, "interval": None}
    est = float(p.mean())
    sd = float(np.sqrt(np.sum(p * (1 - p)))) / p.size
    lows = [est]
    if p_right_low is not None and len(p_right_low):
        lows.append(float(np.mean(p_right_low)))
    lo = max(0.0, min(lows) - 1.96 * sd)
    hi = min(1.0, est + 1.96 * sd)
    return {"pairs": int(p.size), "precision": est, "interval": [lo, hi]}
