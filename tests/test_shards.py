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
    with pytest.raises(RuntimeError), ShardSink(tmp_path, "ds", max_count=100) as sink:
        sink.write({"__key__": "a", "txt": "x"})
        raise RuntimeError("boom")
    assert list(tmp_path.glob("*.tar")) == [] and list(tmp_path.glob(".*partial")) == []


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([{"__key__": "a", "txt": "x"}, {"__key__": "a", "txt": "y"}], tmp_path, "ds")


# ---------------------------------------------------------------- the header-template tar writer (issue 25)


def _members_cases():
    """Member lists that cover the header's edge cases: sizes around a block, an empty member, a
    name of exactly 100 bytes, longer names (pax header), a non-ASCII name (pax header), none, an
    end of data one block short of a whole record."""
    sizes = [0, 1, 511, 512, 513, 1024, 5000, 10_239, 10_240, 10_241]
    yield [(f"k{i:03d}.bin", bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    yield [("a" * 95 + ".json", b"{}"), ("b" * 96 + ".json", b"[1]"), ("c" * 150 + ".txt", b"x" * 700)]
    yield [("dir/sub/key_1-x.0.jpg", b"\xff\xd8" + b"j" * 3000), ("caf\u00e9.txt", "\u00e9t\u00e9".encode())]
    yield []
    yield [("edge.bin", b"e" * 9216)]  # ends 512 bytes before a record: the two zero blocks need one more record


def _via_webdataset(members, mtime=0, mode=0o444) -> bytes:
    import io

    buf = io.BytesIO()
    w = wds.TarWriter(buf, user="", group="", mode=mode, encoder=False, mtime=mtime)
    for name, data in members:
        key, ext = name.split(".", 1)
        w.write({"__key__": key, ext: data})
    w.tarstream.close()  # TarWriter.close would close the BytesIO too
    return buf.getvalue()


def _via_ustar(members, **kw) -> bytes:
    import io

    from pipeline.shards import UstarWriter

    buf = io.BytesIO()
    w = UstarWriter(buf, **kw)
    for name, data in members:
        w.write(name, data)
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize("case", range(5))
def test_ustar_writer_gives_webdatasets_bytes(case):
    members = list(_members_cases())[case]
    assert _via_ustar(members) == _via_webdataset(members)
    assert _via_ustar(members, mtime=1_700_000_000, mode=0o644) == _via_webdataset(
        members, mtime=1_700_000_000, mode=0o644
    )


def test_ustar_writer_reads_back_with_tarfile(tmp_path):
    import io
    import tarfile

    members = [m for case in _members_cases() for m in case]
    data = _via_ustar(members)
    assert len(data) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        got = [(m.name, tf.extractfile(m).read(), m.mode, m.mtime, m.uid, m.uname) for m in tf]
    assert got == [(n, d, 0o444, 0, 0, "") for n, d in members]


def test_ustar_writer_refuses_a_fractional_mtime():
    import io

    from pipeline.shards import UstarWriter

    with pytest.raises(ValueError, match="mtime"):
        UstarWriter(io.BytesIO(), mtime=1.5)


def test_sharded_samples_are_webdatasets_bytes(tmp_path):
    """A shard written by ShardSink is the file webdataset's TarWriter writes for the same samples
    (same members, same order, same headers): what shards written before issue 25 were."""
    samples = [
        {"__key__": f"p{i:05d}", "0.jpg": b"\xff\xd8" + bytes([i]) * (300 + 97 * i), "json": {"i": i, "s": "\u00e9"}, "1.jpg": b"j" * i}
        for i in range(40)
    ]
    shards = write_shards(samples, tmp_path, "ds", max_count=15)
    from pipeline.shards import encode_member

    for n, sh in enumerate(shards):
        part = samples[15 * n : 15 * (n + 1)]
        members = [(f"{s['__key__']}.{e}", encode_member(e, s[e])) for s in part for e in sorted(k for k in s if k != "__key__")]
        assert (tmp_path / sh.name).read_bytes() == _via_webdataset(members)
    got = list(wds.WebDataset([str(tmp_path / s.name) for s in shards], shardshuffle=False))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    assert got[7]["0.jpg"] == samples[7]["0.jpg"] and got[7]["1.jpg"] == samples[7]["1.jpg"]
