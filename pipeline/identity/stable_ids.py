"""Stable identity ids across dataset refreshes.

Ids are strings ``"id-000123"``: a sequential number, zero-padded to 6 digits (more digits past
999,999). New ids continue after a high-water mark and are handed out in a deterministic order
(clusters ordered by their smallest (uid, face_index) key), so the same inputs + the same previous
table always give the same ids.

Retired ids are never reused: the high-water mark (the next number to hand out) is stored in the
assignments table's schema metadata under :data:`HIGH_WATER_KEY` (it survives the Parquet round
trip) and read back by :func:`high_water`, which also never goes below the largest id present + 1.
An id whose faces all left the collection (a removal request, a merge) therefore stays unused.
Tables written before the mark existed fall back to the largest id present + 1.

Two ways to carry ids over:

(a) :func:`assign_incremental`: faces already in the previous table keep their id; each new face's
    ``k`` nearest faces (found by the caller: through the persisted IVF cells, or exactly in small
    collections, see identity/build.py) vote: among the
    neighbours with similarity >= threshold, every identity scores the sum of their similarities;
    the best identity wins if it has at least ``min_votes`` such neighbours (ties -> smallest id).
    New faces that match nothing are clustered among themselves with the same method/threshold
    and get new ids.
(b) :func:`map_to_previous`: after a full re-cluster, the overlap counts (new cluster x old id,
    over faces present in both) are kept sparse; the bipartite overlap graph is cut into its
    connected blocks and each block is matched on its own, maximising total overlap (a 1 x 1
    block directly; small blocks with ``scipy.optimize.linear_sum_assignment`` on the dense
    block; blocks over DENSE_BLOCK_CELLS cells with the sparse LAPJVsp solver). A pair is
    accepted only if its overlap >= ``min_overlap`` faces. Unmatched new clusters get new ids;
    old ids left without a cluster are retired. Memory is O(faces + non-zero overlaps + largest
    dense block): 100k clusters map in tens of MB (tests/test_identity_stable_ids.py), where
    the dense C x C matrix would need ~80 GB.

Both return churn statistics (the same keys; :func:`churn_stats` after a recluster).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute  # makes pa.compute available
import scipy.sparse as sp

ID_PREFIX = "id-"
_ID_RE = re.compile(r"^id-(\d+)$")
HIGH_WATER_KEY = b"lineup.identity_next_number"
DENSE_BLOCK_CELLS = 1_000_000  # larger overlap blocks use the sparse assignment solver


def format_id(n: int) -> str:
    return f"{ID_PREFIX}{int(n):06d}"


def next_id_number(existing_ids) -> int:
    """Largest id number among ``existing_ids`` + 1 (0 when there is none). Vectorised in Arrow
    (a million ids: ~0.1 s instead of ~1 s in a Python loop)."""
    if isinstance(existing_ids, (pa.Array, pa.ChunkedArray)):
        arr = existing_ids.cast(pa.string())
    else:
        vals = existing_ids if isinstance(existing_ids, np.ndarray) else list(existing_ids)
        if len(vals) == 0:
            return 0
        arr = pa.array([None if v is None else str(v) for v in vals] if not isinstance(vals, np.ndarray)
                       else np.asarray(vals, dtype=object), pa.string(), from_pandas=True)
    if len(arr) == 0:
        return 0
    uniq = pa.compute.unique(arr)
    nums = pa.compute.struct_field(pa.compute.extract_regex(uniq, _ID_RE.pattern.replace("(", "(?P<n>", 1)), [0])
    m = pa.compute.max(pa.compute.cast(nums, pa.int64())).as_py()
    return 0 if m is None else int(m) + 1


def high_water(table: pa.Table | None) -> int:
    """Next id number that may be handed out after ``table`` (an assignments table): the stored
    mark, and never less than its largest id + 1. 0 for no table."""
    if table is None:
        return 0
    meta = table.schema.metadata or {}
    stored = int(meta[HIGH_WATER_KEY]) if HIGH_WATER_KEY in meta else 0
    present = (
        next_id_number(table.column("identity_id")) if "identity_id" in table.column_names else 0
    )
    return max(stored, present)


def with_high_water(table: pa.Table, next_number: int) -> pa.Table:
    """``table`` with the high-water mark stored in its schema metadata (other keys kept)."""
    meta = dict(table.schema.metadata or {})
    meta[HIGH_WATER_KEY] = str(int(next_number)).encode()
    return table.replace_schema_metadata(meta)


def face_keys(uids, face_indices) -> np.ndarray:
    """Structured key per face (uid, face_index) as a 1-D object array of tuples for joins."""
    return np.array([f"{u}\x1f{int(f)}" for u, f in zip(uids, face_indices)], dtype=object)


def _new_ids_for_clusters(labels: np.ndarray, clusters_needing_ids: np.ndarray, start: int) -> dict[int, str]:
    """Give new ids to the listed clusters in order of their smallest member position."""
    if len(clusters_needing_ids) == 0:
        return {}
    uniq, first = np.unique(np.asarray(labels), return_index=True)
    first_pos = first[np.searchsorted(uniq, clusters_needing_ids)]
    ordered = np.asarray(clusters_needing_ids)[np.argsort(first_pos, kind="stable")]
    return {int(c): format_id(start + i) for i, c in enumerate(ordered.tolist())}


def churn_stats(
    keys: np.ndarray, new_ids: np.ndarray, prev_keys: np.ndarray, prev_ids: np.ndarray, shared=None
) -> dict:
    """Faces whose id changed (among faces in both), ids created, ids retired, ids kept.
    ``shared``: the (positions in keys, positions in prev_keys) of :func:`_shared_faces`, if known."""
    new_ids = np.asarray(new_ids, dtype=object).astype(str)
    prev_ids = np.asarray(prev_ids, dtype=object).astype(str)
    pos_new, pos_old = shared or _shared_faces(np.asarray(keys), np.asarray(prev_keys))
    new_set, old_set = np.unique(new_ids), np.unique(prev_ids)
    kept = len(np.intersect1d(new_set, old_set, assume_unique=True))
    return {
        "faces_previous": len(prev_keys),
        "faces_now": len(keys),
        "faces_in_both": len(pos_new),
        "faces_id_changed": int((new_ids[pos_new] != prev_ids[pos_old]).sum()),
        "faces_new": int(len(keys) - len(pos_new)),
        "faces_removed": int(len(prev_keys) - len(pos_new)),
        "ids_kept": kept,
        "ids_created": len(new_set) - kept,
        "ids_retired": len(old_set) - kept,
    }


def map_to_previous(
    labels: np.ndarray,
    keys: np.ndarray,
    prev_keys: np.ndarray,
    prev_ids: np.ndarray,
    min_overlap: int = 1,
    next_number: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Map cluster labels (0..C-1) onto previous ids by maximum overlap; returns (ids per face, churn).

    ``next_number``: the first number new ids may take (the previous table's :func:`high_water`);
    default: the largest previous id + 1."""
    labels = np.asarray(labels, dtype=np.int64)
    C = int(labels.max()) + 1 if len(labels) else 0
    old_names, old_inv = np.unique(np.asarray(prev_ids, dtype=object).astype(str), return_inverse=True)
    old_inv = old_inv.ravel()
    pos_new, pos_old = _shared_faces(np.asarray(keys), np.asarray(prev_keys))
    assign: dict[int, str] = {}
    n_matched = 0
    if len(pos_new) and C:
        M = sp.coo_matrix(
            (np.ones(len(pos_new), np.int64), (labels[pos_new], old_inv[pos_old])), shape=(C, len(old_names))
        ).tocsr()
        M.sum_duplicates()
        rr, cc, w = _match_blocks(M)
        ok = w >= max(1, min_overlap)
        for a, b in zip(rr[ok].tolist(), cc[ok].tolist()):
            assign[a] = str(old_names[b])
        n_matched = int(ok.sum())
    unmatched = np.setdiff1d(np.arange(C, dtype=np.int64), np.fromiter(assign, np.int64, len(assign)))
    start = next_id_number(old_names.tolist()) if next_number is None else int(next_number)
    assign.update(_new_ids_for_clusters(labels, unmatched, start))
    id_of = np.empty(C, dtype=object)
    for c, i in assign.items():
        id_of[c] = i
    ids = id_of[labels]
    stats = churn_stats(
        np.asarray(keys), ids, np.asarray(prev_keys), np.asarray(prev_ids), shared=(pos_new, pos_old)
    )
    stats["clusters_matched"] = n_matched
    return ids, stats


def _shared_faces(keys: np.ndarray, prev_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in keys, in prev_keys) of the faces present in both (keys unique on each side)."""
    if len(keys) == 0 or len(prev_keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    allk = np.concatenate([keys.astype(str), prev_keys.astype(str)])
    _, inv = np.unique(allk, return_inverse=True)
    inv = inv.ravel()
    old_pos = np.full(inv.max() + 1, -1, np.int64)
    old_pos[inv[len(keys) :]] = np.arange(len(prev_keys))
    j = old_pos[inv[: len(keys)]]
    both = np.flatnonzero(j >= 0)
    return both, j[both]


def _match_blocks(M: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-overlap one-to-one matching of the rows and columns of a sparse overlap matrix,
    solved per connected block of its bipartite graph. Returns (rows, cols, overlaps)."""
    from scipy.sparse.csgraph import connected_components

    R, K = M.shape
    Mc = M.tocoo()
    r, c, w = Mc.row.astype(np.int64), Mc.col.astype(np.int64), Mc.data.astype(np.int64)
    if len(w) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    B = sp.coo_matrix((np.ones(len(r), np.int8), (r, c + R)), shape=(R + K, R + K))
    _, comp = connected_components(B, directed=False)
    comp_of_edge = comp[r]
    # blocks with a single edge (one cluster, one old id, nothing else): matched directly
    edges_per_comp = np.bincount(comp_of_edge, minlength=comp.max() + 1)
    single = edges_per_comp[comp_of_edge] == 1
    out_r, out_c, out_w = [r[single]], [c[single]], [w[single]]
    multi = np.flatnonzero(~single)
    if len(multi):
        order = multi[np.argsort(comp_of_edge[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(comp_of_edge[order])) + 1
        for e in np.split(order, bounds):
            br, bc, bw = _match_block(r[e], c[e], w[e])
            out_r.append(br)
            out_c.append(bc)
            out_w.append(bw)
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_w)


def _match_block(r: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One connected block given by its edges; rows/cols in increasing id order (deterministic)."""
    ur, ri = np.unique(r, return_inverse=True)
    uc, ci = np.unique(c, return_inverse=True)
    nr, nc = len(ur), len(uc)
    if nr * nc <= DENSE_BLOCK_CELLS:
        from scipy.optimize import linear_sum_assignment

        W = np.zeros((nr, nc), np.int64)
        W[ri, ci] = w
        a, b = linear_sum_assignment(W, maximize=True)
        keep = W[a, b] > 0
        return ur[a[keep]], uc[b[keep]], W[a, b][keep]
    # Sparse: pad to a square problem that always has a perfect matching. Real edges weigh
    # w * (n + 1), every padding edge 1, so the solver maximises total overlap first.
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = nr + nc
    big = np.float64(n + 1)
    rows = np.concatenate([ri, np.arange(nr), nr + np.arange(nc), nr + ci])
    cols = np.concatenate([ci, nc + np.arange(nr), np.arange(nc), nc + ri])
    vals = np.concatenate([w * big, np.ones(nr), np.ones(nc), np.ones(len(w))])
    P = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    a, b = min_weight_full_bipartite_matching(P, maximize=True)
    real = (a < nr) & (b < nc)
    a, b = a[real], b[real]
    W = sp.csr_matrix((w, (ri, ci)), shape=(nr, nc))
    wab = np.asarray(W[a, b]).ravel()
    return ur[a], uc[b], wab


def vote_identities(
    nbr_idx: np.ndarray, nbr_sim: np.ndarray, db_ids: np.ndarray, threshold: float, min_votes: int = 1
) -> np.ndarray:
    """Per query the id with the largest summed similarity among neighbours >= threshold, else None."""
    out = np.empty(nbr_idx.shape[0], dtype=object)
    out[:] = None
    for q in range(nbr_idx.shape[0]):
        ok = (nbr_idx[q] >= 0) & (nbr_sim[q] >= threshold)
        if not ok.any():
            continue
        score: dict[str, float] = {}
        count: dict[str, int] = {}
        for j, s in zip(nbr_idx[q][ok].tolist(), nbr_sim[q][ok].tolist()):
            i = db_ids[j]
            if i is None:  # a neighbour without an id yet (another new face) does not vote
                continue
            score[i] = score.get(i, 0.0) + s
            count[i] = count.get(i, 0) + 1
        if not score:
            continue
        best = min(score, key=lambda i: (-score[i], i))
        if count[best] >= min_votes:
            out[q] = best
    return out


def face_key_array(table: pa.Table) -> pa.Array:
    """One string per row naming its face, ``uid`` NUL ``face_index``: the key of Arrow hash look-ups
    between face tables (string keys of a million faces cost seconds in Python)."""
    uid = table.column("uid").combine_chunks().cast(pa.string())
    fi = table.column("face_index").combine_chunks().cast(pa.int64()).cast(pa.string())
    return pa.compute.binary_join_element_wise(uid, fi, "\x00")


def previous_positions(uids, face_indices, previous: pa.Table) -> np.ndarray:
    """Row of each face (uid, face_index) in ``previous`` (an assignments table), -1 for faces not
    in it."""
    N = len(uids)
    if previous is None or previous.num_rows == 0 or N == 0:
        return np.full(N, -1, dtype=np.int64)
    prev_keys = face_key_array(previous)
    if pa.compute.count_distinct(prev_keys).as_py() != len(prev_keys):
        raise ValueError("duplicate (uid, face_index) rows in the previous identities table")
    cur = pa.table({"uid": pa.array(np.asarray(uids).astype(str), pa.string()),
                    "face_index": pa.array(np.asarray(face_indices, dtype=np.int64))})
    pos = pa.compute.index_in(face_key_array(cur), value_set=prev_keys)
    return pos.fill_null(-1).to_numpy().astype(np.int64)


def assign_incremental(
    prev_pos: np.ndarray,
    prev_ids: np.ndarray,
    threshold: float,
    neighbours: tuple[np.ndarray, np.ndarray],
    cluster_new=None,
    embeddings: np.ndarray | None = None,
    next_number: int | None = None,
    min_votes: int = 1,
) -> tuple[np.ndarray, dict]:
    """Faces found in the previous table keep their id; the others vote through their neighbours
    or get new ids.

    ``prev_pos``: per face its row in the previous table, -1 for new faces (:func:`previous_positions`).
    ``prev_ids``: the previous table's identity ids. ``neighbours``: (indices, similarities) of the
    new faces' k nearest among all faces, rows in the order of the new faces; only faces with an id
    vote. ``cluster_new(E_sub) -> labels`` clusters the new faces no identity took (same method and
    threshold; each becomes its own identity without it); ``embeddings`` are needed for it.
    ``next_number``: first number for new ids (see :func:`high_water`); default largest + 1."""
    prev_pos = np.asarray(prev_pos, dtype=np.int64)
    prev_ids = np.asarray(prev_ids, dtype=object)
    N = len(prev_pos)
    ids = np.empty(N, dtype=object)
    known = prev_pos >= 0
    ids[known] = prev_ids[prev_pos[known]]
    new_pos = np.flatnonzero(~known)
    n_voted = 0
    bridging, bridged = 0, set()
    if len(new_pos) and known.any():
        # a new face with neighbours >= threshold in two identities would link them in a recluster:
        # counted, so that the UI says how many merges wait for the nightly recluster
        for row_i, row_s in zip(neighbours[0].tolist(), neighbours[1].tolist()):
            near = sorted({ids[j] for j, sim in zip(row_i, row_s) if j >= 0 and sim >= threshold and ids[j] is not None})
            if len(near) > 1:
                bridging += 1
                bridged.update((a, b) for i, a in enumerate(near) for b in near[i + 1:])
        votes = vote_identities(neighbours[0], neighbours[1], ids, threshold, min_votes)
        got = np.array([v is not None for v in votes.tolist()], dtype=bool)
        ids[new_pos[got]] = votes[got]
        n_voted = int(got.sum())
    rest = new_pos[np.array([ids[p] is None for p in new_pos.tolist()], dtype=bool)] if len(new_pos) else new_pos
    mapping: dict = {}
    if len(rest):
        if cluster_new is None:
            sub_labels = np.arange(len(rest))
        else:
            sub_labels = np.asarray(cluster_new(np.ascontiguousarray(embeddings[rest])))
        start = next_id_number(prev_ids.tolist()) if next_number is None else int(next_number)
        mapping = _new_ids_for_clusters(sub_labels, np.unique(sub_labels), start)
        ids[rest] = np.array([mapping[lab] for lab in sub_labels.tolist()], dtype=object)
    in_both = int(known.sum())
    n_old_ids = pa.compute.count_distinct(pa.array(prev_ids.tolist(), pa.string())).as_py() if len(prev_ids) else 0
    kept = pa.compute.count_distinct(pa.array(prev_ids[prev_pos[known]].tolist(), pa.string())).as_py() if in_both else 0
    stats = {
        "faces_previous": len(prev_ids),
        "faces_now": N,
        "faces_in_both": in_both,
        "faces_id_changed": 0,  # faces of the previous table keep their id in an incremental refresh
        "faces_new": N - in_both,
        "faces_removed": len(prev_ids) - in_both,
        "ids_kept": kept,
        "ids_created": len(mapping),
        "ids_retired": n_old_ids - kept,
        "new_faces_assigned_existing": n_voted,
        "new_faces_new_ids": len(rest),
        "new_faces_bridging_identities": bridging,  # neighbours >= threshold in 2+ identities
        "identity_pairs_bridged": len(bridged),  # merge candidates left to the nightly recluster
    }
    return ids, stats
