"""Clustering quality against ground-truth identities.

All metrics are computed from the contingency table n_ij = |pred cluster i ∩ true class j|
(sparse, O(N log N)), so they scale to millions of items.

- Pairwise: TP = sum_ij C(n_ij, 2); precision = TP / sum_i C(a_i, 2); recall = TP / sum_j C(b_j, 2)
  (a_i, b_j: predicted / true cluster sizes). An empty denominator (no pairs) gives 1.0.
- BCubed (Bagga & Baldwin): per item, precision = |its pred ∩ its true| / |its pred|, recall =
  |its pred ∩ its true| / |its true|, averaged over items: P = sum_ij n_ij^2 / a_i / N.
- NMI: mutual information / arithmetic mean of the entropies (sklearn's default
  ``normalized_mutual_info_score``); 1.0 when both labelings are a single cluster.
- F = harmonic mean of P and R.
"""

from __future__ import annotations

import numpy as np


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def contingency(
    pred: np.ndarray, true: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pred ids, true ids, n_ij) for non-zero cells, plus pred sizes a and true sizes b indexed by cell."""
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError("pred and true must be 1-D and of the same length")
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(true, return_inverse=True)
    p = p.ravel().astype(np.int64)
    t = t.ravel().astype(np.int64)
    a = np.bincount(p)
    b = np.bincount(t)
    cell = p * (t.max() + 1 if len(t) else 1) + t
    cells, nij = np.unique(cell, return_counts=True)
    ci = cells // (t.max() + 1 if len(t) else 1)
    cj = cells % (t.max() + 1 if len(t) else 1)
    return ci, cj, nij.astype(np.float64), a.astype(np.float64), b.astype(np.float64)


def pairwise_prf(pred, true) -> dict:
    _ci, _cj, nij, a, b = contingency(pred, true)
    tp = float((nij * (nij - 1) / 2).sum())
    pp = float((a * (a - 1) / 2).sum())
    tt = float((b * (b - 1) / 2).sum())
    p = tp / pp if pp else 1.0
    r = tp / tt if tt else 1.0
    return {"pairwise_precision": p, "pairwise_recall": r, "pairwise_f": _f(p, r)}


def bcubed_prf(pred, true) -> dict:
    ci, cj, nij, a, b = contingency(pred, true)
    n = float(a.sum())
    if n == 0:
        return {"bcubed_precision": 1.0, "bcubed_recall": 1.0, "bcubed_f": 1.0}
    p = float((nij**2 / a[ci]).sum() / n)
    r = float((nij**2 / b[cj]).sum() / n)
    return {"bcubed_precision": p, "bcubed_recall": r, "bcubed_f": _f(p, r)}


def nmi(pred, true) -> float:
    ci, cj, nij, a, b = contingency(pred, true)
    n = float(a.sum())
    if n == 0:
        return 1.0
    hp = -float((a / n * np.log(a / n)).sum())
    ht = -float((b / n * np.log(b / n)).sum())
    if hp == 0 and ht == 0:
        return 1.0
    mi = float((nij / n * np.log(nij * n / (a[ci] * b[cj]))).sum())
    denom = (hp + ht) / 2
    return max(0.0, min(1.0, mi / denom)) if denom > 0 else 0.0


def evaluate(pred, true) -> dict:
    """All metrics plus the number of predicted and true clusters."""
    out = {}
    out.update(pairwise_prf(pred, true))
    out.update(bcubed_prf(pred, true))
    out["nmi"] = nmi(pred, true)
    out["n_pred_clusters"] = len(np.unique(pred))
    out["n_true_clusters"] = len(np.unique(true))
    out.update(largest_cluster(pred, true))
    return out


def largest_cluster(pred, true) -> dict:
    """Size of the largest predicted cluster and how many true identities it holds: a giant merge
    (many people in one identity) shows here long before it moves BCubed F."""
    ci, _cj, _nij, a, _b = contingency(pred, true)
    if len(a) == 0:
        return {"largest_pred_cluster": 0, "largest_pred_true_ids": 0}
    big = int(np.argmax(a))
    return {"largest_pred_cluster": int(a[big]), "largest_pred_true_ids": int((ci == big).sum())}
