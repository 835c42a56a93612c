"""Shard reuse across versions: a new version re-selects only the buckets a change touches, hard-links
the other buckets' shards from the previous version, and writes the same bytes as a build from scratch."""

import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # pa.parquet
import pytest
from PIL import Image

from pipeline.config import Layout
from pipeline.datasets import release, reusable_version
from pipeline.faces import faces_schema
from pipeline.faces.folders import IDENTITIES_SCHEMA
from pipeline.ingest import IMAGES_SCHEMA
from pipeline.multiid import MultiIDConfig, build_multiid_dataset
from pipeline.multiid.plan import bucket_of
from pipeline.multiid.release import multiid_version
from pipeline.multiid.release import release_checks as multiid_checks

CFG = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False)


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _groups(n: int) -> list[str]:
    """Group names whose components (smallest identity id "<group>-a") land in distinct buckets."""
    out, used, k = [], set(), 0
    while len(out) < n:
        b = bucket_of(f"g{k}-a", CFG.reuse_buckets)
        if b not in used:
            used.add(b)
            out.append(f"g{k}")
        k += 1
    return out


def _photo(tmp: Path, uid: str, rng) -> dict:
    small = rng.integers(0, 255, (24, 48, 3), dtype=np.uint8)  # distinct blocks: distinct pHashes, small PNGs
    p = tmp / f"{uid}.png"
    Image.fromarray(small).resize((480, 240), Image.NEAREST).save(p)
    return {"uid": uid, "source": "syn", "path": str(p), "offset": 0, "length": p.stat().st_size, "width": 480, "height": 240}


def _face(uid, fi, name, base, rng) -> tuple[dict, dict]:
    e = _unit(base[name] + 0.18 * _unit(rng.normal(size=128)))
    x = 240 * fi + 40
    lm = [x + 40, 100, x + 60, 100, x + 100, 100, x + 120, 100, x + 80, 140]
    face = {"uid": uid, "source": "syn", "face_index": fi, "x1": x, "y1": 50, "x2": x + 160, "y2": 230, "landmarks": lm,
            "det_score": 2.0, "face_width": 160, "face_height": 180, "blur": 300.0, "yaw": float(rng.normal(0, 15)),
            "pitch": float(rng.normal(0, 10)), "roll": 0.0, "embedding": e.astype(np.float32).tolist(),
            "backend": "dlib", "model_version": "syn"}
    return face, {"uid": uid, "face_index": fi, "identity_id": name}


def _collection(tmp: Path, groups: list[str], photos_per_group: int = 6, extra: list[tuple[str, list[str]]] = ()):
    """Disjoint groups of three people (each group one co-occurrence component); ``extra``: more photos
    as (uid, [identity ids])."""
    rng = np.random.default_rng(0)
    names = [f"{g}-{c}" for g in groups for c in "abc"]
    base = {n: _unit(rng.normal(size=128)) for n in names}
    imgs, faces, ids = [], [], []
    for g in groups:
        people = [f"{g}-{c}" for c in "abc"]
        for k in range(photos_per_group):
            uid = f"{g}-p{k:02d}"
            imgs.append(_photo(tmp, uid, rng))
            who = [people[k % 3]] if k < 3 else [people[k % 3], people[(k + 1) % 3]]
            for fi, name in enumerate(who):
                f, i = _face(uid, fi, name, base, rng)
                faces.append(f)
                ids.append(i)
    for uid, who in extra:
        imgs.append(_photo(tmp, uid, np.random.default_rng(len(uid) + 7)))
        for fi, name in enumerate(who):
            f, i = _face(uid, fi, name, base, np.random.default_rng(fi + 11))
            faces.append(f)
            ids.append(i)
    return (pa.Table.from_pylist(imgs, schema=IMAGES_SCHEMA), pa.Table.from_pylist(faces, schema=faces_schema(128)),
            pa.Table.from_pylist(ids, schema=IDENTITIES_SCHEMA))


def _release_multiid(layout: Layout, images, faces, ids, cfg=CFG, workers=1):
    """What the multiid asset does: the content id, a build that reuses the latest version, the checks."""
    version, _ = multiid_version(images, faces, ids, cfg)
    previous = reusable_version(layout, "multiid")

    def build(folder):
        return build_multiid_dataset(images, faces, ids, folder, cfg, version=version, reuse_from=previous, workers=workers)

    def checks(folder, res):
        return multiid_checks(folder, faces, ids, res.pairs)

    rel = release(layout, "multiid", version, build, checks)
    assert rel.published and rel.passed, rel.problems
    return rel


def _files(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of a version."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bucket_shards(folder: Path) -> dict[str, list[str]]:
    rec = json.loads((folder / "buckets.json").read_text())["buckets"]
    return {b: [f"{s}/{sh['name']}" for s, shards in sorted(r["shards"].items()) for sh in shards] for b, r in rec.items()}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reuse")
    groups = _groups(5)
    a_tables = _collection(tmp, groups)
    layout = Layout(tmp / "home")
    a = _release_multiid(layout, *a_tables)
    touched = groups[2]
    b_tables = _collection(tmp, groups, extra=[("zz-new", [f"{touched}-b"])])
    b = _release_multiid(layout, *b_tables)
    return tmp, groups, touched, a_tables, b_tables, a, b


def test_a_new_photo_rebuilds_only_its_bucket(two_versions):
    _, groups, touched, _, _, a, b = two_versions
    assert a.result.stats["buckets_rebuilt"] == len(groups) and a.result.stats["buckets_reused"] == 0
    assert "eval_fallback" not in b.result.stats  # the fallback would select one bucket twice
    assert a.result.stats["per_split"].get("eval") and a.result.stats["per_split"].get("train")
    # only the touched bucket ran the selection; the others were taken from version A
    assert b.result.stats["selections_run"] == 1
    assert b.result.stats["buckets_rebuilt"] == 1 and b.result.stats["buckets_reused"] == len(groups) - 1
    assert b.result.stats["bytes_reused"] > 0 and b.result.stats["buckets_not_reused_corrupt"] == []
    hot = f"b{bucket_of(f'{touched}-a', CFG.reuse_buckets):04d}"
    in_a, in_b = _bucket_shards(a.folder), _bucket_shards(b.folder)
    assert set(in_a) == set(in_b) == {f"b{bucket_of(f'{g}-a', CFG.reuse_buckets):04d}" for g in groups}
    for name, files in in_b.items():
        assert files, name
        for rel in files:
            same = (a.folder / rel).exists() and os.stat(a.folder / rel).st_ino == os.stat(b.folder / rel).st_ino
            assert same == (name != hot), (name, rel)
            if name != hot:
                assert os.stat(b.folder / rel).st_nlink == 2
    # the touched bucket changed: it holds the new photo's sample or reference
    changed = {rel for rel in in_b[hot] if not (a.folder / rel).exists()
               or _files(a.folder).get(rel) != _files(b.folder).get(rel)}
    assert changed
    pairs = b.result.pairs.to_pylist()
    assert any("zz-new" in (r["target_uid"], r["ref_uid"]) for r in pairs)
    # the stats of the card sum reused and rebuilt buckets
    assert sum(b.result.stats["targets"].values()) == b.result.stats["images"] == a.result.stats["images"] + 1


# how a build went (reuse, caches): the only stats in which a refresh differs from a fresh build
RUN_KEYS = ("buckets_reused", "buckets_rebuilt", "bytes_reused", "selections_run", "targets_reused", "targets_reselected",
            "targets_reused_over_cap_updated", "targets_derived", "not_derived_because",
            "reselect_reasons", "bytes_copied", "bytes_written", "cache_evictions", "candidates_screened_from_previous",
            "candidate_rows_changed_by_walk")


def _compare(folder_a: Path, folder_b: Path) -> list[str]:
    fa, fb = _files(folder_a), _files(folder_b)
    return [f"{k}: {fa.get(k)} != {fb.get(k)}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def test_reused_version_is_byte_identical_to_a_fresh_build(two_versions):
    tmp, _, _, _, b_tables, _, b = two_versions
    fresh = _release_multiid(Layout(tmp / "fresh-home"), *b_tables)
    assert fresh.version == b.version and fresh.result.stats["buckets_reused"] == 0
    assert _compare(b.folder, fresh.folder) == []
    assert b.result.stats == {**fresh.result.stats, **{k: b.result.stats[k] for k in RUN_KEYS}}


def test_the_comparison_fails_when_a_fingerprint_misses_an_input(two_versions, monkeypatch):
    """The byte comparison can fail: a fingerprint blind to embeddings reuses a bucket whose faces changed."""
    from pipeline.multiid import plan

    tmp, groups, _, _, b_tables, _, _ = two_versions
    images, faces, ids = b_tables
    real = plan.fingerprint_table
    monkeypatch.setattr(plan, "fingerprint_table", lambda t, cols, by, **kw: real(t, [c for c in cols if c != "embedding"], by, **kw))
    layout = Layout(tmp / "blind-home")
    _release_multiid(layout, *b_tables)
    # another group's faces get new embeddings (its people now look like one person)
    other = groups[0]
    emb = faces.column("embedding").to_pylist()
    mine = [i for i, u in enumerate(faces.column("uid").to_pylist()) if u.startswith(f"{other}-")]
    for i in mine:
        emb[i] = emb[mine[0]]
    changed = faces.set_column(faces.column_names.index("embedding"), "embedding", pa.array(emb, faces.schema.field("embedding").type))
    blind = _release_multiid(layout, images, changed, ids)
    monkeypatch.setattr(plan, "fingerprint_table", real)
    fresh = _release_multiid(Layout(tmp / "fresh-home-2"), images, changed, ids)
    assert blind.version == fresh.version and blind.result.stats["buckets_reused"] == len(groups)
    assert _compare(blind.folder, fresh.folder)  # the wrongly reused bucket shows


def test_a_corrupted_previous_shard_is_rebuilt_not_linked(tmp_path):
    groups = _groups(3)
    layout = Layout(tmp_path / "home")
    a = _release_multiid(layout, *_collection(tmp_path, groups))
    victim_bucket, files = min(_bucket_shards(a.folder).items())
    victim = a.folder / files[0]
    data = bytearray(victim.read_bytes())
    data[-2000] ^= 0xFF  # one flipped byte inside the last member, same size
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))
    b_tables = _collection(tmp_path, groups, extra=[("zz-new", [f"{groups[1]}-a"])])
    b = _release_multiid(layout, *b_tables)
    assert any(x.startswith(victim_bucket) for x in b.result.stats["buckets_not_reused_corrupt"])
    assert os.stat(b.folder / files[0]).st_ino != os.stat(victim).st_ino
    fresh = _release_multiid(Layout(tmp_path / "fresh"), *b_tables)
    assert _compare(b.folder, fresh.folder) == []


# ---- expression pairs ---------------------------------------------------------------------------


def _expression_tables(extra: int = 0, moved: str | None = None):
    """Faces of distinct people with two expressions (and ``extra`` surprised faces), descriptors, boxes."""
    from pipeline.expression import EMOTIONS

    rng = np.random.default_rng(3)
    rows = [(f"p{i:02d}", ("happy", "neutral")[i % 2]) for i in range(40)] + [(f"s{i:02d}", "surprise") for i in range(extra)]
    geo = {"happy": [0.2, 1.1, 0.09, 0.3, 0.18], "neutral": [0.02, 0.85, 0.15, 0.3, 0.02], "surprise": [0.5, 0.9, 0.3, 0.4, 0.0]}
    probs, embs, geos, yaws = [], [], [], []
    for _uid, expr in rows:
        v = np.full(7, 0.1 / 6, np.float32)
        v[EMOTIONS.index(expr)] = 0.9
        probs.append(v.tolist())
        embs.append(_unit(rng.normal(size=32)).astype(np.float32).tolist())
        geos.append((np.asarray(geo[expr]) + rng.normal(0, 0.01, 5)).tolist())
        yaws.append(float(rng.normal(0, 5)))
    uids = [r[0] for r in rows]
    faces = pa.table({
        "uid": uids, "face_index": pa.array([0] * len(rows), pa.int32()), "identity_id": [f"id-{u}" for u in uids],
        "embedding": embs, "face_width": [150.0] * len(rows), "face_height": [160.0] * len(rows), "blur": [300.0] * len(rows),
        "det_score": [1.5] * len(rows), "yaw": yaws, "pitch": [0.0] * len(rows),
        "backend": ["dlib"] * len(rows), "model_version": ["syn"] * len(rows),
    })
    desc = pa.table({"uid": uids, "face_index": pa.array([0] * len(rows), pa.int32()), "probs": probs, "geometry": geos})
    boxes = {(u, 0): [10.0, 10.0, 60.0, 70.0] for u in uids}
    if moved:
        boxes[(moved, 0)] = [12.0, 10.0, 62.0, 70.0]
    for i, c in enumerate(("x1", "y1", "x2", "y2")):  # in the faces table too: the version id covers them
        faces = faces.append_column(c, pa.array([boxes[(u, 0)][i] for u in uids], pa.float32()))
    return faces, desc, boxes


def _release_expression(layout: Layout, faces, desc, boxes, crop_log: list | None = None):
    from pipeline.expression import PairConfig, build_expression_pairs, write_expression_dataset
    from pipeline.expression.release import expression_version
    from pipeline.expression.release import release_checks as expression_checks

    cfg = PairConfig(max_identity_cos=0.5)
    ids = faces.select(["uid", "face_index", "identity_id"])
    version, _ = expression_version(faces, desc, ids, cfg)
    previous = reusable_version(layout, "expression")
    report: dict = {}

    def crop(uid, fi):
        if crop_log is not None:
            crop_log.append((uid, fi))
        x1, y1, x2, y2 = (int(v) for v in boxes[(uid, fi)])
        seed = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:4], "big")
        img = np.random.default_rng(seed).integers(0, 255, (80, 80, 3), dtype=np.uint8)
        return img[y1:y2, x1:x2]

    def build(folder):
        res = build_expression_pairs(faces, desc, cfg)
        write_expression_dataset(res.pairs, crop, folder, cfg, res.stats, version=version,
                                 crop_inputs=lambda u, f: [u, boxes[(u, f)]], reuse_from=previous, report=report)
        return res

    rel = release(layout, "expression", version, build, lambda folder, res: expression_checks(folder, ids, res.pairs))
    assert rel.published and rel.passed, rel.problems
    return rel, report


def _expression_buckets(folder: Path) -> dict[str, list[str]]:
    rec = json.loads((folder / "buckets.json").read_text())["buckets"]
    return {b: [sh["name"] for sh in r["shards"]] for b, r in rec.items()}


def test_expression_shards_of_unchanged_buckets_are_reused(tmp_path):
    from pipeline.expression.pairs import pair_bucket

    layout = Layout(tmp_path / "home")
    a, ra = _release_expression(layout, *_expression_tables())
    assert ra["buckets_reused"] == 0 and ra["buckets_rebuilt"] == len(_expression_buckets(a.folder)) > 5
    # two surprised faces: one new pair, in one bucket; every other pair and its crops are as before
    b_tables = _expression_tables(extra=2)
    b, rb = _release_expression(layout, *b_tables)
    new = set(b.result.pairs.column("pair_id").to_pylist()) - set(a.result.pairs.column("pair_id").to_pylist())
    assert len(new) == 1
    hot = f"b{pair_bucket(new.pop(), 64):04d}"
    assert rb["buckets_rebuilt"] == 1 and rb["buckets_reused"] == len(_expression_buckets(b.folder)) - 1
    assert rb["bytes_reused"] > 0 and rb["buckets_not_reused_corrupt"] == []
    for bucket, names in _expression_buckets(b.folder).items():
        for n in names:
            same = (a.folder / n).exists() and os.stat(a.folder / n).st_ino == os.stat(b.folder / n).st_ino
            assert same == (bucket != hot), (bucket, n)
    fresh, rf = _release_expression(Layout(tmp_path / "fresh"), *b_tables)
    assert rf["buckets_reused"] == 0 and fresh.version == b.version
    assert _compare(b.folder, fresh.folder) == []
    # a crop input changes (one face's box): the buckets of that face's pairs are cropped again, only them
    c_tables = _expression_tables(extra=2, moved="p04")
    c, rc = _release_expression(layout, *c_tables)
    rows = c.result.pairs.to_pylist()
    touched = {f"b{pair_bucket(r['pair_id'], 64):04d}" for r in rows if "p04" in (r["uid_a"], r["uid_b"])}
    assert touched and rc["buckets_rebuilt"] == len(touched)
    assert _compare(c.folder, _release_expression(Layout(tmp_path / "fresh-c"), *c_tables)[0].folder) == []


def test_expression_corrupted_previous_shard_is_rebuilt(tmp_path):
    layout = Layout(tmp_path / "home")
    a, _ = _release_expression(layout, *_expression_tables())
    bucket, names = min(_expression_buckets(a.folder).items())
    victim = a.folder / names[0]
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.write_bytes(bytes(data))
    b_tables = _expression_tables(extra=2)
    b, rb = _release_expression(layout, *b_tables)
    assert any(x.startswith(bucket) for x in rb["buckets_not_reused_corrupt"])
    assert os.stat(b.folder / names[0]).st_ino != os.stat(victim).st_ino
    assert _compare(b.folder, _release_expression(Layout(tmp_path / "fresh"), *b_tables)[0].folder) == []


def test_expression_changed_bucket_copies_the_crops_of_its_unchanged_pairs(tmp_path):
    """A bucket that changed is written again, but only its changed pairs are cropped: the others' crops are
    copied from the previous tars (counted by the crop function itself, not by the writer's report), and the
    version is still byte-identical to a fresh build. A damaged previous shard lends nothing."""
    from pipeline.expression.pairs import pair_bucket

    layout = Layout(tmp_path / "home")
    _release_expression(layout, *_expression_tables(extra=2))  # the previous version the refresh copies from
    c_tables = _expression_tables(extra=2, moved="p04")  # one face's box moves: its pairs change
    log: list = []
    c, rc = _release_expression(layout, *c_tables, crop_log=log)
    rows = c.result.pairs.to_pylist()
    moved = [r for r in rows if "p04" in (r["uid_a"], r["uid_b"])]
    touched = {pair_bucket(r["pair_id"], 64) for r in moved}
    in_touched = [r for r in rows if pair_bucket(r["pair_id"], 64) in touched]
    assert len(in_touched) > len(moved) > 0  # the touched buckets hold unchanged pairs too
    assert len(log) == 2 * len(moved)  # two crops per changed pair, none for the copied ones
    assert rc["pairs_cropped"] == len(moved) and rc["pairs_copied"] == len(in_touched) - len(moved)
    assert _compare(c.folder, _release_expression(Layout(tmp_path / "fresh"), *c_tables)[0].folder) == []
    # the same refresh over a previous version whose touched bucket's tar is damaged: everything in it is cropped
    layout2 = Layout(tmp_path / "home2")
    a2, _ = _release_expression(layout2, *_expression_tables(extra=2))
    rec = json.loads((a2.folder / "buckets.json").read_text())["buckets"]
    # the touched bucket with the most unchanged pairs (they would be copied from an intact tar)
    hot = max(sorted(touched), key=lambda b: sum(1 for r in in_touched if pair_bucket(r["pair_id"], 64) == b and r not in moved))
    victim = a2.folder / rec[f"b{hot:04d}"]["shards"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.write_bytes(bytes(data))
    log2: list = []
    c2, rc2 = _release_expression(layout2, *c_tables, crop_log=log2)
    n_victim = sum(1 for r in rows if pair_bucket(r["pair_id"], 64) == hot)
    n_moved_victim = sum(1 for r in moved if pair_bucket(r["pair_id"], 64) == hot)
    assert n_victim > n_moved_victim
    assert len(log2) == 2 * (len(moved) + n_victim - n_moved_victim)
    assert any(x.startswith(f"b{hot:04d}") for x in rc2["buckets_not_reused_corrupt"]), rc2
    assert _compare(c2.folder, c.folder) == []


@pytest.mark.parametrize("workers", [1, 2])  # 2: records made by the workers, the tables written beside the tars
def test_eval_fallback_with_reuse_matches_a_fresh_build(tmp_path, workers):
    """When the hash leaves eval empty, one component moves to eval (global decision): with reuse the
    version is still byte-identical to a fresh build, and the moved component's bucket is re-selected."""
    from dataclasses import replace

    from pipeline.multiid.splits import identity_split

    cfg = replace(CFG, eval_fraction=0.02)
    groups = _groups(4)
    assert all(identity_split(f"{g}-{c}", 0.02, cfg.split_salt) == "train" for g in groups for c in "abc")
    layout = Layout(tmp_path / "home")
    a = _release_multiid(layout, *_collection(tmp_path, groups), cfg=cfg, workers=workers)
    moved = a.result.stats["eval_fallback"]
    assert moved and a.result.stats["per_split"].get("eval")
    untouched = next(g for g in groups if f"{g}-a" not in moved)
    b_tables = _collection(tmp_path, groups, extra=[("zz-new", [f"{untouched}-b"])])
    b = _release_multiid(layout, *b_tables, cfg=cfg, workers=workers)
    assert b.result.stats["eval_fallback"] == moved
    # the touched bucket, the moved bucket without its override (to decide that the fallback applies)
    # and with it (taken from version A: same fingerprint, override included)
    assert b.result.stats["selections_run"] == 2 and b.result.stats["buckets_reused"] == len(groups) - 1
    fresh = _release_multiid(Layout(tmp_path / "fresh"), *b_tables, cfg=cfg)
    assert fresh.version == b.version and _compare(b.folder, fresh.folder) == []


# ---- per-target reuse: one bucket (components joined by co-occurrence), scattered changes ----------------


def _joined(tmp: Path, groups: list[str], extra=(), drop=(), cfg=CFG):
    """The groups chained into one co-occurrence component by bridge photos (one bucket, as at scale);
    ``extra`` photos added, ``drop`` photos removed."""
    bridges = [(f"br-{a}-{b}", [f"{a}-a", f"{b}-b"]) for a, b in itertools.pairwise(groups)]
    images, faces, ids = _collection(tmp, groups, extra=[*bridges, *extra])
    keep = [u not in drop for u in images.column("uid").to_pylist()]
    return (images.filter(pa.array(keep)), faces.filter(pa.array([u not in drop for u in faces.column("uid").to_pylist()])),
            ids.filter(pa.array([u not in drop for u in ids.column("uid").to_pylist()])))


def _spy_select(monkeypatch) -> list[set]:
    """The targets each call of _select ran over (every photo of its bucket when it was not told)."""
    from pipeline.multiid import selection

    calls, real = [], selection._select

    def spy(img_meta, *a, **k):
        calls.append(set(img_meta) if k.get("targets") is None else set(k["targets"]))
        return real(img_meta, *a, **k)

    monkeypatch.setattr(selection, "_select", spy)
    return calls


def _reached(rel) -> set[str]:
    """The targets that reached their candidates in a build (read off its candidates table): a target
    dropped before them (people in both splits, ...) depends only on its own photo and splits."""
    from pipeline.storage import read_parquet

    # from the released folder: the result reads its tables lazily from the staging folder, gone by now
    return set(read_parquet(rel.folder / "candidates.parquet", columns=["target_uid"]).column("target_uid").to_pylist())


def _photos_of(tables, people: set[str]) -> set[str]:
    _, _, ids = tables
    return {u for u, i in zip(ids.column("uid").to_pylist(), ids.column("identity_id").to_pylist()) if i in people}


def test_a_scattered_refresh_selects_only_the_targets_whose_people_changed(tmp_path, monkeypatch):
    groups = _groups(4)
    layout = Layout(tmp_path / "home")
    a_tables = _joined(tmp_path, groups)
    a = _release_multiid(layout, *a_tables)
    assert len(_bucket_shards(a.folder)) == 1  # one component, one bucket: bucket reuse alone rebuilds it all
    # new photos of two people in different groups, one photo of a third person removed
    gained, lost = {f"{groups[0]}-b", f"{groups[3]}-c"}, f"{groups[1]}-a"
    removed = min(u for u in _photos_of(a_tables, {lost}) if not u.startswith("br-"))  # not a bridge
    b_tables = _joined(tmp_path, groups, extra=[("zz-n1", [f"{groups[0]}-b"]), ("zz-n2", [f"{groups[3]}-c"])], drop={removed})
    calls = _spy_select(monkeypatch)
    b = _release_multiid(layout, *b_tables)
    # the targets selected again: the photos of the people who gained or lost a face (read off the tables)
    new = {"zz-n1", "zz-n2"}
    expected = (_photos_of(b_tables, gained | {lost}) & _reached(a)) | new
    assert expected - new and _photos_of(b_tables, gained | {lost}) - _reached(a) - new  # both kinds occur
    assert len(_bucket_shards(b.folder)) == 1
    assert len(calls) == 1 and calls[0] == expected
    n = b_tables[0].num_rows
    st = b.result.stats
    assert st["targets_reselected"] == len(expected) < n / 2 and st["targets_reused"] == n - len(expected)
    assert st["reselect_reasons"] == {"new_photo": 2, "candidates_changed": len(expected) - 2}
    assert st["bytes_copied"] > 0 and st["bytes_written"] > 0 and st["buckets_reused"] == 0
    # the refreshed version is the fresh build's, byte for byte (shards, manifests, tables, targets.parquet)
    monkeypatch.undo()
    fresh = _release_multiid(Layout(tmp_path / "fresh"), *b_tables)
    assert fresh.version == b.version and fresh.result.stats["targets_reused"] == 0
    assert _compare(b.folder, fresh.folder) == []
    assert b.result.stats == {**fresh.result.stats, **{k: b.result.stats[k] for k in RUN_KEYS}}
    # an unchanged collection takes the whole bucket (its files hard-linked), every target with it
    again = build_multiid_dataset(*b_tables, tmp_path / "again", CFG, version=b.version, reuse_from=b.folder)
    assert again.stats["buckets_reused"] == 1 and again.stats["selections_run"] == 0
    assert again.stats["targets_reused"] == n and again.stats["targets_reselected"] == 0
    # a bare build writes no viewer page (release() does, after the card): the data files are compared
    assert [d for d in _compare(b.folder, tmp_path / "again") if not d.startswith("viewer.html:")] == []


@pytest.mark.parametrize("verdict", ["before_use", "after_use"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_previous_tar_member_rebuilds_its_targets(tmp_path, monkeypatch, workers, verdict):
    """The previous shards are checked on a thread beside the selection (PreviousTargets.check_beside), taken
    for intact until their check is done. ``before_use``: the check ends before any target asks; ``after_use``:
    it ends only when the selection is over, so the selection took the damaged shard for intact and must be
    made again (stats["selections_voided_by_damaged_shards"]). With 2 workers the derivation and the selection run
    in forked workers, where the spy cannot count: the reasons and the bytes must agree either way."""
    import threading
    from dataclasses import replace

    from pipeline.multiid.reuse import PreviousTargets

    real_check_beside, real_problems, real_settle = PreviousTargets.check_beside, PreviousTargets._problems, PreviousTargets.settle
    gate = threading.Event()

    def check_beside(self, shards):
        real_check_beside(self, shards)
        if verdict == "before_use" and self._checker is not None:
            self._checker.join()

    def problems(self, shard):
        if threading.current_thread().name == "previous-shard-check" and verdict == "after_use":
            assert gate.wait(60)
        return real_problems(self, shard)

    def settle(self, *a, **k):
        gate.set()
        return real_settle(self, *a, **k)

    cfg = replace(CFG, shard_max_count=4)  # several shards per split: damage hits some targets, not all
    groups = _groups(3)
    layout = Layout(tmp_path / "home")
    a = _release_multiid(layout, *_joined(tmp_path, groups), cfg=cfg)
    ((_, files),) = _bucket_shards(a.folder).items()
    assert len(files) >= 3
    victim = a.folder / files[1]
    from pipeline.shards import shard_keys

    with_keys = set(shard_keys(victim))
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # a byte of the first member's data, same size
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))
    b_tables = _joined(tmp_path, groups, extra=[("zz-n1", [f"{groups[2]}-c"])], cfg=cfg)
    calls = _spy_select(monkeypatch)
    monkeypatch.setattr(PreviousTargets, "check_beside", check_beside)
    monkeypatch.setattr(PreviousTargets, "_problems", problems)
    monkeypatch.setattr(PreviousTargets, "settle", settle)
    b = _release_multiid(layout, *b_tables, cfg=cfg, workers=workers)
    from pipeline.ids import stable_key

    damaged = {u for u in b_tables[0].column("uid").to_pylist() if stable_key("multiid", u) in with_keys}
    changed = (_photos_of(b_tables, {f"{groups[2]}-c"}) & _reached(a)) | {"zz-n1"}
    assert damaged
    st = b.result.stats
    assert st["selections_voided_by_damaged_shards"] == (verdict == "after_use")
    if workers == 1:
        # voided: the first selection took the damaged shard's targets for intact (only the changed ones ran)
        assert calls == [changed] * (verdict == "after_use") + [damaged | changed]
    assert st["targets_reselected"] == len(damaged | changed)
    assert st["reselect_reasons"]["previous_shard_damaged"] == len(damaged - changed)
    assert any(files[1] in x for x in st["buckets_not_reused_corrupt"])
    monkeypatch.undo()
    fresh = _release_multiid(Layout(tmp_path / "fresh"), *b_tables, cfg=cfg)
    assert _compare(b.folder, fresh.folder) == []


def test_one_ulp_in_an_embedding_reselects_that_identitys_targets(tmp_path, monkeypatch):
    """The per-target fingerprint reads the embedding bytes: one ulp in one face's embedding reselects the
    targets of that face's identity, and only them; a digest blind to embeddings reselects none."""
    from pipeline.multiid import plan

    groups = _groups(3)
    layout = Layout(tmp_path / "home")
    a_tables = _joined(tmp_path, groups)
    a = _release_multiid(layout, *a_tables)
    images, faces, ids = a_tables
    who = f"{groups[1]}-c"
    mine = {(x, y) for x, y, z in zip(*(ids.column(c).to_pylist() for c in ("uid", "face_index", "identity_id"))) if z == who}
    i = next(k for k, uf in enumerate(zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist())) if uf in mine)
    emb = faces.column("embedding").to_pylist()
    e = np.asarray(emb[i], np.float32)
    e[5] = np.nextafter(e[5], np.float32(np.inf))
    emb[i] = e.tolist()
    faces2 = faces.set_column(faces.column_names.index("embedding"), "embedding", pa.array(emb, faces.schema.field("embedding").type))
    calls = _spy_select(monkeypatch)
    b = _release_multiid(layout, images, faces2, ids)
    changed_photo = faces.column("uid")[i].as_py()
    assert calls == [(_photos_of(a_tables, {who}) & _reached(a)) | {changed_photo}]
    assert b.result.stats["reselect_reasons"] == {"photo_changed": 1, "candidates_changed": len(calls[0]) - 1}
    # the same change, with a digest that leaves the embedding out: nothing is selected again
    real = plan.photo_digests
    monkeypatch.setattr(plan, "photo_digests", lambda tables: real([(t, [c for c in cols if c != "embedding"], by) for t, cols, by in tables]))
    blind_home = Layout(tmp_path / "blind")
    _release_multiid(blind_home, *a_tables)
    calls.clear()
    blind = _release_multiid(blind_home, images, faces2, ids)
    assert calls == [] and blind.result.stats["targets_reselected"] == 0


@pytest.mark.parametrize("examine_all", [False, True])
def test_targets_counts_sum_to_what_one_selection_counts(tmp_path, examine_all):
    """The bucket counts a build records are summed from its targets' shares (targets.parquet); they equal
    the counts of one selection over the collection (select_references), an unreadable photo included,
    with the guard's costly checks in rank order (flags over the candidates examined) or on every one."""
    from dataclasses import replace

    from pipeline.multiid.build import select_references

    cfg = replace(CFG, examine_all_candidates=examine_all, refs_per_person=1)  # one ref: some candidates left unexamined
    groups = _groups(3)
    images, faces, ids = _joined(tmp_path, groups, extra=[("zz-bad", [f"{groups[0]}-a", f"{groups[1]}-c"])])
    bad = images.filter(pa.compute.equal(images.column("uid"), "zz-bad")).column("path")[0].as_py()
    Path(bad).write_bytes(b"not an image")
    res = build_multiid_dataset(images, faces, ids, tmp_path / "out", cfg)
    _, _, _, one = select_references(images, faces, ids, cfg)
    assert one["unreadable"] and one["duplicate_flags_independent"]
    # rank order leaves some candidates unexamined (so the flags count fewer than every candidate)
    assert ("not_examined_enough_chosen" in one["candidates_removed_by"]) != examine_all
    for k in ("targets", "persons", "candidates_removed_by", "duplicate_flags_independent", "unreadable",
              "similarity_hist_all_candidates", "similarity_hist_selected"):
        assert res.stats[k] == one[k], k
    t = pa.parquet.read_table(tmp_path / "out" / "targets.parquet")
    assert t.column("target_uid").to_pylist() == sorted(images.column("uid").to_pylist())
    kept = [k for k, o in zip(t.column("key").to_pylist(), t.column("outcome").to_pylist()) if o == "kept"]
    assert sorted(kept) == sorted(res.pairs.column("key").unique().to_pylist())


def test_a_face_outside_the_examined_candidates_reuses_the_target(tmp_path, monkeypatch):
    """Over ``max_candidates_per_person``, a person's new face changes a target's sample only when it enters
    the target's examined subset (the cap lowest hashes of (target, candidate)): the other targets of that
    person are reused, with their over-cap count updated; the version is still a fresh build's."""
    from dataclasses import replace

    from pipeline.ids import stable_key

    cfg = replace(CFG, max_candidates_per_person=2)
    groups = _groups(3)
    who = f"{groups[0]}-a"
    layout = Layout(tmp_path / "home")
    more = [(f"zz-a{k}", [who]) for k in range(6)]  # a person with many photos, most of them targets
    a = _release_multiid(layout, *_joined(tmp_path, groups, extra=more, cfg=cfg), cfg=cfg)
    new = [(f"zz-n{k}", [who]) for k in range(2)]
    b_tables = _joined(tmp_path, groups, extra=more + new, cfg=cfg)
    calls = _spy_select(monkeypatch)
    b = _release_multiid(layout, *b_tables, cfg=cfg)
    # which targets see a new face among their examined candidates, computed here from the hash itself
    _, _, ids = b_tables
    faces_of = [(u, fi) for u, fi, i in zip(*(ids.column(c).to_pylist() for c in ("uid", "face_index", "identity_id"))) if i == who]
    new_uids = {u for u, _ in new}
    entered = set()
    for t in {u for u, _ in faces_of} - new_uids:
        cands = sorted((c for c in faces_of if c[0] != t), key=lambda c: stable_key("multiid-cand", t, c[0], c[1]))
        if any(u in new_uids for u, _ in cands[: cfg.max_candidates_per_person]):
            entered.add(t)
    # a target dropped before its candidates (its people in both splits: no candidate rows) is reused too
    early = {u for u, _ in faces_of} - new_uids - _reached(a)
    entered -= early
    untouched = {u for u, _ in faces_of} - new_uids - entered - early
    assert entered and untouched and early
    # not the early ones; of those the new face entered, the ones whose face pushed out was never walked are
    # derived from their previous rows (reuse.derive_added_candidates), not selected
    st = b.result.stats
    assert len(calls) == 1 and new_uids <= calls[0] <= new_uids | entered
    assert len(entered - calls[0]) == st["targets_derived"] > 0
    assert st["targets_reused_over_cap_updated"] == len(untouched)
    targets = pa.parquet.read_table(b.folder / "targets.parquet").to_pylist()
    # they reached their candidates (whose counts then say how many were left over the cap)
    assert sum(r["target_uid"] in untouched and "candidates_total" in r["counts"] for r in targets) >= 2
    monkeypatch.undo()
    fresh = _release_multiid(Layout(tmp_path / "fresh"), *b_tables, cfg=cfg)
    assert _compare(b.folder, fresh.folder) == []
    assert fresh.result.stats["candidates_removed_by"]["not_examined_over_cap"] == st["candidates_removed_by"]["not_examined_over_cap"] > 0
