"""WebDataset loaders over the shard contract (tiny shards written with plain tarfile)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from training import data, synthetic


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("p") / "v1", "preference",
                                   synthetic.preference_samples(20, size=24, ties=3), per_shard=5)


@pytest.fixture(scope="module")
def id_dir(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("i") / "v1", "multiid",
                                   synthetic.identity_samples(6, size=64, emb_dim=16), per_shard=3)


def test_manifest_and_shard_paths(pref_dir):
    m = data.read_manifest(pref_dir)
    assert m["num_samples"] == 23 and len(m["shards"]) == 5
    paths = data.shard_paths(pref_dir, m, verify=True)
    assert [p.rsplit("/", 1)[1] for p in paths] == [s["name"] for s in m["shards"]]
    bad = dict(m, shards=[dict(m["shards"][0], name="../x.tar")])
    with pytest.raises(ValueError):
        data.shard_paths(pref_dir, bad)


def test_preference_batches_winner_first_ties_dropped(pref_dir):
    s = data.BatchStream(pref_dir, data.LoaderConfig(resolution=16, batch_size=4, shuffle_buffer=8))
    keys = []
    for _ in range(5):
        b = next(s)
        assert b["pixels_w"].shape == (4, 3, 16, 16) and b["pixels_w"].min() >= -1 and b["pixels_w"].max() <= 1
        # synthetic winners are red, losers blue, whatever their position in the pair
        assert (b["pixels_w"][:, 0].mean((1, 2)) > b["pixels_w"][:, 2].mean((1, 2))).all()
        assert (b["pixels_l"][:, 2].mean((1, 2)) > b["pixels_l"][:, 0].mean((1, 2))).all()
        keys += b["key"]
    assert sorted(keys) == [f"pair{i:05d}" for i in range(20)]  # one epoch = every non-tie pair once
    assert s.counter.skipped == 3
    b = next(s)  # next epoch, reshuffled with the epoch seed
    assert s.position == {"epoch": 1, "batch": 1} and len(b["key"]) == 4


def test_restore_replays_stream(pref_dir):
    cfg = data.LoaderConfig(resolution=16, batch_size=3, shuffle_buffer=8, seed=3)
    s = data.BatchStream(pref_dir, cfg)
    seq = [next(s)["key"] for _ in range(9)]  # crosses an epoch boundary (20 pairs / 3)
    r = data.BatchStream(pref_dir, cfg)
    r.restore({"epoch": 0, "batch": 4})
    assert [next(r)["key"] for _ in range(5)] == seq[4:]


def test_node_and_worker_splitting_partition_shards(pref_dir, monkeypatch):
    cfg = data.LoaderConfig(resolution=8, batch_size=1, shuffle_buffer=0)
    urls = data.shard_paths(pref_dir)
    seen = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            seen.append([k for b in data.build_pipeline(urls, cfg) for k in b["key"]])
    flat = [k for part in seen for k in part]
    assert len(flat) == len(set(flat)) == 20  # disjoint, complete
    assert sum(bool(p) for p in seen) >= 3  # (the last shard holds only ties)


def test_resampled_with_epoch(pref_dir):
    cfg = data.LoaderConfig(resolution=8, batch_size=2, shuffle_buffer=4, resampled=True, epoch_batches=7)
    assert len(list(data.build_pipeline(data.shard_paths(pref_dir), cfg))) == 7
    with pytest.raises(ValueError):
        data.build_pipeline(data.shard_paths(pref_dir), data.LoaderConfig(resampled=True))


def test_multiworker_loader(pref_dir):
    cfg = data.LoaderConfig(resolution=8, batch_size=2, shuffle_buffer=4, num_workers=2)
    s = data.BatchStream(pref_dir, cfg)
    keys = [k for _ in range(10) for k in next(s)["key"]]
    assert len(set(keys)) == 20


def test_identity_batches_geometry(id_dir):
    s = data.BatchStream(id_dir, data.LoaderConfig(family="identity", resolution=32, ref_resolution=24,
                                                   batch_size=3, shuffle_buffer=0))
    b = next(s)
    assert b["target"].shape == (3, 3, 32, 32) and b["refs"].shape == (3, 2, 3, 24, 24)
    assert b["face_mask"].all() and b["ref_mask"].all() and b["has_landmarks"].all()
    # 64 px source -> 32 px: boxes and landmarks halve
    with tarfile.open(data.shard_paths(id_dir)[0]) as tf:
        raw = json.loads(tf.extractfile(f"{b['key'][0]}.json").read())
    np.testing.assert_allclose(b["bbox"][0, 0].numpy(), np.array(raw["faces"][0]["bbox"]) / 2, atol=1e-4)
    np.testing.assert_allclose(b["landmarks"][0, 0].numpy(), np.array(raw["faces"][0]["landmarks"]) / 2, atol=1e-4)
    assert torch.allclose(b["gt_emb"].norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    assert b["identity_ids"][0][0] == raw["faces"][0]["identity_id"]


def test_bad_samples_are_counted_not_fatal(tmp_path):
    good = synthetic.preference_samples(4, size=8)
    bad = [{"__key__": "broken1", "0.jpg": b"not a jpeg", "1.jpg": b"nope", "json": json.dumps(
               {"caption": "x", "label_0": 1, "label_1": 0}).encode()},
           {"__key__": "broken2", "0.jpg": good[0]["0.jpg"], "json": b"{not json"}]
    d = synthetic.write_dataset(tmp_path / "v1", "preference", good + bad, per_shard=10)
    s = data.BatchStream(d, data.LoaderConfig(resolution=8, batch_size=10, shuffle_buffer=0))
    b = next(s)
    assert len(b["key"]) == 4 and s.counter.errors == 2


def test_decompression_bomb_guard(monkeypatch):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ValueError, match="pixel limit"):
        data.decode_image(buf.getvalue(), 8)


def test_reference_geometry_follows_the_shard_json():
    # pipeline-style face crop: geometry in source-photo pixels + crop box + bbox inside the crop
    r = {"kind": "face_crop", "bbox": [100, 50, 200, 150], "landmarks": [150, 100] * 5,
         "crop_box": [70, 20, 230, 180], "bbox_in_crop": [15, 15, 65, 65]}
    bbox, lm = data.ref_geometry(r)
    assert bbox == [15, 15, 65, 65] and np.allclose(lm, [[40, 40]] * 5)
    # a full photo: the face region is cut around the bbox, landmarks follow
    from PIL import Image

    im = np.zeros((200, 300, 3), np.uint8)
    im[50:150, 100:200] = 255
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    t, lm = data.decode_face_region(buf.getvalue(), [100, 50, 200, 150], [[150, 100]] * 5, 64, margin=0.0)
    assert t.shape == (3, 64, 64) and t.mean() > 0.95 and np.allclose(lm, [[32, 32]] * 5)
