import itertools

import numpy as np
import pytest

from pipeline.identity.knn import knn_graph, recall_at_k, search_index
from pipeline.identity.synth import make_mixture


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(E, k):
    S = E @ E.T
    np.fill_diagonal(S, -np.inf)
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return I, np.take_along_axis(S, I, 1)


def test_exact_matches_bruteforce():
    E = _unit(700, 24)
    g = knn_graph(E, k=7, backend="faiss-flat")
    I, S = _brute(E, 7)
    assert g.indices.dtype == np.int64 and g.similarities.dtype == np.float32
    assert g.indices.shape == (700, 7)
    assert (g.indices != np.arange(700)[:, None]).all()  # self excluded
    np.testing.assert_allclose(g.similarities, S, atol=1e-5)
    assert (g.indices == I).mean() > 0.999  # ties aside


def test_blocked_path_equals_unblocked():
    E = _unit(1000, 16, seed=1)
    a = knn_graph(E, k=5, backend="faiss-flat", block_size=10_000)
    b = knn_graph(E, k=5, backend="faiss-flat", block_size=97)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.similarities, b.similarities, atol=1e-6)


def test_torch_cpu_equals_faiss_exact():
    E = _unit(900, 32, seed=2)
    a = knn_graph(E, k=6, backend="faiss-flat")
    b = knn_graph(E, k=6, backend="torch", block_size=128)
    assert b.params["device"] in ("cpu", "cuda")
    assert (a.indices == b.indices).mean() > 0.999
    np.testing.assert_allclose(a.similarities, b.similarities, atol=1e-5)


def _brute64(E, k):
    """Top k+1 per row (self included) in float64, ties by index."""
    S = E.astype(np.float64) @ E.T.astype(np.float64)
    I = np.lexsort((np.broadcast_to(np.arange(len(E)), S.shape), -S), axis=-1)[:, : k + 1]
    return I, np.take_along_axis(S, I, 1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("resident", [True, False])
def test_torch_two_level_exact_on_cpu(dtype, resident):
    """The GPU code path run on CPU: half-precision products, two-level top-k over column groups,
    float32 re-rank; resident database or streamed in parts. Exact against float64 brute force."""
    pytest.importorskip("torch")
    from pipeline.identity.knn_torch import knn_torch_exact

    E = _unit(1500, 48, seed=7)
    E[700] = E[100]  # an exact duplicate: a tie the result must still hold
    I_ref, S_ref = _brute64(E, 9)
    I, S, info = knn_torch_exact(
        E,
        9,
        device="cpu",
        dtype=dtype,
        query_block=256,
        db_chunk=640,
        group=8,
        max_resident_bytes=None if resident else 40_000,
    )
    assert (info["resident_parts"] == 1) == resident
    assert I.shape == (1500, 10) and I.dtype == np.int64 and S.dtype == np.float32
    # same neighbour sets (a tie at the k-th place may swap members of equal similarity)
    same = (I[:, :, None] == I_ref[:, None, :]).any(2)
    kth_tie = np.isclose(S_ref[:, -1:], np.take_along_axis(E @ E.T, I, 1), atol=1e-6)
    assert (same | kth_tie).all()
    np.testing.assert_allclose(S, np.take_along_axis(E.astype(np.float64) @ E.T, I, 1), atol=1e-6)
    assert (np.diff(S, axis=1) <= 1e-7).all()  # sorted


def test_topk_two_level_equals_full_topk():
    torch = pytest.importorskip("torch")
    from pipeline.identity.knn_torch import topk_two_level

    g = torch.Generator().manual_seed(0)
    for C, t, group in [(1000, 5, 16), (1003, 17, 32), (64, 10, 32), (5000, 65, 32)]:
        S = torch.randn(37, C, generator=g)
        v, i = topk_two_level(S, t, group)
        rv, _ = torch.topk(S, t, dim=1)
        assert torch.equal(v, rv)
        assert torch.equal(torch.gather(S, 1, i), v)


def test_top_columns_exact():
    from pipeline.identity.knn import _top_columns

    rng = np.random.default_rng(1)
    for m, t in [(5, 11), (300, 11), (4000, 11), (2501, 7)]:
        S = rng.standard_normal((50, m)).astype(np.float32)
        cols = _top_columns(S, t)
        got = np.sort(np.take_along_axis(S, cols, 1), 1)
        want = np.sort(S, 1)[:, -min(t, m) :]
        np.testing.assert_array_equal(got, want)


def test_ivf_blas_one_cell_is_exact_and_threads_do_not_change_the_result():
    from pipeline.identity.knn import knn_ivf_blas

    E = _unit(800, 24, seed=8)
    I, S, info = knn_ivf_blas(E, 6, nlist=1, target_recall=None)
    I_ref, S_ref = _brute64(E, 6)
    assert info["nlist"] == 1
    np.testing.assert_allclose(S, S_ref, atol=1e-5)
    assert (I == I_ref).mean() > 0.999
    m = make_mixture(8000, seed=9)
    a = knn_ivf_blas(m.embeddings, 10, min_sim=0.93, n_threads=1)
    b = knn_ivf_blas(m.embeddings, 10, min_sim=0.93, n_threads=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2]["nlist"] > 50 and a[2]["scanned_fraction"] < 0.5


def test_ivf_blas_recall_of_edges_above_threshold():
    """Measured against the full exact graph (independent of the backend's own sampled check)."""
    m = make_mixture(20_000, seed=10)
    E = m.embeddings
    exact = knn_graph(E, k=10, backend="faiss-flat")
    g = knn_graph(E, k=10, backend="ivf-blas", recall_min_similarity=0.93)
    assert g.backend == "ivf-blas" and g.indices.shape == (20_000, 10)
    assert (g.indices != np.arange(20_000)[:, None]).all()
    strong = exact.similarities >= 0.93
    found = (exact.indices[:, :, None] == g.indices[:, None, :]).any(2)
    recall = (found & strong).sum() / strong.sum()
    assert recall >= 0.93, recall
    assert g.params["check_recall"] >= 0.95 or g.params["nprobe"] == 4 * 6
    # similarities are exact inner products of the listed pairs, rows sorted
    valid = g.indices >= 0
    dots = np.einsum("nd,nkd->nk", E, E[np.maximum(g.indices, 0)])
    np.testing.assert_allclose(g.similarities[valid], dots[valid], atol=1e-5)
    assert (np.diff(g.similarities, axis=1) <= 0).all()


@pytest.mark.parametrize("backend", ["faiss-hnsw", "faiss-ivf"])
def test_approximate_recall(backend):
    m = make_mixture(6000, seed=3)
    exact = knn_graph(m.embeddings, k=10, backend="faiss-flat")
    approx = knn_graph(m.embeddings, k=10, backend=backend)
    rec = recall_at_k(approx.indices, exact.indices)
    assert approx.params["calib_recall"] >= 0.95
    assert rec >= 0.95


def test_memmap_input_and_small_n(tmp_path):
    E = _unit(50, 8, seed=4)
    p = tmp_path / "e.npy"
    np.save(p, E)
    g = knn_graph(str(p), k=5, backend="faiss-flat")
    np.testing.assert_array_equal(g.indices, knn_graph(E, k=5, backend="faiss-flat").indices)
    tiny = knn_graph(E[:3], k=5, backend="faiss-flat")
    assert (tiny.indices[:, 2:] == -1).all() and np.isneginf(tiny.similarities[:, 2:]).all()
    assert knn_graph(E[:3], k=5, backend="torch").indices[:, :2].tolist() == tiny.indices[:, :2].tolist()


def test_auto_and_bad_input():
    E = _unit(100, 8)
    assert knn_graph(E, k=3).backend in ("faiss-flat", "faiss-gpu", "torch")
    with pytest.raises(ValueError):
        knn_graph(E.astype(np.float64), k=3)
    with pytest.raises(ValueError):
        knn_graph(E, k=3, backend="nope")
    I, _S = search_index(E[:50], E[50:60], 4)
    assert I.shape == (10, 4) and (I < 50).all()


def test_recall_floor_calibration_and_auto_choice():
    from pipeline.identity.knn import choose_backend, exact_neighbours_of

    m = make_mixture(6000, seed=4)
    E = m.embeddings
    g = knn_graph(E, k=10, backend="faiss-ivf", recall_min_similarity=0.93)
    assert g.params["calib_min_sim"] == 0.93 and g.params["calib_recall"] >= 0.95
    q = np.arange(0, 6000, 13)
    ex = exact_neighbours_of(E, q, 10)
    hits = total = 0
    for r, qq in enumerate(q):
        keep = ex[r][(E[ex[r]] @ E[qq]) >= 0.93]
        total += len(keep)
        hits += len(np.intersect1d(keep, g.indices[qq]))
    assert hits / total >= 0.93
    if choose_backend(10) == "faiss-flat":  # CPU-only machine
        assert choose_backend(10**6, recall_min_similarity=0.9) == "ivf-blas"
        assert choose_backend(10**6) == "ivf-blas"


def test_recall_by_similarity_counts_ties_and_matches_recall_at_k_otherwise():
    from pipeline.identity.knn import exact_neighbours_of, recall_by_similarity

    E = _unit(3000, 16, seed=11)
    q = np.arange(0, 3000, 7)
    exact = exact_neighbours_of(E, q, 10)
    approx = knn_graph(E, k=10, backend="ivf-blas", target_recall=None, nprobe=1)
    by_id = recall_at_k(approx.indices[q], exact)
    by_sim = recall_by_similarity(E, q, exact, approx.similarities[q])
    assert by_id < 0.999 and abs(by_id - by_sim) < 1e-9  # no ties: the same number
    # 2,000 copies of one face: any 10 copies are a perfect answer, whatever their ids
    D = E.copy()
    D[:2000] = D[0]
    qd = np.arange(0, 2000, 50)
    exact_d = exact_neighbours_of(D, qd, 10)
    other = np.stack([np.setdiff1d(np.arange(2000), np.r_[qq, exact_d[i]])[:10] for i, qq in enumerate(qd)])
    sims = np.einsum("qd,qkd->qk", D[qd], D[other])
    assert recall_at_k(other, exact_d) == 0.0
    assert recall_by_similarity(D, qd, exact_d, sims) == 1.0
    g = knn_graph(D, k=10, backend="ivf-blas", recall_min_similarity=0.9)
    assert g.params["check_recall"] >= 0.95 and (g.similarities[:2000, :10] > 0.9999).all()


def test_ivf_blas_spill_finds_pairs_cut_by_cell_borders():
    """Own cell only (no probes, no expansion): a pair split by a cell border is found only if one
    face is also listed in the other's cell. Listing the border faces twice must raise the recall of
    the edges above the threshold, and a pair met twice is kept once."""
    from pipeline.identity.knn import _self_excluded, knn_ivf_blas

    m = make_mixture(20_000, seed=11)
    E = m.embeddings
    exact = knn_graph(E, k=10, backend="faiss-flat")
    strong = exact.similarities >= 0.93

    def run(nprobe=1, max_rounds=0, **kw):
        I, S, info = knn_ivf_blas(E, 10, nprobe=nprobe, max_rounds=max_rounds, min_sim=0.93, target_recall=None, **kw)
        I, S = _self_excluded(I, S, 10)
        found = (exact.indices[:, :, None] == I[:, None, :]).any(2)
        return I, S, info, (found & strong).sum() / strong.sum()

    *_, base = run(spill=0.0)
    I, _S, info, spilled = run(spill=0.3)
    print("own-cell recall above 0.93: no spill", base, "spill 0.3", spilled)
    assert info["spilled"] == 6000
    assert spilled >= base + 0.03, (base, spilled)
    # with probes and expansion a pair is met again (a face listed in two scanned cells, reverse offers)
    for I_, S_ in (run(spill=0.3, reverse=True, nprobe=4, max_rounds=2)[:2], run(spill=0.3, nprobe=4)[:2]):
        valid = I_ >= 0
        ordered = np.sort(np.where(valid, I_, -1 - np.arange(10)), 1)
        assert (ordered[:, 1:] != ordered[:, :-1]).all()  # no neighbour twice in a row
        dots = np.einsum("nd,nkd->nk", E, E[np.maximum(I_, 0)])
        np.testing.assert_allclose(S_[valid], dots[valid], atol=1e-5)
    np.testing.assert_array_equal(run(spill=0.3, n_threads=1)[0], I)  # threads do not change it


def test_drop_repeats_keeps_the_first_occurrence():
    from pipeline.identity.knn import _drop_repeats

    Ip = np.array([[5, 3, 5, -1, 3], [1, 2, 3, 4, 5]], np.int64)
    Sp = np.array([[0.9, 0.8, 0.9, -np.inf, 0.7], [5, 4, 3, 2, 1]], np.float32)
    _drop_repeats(Ip, Sp)
    np.testing.assert_array_equal(Ip, [[5, 3, -1, -1, -1], [1, 2, 3, 4, 5]])
    assert np.isneginf(Sp[0, 2:]).all() and Sp[0, 1] == np.float32(0.8)


def test_adaptive_probing_scans_only_faces_the_last_step_improved():
    from pipeline.identity.knn import _floor_exact, exact_neighbours_of, knn_ivf_blas, recall_by_similarity

    E = make_mixture(30_000, seed=3).embeddings
    # an unreachable target: both runs grow to the probe cap, step by step
    kw = {"k": 10, "min_sim": 0.93, "target_recall": 0.9999, "n_threads": 2}
    _, S0, plain = knn_ivf_blas(E, adaptive=False, **kw)
    I1, S1, adapt = knn_ivf_blas(E, adaptive=True, **kw)
    assert plain["nprobe"] == adapt["nprobe"] == 24
    active = adapt["active_faces"]
    assert active[0] < len(E) and all(b <= a for a, b in itertools.pairwise(active)), active
    assert adapt["probed_pairs"] < 0.8 * plain["probed_pairs"], (adapt["probed_pairs"], plain["probed_pairs"])
    q = np.arange(0, len(E), 30)
    exact = _floor_exact(E, q, exact_neighbours_of(E, q, 10), 0.93)  # the edges the clustering keeps
    r0 = recall_by_similarity(E, q, exact, S0[q, 1:])
    r1 = recall_by_similarity(E, q, exact, S1[q, 1:])
    # retired faces miss some late pairs (here 0.983 against 0.999 at the cap): still past the target
    assert 0.95 <= r1 <= r0, (r1, r0)
    # deterministic whatever the thread count
    I2, S2, _ = knn_ivf_blas(E, adaptive=True, **{**kw, "n_threads": 1})
    assert np.array_equal(I1, I2) and np.array_equal(S1, S2)
    # patience 2 (a face retires after two steps that did not improve it): between the two in work and
    # in recall; and patience 1 is what the default ran
    import pipeline.identity.knn as knn_mod

    assert knn_mod.IVF_BLAS_PATIENCE == 1
    _, S3, patient = knn_ivf_blas(E, adaptive=2, **kw)
    assert adapt["probed_pairs"] < patient["probed_pairs"] < plain["probed_pairs"]
    assert all(b >= a for a, b in zip(adapt["active_faces"], patient["active_faces"])), (adapt["active_faces"], patient["active_faces"])
    r3 = recall_by_similarity(E, q, exact, S3[q, 1:])
    assert r1 <= r3 <= r0, (r1, r3, r0)
    # the setting reaches ivf-blas through knn_graph (the identities asset's knn_adaptive_probing)
    for flag in (False, True, 2):
        g = knn_graph(E[:5_000], k=10, backend="ivf-blas", recall_min_similarity=0.93, adaptive=flag)
        assert g.params["adaptive"] is flag
