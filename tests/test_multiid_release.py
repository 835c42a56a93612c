"""Multi-identity releases: the split-leak check on written shards, version ids, staged publishing."""

import json
import os
import socket
import stat
import time

import numpy as np
import pyarrow as pa
import pytest
from test_multiid_units import _synthetic_tables

from pipeline.config import Layout
from pipeline.datasets import latest_version, published_versions, release
from pipeline.multiid import MultiIDConfig, build_multiid_dataset
from pipeline.multiid.release import multiid_version, release_checks
from pipeline.multiid.splits import split_leaks
from pipeline.shards import iter_samples, write_shards

CFG = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiid_release")
    images, faces, ids = _synthetic_tables(tmp)
    out = tmp / "version"
    res = build_multiid_dataset(images, faces, ids, out, CFG, version="v-test")
    return images, faces, ids, out, res


def _samples(folder):
    return [json.loads(r["json"]) for r in iter_samples(folder, ("json",))]


def test_written_dataset_is_disjoint_by_photo_and_identity(built):
    _images, faces, ids, out, res = built
    assert res.stats["per_split"].get("eval") and res.stats["per_split"].get("train")
    assert split_leaks(out, faces, ids) == []
    checks = release_checks(out, faces, ids, res.pairs)
    assert checks == {"identity_disjoint_splits": [], "shards_match_manifest": []}
    # by photo, read back from the shards: no uid feeds both splits
    used = {}
    for split in ("train", "eval"):
        used[split] = set()
        for x in _samples(out / split):
            used[split] |= {x["target"]["uid"], *(r["uid"] for f in x["faces"] for r in f["refs"])}
    assert used["train"] and used["eval"] and not used["train"] & used["eval"]
    # the mixed photos were met and their references filtered, not silently kept
    assert res.stats["photos_in_both_splits_by_faces"] > 0
    removed = res.stats["candidates_removed_by"]
    assert removed.get("photo_in_other_split", 0) + removed.get("crop_shows_other_split", 0) > 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["version"] == "v-test" and manifest["split"] == "train"


def test_leak_check_fails_on_a_photo_in_both_splits(built, tmp_path):
    _images, faces, ids, out, _res = built
    train = _samples(out / "train")
    eval_ = _samples(out / "eval")
    # an eval sample whose reference comes from a photo that train uses as a target
    leak = json.loads(json.dumps(eval_[0]))
    leak["key"] = "leak0"
    leak["faces"][0]["refs"][0]["uid"] = train[0]["target"]["uid"]
    leak["faces"][0]["refs"][0]["kind"] = "image"  # the whole photo: every face in it is visible
    d = tmp_path / "leaky"
    for split, samples in (("train", train), ("eval", [*eval_, leak])):
        write_shards(({"__key__": s["key"], "json": s} for s in samples), d / split, f"x-{split}")
    problems = split_leaks(d, faces, ids)
    assert any(p.startswith(f"photo {train[0]['target']['uid']} in train") for p in problems), problems
    assert any(p.startswith("identity ") for p in problems), problems


def test_leak_check_fails_on_a_face_visible_in_a_crop(built, tmp_path):
    """A reference crop of an eval person that also shows a train person's face leaks that person."""
    _images, faces, ids, out, _res = built
    split_of = {}
    for split in ("train", "eval"):
        for s in _samples(out / split):
            for f in s["faces"]:
                split_of[f["identity_id"]] = split
    ident = {(u, f): i for u, f, i in zip(*(ids.column(c).to_pylist() for c in ("uid", "face_index", "identity_id")))}
    boxes = {(u, f): (x1, y1, x2, y2) for u, f, x1, y1, x2, y2 in zip(*(faces.column(c).to_pylist() for c in ("uid", "face_index", "x1", "y1", "x2", "y2")))}
    # a photo holding an eval person next to a train person
    pick = None
    for (u, f), i in ident.items():
        if split_of.get(i) != "eval":
            continue
        for (u2, f2), i2 in ident.items():
            if u2 == u and split_of.get(i2) == "train":
                pick = (u, f, boxes[(u2, f2)])
                break
        if pick:
            break
    assert pick, "the synthetic collection has mixed photos"
    uid, fi, other_box = pick
    sample = json.loads(json.dumps(_samples(out / "eval")[0]))
    sample["key"] = "croplLeak"
    ref = sample["faces"][0]["refs"][0]
    ref.update(uid=uid, face_index=fi, kind="face_crop", crop_box=[int(v) for v in other_box])
    d = tmp_path / "croplLeak"
    write_shards([{"__key__": "croplLeak", "json": sample}], d / "eval", "x-eval")
    write_shards(({"__key__": s["key"], "json": s} for s in _samples(out / "train")), d / "train", "x-train")
    problems = split_leaks(d, faces, ids)
    assert any("visible in reference" in p for p in problems), problems


def test_version_id_follows_every_embedding(built):
    images, faces, ids, _, _ = built
    v1, parts = multiid_version(images, faces, ids, CFG)
    shuffled = faces.take(np.random.default_rng(0).permutation(faces.num_rows))
    assert multiid_version(images.take(list(range(images.num_rows))[::-1]), shuffled, ids, CFG)[0] == v1
    emb = faces.column("embedding").combine_chunks()
    values = emb.flatten().to_numpy(zero_copy_only=False).copy()
    values[5 * 128 + 7] = np.nextafter(values[5 * 128 + 7], np.float32(2))  # one float, one ulp
    changed = faces.set_column(faces.column_names.index("embedding"), "embedding",
                               pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), 128))
    v2 = multiid_version(images, changed, ids, CFG)[0]
    assert v2 != v1
    relabelled = ids.set_column(2, "identity_id", pa.array(["x" + i for i in ids.column("identity_id").to_pylist()]))
    assert multiid_version(images, faces, relabelled, CFG)[0] not in (v1, v2)
    assert multiid_version(images, faces, ids, MultiIDConfig(eval_fraction=0.31, keypoints=False))[0] != v1
    assert parts["identities"] and parts["faces"] and parts["builder"]


def test_interrupted_publish_leaves_no_visible_version(tmp_path):
    layout = Layout(tmp_path / "home")

    def good(folder):
        write_shards([{"__key__": "a", "txt": "x"}], folder, "d")
        (folder / "manifest.json").write_text("{}")

    def ok_checks(folder, result):
        return {"c": []}

    first = release(layout, "toy", "v-1", good, ok_checks)
    assert first.published and latest_version(layout, "toy") == "v-1"

    def crashing(folder):
        write_shards([{"__key__": "a", "txt": "x"}], folder, "d")
        raise KeyboardInterrupt("killed in the middle of writing")

    with pytest.raises(KeyboardInterrupt):
        release(layout, "toy", "v-2", crashing, ok_checks)
    assert published_versions(layout, "toy") == ["v-1"] and latest_version(layout, "toy") == "v-1"
    assert [p.name for p in (layout.datasets / "toy").iterdir() if p.name.startswith(".staging")] == []

    # a staging folder left by a killed process (its lease names this host and a dead pid) is cleaned by
    # the next build
    stale = layout.datasets / "toy" / ".staging-v-3-deadbeef"
    stale.mkdir()
    (stale / "half.tar").write_bytes(b"half")
    lease = {"host": socket.gethostname(), "pid": 999999999, "token": "deadbeef", "heartbeat": time.time()}
    (layout.datasets / "toy" / ".lease-deadbeef.json").write_text(json.dumps(lease))
    third = release(layout, "toy", "v-3", good, ok_checks)
    assert third.published and not stale.exists()

    # failed checks: kept for inspection under a dot-name, never published, LATEST unchanged
    bad = release(layout, "toy", "v-4", good, lambda f, r: {"c": ["broken"]})
    assert not bad.published and bad.folder.name.startswith(".unpublished-")
    assert latest_version(layout, "toy") == "v-3" and "v-4" not in published_versions(layout, "toy")


def test_published_versions_are_never_rewritten_and_world_readable(tmp_path):
    layout = Layout(tmp_path / "home")
    calls = []

    def build(folder):
        calls.append(folder)
        write_shards([{"__key__": "a", "txt": "x"}], folder, "d")

    rel = release(layout, "toy", "v-1", build, lambda f, r: {})
    tar = rel.folder / "d-000000.tar"
    before = (tar.stat().st_mtime_ns, tar.read_bytes())
    again = release(layout, "toy", "v-1", build, lambda f, r: {})
    assert again.reused and len(calls) == 1
    assert (tar.stat().st_mtime_ns, tar.read_bytes()) == before
    umask = os.umask(0)
    os.umask(umask)
    for p in [rel.folder, *rel.folder.rglob("*")]:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~umask  # what an ordinary write gives, not mkstemp's 0600
        assert mode == want, (p, oct(mode), oct(want))
