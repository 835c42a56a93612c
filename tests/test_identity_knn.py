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
        assert choose_backend(10**6, recall_min_similarity=0.9) == "faiss-ivf"
        assert choose_backend(10**6) == "faiss-hnsw"
