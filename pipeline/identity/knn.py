"""k-nearest-neighbour graph over L2-normalised embeddings (cosine similarity = inner product).

``knn_graph(E, k)`` returns a :class:`KnnGraph` with ``indices`` (int64, N x k) and
``similarities`` (float32, N x k), rows sorted by decreasing similarity, the query itself
excluded. Where fewer than k neighbours exist (N <= k) the row is padded with index -1 and
similarity -inf.

Backends (``backend=``):

- ``"faiss-flat"``: exact, ``faiss.IndexFlatIP``. Queries are processed in blocks of
  ``block_size`` rows, so the working set is N x D (the index) + block x (k+1), never N x N.
- ``"ivf-blas"`` (the CPU default above ``exact_max``): an IVF self-join done as matrix
  products, see :func:`knn_ivf_blas`. Cells from a two-level spherical k-means (4 sqrt(N) cells);
  each cell's members are multiplied with every face that probes the cell in one BLAS call, in a
  thread pool over cells; a face first meets its own cell, which sets its bound, and afterwards
  a row is examined only if its maximum beats the bound; edges above the clustering threshold
  then pull in the cells of the faces they reach (identities cut by a cell border are joined up
  again). The 20% of faces nearest a cell border are also listed in their second-best cell
  (``spill``), so most pairs cut by a border meet in the own-cell join. The probe count grows
  (2, 4, ... up to 24 cells) until the recall of the exact
  neighbours above ``recall_min_similarity`` on 1,000 sampled faces reaches ``target_recall``
  (0.95). Similarities are exact float32 inner products. Deterministic for a seed, whatever the
  thread count. Figures: docs/benchmarks.md, "Identity clustering at scale". Options (module defaults
  IVF_BLAS_SPILL, IVF_BLAS_REVERSE, IVF_BLAS_COARSE_PROBES, IVF_BLAS_CELLS_PER_SQRT_N; measured
  side by side in docs/benchmarks.md, "ivf-blas variants"): ``spill`` lists the faces nearest a cell
  border also in their second-best cell, ``reverse`` offers each found pair to both ends.
- ``"faiss-ivf"``: ``faiss.IndexIVFScalarQuantizer`` (8-bit) + exact re-rank (the default
  before ivf-blas; kept for comparison): ``nlist = round(4 * sqrt(N))``, ``nprobe`` doubled from
  ``max(8, nlist // 64)`` (from 1 with a similarity floor) until the sampled recall reaches
  ``target_recall``.
- ``"faiss-hnsw"``: ``faiss.IndexHNSWFlat``, M=32, efConstruction=40, efSearch calibrated the same
  way. With ``deterministic=True`` (default) the graph is built single-threaded (a multi-threaded
  HNSW build is not reproducible): far too slow at 1M faces.
- ``"faiss-gpu"``: exact ``IndexFlatIP`` cloned to GPU 0 (needs faiss-gpu and
  ``faiss.get_num_gpus() > 0``).
- ``"torch"``: exact; pipeline/identity/knn_torch.py: the database stays on the GPU in half
  precision, products in fp16, a two-level top-k (group maxima, then the chosen groups) instead
  of a full-width top-k, and a float32 re-rank of k + 17 candidates. Runs on CUDA when torch
  sees one, else on CPU (the same code; used by the tests).
- ``"auto"``: faiss-gpu if faiss sees a GPU; else torch on CUDA; else faiss-flat when
  N <= ``exact_max`` (default 50,000); else ivf-blas.

``recall_min_similarity``: the approximate backends calibrate their search effort on the recall
of the exact neighbours whose similarity is >= this floor (the only edges a thresholded
clustering keeps) instead of plain recall@k; ivf-blas also expands only through those edges.
build_identities passes the clustering threshold. The neighbours below the floor are therefore
approximate (recall@10 ~0.7 at 100k synthetic faces for ivf-blas): they feed only the
nearest-neighbour similarity column and the histograms.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)  # one line per ivf-blas step: a long build (10M faces) shows where it is

EXACT_MAX_DEFAULT = 50_000
DEFAULT_BLOCK = 16_384
BACKENDS = ("auto", "faiss-flat", "ivf-blas", "faiss-hnsw", "faiss-ivf", "faiss-gpu", "torch")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40


@dataclass
class KnnGraph:
    indices: np.ndarray  # int64 (N, k); -1 where no neighbour
    similarities: np.ndarray  # float32 (N, k); -inf where no neighbour
    backend: str
    params: dict = field(default_factory=dict)
    seconds: float = 0.0
    # ivf-blas only: (IvfIndex, each face's cell), kept with the identities for incremental refreshes
    index: tuple | None = None

    def __iter__(self):  # allows ``I, S = knn_graph(...)``
        yield self.indices
        yield self.similarities

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def load_embeddings(source: np.ndarray | str | Path, mmap: bool = True) -> np.ndarray:
    """Embeddings from an array or a .npy path (memory-mapped read-only by default)."""
    if isinstance(source, (str, Path)):
        return np.load(source, mmap_mode="r" if mmap else None)
    return source


def _check(E: np.ndarray) -> np.ndarray:
    if E.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N x D), got shape {E.shape}")
    if E.dtype != np.float32:
        raise ValueError(f"embeddings must be float32, got {E.dtype}")
    return E


def _block(E: np.ndarray, s: int, e: int) -> np.ndarray:
    return np.ascontiguousarray(E[s:e], dtype=np.float32)


def _drop_self(
    I: np.ndarray, S: np.ndarray, first: int, k: int, qids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per query remove the query itself (or the last column if it is absent).
    Query ids: ``first`` + row, or ``qids``."""
    n = I.shape[0]
    qid = (np.arange(first, first + n, dtype=np.int64) if qids is None else np.asarray(qids))[:, None]
    is_self = I == qid
    # keep the first k entries that are not the query itself
    keep = ~is_self
    no_self = ~is_self.any(axis=1)
    keep[no_self, -1] = False  # self not found (ties/approximate): drop the worst
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(I, order, 1), np.take_along_axis(S, order, 1)


def _finalise(I: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    I = I.astype(np.int64, copy=False)
    S = S.astype(np.float32, copy=False)
    bad = I < 0
    if bad.any():
        I[bad] = -1
        S[bad] = -np.inf
    return I, S


def _search_blocked(index, E: np.ndarray, k: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    N = E.shape[0]
    kk = min(k + 1, N)
    I = np.empty((N, k), dtype=np.int64)
    S = np.empty((N, k), dtype=np.float32)
    for s in range(0, N, block_size):
        e = min(N, s + block_size)
        Sb, Ib = index.search(_block(E, s, e), kk)
        if kk < k + 1:  # pad so that dropping self leaves k columns
            pad = k + 1 - kk
            Ib = np.concatenate([Ib, np.full((e - s, pad), -1, np.int64)], 1)
            Sb = np.concatenate([Sb, np.full((e - s, pad), -np.inf, np.float32)], 1)
        Ib, Sb = _drop_self(Ib, Sb, s, k)
        I[s:e], S[s:e] = Ib, Sb
    return _finalise(I, S)


def _add_blocked(index, E: np.ndarray, block_size: int) -> None:
    for s in range(0, E.shape[0], block_size):
        index.add(_block(E, s, min(E.shape[0], s + block_size)))


def _faiss():
    import faiss

    return faiss


def knn_faiss_flat(E: np.ndarray, k: int, block_size: int = DEFAULT_BLOCK, gpu: bool = False):
    faiss = _faiss()
    index = faiss.IndexFlatIP(E.shape[1])
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    _add_blocked(index, E, block_size)
    return _search_blocked(index, E, k, block_size)


def ivf_params(N: int) -> dict:
    """Parameters of the faiss IVF backend chosen from N (see module docstring)."""
    nlist = round(4 * math.sqrt(N))
    nlist = max(1, min(nlist, N // 39 if N >= 39 else 1))
    return {"nlist": nlist, "nprobe_start": max(8, nlist // 64), "train_size": min(N, 64 * nlist)}


def recall_at_k(approx_I: np.ndarray, exact_I: np.ndarray, block: int = 65_536) -> float:
    """Mean fraction of the exact neighbours (ignoring -1) found among the approximate ones."""
    hits = total = 0
    for s in range(0, len(exact_I), block):
        a, b = approx_I[s : s + block], exact_I[s : s + block]
        valid = b >= 0
        hits += int(((b[:, :, None] == a[:, None, :]).any(2) & valid).sum())
        total += int(valid.sum())
    return hits / max(total, 1)


def recall_by_similarity(
    E: np.ndarray, queries: np.ndarray, exact_I: np.ndarray, approx_S: np.ndarray, tol: float = 1e-6
) -> float:
    """Recall that counts ties as found: for a query with m exact neighbours (ids >= 0 in
    ``exact_I``), the hits are min(m, approximate neighbours whose similarity reaches the m-th
    exact similarity). Equals :func:`recall_at_k` without ties; with duplicate embeddings any of
    the equal neighbours counts (by id, 30k copies of one face read as recall 0.5)."""
    valid = exact_I >= 0
    m = valid.sum(1)
    if m.sum() == 0:
        return 1.0
    Q = np.asarray(E[queries], dtype=np.float32)
    X = np.asarray(E[np.maximum(exact_I, 0).ravel()], np.float32).reshape(*exact_I.shape, -1)
    sims = np.where(valid, np.einsum("qd,qkd->qk", Q, X), np.inf)
    tau = sims.min(1)  # the m-th exact similarity
    hits = np.minimum(m, (approx_S >= tau[:, None] - tol).sum(1))
    return float(hits[m > 0].sum() / m.sum())


def _top_columns(S: np.ndarray, t: int, group: int = 16) -> np.ndarray:
    """Column indices of the t largest values of every row of S (unordered).

    Exact: the t largest values of a row lie in the t column groups with the largest maxima, so
    after one cheap max over groups only t x group values per row are partitioned (argpartition
    over a whole row costs ~9 ns a value here, twice the matrix product that made it)."""
    r, m = S.shape
    if m <= t:
        return np.broadcast_to(np.arange(m), S.shape)
    if m < 4 * group * t:
        return np.argpartition(S, m - t, axis=1)[:, m - t :]
    w = m // group
    G = S[:, : w * group].reshape(r, group, w).max(1)  # group j = columns j, j + w, ..., j + (group-1) w
    top = np.argpartition(G, w - t, axis=1)[:, w - t :]
    cols = (top[:, :, None] + w * np.arange(group)[None, None, :]).reshape(r, t * group)
    if w * group < m:
        cols = np.concatenate([cols, np.broadcast_to(np.arange(w * group, m), (r, m - w * group))], 1)
    p = np.argpartition(np.take_along_axis(S, cols, 1), cols.shape[1] - t, axis=1)[:, -t:]
    return np.take_along_axis(cols, p, 1)


def _unique_sorted(x: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's hash-based np.unique is several times slower on int64)."""
    x = np.sort(x)
    if len(x) == 0:
        return x
    keep = np.empty(len(x), bool)
    keep[0] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _sort_rows(I: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows by decreasing similarity, ties by increasing index (-1 padding last)."""
    o = np.lexsort((np.where(I < 0, np.iinfo(np.int64).max, I), -S), axis=-1)
    return np.take_along_axis(I, o, 1), np.take_along_axis(S, o, 1)


def exact_neighbours_of(E: np.ndarray, queries: np.ndarray, k: int, block_size: int = 65_536) -> np.ndarray:
    """Exact top-k indices (self excluded) for the given query row ids, streaming the database."""
    queries = np.asarray(queries, dtype=np.int64)
    Q = np.ascontiguousarray(E[queries], dtype=np.float32)
    N = E.shape[0]
    kk = min(k + 1, N)
    best_S = np.full((len(queries), kk), -np.inf, dtype=np.float32)
    best_I = np.full((len(queries), kk), -1, dtype=np.int64)
    for s in range(0, N, block_size):
        e = min(N, s + block_size)
        sims = Q @ _block(E, s, e).T
        part = _top_columns(sims, kk)
        allS = np.concatenate([best_S, np.take_along_axis(sims, part, 1)], 1)
        allI = np.concatenate([best_I, part.astype(np.int64) + s], 1)
        allI, allS = _sort_rows(allI, allS)
        best_I, best_S = allI[:, :kk], allS[:, :kk]
    out, _ = _drop_self_rows(best_I, queries, k)
    return out


def knn_faiss_ivf(
    E: np.ndarray,
    k: int,
    block_size: int = DEFAULT_BLOCK,
    target_recall: float = 0.95,
    calib_queries: int = 500,
    nprobe: int | None = None,
    seed: int = 0,
    min_sim: float | None = None,
    codec: str = "SQ8",
):
    """IVF search. codec "SQ8" scans 8-bit scalar-quantised vectors (a quarter of the memory
    traffic: ~2.4x faster IVF scans at 1M faces on 2 cores) and re-ranks a 2k shortlist with exact
    inner products (IndexRefineFlat), so similarities are exact; "Flat" scans float32."""
    faiss = _faiss()
    N, D = E.shape
    p = ivf_params(N)
    rng = np.random.default_rng(seed)
    train_ids = np.sort(rng.choice(N, size=p["train_size"], replace=False))
    quantizer = faiss.IndexFlatIP(D)
    if codec == "SQ8":
        ivf = faiss.IndexIVFScalarQuantizer(
            quantizer, D, p["nlist"], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        # the 8-bit codes only shortlist 2k candidates; a flat copy re-ranks them exactly
        index = faiss.IndexRefineFlat(ivf)
        index.k_factor = 2.0
    elif codec == "Flat":
        ivf = index = faiss.IndexIVFFlat(quantizer, D, p["nlist"], faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown IVF codec {codec!r}: use 'SQ8' or 'Flat'")
    ivf.cp.seed = seed
    t = time.perf_counter()
    index.train(np.ascontiguousarray(E[train_ids], dtype=np.float32))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    _add_blocked(index, E, block_size)
    add_s = time.perf_counter() - t
    info = dict(p, train_s=train_s, add_s=add_s, codec=codec)
    if nprobe is None:
        t = time.perf_counter()

        def _set(v):
            ivf.nprobe = v

        start = 1 if min_sim is not None else p["nprobe_start"]
        nprobe, rec, nq = _calibrate(
            index, _set, start, p["nlist"], E, k, target_recall, calib_queries, rng, min_sim
        )
        info.update(
            calib_recall=rec, calib_queries=nq, calib_s=time.perf_counter() - t, calib_min_sim=min_sim
        )
    ivf.nprobe = nprobe
    info["nprobe"] = nprobe
    t = time.perf_counter()
    I, S = _search_blocked(index, E, k, block_size)
    info["search_s"] = time.perf_counter() - t
    return I, S, info


def _calibrate(index, set_param, start: int, cap: int, E, k, target_recall, calib_queries, rng, min_sim=None):
    """Double a search-effort parameter until recall on sampled queries reaches ``target_recall``.

    With ``min_sim`` the recall counts only exact neighbours with similarity >= min_sim (the edges
    a thresholded clustering keeps); otherwise plain recall@k."""
    q = np.sort(rng.choice(E.shape[0], size=min(calib_queries, E.shape[0]), replace=False))
    exact = _floor_exact(E, q, exact_neighbours_of(E, q, k), min_sim)
    Q = np.ascontiguousarray(E[q], dtype=np.float32)
    v = min(start, cap)
    while True:
        set_param(v)
        _, Ia = index.search(Q, k + 1)
        Ia, _ = _drop_self_rows(Ia.astype(np.int64), q, k)
        rec = recall_at_k(Ia, exact) if (exact >= 0).any() else 1.0
        if rec >= target_recall or v >= cap:
            return v, rec, len(q)
        v = min(cap, v * 2)


def _floor_exact(E, queries: np.ndarray, exact: np.ndarray, min_sim: float | None) -> np.ndarray:
    """Exact neighbour ids with those below ``min_sim`` (and padding) set to -1."""
    if min_sim is None:
        return exact
    Q = np.asarray(E[queries], dtype=np.float32)
    sims = np.einsum(
        "qd,qkd->qk", Q, np.asarray(E[np.maximum(exact, 0).ravel()], np.float32).reshape(*exact.shape, -1)
    )
    out = exact.copy()
    out[(exact < 0) | (sims < min_sim)] = -1
    return out


def knn_faiss_hnsw(
    E: np.ndarray,
    k: int,
    block_size: int = DEFAULT_BLOCK,
    target_recall: float = 0.95,
    calib_queries: int = 500,
    ef_search: int | None = None,
    seed: int = 0,
    deterministic: bool = True,
    min_sim: float | None = None,
):
    faiss = _faiss()
    _N, D = E.shape
    index = faiss.IndexHNSWFlat(D, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    info: dict = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "deterministic_build": deterministic}
    t = time.perf_counter()
    nthreads = faiss.omp_get_max_threads()
    if deterministic:
        faiss.omp_set_num_threads(1)
    try:
        _add_blocked(index, E, block_size)
    finally:
        faiss.omp_set_num_threads(nthreads)
    info["add_s"] = time.perf_counter() - t
    if ef_search is None:
        t = time.perf_counter()
        rng = np.random.default_rng(seed)

        def _set(v):
            index.hnsw.efSearch = v

        ef_search, rec, nq = _calibrate(
            index, _set, max(32, k + 1), 1024, E, k, target_recall, calib_queries, rng, min_sim
        )
        info.update(
            calib_recall=rec, calib_queries=nq, calib_s=time.perf_counter() - t, calib_min_sim=min_sim
        )
    index.hnsw.efSearch = max(ef_search, k + 1)
    info["efSearch"] = index.hnsw.efSearch
    t = time.perf_counter()
    I, S = _search_blocked(index, E, k, block_size)
    info["search_s"] = time.perf_counter() - t
    return I, S, info


def _drop_self_rows(I: np.ndarray, qids: np.ndarray, k: int) -> tuple[np.ndarray, None]:
    """Per row the first k entries that are neither the query itself nor -1 (order kept)."""
    drop = (I == np.asarray(qids)[:, None]) | (I < 0)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(I, order, 1)
    out[np.take_along_axis(drop, order, 1)] = -1
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((len(out), k - out.shape[1]), -1, np.int64)], 1)
    return out, None


def _self_excluded(
    I: np.ndarray, S: np.ndarray, k: int, block: int = 262_144
) -> tuple[np.ndarray, np.ndarray]:
    """From rows of k+1 (query itself included, sorted) keep k, padded with -1 / -inf."""
    N = I.shape[0]
    if I.shape[1] < k + 1:
        pad = k + 1 - I.shape[1]
        I = np.concatenate([I, np.full((N, pad), -1, np.int64)], 1)
        S = np.concatenate([S, np.full((N, pad), -np.inf, np.float32)], 1)
    outI = np.empty((N, k), np.int64)
    outS = np.empty((N, k), np.float32)
    for s in range(0, N, block):
        e = min(N, s + block)
        outI[s:e], outS[s:e] = _drop_self(I[s:e], S[s:e], s, k)
    return _finalise(outI, outS)


def knn_torch(E, k: int, device: str | None = None, **kwargs):
    """Exact kNN with torch (see pipeline/identity/knn_torch.py): CUDA if available, else CPU."""
    from .knn_torch import knn_torch_exact

    if device is None:
        device = "cuda" if _torch_cuda() else "cpu"
    if device == "cpu":
        kwargs.setdefault("dtype", "float32")  # CPU half-precision products are slow, not cheaper
    I, S, info = knn_torch_exact(E, k, device=device, **kwargs)
    I, S = _self_excluded(I, S, k)
    return I, S, info


def _torch_cuda() -> bool:
    if not _nvidia_present():
        return False
    with contextlib.suppress(Exception):
        import torch

        return bool(torch.cuda.is_available())
    return False


# ---------------------------------------------------------------------------------------------
# ivf-blas: IVF self-join by cell-blocked matrix products (the CPU default above exact_max)

IVF_BLAS_CELLS_PER_SQRT_N = 4.0  # nlist = 4 sqrt(N): 1M faces -> 4,000 cells of ~250
# cells scanned per face before the first recall check; with the spilled listing 2 (then +2 at a
# time): at 1M and 2M faces that reached the recall target with 8 and 12 cells where listing each
# face once needed 12 and 20 from 6 (docs/benchmarks.md, "ivf-blas variants")
IVF_BLAS_NPROBE = 2
IVF_BLAS_MAX_PROBES = 24  # cap of the probe growth (4 x nprobe when that is more)
IVF_BLAS_PROBE_STEP = 2  # probes added per face when the sampled recall is short of the target
IVF_BLAS_MAX_ROUNDS = 8
IVF_BLAS_TRAIN_PER_CELL = 32
IVF_BLAS_SPILL = 0.2  # fraction of faces also listed in their second-best cell (knn_ivf_blas)
IVF_BLAS_REVERSE = False  # offer each found pair to both ends (knn_ivf_blas)
IVF_BLAS_ADAPTIVE = True  # further probes only for the faces the last probe step improved (knn_ivf_blas; docs/benchmarks.md "10M faces")
# adaptive probing: a face stops probing after this many steps in a row that did not improve it (1: the first)
IVF_BLAS_PATIENCE = 1
# coarse cells searched for a face's best cells; None: by the number of cells (ivf_blas_coarse_probes)
IVF_BLAS_COARSE_PROBES: int | None = None
# Up to this many cells 8 coarse probes, above it 16. Measured (docs/benchmarks.md "ivf-blas variants"): 8
# found the true best cell for 93.7% of faces at 1M (4,004 cells) and 16 cost 6% more there; at 2M (5,668
# cells) 16 found it for 99.0% against 94.7% and cut the kNN's CPU-s by 16%; at 10M (12,660 cells) 8 left the
# sampled recall at 0.912 after 24 probes. 4 probes lost ~1% recall at 1M.
IVF_BLAS_COARSE_WIDE_ABOVE = 5_000
_SCAN_CHUNK = 1 << 22  # similarities per matrix product and thread (16 MiB of float32)


def ivf_blas_coarse_probes(nlist: int) -> int:
    if IVF_BLAS_COARSE_PROBES is not None:
        return IVF_BLAS_COARSE_PROBES
    return 8 if nlist <= IVF_BLAS_COARSE_WIDE_ABOVE else 16


def ivf_blas_nlist(N: int, cells_per_sqrt_n: float | None = None) -> int:
    cells_per_sqrt_n = IVF_BLAS_CELLS_PER_SQRT_N if cells_per_sqrt_n is None else cells_per_sqrt_n
    return max(1, min(round(cells_per_sqrt_n * math.sqrt(N)), N // 39 if N >= 39 else 1))


def _kmeans(X: np.ndarray, n: int, seed: int, niter: int = 10) -> np.ndarray:
    faiss = _faiss()
    km = faiss.Kmeans(
        X.shape[1],
        n,
        niter=niter,
        seed=seed,
        spherical=True,
        max_points_per_centroid=1 << 30,
        min_points_per_centroid=1,
    )
    km.train(X)
    return km.centroids


def _train_cells(E: np.ndarray, nlist: int, seed: int, pool) -> tuple[np.ndarray, np.ndarray]:
    """(cell centroids, coarse centroids): two-level spherical k-means on a sample of
    IVF_BLAS_TRAIN_PER_CELL x nlist faces. ~sqrt(nlist) coarse cells, each split into cells in
    proportion to its share of the sample: cheap to train and to search, and the cells are more
    even than one flat k-means (whose centroids near the mean face collect thousands of faces)."""
    N = E.shape[0]
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(N, size=min(N, IVF_BLAS_TRAIN_PER_CELL * nlist), replace=False))
    X = np.ascontiguousarray(E[ids], dtype=np.float32)
    nc = max(1, min(len(X), round(math.sqrt(nlist))))
    coarse = _kmeans(X, nc, seed)
    a = _faiss().knn(X, coarse, 1, metric=_faiss().METRIC_INNER_PRODUCT)[1][:, 0]
    counts = np.bincount(a, minlength=nc)
    share = np.clip(np.round(nlist * counts / counts.sum()).astype(np.int64), 1, np.maximum(counts, 1))

    def split(c):
        pts = X[a == c]
        return pts if len(pts) <= share[c] else _kmeans(pts, int(share[c]), seed + 1 + c)

    cells = [c for c in pool.map(split, range(nc)) if len(c)]
    return np.ascontiguousarray(np.concatenate(cells), dtype=np.float32), coarse


def _probe_cells(
    E, cells: np.ndarray, coarse: np.ndarray, depth: int, pool, block: int = 16_384
) -> np.ndarray:
    """The ``depth`` most similar cells of every face (int32 N x depth, best first), searched
    through the coarse level (an IVF index over the cell centroids)."""
    faiss = _faiss()
    D = cells.shape[1]
    quantizer = faiss.IndexFlatIP(D)
    quantizer.add(coarse)
    index = faiss.IndexIVFFlat(quantizer, D, coarse.shape[0], faiss.METRIC_INNER_PRODUCT)
    index.add(cells)
    index.nprobe = min(ivf_blas_coarse_probes(cells.shape[0]), coarse.shape[0])
    N = E.shape[0]
    out = np.empty((N, depth), np.int32)

    def search(s):
        e = min(N, s + block)
        out[s:e] = index.search(_block(E, s, e), depth)[1]

    list(pool.map(search, range(0, N, block)))
    # a face whose coarse probes hold fewer than depth cells gets -1: repeat its best cell instead
    bad = out < 0
    if bad.any():
        out[bad] = np.broadcast_to(out[:, :1], out.shape)[bad]
    return out


def _scan_cell(E, x_ids: np.ndarray, q_ids: np.ndarray, kk: int, bound: np.ndarray):
    """(query, neighbour, similarity) candidates of q_ids among the members x_ids of one cell:
    per query its best kk in the cell, only those above the query's current kk-th best."""
    m = len(x_ids)
    if m == 0:  # a cell no face calls its best one
        return None
    X = np.take(E, x_ids, axis=0)
    t = min(kk, m)
    rows_per = max(1, _SCAN_CHUNK // max(m, 1))
    oq, oj, osim = [], [], []
    for s in range(0, len(q_ids), rows_per):
        qb = q_ids[s : s + rows_per]
        S = np.take(E, qb, axis=0) @ X.T
        b = bound[qb]
        rows = np.flatnonzero(S.max(1) > b)  # most rows end here once the own cell set the bound
        if len(rows) == 0:
            continue
        sub = S[rows] if len(rows) < len(qb) else S
        part = _top_columns(sub, t)
        vals = np.take_along_axis(sub, part, 1)
        keep = vals > b[rows, None]
        oq.append(qb[np.broadcast_to(rows[:, None], part.shape)[keep]].astype(np.int32))
        oj.append(x_ids[part[keep]].astype(np.int32))
        osim.append(vals[keep])
    if not oq:
        return None
    return np.concatenate(oq), np.concatenate(oj), np.concatenate(osim)


def _merge(
    best_I: np.ndarray, best_S: np.ndarray, cq, cj, cs, rows_per_block: int = 65_536, dedup: bool = False
) -> np.ndarray:
    """Merge candidate triplets into the sorted top-kk rows. Without ``dedup`` no (query,
    neighbour) pair may come twice (nor be in the rows already); with it a repeated neighbour is
    kept once (its first occurrence: the row's own entry, then candidate order).
    Returns the rows that received candidates."""
    kk = best_I.shape[1]
    order = np.argsort(cq, kind="stable")
    cq, cj, cs = cq[order], cj[order], cs[order]
    first = np.flatnonzero(np.concatenate([[True], cq[1:] != cq[:-1]]))
    rows = cq[first].astype(np.int64)
    start, counts = first, np.diff(np.append(first, len(cq)))
    for b in range(0, len(rows), rows_per_block):
        r = rows[b : b + rows_per_block]
        st, cn = start[b : b + rows_per_block], counts[b : b + rows_per_block]
        width = kk + int(cn.max())
        Ip = np.full((len(r), width), -1, np.int64)
        Sp = np.full((len(r), width), -np.inf, np.float32)
        Ip[:, :kk], Sp[:, :kk] = best_I[r], best_S[r]
        grp = np.repeat(np.arange(len(r)), cn)
        src = np.arange(st[0], st[-1] + cn[-1])
        pos = src - np.repeat(st, cn) + kk
        Ip[grp, pos], Sp[grp, pos] = cj[src], cs[src]  # int32 ids widen to int64 here
        if dedup:
            _drop_repeats(Ip, Sp)
        # stable: equal similarities keep their (deterministic) candidate order
        o = np.argsort(-Sp, axis=1, kind="stable")[:, :kk]
        best_I[r], best_S[r] = np.take_along_axis(Ip, o, 1), np.take_along_axis(Sp, o, 1)
    return rows


def _drop_repeats(Ip: np.ndarray, Sp: np.ndarray) -> None:
    """In place: every repeat of an id within a row (after its first column) becomes -1 / -inf."""
    o = np.argsort(Ip, axis=1, kind="stable")  # equal ids stay in column order
    Is = np.take_along_axis(Ip, o, 1)
    rep = np.zeros(Ip.shape, bool)
    rep[:, 1:] = (Is[:, 1:] == Is[:, :-1]) & (Is[:, 1:] >= 0)
    if rep.any():
        r, c = np.nonzero(rep)
        cols = o[r, c]
        Ip[r, cols] = -1
        Sp[r, cols] = -np.inf


class _Probed:
    """Set of scanned (face, cell) pairs as int64 keys face * nlist + cell (sorted chunks)."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def new(self, keys: np.ndarray) -> np.ndarray:
        keys = _unique_sorted(keys)
        for c in self.chunks:
            pos = np.minimum(np.searchsorted(c, keys), len(c) - 1)
            keys = keys[c[pos] != keys]
        if len(keys):
            self.chunks.append(keys)
            if len(self.chunks) > 8:
                self.chunks = [np.sort(np.concatenate(self.chunks))]  # chunks are disjoint
        return keys

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def members_scanned(self, cell_sizes: np.ndarray, nlist: int, block: int = 1 << 24) -> int:
        """Sum of the scanned cells' sizes, in blocks: at 10M faces the set holds ~250M keys, and
        whole-array temporaries of it took ~8 GB, the kNN's peak memory."""
        total = 0
        for c in self.chunks:
            for s in range(0, len(c), block):
                total += int(cell_sizes[c[s : s + block] % nlist].sum())
        return total


_JOIN_BATCH = 2_000_000  # (face, cell) pairs per join batch: bounds the candidate arrays


def _join(E, cell_order, cell_start, keys, nlist, kk, best_I, best_S, pool, reverse=False, dedup=False):
    """Scan every (face, cell) pair of ``keys`` and merge the results; returns (candidates, rows).
    Pairs go in batches of whole cells (in cell order), each merged before the next starts: the
    candidate arrays stay bounded, later batches profit from a tighter bound, and the result does
    not depend on the number of threads."""
    # faces and cells as int32 while N < 2^31: 12 bytes a pair less at the largest join
    idx = np.int32 if len(cell_order) < np.iinfo(np.int32).max else np.int64
    c = (keys % nlist).astype(idx)
    o = np.argsort(c, kind="stable")
    c = c[o]
    q = keys[o]
    del o
    q //= nlist
    q = q.astype(idx)
    total, rows = 0, []
    s = 0
    while s < len(q):
        e = min(len(q), s + _JOIN_BATCH)
        if e < len(q):  # end the batch with its last cell complete
            e = int(np.searchsorted(c, c[e - 1], side="right"))
        n, r = _join_batch(E, cell_order, cell_start, q[s:e], c[s:e], kk, best_I, best_S, pool, reverse, dedup)
        total += n
        rows.append(r)
        s = e
    return total, (_unique_sorted(np.concatenate(rows)) if rows else np.zeros(0, np.int64))


def _join_batch(E, cell_order, cell_start, q, c, kk, best_I, best_S, pool, reverse=False, dedup=False):
    """``reverse``: every candidate (q, j, s) is also offered to j as (j, q, s) (a self-join's
    product is symmetric: j need not scan q's cell to learn it). ``dedup``: a pair may be found
    more than once (reverse candidates, faces listed in two cells); the merge keeps it once."""
    bound = best_S[:, -1].copy()  # kk-th best so far; fixed during the batch, so threads agree
    st = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
    uc, cnt = c[st], np.diff(np.append(st, len(c)))
    size = cell_start[uc + 1] - cell_start[uc]
    tasks = sorted(zip((cnt * size).tolist(), uc.tolist(), st.tolist(), cnt.tolist()), reverse=True)

    def run(task):
        _, cell, s, n = task
        return _scan_cell(E, cell_order[cell_start[cell] : cell_start[cell + 1]], q[s : s + n], kk, bound)

    res = [r for r in pool.map(run, tasks) if r is not None]
    if not res:
        return 0, np.zeros(0, np.int64)
    cq, cj, cs = (np.concatenate([r[i] for r in res]) for i in range(3))
    if len(cq) == 0:
        return 0, np.zeros(0, np.int64)
    if reverse:
        back = (cq != cj) & (cs > bound[cj])
        cq, cj, cs = (np.concatenate([cq, cj[back]]), np.concatenate([cj, cq[back]]),
                      np.concatenate([cs, cs[back]]))
    return len(cq), _merge(best_I, best_S, cq, cj, cs, dedup=reverse or dedup)


def _expansion_keys(best_I, best_S, rows, cell, nlist, min_sim) -> np.ndarray:
    """(face, cell) keys to scan next: for every kept edge (q, j) of the given rows, q scans j's
    cell and j scans q's cell."""
    I, S = best_I[rows], best_S[rows]
    keep = (I >= 0) & (I != rows[:, None])
    if min_sim is not None:
        keep &= S >= min_sim
    q = np.broadcast_to(rows[:, None], I.shape)[keep]
    j = I[keep]
    return np.concatenate([q * nlist + cell[j], j * nlist + cell[q]])


def _spilled_faces(E, cells: np.ndarray, probes: np.ndarray, fraction: float, block: int = 65_536) -> np.ndarray:
    """The ``fraction`` of faces (sorted ids) with the smallest gap between the similarity to their
    best and to their second-best cell (ties broken by id, so the choice is deterministic)."""
    N = E.shape[0]
    n = min(N, round(fraction * N))
    if n == 0 or probes.shape[1] < 2:
        return np.zeros(0, np.int64)
    gap = np.empty(N, np.float32)
    for s in range(0, N, block):
        e = min(N, s + block)
        X = _block(E, s, e)
        gap[s:e] = np.einsum("nd,nd->n", X, cells[probes[s:e, 0]]) - np.einsum("nd,nd->n", X, cells[probes[s:e, 1]])
    gap[probes[:, 1] == probes[:, 0]] = np.inf  # no second cell (see _probe_cells): never spilled
    chosen = np.argsort(gap, kind="stable")[:n]
    return np.sort(chosen[np.isfinite(gap[chosen])]).astype(np.int64)


def knn_ivf_blas(
    E: np.ndarray,
    k: int,
    nlist: int | None = None,
    nprobe: int = IVF_BLAS_NPROBE,
    max_rounds: int = IVF_BLAS_MAX_ROUNDS,
    min_sim: float | None = None,
    target_recall: float | None = 0.95,
    check_queries: int = 1000,
    seed: int = 0,
    n_threads: int | None = None,
    spill: float | None = None,
    reverse: bool | None = None,
    adaptive: bool | None = None,
):
    """Approximate kNN self-join (query itself included in the kk = k + 1 columns).

    ``spill`` (default IVF_BLAS_SPILL): the fraction of faces also listed in their second-best
    cell, those with the smallest gap between their best and second-best cell similarity (the
    faces on a border): a face on the far side of a border then meets them in its own cell.
    ``reverse`` (default IVF_BLAS_REVERSE): every candidate a join finds is also offered to the
    other end. Both make a pair findable more than once, so the merges then drop repeats.

    1. Cells: two-level spherical k-means (:func:`_train_cells`); every face is listed in its
       best cell and probes its ``nprobe`` best cells.
    2. Joins: for each cell, the faces that probe it are multiplied with the cell's members in
       one matrix product (BLAS), and each row keeps its best kk (:func:`_top_columns`). The
       own cell goes first and sets every face's bound (its kk-th best); in the other cells a
       row is looked at only if its maximum beats the bound. Cells run in a thread pool (BLAS
       single-threaded per thread), so all cores are busy.
    3. Expansion rounds: every kept edge (similarity >= ``min_sim``; all edges when None) found
       in the last round makes each end scan the other end's cell, until no new pair appears or
       ``max_rounds``. An identity cut by a cell border is joined up this way, at the cost of
       the cells its faces actually fall into.
    4. Check: recall on ``check_queries`` sampled faces against exact search (edges >= min_sim
       when given). Below ``target_recall`` the next IVF_BLAS_PROBE_STEP cells per face are
       scanned (and expanded again), up to 4 x nprobe cells.
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    N, _D = E.shape
    kk = min(k + 1, N)
    rng = np.random.default_rng(seed)
    info: dict = {}
    n_threads = n_threads or len(os.sched_getaffinity(0))
    faiss = _faiss()
    omp_threads = faiss.omp_get_max_threads()
    # Parallel work goes through one thread pool with single-threaded BLAS and faiss inside: on a
    # shared machine OpenMP barriers wait for descheduled threads (k-means of small cells took
    # 30 s wall for 1 CPU-s that way).
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(n_threads) as pool:
            out = _ivf_blas_run(
                E,
                k,
                kk,
                nlist,
                nprobe,
                max_rounds,
                min_sim,
                target_recall,
                check_queries,
                seed,
                rng,
                pool,
                info,
                IVF_BLAS_SPILL if spill is None else spill,
                IVF_BLAS_REVERSE if reverse is None else reverse,
                IVF_BLAS_ADAPTIVE if adaptive is None else adaptive,
            )
    finally:
        faiss.omp_set_num_threads(omp_threads)
    info["threads"] = n_threads
    return out[0], out[1], info


def _grow_probes(join, probe_keys, expansion_keys, nprobe, depth, max_rounds, check, E, k, best_I, best_S,
                 target_recall, info, adaptive=False) -> int:
    """Scan probes 1..nprobe-1 (``probe_keys(p0, p1, faces)``, faces None: all), expand through the
    edges found (``expansion_keys(rows)``) for up to ``max_rounds``, then check the sampled recall and
    scan IVF_BLAS_PROBE_STEP more probes per face until it reaches ``target_recall`` or ``depth``.
    ``adaptive``: after the first step, only the faces whose rows improved in one of the last
    ``IVF_BLAS_PATIENCE`` steps (an int: that many) (its probes or their expansion) scan further probes;
    the others stop. Returns the probe count reached (also ``info["nprobe"]``)."""
    patience = IVF_BLAS_PATIENCE if adaptive is True else int(adaptive)
    p0, p1 = 1, min(nprobe, depth)
    active = None
    recent: list[np.ndarray] = []  # the faces each of the last IVF_BLAS_PATIENCE steps improved
    while True:
        rows = join(f"probes {p0}-{p1 - 1}", probe_keys(p0, p1, active))
        improved = [rows]
        for r in range(max_rounds):
            if len(rows) == 0:
                break
            rows = join(f"expand {r + 1}", expansion_keys(rows))
            improved.append(rows)
        if adaptive:
            recent = [*recent, _unique_sorted(np.concatenate(improved))][-max(1, patience):]
            # a face improved by none of the last steps is retired; one that is not probing (retired
            # earlier) is never in ``improved``, so it stays retired
            active = recent[0] if len(recent) == 1 else _unique_sorted(np.concatenate(recent))
            info.setdefault("active_faces", []).append(len(active))
        info["nprobe"] = p1
        if check is None:
            break
        cq, exact = check
        _, approx_S = _drop_self(best_I[cq], best_S[cq], 0, k, qids=cq)
        info["check_recall"] = recall_by_similarity(E, cq, exact, approx_S)
        log.info("ivf-blas %d probes: sampled recall %.4f", p1, info["check_recall"])
        info["recall_target_met"] = bool(info["check_recall"] >= target_recall)
        if info["recall_target_met"]:
            break
        if p1 >= depth:
            # said, not hidden: at 10M faces with adaptive probing the recall levels off near 0.92
            log.warning("ivf-blas: sampled recall %.4f is below the target %.2f at the probe cap (%d cells)%s",
                        info["check_recall"], target_recall, p1,
                        "; adaptive probing retired faces early (knn_adaptive_probing=false scans every face, "
                        "knn_probe_patience=2 retires later)"
                        if adaptive else "")
            break
        p0, p1 = p1, min(depth, p1 + IVF_BLAS_PROBE_STEP)
    return p1


def _probe_keys(probes: np.ndarray, p0: int, p1: int, nlist: int, faces: np.ndarray | None) -> np.ndarray:
    """(face, cell) keys of probes p0..p1-1 of ``faces`` (None: every face)."""
    if faces is None:
        faces = np.arange(len(probes), dtype=np.int64)
        return (faces[:, None] * nlist + probes[:, p0:p1].astype(np.int64)).ravel()
    return (faces[:, None] * nlist + probes[faces, p0:p1].astype(np.int64)).ravel()


def _ivf_blas_run(
    E, k, kk, nlist, nprobe, max_rounds, min_sim, target_recall, check_queries, seed, rng, pool, info,
    spill=0.0, reverse=False, adaptive=False,
):
    N = E.shape[0]
    t, c0 = time.perf_counter(), time.process_time()
    nlist = nlist or ivf_blas_nlist(N)
    if nlist > 1:
        cells, coarse = _train_cells(E, nlist, seed, pool)
        nlist = len(cells)
        info["train_s"], info["train_cpu_s"] = time.perf_counter() - t, time.process_time() - c0
        log.info("ivf-blas trained %d cells in %.1f CPU-s", nlist, info["train_cpu_s"])
        t, c0 = time.perf_counter(), time.process_time()
        depth = min(nlist, max(IVF_BLAS_MAX_PROBES, 4 * nprobe))
        probes = _probe_cells(E, cells, coarse, depth, pool)
        info["assign_s"], info["assign_cpu_s"] = time.perf_counter() - t, time.process_time() - c0
        log.info("ivf-blas probes of every face in %.1f CPU-s", info["assign_cpu_s"])
    else:
        depth = 1
        probes = np.zeros((N, 1), np.int32)
    cell = probes[:, 0].astype(np.int64)
    face = np.arange(N, dtype=np.int64)
    spilled = _spilled_faces(E, cells, probes, spill) if spill > 0 and nlist > 1 else np.zeros(0, np.int64)
    # the cells' member lists: every face in its best cell, the spilled ones also in their second
    listed_cell = np.concatenate([cell, probes[spilled, 1].astype(np.int64) if len(spilled) else spilled])
    listed_face = np.concatenate([face, spilled])
    o = np.argsort(listed_cell, kind="stable")
    cell_order = listed_face[o]
    cell_start = np.searchsorted(listed_cell[o], np.arange(nlist + 1))
    del o, listed_cell, listed_face
    info.update(spill=spill, spilled=len(spilled), reverse=reverse, adaptive=adaptive)
    best_I = np.full((N, kk), -1, np.int64)
    best_S = np.full((N, kk), -np.inf, np.float32)
    probed = _Probed()
    check = None
    if target_recall is not None and check_queries and N > kk:
        t = time.perf_counter()
        cq = np.sort(rng.choice(N, size=min(check_queries, N), replace=False))
        check = (cq, _floor_exact(E, cq, exact_neighbours_of(E, cq, k), min_sim))
        info["check_s"] = time.perf_counter() - t
    rounds = []

    def join(name, keys, reverse=reverse):
        t, c = time.perf_counter(), time.process_time()
        keys = probed.new(keys)
        if len(keys) == 0:
            return np.zeros(0, np.int64)
        n_cand, rows = _join(E, cell_order, cell_start, keys, nlist, kk, best_I, best_S, pool,
                             reverse=reverse, dedup=len(spilled) > 0)
        rounds.append(
            {
                "step": name,
                "pairs": len(keys),
                "candidates": n_cand,
                "rows": len(rows),
                "s": round(time.perf_counter() - t, 3),
                "cpu_s": round(time.process_time() - c, 3),
            }
        )
        log.info("ivf-blas %s", rounds[-1])
        return rows

    # no reverse offers in the own cell: both ends of a pair in it scan it anyway
    join("own cell", face * nlist + cell, reverse=False)
    p1 = _grow_probes(
        join,
        lambda p0, p1, faces: _probe_keys(probes, p0, p1, nlist, faces),
        lambda rows: _expansion_keys(best_I, best_S, rows, cell, nlist, min_sim),
        nprobe, depth, max_rounds, check, E, k, best_I, best_S, target_recall, info, adaptive,
    )
    scanned = probed.members_scanned(np.diff(cell_start), nlist)
    info.update(
        nlist=nlist,
        coarse_probes=ivf_blas_coarse_probes(nlist) if nlist > 1 else 0,
        rounds=rounds,
        probed_pairs=len(probed),
        check_min_sim=min_sim,
        check_queries=0 if check is None else len(check[0]),
        scanned_fraction=scanned / N / N,
    )
    if nlist > 1:
        info["_index"] = (IvfIndex(cells, coarse, int(p1), N), cell.astype(np.int32))
    return best_I, best_S


@dataclass
class IvfIndex:
    """The cells of an ivf-blas build, kept next to the identities table so that a refresh searches
    only the cells its new faces probe instead of the whole collection (docs/benchmarks.md
    "Incremental refresh"). Each face's cell is stored in the identities table (column ``ivf_cell``)."""

    cells: np.ndarray  # nlist x D float32 cell centroids
    coarse: np.ndarray  # ~sqrt(nlist) x D float32: the index over the cells
    nprobe: int  # cells per face the last build needed for its recall target
    trained_on: int  # faces the cells were trained on

    # a refresh retrains the cells once the collection has grown this much since training: the
    # cells then hold ~RETRAIN_GROWTH x the faces they were sized for
    RETRAIN_GROWTH = 2.0

    @property
    def nlist(self) -> int:
        return int(self.cells.shape[0])

    @property
    def dim(self) -> int:
        return int(self.cells.shape[1])

    def stale_for(self, N: int, D: int) -> str | None:
        """Why this index should not serve a collection of N faces of dimension D (None: it may)."""
        if D != self.dim:
            return f"embedding dimension {D} != the index's {self.dim}"
        if N > self.RETRAIN_GROWTH * self.trained_on:
            return f"the collection grew from {self.trained_on} to {N} faces since the cells were trained"
        return None

    def to_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        np.savez(buf, cells=self.cells, coarse=self.coarse, nprobe=self.nprobe, trained_on=self.trained_on)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> IvfIndex:
        import io

        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(np.ascontiguousarray(z["cells"], np.float32), np.ascontiguousarray(z["coarse"], np.float32),
                       int(z["nprobe"]), int(z["trained_on"]))


@contextlib.contextmanager
def _single_threaded_pool(n_threads: int | None = None):
    """A thread pool with single-threaded BLAS and faiss inside (see knn_ivf_blas)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    faiss = _faiss()
    omp_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(n_threads or len(os.sched_getaffinity(0))) as pool:
            yield pool
    finally:
        faiss.omp_set_num_threads(omp_threads)


def train_ivf_index(E: np.ndarray, seed: int = 0, n_threads: int | None = None) -> tuple[IvfIndex, np.ndarray]:
    """Cells for the faces of E (as ivf-blas trains them) and each face's best cell (int32)."""
    N = E.shape[0]
    with _single_threaded_pool(n_threads) as pool:
        cells, coarse = _train_cells(E, ivf_blas_nlist(N), seed, pool)
        cell = _probe_cells(E, cells, coarse, 1, pool)[:, 0]
    return IvfIndex(cells, coarse, IVF_BLAS_NPROBE, N), cell


def knn_ivf_search(
    E: np.ndarray,
    rows: np.ndarray,
    index: IvfIndex,
    cell_of: np.ndarray,
    k: int,
    min_sim: float | None = None,
    target_recall: float | None = 0.95,
    check_queries: int = 200,
    max_rounds: int = IVF_BLAS_MAX_ROUNDS,
    seed: int = 0,
    n_threads: int | None = None,
    groups: np.ndarray | None = None,
):
    """The k nearest faces (self excluded) of the faces ``rows`` among all faces of E, through the
    cells of ``index``: the cost of a refresh grows with the new faces, not with the collection.

    ``cell_of``: every face's cell (int, N); faces without one (-1, the new faces) get their best
    cell here. The same joins as :func:`knn_ivf_blas`, restricted to the query rows: own cell, the
    index's ``nprobe`` best cells, expansion through edges >= ``min_sim``, then more cells until the
    recall on ``check_queries`` sampled rows against exact search reaches ``target_recall``.
    ``groups``: an identity per face (int, -1 for none): a query that finds a face of an identity
    above ``min_sim`` also scans every cell that identity's faces are in. A self-join finds an edge
    from either end; a refresh searches from the new end only, and this second hop through the
    identity recovers what the other end would have found (at 1M faces the sampled recall reached
    0.92 at 40 cells without it, 0.95 at the build's own probe count with it).
    Returns (I, S, cell_of with the new cells, info)."""
    rows = np.asarray(rows, dtype=np.int64)
    N = E.shape[0]
    nlist = index.nlist
    kk = min(k + 1, N)
    cell = np.asarray(cell_of, dtype=np.int64).copy()
    info: dict = {"nlist": nlist}
    if len(rows) == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), cell.astype(np.int32), info
    rng = np.random.default_rng(seed)
    with _single_threaded_pool(n_threads) as pool:
        t = time.perf_counter()
        depth = min(nlist, 4 * max(index.nprobe, IVF_BLAS_NPROBE))
        probes = _probe_cells(np.ascontiguousarray(E[rows], dtype=np.float32), index.cells, index.coarse, depth, pool)
        missing = cell < 0
        unassigned = np.flatnonzero(missing)
        if not np.isin(unassigned, rows).all():
            raise ValueError("faces without a cell that are not being searched: the index does not cover them")
        cell[rows] = probes[:, 0]
        info["probe_s"] = time.perf_counter() - t
        cell_order = np.argsort(cell, kind="stable")
        cell_start = np.searchsorted(cell[cell_order], np.arange(nlist + 1))
        best_I = np.full((N, kk), -1, np.int64)
        best_S = np.full((N, kk), -np.inf, np.float32)
        is_query = np.zeros(N, bool)
        is_query[rows] = True
        probed = _Probed()
        check = None
        if target_recall is not None and check_queries and N > kk:
            cq = np.sort(rng.choice(rows, size=min(check_queries, len(rows)), replace=False))
            check = (cq, _floor_exact(E, cq, exact_neighbours_of(E, cq, k), min_sim))
        rounds = []

        def join(name, keys):
            keys = probed.new(keys[is_query[keys // nlist]])
            if len(keys) == 0:
                return np.zeros(0, np.int64)
            n_cand, got = _join(E, cell_order, cell_start, keys, nlist, kk, best_I, best_S, pool)
            rounds.append({"step": name, "pairs": len(keys), "candidates": n_cand})
            return got

        group_cells = _group_cells(groups, cell, nlist) if groups is not None else None

        def expansion(got):
            keys = _expansion_keys(best_I, best_S, got, cell, nlist, min_sim)
            if group_cells is not None:
                keys = np.concatenate([keys, _group_keys(best_I, best_S, got, groups, group_cells, nlist, min_sim)])
            return keys

        join("own cell", rows * nlist + cell[rows])
        _grow_probes(
            join,
            lambda p0, p1, _faces: (rows[:, None] * nlist + probes[:, p0:p1].astype(np.int64)).ravel(),
            expansion, index.nprobe, depth, max_rounds, check, E, k, best_I, best_S, target_recall, info,
        )
    info.update(rounds=rounds, probed_pairs=len(probed), check_queries=0 if check is None else len(check[0]))
    I, S = _drop_self(best_I[rows], best_S[rows], 0, max(1, min(k, kk - 1)), qids=rows)
    if I.shape[1] < k:
        I = np.concatenate([I, np.full((len(rows), k - I.shape[1]), -1, np.int64)], 1)
        S = np.concatenate([S, np.full((len(rows), k - S.shape[1]), -np.inf, np.float32)], 1)
    I, S = _finalise(I, S)
    return I, S, cell.astype(np.int32), info


def _group_cells(groups: np.ndarray, cell: np.ndarray, nlist: int):
    """Per group (identity), the sorted cells its faces are in, as (start offsets, cells)."""
    groups = np.asarray(groups, dtype=np.int64)
    has = groups >= 0
    if not has.any():
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    gc = np.unique(groups[has] * nlist + cell[has])
    g, c = gc // nlist, gc % nlist
    start = np.searchsorted(g, np.arange(int(groups.max()) + 2))
    return start, c


def _group_keys(best_I, best_S, rows, groups, group_cells, nlist, min_sim) -> np.ndarray:
    """(face, cell) keys: every cell of every identity a row's kept edges reach."""
    start, cells = group_cells
    I, S = best_I[rows], best_S[rows]
    keep = (I >= 0) & (I != rows[:, None])
    if min_sim is not None:
        keep &= S >= min_sim
    q = np.broadcast_to(rows[:, None], I.shape)[keep]
    g = np.asarray(groups)[I[keep]]
    ok = g >= 0
    qg = np.unique(q[ok] * (len(start) - 1) + g[ok])
    q, g = qg // (len(start) - 1), qg % (len(start) - 1)
    n = start[g + 1] - start[g]
    if n.sum() == 0:
        return np.zeros(0, np.int64)
    first = np.repeat(start[g], n)
    offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    return np.repeat(q, n) * nlist + cells[first + offset]


def _nvidia_present() -> bool:
    """Cheap check before importing torch (an import costs seconds and ~0.5 GB RSS on CPU boxes)."""
    import os
    import shutil

    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def choose_backend(
    N: int, exact_max: int = EXACT_MAX_DEFAULT, recall_min_similarity: float | None = None
) -> str:
    """faiss-gpu if faiss sees a GPU; else torch on CUDA; else exact faiss-flat up to
    ``exact_max`` faces and ivf-blas above. (``recall_min_similarity`` no longer changes the
    choice; it is kept for callers.)"""
    with contextlib.suppress(Exception):  # a broken GPU stack falls back to CPU
        if _faiss().get_num_gpus() > 0:
            return "faiss-gpu"
    if _torch_cuda():
        return "torch"
    return "faiss-flat" if N <= exact_max else "ivf-blas"


def knn_graph(
    embeddings: np.ndarray | str | Path,
    k: int = 10,
    backend: str = "auto",
    block_size: int = DEFAULT_BLOCK,
    exact_max: int = EXACT_MAX_DEFAULT,
    target_recall: float = 0.95,
    nprobe: int | None = None,
    seed: int = 0,
    deterministic: bool = True,
    recall_min_similarity: float | None = None,
    adaptive: bool | None = None,
) -> KnnGraph:
    """kNN graph (self excluded) of L2-normalised float32 embeddings; see the module docstring.
    ``adaptive``: ivf-blas's adaptive probing (None: IVF_BLAS_ADAPTIVE; an int n >= 1: on, a face retired
    after n steps that did not improve it, True: after IVF_BLAS_PATIENCE); other backends ignore it."""
    E = _check(load_embeddings(embeddings))
    N = E.shape[0]
    if k < 1:
        raise ValueError("k must be >= 1")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {BACKENDS}")
    if N == 0:
        return KnnGraph(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), "none", {}, 0.0)
    if backend == "auto":
        backend = choose_backend(N, exact_max, recall_min_similarity)
    t = time.perf_counter()
    params: dict = {"k": k, "block_size": block_size}
    if backend == "faiss-flat":
        I, S = knn_faiss_flat(E, k, block_size)
    elif backend == "faiss-gpu":
        I, S = knn_faiss_flat(E, k, block_size, gpu=True)
    elif backend == "faiss-hnsw":
        I, S, info = knn_faiss_hnsw(
            E,
            k,
            block_size,
            target_recall=target_recall,
            seed=seed,
            deterministic=deterministic,
            min_sim=recall_min_similarity,
        )
        params.update(info)
    elif backend == "faiss-ivf":
        I, S, info = knn_faiss_ivf(
            E,
            k,
            block_size,
            target_recall=target_recall,
            nprobe=nprobe,
            seed=seed,
            min_sim=recall_min_similarity,
        )
        params.update(info)
    elif backend == "ivf-blas":
        I, S, info = knn_ivf_blas(
            E,
            k,
            nprobe=nprobe or IVF_BLAS_NPROBE,
            min_sim=recall_min_similarity,
            target_recall=target_recall,
            seed=seed,
            adaptive=adaptive,
        )
        I, S = _self_excluded(I, S, k)
        index = info.pop("_index", None)
        params.update(info)
        return KnnGraph(I, S, backend, params, time.perf_counter() - t, index=index)
    else:
        I, S, info = knn_torch(E, k)
        params.update(info)
    return KnnGraph(I, S, backend, params, time.perf_counter() - t)


def search_index(
    database: np.ndarray, queries: np.ndarray, k: int, block_size: int = 16_384
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` against ``database`` (no self exclusion), for incremental assignment.

    faiss's brute-force ``knn`` (BLAS products, a heap per query) with one OpenMP thread: on the
    shared 2-core box two OpenMP threads spin against each other (2k queries against 200k: 1.2 s with
    one thread, 3 s with two, minutes when the box is busy)."""
    faiss = _faiss()
    database = np.ascontiguousarray(_check(database), dtype=np.float32)
    queries = _check(queries)
    nq, nd = queries.shape[0], database.shape[0]
    kk = min(k, nd)
    I = np.full((nq, k), -1, dtype=np.int64)
    S = np.full((nq, k), -np.inf, dtype=np.float32)
    if kk == 0 or nq == 0:
        return I, S
    omp = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for s in range(0, nq, block_size):
            e = min(nq, s + block_size)
            Sb, Ib = faiss.knn(np.ascontiguousarray(queries[s:e], dtype=np.float32), database, kk,
                               metric=faiss.METRIC_INNER_PRODUCT)
            I[s:e, :kk], S[s:e, :kk] = Ib, Sb
    finally:
        faiss.omp_set_num_threads(omp)
    return _finalise(I, S)


def exact_knn_of_rows(E: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest faces (self excluded) of the faces ``rows`` among all faces of E:
    (indices, similarities), one row per face of ``rows``, through :func:`search_index` (one
    OpenMP thread). For a refresh's new faces in a small collection and the local recluster."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    I, S = search_index(E, np.ascontiguousarray(E[rows]), k + 1)
    self_hit = I == rows[:, None]
    I = np.where(self_hit, -1, I)
    S = np.where(self_hit, -np.inf, S)
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]  # drop the self match, keep the k best others
    return np.take_along_axis(I, order, 1), np.take_along_axis(S, order, 1).astype(np.float32)
