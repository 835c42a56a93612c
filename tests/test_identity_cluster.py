import numpy as np
import pytest

from pipeline.identity.cluster import (
    DEFAULT_THRESHOLDS,
    cluster_graph,
    default_threshold,
    infomap,
    threshold_graph,
)
from pipeline.identity.knn import knn_graph
from pipeline.identity.metrics import evaluate
from pipeline.identity.synth import make_mixture


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("method", ["chinese_whispers", "leiden", "connected_components"])
def test_synthetic_mixture_recovered(method):
    m = make_mixture(3000, seed=1)
    g = knn_graph(m.embeddings, k=10, backend="faiss-flat")
    c = cluster_graph(g.indices, g.similarities, method=method, threshold=DEFAULT_THRESHOLDS["dlib"])
    e = evaluate(c.labels, m.labels)
    assert e["bcubed_f"] >= 0.95, e


def _bridge_case(seed=0):
    """Two tight groups (centres at cosine 0.8) plus one face halfway (cosine ~0.95 to both)."""
    rng = np.random.default_rng(seed)
    d = 32
    a = _unit(rng.standard_normal(d))
    r = rng.standard_normal(d)
    r = _unit(r - (r @ a) * a)
    b = _unit(0.8 * a + 0.6 * r)  # cos(a, b) = 0.8
    mid = _unit(a + b)  # cos(mid, a) = cos(mid, b) ~ 0.949
    A = _unit(a + 0.05 * rng.standard_normal((25, d)) / np.sqrt(d))
    B = _unit(b + 0.05 * rng.standard_normal((25, d)) / np.sqrt(d))
    E = np.vstack([A, B, mid[None]]).astype(np.float32)
    truth = np.array([0] * 25 + [1] * 25 + [2])
    return E, truth


def test_bridge_chains_components_but_not_cw_or_leiden():
    E, _truth = _bridge_case()
    g = knn_graph(E, k=10, backend="faiss-flat")
    thr = 0.93
    cc = cluster_graph(g.indices, g.similarities, method="connected_components", threshold=thr).labels
    assert len(np.unique(cc)) == 1  # the bridge chains both groups
    for method in ("chinese_whispers", "leiden"):
        lab = cluster_graph(g.indices, g.similarities, method=method, threshold=thr).labels
        assert len(np.unique(lab[:25])) == 1 and len(np.unique(lab[25:50])) == 1, method
        assert lab[0] != lab[25], method  # the two groups stay apart


def test_deterministic_and_canonical():
    m = make_mixture(2000, seed=5)
    g = knn_graph(m.embeddings, k=10, backend="faiss-flat")
    for method in ("chinese_whispers", "leiden"):
        a = cluster_graph(g.indices, g.similarities, method=method, threshold=0.93, seed=7).labels
        b = cluster_graph(g.indices, g.similarities, method=method, threshold=0.93, seed=7).labels
        np.testing.assert_array_equal(a, b)
        assert a[0] == 0 and a.max() + 1 == len(np.unique(a))
        # canonical: cluster ids appear in increasing order of first member
        _, first = np.unique(a, return_index=True)
        assert (np.diff(first) > 0).all()


def test_singletons_keep_own_cluster_and_threshold_graph():
    E = _unit(np.eye(6, 8, dtype=np.float32))  # orthogonal: no edge above threshold
    g = knn_graph(E, k=3, backend="faiss-flat")
    c = cluster_graph(g.indices, g.similarities, threshold=0.5)
    assert c.labels.tolist() == list(range(6)) and c.n_edges == 0
    A = threshold_graph(np.array([[1], [0], [-1]]), np.array([[0.9], [0.95], [-np.inf]], np.float32), 0.5)
    assert (A != A.T).nnz == 0 and A[0, 1] == pytest.approx(0.95)


def test_default_thresholds_and_errors():
    assert default_threshold("dlib") == 0.93 and 0.4 <= default_threshold("arcface") <= 0.5
    with pytest.raises(ValueError):
        default_threshold("unknown")
    with pytest.raises(ValueError):
        cluster_graph(np.zeros((2, 1), np.int64), np.zeros((2, 1), np.float32), method="kmeans")


def test_infomap_optional_message(monkeypatch):
    import builtins

    import scipy.sparse as sp

    real_import = builtins.__import__

    def fake(name, *a, **kw):
        if name == "infomap":
            raise ImportError("no infomap")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"lineup\[infomap\]"):
        infomap(sp.csr_matrix((3, 3)))


def test_infomap_runs_if_installed():
    pytest.importorskip("infomap")
    E, _truth = _bridge_case()
    g = knn_graph(E, k=10, backend="faiss-flat")
    lab = cluster_graph(g.indices, g.similarities, method="infomap", threshold=0.93).labels
    assert lab[0] != lab[25]


def test_row_argmax_label_matches_a_plain_per_row_vote():
    """Each row's label of largest summed weight (ties: the smallest label), against a dict per row."""
    import scipy.sparse as sp

    from pipeline.identity.cluster import _row_argmax_label

    rng = np.random.default_rng(3)
    n = 400
    A = sp.random(n, n, density=0.03, random_state=4, format="csr", dtype=np.float64)
    A.data = np.round(A.data * 4) / 4 + 0.25  # coarse weights: many exact ties between labels
    labels = rng.integers(0, 25, n)
    rows, best = _row_argmax_label(A, labels)
    want_rows, want = [], []
    for r in range(n):
        s, e = A.indptr[r], A.indptr[r + 1]
        if s == e:
            continue
        votes = {}
        for j, w in zip(A.indices[s:e], A.data[s:e]):
            votes[labels[j]] = votes.get(labels[j], 0.0) + w
        top = max(votes.values())
        want_rows.append(r)
        want.append(min(lab for lab, v in votes.items() if v >= top - 1e-9 * abs(top)))
    assert rows.tolist() == want_rows and best.tolist() == want


def _crowd_mixture():
    """The dlib-like mixture with its identities pulled toward the mean face (tau 0.3, fitted 0.42):
    at 20k faces it has the crowd of generic-looking people that appears at ~2M faces with the
    fitted tau, where chains of cross-identity edges above 0.93 make one giant cluster."""
    from dataclasses import replace

    from pipeline.identity.synth import SynthParams

    m = make_mixture(20_000, preset=replace(SynthParams(), tau=0.3), seed=0)
    g = knn_graph(m.embeddings, k=10, backend="faiss-flat")
    return m, g


def test_giant_merge_split_and_large_identities_kept():
    m, g = _crowd_mixture()
    thr = DEFAULT_THRESHOLDS["dlib"]
    plain = cluster_graph(g.indices, g.similarities, threshold=thr, embeddings=m.embeddings, split=False)
    e_plain = evaluate(plain.labels, m.labels)
    # the failure this guards against: plain Chinese whispers chains thousands of people into one
    assert e_plain["largest_pred_true_ids"] >= 100, e_plain
    assert e_plain["pairwise_precision"] < 0.5, e_plain

    fixed = cluster_graph(g.indices, g.similarities, threshold=thr, embeddings=m.embeddings)
    e = evaluate(fixed.labels, m.labels)
    assert fixed.info["split_rounds"], fixed.info
    assert e["largest_pred_true_ids"] <= 2, e
    assert e["pairwise_precision"] >= 0.85, e
    assert e["bcubed_f"] > e_plain["bcubed_f"], (e, e_plain)
    # genuine large identities (100+ faces, up to ~1,200) are not cut: each keeps >= 90% of its faces
    # in one cluster, as under plain Chinese whispers
    sizes = np.bincount(m.labels)
    for ident in np.flatnonzero(sizes >= 100):
        lab = fixed.labels[m.labels == ident]
        assert np.bincount(lab).max() >= 0.9 * len(lab), (ident, len(lab))
    # deterministic
    again = cluster_graph(g.indices, g.similarities, threshold=thr, embeddings=m.embeddings)
    assert np.array_equal(again.labels, fixed.labels)


def test_split_needs_matching_embeddings():
    m = make_mixture(200, seed=0)
    g = knn_graph(m.embeddings, k=5, backend="faiss-flat")
    with pytest.raises(ValueError, match="differ in length"):
        cluster_graph(g.indices, g.similarities, threshold=0.93, embeddings=m.embeddings[:100])
