"""Multi-identity builder: metrics, Hungarian matching, calibration, identity-disjoint splits (synthetic data)."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.faces import faces_schema
from pipeline.faces.folders import IDENTITIES_SCHEMA
from pipeline.ids import content_uid
from pipeline.ingest import IMAGES_SCHEMA
from pipeline.multiid import (
    MultiIDConfig,
    calibrate_thresholds,
    check_identity_disjoint,
    copy_paste,
    hungarian_match,
    identity_split,
    match_quantile,
    sample_metrics,
    select_references,
)


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_copy_paste_extremes_and_hand_value():
    t, r = _unit([1, 0, 0]), _unit([0, 1, 0])  # theta_tr = pi/2
    # generated == ground truth: theta_gt = 0, theta_gr = theta_tr -> -1
    assert copy_paste(t @ t, t @ r, t @ r) == pytest.approx(-1.0)
    # generated == reference (copy-paste): theta_gr = 0, theta_gt = theta_tr -> +1
    assert copy_paste(r @ t, r @ r, t @ r) == pytest.approx(1.0)
    # generated halfway on the arc: 0
    g = _unit([1, 1, 0])
    assert copy_paste(g @ t, g @ r, t @ r) == pytest.approx(0.0, abs=1e-12)
    # hand computation: theta_gt = 30 deg, theta_gr = 60 deg, theta_tr = 90 deg -> (30 - 60) / 90 = -1/3
    g = _unit([math.cos(math.radians(30)), math.sin(math.radians(30)), 0])
    assert copy_paste(g @ t, g @ r, t @ r) == pytest.approx(-1 / 3)
    # clipped to [-1, 1] even when theta_tr is tiny
    assert copy_paste(0.0, 1.0, 1.0) == 1.0
    assert copy_paste(1.0, 0.0, 1.0) == -1.0


def test_hungarian_small_case_beats_greedy():
    # greedy (row 0 takes its best, col 0) would give 0.9 + 0.1 = 1.0; optimum is 0.8 + 0.85 = 1.65
    S = np.array([[0.9, 0.8], [0.85, 0.1]])
    m = hungarian_match(S)
    assert [(i, j) for i, j, _ in m] == [(0, 1), (1, 0)]
    assert sum(s for *_, s in m) == pytest.approx(1.65)
    # rectangular: 3 generated faces, 2 persons; min_sim drops weak matches
    S = np.array([[0.1, 0.2], [0.7, 0.3], [0.2, 0.9]])
    assert [(i, j) for i, j, _ in hungarian_match(S)] == [(1, 0), (2, 1)]
    assert hungarian_match(S, min_sim=0.8) == [(2, 1, 0.9)]


def test_sample_metrics_matching_order_independent():
    rng = np.random.default_rng(0)
    gt = np.stack([_unit(rng.normal(size=16)) for _ in range(3)])
    ref = np.stack([_unit(g + 0.6 * _unit(rng.normal(size=16))) for g in gt])
    gen = gt[[2, 0, 1]]  # generated image reproduces the ground truth, faces in another order
    m = sample_metrics(gen, gt, ref)
    assert m["sim_gt"] == pytest.approx(1.0)
    assert m["m_cp"] == pytest.approx(-1.0)
    m = sample_metrics(ref[::-1], gt, ref)  # pastes the references
    assert m["sim_ref"] == pytest.approx(1.0)
    assert m["m_cp"] == pytest.approx(1.0)
    m = sample_metrics(gen[:2], gt, ref)  # a missing face counts 0 in Sim(GT)
    assert m["sim_gt"] == pytest.approx(2 / 3)
    assert m["n_matched"] == 2


def test_calibration_on_synthetic_distribution():
    rng = np.random.default_rng(1)
    diff = rng.normal(0.1, 0.1, 20000)
    same = rng.normal(0.65, 0.08, 5000)
    dup = rng.uniform(0.85, 1.0, 5000)
    c = calibrate_thresholds(same, diff, dup, far=1e-3, dup_recall=0.99)
    # low = N(0.1, 0.1) 99.9th percentile = 0.1 + 3.09 * 0.1; high = U(0.85, 1) 1st percentile = 0.8515
    assert c.sim_low == pytest.approx(0.409, abs=0.02)
    assert c.sim_high == pytest.approx(0.8515, abs=0.005)
    assert c.diff_above_low_fraction <= 1.1e-3
    assert c.dup_below_high_fraction <= 0.011
    assert 0.95 < c.same_kept_fraction < 1.0
    with pytest.raises(ValueError):
        calibrate_thresholds(same, rng.uniform(0.9, 1.0, 100), rng.uniform(0.5, 0.6, 100))
    # quantile matching maps the median to the median
    assert match_quantile(np.median(diff), diff, same) == pytest.approx(np.median(same), abs=0.01)


def _synthetic_tables(tmp_path, n_ids=24, n_images=70, seed=0):
    rng = np.random.default_rng(seed)
    base = {f"id{i:02d}": _unit(rng.normal(size=128)) for i in range(n_ids)}
    names = sorted(base)
    imgs, faces, ids = [], [], []
    for k in range(n_images):
        arr = rng.integers(0, 255, (300, 300 * 3, 3), dtype=np.uint8) if k % 2 else np.full((300, 900, 3), k, np.uint8)
        p = tmp_path / f"u{k:04d}.png"
        Image.fromarray(arr).save(p)
        data = p.read_bytes()
        uid = content_uid(data)  # a uid is its photo's content hash (the reader checks it)
        imgs.append({"uid": uid, "source": "syn", "path": str(p), "offset": 0, "length": len(data), "width": 900, "height": 300})
        people = rng.choice(names, size=int(rng.integers(1, 4)), replace=False)
        for fi, name in enumerate(people):
            e = _unit(base[name] + 0.18 * _unit(rng.normal(size=128)))
            x = 300 * fi + 50
            lm = [x + 40, 110, x + 60, 110, x + 100, 110, x + 120, 110, x + 80, 150]
            faces.append({"uid": uid, "source": "syn", "face_index": fi, "x1": x, "y1": 60, "x2": x + 160, "y2": 240, "landmarks": lm,
                          "det_score": 2.0, "face_width": 160, "face_height": 180, "blur": 300.0, "yaw": float(rng.normal(0, 15)),
                          "pitch": float(rng.normal(0, 10)), "roll": 0.0, "embedding": e.astype(np.float32).tolist(),
                          "backend": "dlib", "model_version": "syn"})
            ids.append({"uid": uid, "face_index": fi, "identity_id": str(name)})
    return (pa.Table.from_pylist(imgs, schema=IMAGES_SCHEMA), pa.Table.from_pylist(faces, schema=faces_schema(128)),
            pa.Table.from_pylist(ids, schema=IDENTITIES_SCHEMA))


def test_identity_disjoint_splits(tmp_path):
    images, faces, identities = _synthetic_tables(tmp_path)
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, require_all_refs=True)
    samples, _pairs, _cands, stats = select_references(images, faces, identities, cfg)
    assert stats["per_split"].get("eval", 0) > 0 and stats["per_split"].get("train", 0) > 0
    assert stats["targets"].get("split_straddle", 0) > 0  # the rule is exercised, and counted
    assert check_identity_disjoint(samples) == []
    for s in samples:
        for f in s["faces"]:
            assert identity_split(f["identity_id"], 0.3, cfg.split_salt) == s["split"]
            assert f["refs"] and all(r["uid"] != s["target"]["uid"] for r in f["refs"])
    # counts reconcile: every image is kept or dropped with a reason
    assert sum(stats["targets"].values()) == stats["images"]
    # the check catches a leak
    bad = [dict(samples[0], split="eval" if samples[0]["split"] == "train" else "train")] + samples
    assert check_identity_disjoint(bad)
    # deterministic and independent of row order
    again = select_references(images.take(list(range(images.num_rows))[::-1]), faces, identities, cfg)[0]
    assert again == samples


def test_bounded_caches_and_candidate_cap_give_the_same_dataset(tmp_path):
    """LRU caches a fraction of the collection's size recompute what they evict: same samples; the
    per-person cap bounds the work and counts what it leaves out."""
    from dataclasses import replace

    from pipeline.cache import LRU

    images, faces, identities = _synthetic_tables(tmp_path)
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2)
    wide = select_references(images, faces, identities, cfg)
    tight = select_references(images, faces, identities, replace(cfg, cache_images=3, cache_keypoints=4))
    assert [s["key"] for s in tight[0]] == [s["key"] for s in wide[0]]
    assert [r["ref_uid"] for r in tight[1]] == [r["ref_uid"] for r in wide[1]]
    assert tight[3]["cache_evictions"]["keypoints"] > 0 and wide[3]["cache_evictions"]["keypoints"] == 0
    capped = select_references(images, faces, identities, replace(cfg, max_candidates_per_person=2))
    per_target_person = {}
    for r in capped[2]:
        per_target_person.setdefault((r["target_uid"], r["target_face_index"]), []).append(r)
    assert max(len(v) for v in per_target_person.values()) <= 2
    assert capped[3]["candidates_removed_by"]["not_examined_over_cap"] > 0
    lru = LRU(2)
    lru["a"], lru["b"] = 1, 2
    _ = lru["a"]
    lru["c"] = 3
    assert list(lru) == ["a", "c"] and lru.evictions == 1
    assert lru.get("a") == 1 and lru.get("zz") is None  # .get is a use too
    lru["d"] = 4
    assert list(lru) == ["a", "d"] and lru.evictions == 2


def test_targets_with_some_people_unreferenced(tmp_path):
    """By default a target needs one referenced person; the others stay with no reference."""
    images, faces, identities = _synthetic_tables(tmp_path)
    strict = select_references(images, faces, identities, MultiIDConfig(eval_fraction=0.3, require_all_refs=True))
    loose = select_references(images, faces, identities, MultiIDConfig(eval_fraction=0.3))
    assert len(loose[0]) >= len(strict[0])
    for s in loose[0]:
        assert s["num_persons_with_reference"] >= 1
        assert s["num_persons_with_reference"] == sum(1 for f in s["faces"] if f["refs"])
    assert sum(loose[3]["targets"].values()) == loose[3]["images"]


def test_a_photo_replaced_after_ingestion_is_skipped_with_its_reason(tmp_path):
    """The same number of bytes, another photo: only the uid check tells; the builder counts it as
    unreadable (with PhotoChanged) and goes on, as the expression writer does."""
    from pipeline.ingest import PhotoChanged
    from pipeline.multiid import reader_from_images

    images, faces, identities = _synthetic_tables(tmp_path, n_ids=8, n_images=20)
    row = images.slice(1, 1).to_pylist()[0]  # an odd one: random pixels
    path = Path(row["path"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the IEND chunk's CRC, which decoders do not check: same length, still decodes
    path.write_bytes(bytes(data))
    with pytest.raises(PhotoChanged):
        reader_from_images(images)(row["uid"])
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False)
    *_, stats = select_references(images, faces, identities, cfg)
    assert "PhotoChanged" in stats["unreadable"].get(row["uid"], ""), stats["unreadable"]


def test_merged_rows_write_the_same_file_whatever_their_pieces(tmp_path):
    """The same rows reaching the Parquet writer in other pieces (a refresh's reused rows beside new ones, a
    parallel build's chunks) write the same bytes: the writer's fallback from dictionary to plain encoding
    depends on where its input's chunks end (seen at 10k faces: a refresh's candidates.parquet and a fresh
    build's, same rows, other bytes). Enough distinct floats to pass the dictionary page limit."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    from pipeline.multiid.rows import _merge_in_target_order
    from pipeline.storage import write_parquet_stream_atomic

    n = 400_000
    rng = np.random.default_rng(0)
    schema = pa.schema([("target_uid", pa.string()), ("score", pa.float32())])
    table = pa.table({"target_uid": [f"t{i // 50:06d}" for i in range(n)],
                      "score": rng.random(n, dtype=np.float32)}, schema=schema)

    def pieces(seed):
        r, at = np.random.default_rng(seed), 0
        while at < n:
            k = int(r.integers(1, 3000))
            yield table.slice(at, k)
            at += k

    digests = set()
    for seed in (1, 2):
        path = tmp_path / f"{seed}.parquet"
        write_parquet_stream_atomic(_merge_in_target_order([pieces(seed)], schema), schema, path)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_a_few_targets_rows_are_read_from_the_row_groups_that_hold_them(tmp_path):
    """A refresh reads a bucket's few changed targets' rows from the previous version's whole table: only the
    row groups whose target_uid range holds one of them are read, and the rows are those of filtering the whole
    table (targets present, absent, at a group's edge, all of them, none)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.multiid.rows import _merge_in_target_order, _part_batches, _row_groups_holding
    from pipeline.storage import write_parquet_stream_atomic

    n = 200_000
    rng = np.random.default_rng(3)
    schema = pa.schema([("target_uid", pa.string()), ("score", pa.float32())])
    per = rng.integers(1, 40, size=20_000)
    uids = np.repeat([f"t{i:06d}" for i in range(len(per))], per)[:n]
    table = pa.table({"target_uid": uids, "score": rng.random(len(uids), dtype=np.float32)}, schema=schema)
    path = tmp_path / "candidates.parquet"
    write_parquet_stream_atomic(_merge_in_target_order([iter([table])], schema), schema, path, row_group=30_000)
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups >= 3
    first_of_group2 = pq.ParquetFile(path).read_row_group(2).column("target_uid")[0].as_py()
    every = sorted(set(uids.tolist()))
    for want in (["t000005", "t019000"], [first_of_group2], ["t000005", "absent", "t010000"], every, ["zz-absent"], []):
        got = list(_part_batches(path, schema, pa.array(want, pa.string())))
        rows = pa.concat_tables(got) if got else table.slice(0, 0)
        expect = table.filter(pc.is_in(table.column("target_uid"), pa.array(want, pa.string())))
        assert rows.equals(expect), want
    groups = _row_groups_holding(f, ["t000005", "t019000"])
    assert groups is not None and 1 <= len(groups) <= 2 < f.metadata.num_row_groups
    assert _row_groups_holding(f, every) is None  # every group: no list


def test_a_photos_member_extension_is_the_format_pillow_reads():
    """rows._image_ext tells JPEG and PNG by their signatures and leaves the rest to Pillow: the extension
    must be Pillow's for every format, a multi-frame MPO (a JPEG that Pillow reads as MPO) included."""
    import io

    from PIL import Image

    from pipeline.multiid.rows import PIL_EXT, _image_ext

    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    cases = []
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        b = io.BytesIO()
        frames[0].save(b, format=fmt)
        cases.append(b.getvalue())
    b = io.BytesIO()
    frames[0].save(b, format="MPO", save_all=True, append_images=frames[1:])
    cases.append(b.getvalue())
    for data in cases:
        with Image.open(io.BytesIO(data)) as im:
            assert _image_ext(data) == PIL_EXT.get(im.format or "", "img")
    with Image.open(io.BytesIO(cases[-1])) as im:
        assert im.format == "MPO"  # the case the signature alone would get wrong


def test_taken_rows_write_previous_and_new_rows_in_their_order(monkeypatch):
    """rows._TakenRows: rows given as indices into two previous tables (runs of consecutive rows and single
    ones, the tables alternating) and as new dicts come out in the order given, whatever the batch size."""
    import pyarrow as pa

    from pipeline.multiid import rows as mrows

    schema = pa.schema([("k", pa.string()), ("v", pa.int32())])
    tables = [pa.Table.from_pylist([{"k": f"{t}{i}", "v": i} for i in range(50)], schema=schema) for t in "ab"]
    rng = np.random.default_rng(5)
    for batch in (7, 1_000):
        monkeypatch.setattr(mrows, "CANDIDATE_BATCH", batch)
        out: list[pa.Table] = []
        taken = mrows._TakenRows(schema, out.append)
        want = []
        for _ in range(40):
            t = int(rng.integers(2))
            start = int(rng.integers(45))
            rows = []
            for j in range(int(rng.integers(1, 6))):
                if rng.random() < 0.3:
                    rows.append({"k": f"new{len(want)}", "v": -1})
                else:
                    rows.append(start + j if rng.random() < 0.8 else int(rng.integers(50)))
            taken.add(tables[t], rows)
            want += [r if isinstance(r, dict) else tables[t].slice(r, 1).to_pylist()[0] for r in rows]
        taken.flush()
        assert pa.concat_tables(out).to_pylist() == want
        assert all(o.num_rows >= batch for o in out[:-1])
