import hashlib

import pytest
import webdataset as wds

from pipeline.shards import ShardSink, read_manifest, verify_manifest, write_manifest, write_shards


def _samples(n):
    for i in range(n):
        yield {"__key__": f"s{i:04d}", "txt": f"caption {i}", "json": {"i": i, "uids": [f"u{i}"]}, "bin": bytes([i % 256]) * 10}


def test_shards_are_byte_identical_and_split_by_count(tmp_path):
    a = write_shards(_samples(25), tmp_path / "a", "ds", max_count=10)
    b = write_shards(_samples(25), tmp_path / "b", "ds", max_count=10)
    assert [s.samples for s in a] == [10, 10, 5]
    for sa, sb in zip(a, b):
        assert sa.sha256 == sb.sha256
        assert hashlib.sha256((tmp_path / "a" / sa.name).read_bytes()).hexdigest() == sa.sha256


def test_shards_read_back_with_webdataset(tmp_path):
    shards = write_shards(_samples(7), tmp_path, "ds", max_count=4)
    urls = [str(tmp_path / s.name) for s in shards]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [f"s{i:04d}" for i in range(7)]
    assert got[3]["json"] == {"i": 3, "uids": ["u3"]}
    assert got[3]["txt"] == "caption 3"


def test_manifest_verifies_and_detects_tampering(tmp_path):
    shards = write_shards(_samples(5), tmp_path, "ds", max_count=2)
    write_manifest(tmp_path, "demo", shards, {"k": 1})
    m = read_manifest(tmp_path)
    assert m["num_samples"] == 5 and len(m["shards"]) == 3
    assert verify_manifest(tmp_path) == []
    (tmp_path / shards[0].name).write_bytes(b"x")
    assert any("sha256" in p for p in verify_manifest(tmp_path))


@pytest.mark.parametrize("key", ["a.b", "", "../x", "/abs"])
def test_bad_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError):
        write_shards([{"__key__": key, "txt": "x"}], tmp_path, "ds")


def test_crash_leaves_no_readable_half_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardSink(tmp_path, "ds", max_count=100) as sink:
            sink.write({"__key__": "a", "txt": "x"})
            raise RuntimeError("boom")
    assert list(tmp_path.glob("*.tar")) == [] and list(tmp_path.glob(".*partial")) == []


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([{"__key__": "a", "txt": "x"}, {"__key__": "a", "txt": "y"}], tmp_path, "ds")
