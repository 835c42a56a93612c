"""Geometric same-shot check (SIFT + RANSAC, dedup.keypoint_*) and its place in the builder's filter chain.

The real case it fixes: face_recognition's ``obama_partial_face.jpg`` / ``obama_partial_face2.jpg`` are two
horizontal crops of ``obama.jpg`` (face cut at the image edge); the hash/NCC checks let one serve as the
other's reference. Here the same situation is made in tmp_path from a photo of ../shared/data/faces.
"""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.faces import faces_schema, get_backend
from pipeline.faces.folders import IDENTITIES_SCHEMA, load_rgb_bytes
from pipeline.ids import content_uid
from pipeline.ingest import IMAGES_SCHEMA
from pipeline.multiid import MultiIDConfig, dedup, select_references

PHOTO, OTHER = "angelina_jolie/img1.jpg", "angelina_jolie/img2.jpg"


def _jpeg(rgb, q=90):
    b = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(b, "JPEG", quality=q)
    return b.getvalue()


def _gray(rgb):
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))


@pytest.fixture(scope="module")
def shot(shared_faces, tmp_path_factory):
    """Original photo, two edge-cut crops, a mirrored copy and a genuinely different photo, with face boxes."""
    tmp = tmp_path_factory.mktemp("kp")
    be = get_backend("dlib")
    out = {}
    for name, rel in (("orig", PHOTO), ("other", OTHER)):
        rgb = load_rgb_bytes((shared_faces / "identities" / rel).read_bytes())
        f = max(be.analyze([rgb])[0], key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        out[name] = (rgb, np.asarray(f.bbox, np.float64), np.asarray(f.landmarks, np.float64).reshape(5, 2), np.asarray(f.embedding))
    rgb, (x1, y1, x2, y2), lm, emb = out["orig"]
    bw, W = x2 - x1, rgb.shape[1]
    cut_r, cut_l = int(x1 + 0.75 * bw), int(x1 + 0.25 * bw)  # as obama_partial_face2 / obama_partial_face
    out["crop_left"] = (rgb[:, :cut_r], np.array([x1, y1, cut_r, y2]), lm, emb)
    out["crop_right"] = (rgb[:, cut_l:], np.array([0.0, y1, x2 - cut_l, y2]), lm - [cut_l, 0], emb)
    out["mirror"] = (rgb[:, ::-1], np.array([W - x2, y1, W - x1, y2]), np.c_[W - lm[:, 0], lm[:, 1]], emb)
    files = {}
    for k, (im, *_rest) in out.items():
        p = tmp / f"{k}.jpg"
        p.write_bytes(_jpeg(im))
        files[k] = p
    return out, files


def _kp(shot, name):
    _, box, *_ = shot[0][name]
    return dedup.face_keypoints(_gray(load_rgb_bytes(shot[1][name].read_bytes())), box)


def _same(m):
    c = MultiIDConfig()
    return dedup.keypoint_same_shot(m, c.kp_min_inliers, c.kp_min_ratio, c.kp_strong_inliers)


def test_keypoints_edge_cut_crops_mirror_and_genuine(shot):
    k = {n: _kp(shot, n) for n in ("orig", "crop_left", "crop_right", "mirror", "other")}
    for a, b in (("crop_left", "crop_right"), ("crop_right", "crop_left"), ("orig", "crop_left"), ("orig", "crop_right")):
        m = dedup.keypoint_match(k[a], k[b])
        assert _same(m) and not m.mirrored, (a, b, m)
    m = dedup.keypoint_match(k["orig"], k["mirror"])
    assert _same(m) and m.mirrored, m
    for a in ("orig", "crop_left", "crop_right", "mirror"):
        m = dedup.keypoint_match(k[a], k["other"])
        assert not _same(m), (a, m)
        assert m.inliers < MultiIDConfig().kp_min_inliers, (a, m)


def _bfmatcher_matches(da, db, ratio=dedup.KP_RATIO):
    """The mutual ratio-test matches as OpenCV's BFMatcher gives them: knnMatch forward, match backward."""
    import cv2

    bf = cv2.BFMatcher(cv2.NORM_L2)
    back_of = {m.queryIdx: m.trainIdx for m in bf.match(db, da)}
    return [(m[0].queryIdx, m[0].trainIdx) for m in bf.knnMatch(da, db, k=2)
            if len(m) == 2 and m[0].distance < ratio * m[1].distance and back_of.get(m[0].trainIdx) == m[0].queryIdx]


def test_mutual_ratio_matches_are_bfmatchers(shot, shared_faces):
    """The matcher finds the backward neighbours of the ratio-passing matches only: on copies (most keypoints
    match), genuine pairs of one person, and other people, it keeps exactly the matches BFMatcher keeps."""
    k = [_kp(shot, n) for n in ("orig", "crop_left", "crop_right", "mirror", "other")]
    for p in sorted((shared_faces / "identities").glob("*/img1.jpg"))[:8]:
        g = _gray(load_rgb_bytes(p.read_bytes()))
        H, W = g.shape
        k.append(dedup.face_keypoints(g, (0.3 * W, 0.25 * H, 0.7 * W, 0.7 * H)))
    counts = []
    for a in k:
        assert a.sq is not None and a.sq_m is not None  # SIFT's descriptors are byte-valued: the exact product path
        for b in k:
            for db, sq_b in ((b.desc, b.sq), (b.desc_m, b.sq_m)):
                want = _bfmatcher_matches(a.desc, db)
                for sqs in ((None, None), (a.sq, sq_b)):  # cv2.batchDistance, and the matrix product
                    q, t = dedup._mutual_ratio_matches(a.desc, db, dedup.KP_RATIO, *sqs)
                    assert list(zip(q.tolist(), t.tolist())) == want
                counts.append(len(want))
    assert max(counts) > 100 and min(counts) < 20  # copies and strangers were both among the pairs


def test_exact_matches_break_ties_as_bfmatcher_and_other_descriptors_take_its_kernel():
    """Equal distances (repeated descriptors, on both sides) go to the lowest index on the product path as in
    BFMatcher; descriptors that are not byte-valued get no squared norms and take cv2.batchDistance."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (40, 128)).astype(np.float32)
    da = np.concatenate([base[:20], base[:5], rng.integers(0, 256, (10, 128)).astype(np.float32)])
    db = np.concatenate([base[5:25], base[:10], base[:3]])  # every a in base[:10] has two equal nearest b
    db[-1, 0] = min(255.0, db[-1, 0] + 1)  # and one near-tie
    a, b = (dedup.KeypointSet(np.zeros((len(d), 2), np.float32), d, np.zeros((len(d), 2), np.float32), d, (8, 8))
            for d in (da, db))
    assert a.sq is not None and b.sq is not None
    for x, y in ((a, b), (b, a)):
        q, t = dedup._mutual_ratio_matches(x.desc, y.desc, 1.0, x.sq, y.sq)  # ratio 1: only exact ties fail it
        assert list(zip(q.tolist(), t.tolist())) == _bfmatcher_matches(x.desc, y.desc, 1.0)
        q, t = dedup._mutual_ratio_matches(x.desc, y.desc, dedup.KP_RATIO, x.sq, y.sq)
        assert list(zip(q.tolist(), t.tolist())) == _bfmatcher_matches(x.desc, y.desc)
    scaled = dedup.KeypointSet(a.pts, da / 512, a.pts_m, da / 512, (8, 8))  # e.g. a normalised descriptor
    assert scaled.sq is None and dedup.KeypointSet(a.pts, -da, a.pts_m, None, (8, 8)).sq is None
    wide = np.zeros((3, 129), np.float32)
    assert dedup.KeypointSet(a.pts[:3], wide, a.pts_m[:3], wide, (8, 8)).sq is None  # sums could pass 2**24
    m = dedup.keypoint_match(scaled, dedup.KeypointSet(b.pts, db / 512, b.pts_m, db / 512, (8, 8)))
    assert m.good == len(_bfmatcher_matches(da / 512, db / 512))


def _tables(shot, names):
    img_rows, face_rows, id_rows = [], [], []
    for n in names:
        rgb, box, lm, emb = shot[0][n]
        data = shot[1][n].read_bytes()
        uid = content_uid(data)
        img_rows.append({"uid": uid, "source": "test", "path": str(shot[1][n]), "offset": 0, "length": len(data),
                         "width": rgb.shape[1], "height": rgb.shape[0]})
        b = [float(v) for v in box]
        face_rows.append({"uid": uid, "source": "test", "face_index": 0, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3],
                          "landmarks": [float(v) for v in np.asarray(lm).ravel()], "det_score": 1.5, "face_width": b[2] - b[0],
                          "face_height": b[3] - b[1], "blur": 500.0, "yaw": 0.0, "pitch": 0.0, "roll": 0.0,
                          "embedding": [float(v) for v in emb], "backend": "dlib", "model_version": "test"})
        id_rows.append({"uid": uid, "face_index": 0, "identity_id": "angelina_jolie"})
    return (pa.Table.from_pylist(img_rows, schema=IMAGES_SCHEMA), pa.Table.from_pylist(face_rows, schema=faces_schema(len(emb))),
            pa.Table.from_pylist(id_rows, schema=IDENTITIES_SCHEMA)), {content_uid(shot[1][n].read_bytes()): n for n in names}


def test_builder_rejects_edge_cut_crop_and_mirror_keeps_genuine(shot):
    (images, faces, ids), name = _tables(shot, ["crop_left", "crop_right", "mirror", "other"])
    # similarity band wide open: only the copy-paste guard can remove a copy (copies share one embedding here)
    cfg = MultiIDConfig(min_face_px=60, sim_low=-1.0, sim_high=1.0, eval_fraction=0.0, refs_per_person=3)
    _, pairs, cands, stats = select_references(images, faces, ids, cfg)
    st = {(name[c["target_uid"]], name[c["ref_uid"]]): c for c in cands}
    copies = ("crop_left", "crop_right", "mirror")
    for a in copies:
        for b in copies:
            if a != b:
                c = st[(a, b)]
                assert c["status"].startswith("near_duplicate_"), c
                assert c["kp_inliers"] >= cfg.kp_min_inliers, c
    # the hashes alone miss the edge-cut crops: the keypoint check is what removes them
    assert st[("crop_left", "crop_right")]["status"] == "near_duplicate_keypoints"
    assert st[("crop_right", "crop_left")]["status"] == "near_duplicate_keypoints"
    for a in copies:
        assert st[(a, "other")]["status"] == "selected", st[(a, "other")]
        assert st[("other", a)]["kp_inliers"] < cfg.kp_min_inliers
    assert {name[p["ref_uid"]] for p in pairs if name[p["target_uid"]] in copies} == {"other"}
    assert all(p["kp_inliers"] is not None for p in pairs)
    assert stats["candidates_removed_by"]["near_duplicate_keypoints"] >= 2
    assert stats["duplicate_flags_independent"]["keypoints"] >= 6
    # without the keypoint check the crops would be each other's references (the obama_partial_face bug)
    _, _, cands_off, _ = select_references(images, faces, ids, MultiIDConfig(**{**cfg.to_dict(), "keypoints": False}))
    off = {(name[c["target_uid"]], name[c["ref_uid"]]): c["status"] for c in cands_off}
    assert off[("crop_left", "crop_right")] in ("selected", "ranked_out", "redundant")


def test_guard_in_rank_order_chooses_what_examining_every_candidate_chooses(shot):
    """NCC and keypoints run in rank order until enough references are chosen: the same samples and pairs as
    running them on every candidate, fewer candidates examined, the others recorded as not examined."""
    from collections import Counter
    from dataclasses import replace

    (images, faces, ids), _ = _tables(shot, ["crop_left", "crop_right", "mirror", "other"])
    # w_sim < 0 ranks the copies (similarity 1, the band's edge) above the genuine photo: the walk meets them first
    for refs in (1, 2):
        cfg = MultiIDConfig(min_face_px=60, sim_low=-1.0, sim_high=1.0, eval_fraction=0.0, refs_per_person=refs, w_sim=-1.0)
        lazy = select_references(images, faces, ids, cfg)
        full = select_references(images, faces, ids, replace(cfg, examine_all_candidates=True))
        assert lazy[1] and lazy[0] == full[0] and lazy[1] == full[1]
        st_lazy = {(c["target_uid"], c["ref_uid"]): c["status"] for c in lazy[2]}
        st_full = {(c["target_uid"], c["ref_uid"]): c["status"] for c in full[2]}
        assert st_lazy.keys() == st_full.keys()
        for k, s in st_lazy.items():
            if s == "not_examined_enough_chosen":  # what the whole guard would have said of it
                assert st_full[k] in ("ranked_out", "near_duplicate_face_ncc", "near_duplicate_keypoints"), (k, st_full[k])
            else:
                assert s == st_full[k], (k, s, st_full[k])
        counts = Counter(st_lazy.values())
        assert counts["near_duplicate_keypoints"] > 0  # found by the walk (the pHashes miss the edge-cut crops)
        assert counts["not_examined_enough_chosen"] > 0 or refs == 2  # 2: the second pick walks all (redundant)
        assert lazy[3]["candidates_removed_by"].get("not_examined_enough_chosen", 0) == counts["not_examined_enough_chosen"]
        examined, everything = lazy[3]["duplicate_flags_independent"]["checked"], full[3]["duplicate_flags_independent"]["checked"]
        assert examined + counts["not_examined_enough_chosen"] == everything == len(st_full)
        assert "not_examined_enough_chosen" not in Counter(st_full.values())
