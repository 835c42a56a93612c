"""Exports read back (Pick-a-Pic Parquet with datasets, WebDataset shards): the default export is
population pairs only, one row per image pair, never contradicting, precise against the
simulator's truth; per-user pairs have their own export with user_id on every row; determinism."""

import hashlib
import io
import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.shards import read_manifest, verify_manifest
from pipeline.social import SocialConfig, build_social_pairs, draw_user_sets, normalize_prompt
from pipeline.social.checks import contradicting_pairs
from pipeline.social.evaluate import load_truth
from pipeline.social.export import _chunks
from pipeline.social.simulate import SimConfig, simulate

CFG = SocialConfig(shard_max_count=300, pickapic_row_group_rows=50, max_user_pairs_per_group=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    simulate(root / "social", root / "truth", config=SimConfig(n_events=200_000, seed=5))
    a = build_social_pairs(root / "social", root / "out_a", CFG)
    b = build_social_pairs(root / "social", root / "out_b", CFG)
    return root, a, b


def _kind(result, kind):
    return result.pairs.filter(pc.field("kind") == kind)


def _rows(ds):
    """(winner uid, loser uid, user_id) of each row of a Pick-a-Pic split."""
    out = []
    for r in ds.select_columns(["image_0_uid", "image_1_uid", "label_0", "label_1", "user_id"]):
        assert {r["label_0"], r["label_1"]} == {0.0, 1.0}
        w, l_ = (
            (r["image_0_uid"], r["image_1_uid"])
            if r["label_0"] == 1.0
            else (r["image_1_uid"], r["image_0_uid"])
        )
        out.append((w, l_, r["user_id"]))
    return out


def test_default_pickapic_export_has_population_pairs_that_never_contradict(built):
    datasets = pytest.importorskip("datasets")
    root, a, _ = built
    dd = datasets.load_dataset("parquet", data_dir=str(root / "out_a" / "pickapic"))
    assert set(dd) == {"train", "validation"}
    pop = _kind(a, "population")
    assert dd["train"].num_rows + dd["validation"].num_rows == pop.num_rows > 100
    train = dd["train"]
    assert set(train["kind"]) == {"population"} and set(train["user_id"]) == {None}
    rows = _rows(train)
    c = contradicting_pairs([w for w, _, _ in rows], [l_ for _, l_, _ in rows])
    assert c["contradicting_pairs"] == 0 and c["distinct_pairs"] == c["rows"]  # one row per image pair
    # the same count does find contradictions where they exist: per-user rows pooled across users
    per_user = datasets.load_dataset("parquet", data_dir=str(root / "out_a" / "per_user" / "pickapic"))[
        "train"
    ]
    pooled = _rows(per_user)
    assert (
        contradicting_pairs([w for w, _, _ in pooled], [l_ for _, l_, _ in pooled])["contradicting_pairs"] > 0
    )


def test_default_export_is_precise_against_the_simulators_truth(built):
    root, a, _ = built
    quality = {i: q for i, (q, _) in load_truth(root / "truth")[0].items()}
    image_of = dict(zip(a.images.column("uid").to_pylist(), a.images.column("image_id").to_pylist()))
    right = total = 0
    for f in sorted((root / "out_a" / "pickapic").glob("train-*.parquet")):
        t = pq.read_table(f, columns=["image_0_uid", "image_1_uid", "label_0"]).to_pydict()
        for u0, u1, lab in zip(t["image_0_uid"], t["image_1_uid"], t["label_0"]):
            w, l_ = (u0, u1) if lab == 1.0 else (u1, u0)
            right += quality[image_of[w]] > quality[image_of[l_]]
            total += 1
    assert total > 100 and right / total >= 0.95


def test_per_user_pairs_have_their_own_export_with_user_ids(built):
    datasets = pytest.importorskip("datasets")
    root, a, _ = built
    dd = datasets.load_dataset("parquet", data_dir=str(root / "out_a" / "per_user" / "pickapic"))
    users = _kind(a, "user")
    assert dd["train"].num_rows + dd["validation"].num_rows == users.num_rows > 100
    rows = _rows(dd["train"])
    assert all(u is not None for _, _, u in rows)
    assert set(dd["train"]["kind"]) == {"user"}
    c = contradicting_pairs([w for w, _, _ in rows], [l_ for _, l_, _ in rows], [u for _, _, u in rows])
    assert c["contradicting_pairs"] == 0 and c["distinct_pairs"] == c["rows"]  # per user: once, consistent


def test_pickapic_rows_decode_and_name_their_winner(built):
    datasets = pytest.importorskip("datasets")
    root, a, _ = built
    ds = datasets.load_dataset("parquet", data_dir=str(root / "out_a" / "pickapic"))["train"]
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
    labels = set(zip(ds["label_0"], ds["label_1"]))
    assert labels == {(1.0, 0.0), (0.0, 1.0)}  # winner side randomised, both sides occur
    winners = dict(zip(a.pairs.column("pair_id").to_pylist(), a.pairs.column("winner_uid").to_pylist()))
    row = ds[0]
    assert Image.open(io.BytesIO(row["jpg_0"])).size == (64, 64)
    best = row["image_0_uid"] if row["label_0"] == 1.0 else row["image_1_uid"]
    assert best == row["best_image_uid"] == winners[row["pair_id"]]
    w_bytes = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
    assert hashlib.sha256(w_bytes).hexdigest()[:32] == best  # uid = content hash of the winner bytes


def test_caption_is_the_prompt_both_images_answer(built):
    _, a, _ = built
    prompt = dict(zip(a.images.column("image_id").to_pylist(), a.images.column("prompt_key").to_pylist()))
    raw = pq.read_table(built[0] / "social" / "images.parquet").to_pydict()
    text = {i: " ".join(p.split()) for i, p in zip(raw["image_id"], raw["prompt"]) if p}
    for r in a.pairs.to_pylist():
        w, l_ = r["winner_image_id"], r["loser_image_id"]
        assert prompt[w] == prompt[l_]
        assert normalize_prompt(r["prompt"]) == normalize_prompt(text[w]) == normalize_prompt(text[l_])
        if text[w] == text[l_]:
            assert r["prompt"] == text[w]


def test_pickapic_row_groups_are_sized_for_image_rows(built):
    root, _, _ = built
    files = sorted((root / "out_a" / "pickapic").glob("train-*.parquet"))
    metas = [pq.ParquetFile(f).metadata for f in files]
    assert len(files) > 1 and max(m.num_rows for m in metas) <= CFG.shard_max_count  # files of 300 rows
    sizes = [m.row_group(i).num_rows for m in metas for i in range(m.num_row_groups)]
    assert len(sizes) > len(files) and max(sizes) <= CFG.pickapic_row_group_rows
    rows = [{"jpg_0": b"x" * 40, "jpg_1": b"y" * 40}] * 10  # 80 bytes a row
    assert [len(c) for c in _chunks(rows, max_rows=100, max_bytes=200)] == [2, 2, 2, 2, 2]
    assert [len(c) for c in _chunks(rows, max_rows=3, max_bytes=10_000)] == [3, 3, 3, 1]
    assert [len(c) for c in _chunks(rows[:2], max_rows=5, max_bytes=10)] == [1, 1]  # a large row alone


def test_webdataset_shards_read_back(built):
    root, a, _ = built
    for kind, folder in (("population", "webdataset"), ("user", "per_user/webdataset")):
        samples, groups = [], {}
        for split in ("train", "eval"):
            wd = root / "out_a" / folder / split
            assert verify_manifest(wd) == []
            m = read_manifest(wd)
            assert m["split"] == split and m["kind"] == kind and m["num_samples"] > 0
            got = list(wds.WebDataset([str(wd / s["name"]) for s in m["shards"]], shardshuffle=False))
            assert len(got) == m["num_samples"]
            groups[split] = {json.loads(x["json"])["prompt_group"] for x in got}
            samples += got
        assert not groups["train"] & groups["eval"]  # split by prompt group
        assert len(samples) == _kind(a, kind).num_rows
        meta = [json.loads(x["json"]) for x in samples]
        assert {m["kind"] for m in meta} == {kind}
        assert all((m["user_id"] is None) == (kind == "population") for m in meta)
        s, m0 = samples[0], meta[0]
        assert {"caption", "label_0", "label_1", "user_id", "uid_0", "uid_1", "evidence"} <= set(m0)
        assert m0["label_0"] + m0["label_1"] == 1
        assert hashlib.sha256(s["0.jpg"]).hexdigest()[:32] == m0["uid_0"]


def test_same_input_and_config_give_identical_outputs(built):
    root, a, b = built
    assert a.pairs.equals(b.pairs) and a.users.equals(b.users) and a.rejects.equals(b.rejects)
    for folder in ("webdataset/train", "webdataset/eval", "per_user/webdataset/train"):
        ma, mb = read_manifest(root / "out_a" / folder), read_manifest(root / "out_b" / folder)
        assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    for folder in ("pickapic", "per_user/pickapic"):
        fa, fb = (
            sorted((root / "out_a" / folder).glob("*.parquet")),
            sorted((root / "out_b" / folder).glob("*.parquet")),
        )
        assert fa and [p.read_bytes() for p in fa] == [p.read_bytes() for p in fb]
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


# ---------------------------------------------------------------- issue 25: the fast writers change no byte


def _reference_rows(pairs, split):
    """The rows of one split, in table order, with the side their winner goes to, computed the
    plain way (one row dict and one stable_key per pair): what the exports were written from."""
    from pipeline.ids import stable_key
    from pipeline.splits import hash_split

    for row in pairs.to_pylist():
        if hash_split(row["prompt_group"], CFG.eval_fraction, "social-v1") == split:
            yield row, int(stable_key("social-side", CFG.seed, row["pair_id"])[:8], 16) & 1


def _image_files(root, result):
    from pipeline.decode import as_jpeg

    models = pq.read_table(root / "social" / "images.parquet", columns=["image_id", "model"]).to_pydict()
    model_of = dict(zip(models["image_id"], models["model"]))
    paths = dict(zip(result.images.column("image_id").to_pylist(), result.images.column("path").to_pylist()))
    jpg = {}

    def image(i):
        if i not in jpg:
            with open(paths[i], "rb") as f:
                jpg[i] = as_jpeg(f.read())
        return jpg[i], model_of[i]

    return image


def test_exported_members_and_rows_match_a_plain_reference(built):
    """Every tar member (name and bytes, in order) and every Pick-a-Pic row of both exports equals
    what a plain per-row reference builds from the pairs table (webdataset's own sample layout,
    json.dumps, the image files): the header-template tar writer and the batched row building
    change nothing."""
    import tarfile

    root, a, _ = built
    image = _image_files(root, a)
    for kind, wd_folder, pp_folder in (
        ("population", "webdataset", "pickapic"),
        ("user", "per_user/webdataset", "per_user/pickapic"),
    ):
        pairs = _kind(a, kind)
        for split, pp_name in (("train", "train"), ("eval", "validation")):
            want_members, want_rows = [], []
            for row, side in _reference_rows(pairs, split):
                ids = [row["winner_image_id"], row["loser_image_id"]]
                uids = [row["winner_uid"], row["loser_uid"]]
                if side == 1:
                    ids, uids = ids[::-1], uids[::-1]
                meta = {
                    "caption": row["prompt"], "label_0": 1 - side, "label_1": side, "user_id": row["user_id"],
                    "kind": row["kind"], "pair_id": row["pair_id"], "prompt_group": row["prompt_group"],
                    "image_id_0": ids[0], "image_id_1": ids[1], "uid_0": uids[0], "uid_1": uids[1], "uids": uids,
                    "winner_uid": row["winner_uid"], "split": split,
                    "evidence": {k: row[k] for k in (
                        "prob", "prob_margin", "winner_exposure", "loser_exposure", "winner_impressions",
                        "loser_impressions", "winner_expected", "loser_expected", "winner_score",
                        "loser_score", "winner_rate", "loser_rate", "sessions")},
                }
                want_members += [
                    (f"{row['pair_id']}.0.jpg", image(ids[0])[0]),
                    (f"{row['pair_id']}.1.jpg", image(ids[1])[0]),
                    (f"{row['pair_id']}.json",
                     json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()),
                ]
                want_rows.append({
                    "are_different": uids[0] != uids[1], "best_image_uid": row["winner_uid"],
                    "caption": row["prompt"], "has_label": True, "image_0_uid": uids[0], "image_1_uid": uids[1],
                    "jpg_0": image(ids[0])[0], "jpg_1": image(ids[1])[0],
                    "label_0": float(1 - side), "label_1": float(side),
                    "model_0": image(ids[0])[1], "model_1": image(ids[1])[1],
                    "ranking_id": int(row["pair_id"][:15], 16), "user_id": row["user_id"],
                    "pair_id": row["pair_id"], "kind": row["kind"], "prob": row["prob"],
                })
            wd = root / "out_a" / wd_folder / split
            got_members = []
            for shard in read_manifest(wd)["shards"]:
                with tarfile.open(wd / shard["name"]) as tf:
                    got_members += [(m.name, tf.extractfile(m).read()) for m in tf]
            assert got_members == want_members, f"{wd_folder}/{split}"
            files = sorted((root / "out_a" / pp_folder).glob(f"{pp_name}-*.parquet"))
            got_rows = [r for f in files for r in pq.read_table(f).to_pylist()]
            assert got_rows == want_rows, f"{pp_folder}/{pp_name}"
            assert want_rows or split == "eval"


def test_image_cache_keeps_recent_bytes_within_its_bound():
    from pipeline.cache import BytesLRU

    loads = []
    cache = BytesLRU(lambda n: loads.append(n) or b"x" * n, max_bytes=10)
    assert cache.get(4) == b"xxxx" and cache.get(4) == b"xxxx" and cache.get(5) == b"x" * 5
    assert loads == [4, 5] and cache.bytes == 9
    cache.get(3)  # 12 bytes: the least recently used (4) goes
    assert cache.bytes == 8 and cache.evictions == 1
    cache.get(5)
    cache.get(4)  # read again
    assert loads == [4, 5, 3, 4] and cache.bytes <= 10
    assert cache.get(20) == b"x" * 20 and cache.bytes == 20  # one larger than the bound is still kept


def test_winner_sides_equal_winner_side_per_pair():
    from pipeline.social.export import winner_side, winner_sides

    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(2_000)] + ["", "x" * 200]
    for seed in (0, 1, 7):
        got = winner_sides(ids, seed)
        assert got == [winner_side(i, seed) for i in ids]
    assert 0.4 < sum(winner_sides(ids)) / len(ids) < 0.6
