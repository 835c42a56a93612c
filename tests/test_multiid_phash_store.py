"""The photos' pHashes kept beside the guard's decisions (guard_cache.PhotoHashes): a refresh decodes, for
pHashes, only the photos whose hashes no build worked out (new photos, photos whose faces moved), and
writes what a fresh build writes, byte for byte."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_multiid_parallel import CFG, _files, small_parallel  # noqa: F401 - a fixture
from test_multiid_refresh_derive import CFG_D, _with_new_face
from test_shard_reuse import _collection, _groups

from pipeline.multiid import build_multiid_dataset, selection
from pipeline.multiid.guard_cache import (
    PhotoHashes,
    kept_photo_uids,
    photo_hashes_path,
    purge_guard_decisions,
)
from pipeline.storage import read_parquet


@pytest.fixture
def decoded(monkeypatch):
    """The photos decoded for their pHashes in this process (_Fingerprints._decode_fingerprints), in order."""
    seen: list[str] = []
    real = selection._Fingerprints._decode_fingerprints

    def spy(self, uid):
        seen.append(uid)
        return real(self, uid)

    monkeypatch.setattr(selection._Fingerprints, "_decode_fingerprints", spy)
    return seen


def _grown(tmp_path, groups):
    # one new photo of two people of the first group
    return _collection(tmp_path, groups, photos_per_group=14, extra=[("zz-new", [f"{groups[0]}-a", f"{groups[0]}-b"])])


def _first(tmp_path, cache):
    """Version 1 of a group of three people (eight photos) built with the guard's file ``cache``, and the
    tables of version 2: a new photo of person a whose face ranks first, so a's targets are selected again."""
    groups = _groups(1)
    first = build_multiid_dataset(*_collection(tmp_path, groups, photos_per_group=8), tmp_path / "v1", CFG_D, version="v1",
                                  guard_cache=cache)
    return first, _with_new_face(tmp_path, groups, f"{groups[0]}-a", "mean")


def test_a_refresh_decodes_only_the_new_photos(tmp_path, decoded):
    cache = tmp_path / "guard.parquet"
    first, grown = _first(tmp_path, cache)
    # every photo decoded for its pHashes (those the selection met) is kept, once
    assert first.stats["photo_hashes_computed"] == len(set(decoded)) == len(decoded) > 0
    assert set(read_parquet(photo_hashes_path(cache)).column("uid").to_pylist()) == set(decoded)
    decoded.clear()
    refresh = build_multiid_dataset(*grown, tmp_path / "v2", CFG_D, version="v2", reuse_from=first.out_dir, guard_cache=cache)
    st = refresh.stats
    # a target of an old photo selected again (its photo's hashes, and its candidates', were stored)
    assert st["reselect_reasons"].get("candidates_changed", 0) > 0
    assert decoded == ["zz-new"]
    assert st["photo_hashes_reused"] > 0 and st["photo_hashes_computed"] == 1
    build_multiid_dataset(*grown, tmp_path / "fresh", CFG_D, version="v2")
    assert _files(tmp_path / "v2") == _files(tmp_path / "fresh")


def test_without_the_store_a_refresh_decodes_old_photos(tmp_path, decoded):
    """The same refresh with the guard's decisions but no pHash store decodes the re-selected targets' photos:
    the first test's assertion can fail."""
    cache = tmp_path / "guard.parquet"
    first, grown = _first(tmp_path, cache)
    photo_hashes_path(cache).unlink()
    decoded.clear()
    build_multiid_dataset(*grown, tmp_path / "v2", CFG_D, version="v2", reuse_from=first.out_dir, guard_cache=cache)
    assert "zz-new" in decoded and len(set(decoded)) > 1


def _move_face(tables, uid: str, dx: float):
    """The tables with face 0 of photo ``uid`` moved ``dx`` px to the right (box and landmarks)."""
    images, faces, ids = tables
    rows = faces.to_pylist()
    for r in rows:
        if r["uid"] == uid and r["face_index"] == 0:
            r.update(x1=r["x1"] + dx, x2=r["x2"] + dx, landmarks=[v + (dx if i % 2 == 0 else 0) for i, v in enumerate(r["landmarks"])])
    return images, pa.Table.from_pylist(rows, schema=faces.schema), ids


def test_a_stale_entry_is_not_used(tmp_path, decoded):
    """A photo whose face boxes moved is decoded again (its stored crop pHashes are of the old box); the
    version is the fresh build's. And an entry found under its key is used as is: with a wrong one planted,
    the refresh would differ, so the key is what keeps the store honest."""
    cache = tmp_path / "guard.parquet"
    first, grown = _first(tmp_path, cache)
    before = set(read_parquet(photo_hashes_path(cache)).column("uid").to_pylist())
    moved_uid = "g0-p00"  # a target of person a, selected again: its hashes are looked up
    assert moved_uid in before
    moved = _move_face(grown, moved_uid, 7.0)
    decoded.clear()
    refresh = build_multiid_dataset(*moved, tmp_path / "v2", CFG_D, version="v2", reuse_from=first.out_dir, guard_cache=cache)
    assert sorted(set(decoded)) == sorted({"zz-new", moved_uid})
    build_multiid_dataset(*moved, tmp_path / "fresh", CFG_D, version="v2")
    assert _files(tmp_path / "v2") == _files(tmp_path / "fresh")
    # the store now holds the moved photo under its new key (the old entry replaced, not kept beside it)
    store = PhotoHashes(photo_hashes_path(cache))
    by_uid = selection._faces_from_table(moved[1], moved[2])
    comparable = selection._new_fingerprints(None, by_uid, CFG_D.resolved())._comparable(moved_uid)
    assert comparable and store.get(moved_uid, comparable) is not None
    assert refresh.stats["photo_hashes_computed"] == 2


def test_the_key_covers_the_comparable_faces_their_boxes_and_the_hash_code(tmp_path, monkeypatch):
    """An entry is found only for the same photo with the same comparable faces (a face more or less: another
    comparability rule; a moved box or landmark) under the same hash code (PHASH_VERSION, libraries)."""
    from dataclasses import replace as dc_replace

    from pipeline.multiid import dedup, guard_cache

    _, faces, ids = _collection(tmp_path, _groups(1), photos_per_group=6)
    by_uid = selection._faces_from_table(faces, ids)
    uid = "g0-p04"
    fs = by_uid[uid]
    assert len(fs) == 2
    value = (np.ones(64, bool), {f.face_index: dedup.FaceFingerprint(np.zeros(64, bool), np.ones(64, bool), None, None) for f in fs})
    store = PhotoHashes(tmp_path / "s.parquet")
    store.record(uid, fs, value)
    assert store.get(uid, fs) is not None
    assert store.get(uid, fs[:1]) is None  # a face no longer comparable
    assert store.get("g0-p05", fs) is None  # another photo (another content)
    assert store.get(uid, [dc_replace(fs[0], bbox=(fs[0].bbox[0] + 1, *fs[0].bbox[1:])), fs[1]]) is None
    assert store.get(uid, [dc_replace(fs[0], landmarks=np.asarray(fs[0].landmarks) + 0.5), fs[1]]) is None
    assert store.save([uid]) == 1
    assert PhotoHashes(tmp_path / "s.parquet").get(uid, fs) is not None
    monkeypatch.setattr(guard_cache, "PHASH_VERSION", guard_cache.PHASH_VERSION + 1)
    assert PhotoHashes(tmp_path / "s.parquet").get(uid, fs) is None


def test_a_torn_store_is_ignored_and_rewritten(tmp_path, decoded):
    groups = _groups(1)
    cache = tmp_path / "guard.parquet"
    world = _collection(tmp_path, groups, photos_per_group=10)
    build_multiid_dataset(*world, tmp_path / "a", CFG, version="v1", guard_cache=cache)
    store = photo_hashes_path(cache)
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])  # what a copy cut short would leave (the build writes atomically)
    assert len(PhotoHashes(store)) == 0
    decoded.clear()
    build_multiid_dataset(*world, tmp_path / "b", CFG, version="v1", guard_cache=cache)
    assert len(set(decoded)) == len(PhotoHashes(store)) > 0  # trusted nothing: decoded every photo again, kept them
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_the_store_in_parallel_equals_one_process(tmp_path, small_parallel):  # noqa: F811 - the fixture
    groups = _groups(2)
    base = _collection(tmp_path, groups, photos_per_group=14)
    grown = _grown(tmp_path, groups)
    stores = {}
    for w in (1, 2):
        cache = tmp_path / f"guard{w}.parquet"
        first = build_multiid_dataset(*base, tmp_path / f"v1-{w}", CFG, version="v1", guard_cache=cache, workers=w)
        res = build_multiid_dataset(*grown, tmp_path / f"v2-{w}", CFG, version="v2", reuse_from=first.out_dir,
                                    guard_cache=cache, workers=w)
        assert res.stats["photo_hashes_reused"] > 0
        stores[w] = read_parquet(photo_hashes_path(cache)).to_pylist()
    # the workers' pHash pass hashes every photo (one process only those it meets): the same entry for each
    two = {r["uid"]: r for r in stores[2]}
    assert stores[1] and all(two[r["uid"]] == r for r in stores[1])
    assert _files(tmp_path / "v2-1") == _files(tmp_path / "v2-2")


def test_a_removal_drops_the_photos_hashes(tmp_path):
    from pipeline.config import Layout
    from pipeline.removals import purge_removed_guard_decisions, uid_hash

    groups = _groups(1)
    world = _collection(tmp_path, groups, photos_per_group=10)
    layout = Layout(tmp_path / "home")
    cache = layout.multiid_guard_cache
    build_multiid_dataset(*world, tmp_path / "a", CFG, version="v1", guard_cache=cache)
    uids = read_parquet(photo_hashes_path(cache)).column("uid").to_pylist()
    assert kept_photo_uids(cache) >= set(uids)
    # a photo no kept decision involves (its hashes only): the removal still finds and drops it
    judged = set(read_parquet(cache, columns=["a_uid"]).column("a_uid").to_pylist()) | set(
        read_parquet(cache, columns=["b_uid"]).column("b_uid").to_pylist())
    unjudged = sorted(set(uids) - judged)
    victims = ([unjudged[0]] if unjudged else []) + [min(judged)]
    purge_removed_guard_decisions(layout, {uid_hash(u) for u in victims})
    left = set(read_parquet(photo_hashes_path(cache)).column("uid").to_pylist())
    assert not (left & set(victims)) and left == set(uids) - set(victims)
    assert not (kept_photo_uids(cache) & set(victims))
    # and purge_guard_decisions alone (what removals call) drops both kinds
    other = min(left)
    purge_guard_decisions(cache, [other])
    assert other not in set(read_parquet(photo_hashes_path(cache)).column("uid").to_pylist())


def test_packed_hashes_round_trip():
    from pipeline.multiid import dedup
    from pipeline.multiid.guard_cache import pack_hashes, unpack_hashes

    rng = np.random.default_rng(3)
    img = rng.random(64) > 0.5
    fps = {i: dedup.FaceFingerprint(rng.random(64) > 0.5, rng.random(64) > 0.5, None, None) for i in (0, 2, 7)}
    img2, fps2 = unpack_hashes(pack_hashes((img, fps)))
    assert np.array_equal(img, img2) and sorted(fps2) == [0, 2, 7]
    for i, fp in fps.items():
        assert np.array_equal(fp.phash, fps2[i].phash) and np.array_equal(fp.phash_mirror, fps2[i].phash_mirror)
