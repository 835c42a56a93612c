"""The faces' keypoints and NCC patches kept beside the guard's decisions (guard_cache.FaceFeatures): a refresh
runs SIFT only on faces no build worked out (new faces, moved boxes), and writes what a fresh build writes,
byte for byte; a torn entry is computed again, a removal drops a photo's entries."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
from test_multiid_parallel import _files, small_parallel  # noqa: F401 - a fixture
from test_multiid_phash_store import _move_face
from test_multiid_refresh_derive import CFG_D, _with_new_face
from test_shard_reuse import _collection, _groups

from pipeline.multiid import build_multiid_dataset, dedup, selection
from pipeline.multiid.guard_cache import (
    FaceFeatures,
    face_features_dir,
    kept_photo_uids,
    purge_guard_decisions,
)

CFG_K = replace(CFG_D, keypoints=True)


@pytest.fixture
def sift(monkeypatch):
    """The (photo uid, face index) whose keypoints SIFT worked out in this process, in order."""
    seen: list[tuple[str, int]] = []
    real = selection._Fingerprints._compute_keypoints

    def spy(self, uid, face_index):
        seen.append((uid, face_index))
        return real(self, uid, face_index)

    monkeypatch.setattr(selection._Fingerprints, "_compute_keypoints", spy)
    return seen


def _entries(cache, kind: str) -> dict[str, int]:
    """photo uid -> how many entries of ``kind`` the store beside ``cache`` holds."""
    out: dict[str, int] = {}
    for p in face_features_dir(cache).glob(f"*.{kind}.*.feat"):
        u = p.name.split(".", 1)[0]
        out[u] = out.get(u, 0) + 1
    return out


def _first(tmp_path, cache, workers: int = 1):
    groups = _groups(1)
    first = build_multiid_dataset(*_collection(tmp_path, groups, photos_per_group=8), tmp_path / "v1", CFG_K, version="v1",
                                  guard_cache=cache, workers=workers)
    return first, _with_new_face(tmp_path, groups, f"{groups[0]}-a", "mean")


def test_a_refresh_runs_sift_only_on_faces_no_build_worked_out(tmp_path, sift):
    cache = tmp_path / "guard.parquet"
    first, grown = _first(tmp_path, cache)
    # every face whose keypoints the first build worked out is kept, once
    assert sift and _entries(cache, "kp") and sum(_entries(cache, "kp").values()) == len(set(sift))
    assert first.stats["face_features_entries"] == len(list(face_features_dir(cache).glob("*.feat")))
    before = set(sift)
    sift.clear()
    refresh = build_multiid_dataset(*grown, tmp_path / "v2", CFG_K, version="v2", reuse_from=first.out_dir, guard_cache=cache)
    st = refresh.stats
    assert st["reselect_reasons"].get("candidates_changed", 0) > 0 and st["guard_decisions_computed"] > 0
    # SIFT ran on the new face, and on old faces only where no build had (a pair never judged before)
    assert ("zz-new", 0) in sift and not (set(sift) & before) and len(sift) == len(set(sift))
    build_multiid_dataset(*grown, tmp_path / "fresh", CFG_K, version="v2")
    assert _files(tmp_path / "v2") == _files(tmp_path / "fresh")


@pytest.mark.parametrize("store", [True, False])
def test_pairs_judged_again_take_their_keypoints_from_the_store(tmp_path, sift, store, monkeypatch):
    """The decisions gone (every pair is judged again), the keypoints and crops kept: no SIFT and no crop at
    all, the same files. Without the store, SIFT runs on every face again and every crop is made again (so
    the first case can fail)."""
    import shutil

    from pipeline.multiid import rows

    crops: list[str] = []
    real_crop = rows.ref_crop
    monkeypatch.setattr(rows, "ref_crop", lambda data, bbox, *a: crops.append(bbox) or real_crop(data, bbox, *a))
    cache = tmp_path / "guard.parquet"
    world = _collection(tmp_path, _groups(1), photos_per_group=10)
    build_multiid_dataset(*world, tmp_path / "a", CFG_K, version="v1", guard_cache=cache)
    n, n_crops = len(set(sift)), len(crops)
    assert n > 1 and n_crops > 1 and _entries(cache, "crop")
    cache.unlink()
    if not store:
        shutil.rmtree(face_features_dir(cache))
    sift.clear()
    crops.clear()
    again = build_multiid_dataset(*world, tmp_path / "b", CFG_K, version="v1", guard_cache=cache)
    if store:
        assert sift == [] and crops == [] and again.stats["face_features_reused"] >= n + len(_entries(cache, "crop"))
    else:
        assert len(set(sift)) == n and len(crops) == n_crops
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_torn_entry_is_computed_again_and_replaced(tmp_path, sift):
    cache = tmp_path / "guard.parquet"
    world = _collection(tmp_path, _groups(1), photos_per_group=10)
    build_multiid_dataset(*world, tmp_path / "a", CFG_K, version="v1", guard_cache=cache)
    n = len(set(sift))
    entries = sorted(face_features_dir(cache).glob("*.kp.*.feat"))
    torn = entries[0]
    torn.write_bytes(torn.read_bytes()[:100])  # what a copy cut short would leave (the build writes atomically)
    cache.unlink()  # no recorded decision: every pair is judged again, so every face's keypoints are looked up
    sift.clear()
    build_multiid_dataset(*world, tmp_path / "b", CFG_K, version="v1", guard_cache=cache)
    assert len(sift) == 1 and torn.name.startswith(sift[0][0])  # the torn one alone, of n
    assert n > 1
    from pipeline.multiid.guard_cache import _unpack_arrays

    assert "pts" in _unpack_arrays(torn.read_bytes())  # replaced by a whole entry
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_moved_box_misses_and_the_key_covers_the_code(tmp_path, sift, monkeypatch):
    from pipeline.multiid import guard_cache

    cache = tmp_path / "guard.parquet"
    world = _collection(tmp_path, _groups(1), photos_per_group=10)
    build_multiid_dataset(*world, tmp_path / "a", CFG_K, version="v1", guard_cache=cache)
    moved_uid = min(u for u, i in sift if i == 0)
    moved = _move_face(world, moved_uid, 7.0)
    cache.unlink()  # every pair judged again: every face's keypoints looked up
    sift.clear()
    build_multiid_dataset(*moved, tmp_path / "b", CFG_K, version="v1", guard_cache=cache)
    assert sift == [(moved_uid, 0)]  # the moved face alone missed
    build_multiid_dataset(*moved, tmp_path / "fresh", CFG_K, version="v1")
    assert _files(tmp_path / "b") == _files(tmp_path / "fresh")
    # another version of the feature code: nothing found (a new salt)
    f = selection._faces_from_table(moved[1], moved[2])[moved_uid][0]
    assert FaceFeatures(face_features_dir(cache)).path("kp", moved_uid, [f]).exists()
    monkeypatch.setattr(guard_cache, "FEATURES_VERSION", guard_cache.FEATURES_VERSION + 1)
    assert not FaceFeatures(face_features_dir(cache)).path("kp", moved_uid, [f]).exists()


def test_a_store_sent_to_another_host_computes_and_writes_nothing(tmp_path):
    """A Ray task on another node shares no disk with the driver: its copy of the store neither reads nor
    writes (what it would write there no removal could reach)."""
    store = FaceFeatures(tmp_path / "f")
    calls = []
    remote = pickle.loads(pickle.dumps(store))
    remote.host = "another-node"
    value = dedup.KeypointSet(np.zeros((0, 2), np.float32), None, np.zeros((0, 2), np.float32), None, (8, 8))
    got = remote.get("kp", "u1", [], lambda: calls.append(1) or value)
    assert got is value and calls == [1] and not (tmp_path / "f").exists()
    assert store.get("kp", "u1", [], lambda: value) is value and (tmp_path / "f").is_dir()
    assert store.get("kp", "u1", [], lambda: pytest.fail("computed again")).size == (8, 8)


def again_crop(guard, crop):
    """The crop entry of photo u3 read back by a fresh store (another key misses)."""
    fresh = FaceFeatures(face_features_dir(guard))
    other = (b"other", [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0])
    assert fresh.get("crop", "u3", [], lambda: other, extra="box2|settings") is other
    return fresh.get("crop", "u3", [], lambda: pytest.fail("computed again"), extra="box|settings")


def test_entries_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    guard = tmp_path / "g.parquet"
    store = FaceFeatures(face_features_dir(guard))
    kp = dedup.KeypointSet(rng.random((5, 2), dtype=np.float32), rng.integers(0, 256, (5, 128)).astype(np.float32),
                           rng.random((3, 2), dtype=np.float32), None, (40, 30))
    fp = (rng.random(64) > 0.5, {0: dedup.FaceFingerprint(rng.random(64) > 0.5, rng.random(64) > 0.5,
                                                          rng.random((54, 54), dtype=np.float32), rng.random((54, 54), dtype=np.float32)),
                                 3: dedup.FaceFingerprint(rng.random(64) > 0.5, rng.random(64) > 0.5, None, None)})
    crop = (b"\xff\xd8 jpeg bytes", [10.0, 20.0, 110.0, 120.0], [25.5, 30.25, 80.0, 90.0])
    store.get("crop", "u3", [], lambda: crop, extra="box|settings")
    assert again_crop(guard, crop) == crop
    odd = "photos/a b.jpg"  # a uid that is no file name: kept under its hex, found again by a removal
    store.get("kp", odd, [], lambda: kp)
    store.get("fp", "u2", [], lambda: fp)
    again = FaceFeatures(face_features_dir(guard))
    k2 = again.get("kp", odd, [], lambda: pytest.fail("computed again"))
    for a, b in ((kp.pts, k2.pts), (kp.desc, k2.desc), (kp.pts_m, k2.pts_m)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert k2.desc_m is None and k2.size == (40, 30)
    img, fps = again.get("fp", "u2", [], lambda: pytest.fail("computed again"))
    assert np.array_equal(img, fp[0]) and sorted(fps) == [0, 3]
    assert np.array_equal(fps[0].patch, fp[1][0].patch) and np.array_equal(fps[0].mask, fp[1][0].mask)
    assert fps[3].patch is None and np.array_equal(fps[3].phash_mirror, fp[1][3].phash_mirror)
    assert kept_photo_uids(guard) == {odd, "u2", "u3"}  # no decisions file, no pHash store: the features found
    purge_guard_decisions(guard, [odd, "u3"])
    assert kept_photo_uids(guard) == {"u2"}


def test_a_blob_that_is_not_whole_is_refused():
    from pipeline.multiid.guard_cache import _pack_arrays, _unpack_arrays

    blob = _pack_arrays({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.uint8)})
    back = _unpack_arrays(blob)
    assert back["a"].shape == (2, 3) and back["a"].dtype == np.float32 and back["b"].size == 0
    for bad in (blob[:-1], blob + b"x", b"PK\x03\x04" + blob[4:], blob[:7]):
        with pytest.raises(ValueError):
            _unpack_arrays(bad)


def test_prune_drops_photos_gone_and_half_written_files(tmp_path):
    store = FaceFeatures(tmp_path / "f")
    kp = dedup.KeypointSet(np.zeros((1, 2), np.float32), None, np.zeros((1, 2), np.float32), None, (8, 8))
    for u in ("keep", "gone"):
        store.get("kp", u, [], lambda: kp)
    (tmp_path / "f" / "keep.kp.0.feat.tmp123").write_bytes(b"half")
    stale = tmp_path / "f" / f"keep.kp.{'0' * 8}.{'1' * 32}.feat"  # another version of the feature code's entry
    stale.write_bytes(b"old")
    assert store.size()[0] == 3
    assert store.prune({"keep"}) == 3
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "f").iterdir()) == ["keep"]


def test_a_full_budget_keeps_nothing_more(tmp_path):
    store = FaceFeatures(tmp_path / "f", max_bytes=1)
    kp = dedup.KeypointSet(np.zeros((1, 2), np.float32), None, np.zeros((1, 2), np.float32), None, (8, 8))
    assert store.get("kp", "u", [], lambda: kp) is kp
    assert store.size() == (0, 0)


def test_the_store_in_parallel_equals_one_process(tmp_path, small_parallel):  # noqa: F811 - the fixture
    """Forked workers keep what they compute in the same folder: the entries of 1 and 2 workers are the same,
    and a build that judges every pair again (its decisions gone) works out none of them again."""
    world = _collection(tmp_path, _groups(2), photos_per_group=14)
    outs, names = {}, {}
    for w in (1, 2):
        cache = tmp_path / f"guard{w}.parquet"
        first = build_multiid_dataset(*world, tmp_path / f"a-{w}", CFG_K, version="v1", guard_cache=cache, workers=w)
        inode = {p.name: p.stat().st_ino for p in face_features_dir(cache).iterdir()}
        assert _entries(cache, "kp")
        # the workers' counts reach the stats: every entry on disk was computed by one of the processes
        # (two workers may both work out one entry before either has written it)
        assert first.stats["face_features_computed"] == len(inode) if w == 1 else first.stats["face_features_computed"] >= len(inode)
        cache.unlink()
        again = build_multiid_dataset(*world, tmp_path / f"b-{w}", CFG_K, version="v1", guard_cache=cache, workers=w)
        # an entry computed is written aside and renamed (a new inode): none was, and none was added
        assert {p.name: p.stat().st_ino for p in face_features_dir(cache).iterdir()} == inode
        assert again.stats["face_features_computed"] == 0 and again.stats["face_features_reused"] > 0
        outs[w], names[w] = _files(tmp_path / f"b-{w}"), set(inode)
        assert outs[w] == _files(tmp_path / f"a-{w}")
    assert outs[1] == outs[2] and names[1] == names[2]


def test_a_removal_drops_the_photos_features(tmp_path):
    from pipeline.config import Layout
    from pipeline.removals import purge_removed_guard_decisions, uid_hash

    world = _collection(tmp_path, _groups(1), photos_per_group=10)
    layout = Layout(tmp_path / "home")
    cache = layout.multiid_guard_cache
    build_multiid_dataset(*world, tmp_path / "a", CFG_K, version="v1", guard_cache=cache)
    kept = set(_entries(cache, "kp"))
    victim = min(kept)
    (face_features_dir(cache) / f"{victim}.kp.x.feat.tmp99").write_bytes(b"half")  # a killed build's leftovers
    (face_features_dir(cache) / f".{victim}.kp.x.feat.ab12cd.tmp").write_bytes(b"half")  # (write_bytes_atomic's name)
    assert victim in kept_photo_uids(cache)
    purge_removed_guard_decisions(layout, {uid_hash(victim)})
    assert not any(p.name.startswith(victim + ".") for p in face_features_dir(cache).iterdir())
    assert set(_entries(cache, "kp")) == kept - {victim}
    assert victim not in kept_photo_uids(cache)
