"""shards.tar_files (the reader a refresh copies a version's samples with) gives what tarfile gives, for the
tars this project writes and for those it does not (pax, GNU, compressed, links, damaged)."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from pipeline.shards import UstarWriter, iter_shard, tar_files


def _tarfile_view(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]


def _ours(data: bytes) -> list[tuple[str, bytes]]:
    return [(n, read()) for n, read in tar_files(io.BytesIO(data))]


def _ustar(members) -> bytes:
    buf = io.BytesIO()
    w = UstarWriter(buf)
    w.write_members(members)
    w.close()
    return buf.getvalue()


def _tarfile_written(fmt, members, link: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
            if link:
                li = tarfile.TarInfo(name + ".lnk")
                li.type, li.linkname = tarfile.SYMTYPE, name
                tf.addfile(li)
    return buf.getvalue()


MEMBERS = [("k1.json", b'{"a": 1}'), ("k1.jpg", bytes(range(256)) * 5), ("k2.json", b""), ("d/k3.txt", b"x" * 512)]


@pytest.mark.parametrize("make", [
    lambda: _ustar(MEMBERS),
    lambda: _ustar(MEMBERS + [("k" * 120 + ".json", b"long name: a pax header")]),
    lambda: _tarfile_written(tarfile.GNU_FORMAT, MEMBERS + [("g" * 130 + ".txt", b"gnu long name")]),
    lambda: _tarfile_written(tarfile.USTAR_FORMAT, [("p" * 90 + "/" + "q" * 60 + ".txt", b"prefix field")] + MEMBERS),
    lambda: _tarfile_written(tarfile.PAX_FORMAT, MEMBERS, link=True),
    lambda: gzip.compress(_ustar(MEMBERS), mtime=0),
    lambda: _ustar([]),
])
def test_members_are_those_tarfile_reads(make):
    data = make()
    assert _ours(data) == _tarfile_view(data)


def test_a_tar_cut_short_or_damaged_reads_as_tarfile_reads_it():
    data = _ustar(MEMBERS)
    for cut in (data[:3 * 512 + 100], data[:2 * 512]):  # in the second member's data; at a header, no end blocks
        try:
            want = _tarfile_view(cut)
        except tarfile.ReadError:
            with pytest.raises(tarfile.ReadError):
                _ours(cut)
        else:
            assert _ours(cut) == want
    bad = bytearray(data)
    bad[520] ^= 0xFF  # the second member's data: not a header, read as is
    assert _ours(bytes(bad))[0] == _tarfile_view(bytes(bad))[0]
    torn = bytearray(data)
    torn[2 * 512 + 3] ^= 0xFF  # the second header's name: its checksum no longer holds (tarfile stops there)
    assert _ours(bytes(torn)) == _tarfile_view(bytes(torn)) == [MEMBERS[0]]
    with pytest.raises(tarfile.ReadError):  # a first header that is none: not a tar
        _ours(b"not a tar" * 100)


def test_iter_shard_skips_unwanted_samples_and_extensions(tmp_path):
    p = tmp_path / "s.tar"
    p.write_bytes(_ustar(MEMBERS))
    got = list(iter_shard(p, exts=("json",), keys={"k1", "k2"}))
    assert got == [{"__key__": "k1", "__shard__": "s.tar", "json": b'{"a": 1}'}, {"__key__": "k2", "__shard__": "s.tar", "json": b""}]
    assert [r["__key__"] for r in iter_shard(p, exts=None)] == ["k1", "k2", "d/k3"]
