"""Taste-balanced engagement: compare images within groups of users who share a taste.

Why: engagement is a convex function of how much a user likes an image (few people click
anything; those who love it click far more often). A polarising image, loved by users of one taste
and ignored by the rest, therefore collects more engagement in total than an image everybody finds
equally good, although the "average user" prefers the second. With enough data the pooled
posterior becomes certain of that difference and keeps the pair the wrong way round; those errors
are invisible to any random split of the audience (both halves share them). On simulated logs
they are most of the wrong pairs (their winner has the larger style vector).

What this module does, from the log alone:
1. Taste axes: the users x images matrix of each counted user's engagement minus the image's
   mean engagement (only where the user was shown the image) has its two leading singular vectors
   taken (scipy's ARPACK, fixed start). Users who engage the same images more than average sit
   at the same end of an axis.
2. Cells: users are split at the median of each axis, giving 2**axes cells of similar size.
3. Per cell c and image i: engagement K_ic and expected E_ic (exposures x stratum base rates, as
   for the pooled test) and the Gamma posterior of theta_ic. The image's taste-balanced log
   engagement is the mean over cells of E[log theta_ic] (digamma(a) - log(b)), with variance the
   mean of trigamma(a) / cells; a pair is decided by the normal approximation of the difference.
   On the log scale a cell that loves an image and one that ignores it cancel, where the pooled
   rate lets the love win.

Measured on simulated logs (bench/bench_social.py --sweep, docs/benchmarks.md): the estimated precision (the
mean posterior probability of the right order over the kept pairs) tracks the precision against
the simulator's truth within about a point, where the pooled posterior overstated it by 2 to 5.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse, special
from scipy.sparse.linalg import svds


def taste_cells(
    user: np.ndarray, image: np.ndarray, score: np.ndarray, n_images: int, axes: int = 2, min_images: int = 5
):
    """Cell (0 .. 2**axes - 1) of each user code 0..max(user), and the singular values found.
    user, image: codes of the counted (user, image) rows; score: the user's engagement there.
    A user shown fewer than min_images images says too little about their taste: cell -1 (the
    caller spreads their engagement evenly over the cells), and they are left out of the axes."""
    user = np.asarray(user, dtype=np.int64)
    image = np.asarray(image, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    n_users = int(user.max()) + 1 if user.size else 0
    cells = np.full(n_users, -1, dtype=np.int64)
    informed = np.bincount(user, minlength=n_users) >= min_images
    if axes <= 0 or informed.sum() < 4 * 2**axes or n_images < axes + 2:
        return cells, np.zeros(0)
    rows = informed[user]
    user, image, score = user[rows], image[rows], score[rows]
    shown = np.bincount(image, minlength=n_images)
    rate = np.bincount(image, weights=score, minlength=n_images) / np.maximum(shown, 1)
    resid = sparse.csr_matrix((score - rate[image], (user, image)), shape=(n_users, n_images))
    k = min(axes, min(resid.shape) - 1)
    v0 = np.full(min(resid.shape), 1.0 / np.sqrt(min(resid.shape)))  # fixed start: deterministic
    u, s, _ = svds(resid, k=k, v0=v0)
    order = np.argsort(-s)  # strongest axis first
    code = np.zeros(n_users, dtype=np.int64)
    for j in order:
        code = code * 2 + (u[:, j] > np.median(u[informed, j]))
    cells[informed] = code[informed]
    return cells, s[order]


def balanced_log_rate(alpha: float, beta: float, k_cells: np.ndarray, e_cells: np.ndarray):
    """Per image (columns of the (cells, images) arrays of engagement and expected engagement):
    mean over cells of the posterior E[log theta] and the variance of that mean."""
    a = alpha + np.maximum(k_cells, 0.0)
    b = beta + np.maximum(e_cells, 0.0)
    n = k_cells.shape[0]
    mean = (special.digamma(a) - np.log(b)).mean(axis=0)
    var = special.polygamma(1, a).sum(axis=0) / (n * n)
    return mean, var


def prob_greater_log(mean_a, var_a, mean_b, var_b, log_margin: float = 0.0) -> np.ndarray:
    """P(log theta_a - log theta_b > log_margin), normal approximation of the difference."""
    z = (np.asarray(mean_a) - np.asarray(mean_b) - log_margin) / np.sqrt(
        np.asarray(var_a) + np.asarray(var_b)
    )
    return special.ndtr(z)
