"""Exports read back (Pick-a-Pic Parquet with datasets, WebDataset shards), and determinism."""

import hashlib
import io
import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.shards import read_manifest, verify_manifest
from pipeline.social import SocialConfig, build_social_pairs, draw_user_sets
from pipeline.social.simulate import SimConfig, simulate

CFG = SocialConfig(min_exposure=10, shard_max_count=300, max_user_pairs_per_group=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    simulate(root / "social", config=SimConfig(n_events=30_000, n_users=300, n_bots=0, seed=5))
    a = build_social_pairs(root / "social", root / "out_a", CFG)
    b = build_social_pairs(root / "social", root / "out_b", CFG)
    return root, a, b


def test_both_kinds_of_pairs_exist(built):
    _, a, _ = built
    kinds = set(a.pairs.column("kind").to_pylist())
    assert kinds == {"population", "user"}
    assert (
        a.pairs.filter(pc.field("kind") == "population").column("user_id").null_count
        == a.stats["population_pairs"]
    )


def test_pickapic_export_reads_with_datasets(built):
    datasets = pytest.importorskip("datasets")
    root, a, _ = built
    dd = datasets.load_dataset("parquet", data_dir=str(root / "out_a" / "pickapic"))
    assert set(dd) == {"train", "validation"}
    assert dd["train"].num_rows + dd["validation"].num_rows == a.pairs.num_rows
    assert not set(dd["train"]["caption"]) & set(dd["validation"]["caption"])  # held out by prompt
    ds = dd["train"]
    for col in (
        "jpg_0",
        "jpg_1",
        "label_0",
        "label_1",
        "caption",
        "user_id",
        "ranking_id",
        "are_different",
        "has_label",
        "best_image_uid",
    ):
        assert col in ds.column_names
    labels = list(zip(ds["label_0"], ds["label_1"]))
    assert set(labels) == {(1.0, 0.0), (0.0, 1.0)}  # winner side randomised, both sides occur
    winners = dict(zip(a.pairs.column("pair_id").to_pylist(), a.pairs.column("winner_uid").to_pylist()))
    row = ds[0]
    assert Image.open(io.BytesIO(row["jpg_0"])).size == (64, 64)
    best = row["image_0_uid"] if row["label_0"] == 1.0 else row["image_1_uid"]
    assert best == row["best_image_uid"] == winners[row["pair_id"]]
    w_bytes = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
    assert hashlib.sha256(w_bytes).hexdigest()[:32] == best  # uid = content hash of the winner bytes


def test_webdataset_shards_read_back(built):
    root, a, _ = built
    samples, groups = [], {}
    for split in ("train", "eval"):
        wd = root / "out_a" / "webdataset" / split
        assert verify_manifest(wd) == []
        m = read_manifest(wd)
        assert m["split"] == split and m["num_samples"] > 0
        urls = [str(wd / s["name"]) for s in m["shards"]]
        got = list(wds.WebDataset(urls, shardshuffle=False))
        assert len(got) == m["num_samples"]
        groups[split] = {json.loads(x["json"])["prompt_group"] for x in got}
        samples += got
    assert not groups["train"] & groups["eval"]  # split by prompt group
    assert len(samples) == a.pairs.num_rows
    s = samples[0]
    meta = json.loads(s["json"])
    assert {"caption", "label_0", "label_1", "user_id", "uid_0", "uid_1", "evidence"} <= set(meta)
    assert meta["label_0"] + meta["label_1"] == 1
    assert hashlib.sha256(s["0.jpg"]).hexdigest()[:32] == meta["uid_0"]
    users = [json.loads(x["json"])["user_id"] for x in samples]
    assert any(u is not None for u in users) and any(u is None for u in users)


def test_same_input_and_config_give_identical_outputs(built):
    root, a, b = built
    assert a.pairs.equals(b.pairs) and a.users.equals(b.users) and a.rejects.equals(b.rejects)
    for split in ("train", "eval"):
        ma, mb = read_manifest(root / "out_a" / "webdataset" / split), read_manifest(root / "out_b" / "webdataset" / split)
        assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    pa_, pb_ = (
        sorted((root / "out_a" / "pickapic").glob("*.parquet")),
        sorted((root / "out_b" / "pickapic").glob("*.parquet")),
    )
    assert [p.read_bytes() for p in pa_] == [p.read_bytes() for p in pb_]
    assert pq.read_table(root / "out_a" / "social_pairs.parquet").equals(a.pairs)


def test_user_sets_are_deterministic(built):
    _, a, _ = built
    s1 = draw_user_sets(a.pairs, k=2, seed=1)
    s2 = draw_user_sets(a.pairs, k=2, seed=1)
    assert s1.num_rows > 0 and s1.equals(s2)
    counts = {}
    for u in s1.column("user_id").to_pylist():
        counts[u] = counts.get(u, 0) + 1
    assert set(counts.values()) == {2}
    eligible = [r["user_id"] for r in a.users.to_pylist() if r["n_pairs"] >= 2]
    assert sorted(counts) == sorted(eligible)
