"""The collection-level combine of score_candidates (face rows from image scores already computed, face
quality and identity similarity) on a case small enough to check by hand. No model loads."""

import math

import numpy as np
import pyarrow as pa

from pipeline.scoring import QualityConfig, ScoringConfig, score_candidates
from pipeline.scoring.stage import IMAGE_SCORES_SCHEMA, SCORES_SCHEMA

S = 1 / math.sqrt(2)


def _faces(identity_ids):
    """a0, a1, b0 in identity p; c0 alone in q; d0 without an identity."""
    emb = [[1, 0], [0, 1], [1, 1], [3, 4], [0, 2]]
    return pa.table({
        "uid": ["a", "a", "b", "c", "d"],
        "face_index": pa.array([0, 1, 0, 0, 0], pa.int32()),
        "face_width": [112.0, 72.0, 112.0, 112.0, 112.0],  # size sub-score 1, 0.5, 1, 1, 1
        "face_height": [200.0, 72.0, 112.0, 112.0, 112.0],
        "blur": [100.0, 1000.0, None, 100.0, 100.0],  # b0: blur unknown, weight 0
        "yaw": [0.0, 0.0, 0.0, 60.0, 30.0],  # c0: profile view, pose 0; d0: pose 0.5
        "pitch": [0.0, 0.0, 0.0, 0.0, 0.0],
        "det_score": [0.5, 0.9, 0.5, 0.5, 0.5],
        "embedding": pa.array(emb, pa.list_(pa.float32(), 2)),
        "identity_id": pa.array(identity_ids, pa.string()),
    })


def _image_scores():
    return pa.table({
        "uid": ["a", "e", "b", "a"],  # a twice: its last row counts; e has no face
        "clip_score": pa.array([9.0, 0.25, None, 0.5], pa.float32()),
        "aesthetic": pa.array([9.0, None, 2.0, None], pa.float32()),
        "social_reward": pa.array([9.0, None, None, -1.0], pa.float32()),
        "scorer_fingerprint": ["f"] * 4,
    }, schema=IMAGE_SCORES_SCHEMA)


def test_combine_by_hand():
    cfg = ScoringConfig(quality=QualityConfig(), enabled=("face_quality", "identity_similarity"))
    table, report = score_candidates([], _faces(["p", "p", "p", "q", None]), cfg, image_scores=_image_scores())
    assert table.schema == SCORES_SCHEMA
    assert report["unique_images"] == 3 and report["faces"] == 5
    assert {"clip", "aesthetic", "social_reward", "face_quality", "identity_similarity"} <= set(report["available"])
    rows = table.to_pylist()
    assert [(r["uid"], r["face_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("d", 0), ("e", None)]
    a0, a1, b0, c0, d0, e = rows
    # image scores: a's last row (aesthetic null there), b's only row, none for c and d
    assert (a0["clip_score"], a0["aesthetic"], a0["social_reward"]) == (0.5, None, -1.0) == (
        a1["clip_score"], a1["aesthetic"], a1["social_reward"])
    assert (b0["clip_score"], b0["aesthetic"], b0["social_reward"]) == (None, 2.0, None)
    assert (c0["clip_score"], c0["aesthetic"], c0["social_reward"]) == (None, None, None) == (
        d0["clip_score"], d0["aesthetic"], d0["social_reward"])
    assert (e["clip_score"], e["aesthetic"], e["social_reward"]) == (0.25, None, None)
    # quality: weighted geometric mean of size, blur, pose (weight 1) and detector score (weight 0.5)
    q = [r["face_quality"] for r in rows]
    assert q[0] == 1.0 and q[2] == 1.0 and q[3] == 0.0 and q[5] is None
    assert math.isclose(q[1], 0.5 ** (1 / 3.5), rel_tol=1e-6)  # size 0.5, the rest 1
    assert math.isclose(q[4], 0.5 ** (1 / 3.5), rel_tol=1e-6)  # pose 0.5
    # identity similarity: cosine with the mean of the other faces of the identity
    sim = [r["identity_similarity"] for r in rows]
    leave_out = S / math.sqrt(S**2 + (1 + S) ** 2)  # [1,0] against [0,1]+[s,s]: cos 67.5 degrees
    assert math.isclose(sim[0], leave_out, rel_tol=1e-6) and math.isclose(sim[1], leave_out, rel_tol=1e-6)
    assert math.isclose(sim[2], 1.0, rel_tol=1e-6)  # [s,s] against [1,0]+[0,1]
    assert sim[3] is None and sim[4] is None and sim[5] is None  # singleton, no identity, no face
    assert [r["scorers"] for r in rows] == [
        ["clip", "social_reward", "face_quality", "identity_similarity"],
        ["clip", "social_reward", "face_quality", "identity_similarity"],
        ["aesthetic", "face_quality", "identity_similarity"],
        ["face_quality"],
        ["face_quality"],
        ["clip"],
    ]


def test_reference_embedding_and_blocks():
    """With a reference_embedding column each face is compared with its own reference (null: no score);
    identity similarity computed in blocks of one face equals one block."""
    from pipeline.scoring.stage import _identity_similarity

    faces = _faces(["p", "p", "p", "q", None])
    refs = pa.array([[0, 5], None, [1, 1], [4, -3], None], pa.list_(pa.float32()))
    with_ref = faces.append_column("reference_embedding", refs)
    sim = _identity_similarity(with_ref)
    np.testing.assert_allclose(sim[[0, 2, 3]], [0.0, 1.0, 0.0], atol=1e-6)
    assert np.isnan(sim[[1, 4]]).all()
    whole = _identity_similarity(faces)
    for block in (1, 2, 3):
        assert np.array_equal(_identity_similarity(faces, block=block), whole, equal_nan=True)


def test_no_faces_table():
    cfg = ScoringConfig(enabled=("face_quality", "identity_similarity"))
    table, report = score_candidates([], None, cfg, image_scores=_image_scores())
    assert table.column("uid").to_pylist() == ["a", "e", "b"]
    assert table.column("face_index").null_count == 3
    assert table.column("scorers").to_pylist() == [["clip", "social_reward"], ["clip"], ["aesthetic"]]
    assert "no faces table given" in report["unavailable"]["face_quality"]
