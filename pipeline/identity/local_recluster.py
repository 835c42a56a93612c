"""Local recluster of an incremental refresh: the identities the new faces touch are clustered again.

After the vote of :func:`pipeline.identity.stable_ids.assign_incremental` (new faces join the
identity their neighbours >= threshold vote for), the refresh reclusters what the new faces can
change:

- The *touch graph*: one node per previous identity and per new face; a new face is linked to
  every identity and every other new face among its k nearest with similarity >= threshold. Its
  connected components are the groups of identities that new faces may merge (a component with
  two identities or more holds a bridge) or split.
- Each component with a previous identity is a candidate (components of new faces only were
  already clustered among themselves by the vote path, on the same edges). Candidates are taken
  bridging ones first, then the others, smallest first within each, as long as the faces taken
  stay within ``max_faces`` (all member faces of their identities + their new faces). A component
  that does not fit keeps the vote's result: its merges and splits are left to the nightly
  recluster, and the stats say how many.
- The faces taken get a kNN graph (:func:`_local_graph`): an old face's k nearest among its own
  identity (``knn``: exact below the build's ``exact_max``, else the build's kNN backend), a new
  face's k nearest from the refresh's search; links between identities come through new faces.
  They are clustered with the build's method, threshold and seed (``cluster``).
  The local clusters are mapped onto the previous ids by maximum overlap
  (:func:`~pipeline.identity.stable_ids.map_to_previous`): a cluster that takes an identity's
  largest overlap keeps its id, a merge keeps one id (the other is retired and never reused), a
  cluster of new faces only gets a new id. A part of an identity that moves into a cluster holding
  another identity changes id (the identity is split between the two). A part cut off on its own
  (a cluster holding old faces but no identity's largest overlap) is not given a new id: its old
  faces keep theirs (Chinese whispers, run again, cuts clean identities now and then; such cuts
  are left to the nightly recluster, counted in ``cuts_left_to_nightly``). Faces outside the
  components taken keep their ids untouched.
- New ids (new people, split-off parts) are numbered from the previous high-water mark in order
  of their first face, the order a full recluster and the vote path use.

What stays for the nightly recluster: components over ``max_faces``, cuts into new identities,
edges between two previous identities that no new face carries, and edges from the faces
taken to faces outside them (old faces' neighbours are not searched in a refresh: an identity
that a new face touches is reclustered with its own members and the new faces, not with the other
identities its old faces are near).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute  # makes pa.compute available
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .stable_ids import _ID_RE, format_id, map_to_previous

# Faces one refresh reclusters at most. Old faces are searched within their own identity (cost: the
# sum of the squared identity sizes), so 100k faces take ~1.6 s; at 1M + 1% new faces every bridging
# component fits (bench/bench_incremental.py; docs/benchmarks.md, "Incremental refresh").
LOCAL_RECLUSTER_MAX_FACES = 100_000


def id_number(identity_id) -> int:
    """The number of an id "id-000123" (123); -1 for a string of another form (never a new id)."""
    m = _ID_RE.match(str(identity_id))
    return int(m.group(1)) if m else -1


def local_recluster(
    ids: np.ndarray,
    prev_codes: np.ndarray,
    new_pos: np.ndarray,
    neighbours: tuple[np.ndarray, np.ndarray],
    threshold: float,
    next_number: int,
    cluster,
    knn,
    embeddings: np.ndarray,
    max_faces: int = LOCAL_RECLUSTER_MAX_FACES,
    min_overlap: int = 1,
) -> tuple[np.ndarray, dict]:
    """Recluster the identities the new faces touch; returns (ids, stats).

    ``ids``: per face its id after the vote (object array, N). ``prev_codes``: per face its
    previous identity as an int code (-1 for new faces). ``new_pos``: the new faces' positions;
    ``neighbours``: their (indices, similarities) among all faces, rows in ``new_pos`` order.
    ``next_number``: the previous table's high-water mark; ids numbered from it are new (the vote
    path's new ids included) and are renumbered here in order of first face.
    ``knn(E_sub) -> (indices, similarities)`` (self excluded, run per identity) and
    ``cluster(indices, similarities, rows) -> labels`` are the build's own (``rows``: the faces' positions,
    for the split of incoherent clusters, which needs their embeddings). ``max_faces``: see the module docstring."""
    t0, c0 = time.perf_counter(), time.process_time()
    ids = np.asarray(ids, dtype=object).copy()
    prev_codes = np.asarray(prev_codes, dtype=np.int64)
    new_pos = np.asarray(new_pos, dtype=np.int64)
    N, n_new = len(ids), len(new_pos)
    if max_faces < 0:
        raise ValueError("local_recluster_max_faces must be >= 0")
    stats: dict = {"status": "nothing to recluster", "max_faces": int(max_faces)}
    K = int(prev_codes.max()) + 1 if N and (prev_codes >= 0).any() else 0
    if n_new == 0 or K == 0:
        return ids, _finish(stats, t0, c0)

    # touch graph: identities 0..K-1, new faces K..K+n_new-1
    I, S = neighbours
    new_row = np.full(N, -1, np.int64)
    new_row[new_pos] = np.arange(n_new)
    ok = (I >= 0) & (S >= threshold)
    r = np.broadcast_to(np.arange(n_new)[:, None], I.shape)[ok]
    j = I[ok]
    code = prev_codes[j]
    other = np.where(code >= 0, code, K + new_row[j])
    nodes = K + n_new
    A = sp.coo_matrix((np.ones(len(r), np.int8), (K + r, other)), shape=(nodes, nodes))
    _, comp = connected_components(A, directed=False)
    ident_size = np.bincount(prev_codes[prev_codes >= 0], minlength=K)
    weight = np.concatenate([ident_size, np.ones(n_new, np.int64)])
    C = int(comp.max()) + 1
    comp_faces = np.bincount(comp, weights=weight, minlength=C).astype(np.int64)
    comp_idents = np.bincount(comp[:K], minlength=C)
    comp_new = np.bincount(comp[K:], minlength=C)
    cand = np.flatnonzero((comp_new > 0) & (comp_idents > 0))
    # bridging components (2+ identities: a merge is possible) first, then the smallest
    cand = cand[np.lexsort((cand, comp_faces[cand], comp_idents[cand] < 2))]
    taken = np.zeros(C, bool)
    room = int(max_faces)
    for c in cand.tolist():
        if comp_faces[c] <= room:
            taken[c] = True
            room -= int(comp_faces[c])

    # what a recluster could change but this one leaves to the nightly run
    bridge_rows = _bridges(r, other, K)
    left_rows = [q for q, pairs in bridge_rows.items() if not taken[comp[K + q]]]
    left_pairs = {p for q in left_rows for p in bridge_rows[q]}
    skipped = cand[~taken[cand]]
    stats.update({
        "components_touched": len(cand),
        "components_bridging": int((comp_idents[cand] >= 2).sum()),
        "components_reclustered": int(taken.sum()),
        "components_left_to_nightly": len(skipped),
        "faces_left_to_nightly": int(comp_faces[skipped].sum()),
        "largest_component_faces": int(comp_faces[cand].max()) if len(cand) else 0,
        "largest_component_reclustered_faces": int(comp_faces[taken].max()) if taken.any() else 0,
        "new_faces_bridging_left_to_nightly": len(left_rows),
        "identity_pairs_left_to_nightly": len(left_pairs),
    })
    if not taken.any():
        stats["status"] = ("every touched component is over max_faces: the vote's result is kept"
                           if len(cand) else "no new face is near a previous identity")
        return _renumber(ids, new_pos, np.zeros(0, np.int64), next_number, stats), _finish(stats, t0, c0)

    # the faces taken: every member of the identities taken + the new faces taken, in face order
    ident_taken = taken[comp[:K]]
    new_taken = new_pos[taken[comp[K:]]]
    old_taken = np.flatnonzero((prev_codes >= 0) & ident_taken[np.maximum(prev_codes, 0)])
    members = np.union1d(old_taken, new_taken)
    t1, c1 = time.perf_counter(), time.process_time()
    gi, gs = _local_graph(embeddings, members, prev_codes, new_row, I, S, knn)
    t2, c2 = time.perf_counter(), time.process_time()
    labels = np.asarray(cluster(gi, gs, members), dtype=np.int64)
    stats.update(knn_s=round(t2 - t1, 3), knn_cpu_s=round(c2 - c1, 3), cluster_s=round(time.perf_counter() - t2, 3),
                 cluster_cpu_s=round(time.process_time() - c2, 3))

    is_old = prev_codes[members] >= 0
    old_local = np.flatnonzero(is_old)
    keys = members.astype(str).astype(object)
    before = ids[members].copy()
    # new ids from a mark past every id the vote handed out; _renumber compacts them afterwards
    temp_start = max(next_number, max((id_number(i) for i in ids[new_pos].tolist()), default=-1) + 1)
    local_ids, _ = map_to_previous(labels, keys, keys[old_local], before[old_local],
                                   min_overlap=min_overlap, next_number=temp_start)
    kept_back, n_cut = _no_splits(labels, local_ids, before, is_old, temp_start)
    ids[members] = local_ids
    old_before, old_after = before[old_local].astype(str), local_ids[old_local].astype(str)
    # an identity split: its old faces now hold two ids or more (a part moved to another identity)
    pairs = np.unique(np.char.add(np.char.add(old_before, "|"), old_after))
    split_ids = np.unique([p.split("|", 1)[0] for p in pairs.tolist()], return_counts=True)[1]
    stats.update({
        "status": "done" if not len(skipped) else "partial: components over max_faces keep the vote's result",
        "identities_reclustered": int(ident_taken.sum()),
        "faces_reclustered": len(members),
        "new_faces_reclustered": len(new_taken),
        "identities_merged": len(np.setdiff1d(old_before, old_after)),  # absorbed into another identity
        "identities_split": int((split_ids > 1).sum()),
        "faces_id_changed": int((old_after != old_before).sum()),
        "new_faces_moved": int((local_ids[~is_old] != before[~is_old]).sum()),  # vs the vote's choice
        "cuts_left_to_nightly": n_cut,
        "faces_kept_from_cuts": kept_back,
    })
    return _renumber(ids, new_pos, members, next_number, stats), _finish(stats, t0, c0)


def _local_graph(E, members, prev_codes, new_row, I, S, knn) -> tuple[np.ndarray, np.ndarray]:
    """kNN graph of ``members`` (rows in their order): an old face's k nearest among the old faces
    of its own identity (``knn``, per identity), a new face's k nearest from the refresh's search
    (among all faces; neighbours outside ``members`` dropped). Links between identities therefore
    come through new faces only. Searching old faces among all members instead pulls in faces of
    other identities that a search of the whole collection would have ranked below closer faces
    outside the set: at 1M faces, a 19k-face component of large identities linked by new faces
    merged into one cluster that way (pairwise precision 0.99 -> 0.65, bench/bench_incremental.py)."""
    n, k = len(members), I.shape[1]
    gi = np.full((n, k), -1, np.int64)
    gs = np.full((n, k), -np.inf, np.float32)
    at = np.full(len(prev_codes), -1, np.int64)
    at[members] = np.arange(n)
    codes = prev_codes[members]
    old = np.flatnonzero(codes >= 0)
    order = old[np.argsort(codes[old], kind="stable")]
    for idx in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1):
        if len(idx) < 2:
            continue
        Ii, Si = knn(np.ascontiguousarray(E[members[idx]], dtype=np.float32))
        kk = min(k, Ii.shape[1])
        gi[idx, :kk] = np.where(Ii[:, :kk] >= 0, idx[np.maximum(Ii[:, :kk], 0)], -1)
        gs[idx, :kk] = np.where(Ii[:, :kk] >= 0, Si[:, :kk], -np.inf)
    new = np.flatnonzero(codes < 0)
    rows = new_row[members[new]]
    j = np.where(I[rows] >= 0, at[np.maximum(I[rows], 0)], -1)
    gi[new] = j
    gs[new] = np.where(j >= 0, S[rows], -np.inf)
    return gi, gs


def _no_splits(labels, local_ids, before, is_old, temp_start) -> tuple[int, int]:
    """A local cluster that took no previous identity's largest overlap but holds old faces is a
    part cut off an identity: its old faces keep their ids and its new faces join the identity most
    of those old faces hold (ties: the smallest id). Chinese whispers cuts a clean identity now and
    then when run again (4 of 20 seeds cut one of 60 well separated 50-face identities,
    tests/test_identity_stable_ids.py): such cuts are left to the nightly recluster rather than
    churning ids at every refresh. Changes ``local_ids`` in place; returns (old faces kept, cuts)."""
    fresh = np.fromiter((id_number(i) >= temp_start for i in local_ids.tolist()), bool, len(local_ids))
    cut = np.unique(labels[fresh & is_old])
    if len(cut) == 0:
        return 0, 0
    in_cut = np.isin(labels, cut)
    back = in_cut & is_old
    local_ids[back] = before[back]
    for c in cut.tolist():
        olds = before[(labels == c) & is_old].astype(str)
        u, n = np.unique(olds, return_counts=True)
        local_ids[(labels == c) & ~is_old] = u[np.argmax(n)]  # np.unique sorts: ties -> smallest id
    return int(back.sum()), len(cut)


def _bridges(r: np.ndarray, other: np.ndarray, K: int) -> dict[int, set]:
    """Per new face (row) with neighbours >= threshold in two identities or more: the pairs."""
    o = other < K
    rr, ii = r[o], other[o]
    if len(rr) == 0:
        return {}
    u = np.unique(rr * K + ii)
    rr, ii = u // K, u % K
    cnt = np.bincount(rr)
    out = {}
    for q in np.flatnonzero(cnt > 1).tolist():
        near = ii[rr == q].tolist()
        out[q] = {(a, b) for x, a in enumerate(near) for b in near[x + 1:]}
    return out


def _renumber(ids, new_pos, members, next_number, stats) -> np.ndarray:
    """New ids (numbered >= next_number) renumbered from next_number in order of their first face,
    so that ids dropped by the recluster leave no gaps and the order is that of a full recluster."""
    where = np.union1d(new_pos, members)
    nums = np.fromiter((id_number(i) for i in ids[where].tolist()), np.int64, len(where))
    fresh = nums >= next_number
    if fresh.any():
        uniq, first = np.unique(nums[fresh], return_index=True)
        order = np.argsort(first, kind="stable")  # positions are in face order
        new_num = np.empty(len(uniq), np.int64)
        new_num[order] = next_number + np.arange(len(uniq))
        mapped = new_num[np.searchsorted(uniq, nums[fresh])]
        ids[where[fresh]] = np.array([format_id(n) for n in mapped.tolist()], dtype=object)
    stats["ids_created"] = len(np.unique(nums[fresh]))
    return ids


def _finish(stats: dict, t0: float, c0: float) -> dict:
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["cpu_seconds"] = round(time.process_time() - c0, 3)
    return stats


def previous_codes(prev_pos: np.ndarray, previous: pa.Table) -> np.ndarray:
    """Per face an int code of its previous identity (-1 for new faces), from Arrow's dictionary
    encoding (no sort of a million strings)."""
    codes = pa.compute.dictionary_encode(previous.column("identity_id").combine_chunks()).indices.to_numpy()
    out = np.full(len(prev_pos), -1, np.int64)
    known = prev_pos >= 0
    out[known] = codes[prev_pos[known]]
    return out
