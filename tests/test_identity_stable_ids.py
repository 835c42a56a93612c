import numpy as np
import pyarrow as pa

from pipeline.identity.build import build_identities
from pipeline.identity.stable_ids import format_id, map_to_previous, next_id_number
from pipeline.identity.synth import make_mixture


def _faces(n=1500, seed=11):
    m = make_mixture(n, seed=seed)
    uids = np.array([f"img{i:05d}" for i in range(n)])
    return uids, np.zeros(n, np.int64), m.embeddings, m.labels


def _ids(result):
    t = result.assignments
    return dict(
        zip(
            zip(t.column("uid").to_pylist(), t.column("face_index").to_pylist()),
            t.column("identity_id").to_pylist(),
        )
    )


def test_id_format():
    assert format_id(123) == "id-000123"
    assert next_id_number(["id-000004", "id-000010", "other"]) == 11
    assert next_id_number([]) == 0


def test_incremental_keeps_old_ids_and_assigns_known_people():
    uids, fidx, E, y = _faces()
    old = np.arange(len(uids)) < 1000
    first = build_identities(uids[old], fidx[old], E[old])
    before = _ids(first)
    second = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental")
    after = _ids(second)
    # old faces keep their ids
    assert all(after[k] == v for k, v in before.items())
    churn = second.stats["churn"]
    assert churn["faces_id_changed"] == 0 and churn["faces_new"] == 500 and churn["ids_retired"] == 0
    assert churn["new_faces_bridging_identities"] <= churn["new_faces_assigned_existing"]
    # new faces of identities already seen get an existing id (that of their identity's majority)
    lab_of = {(u, 0): int(l) for u, l in zip(uids, y)}
    maj = {}
    for k, v in before.items():
        maj.setdefault(lab_of[k], []).append(v)
    maj = {l: max(set(v), key=v.count) for l, v in maj.items() if len(v) >= 3}
    new_keys = [(u, 0) for u in uids[~old] if lab_of[(u, 0)] in maj]
    agree = np.mean([after[k] == maj[lab_of[k]] for k in new_keys])
    assert len(new_keys) > 100 and agree >= 0.95
    # unseen people get ids after the largest previous one
    start = next_id_number(before.values())
    fresh = {after[(u, 0)] for u in uids[~old]} - set(before.values())
    assert fresh and all(int(i[3:]) >= start for i in fresh)


def test_an_incremental_refresh_with_no_new_face_keeps_every_id():
    """A resumed or repeated run: nothing new, nothing to recluster; every id and the churn stay as they were
    (this path once raised KeyError in the churn bookkeeping)."""
    uids, fidx, E, _ = _faces()
    first = build_identities(uids, fidx, E)
    again = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental")
    assert _ids(again) == _ids(first)
    churn = again.stats["churn"]
    assert churn["faces_new"] == 0 and churn["ids_created"] == 0 and churn["faces_id_changed"] == 0
    assert again.stats["local_recluster"]["status"] == "nothing to recluster"


def test_recluster_with_permuted_order_maps_back():
    uids, fidx, E, _y = _faces(seed=12)
    first = build_identities(uids, fidx, E)
    perm = np.random.default_rng(0).permutation(len(uids))
    second = build_identities(uids[perm], fidx[perm], E[perm], previous=first.assignments, method="leiden")
    a, b = _ids(first), _ids(second)
    churn = second.stats["churn"]
    changed = sum(a[k] != b[k] for k in a)
    assert churn["faces_id_changed"] == changed
    assert changed / len(a) <= 0.02  # leiden vs chinese whispers differ a little; ids do not churn
    assert churn["ids_kept"] >= 0.95 * len(set(a.values()))


def test_map_to_previous_permuted_labels_and_split_merge():
    keys = np.array([f"f{i}" for i in range(9)], dtype=object)
    prev_ids = np.array(["id-000000"] * 3 + ["id-000001"] * 3 + ["id-000002"] * 3, dtype=object)
    # same partition, permuted label numbers
    ids, st = map_to_previous(np.array([2, 2, 2, 0, 0, 0, 1, 1, 1]), keys, keys, prev_ids)
    assert ids.tolist() == prev_ids.tolist() and st["faces_id_changed"] == 0 and st["ids_created"] == 0
    # id-000002 splits into 2+1, id-000000 and id-000001 merge
    ids, st = map_to_previous(np.array([0, 0, 0, 0, 0, 0, 1, 1, 2]), keys, keys, prev_ids)
    assert ids[6] == ids[7] == "id-000002" and ids[8] == "id-000003"
    assert ids[0] == ids[3] and ids[0] in ("id-000000", "id-000001")
    assert st["ids_created"] == 1 and st["ids_retired"] == 1 and st["faces_id_changed"] == 4


def test_build_tables_and_determinism():
    uids, fidx, E, _y = _faces(600, seed=13)
    r1 = build_identities(uids, fidx, E)
    perm = np.random.default_rng(1).permutation(len(uids))
    r2 = build_identities(uids[perm], fidx[perm], E[perm])
    assert r1.assignments.equals(r2.assignments) and r1.summary.equals(r2.summary)
    a, s = r1.assignments, r1.summary
    assert a.column_names[:4] == ["uid", "face_index", "identity_id", "cluster_size"]
    assert a.num_rows == 600 and s.num_rows == len(set(a.column("identity_id").to_pylist()))
    assert sum(s.column("size").to_pylist()) == 600
    st = r1.stats
    assert st["knn_backend"] and "knn_s" in st["timings"] and len(st["similarity_within"]) > 0
    assert (
        st["doubtful_merges"]
        and st["doubtful_merges"][0]["similarity"] <= st["doubtful_merges"][-1]["similarity"]
    )
    # representative belongs to its identity
    rep = dict(zip(s.column("identity_id").to_pylist(), s.column("representative_uid").to_pylist()))
    ids = dict(zip(a.column("uid").to_pylist(), a.column("identity_id").to_pylist()))
    assert all(ids[u] == i for i, u in rep.items())
    assert isinstance(a, pa.Table)


def test_retired_ids_are_never_reused_across_a_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.identity.stable_ids import HIGH_WATER_KEY, high_water

    uids, fidx, E, _y = _faces(900, seed=14)
    first = build_identities(uids, fidx, E)
    path = tmp_path / "identities.parquet"
    pq.write_table(first.assignments, path)
    t1 = pq.read_table(path)
    top = max(t1.column("identity_id").to_pylist())
    assert high_water(t1) == int(top[3:]) + 1 == int(t1.schema.metadata[HIGH_WATER_KEY])
    # every face of the identity holding the highest id leaves (a removal request)
    gone = np.array([i == top for i in t1.column("identity_id").to_pylist()])
    kept = np.isin(uids, np.asarray(t1.column("uid").to_pylist())[~gone])
    second = build_identities(uids[kept], fidx[kept], E[kept], previous=t1)
    pq.write_table(second.assignments, path)
    t2 = pq.read_table(path)
    assert top not in set(t2.column("identity_id").to_pylist())
    # a new person arrives: a tight group of faces far from everybody else
    rng = np.random.default_rng(0)
    c = rng.standard_normal(E.shape[1]).astype(np.float32)
    newE = c + 0.02 * rng.standard_normal((5, E.shape[1])).astype(np.float32)
    newE /= np.linalg.norm(newE, axis=1, keepdims=True)
    new_uids = np.array([f"new{i}" for i in range(5)])
    for mode in ("recluster", "incremental"):
        third = build_identities(
            np.concatenate([uids[kept], new_uids]),
            np.zeros(kept.sum() + 5, np.int64),
            np.vstack([E[kept], newE]),
            previous=t2,
            mode=mode,
        )
        ids = dict(
            zip(
                third.assignments.column("uid").to_pylist(),
                third.assignments.column("identity_id").to_pylist(),
            )
        )
        assert len({ids[u] for u in new_uids}) == 1, mode
        # the newcomer's number is past the retired one, not the retired id itself
        assert int(ids["new0"][3:]) > int(top[3:]), (mode, ids["new0"], top)
        assert high_water(third.assignments) == int(ids["new0"][3:]) + 1


def test_map_to_previous_100k_clusters_is_sparse_and_bounded():
    """100k clusters (dense overlap matrix: 100k x 100k int64 = 80 GB) within 400 MB."""
    import tracemalloc

    rng = np.random.default_rng(5)
    C = 100_000
    sizes = rng.integers(1, 5, size=C)
    prev_label = np.repeat(np.arange(C), sizes)
    n = len(prev_label)
    keys = np.array([f"u{i:07d}\x1f0" for i in range(n)], dtype=object)
    prev_ids = np.array([format_id(c) for c in prev_label], dtype=object)
    # new clustering: same partition under shuffled label numbers, then 1,000 clusters split
    # (their last face goes to a new cluster) and 1,000 pairs of neighbouring clusters merged
    perm = rng.permutation(C)
    labels = perm[prev_label].astype(np.int64)
    multi = np.flatnonzero(sizes > 1)
    split = rng.choice(multi, 1000, replace=False)
    last_face = np.cumsum(sizes)[split] - 1
    labels[last_face] = C + np.arange(1000)
    candidates = np.setdiff1d(np.arange(0, C - 1, 2), np.concatenate([split, split - 1]))
    merged = np.sort(rng.choice(candidates, 1000, replace=False))  # cluster m absorbs cluster m + 1
    into = np.isin(prev_label, merged + 1)
    labels[into] = perm[prev_label[into] - 1]
    labels = np.unique(labels, return_inverse=True)[1].ravel()
    tracemalloc.start()
    ids, st = map_to_previous(labels, keys, keys, prev_ids, next_number=C + 7)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MB"
    # every split-off face gets a fresh id past the high-water mark; each merge keeps one of its two
    # ids and retires the other; every other face keeps its id
    fresh = sorted({ids[i] for i in last_face})
    assert len(fresh) == 1000 and all(int(f[3:]) >= C + 7 for f in fresh)
    assert st["ids_created"] == 1000 and st["ids_retired"] == 1000
    untouched = ~np.isin(prev_label, np.concatenate([merged, merged + 1])) & ~np.isin(np.arange(n), last_face)
    assert (ids[untouched] == prev_ids[untouched]).all()


def test_sparse_block_solver_matches_dense(monkeypatch):
    import pipeline.identity.stable_ids as S

    rng = np.random.default_rng(3)
    for trial in range(20):
        R, K = rng.integers(2, 9, size=2)
        W = rng.integers(0, 6, size=(R, K)) * (rng.random((R, K)) < 0.5)
        W[0, 0] = max(W[0, 0], 1)
        r, c = np.nonzero(W)
        dense = S._match_block(r, c, W[r, c])
        monkeypatch.setattr(S, "DENSE_BLOCK_CELLS", 0)
        sparse = S._match_block(r, c, W[r, c])
        monkeypatch.setattr(S, "DENSE_BLOCK_CELLS", 1_000_000)
        assert dense[2].sum() == sparse[2].sum(), (trial, W)
        for rows, cols, w in (dense, sparse):
            assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
            assert (W[rows, cols] == w).all()


def test_incremental_refresh_equals_a_full_recluster_on_an_easy_case():
    """1 % new faces of well separated people: the incremental refresh, which searches only the new
    faces, gives the same partition as clustering everything again, and keeps every old id."""
    from pipeline.identity.metrics import evaluate

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(60, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, 60, 3000)
    E = centres[labels] + 0.03 * rng.normal(size=(3000, 64))
    E = (E / np.linalg.norm(E, axis=1, keepdims=True)).astype(np.float32)
    uids = np.array([f"img{i:05d}" for i in range(3000)])
    fidx = np.zeros(3000, np.int64)
    old = np.arange(3000) < 2970
    first = build_identities(uids[old], fidx[old], E[old], threshold=0.8)
    inc = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental", threshold=0.8)
    full = build_identities(uids, fidx, E, previous=first.assignments, mode="recluster", threshold=0.8)
    assert inc.stats["knn_params"] == {"new_faces": 30}  # only the new faces were searched
    a, b = _ids(inc), _ids(full)
    keys = sorted(a)
    codes = lambda d: np.unique([d[k] for k in keys], return_inverse=True)[1]
    assert evaluate(codes(a), codes(b))["pairwise_f"] == 1.0
    assert a == b  # and the same ids: the full recluster maps its clusters onto the old ids
    before = _ids(first)
    assert all(a[k] == v for k, v in before.items())


def _two_builds(n=20_000, new=0.01, exact_max=5_000, seed=3):
    """A first build of (1 - new) of a synthetic mixture above ``exact_max`` (so ivf-blas runs and
    its cells are kept), and the inputs of a refresh with the rest."""
    m = make_mixture(n, seed=seed)
    uids = np.array([f"img{i:06d}" for i in range(n)])
    fidx = np.zeros(n, np.int64)
    old = np.arange(n) < int(n * (1 - new))
    first = build_identities(uids[old], fidx[old], m.embeddings[old], exact_max=exact_max)
    return uids, fidx, m.embeddings, old, first


def test_refresh_searches_new_faces_through_the_kept_cells_and_matches_an_exact_search():
    from pipeline.identity.metrics import evaluate

    uids, fidx, E, old, first = _two_builds()
    assert first.index is not None and first.stats["knn_backend"] == "ivf-blas"
    cells = first.assignments.column("ivf_cell").to_numpy()
    assert (cells >= 0).all() and (cells < first.index.nlist).all()
    # the search and the vote alone (local_recluster=False): old faces keep their ids there
    inc = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental", index=first.index,
                           exact_max=5_000, local_recluster=False)
    assert inc.stats["knn_backend"] == "incremental: new faces searched through the kept IVF cells"
    p = inc.stats["knn_params"]
    assert p["new_faces"] == int((~old).sum()) and "cells_trained" not in p and p["check_recall"] >= 0.95
    # only the new faces' (face, cell) pairs were scanned: a few cells each, not the collection
    assert p["probed_pairs"] <= p["new_faces"] * 4 * max(first.index.nprobe, 6)
    # old faces keep their id and their cell; new faces got a cell
    before, after = _ids(first), _ids(inc)
    assert all(after[k] == v for k, v in before.items())
    new_cells = inc.assignments.column("ivf_cell").to_numpy()
    assert (new_cells >= 0).all()
    assert (new_cells[old] == cells).all()
    # the same partition as searching every new face exactly (the refresh before the cells)
    exact = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental", exact_max=10**9,
                             local_recluster=False)
    assert exact.stats["knn_backend"] == "incremental: new faces searched exactly"
    keys = sorted(after)
    codes = lambda d: np.unique([d[k] for k in keys], return_inverse=True)[1]
    assert evaluate(codes(after), codes(_ids(exact)))["bcubed_f"] >= 0.995


def test_refresh_trains_cells_when_none_were_kept_or_they_do_not_fit():
    from pipeline.identity.knn import IvfIndex

    uids, fidx, E, _old, first = _two_builds(n=12_000)
    for index, why in ((None, "no cells were kept"),
                       (IvfIndex(first.index.cells[:, :8].copy(), first.index.coarse[:, :8].copy(), 6, 11_880), "dimension"),
                       (IvfIndex(first.index.cells, first.index.coarse, 6, 1_000), "grew")):
        inc = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental", index=index,
                               exact_max=5_000, local_recluster=False)
        assert why in inc.stats["knn_params"]["cells_trained"]
        assert inc.index is not None and inc.index.dim == E.shape[1] and inc.index.trained_on == len(uids)
        assert _ids(inc).items() >= _ids(first).items()  # old faces keep their ids
    # a previous table written before the cells existed (no ivf_cell column) is handled the same way
    legacy = first.assignments.drop_columns(["ivf_cell"])
    inc = build_identities(uids, fidx, E, previous=legacy, mode="incremental", index=first.index, exact_max=5_000)
    assert "no ivf_cell column" in inc.stats["knn_params"]["cells_trained"]


def test_kept_cells_round_trip_and_a_damaged_file_reads_as_none(tmp_path):
    from pipeline.config import Layout
    from pipeline.identity.store import ivf_index_path, read_ivf_index, write_ivf_index

    *_, first = _two_builds(n=8_000, exact_max=2_000)
    layout = Layout(tmp_path)
    assert read_ivf_index(layout) is None
    write_ivf_index(layout, first.index)
    back = read_ivf_index(layout)
    assert np.array_equal(back.cells, first.index.cells) and back.nprobe == first.index.nprobe
    ivf_index_path(layout).write_bytes(ivf_index_path(layout).read_bytes()[:100])  # truncated
    assert read_ivf_index(layout) is None
    write_ivf_index(layout, None)  # a small collection: stale cells are removed
    assert not ivf_index_path(layout).exists()


def test_a_new_face_between_two_identities_is_counted_as_a_bridge():
    """Two tight identities (20 faces each); one new face close to both is reported as bridging
    them and joins one of them: one face does not outweigh twenty, the local recluster keeps the
    two apart, as a full recluster does."""
    rng = np.random.default_rng(0)
    a = np.zeros(32)
    a[0] = 1.0
    b = np.zeros(32)
    b[0], b[1] = np.cos(0.5), np.sin(0.5)  # cosine 0.878 between the two people
    E = np.concatenate([a + 0.01 * rng.normal(size=(20, 32)), b + 0.01 * rng.normal(size=(20, 32)),
                        [(a + b) / 2]])
    E = (E / np.linalg.norm(E, axis=1, keepdims=True)).astype(np.float32)
    uids = np.array([f"img{i:03d}" for i in range(41)])
    fidx = np.zeros(41, np.int64)
    first = build_identities(uids[:40], fidx[:40], E[:40], threshold=0.9)
    assert first.stats["n_identities"] == 2
    inc = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental", threshold=0.9)
    churn = inc.stats["churn"]
    assert churn["new_faces_bridging_identities"] == 1 and churn["identity_pairs_bridged"] == 1
    assert inc.stats["n_identities"] == 2 and inc.stats["local_recluster"]["faces_reclustered"] == 41
    full = build_identities(uids, fidx, E, previous=first.assignments, mode="recluster", threshold=0.9)
    assert _ids(inc) == _ids(full)


def _bridge_scene(seed=0, bridge=4, dim=32):
    """Person P photographed from two sides: A (4 faces) and B (4 faces), 0.55 rad apart (cosine
    <= 0.87, no edge at threshold 0.9), six other people (8 faces each, orthogonal). The refresh
    brings ``bridge`` faces of P halfway between A and B (cosine ~0.96 to both), two faces of the
    first other person and three faces of a new person."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]

    def arc(a):
        return np.cos(a)[:, None] * basis[0] + np.sin(a)[:, None] * basis[1]

    old = [arc(rng.uniform(0, 0.04, 4)), arc(rng.uniform(0.51, 0.55, 4))]
    old += [basis[2 + i] + 0.02 * rng.normal(size=(8, dim)) for i in range(6)]
    new = [arc(rng.uniform(0.255, 0.295, bridge)), basis[2] + 0.02 * rng.normal(size=(2, dim)),
           basis[10] + 0.02 * rng.normal(size=(3, dim))]
    E = np.concatenate(old + new)
    E = E + 0.003 * rng.normal(size=E.shape)
    E = (E / np.linalg.norm(E, axis=1, keepdims=True)).astype(np.float32)
    n = len(E)
    return np.array([f"img{i:03d}" for i in range(n)]), np.zeros(n, np.int64), E, np.arange(n) < 56


def _partition(d, keys):
    """Co-membership of the faces ``keys``: the set of frozensets of faces sharing an id."""
    groups = {}
    for k in keys:
        groups.setdefault(d[k], set()).add(k)
    return {frozenset(g) for g in groups.values()}


def test_local_recluster_merges_the_identities_a_new_face_bridges_like_a_full_recluster():
    for seed in range(5):
        uids, fidx, E, old = _bridge_scene(seed)
        first = build_identities(uids[old], fidx[old], E[old], threshold=0.9)
        before = _ids(first)
        a_id, b_id = before[("img000", 0)], before[("img004", 0)]
        assert first.stats["n_identities"] == 8 and a_id != b_id  # A and B start apart
        kw = {"previous": first.assignments, "threshold": 0.9}
        inc = build_identities(uids, fidx, E, mode="incremental", **kw)
        full = build_identities(uids, fidx, E, mode="recluster", **kw)
        vote = build_identities(uids, fidx, E, mode="incremental", local_recluster=False, **kw)
        a, b, v = _ids(inc), _ids(full), _ids(vote)
        assert b[("img000", 0)] == b[("img004", 0)]  # the full recluster merges A and B
        keys = sorted(a)
        assert _partition(a, keys) == _partition(b, keys), seed  # same partition as the full recluster
        assert a == b  # and the same ids (the overlap mapping keeps one of A's and B's)
        assert v[("img000", 0)] != v[("img004", 0)]  # the vote alone leaves them apart
        # identities no new face touched keep their ids and their faces
        untouched = {k: i for k, i in before.items() if i not in (a_id, b_id)}
        assert all(a[k] == i for k, i in untouched.items())
        lr, churn = inc.stats["local_recluster"], inc.stats["churn"]
        assert lr["status"] == "done" and lr["identities_merged"] == 1 and churn["ids_retired"] == 1
        changed = sum(a[k] != i for k, i in before.items())  # faces of the retired id
        assert churn["faces_id_changed"] == lr["faces_id_changed"] == changed == 4
        assert churn["identity_pairs_left_to_nightly"] == 0 < churn["identity_pairs_bridged"]


def test_a_refresh_without_bridges_keeps_every_old_id_and_reclusters_the_touched_identities():
    uids, fidx, E, old = _bridge_scene(1, bridge=0)
    first = build_identities(uids[old], fidx[old], E[old], threshold=0.9)
    kw = {"previous": first.assignments, "threshold": 0.9}
    inc = build_identities(uids, fidx, E, mode="incremental", **kw)
    full = build_identities(uids, fidx, E, mode="recluster", **kw)
    before, a = _ids(first), _ids(inc)
    assert all(a[k] == i for k, i in before.items())
    assert a == _ids(full)
    lr = inc.stats["local_recluster"]
    # the person two new faces joined was clustered again with them (and nothing else was)
    assert lr["status"] == "done" and lr["identities_reclustered"] == 1 and lr["faces_reclustered"] == 10
    assert lr["identities_merged"] == lr["identities_split"] == inc.stats["churn"]["faces_id_changed"] == 0


def test_the_id_a_merge_retires_is_never_handed_out_again(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.identity.stable_ids import high_water

    uids, fidx, E, old = _bridge_scene(2)
    first = build_identities(uids[old], fidx[old], E[old], threshold=0.9)
    ids1 = set(_ids(first).values())
    inc = build_identities(uids, fidx, E, previous=first.assignments, mode="incremental", threshold=0.9)
    retired = ids1 - set(_ids(inc).values())
    assert len(retired) == 1
    (gone,) = retired
    path = tmp_path / "identities.parquet"
    pq.write_table(inc.assignments, path)
    t = pq.read_table(path)
    assert high_water(t) > int(gone[3:])
    # the next refresh: two new people
    rng = np.random.default_rng(9)
    extra = np.concatenate([c + 0.01 * rng.normal(size=(3, E.shape[1])) for c in rng.normal(size=(2, E.shape[1]))])
    extra = (extra / np.linalg.norm(extra, axis=1, keepdims=True)).astype(np.float32)
    n = len(uids)
    nxt = build_identities(np.concatenate([uids, [f"z{i}" for i in range(6)]]), np.zeros(n + 6, np.int64),
                           np.vstack([E, extra]), previous=t, mode="incremental", threshold=0.9)
    ids3 = _ids(nxt)
    fresh = {ids3[(f"z{i}", 0)] for i in range(6)}
    assert len(fresh) == 2 and gone not in set(ids3.values())
    assert all(int(i[3:]) >= high_water(t) for i in fresh)


def test_components_over_the_cap_keep_the_vote_and_are_reported():
    uids, fidx, E, old = _bridge_scene(3)
    first = build_identities(uids[old], fidx[old], E[old], threshold=0.9)
    kw = {"previous": first.assignments, "threshold": 0.9, "mode": "incremental"}
    capped = build_identities(uids, fidx, E, local_recluster_max_faces=11, **kw)
    vote = build_identities(uids, fidx, E, local_recluster=False, **kw)
    lr, churn = capped.stats["local_recluster"], capped.stats["churn"]
    # A + B + the bridge (12 faces) does not fit, the other person + its 2 new faces (10) does
    assert lr["status"].startswith("partial") and lr["components_left_to_nightly"] == 1
    assert lr["faces_left_to_nightly"] == 12 and lr["faces_reclustered"] == 10
    assert churn["identity_pairs_left_to_nightly"] == churn["identity_pairs_bridged"] == 1
    assert churn["new_faces_bridging_left_to_nightly"] == churn["new_faces_bridging_identities"] > 0
    assert _ids(capped) == _ids(vote)  # what was left over keeps the vote's result
    none = build_identities(uids, fidx, E, local_recluster_max_faces=0, **kw)
    assert none.stats["local_recluster"]["status"].startswith("every touched component is over")
    assert _ids(none) == _ids(vote)
    assert vote.stats["local_recluster"] == {"status": "off"}


def test_the_local_recluster_splits_incoherent_merges_as_a_full_recluster_does():
    # the crowd of generic-looking people (tests/test_identity_cluster.py::_crowd_mixture): new faces
    # bridge many identities; clustered again without the split, the refresh merges them
    from dataclasses import replace

    from pipeline.identity.metrics import evaluate
    from pipeline.identity.synth import SynthParams

    m = make_mixture(20_000, preset=replace(SynthParams(), tau=0.3), seed=0)
    n = len(m.labels)
    uids, fidx = np.array([f"img{i:05d}" for i in range(n)]), np.zeros(n, np.int64)
    old = int(0.9 * n)
    first = build_identities(uids[:old], fidx[:old], m.embeddings[:old])

    def quality(result):
        got = _ids(result)
        pred = np.unique([got[(u, 0)] for u in uids], return_inverse=True)[1]
        return evaluate(pred, m.labels)

    split = build_identities(uids, fidx, m.embeddings, previous=first.assignments, mode="incremental")
    plain = build_identities(uids, fidx, m.embeddings, previous=first.assignments, mode="incremental", split=False)
    s, p = quality(split), quality(plain)
    assert split.stats["local_recluster"]["faces_reclustered"] > 1_000  # the refresh did recluster
    assert s["pairwise_precision"] > p["pairwise_precision"] + 0.03, (s, p)
    assert (split.stats["local_recluster"]["identities_merged"]
            < plain.stats["local_recluster"]["identities_merged"])
    assert s["bcubed_f"] >= p["bcubed_f"]
