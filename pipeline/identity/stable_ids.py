"""Stable identity ids across dataset refreshes.

Ids are strings ``"id-000123"``: a sequential number, zero-padded to 6 digits (more digits past
999,999). New ids continue after the largest number found in the previous table, and are handed out
in a deterministic order (clusters ordered by their smallest (uid, face_index) key), so the same
inputs + the same previous table always give the same ids.

Two ways to carry ids over:

(a) :func:`assign_incremental`: faces already in the previous table keep their id; each new face
    searches the previous faces' embeddings (exact inner product, top ``k``) and votes: among the
    neighbours with similarity >= threshold, every identity scores the sum of their similarities;
    the best identity wins if it has at least ``min_votes`` such neighbours (ties -> smallest id).
    New faces that match nothing are clustered among themselves with the same method/threshold
    and get new ids.
(b) :func:`map_to_previous`: after a full re-cluster, the overlap matrix (new cluster x old id,
    counted over faces present in both) is solved with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``, maximising total overlap); a pair is accepted only
    if its overlap >= ``min_overlap`` faces. Unmatched new clusters get new ids; old ids left
    without a cluster are retired.

Both return churn statistics (:func:`churn_stats`).
"""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

ID_PREFIX = "id-"
_ID_RE = re.compile(r"^id-(\d+)$")


def format_id(n: int) -> str:
    return f"{ID_PREFIX}{int(n):06d}"


def next_id_number(existing_ids) -> int:
    m = -1
    for s in existing_ids:
        r = _ID_RE.match(str(s))
        if r:
            m = max(m, int(r.group(1)))
    return m + 1


def face_keys(uids, face_indices) -> np.ndarray:
    """Structured key per face (uid, face_index) as a 1-D object array of tuples for joins."""
    return np.array([f"{u}\x1f{int(f)}" for u, f in zip(uids, face_indices)], dtype=object)


def _new_ids_for_clusters(labels: np.ndarray, clusters_needing_ids: np.ndarray, start: int) -> dict[int, str]:
    """Give new ids to the listed clusters in order of their smallest member position."""
    if len(clusters_needing_ids) == 0:
        return {}
    first_pos = {}
    for pos, lab in enumerate(labels.tolist()):
        if lab not in first_pos:
            first_pos[lab] = pos
    ordered = sorted(clusters_needing_ids.tolist(), key=lambda c: first_pos[c])
    return {c: format_id(start + i) for i, c in enumerate(ordered)}


def churn_stats(keys: np.ndarray, new_ids: np.ndarray, prev_keys: np.ndarray, prev_ids: np.ndarray) -> dict:
    """Faces whose id changed (among faces in both), ids created, ids retired, ids kept."""
    prev = dict(zip(prev_keys.tolist(), prev_ids.tolist()))
    changed = 0
    common = 0
    for k, i in zip(keys.tolist(), new_ids.tolist()):
        if k in prev:
            common += 1
            changed += prev[k] != i
    new_set = set(new_ids.tolist())
    old_set = set(prev_ids.tolist())
    return {
        "faces_previous": len(prev_keys),
        "faces_now": len(keys),
        "faces_in_both": int(common),
        "faces_id_changed": int(changed),
        "faces_new": int(len(keys) - common),
        "faces_removed": int(len(prev_keys) - common),
        "ids_kept": len(new_set & old_set),
        "ids_created": len(new_set - old_set),
        "ids_retired": len(old_set - new_set),
    }


def map_to_previous(
    labels: np.ndarray,
    keys: np.ndarray,
    prev_keys: np.ndarray,
    prev_ids: np.ndarray,
    min_overlap: int = 1,
) -> tuple[np.ndarray, dict]:
    """Map cluster labels (0..C-1) onto previous ids by maximum overlap; returns (ids per face, churn)."""
    from scipy.optimize import linear_sum_assignment

    labels = np.asarray(labels, dtype=np.int64)
    C = int(labels.max()) + 1 if len(labels) else 0
    old_names, old_inv = np.unique(np.asarray(prev_ids, dtype=object).astype(str), return_inverse=True)
    prev_map = dict(zip(np.asarray(prev_keys).tolist(), old_inv.tolist()))
    rows, cols = [], []
    for pos, k in enumerate(np.asarray(keys).tolist()):
        j = prev_map.get(k)
        if j is not None:
            rows.append(labels[pos])
            cols.append(j)
    assign: dict[int, str] = {}
    n_matched = 0
    if rows and C:
        M = sp.coo_matrix(
            (np.ones(len(rows), np.int64), (np.asarray(rows), np.asarray(cols))), shape=(C, len(old_names))
        ).tocsr()
        M.sum_duplicates()
        # Hungarian only over the clusters/ids that overlap at all (keeps the dense matrix small)
        r_used = np.unique(M.nonzero()[0])
        c_used = np.unique(M.nonzero()[1])
        sub = M[r_used][:, c_used].toarray()
        rr, cc = _hungarian_blocks(sub, linear_sum_assignment)
        for a, b in zip(rr, cc):
            if sub[a, b] >= max(1, min_overlap):
                assign[int(r_used[a])] = str(old_names[c_used[b]])
                n_matched += 1
    unmatched = np.array(sorted(set(range(C)) - set(assign)), dtype=np.int64)
    start = next_id_number(old_names.tolist())
    assign.update(_new_ids_for_clusters(labels, unmatched, start))
    ids = np.array([assign[int(c)] for c in labels.tolist()], dtype=object)
    stats = churn_stats(np.asarray(keys), ids, np.asarray(prev_keys), np.asarray(prev_ids).astype(str))
    stats["clusters_matched"] = n_matched
    return ids, stats


def _hungarian_blocks(overlap: np.ndarray, lsa) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian per connected block of the bipartite overlap graph (equivalent, much cheaper)."""
    from scipy.sparse.csgraph import connected_components

    R, Cc = overlap.shape
    if R == 0 or Cc == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nz = np.nonzero(overlap)
    B = sp.coo_matrix((np.ones(len(nz[0])), (nz[0], nz[1] + R)), shape=(R + Cc, R + Cc))
    _, comp = connected_components(B, directed=False)
    rows_out, cols_out = [], []
    rc, cc_ = comp[:R], comp[R:]
    order_r = np.argsort(rc, kind="stable")
    order_c = np.argsort(cc_, kind="stable")
    ur, sr = np.unique(rc[order_r], return_index=True)
    uc, sc = np.unique(cc_[order_c], return_index=True)
    er = np.append(sr[1:], R)
    ec = np.append(sc[1:], Cc)
    cstart = dict(zip(uc.tolist(), zip(sc.tolist(), ec.tolist())))
    for comp_id, a, b in zip(ur.tolist(), sr.tolist(), er.tolist()):
        if comp_id not in cstart:
            continue
        ri = order_r[a:b]
        c0, c1 = cstart[comp_id]
        ci = order_c[c0:c1]
        blk = overlap[np.ix_(ri, ci)]
        if blk.size == 1:
            r_, c_ = np.array([0]), np.array([0])
        else:
            r_, c_ = lsa(blk, maximize=True)
        rows_out.append(ri[r_])
        cols_out.append(ci[c_])
    return np.concatenate(rows_out), np.concatenate(cols_out)


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
            score[i] = score.get(i, 0.0) + s
            count[i] = count.get(i, 0) + 1
        best = min(score, key=lambda i: (-score[i], i))
        if count[best] >= min_votes:
            out[q] = best
    return out


def assign_incremental(
    embeddings: np.ndarray,
    keys: np.ndarray,
    prev_keys: np.ndarray,
    prev_ids: np.ndarray,
    threshold: float,
    k: int = 10,
    min_votes: int = 1,
    cluster_new=None,
) -> tuple[np.ndarray, dict]:
    """Faces in ``prev_keys`` keep their id; the others vote through the index or get new ids.

    ``cluster_new(E_sub) -> labels`` clusters the unmatched new faces (same method/threshold)."""
    from .knn import search_index

    keys = np.asarray(keys)
    prev = dict(zip(np.asarray(prev_keys).tolist(), np.asarray(prev_ids).astype(str).tolist()))
    ids = np.empty(len(keys), dtype=object)
    known = np.array([k_ in prev for k_ in keys.tolist()], dtype=bool)
    for pos in np.flatnonzero(known):
        ids[pos] = prev[keys[pos]]
    new_pos = np.flatnonzero(~known)
    n_voted = 0
    if len(new_pos) and known.any():
        db_pos = np.flatnonzero(known)
        I, S = search_index(
            np.ascontiguousarray(embeddings[db_pos]), np.ascontiguousarray(embeddings[new_pos]), k
        )
        votes = vote_identities(I, S, ids[db_pos], threshold, min_votes)
        for p, v in zip(new_pos.tolist(), votes.tolist()):
            if v is not None:
                ids[p] = v
                n_voted += 1
    rest = np.array([p for p in new_pos.tolist() if ids[p] is None], dtype=np.int64)
    if len(rest):
        if cluster_new is None:
            sub_labels = np.arange(len(rest))
        else:
            sub_labels = np.asarray(cluster_new(np.ascontiguousarray(embeddings[rest])))
        start = next_id_number(list(prev.values()))
        mapping = _new_ids_for_clusters(sub_labels, np.unique(sub_labels), start)
        for p, lab in zip(rest.tolist(), sub_labels.tolist()):
            ids[p] = mapping[lab]
    stats = churn_stats(keys, ids, np.asarray(prev_keys), np.asarray(prev_ids).astype(str))
    stats["new_faces_assigned_existing"] = n_voted
    stats["new_faces_new_ids"] = len(rest)
    return ids, stats
