"""Entry point for the ``identities`` asset: kNN graph -> clustering -> stable ids -> tables.

Determinism: faces are sorted by (uid, face_index) before anything else, so the output does not
depend on input row order; every random step is seeded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute  # makes pa.compute available

from .cluster import DEFAULT_METHOD, centroid_sums, cluster_graph, default_threshold, mean_pairwise_similarity
from .knn import EXACT_MAX_DEFAULT, IvfIndex, exact_knn_of_rows, knn_graph, load_embeddings
from .local_recluster import LOCAL_RECLUSTER_MAX_FACES, id_number, previous_codes
from .local_recluster import local_recluster as recluster_touched
from .stable_ids import (
    assign_incremental,
    face_key_array,
    face_keys,
    format_id,
    high_water,
    map_to_previous,
    next_id_number,
    previous_positions,
    with_high_water,
)

log = logging.getLogger(__name__)

ASSIGNMENTS_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("face_index", pa.int32()),
        ("identity_id", pa.string()),
        ("cluster_size", pa.int64()),
        ("sim_to_centroid", pa.float32()),  # cosine to the identity's mean direction
        ("nn_similarity", pa.float32()),  # similarity to the nearest other face (any identity)
        ("ivf_cell", pa.int32()),  # the face's cell in the persisted IVF index (null without one)
    ]
)
SUMMARY_SCHEMA = pa.schema(
    [
        ("identity_id", pa.string()),
        ("size", pa.int64()),
        ("mean_intra_similarity", pa.float32()),  # mean pairwise cosine among members (null for size 1)
        ("representative_uid", pa.string()),
        ("representative_face_index", pa.int32()),
    ]
)


@dataclass
class IdentityResult:
    assignments: pa.Table  # ASSIGNMENTS_SCHEMA, one row per face, sorted by (uid, face_index)
    summary: pa.Table  # SUMMARY_SCHEMA, one row per identity, sorted by identity_id
    stats: dict = field(default_factory=dict)
    graph: object | None = None  # the KnnGraph (rows in (uid, face_index) order) when return_graph=True
    index: IvfIndex | None = None  # the IVF cells to keep for the next refresh (None below exact_max)


def _cluster_stats(E: np.ndarray, labels: np.ndarray, C: int, block: int = 65_536):
    """Per cluster: size, mean pairwise similarity; per face: similarity to its cluster's centroid
    (a singleton's face is its own centroid: similarity 1)."""
    sizes, row_of, sums = centroid_sums(E, labels, n_clusters=C, block=block)
    mean_intra = mean_pairwise_similarity(sizes, row_of, sums)
    sq = np.full(C, 1.0)
    sq[row_of >= 0] = (sums.astype(np.float64) ** 2).sum(1)
    norms = np.sqrt(np.maximum(sq, 1e-30))
    sim_c = np.ones(E.shape[0], dtype=np.float32)
    for s in range(0, E.shape[0], block):
        e = min(E.shape[0], s + block)
        lab = labels[s:e]
        r = row_of[lab]
        keep = np.flatnonzero(r >= 0)
        if len(keep):
            x = np.asarray(E[s:e], dtype=np.float32)[keep]
            sim_c[s + keep] = (x * sums[r[keep]]).sum(1) / norms[lab[keep]]
    return sizes, mean_intra, sim_c, None


def _doubtful_pairs(E, labels, sim_c, sizes, n_pairs=20, n_candidates=200, max_scan=20_000):
    """Pairs in the same identity with the lowest similarity (candidates: faces farthest from centroid)."""
    multi = sizes[labels] > 1
    cand = np.flatnonzero(multi)
    if len(cand) == 0:
        return []
    cand = cand[np.argsort(sim_c[cand], kind="stable")[:n_candidates]]
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(labels.max() + 2))
    pairs = {}
    for i in cand.tolist():
        c = labels[i]
        members = order[starts[c] : starts[c + 1]][:max_scan]
        members = members[members != i]
        sims = np.asarray(E[members], dtype=np.float32) @ np.asarray(E[i], dtype=np.float32)
        j = int(members[int(np.argmin(sims))])
        key = (min(i, j), max(i, j))
        pairs[key] = float(sims.min())
    out = sorted(pairs.items(), key=lambda kv: (kv[1], kv[0]))[:n_pairs]
    return [(a, b, s) for (a, b), s in out]


def build_identities(
    uids,
    face_indices,
    embeddings: np.ndarray | str,
    previous: pa.Table | None = None,
    method: str = DEFAULT_METHOD,
    threshold: float | None = None,
    backend_name: str = "dlib",
    k: int = 10,
    knn_backend: str = "auto",
    mode: str = "recluster",
    min_overlap: int = 1,
    seed: int = 0,
    n_hist_samples: int = 100_000,
    n_doubtful: int = 20,
    return_graph: bool = False,
    index: IvfIndex | None = None,
    exact_max: int = EXACT_MAX_DEFAULT,
    local_recluster: bool = True,
    local_recluster_max_faces: int = LOCAL_RECLUSTER_MAX_FACES,
    knn_adaptive: bool | None = None,
    **cluster_kwargs,
) -> IdentityResult:
    """Cluster faces into identities with ids stable across refreshes.

    uids, face_indices: one per face (row i of ``embeddings``); embeddings: N x D float32,
    L2-normalised (array or .npy path, memory-mapped). ``previous``: the last assignments table
    (needs uid, face_index, identity_id) or None. ``mode``: "recluster" (cluster everything, then
    map clusters onto previous ids by Hungarian overlap) or "incremental" (new faces join an existing
    identity by kNN vote or form new ones; then, with ``local_recluster``, the identities they touch
    are clustered again with them, up to ``local_recluster_max_faces`` faces, and mapped back onto
    their ids by overlap: merges and splits happen there, every other face keeps its id; see
    :mod:`pipeline.identity.local_recluster`). ``threshold`` defaults
    to the per-backend value in :data:`pipeline.identity.cluster.DEFAULT_THRESHOLDS`.
    ``index``: the IVF cells kept from the last build (``IdentityResult.index``); an incremental
    refresh above ``exact_max`` faces searches its new faces through them (and trains them first
    when there are none, or when the collection has outgrown them: :meth:`IvfIndex.stale_for`).
    ``knn_adaptive``: ivf-blas's adaptive probing (None: its module default; an int n >= 1: on, with a
    patience of n steps; docs/benchmarks.md "10M faces in 20 minutes": less CPU for a lower recall at 10M).
    """
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    thr = default_threshold(backend_name) if threshold is None else float(threshold)
    E0 = load_embeddings(embeddings)
    uids = np.asarray(uids)
    if uids.dtype.kind != "U":  # a str array is used as it is (no copy: 0.4 GB at 10M)
        uids = uids.astype(str)
    face_indices = np.asarray(face_indices, dtype=np.int64)
    N = len(uids)
    if E0.shape[0] != N or len(face_indices) != N:
        raise ValueError(
            f"uids ({N}), face_indices ({len(face_indices)}) and embeddings ({E0.shape[0]}) differ"
        )
    if mode not in ("recluster", "incremental"):
        raise ValueError("mode must be 'recluster' or 'incremental'")

    t = time.perf_counter()
    order = np.lexsort((face_indices, uids))
    uids_s, fidx_s = uids[order], face_indices[order]
    if N > 1 and ((uids_s[1:] == uids_s[:-1]) & (fidx_s[1:] == fidx_s[:-1])).any():  # sorted: duplicates adjacent
        raise ValueError("duplicate (uid, face_index) rows")
    identity_order = np.array_equal(order, np.arange(N))
    E = E0 if identity_order else np.ascontiguousarray(E0[order], dtype=np.float32)
    timings["sort_s"] = time.perf_counter() - t

    next_number = high_water(previous)  # retired ids stay retired (see stable_ids)
    has_previous = previous is not None and previous.num_rows > 0
    incremental = has_previous and mode == "incremental"
    prev_pos = previous_positions(uids_s, fidx_s, previous) if incremental else None

    stats: dict = {"n_faces": N, "method": method, "threshold": thr, "backend_name": backend_name, "k": k}
    cell_of = None  # each face's IVF cell, when the index exists (persisted for the next refresh)
    t, c = time.perf_counter(), time.process_time()
    if incremental:
        # no graph over the whole collection: only the new faces are searched (their k nearest among
        # all faces), so a refresh costs in proportion to what it brings
        new_pos = np.flatnonzero(prev_pos < 0)
        # each face's previous identity as an int code: the search's identity hop and the local recluster
        codes = previous_codes(prev_pos, previous)
        g, cell_of, index, how = _new_faces_graph(E, new_pos, k, thr, prev_pos, previous, index, seed, exact_max, codes)
        stats["knn_backend"] = f"incremental: new faces searched {how}"
        stats["knn_params"] = {"new_faces": len(new_pos), **g.params}
    else:
        g = knn_graph(E, k=k, backend=knn_backend, seed=seed, recall_min_similarity=thr, exact_max=exact_max,
                      adaptive=knn_adaptive)
        stats["knn_backend"] = g.backend
        stats["knn_params"] = g.params
        index, cell_of = g.index if g.index is not None else (None, None)
    timings["knn_s"], timings["knn_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    log.info("identities: kNN of %d faces in %.1f s (%.1f CPU-s)", N, timings["knn_s"], timings["knn_cpu_s"])

    t, c = time.perf_counter(), time.process_time()
    if incremental:

        def _cluster_new(Esub):
            gs = knn_graph(Esub, k=k, backend=knn_backend, seed=seed, recall_min_similarity=thr, adaptive=knn_adaptive)
            return cluster_graph(
                gs.indices, gs.similarities, method=method, threshold=thr, seed=seed, embeddings=Esub,
                **cluster_kwargs,
            ).labels

        prev_ids = previous.column("identity_id").to_numpy(zero_copy_only=False)
        ids, churn = assign_incremental(
            prev_pos, prev_ids, thr, neighbours=(g.indices, g.similarities), cluster_new=_cluster_new,
            embeddings=E, next_number=next_number,
        )
        if local_recluster:

            def _knn(Esub):  # one component: exact (one thread: no OpenMP spinning on a busy box)
                if len(Esub) <= exact_max:
                    return exact_knn_of_rows(Esub, np.arange(len(Esub)), k)
                gs = knn_graph(Esub, k=k, backend=knn_backend, seed=seed, recall_min_similarity=thr, adaptive=knn_adaptive,
                               exact_max=exact_max)
                return gs.indices, gs.similarities

            def _cluster(I, S, rows):
                # with the split of incoherent clusters, as a full recluster has: new faces that bridge
                # identities otherwise merge them here (20k crowd faces: pairwise precision 0.85 -> 0.71)
                Esub = np.ascontiguousarray(E[rows], dtype=np.float32)
                return cluster_graph(I, S, method=method, threshold=thr, seed=seed, embeddings=Esub,
                                     **cluster_kwargs).labels

            ids, local = recluster_touched(
                ids, codes, new_pos, (g.indices, g.similarities), thr, next_number,
                _cluster, _knn, E, max_faces=local_recluster_max_faces, min_overlap=min_overlap,
            )
            merged = local.get("identities_merged", 0)
            new_known = np.fromiter((id_number(i) < next_number for i in ids[new_pos].tolist()), bool, len(new_pos))
            churn.update(
                faces_id_changed=local.get("faces_id_changed", 0), ids_created=local.get("ids_created", churn["ids_created"]),
                ids_retired=churn["ids_retired"] + merged, ids_kept=churn["ids_kept"] - merged,
                new_faces_assigned_existing=int(new_known.sum()), new_faces_new_ids=int((~new_known).sum()),
                new_faces_bridging_left_to_nightly=local.get(
                    "new_faces_bridging_left_to_nightly", churn["new_faces_bridging_identities"]),
                identity_pairs_left_to_nightly=local.get(
                    "identity_pairs_left_to_nightly", churn["identity_pairs_bridged"]),
            )
        else:
            local = {"status": "off"}
            churn.update(new_faces_bridging_left_to_nightly=churn["new_faces_bridging_identities"],
                         identity_pairs_left_to_nightly=churn["identity_pairs_bridged"])
        stats["local_recluster"] = local
        timings["local_recluster_s"] = float(local.get("seconds", 0.0))
        # labels in order of first appearance (Arrow's dictionary encoding: no sort of a million strings)
        labels = pa.compute.dictionary_encode(pa.array(ids.tolist(), pa.string())).indices.to_numpy().astype(np.int64)
        stats["churn"] = churn
        stats["cluster_info"] = {"mode": "incremental"}
    else:
        cl = cluster_graph(
            g.indices, g.similarities, method=method, threshold=thr, seed=seed, embeddings=E, **cluster_kwargs
        )
        labels = cl.labels
        stats["cluster_info"] = dict(cl.info, n_edges=cl.n_edges)
        if has_previous:
            keys_sorted = face_keys(uids_s, fidx_s)
            prev_keys = face_keys(previous.column("uid").to_pylist(), previous.column("face_index").to_pylist())
            prev_ids = np.asarray(previous.column("identity_id").to_pylist(), dtype=object).astype(str)
            ids, churn = map_to_previous(
                labels, keys_sorted, prev_keys, prev_ids, min_overlap=min_overlap, next_number=next_number
            )
            stats["churn"] = churn
        else:
            # no previous assignments (or an empty table): number clusters after its mark; the
            # labels are canonical (by smallest member), so cluster c gets next_number + c. One
            # string per cluster, not per face (10M Python strings are ~0.7 GB)
            ids = None
            stats["churn"] = None
    timings["cluster_s"], timings["cluster_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    log.info("identities: clustered in %.1f s (%.1f CPU-s)", timings["cluster_s"], timings["cluster_cpu_s"])

    t = time.perf_counter()
    C = int(labels.max()) + 1 if N else 0
    sizes, mean_intra, sim_c, _ = _cluster_stats(E, labels, C)
    # representative: face closest to its centroid (ties -> first in (uid, face_index) order)
    rep = np.full(C, -1, dtype=np.int64)
    best = np.full(C, -np.inf)
    o = np.lexsort((np.arange(N), -sim_c.astype(np.float64), labels))
    first = np.ones(N, dtype=bool)
    first[1:] = labels[o][1:] != labels[o][:-1]
    rep[labels[o][first]] = o[first]
    del best
    if ids is None:
        id_of_label = np.array([format_id(next_number + c) for c in range(C)], dtype=object)
    else:
        id_of_label = np.empty(C, dtype=object)
        id_of_label[labels] = ids
        del ids

    if incremental:  # kept from the last build for known faces; searched now for new ones
        nn_sim = np.full(N, np.nan, np.float32)
        if "nn_similarity" in previous.column_names:
            prev_nn = previous.column("nn_similarity").to_numpy(zero_copy_only=False).astype(np.float32)
            nn_sim[prev_pos >= 0] = prev_nn[prev_pos[prev_pos >= 0]]
        nn_sim[g.rows] = g.similarities[:, 0] if g.rows.size and g.k else np.nan
    else:
        nn_sim = g.similarities[:, 0] if g.k and N > 1 else np.full(N, np.nan, np.float32)
    nn_sim = np.where(np.isfinite(nn_sim), nn_sim, np.nan).astype(np.float32)
    assignments = pa.table(
        {
            "uid": pa.array(uids_s, pa.string()),
            "face_index": pa.array(fidx_s.astype(np.int32), pa.int32()),
            "identity_id": pa.array(id_of_label, pa.string()).take(pa.array(labels)),
            "cluster_size": pa.array(sizes[labels], pa.int64()),
            "sim_to_centroid": pa.array(sim_c, pa.float32()),
            "nn_similarity": pa.array(nn_sim, pa.float32()),
            "ivf_cell": pa.array(cell_of, pa.int32()) if cell_of is not None else pa.nulls(N, pa.int32()),
        },
        schema=ASSIGNMENTS_SCHEMA,
    )
    stats["id_high_water"] = max(next_number, next_id_number(id_of_label) if C else 0)
    assignments = with_high_water(assignments, stats["id_high_water"])
    srt = np.argsort(id_of_label.astype(str), kind="stable")
    summary = pa.table(
        {
            "identity_id": pa.array(id_of_label[srt].tolist(), pa.string()),
            "size": pa.array(sizes[srt], pa.int64()),
            "mean_intra_similarity": pa.array(
                mean_intra[srt].astype(np.float32), pa.float32(), mask=~np.isfinite(mean_intra[srt])
            ),
            "representative_uid": pa.array(uids_s[rep[srt]], pa.string()),
            "representative_face_index": pa.array(fidx_s[rep[srt]].astype(np.int32), pa.int32()),
        },
        schema=SUMMARY_SCHEMA,
    )

    # similarity distributions over kNN edges: within vs across identities (for histograms);
    # in blocks of rows, in row-major edge order (no N x k int64 copies of the graph)
    row_ids = g.rows if incremental else np.arange(N)
    within, across = [np.zeros(0, np.float32)], [np.zeros(0, np.float32)]  # no rows: empty samples
    for s in range(0, len(row_ids), 1 << 20):
        I_b, S_b = g.indices[s : s + (1 << 20)], g.similarities[s : s + (1 << 20)]
        valid = I_b >= 0
        same = labels[row_ids[s : s + (1 << 20), None]] == labels[np.where(valid, I_b, 0)]
        within.append(S_b[valid & same])
        across.append(S_b[valid & ~same])
    rng = np.random.default_rng(seed)

    def _sample(x):
        if len(x) > n_hist_samples:
            x = x[np.sort(rng.choice(len(x), n_hist_samples, replace=False))]
        return x.astype(np.float32)

    stats["similarity_within"] = _sample(np.concatenate(within))
    stats["similarity_across"] = _sample(np.concatenate(across))
    del within, across
    stats["similarity_note"] = ("kNN-edge similarities (each face's k nearest), sampled to n_hist_samples"
                                + (" - of the new faces only (incremental refresh)" if incremental else ""))
    dp = _doubtful_pairs(E, labels, sim_c, sizes, n_pairs=n_doubtful)
    stats["doubtful_merges"] = [
        {
            "identity_id": str(id_of_label[labels[a]]),
            "uid_a": str(uids_s[a]),
            "face_index_a": int(fidx_s[a]),
            "uid_b": str(uids_s[b]),
            "face_index_b": int(fidx_s[b]),
            "similarity": s,
        }
        for a, b, s in dp
    ]
    stats["n_identities"] = C
    stats["n_singletons"] = int((sizes == 1).sum())
    stats["largest_identity"] = int(sizes.max()) if C else 0
    # a giant merged identity (many people chained together) has a low mean pairwise similarity
    big = int(np.argmax(sizes)) if C else -1
    stats["largest_identity_mean_similarity"] = (
        float(mean_intra[big]) if C and np.isfinite(mean_intra[big]) else None)
    # clusters Chinese whispers made that were not cohesive and were clustered again (cluster.split_incoherent)
    stats["incoherent_split"] = stats["cluster_info"].get("split_rounds", [])
    timings["tables_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all
    stats["timings"] = timings
    return IdentityResult(assignments, summary, stats, g if return_graph else None, index)


@dataclass
class _PartialGraph:
    """The k nearest neighbours (self excluded) of some faces (``rows``) among all faces."""

    rows: np.ndarray
    indices: np.ndarray
    similarities: np.ndarray
    params: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def _new_faces_graph(E, rows, k, thr, prev_pos, previous, index, seed, exact_max, codes):
    """The new faces' k nearest among all faces: (graph, every face's IVF cell or None, index, how).

    Up to ``exact_max`` faces: exact search (cheap at that size). Above: through the IVF cells of
    the last build, every known face in the cell recorded for it; the cells are trained here first
    when there are none, when a face of the previous table has no cell, or when the collection has
    outgrown them. A refresh with no new face keeps the cells as they are. ``codes``: each face's previous
    identity as an int code (-1 new), for the search's hop through a found identity's cells."""
    from .knn import knn_ivf_search, train_ivf_index

    N, D = E.shape
    params: dict = {}
    if N <= exact_max:
        if len(rows) == 0:
            return _PartialGraph(rows, np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)), None, None, "exactly"
        g = _PartialGraph(rows, *exact_knn_of_rows(E, rows, k))
        return g, None, None, "exactly"
    known = prev_pos >= 0
    cell_of = np.full(N, -1, np.int64)
    why = None if index is not None else "no cells were kept from the last build"
    if why is None and "ivf_cell" in previous.column_names:
        prev_cells = previous.column("ivf_cell").to_numpy(zero_copy_only=False)
        prev_cells = np.where(np.isfinite(prev_cells.astype(np.float64)), prev_cells, -1).astype(np.int64) \
            if prev_cells.dtype.kind == "f" else prev_cells.astype(np.int64)
        cell_of[known] = prev_cells[prev_pos[known]]
        if (cell_of[known] < 0).any() or (cell_of[known] >= index.nlist).any():
            why = "faces of the last build without a cell"
    elif why is None:
        why = "the previous table has no ivf_cell column"
    why = why or index.stale_for(N, D)
    how = "through the kept IVF cells"
    if why is not None:
        t = time.perf_counter()
        index, trained = train_ivf_index(E, seed=seed)
        cell_of = trained.astype(np.int64)
        cell_of[rows] = -1  # assigned (and searched) below like every new face
        params["cells_trained"] = why
        params["train_s"] = round(time.perf_counter() - t, 3)
        how = f"through IVF cells trained now ({why})"
    # identity of every known face: a new face that finds one face of an identity scans all its cells
    I, S, cells, info = knn_ivf_search(E, rows, index, cell_of, k, min_sim=thr, seed=seed,
                                       groups=codes)
    params.update({kk: v for kk, v in info.items() if kk != "rounds"})
    return _PartialGraph(rows, I, S, params), cells, index, how


def with_identity_ids(faces: pa.Table, identities: pa.Table) -> pa.Table:
    """faces plus an identity_id column (null for faces not clustered yet). A face listed more than once
    in ``identities`` takes its last row's id. Joined on Arrow hash look-ups, without Python objects."""
    enc = face_key_array(identities).dictionary_encode()
    last = np.zeros(len(enc.dictionary), np.int64)  # each distinct face's last row in identities
    np.maximum.at(last, np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64),
                  np.arange(identities.num_rows, dtype=np.int64))
    pos = pa.compute.index_in(face_key_array(faces), value_set=enc.dictionary)  # null: not clustered yet
    rows = pa.compute.take(pa.array(last), pos)
    col = identities.column("identity_id").combine_chunks().cast(pa.string()).take(rows)
    if "identity_id" in faces.column_names:
        faces = faces.drop_columns(["identity_id"])
    return faces.append_column("identity_id", col)
