"""Atomic Parquet writes and reads of lineup's tables, on a local disk or in an object store.

Local files are written to a temporary name and renamed. An object store has no rename, but a PUT is
atomic: the object appears whole or not at all, so a reader never sees half a file there either. Paths
under an ``s3://`` store are ``upath.UPath`` objects (pipeline.config.as_path).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # what open() would give: mkstemp's 0600 is for secrets, not datasets
DIR_MODE = 0o777 & ~_current_umask()


def is_remote(path) -> bool:
    """A path in an object store (a upath.UPath of a non-local protocol)."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


def as_dir(path):
    """``path`` as a path object: a store path stays what it is, anything else becomes a local ``Path``."""
    return path if is_remote(path) else Path(path)


def make_world_readable(path: Path) -> None:
    """Give a file, or a folder and everything in it, the modes an ordinary write would have."""
    if is_remote(path):
        return  # object permissions are the bucket's policy
    path = Path(path)
    if path.is_dir():
        os.chmod(path, DIR_MODE)
        for p in path.rglob("*"):
            os.chmod(p, DIR_MODE if p.is_dir() else FILE_MODE)
    elif path.exists():
        os.chmod(path, FILE_MODE)


class WriteFailed(OSError):
    """A write that did not happen: the destination is in the message, the errno is kept (ENOSPC,
    EACCES, ...), no temporary file is left behind and an earlier file at the destination is intact."""


def _write_failed(path: Path, error: BaseException) -> WriteFailed:
    errno = getattr(error, "errno", None)
    why = getattr(error, "strerror", None) or str(error) or type(error).__name__
    where = getattr(error, "filename", None)
    detail = f"{why} ({where})" if where and str(where) != str(path) else why
    message = f"cannot write {path}: {detail}; nothing was written there"
    return WriteFailed(errno, message) if errno is not None else WriteFailed(message)


def named_write_error(path, error: BaseException) -> BaseException:
    """``error`` as a :class:`WriteFailed` naming ``path`` (errno kept) when it is an OSError that does
    not name its destination yet; anything else unchanged. For writers that stream into their own files
    (tar shards, Parquet part files) rather than through the atomic writers here."""
    if isinstance(error, WriteFailed) or not isinstance(error, OSError):
        return error
    return _write_failed(path, error)


def _remove_quietly(tmp: str) -> None:
    try:
        Path(tmp).unlink(missing_ok=True)
    except OSError:  # the write error matters more than a temp file the same fault left behind
        pass


def _atomic_write(path: Path, write) -> Path:
    """Write through write(tmp) to a temporary file in the destination's folder, then rename: readers
    never see half a file. An OSError (full disk, no permission, read-only file system) becomes a
    WriteFailed naming the destination, after the temporary file is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        write(fd, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            _remove_quietly(tmp)
        raise _write_failed(path, e) from e
    except BaseException:
        if tmp is not None:
            _remove_quietly(tmp)
        raise
    return path


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # one PUT (or a multipart upload completed at close): atomic
            pq.write_table(table, f, compression="zstd")
        return path

    def write(fd: int, tmp: str) -> None:
        os.close(fd)
        pq.write_table(table, tmp, compression="zstd")

    return _atomic_write(path, write)


PARQUET_ROW_GROUP = 1 << 20  # rows per row group of a streamed file (pyarrow's default for write_table)


def write_parquet_stream_atomic(tables, schema: pa.Schema, path: Path, row_group: int = PARQUET_ROW_GROUP) -> Path:
    """``write_parquet_atomic`` of the concatenation of ``tables`` (an iterable of tables or record
    batches of ``schema``), holding one row group at a time, not the whole table. Row groups are cut
    every ``row_group`` rows whatever the pieces' sizes, so the file depends only on the rows."""
    def pump(sink) -> None:
        buf, n = [], 0
        with pq.ParquetWriter(sink, schema, compression="zstd") as w:
            for t in tables:
                t = pa.Table.from_batches([t]) if isinstance(t, pa.RecordBatch) else t
                if not t.num_rows:
                    continue
                buf.append(t.cast(schema))
                n += t.num_rows
                while n >= row_group:
                    whole = pa.concat_tables(buf)
                    w.write_table(whole.slice(0, row_group), row_group_size=row_group)
                    rest = whole.slice(row_group)
                    buf, n = [rest], rest.num_rows
            if n:
                w.write_table(pa.concat_tables(buf), row_group_size=row_group)

    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # one PUT (or a multipart upload completed at close): atomic
            pump(f)
        return path

    def write(fd: int, tmp: str) -> None:
        os.close(fd)
        pump(tmp)

    return _atomic_write(path, write)


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    if is_remote(path):  # one PUT: atomic
        path.fs.pipe_file(path.path, data)
        return path

    def write(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    return _atomic_write(path, write)


def remove_tree(path) -> None:
    """Delete a folder (or prefix) and everything in it; nothing if it is not there."""
    if is_remote(path):
        if path.fs.exists(path.path):
            path.fs.rm(path.path, recursive=True)
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    if is_remote(path):
        return pq.read_table(path.path, columns=columns, filesystem=path.fs)
    return pq.read_table(path, columns=columns)


def parquet_rows(path) -> int:
    """Rows of a Parquet file, from its footer."""
    if is_remote(path):
        with path.open("rb") as f:
            return pq.read_metadata(f).num_rows
    return pq.read_metadata(path).num_rows


def read_partitioned(table_dir: Path, keys: list[str] | None = None) -> pa.Table | None:
    """Concatenate the per-partition files of a table (all of them, or the given keys), in key order."""
    table_dir = as_dir(table_dir)
    if keys is None:
        files = sorted(table_dir.glob("*.parquet"))
    else:
        files = [table_dir / f"{k}.parquet" for k in sorted(keys)]
        files = [f for f in files if f.exists()]
    if not files:
        return None
    tables = [read_parquet(f) for f in files]
    return pa.concat_tables(tables, promote_options="default")
