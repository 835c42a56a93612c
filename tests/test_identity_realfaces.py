"""Regression on the labelled real photos (../shared/data/faces): default threshold + default method."""

import numpy as np
import pytest

from pipeline.identity.build import build_identities
from pipeline.identity.cluster import DEFAULT_METHOD, DEFAULT_THRESHOLDS, cluster_graph
from pipeline.identity.knn import knn_graph
from pipeline.identity.metrics import evaluate


@pytest.fixture(scope="session")
def real_faces(shared_faces):
    pytest.importorskip("dlib")
    from pipeline.faces import get_backend
    from pipeline.faces.folders import labelled_embeddings

    lf = labelled_embeddings(shared_faces, get_backend("dlib"))
    assert not lf.no_face, lf.no_face
    return lf


def test_real_photos_default_method_and_threshold(real_faces):
    lf = real_faces
    assert len(lf.names) == 19 and lf.embeddings.shape == (125, 128)
    g = knn_graph(lf.embeddings, k=10)
    c = cluster_graph(g.indices, g.similarities, method=DEFAULT_METHOD, threshold=DEFAULT_THRESHOLDS["dlib"],
                      embeddings=lf.embeddings)  # with the split of incoherent clusters, as build_identities does
    e = evaluate(c.labels, lf.labels)
    assert e["bcubed_f"] >= 0.97, e
    assert e["pairwise_f"] >= 0.97, e


def test_real_photos_build_entry_point(real_faces):
    lf = real_faces
    r = build_identities(lf.files, np.zeros(len(lf.files), np.int64), lf.embeddings)
    lab = dict(zip(lf.files, lf.labels.tolist()))
    t = r.assignments
    pred = np.unique(t.column("identity_id").to_pylist(), return_inverse=True)[1]
    true = np.array([lab[u] for u in t.column("uid").to_pylist()])
    e = evaluate(pred, true)
    assert e["bcubed_f"] >= 0.97 and e["pairwise_f"] >= 0.97, e
    within, across = r.stats["similarity_within"], r.stats["similarity_across"]
    assert np.median(within) > np.median(across)


def test_synthetic_mixtures_are_fitted_to_these_photos(real_faces):
    """The quantiles the synthetic identities are fitted to are those of these photos."""
    from pipeline.identity.synth import DLIB_PHOTO_QUANTILES, pair_quantiles

    q = pair_quantiles(real_faces.embeddings, real_faces.labels)
    for key, value in DLIB_PHOTO_QUANTILES.items():
        assert q[key] == pytest.approx(value, abs=0.01), key
