"""A full disk or a refused permission fails the write with the destination in the message and leaves
nothing partial behind. The tests run as root, where permissions do not stop writes, so the faults
are injected where the operating system would raise them."""

import errno
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import WriteFailed, write_bytes_atomic, write_parquet_atomic


def _table(n: int) -> pa.Table:
    return pa.table({"uid": [f"u{i:05d}" for i in range(n)], "x": list(range(n))})


def _folder_listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_full_disk_while_writing_parquet_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    dest = tmp_path / "tables" / "images" / "p1.parquet"
    write_parquet_atomic(_table(3), dest)
    before = dest.read_bytes()
    real_write = pq.write_table

    def disk_fills_up(table, where, **kw):
        real_write(table, where, **kw)  # the bytes land, then the disk is full: a partial temp file exists
        assert os.path.getsize(where) > 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.pq, "write_table", disk_fills_up)
    with pytest.raises(WriteFailed) as e:
        write_parquet_atomic(_table(1000), dest)
    assert str(dest) in str(e.value) and e.value.errno == errno.ENOSPC
    assert isinstance(e.value, OSError)
    assert _folder_listing(dest.parent) == ["p1.parquet"]  # no .p1.parquet.*.tmp left
    assert dest.read_bytes() == before


def test_full_disk_while_writing_bytes(tmp_path, monkeypatch):
    dest = tmp_path / "partitions" / "files-000000.json"
    real_fdopen = os.fdopen

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode: HalfWritten(real_fdopen(fd, mode)))
    with pytest.raises(WriteFailed) as e:
        write_bytes_atomic(b"x" * 10_000, dest)
    assert str(dest) in str(e.value) and e.value.errno == errno.ENOSPC
    assert _folder_listing(dest.parent) == []


def test_permission_refused_on_the_temp_file(tmp_path, monkeypatch):
    dest = tmp_path / "out" / "rejects.parquet"

    def refused(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, prefix + "x" + suffix))

    monkeypatch.setattr(storage.tempfile, "mkstemp", refused)
    with pytest.raises(WriteFailed) as e:
        write_parquet_atomic(_table(2), dest)
    assert str(dest) in str(e.value) and e.value.errno == errno.EACCES
    assert not dest.exists() and _folder_listing(dest.parent) == []


def test_permission_refused_on_the_rename(tmp_path, monkeypatch):
    dest = tmp_path / "datasets" / "manifest.json"
    write_bytes_atomic(b"old", dest)

    def refused(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), src, dst)

    monkeypatch.setattr(storage.os, "replace", refused)
    with pytest.raises(WriteFailed) as e:
        write_bytes_atomic(b"new", dest)
    assert str(dest) in str(e.value) and e.value.errno == errno.EACCES
    assert _folder_listing(dest.parent) == ["manifest.json"] and dest.read_bytes() == b"old"


def test_folder_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "tables"
    blocker.write_text("a file where the folder should be")  # a real fault, no injection
    dest = blocker / "images" / "p.parquet"
    with pytest.raises(WriteFailed) as e:
        write_parquet_atomic(_table(1), dest)
    assert str(dest) in str(e.value) and e.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert blocker.read_text() == "a file where the folder should be"


def test_other_errors_still_clean_up(tmp_path, monkeypatch):
    dest = tmp_path / "t.parquet"

    def interrupted(table, where, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.pq, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_parquet_atomic(_table(1), dest)
    assert _folder_listing(tmp_path) == []
