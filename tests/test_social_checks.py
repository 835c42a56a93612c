"""The social dataset's blocking checks compare independent measurements, so each can fail:
a test breaks each one and sees it fail."""

import io
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.social.build as build_mod
from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.checks import count_rows, events_reconcile, no_self_pairs, shards_match_manifest
from pipeline.social.simulate import SimConfig, simulate

CFG = SocialConfig(min_exposure=10)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    simulate(
        root / "social",
        root / "truth",
        SimConfig(n_events=60_000, n_users=400, n_bots=0, inject_bad=1, seed=21),
    )
    build_social_pairs(root / "social", root / "clean", CFG)
    return root


@pytest.fixture
def out(log, tmp_path):
    """A copy of the clean build, free to tamper with."""
    dst = tmp_path / "out"
    shutil.copytree(log / "clean", dst)
    return dst


def test_clean_build_passes_every_check(log):
    r = events_reconcile(log / "social", log / "clean")
    assert r.passed, r.metadata
    assert r.metadata["events_rejected_written"] > 0 and r.metadata["images_rejected_written"] > 0
    assert shards_match_manifest(log / "clean").passed
    assert no_self_pairs(log / "clean").passed


def test_input_rows_are_counted_without_duckdb(tmp_path):
    p = tmp_path / "events-x.csv"
    p.write_text('ts,user_id,image_id,event\n2026-11-02,u,"a\nb",like\n\n2026-11-02,v,c,like\n')
    assert count_rows(p) == 2  # a quoted newline is one record, a blank line none, the header none


def test_events_reconcile_fails_when_an_event_silently_disappears(log, tmp_path, monkeypatch):
    original = build_mod.register_events

    def lose_one_row(con, *args, **kwargs):
        n = original(con, *args, **kwargs)
        con.execute("ALTER VIEW events_src RENAME TO events_src_all")
        con.execute(
            "CREATE TEMP VIEW events_src AS SELECT * FROM events_src_all "
            "WHERE NOT (_row = 7 AND _file = (SELECT min(_file) FROM events_src_all))"
        )
        return n

    monkeypatch.setattr(build_mod, "register_events", lose_one_row)
    r = build_social_pairs(log / "social", tmp_path / "lossy", CFG)  # the builder's own sums agree...
    assert r.stats["events_in"] == r.stats["events_accepted"] + r.stats["events_rejected"]
    check = events_reconcile(log / "social", tmp_path / "lossy")  # ...the files do not
    assert not check.passed
    m = check.metadata
    assert m["events_in_files"] == m["events_accepted_written"] + m["events_rejected_written"] + 1


def test_events_reconcile_fails_when_an_image_row_silently_disappears(log, tmp_path, monkeypatch):
    original = build_mod.load_images

    def lose_one_image(*args, **kwargs):
        res = original(*args, **kwargs)
        res.table = res.table.slice(1)  # no reject row for it
        return res

    monkeypatch.setattr(build_mod, "load_images", lose_one_image)
    build_social_pairs(log / "social", tmp_path / "lossy", CFG)
    check = events_reconcile(log / "social", tmp_path / "lossy")
    assert not check.passed
    m = check.metadata
    assert m["image_rows_in_files"] == m["images_written"] + m["images_rejected_written"] + 1


def _rewrite_parquet(path, change):
    t = pq.read_table(path)
    pq.write_table(change(t), path)


def test_no_self_pairs_fails_on_a_pickapic_row_showing_one_image_twice(out):
    f = min((out / "pickapic").glob("train-*.parquet"))

    def same_image(t):
        jpg0 = t.column("jpg_0").to_pylist()
        jpg1 = t.column("jpg_1").to_pylist()
        jpg1[0] = jpg0[0]
        return t.set_column(t.schema.get_field_index("jpg_1"), "jpg_1", pa.array(jpg1, pa.binary()))

    _rewrite_parquet(f, same_image)
    check = no_self_pairs(out)
    assert not check.passed and check.metadata["self_pairs"]["pickapic"] == 1


def test_no_self_pairs_and_manifest_fail_on_a_tampered_shard(out):
    shard = min((out / "per_user" / "webdataset" / "train").glob("*.tar"))
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    first_key = members[0][0].name.split(".", 1)[0]
    zero = next(d for m, d in members if m.name == f"{first_key}.0.jpg")
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, d in members:
            if m.name == f"{first_key}.1.jpg":
                d = zero
                m.size = len(d)
            tf.addfile(m, io.BytesIO(d))
    self_check = no_self_pairs(out)
    assert not self_check.passed and self_check.metadata["self_pairs"]["per_user/webdataset"] == 1
    manifest_check = shards_match_manifest(out)
    assert not manifest_check.passed
    assert any("sha256" in p for p in manifest_check.metadata["problems"]["per_user/webdataset/train"])


def test_shards_match_manifest_fails_when_an_export_loses_a_row(out):
    f = min((out / "pickapic").glob("validation-*.parquet"))
    _rewrite_parquet(f, lambda t: t.slice(1))
    check = shards_match_manifest(out)
    assert not check.passed
    c = check.metadata["counts"]["population"]
    assert c["pickapic_rows"] == c["pairs_table"] - 1 == c["webdataset_samples"] - 1


def test_shards_match_manifest_fails_when_a_shard_is_missing(out):
    next((out / "webdataset" / "eval").glob("*.tar")).unlink()
    check = shards_match_manifest(out)
    assert not check.passed
    assert any("missing" in p for p in check.metadata["problems"]["webdataset/eval"])


def test_version_id_follows_content_not_where_or_when_files_were_copied(log, tmp_path, monkeypatch):
    """The same log and photos copied elsewhere (other paths, other mtimes) give the same id; one photo's
    bytes changed give another; with the digest cache an unchanged file is not read again."""
    import os

    import pipeline.social.release as rel
    from pipeline.social.release import social_version

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(log / "social", a)
    shutil.copytree(log / "social", b)
    for f in b.rglob("*"):
        if f.is_file():
            os.utime(f, ns=(1_000_000_000, 1_000_000_000))  # another copy, another time
    va = social_version(a, CFG)[0]
    assert social_version(b, CFG)[0] == va
    photos = sorted(p for p in b.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    assert photos
    reads = []
    real = rel.file_sha256
    monkeypatch.setattr(rel, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    cache = tmp_path / "digests.json"
    assert social_version(b, CFG, digest_cache=cache)[0] == va
    first = len(reads)
    assert first >= len(photos)
    reads.clear()
    assert social_version(b, CFG, digest_cache=cache)[0] == va
    assert not {p.name for p in photos} & set(reads)  # only the log tables are hashed again
    data = bytearray(photos[0].read_bytes())
    data[-3] ^= 0xFF
    photos[0].write_bytes(bytes(data))  # a new mtime: the cache entry no longer applies
    assert social_version(b, CFG, digest_cache=cache)[0] != va
