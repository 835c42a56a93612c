"""Training-free graph clustering over a thresholded kNN graph.

The graph: every kNN edge (i, j) with cosine similarity >= ``threshold`` is kept, made
undirected (weight = the larger of the two directions). Nodes without a kept edge are singletons
and keep their own cluster.

Methods (``method=``):

- ``"chinese_whispers"`` (default): label propagation (Biemann 2006) in the weighted variant
  dlib uses: each node takes the label with the largest summed edge weight among its neighbours.
  Vectorised with scipy.sparse: every iteration visits the nodes in a seeded random order split
  into ``n_batches`` batches; a batch is updated at once from the current labels (asynchronous
  between batches, which avoids the two-colour oscillation of fully synchronous updates). Ties go
  to the smallest label. Stops when no label changes or after ``max_iter`` iterations.
- ``"leiden"``: leidenalg on the same weighted graph, seeded. Default quality function:
  ``RBConfigurationVertexPartition`` with ``resolution=0.2`` (modularity with a resolution
  parameter). Plain modularity (``partition="modularity"``) splits large identities: on a
  1,500-face synthetic mixture it cut the largest identity in two (BCubed F 0.82 vs 0.99 at 0.2);
  CPM needs a resolution below the kNN graph's density k/n, so it either splits big identities
  (0.01) or chains bridges (0.002). Other choices via ``partition`` ("modularity", "rb", "cpm")
  and ``resolution``.
- ``"infomap"``: optional (``pip install lineup[infomap]``; the infomap package is AGPL-3.0).
- ``"connected_components"``: baseline; chains identities through any single bridge edge.

Default thresholds (cosine similarity on L2-normalised embeddings), one per embedding backend: the
``cluster_link`` of :data:`pipeline.faces.calibration.BACKEND_THRESHOLDS` (dlib 0.93, measured on
shared/data/faces; ArcFace 0.45, from the literature), documented there with their calibration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from pipeline.faces.calibration import BACKEND_THRESHOLDS

DEFAULT_THRESHOLDS = {name: t.cluster_link for name, t in BACKEND_THRESHOLDS.items()}
METHODS = ("chinese_whispers", "leiden", "infomap", "connected_components")
DEFAULT_METHOD = "chinese_whispers"
# split_incoherent defaults, measured on the dlib-like synthetic mixture at 1M and 2M faces
# (docs/benchmarks.md, "Giant merged identities at 2M"): a cluster of 3+ faces whose mean pairwise similarity
# is more than SPLIT_COHESION_MARGIN below the link threshold is clustered again at threshold + SPLIT_STEP,
# and so on for up to SPLIT_MAX_ROUNDS rounds
SPLIT_COHESION_MARGIN = 0.01
SPLIT_MIN_SIZE = 3
SPLIT_STEP = 0.01
SPLIT_MAX_ROUNDS = 5


def default_threshold(backend_name: str) -> float:
    try:
        return DEFAULT_THRESHOLDS[backend_name]
    except KeyError:
        raise ValueError(
            f"no default threshold for embedding backend {backend_name!r}; pass threshold= "
            f"(known: {sorted(DEFAULT_THRESHOLDS)})"
        ) from None


@dataclass
class Clustering:
    labels: np.ndarray  # int64 (N,), canonical: clusters numbered by their smallest member index
    method: str
    threshold: float
    n_edges: int
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def threshold_graph(indices: np.ndarray, similarities: np.ndarray, threshold: float) -> sp.csr_matrix:
    """Symmetric CSR adjacency (float32 weights) of kNN edges with similarity >= threshold."""
    N = indices.shape[0]
    mask = (indices >= 0) & (similarities >= threshold)
    # int32 node ids while N allows (scipy indexes such a matrix with int32 anyway): half the
    # memory of the edge lists, which at 10M faces are the peak of the clustering
    idx = np.int32 if N < np.iinfo(np.int32).max else np.int64
    rows = np.broadcast_to(np.arange(N, dtype=idx)[:, None], indices.shape)[mask]
    cols = indices[mask].astype(idx, copy=False)
    w = similarities[mask].astype(np.float32)
    del mask
    keep = rows != cols
    rows, cols, w = rows[keep], cols[keep], w[keep]
    del keep
    A = sp.csr_matrix((w, (rows, cols)), shape=(N, N), dtype=np.float32)
    del rows, cols, w
    # undirected, the larger weight wins where both directions exist (duplicates were summed above
    # only if a row listed the same neighbour twice, which kNN never does)
    A = A.maximum(A.T).tocsr()
    A.sum_duplicates()
    A.sort_indices()
    return A


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..C-1 in order of their smallest member index (deterministic)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.int64)
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inv.ravel()].astype(np.int64)


def connected_components(A: sp.csr_matrix) -> np.ndarray:
    from scipy.sparse.csgraph import connected_components as cc

    _, labels = cc(A, directed=False)
    return labels


def _row_argmax_label(sub: sp.csr_matrix, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``sub`` (neighbour weights), the label with the largest summed weight.

    Returns (row positions that have neighbours, best label for each)."""
    nrows = sub.shape[0]
    counts = np.diff(sub.indptr)
    has = counts > 0
    if not has.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rowid = np.repeat(np.arange(nrows, dtype=np.int64), counts)
    nl = labels[sub.indices]
    # sum weights per (row, label): sort by (row, label) then reduce. One stable sort of a combined key
    # gives lexsort's order (and so the same float sums) at about half its cost
    order = np.argsort(rowid * (int(labels.max()) + 1) + nl, kind="stable")
    r = rowid[order]
    lab = nl[order]
    w = sub.data[order].astype(np.float64)
    new_group = np.ones(len(r), dtype=bool)
    new_group[1:] = (r[1:] != r[:-1]) | (lab[1:] != lab[:-1])
    starts = np.flatnonzero(new_group)
    gsum = np.add.reduceat(w, starts)
    gr = r[starts]
    glab = lab[starts]
    # per row the max summed weight; ties -> smallest label (groups are sorted by label within row)
    row_start = np.ones(len(gr), dtype=bool)
    row_start[1:] = gr[1:] != gr[:-1]
    rs = np.flatnonzero(row_start)
    rmax = np.maximum.reduceat(gsum, rs)
    rows_present = gr[rs]
    rmax_per_group = np.repeat(rmax, np.diff(np.append(rs, len(gr))))
    is_best = gsum >= rmax_per_group - 1e-9 * np.abs(rmax_per_group)
    best_idx = np.flatnonzero(is_best)
    # first best group per row
    first = np.ones(len(best_idx), dtype=bool)
    first[1:] = gr[best_idx[1:]] != gr[best_idx[:-1]]
    best_idx = best_idx[first]
    assert np.array_equal(gr[best_idx], rows_present)
    return rows_present, glab[best_idx]


def chinese_whispers(
    A: sp.csr_matrix, max_iter: int = 30, n_batches: int = 16, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Weighted Chinese whispers on a symmetric CSR adjacency; deterministic for a given seed."""
    N = A.shape[0]
    labels = np.arange(N, dtype=np.int64)
    rng = np.random.default_rng(seed)
    active = np.flatnonzero(np.diff(A.indptr) > 0)
    it = 0
    changed_hist = []
    if len(active) == 0:
        return labels, {"iterations": 0, "changed": []}
    nb = max(1, min(n_batches, len(active)))
    for it in range(1, max_iter + 1):
        order = active[rng.permutation(len(active))]
        changed = 0
        for batch in np.array_split(order, nb):
            # a batch's nodes are updated together from the labels before it, so their order inside it
            # does not matter: ascending rows read the graph in memory order (random order thrashes at 10M)
            batch = np.sort(batch)
            sub = A[batch]
            pos, best = _row_argmax_label(sub, labels)
            nodes = batch[pos]
            diff = labels[nodes] != best
            changed += int(diff.sum())
            labels[nodes] = best
        changed_hist.append(changed)
        if changed == 0:
            break
    return labels, {"iterations": it, "changed": changed_hist}


def _igraph_from_csr(A: sp.csr_matrix):
    import igraph as ig

    U = sp.triu(A, k=1).tocoo()
    g = ig.Graph(n=A.shape[0], edges=np.column_stack([U.row, U.col]).tolist(), directed=False)
    g.es["weight"] = U.data.astype(float).tolist()
    return g


def leiden(
    A: sp.csr_matrix, partition: str = "rb", resolution: float = 0.2, seed: int = 0, n_iterations: int = -1
) -> tuple[np.ndarray, dict]:
    import leidenalg

    g = _igraph_from_csr(A)
    kinds = {
        "modularity": leidenalg.ModularityVertexPartition,
        "cpm": leidenalg.CPMVertexPartition,
        "rb": leidenalg.RBConfigurationVertexPartition,
    }
    if partition not in kinds:
        raise ValueError(f"unknown leiden partition {partition!r}; choose one of {sorted(kinds)}")
    kw = {"weights": "weight", "seed": seed, "n_iterations": n_iterations}
    if partition != "modularity":
        kw["resolution_parameter"] = resolution
    part = leidenalg.find_partition(g, kinds[partition], **kw)
    info = {"quality": float(part.quality()), "partition": partition}
    if partition != "modularity":
        info["resolution"] = resolution
    return np.asarray(part.membership, dtype=np.int64), info


def infomap(A: sp.csr_matrix, seed: int = 0, trials: int = 1) -> tuple[np.ndarray, dict]:
    try:
        import infomap as _infomap  # AGPL-3.0: optional extra, imported lazily
    except ImportError as e:
        raise ImportError(
            "method='infomap' needs the optional 'infomap' package (AGPL-3.0): "
            "install it with `pip install lineup[infomap]`"
        ) from e
    N = A.shape[0]
    im = _infomap.Infomap(f"--two-level --silent --seed {int(seed) + 1} --num-trials {int(trials)}")
    im.add_nodes(range(N))
    U = sp.triu(A, k=1).tocoo()
    for i, j, w in zip(U.row.tolist(), U.col.tolist(), U.data.tolist()):
        im.add_link(i, j, w)
    im.run()
    labels = np.arange(N, dtype=np.int64)
    mods = im.get_modules()
    for node, m in mods.items():
        labels[node] = N + int(m)  # offset keeps untouched nodes as their own cluster
    return labels, {"codelength": float(im.codelength)}


def cluster_graph(
    indices: np.ndarray,
    similarities: np.ndarray,
    method: str = DEFAULT_METHOD,
    threshold: float = DEFAULT_THRESHOLDS["dlib"],
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    split: bool = True,
    **kwargs,
) -> Clustering:
    """Cluster a kNN graph (``indices``/``similarities`` N x k) -> canonical labels.

    With ``embeddings`` (the N x D unit vectors the graph was built from) and ``split``, clusters
    that are not cohesive are clustered again (:func:`split_incoherent`): the guard against giant
    merged identities. ``kwargs`` go to the method: chinese_whispers(max_iter, n_batches),
    leiden(partition, resolution, n_iterations), infomap(trials)."""
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {METHODS}")
    t = time.perf_counter()
    A = threshold_graph(np.asarray(indices), np.asarray(similarities), threshold)
    graph_s = time.perf_counter() - t
    if method == "chinese_whispers":
        labels, info = chinese_whispers(A, seed=seed, **kwargs)
    elif method == "leiden":
        labels, info = leiden(A, seed=seed, **kwargs)
    elif method == "infomap":
        labels, info = infomap(A, seed=seed, **kwargs)
    else:
        labels, info = connected_components(A), {}
    labels = canonical_labels(labels)
    if split and embeddings is not None and len(labels):
        if len(embeddings) != len(labels):
            raise ValueError(f"embeddings ({len(embeddings)}) and graph ({len(labels)}) differ in length")
        t_split = time.perf_counter()
        labels, split_info = split_incoherent(
            A, labels, embeddings, threshold, min_cohesion=threshold - SPLIT_COHESION_MARGIN,
            min_size=SPLIT_MIN_SIZE, step=SPLIT_STEP, max_rounds=SPLIT_MAX_ROUNDS, seed=seed,
        )
        info.update(split_info, split_s=time.perf_counter() - t_split)
    info["graph_s"] = graph_s
    return Clustering(labels, method, float(threshold), int(A.nnz // 2), time.perf_counter() - t, info)


def centroid_sums(E: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None, n_clusters: int | None = None,
                  block: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster of two faces or more, the sum of its (unit) embeddings.

    Returns (sizes by label, slot: each label's row in sums or -1 for singletons, sums float32).
    Singletons get no row and the sums are float32: at 10M faces with many singletons a clusters x D
    float64 array would be the largest thing in memory. ``rows``: only these faces (their clusters
    must be whole)."""
    whole = rows is None  # every face: read E in contiguous blocks
    rows = np.arange(len(labels)) if whole else np.asarray(rows)
    C = n_clusters if n_clusters is not None else (int(labels.max()) + 1 if len(labels) else 0)
    sizes = np.bincount(labels[rows], minlength=C).astype(np.int64)
    multi = np.flatnonzero(sizes > 1)
    slot = np.full(C, -1, dtype=np.int64)
    slot[multi] = np.arange(len(multi))
    sums = np.zeros((len(multi), E.shape[1]), dtype=np.float32)
    for s in range(0, len(rows), block):
        r = rows[s : s + block]
        sl = slot[labels[r]]
        keep = np.flatnonzero(sl >= 0)
        if len(keep):  # a sparse one-hot product: np.add.at is ~10x slower
            onehot = sp.csr_matrix((np.ones(len(keep), np.float32), (sl[keep], np.arange(len(keep)))),
                                   shape=(len(multi), len(keep)))
            x = np.asarray(E[s : s + len(r)], dtype=np.float32)[keep] if whole else np.asarray(E[r[keep]], np.float32)
            sums += onehot @ x
    return sizes, slot, sums


def cluster_cohesion(E: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None):
    """(sizes, mean pairwise cosine similarity inside each cluster; NaN for singletons), by label.

    For unit vectors sum_{i != j} <e_i, e_j> = |sum|^2 - n: one pass over the faces."""
    sizes, slot, sums = centroid_sums(E, labels, rows)
    return sizes, mean_pairwise_similarity(sizes, slot, sums)


def mean_pairwise_similarity(sizes: np.ndarray, slot: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """From :func:`centroid_sums`: each cluster's mean pairwise similarity (NaN for singletons)."""
    mean_sim = np.full(len(sizes), np.nan)
    multi = slot >= 0
    n = sizes[multi].astype(np.float64)
    mean_sim[multi] = ((sums.astype(np.float64) ** 2).sum(1) - n) / (n * (n - 1))
    return mean_sim


def split_incoherent(
    A: sp.csr_matrix,
    labels: np.ndarray,
    embeddings: np.ndarray,
    threshold: float,
    min_cohesion: float,
    min_size: int,
    step: float,
    max_rounds: int,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Re-cluster every cluster that is not an identity: ``min_size`` faces or more whose mean pairwise
    similarity is below ``min_cohesion``.

    Chinese whispers links a chain of faces each above the threshold, so a few cross-identity edges
    (look-alikes, generic faces near the mean face) can merge many people into one giant cluster
    whose members are mostly far apart. Such a cluster is clustered again on its own edges at a
    threshold raised by ``step``, which cuts the weakest links first; pieces still incoherent go
    again, up to ``max_rounds``. Only the faces of incoherent clusters are touched (cost in
    proportion to them), and each pass is seeded: deterministic."""
    labels = labels.copy()
    rows = np.arange(len(labels))
    hist = []
    for r in range(1, max_rounds + 1):
        sizes, cohesion = cluster_cohesion(embeddings, labels, rows)
        with np.errstate(invalid="ignore"):
            bad = (sizes >= min_size) & (cohesion < min_cohesion)
        if not bad.any():
            break
        rows = rows[bad[labels[rows]]]
        t_r = threshold + step * r
        sub = A[rows][:, rows].tocoo()
        lab_r = labels[rows]
        keep = (sub.data >= t_r) & (lab_r[sub.row] == lab_r[sub.col])  # never joins two clusters
        sub = sp.csr_matrix((sub.data[keep], (sub.row[keep], sub.col[keep])), shape=(len(rows), len(rows)))
        pieces, _ = chinese_whispers(sub, seed=seed)
        hist.append({"round": r, "threshold": round(t_r, 4), "clusters": int(bad.sum()), "faces": len(rows),
                     "largest": int(sizes[bad].max())})
        labels[rows] = int(labels.max()) + 1 + pieces  # fresh labels: pieces never join an old cluster
    return canonical_labels(labels), {"split_rounds": hist}
