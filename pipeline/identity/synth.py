"""Synthetic identity mixtures for the scale benchmark.

Generator (D dims, all vectors L2-normalised at the end):

    m            a fixed random unit "mean face" direction
    u_c, n_f     i.i.d. N(0, I/D)            (identity offset, per-face noise)
    tau_c        identity spread around m:   tau * exp(tau_logsd * z_c),  z_c ~ N(0,1)
    sigma_c      per-identity face spread:   sigma * exp(sigma_logsd * w_c), w_c ~ N(0,1)
    centre_c   = m + tau_c * u_c             (identity c: a random point in a cap of the sphere)
    face_f     = normalise(centre_c + sigma_c * n_f)

The common direction m is needed because real face descriptors live in a narrow cone: dlib's
different-person cosine has median ~0.82, not ~0 as for independent random directions.

Cluster sizes are heavy-tailed: 1 + floor(Pareto(alpha)) * size_scale, capped at ``max_size``,
drawn until N faces are reached (the last identity is truncated).

Presets (``PRESETS``):

- ``"dlib"`` (D=128) fitted to the 125 labelled photos in ``shared/data/faces`` embedded with
  dlib's ResNet descriptor (HOG detector, 5-point alignment), L2-normalised. Measured there:
  same-person cosine median 0.973 / p5 0.941, different-person median 0.821 / p95 0.876.
  :func:`fit_to` searched (tau, tau_logsd, sigma, sigma_logsd) to match those four quantiles;
  the fitted values are in ``PRESETS["dlib"]`` and the generator reproduces them to 1e-4 (fit: tau=0.430, tau_logsd=0.173, sigma=0.188,
  sigma_logsd=0.256; reproduced quantiles 0.9727 / 0.9408 / 0.8210 / 0.8757).
- ``"arcface"`` (D=512): NOT fitted (no ArcFace weights here): same-person cosine ~0.6,
  different-person ~0.0 +- 0.05, i.e. tau large (independent identities), sigma ~0.8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SynthParams:
    dim: int = 128
    tau: float = 0.430  # fitted to the dlib photos (see module docstring)
    tau_logsd: float = 0.173
    sigma: float = 0.188
    sigma_logsd: float = 0.256
    alpha: float = 1.3  # Pareto tail of cluster sizes
    size_scale: float = 3.0
    max_size: int = 2000


PRESETS = {
    "dlib": SynthParams(),
    "arcface": SynthParams(dim=512, tau=20.0, tau_logsd=0.0, sigma=0.8, sigma_logsd=0.15),
}


@dataclass
class SynthMixture:
    embeddings: np.ndarray  # float32 (N, D), L2-normalised
    labels: np.ndarray  # int64 (N,), identity of each face
    params: dict


def cluster_sizes(n: int, p: SynthParams, rng: np.random.Generator) -> np.ndarray:
    sizes = []
    total = 0
    while total < n:
        s = 1 + rng.pareto(p.alpha, size=max(1024, (n - total) // 4)) * p.size_scale
        s = np.minimum(s.astype(np.int64), p.max_size)
        cs = np.cumsum(s)
        take = int(np.searchsorted(cs, n - total, side="left")) + 1
        s = s[:take]
        sizes.append(s)
        total += int(s.sum())
    sizes = np.concatenate(sizes)
    sizes[-1] -= int(sizes.sum()) - n
    return sizes[sizes > 0]


def make_mixture(
    n: int, preset: str | SynthParams = "dlib", seed: int = 0, dim: int | None = None, block: int = 262_144
) -> SynthMixture:
    """N faces from the generator above; memory ~ N x D x 4 bytes (+ one block of float64)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if dim is not None and dim != p.dim:
        p = SynthParams(**{**asdict(p), "dim": dim})
    rng = np.random.default_rng(seed)
    D = p.dim
    m = rng.standard_normal(D)
    m /= np.linalg.norm(m)
    sizes = cluster_sizes(n, p, rng)
    C = len(sizes)
    tau_c = p.tau * np.exp(p.tau_logsd * rng.standard_normal(C))
    sigma_c = p.sigma * np.exp(p.sigma_logsd * rng.standard_normal(C))
    centres = (m[None, :] + tau_c[:, None] * rng.standard_normal((C, D)) / np.sqrt(D)).astype(np.float32)
    labels = np.repeat(np.arange(C, dtype=np.int64), sizes)
    # shuffle faces so identities are not contiguous (a realistic input order)
    perm = rng.permutation(n)
    labels = labels[perm]
    E = np.empty((n, D), dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        lab = labels[s:e]
        x = centres[lab] + (sigma_c[lab, None] * rng.standard_normal((e - s, D)) / np.sqrt(D)).astype(
            np.float32
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        E[s:e] = x
    return SynthMixture(E, labels, dict(asdict(p), n=n, n_identities=C, seed=seed))


def pair_quantiles(E: np.ndarray, labels: np.ndarray) -> dict:
    """Same/different-identity cosine quantiles over all pairs (small sets only)."""
    S = E @ E.T
    iu = np.triu_indices(len(labels), 1)
    s = S[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    return {
        "same_median": float(np.median(s[same])),
        "same_p5": float(np.percentile(s[same], 5)),
        "diff_median": float(np.median(s[~same])),
        "diff_p95": float(np.percentile(s[~same], 95)),
    }


def fit_to(
    target: dict, dim: int = 128, seed: int = 0, n_ids: int = 150, per_id: int = 6
) -> tuple[SynthParams, dict]:
    """Coarse grid + Nelder-Mead search of (tau, tau_logsd, sigma, sigma_logsd) to match ``target`` quantiles."""
    from scipy.optimize import minimize

    keys = ("same_median", "same_p5", "diff_median", "diff_p95")

    def sample(x):
        tau, tls, sig, sls = np.abs(x)
        p = SynthParams(
            dim=dim,
            tau=tau,
            tau_logsd=tls,
            sigma=sig,
            sigma_logsd=sls,
            alpha=50,
            size_scale=0,
            max_size=per_id,
        )
        rng = np.random.default_rng(seed)
        m = rng.standard_normal(dim)
        m /= np.linalg.norm(m)
        tc = p.tau * np.exp(p.tau_logsd * rng.standard_normal(n_ids))
        sc = p.sigma * np.exp(p.sigma_logsd * rng.standard_normal(n_ids))
        cen = m + tc[:, None] * rng.standard_normal((n_ids, dim)) / np.sqrt(dim)
        lab = np.repeat(np.arange(n_ids), per_id)
        X = cen[lab] + sc[lab, None] * rng.standard_normal((len(lab), dim)) / np.sqrt(dim)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        return pair_quantiles(X.astype(np.float32), lab)

    def loss(x):
        q = sample(x)
        return sum((q[k] - target[k]) ** 2 for k in keys)

    best = min(
        (
            [t, tl, s, sl]
            for t in (0.3, 0.45, 0.6)
            for tl in (0.0, 0.2)
            for s in (0.12, 0.18, 0.25)
            for sl in (0.0, 0.3)
        ),
        key=loss,
    )
    res = minimize(loss, best, method="Nelder-Mead", options={"maxiter": 120, "xatol": 1e-3, "fatol": 1e-7})
    tau, tls, sig, sls = np.abs(res.x)
    p = SynthParams(dim=dim, tau=float(tau), tau_logsd=float(tls), sigma=float(sig), sigma_logsd=float(sls))
    return p, sample(res.x)
