"""Reposts: an image posted again under a new image_id (same bytes) is one image. Its copy is
rejected with a reason naming the original, its events count for the original, and the build
(exports included) gives what the log without reposts gives."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.simulate import SimConfig, simulate

CFG = SocialConfig(min_exposure=10)


def _repost(src, dst, n_copies: int):
    """dst: the log of src where the n_copies most exposed images of pairs were re-posted by
    another account an hour later; the events of odd-numbered users after that hour are moved to
    the copy's image_id. Returns the copies' ids and their originals."""
    shutil.copytree(src, dst)
    images = pq.read_table(dst / "images.parquet")
    ev_files = sorted(dst.glob("events-*.parquet"))
    counts: dict[str, int] = {}
    for f in ev_files:
        for i in pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist():
            counts[i] = counts.get(i, 0) + 1
    rows = images.to_pylist()
    originals = sorted(rows, key=lambda r: (-counts.get(r["image_id"], 0), r["image_id"]))[:n_copies]
    copy_of = {}
    for k, r in enumerate(originals):
        copy = dict(r)
        copy["image_id"] = f"repost{k:03d}"
        copy["creator_id"] = f"reposter{k}"
        copy["created_at"] = r["created_at"] + np.timedelta64(1, "h").astype("timedelta64[us]").item()
        copy["path"] = f"files/repost{k:03d}.jpg"
        shutil.copyfile(dst / r["path"], dst / copy["path"])  # same bytes, another file
        rows.append(copy)
        copy_of[r["image_id"]] = (copy["image_id"], copy["created_at"])
    pq.write_table(pa.Table.from_pylist(rows, schema=images.schema), dst / "images.parquet")
    for f in ev_files:
        t = pq.read_table(f)
        d = t.to_pydict()
        moved = 0
        for j, (i, u, ts) in enumerate(zip(d["image_id"], d["user_id"], d["ts"])):
            if i in copy_of and int(u[1:]) % 2 == 1 and ts > copy_of[i][1]:
                d["image_id"][j] = copy_of[i][0]
                moved += 1
        if moved:
            pq.write_table(pa.table({k: pa.array(v) for k, v in d.items()}), f)
    return {c: o for o, (c, _) in copy_of.items()}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("repost")
    simulate(root / "plain", root / "truth", SimConfig(n_events=40_000, seed=11))
    copies = _repost(root / "plain", root / "reposted", 6)
    return root, copies


def test_reposts_build_and_are_rejected_with_the_original_named(logs):
    root, copies = logs
    r = build_social_pairs(root / "reposted", root / "out_reposted", CFG)  # crashed before
    rej = r.rejects.filter(pc.field("reason") == "duplicate image content").to_pylist()
    assert len(rej) == len(copies)
    for row in rej:
        copy = row["detail"].split()[0].removeprefix("image_id=").rstrip(":")
        assert copies[copy] in row["detail"] and row["uid"]
    s = r.stats
    assert s["image_rows_in"] == s["images_accepted"] + s["images_rejected"]
    assert s["events_in"] == s["events_accepted"] + s["events_rejected"]
    ids = set(r.images.column("image_id").to_pylist())
    assert not ids & set(copies) and set(copies.values()) <= ids
    uids = r.images.column("uid").to_pylist()
    assert len(uids) == len(set(uids))


def test_reposted_events_are_pooled_into_the_original(logs):
    root, copies = logs
    plain = build_social_pairs(root / "plain", None, CFG)
    reposted = build_social_pairs(root / "reposted", None, CFG)
    cols = ["image_id", "exposed", "score", "events_accepted"]
    a = plain.images.select(cols).to_pydict()
    b = reposted.images.select(cols).to_pydict()
    assert a == b  # the same events, counted for the same images
    pa_ = plain.pairs.select(["winner_image_id", "loser_image_id", "user_id"]).to_pylist()
    pb = reposted.pairs.select(["winner_image_id", "loser_image_id", "user_id"]).to_pylist()
    moved = [p for p in pb if set(copies.values()) & {p["winner_image_id"], p["loser_image_id"]}]
    assert moved and pa_ == pb
