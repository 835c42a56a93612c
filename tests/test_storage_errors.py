"""A full disk or a refused permission fails the write with the destination in the message and leaves
nothing partial behind. The tests run as root, where permissions do not stop writes, so the faults
are injected where the operating system would raise them."""

import errno
import itertools
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


# ---------------------------------------------------------------- the multi-identity writer (issue 21)


def _disk_full_after(monkeypatch, target, attr, n_ok: int):
    """target.attr(...) works n_ok times, then fails as a full disk does (an OSError without a file name)."""
    real = getattr(target, attr)
    calls = {"n": 0}

    def write(*a, **kw):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **kw)

    monkeypatch.setattr(target, attr, write)


@pytest.mark.parametrize("where", ["write", "_write_through"])  # as a piece is queued / in the writer's thread
def test_full_disk_in_the_multi_identity_shard_writer_names_the_shard(tmp_path, monkeypatch, where):
    from test_multiid_units import _synthetic_tables

    from pipeline import shards
    from pipeline.multiid import MultiIDConfig, build_multiid_dataset

    images, faces, ids = _synthetic_tables(tmp_path, n_ids=8, n_images=20)
    out = tmp_path / "version"
    _disk_full_after(monkeypatch, shards._HashingFile, where, 3)
    with pytest.raises(WriteFailed) as e:
        build_multiid_dataset(images, faces, ids, out, MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False))
    assert e.value.errno == errno.ENOSPC
    named = str(e.value).split("cannot write ", 1)[1].split(":", 1)[0]
    assert named.startswith(str(out)) and named.endswith(".tar"), str(e.value)
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]  # no half shard left


def test_full_disk_seen_only_when_the_last_shard_closes_leaves_no_half_shard(tmp_path, monkeypatch):
    """The writer thread fails on the archive's last piece (its end blocks), after the last write() returned: the
    error shows only at close(), with no exception in flight, and the half shard must still be removed."""
    import threading

    from pipeline import shards

    real = shards._HashingFile._write_through
    failed = threading.Event()

    def end_blocks_fail(self, data):
        if len(data) >= 1024 and not any(data):  # two zero blocks and the record's padding
            failed.set()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(shards._HashingFile, "_write_through", end_blocks_fail)
    out = tmp_path / "shards"
    with pytest.raises(WriteFailed) as e:
        shards.write_shards([{"__key__": f"k{i}", "txt": f"sample {i}"} for i in range(3)], out, "x")
    assert failed.is_set() and e.value.errno == errno.ENOSPC and "x-000000.tar" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == []  # neither the shard nor its .partial


def test_full_disk_while_the_tables_are_written_beside_the_shards_names_the_table(tmp_path, monkeypatch):
    """With worker processes the two tables are written by a forked process while this one writes the shards:
    a full disk there fails the build here, naming the table, with no temporary file left."""
    from test_multiid_units import _synthetic_tables

    from pipeline.multiid import MultiIDConfig, build, build_multiid_dataset

    images, faces, ids = _synthetic_tables(tmp_path, n_ids=8, n_images=20)
    out, pids = tmp_path / "version", tmp_path / "pids"
    real = build.write_parquet_stream_atomic

    def full_midway(tables, schema, path, *a, **kw):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        if path.name != "candidates.parquet":
            return real(tables, schema, path, *a, **kw)

        def then_full():
            yield from itertools.islice(tables, 1)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(then_full(), schema, path, *a, **kw)

    monkeypatch.setattr(build, "write_parquet_stream_atomic", full_midway)
    with pytest.raises(WriteFailed) as e:
        build_multiid_dataset(images, faces, ids, out, MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False),
                              workers=2)
    assert e.value.errno == errno.ENOSPC and str(out / "candidates.parquet") in str(e.value)
    assert {int(p) for p in pids.read_text().split()} - {os.getpid()}, "the tables were not written by another process"
    assert (out / "pairs.parquet").exists() and not (out / "candidates.parquet").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_full_disk_in_the_multi_identity_part_files_names_the_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from test_multiid_units import _synthetic_tables

    from pipeline.multiid import MultiIDConfig, build_multiid_dataset

    images, faces, ids = _synthetic_tables(tmp_path, n_ids=8, n_images=20)
    out = tmp_path / "version"
    _disk_full_after(monkeypatch, pq.ParquetWriter, "write_table", 0)
    with pytest.raises(WriteFailed) as e:
        build_multiid_dataset(images, faces, ids, out, MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False))
    assert e.value.errno == errno.ENOSPC and str(out) in str(e.value) and ".parquet" in str(e.value)


def test_full_disk_while_copying_a_reused_shard_names_it(tmp_path, monkeypatch):
    import shutil

    from pipeline.shards import link_or_copy

    src, dst = tmp_path / "old" / "s-000000.tar", tmp_path / "new" / "s-000000.tar"
    src.parent.mkdir()
    src.write_bytes(b"x" * 10_000)

    def no_link(a, b):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    def half_copy(a, b):
        with open(b, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(WriteFailed) as e:
        link_or_copy(src, dst)
    assert str(dst) in str(e.value) and e.value.errno == errno.ENOSPC
    assert not dst.exists()
