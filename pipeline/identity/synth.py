"""Synthetic identity mixtures for the scale benchmark and tests.

Generator (D dims, every face L2-normalised at the end):

    m            a fixed random unit "mean face" direction
    u_c, n_f     i.i.d. N(0, I/D)              (identity offset, per-face noise)
    z_c, w_c     Student-t(spread_df), clipped to +-6  (heavy-tailed spreads)
    tau_c        identity offset from m:       tau * exp(tau_logsd * z_c)
    sigma_c      per-identity face spread:     sigma * exp(sigma_logsd * w_c)
    centre_c   = m + tau_c * u_c
    face_f     = normalise(centre_c + sigma_c * n_f)

Why each piece:

- The common direction m: real face descriptors live in a narrow cone (dlib's different-person
  cosine has median ~0.82, not ~0 as for independent random directions).
- Heavy-tailed spreads: a few identities sit very close to the mean face (generic-looking people
  who crowd together) or scatter widely (photos across decades, poor detections); log-normal
  spreads have almost no such identities.
- Look-alikes: a share ``lookalike_share`` of identities are near-copies of another identity
  (twins, siblings, doubles): centre_c = centre_parent + lookalike_tau * u_c. ``lookalike_tau``
  is NOT fitted (19 people hold no look-alike pair): it is set so that the faces of a look-alike
  pair have median cosine ~0.92 (see :func:`lookalike_pair_median`), above every
  different-person pair of the labelled photos (max 0.919) and below most same-person pairs
  (p5 0.941), i.e. right at the dlib threshold 0.93.
- Identity sizes: ``singleton_share`` of the faces belong to people seen once (strangers in the
  background); the other identities have Zipf sizes, P(s) ~ s^-zipf_a for 2 <= s <= max_size.

Presets (``PRESETS``):

- ``"dlib"`` (D=128): (tau, tau_logsd, sigma, sigma_logsd) fitted by :func:`fit_to` (with the
  heavy tails and look-alikes in place) to six quantiles of the cosine similarities between the
  125 labelled photos in ``shared/data/faces`` (dlib ResNet descriptor, HOG detector, 5-point
  alignment, L2-normalised), stored in :data:`DLIB_PHOTO_QUANTILES`. Photos: same-person median /
  p5 / p1 0.9724 / 0.9407 / 0.9127, different-person median / p95 / p99 0.8208 / 0.8766 / 0.8962;
  generator (300 identities x 6 faces): 0.9693 / 0.9437 / 0.9118 and 0.8205 / 0.8765 / 0.8968.
  The residual (~0.003 on the same-person median and p5) is the shape the two log-t spreads
  cannot bend to; look-alike faces: median cosine 0.9205.
- ``"arcface"`` (D=512): NOT fitted (no ArcFace weights here): tau large (independent
  identities, different-person cosine ~0.00 +- 0.045), sigma = 16.3 puts the same-person median
  at ~0.61; the look-alike offset (23) puts look-alike faces at ~0.45, the ArcFace threshold.
  Earlier versions had sigma = 0.8 here, which gave same-person cosine ~0.998, not the ~0.6 the
  docstring claimed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

# Cosine quantiles over all pairs of the 125 labelled photos (19 people, 417 same-person and 7,333
# different-person pairs), dlib descriptors L2-normalised. Measured with
# pipeline.faces.folders.labelled_embeddings + pair_quantiles (tests/test_identity_realfaces.py checks them).
DLIB_PHOTO_QUANTILES = {
    "same_median": 0.9724,
    "same_p5": 0.9407,
    "same_p1": 0.9127,
    "diff_median": 0.8208,
    "diff_p95": 0.8766,
    "diff_p99": 0.8962,
}
SPREAD_CLIP = 6.0  # clip of the Student-t draws (t(3) would otherwise give absurd spreads at 1M)


@dataclass(frozen=True)
class SynthParams:
    dim: int = 128
    tau: float = 0.4202  # fitted to the dlib photos (see module docstring and fit_to)
    tau_logsd: float = 0.1626
    sigma: float = 0.1859
    sigma_logsd: float = 0.1848
    spread_df: float = 3.0  # Student-t degrees of freedom of log sigma_c (heavy tail); inf -> log-normal
    tau_df: float = float("inf")  # the same for log tau_c
    zipf_a: float = 2.0  # identity sizes (>= 2) ~ s^-zipf_a
    max_size: int = 2000
    singleton_share: float = 0.2  # share of faces whose person appears once
    lookalike_share: float = 0.05  # share of identities that are near-copies of another identity
    lookalike_tau: float = 0.36  # offset of a look-alike's centre from its parent's


PRESETS = {
    "dlib": SynthParams(),
    "arcface": SynthParams(
        dim=512, tau=20.0, tau_logsd=0.0, sigma=16.3, sigma_logsd=0.15, lookalike_tau=23.0
    ),
}


@dataclass
class SynthMixture:
    embeddings: np.ndarray  # float32 (N, D), L2-normalised
    labels: np.ndarray  # int64 (N,), identity of each face
    params: dict
    lookalike_of: np.ndarray | None = None  # int64 (identities,): parent identity or -1
    face_spread: np.ndarray | None = None  # float64 (identities,): sigma_c


def identity_sizes(n: int, p: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """Faces per identity summing to ``n``: singletons plus Zipf sizes in [2, max_size]."""
    if n <= 0:
        return np.zeros(0, np.int64)
    n_single = round(n * p.singleton_share)
    n_rec = n - n_single
    parts = [np.ones(n_single, np.int64)]
    if n_rec > 0:
        support = np.arange(2, max(2, p.max_size) + 1)
        pmf = support.astype(np.float64) ** -p.zipf_a
        pmf /= pmf.sum()
        mean = float(support @ pmf)
        total = 0
        while total < n_rec:
            s = rng.choice(support, size=max(64, int((n_rec - total) / mean * 1.1) + 1), p=pmf)
            take = int(np.searchsorted(np.cumsum(s), n_rec - total, side="left")) + 1
            s = s[:take].astype(np.int64)
            s[-1] -= max(0, int(s.sum()) - (n_rec - total))  # truncate the last identity
            parts.append(s)
            total += int(s.sum())
    sizes = np.concatenate(parts)
    return sizes[sizes > 0]


def _spread(rng: np.random.Generator, df: float, n: int) -> np.ndarray:
    z = rng.standard_t(df, n) if np.isfinite(df) else rng.standard_normal(n)
    return np.clip(z, -SPREAD_CLIP, SPREAD_CLIP)


def _identities(C: int, p: SynthParams, rng: np.random.Generator):
    """(centres float32 C x D, per-identity face spread, look-alike parent or -1), mean face m."""
    D = p.dim
    m = rng.standard_normal(D)
    m /= np.linalg.norm(m)
    tau_c = p.tau * np.exp(p.tau_logsd * _spread(rng, p.tau_df, C))
    sigma_c = p.sigma * np.exp(p.sigma_logsd * _spread(rng, p.spread_df, C))
    centres = np.empty((C, D), dtype=np.float32)
    for s in range(0, C, 65_536):  # blocks keep the float64 temporaries small
        e = min(C, s + 65_536)
        centres[s:e] = m + tau_c[s:e, None] * rng.standard_normal((e - s, D)) / np.sqrt(D)
    parent = np.full(C, -1, dtype=np.int64)
    n_look = round(p.lookalike_share * C) if C >= 2 else 0
    if n_look:
        look = rng.choice(C, size=n_look, replace=False)
        others = np.setdiff1d(np.arange(C), look)  # parents are never look-alikes themselves
        if len(others):
            parent[look] = others[rng.integers(0, len(others), size=n_look)]
            offs = p.lookalike_tau * rng.standard_normal((n_look, D)) / np.sqrt(D)
            centres[look] = centres[parent[look]] + offs.astype(np.float32)
    return centres, sigma_c, parent


def _faces(centres, sigma_c, labels, rng, block: int = 262_144, out: np.ndarray | None = None) -> np.ndarray:
    n, D = len(labels), centres.shape[1]
    if out is not None and (out.shape != (n, D) or out.dtype != np.float32):
        raise ValueError(f"out must be float32 {(n, D)}, got {out.dtype} {out.shape}")
    E = np.empty((n, D), dtype=np.float32) if out is None else out
    for s in range(0, n, block):
        e = min(n, s + block)
        lab = labels[s:e]
        noise = rng.standard_normal((e - s, D), dtype=np.float32) / np.float32(np.sqrt(D))
        x = centres[lab] + sigma_c[lab, None].astype(np.float32) * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        E[s:e] = x
    return E


def _resolve(preset: str | SynthParams, dim: int | None) -> SynthParams:
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if dim is not None and dim != p.dim:
        p = replace(p, dim=dim)
    return p


def make_mixture(
    n: int, preset: str | SynthParams = "dlib", seed: int = 0, dim: int | None = None,
    out: np.ndarray | None = None,
) -> SynthMixture:
    """N faces from the generator above, in random order; memory ~ N x D x 4 bytes, or written into
    ``out`` (float32 N x D, e.g. a memory-mapped .npy from ``np.lib.format.open_memmap``: 10M x 128
    is 5.1 GB) block by block; the same faces either way."""
    p = _resolve(preset, dim)
    rng = np.random.default_rng(seed)
    sizes = identity_sizes(n, p, rng)
    C = len(sizes)
    centres, sigma_c, parent = _identities(C, p, rng)
    labels = np.repeat(np.arange(C, dtype=np.int64), sizes)
    labels = labels[rng.permutation(n)]  # identities are not contiguous (a realistic input order)
    E = _faces(centres, sigma_c, labels, rng, out=out)
    info = dict(
        asdict(p),
        n=n,
        n_identities=C,
        n_singletons=int((sizes == 1).sum()),
        n_lookalikes=int((parent >= 0).sum()),
        largest_identity=int(sizes.max()) if C else 0,
        seed=seed,
    )
    return SynthMixture(E, labels, info, parent, sigma_c)


def pair_quantiles(E: np.ndarray, labels: np.ndarray) -> dict:
    """Same/different-identity cosine quantiles over all pairs (small sets only)."""
    S = E @ E.T
    iu = np.triu_indices(len(labels), 1)
    s = S[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    return {
        "same_median": float(np.median(s[same])),
        "same_p5": float(np.percentile(s[same], 5)),
        "same_p1": float(np.percentile(s[same], 1)),
        "diff_median": float(np.median(s[~same])),
        "diff_p95": float(np.percentile(s[~same], 95)),
        "diff_p99": float(np.percentile(s[~same], 99)),
    }


def equal_size_sample(p: SynthParams, n_ids: int = 300, per_id: int = 6, seed: int = 0):
    """(embeddings, labels, look-alike parents) of ``n_ids`` identities x ``per_id`` faces (for fits)."""
    rng = np.random.default_rng(seed)
    centres, sigma_c, parent = _identities(n_ids, p, rng)
    labels = np.repeat(np.arange(n_ids, dtype=np.int64), per_id)
    return _faces(centres, sigma_c, labels, rng), labels, parent


def lookalike_pair_median(p: SynthParams, n_pairs: int = 400, per_id: int = 6, seed: int = 0) -> float:
    """Median cosine between faces of an identity and faces of its look-alike."""
    p1 = replace(p, lookalike_share=0.5)
    E, y, parent = equal_size_sample(p1, 2 * n_pairs, per_id, seed)
    look = np.flatnonzero(parent >= 0)
    sims = []
    for c in look[:n_pairs]:
        a, b = E[y == c], E[y == parent[c]]
        sims.append((a @ b.T).ravel())
    return float(np.median(np.concatenate(sims)))


FIT_KEYS = ("same_median", "same_p5", "same_p1", "diff_median", "diff_p95", "diff_p99")


def fit_to(
    target: dict, base: SynthParams | None = None, seed: int = 0, n_ids: int = 300, per_id: int = 6
) -> tuple[SynthParams, dict]:
    """Coarse grid + Nelder-Mead search of (tau, tau_logsd, sigma, sigma_logsd) so that the pair
    quantiles of an equal-size sample match ``target`` (keys of FIT_KEYS present in it); the other
    fields (tails, look-alikes, sizes) stay as in ``base``."""
    from scipy.optimize import minimize

    base = base or SynthParams()
    keys = [k for k in FIT_KEYS if k in target]

    def params(x):
        tau, tls, sig, sls = np.abs(x)
        return replace(base, tau=float(tau), tau_logsd=float(tls), sigma=float(sig), sigma_logsd=float(sls))

    def sample(x):
        E, y, _ = equal_size_sample(params(x), n_ids, per_id, seed)
        return pair_quantiles(E, y)

    def loss(x):
        q = sample(x)
        return sum((q[k] - target[k]) ** 2 for k in keys)

    grid = [
        [t, tl, s, sl]
        for t in (0.3, 0.45, 0.6)
        for tl in (0.05, 0.2)
        for s in (0.12, 0.18, 0.25)
        for sl in (0.05, 0.3)
    ]
    best = min(grid, key=loss)
    res = minimize(loss, best, method="Nelder-Mead", options={"maxiter": 200, "xatol": 1e-4, "fatol": 1e-8})
    return params(res.x), sample(res.x)
