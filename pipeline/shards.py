"""WebDataset shard writing: deterministic tars, atomic renames, a manifest per dataset version.

The tar members are written by :class:`UstarWriter`, which gives the same bytes as webdataset's
``TarWriter(user="", group="", mode=0o444, mtime=0, encoder=False)`` (Python's tarfile, stream mode,
pax format; members ordered by extension) from a precomputed header template: only the name, size
and checksum differ between members, and building a full ``TarInfo`` per member was half of a large
social export's time. Fixed mtime, owner and mode: the same samples give byte-identical shards.
What this module adds is what webdataset does not do: dot-free key and extension checks (webdataset
splits a member name at its first dot), one sample per key, rotation by sample count and by bytes, writing
each shard under a temporary name that is renamed only when the shard is complete (a crashed run
never leaves a readable half-shard; ``ShardWriter``'s ``opener``/``post`` hooks could rename, but not
discard a half-written shard on error), and the sha256 manifest. The result reads with plain
``webdataset.WebDataset(...)`` and with ``datasets.load_dataset("webdataset", ...)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.storage import named_write_error, write_bytes_atomic

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # a leading "_" is metadata to webdataset
FIXED_MTIME = 0  # every tar header gets this time, for byte-identical shards
MEMBER_MODE = 0o444  # and this mode (owner and group: uid/gid 0, empty names)

_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads the end of an archive to a whole record
_NAME_LEN = 100  # a longer name needs a pax extended header: written by tarfile itself (_slow_header)
_MAX_SIZE = 8**11  # the ustar size field's limit (12 bytes of octal); larger needs pax too
_ZEROS = bytes(_BLOCK)


def _fixed_header_fields(mode: int, mtime: int) -> tuple[bytes, bytes]:
    """The ustar header around the name and size fields, as tarfile writes them for a regular file
    with uid/gid 0 and empty owner names: (mode, uid, gid) and (mtime, 8 spaces for the checksum,
    type, linkname, magic+version, uname, gname, devmajor, devminor, prefix, padding to 512)."""
    head = b"%07o\0" % (mode & 0o7777) + b"0000000\0" * 2
    tail = (
        b"%011o\0" % mtime
        + b" " * 8
        + tarfile.REGTYPE
        + b"\0" * 100
        + tarfile.POSIX_MAGIC
        + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    )
    return head, tail


class UstarWriter:
    """Writes tar members (name, bytes) to a binary file object, byte for byte as webdataset's
    TarWriter (tarfile.open(mode="w|"), pax format) does with uid/gid 0, empty owner names and the
    given mode and mtime; close() writes the two zero blocks and pads to a whole record like
    tarfile. Names longer than 100 bytes or data of 8 GiB and more get tarfile's own header (pax)."""

    def __init__(self, fileobj, mode: int = MEMBER_MODE, mtime: int = FIXED_MTIME):
        if not (isinstance(mtime, int) and 0 <= mtime < 8**11):
            raise ValueError(f"mtime must be a whole number of seconds in [0, 8**11), got {mtime!r}")
        self._f = fileobj
        self._mode, self._mtime = mode, mtime
        self._head, self._tail = _fixed_header_fields(mode, mtime)
        self._tail_before_sum, self._tail_after_sum = self._tail[:12], self._tail[20:]
        self._fixed_sum = sum(self._head) + sum(self._tail)  # the checksum counts its own field as spaces
        self.offset = 0
        self.closed = False

    def _header(self, name: bytes, size: int) -> bytes:
        size_field = b"%011o\0" % size
        chksum = self._fixed_sum + sum(name) + sum(size_field)
        return b"".join(
            (
                name.ljust(_NAME_LEN, b"\0"),
                self._head,
                size_field,
                self._tail_before_sum,
                b"%06o\0 " % chksum,
                self._tail_after_sum,
            )
        )

    def _slow_header(self, name: str, size: int) -> bytes:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, self._mtime, self._mode, "", ""
        return ti.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")

    def write(self, name: str, data: bytes) -> None:
        """One member; data is written as given (bytes, bytearray or memoryview)."""
        self.write_members([(name, data)])

    def write_members(self, members) -> None:
        """Several members, in the order given, with one write to the file (a sample's members)."""
        if self.closed:
            raise ValueError("write to a closed UstarWriter")
        parts = []
        for name, data in members:
            size = len(data)
            try:
                raw = name.encode("ascii")
            except UnicodeEncodeError:
                raw = None
            if raw is not None and len(raw) <= _NAME_LEN and size < _MAX_SIZE:
                header = self._header(raw, size)
            else:
                header = self._slow_header(name, size)
            pad = -size % _BLOCK
            parts += (header, data, _ZEROS[:pad])
            self.offset += len(header) + size + pad
        self._f.write(b"".join(parts))

    def close(self) -> None:
        """The end of the archive: two zero blocks, then zeros to a whole record."""
        if self.closed:
            return
        self.closed = True
        end = 2 * _BLOCK
        end += -(self.offset + end) % _RECORD
        self._f.write(b"\0" * end)
        self.offset += end


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def encode_member(ext: str, value) -> bytes:
    """A member's bytes as written: bytes as given, str as UTF-8, JSON data compact with sorted keys."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext.endswith("json") or isinstance(value, (dict, list, int, float, bool)) or value is None:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raise TypeError(f"cannot encode .{ext} of type {type(value).__name__}; give bytes, str or JSON data")


class _HashingFile:
    """A write-only file that hashes what passes through it (no second read of a 1 GB shard). The hashing and
    the writing run on a thread of their own (both release the GIL), so the caller makes the next sample's
    members meanwhile, on another core: they were two fifths of writing a 1% refresh's 7 GB of shards at 100k
    faces. An error there (a full disk) is raised by the next :meth:`write` or by :meth:`close`."""

    WRITE_AHEAD = 32  # pieces queued for the thread (a sample's members each: a few MB in all)

    def __init__(self, path: Path):
        import queue
        import threading

        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None  # raised once, by the next write() or close()
        self._failed = False  # and nothing written after it: the caller discards the file
        self._queue: queue.Queue = queue.Queue(maxsize=self.WRITE_AHEAD)
        self._thread = threading.Thread(target=self._drain, name=f"shard-writer {Path(path).name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if not self._failed:  # after an error the rest is dropped, never blocking the writer
                try:
                    self._write_through(data)
                except BaseException as e:  # noqa: BLE001 - raised in the writer's thread by write() or close()
                    self._error, self._failed = e, True

    def _write_through(self, data) -> None:
        self.sha256.update(data)
        self._f.write(data)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write(self, data) -> int:
        self._raise_error()
        if self._thread is None:
            raise ValueError("write to a closed shard file")
        self._queue.put(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._raise_error()

    def close(self) -> None:
        """Wait for the queued pieces, close the file; the writer's error, if any, is raised here."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self._f.close()
        self._raise_error()

    def abort(self) -> None:
        """Stop the writer and close the file, whatever was left to write (the caller removes the file)."""
        with contextlib.suppress(OSError, ValueError):
            self.close()
        self._f.close()


def check_key(key: str) -> str:
    """WebDataset splits a member name at the first dot: a key must not contain one."""
    if not key or "." in key or not _KEY_RE.match(key) or key.startswith("/") or ".." in key:
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_', '-' and no dots")
    return key


class ShardSink:
    """Writes samples (dicts with '__key__' and extension -> bytes/str/JSON) into numbered tars."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int = 10_000, max_bytes: int = 1_000_000_000):
        if max_count < 1 or max_bytes < 1:
            raise ValueError("max_count and max_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: UstarWriter | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0
        self._size = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._final = self.out_dir / name
        self._tmp = self.out_dir / f".{name}.partial"
        try:
            self._file = _HashingFile(self._tmp)
        except OSError as e:
            raise named_write_error(self._final, e) from e
        self._tar = UstarWriter(self._file)
        self._count = 0
        self._size = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        try:
            self._tar.close()
            self._file.close()
            self._tar = None
            os.replace(self._tmp, self._final)
        except OSError as e:  # a full disk names the shard it was writing (__exit__ removes the partial file)
            raise named_write_error(self._final, e) from e
        self.shards.append(ShardInfo(self._final.name, self._count, self._file.size, self._file.sha256.hexdigest()))
        self._file = None

    def write(self, sample: Mapping) -> None:
        key = check_key(str(sample["__key__"]))
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}: one sample per key")
        self._keys.add(key)
        members = []
        for ext in sorted(k for k in sample if not k.startswith("__")):
            if not _EXT_RE.match(ext):
                raise ValueError(f"invalid extension {ext!r} in sample {key!r}")
            members.append((ext, encode_member(ext, sample[ext])))
        sample_bytes = sum(len(d) + 1024 for _, d in members)
        if self._tar is not None and (self._count >= self.max_count or self._size + sample_bytes > self.max_bytes):
            self._close()
        if self._tar is None:
            self._open()
        try:
            # sorted by extension, as webdataset's TarWriter orders them
            self._tar.write_members([(f"{key}.{ext}", data) for ext, data in members])
        except OSError as e:
            raise named_write_error(self._final, e) from e
        self._count += 1
        self._size += sample_bytes

    def close(self) -> list[ShardInfo]:
        self._close()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.close()
            except BaseException:  # the writer thread's error shows only now, at the last shard's close
                self._discard()
                raise
        else:
            self._discard()

    def _discard(self) -> None:
        """Leave no readable half-shard behind."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            except (OSError, ValueError):  # the same full disk again, or closed already: the first error is reported
                self._file.abort()
            self._tar = self._file = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)


def write_shards(
    samples: Iterable[Mapping], out_dir: Path, prefix: str, max_count: int = 10_000, max_bytes: int = 1_000_000_000
) -> list[ShardInfo]:
    with ShardSink(out_dir, prefix, max_count=max_count, max_bytes=max_bytes) as sink:
        for s in samples:
            sink.write(s)
    return sink.shards


def config_fingerprint(config: Mapping) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_manifest(out_dir: Path, dataset: str, shards: list[ShardInfo], config: Mapping, extra: Mapping | None = None,
                   version: str | None = None, split: str | None = None) -> Path:
    """manifest.json: shard names, sample counts, sha256, the dataset version id (``version``, null when
    the caller has none) and split, and the config and code version that built them."""
    manifest = {
        "dataset": dataset,
        "version": version,
        "split": split,
        "code_version": __version__,
        "config": dict(config),
        "config_fingerprint": config_fingerprint(config),
        "num_samples": sum(s.samples for s in shards),
        "shards": [asdict(s) for s in shards],
    }
    if extra:
        manifest.update(extra)
    data = json.dumps(manifest, sort_keys=True, indent=2, default=str).encode()
    return write_bytes_atomic(data, Path(out_dir) / "manifest.json")


def read_manifest(dataset_dir: Path) -> dict:
    from pipeline.storage import as_dir

    return json.loads((as_dir(dataset_dir) / "manifest.json").read_text())


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_keys(path: Path) -> list[str]:
    """The sample keys of one tar, read from disk (in member order, each once)."""
    keys: dict[str, None] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                keys.setdefault(m.name.split(".", 1)[0], None)
    return list(keys)


def verify_manifest(dataset_dir: Path) -> list[str]:
    """Problems found by re-reading the shards from disk (missing shard, wrong size or sha256, a sample
    count that differs from the manifest's, tars in the folder the manifest does not list); empty when
    all is well."""
    dataset_dir = Path(dataset_dir)
    problems = []
    m = read_manifest(dataset_dir)
    listed = set()
    for s in m["shards"]:
        p = dataset_dir / s["name"]
        listed.add(s["name"])
        if not p.exists():
            problems.append(f"{s['name']}: missing")
            continue
        if p.stat().st_size != s["bytes"] or file_sha256(p) != s["sha256"]:
            problems.append(f"{s['name']}: size or sha256 mismatch")
            continue
        n = len(shard_keys(p))
        if n != s["samples"]:
            problems.append(f"{s['name']}: {n} samples, manifest says {s['samples']}")
    if sum(s["samples"] for s in m["shards"]) != m.get("num_samples"):
        problems.append(f"num_samples {m.get('num_samples')} != the sum over shards")
    for extra in sorted(p.name for p in dataset_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{extra}: in the folder but not in the manifest")
    return problems


def iter_samples(dataset_dir: Path, exts: tuple[str, ...] = ("json",)):
    """Samples of a split folder read back from its tars (every *.tar, in name order), with only the
    members whose extension is in ``exts``: dicts {"__key__", "__shard__", ext: bytes}."""
    for path in sorted(Path(dataset_dir).glob("*.tar")):
        yield from iter_shard(path, exts)


def iter_shard(path: Path, exts: tuple[str, ...] | None = ("json",), keys: set[str] | None = None):
    """The samples of one tar, as :func:`iter_samples` gives them (``exts=None``: every member; ``keys``:
    only these samples, the others' members skipped unread)."""
    path = Path(path)
    current: dict | None = None
    with open(path, "rb") as f:
        for name, read in tar_files(f):
            key, _, ext = name.partition(".")
            if keys is not None and key not in keys:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__shard__": path.name}
            if exts is None or ext in exts:
                current[ext] = read()
    if current is not None:
        yield current


def _plain_header(h: bytes) -> tuple[str, int] | None:
    """(name, size) of a regular file's ustar header as UstarWriter and webdataset write it (checksum
    right, octal size); None for any other header (pax, GNU long names, links, a damaged block)."""
    if h[156:157] not in (b"0", b"\0") or h[257:263] != b"ustar\0" or h[124] & 0x80:  # POSIX: GNU has no prefix
        return None
    try:
        chksum = int(h[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if chksum != 256 + sum(h[:148]) + sum(h[156:]):
        return None
    name, prefix = h[:100].split(b"\0", 1)[0], h[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    return name.decode(tarfile.ENCODING, "surrogateescape"), size


def tar_files(f):
    """(name, read) of each regular file in the tar open in ``f`` (seekable), in order: ``read()`` gives
    its bytes, and a member whose bytes are not asked for is skipped unread. Plain ustar headers are
    parsed here (a TarInfo per member was most of the time of copying a version's samples); from the
    first other header on (pax, long names, links, compression), the rest is read by :mod:`tarfile`."""
    while True:
        at = f.tell()
        h = f.read(_BLOCK)
        if len(h) < _BLOCK or h == _ZEROS:  # the end (tarfile stops at the first zero block too)
            if len(h) and at == 0:  # not even one block: let tarfile say what it is
                f.seek(at)
                yield from _tarfile_members(f, compressed=True)
            return
        got = _plain_header(h)
        if got is None:
            f.seek(at)
            yield from _tarfile_members(f, compressed=at == 0)
            return
        name, size = got
        data_at = f.tell()

        def read(f=f, data_at=data_at, size=size, name=name) -> bytes:
            f.seek(data_at)
            data = f.read(size)
            if len(data) != size:
                raise tarfile.ReadError(f"unexpected end of data in member {name!r}")
            return data

        yield name, read
        f.seek(data_at + size + (-size % _BLOCK))


def _tarfile_members(f, compressed: bool):
    with tarfile.open(fileobj=f, mode="r" if compressed else "r:") as tf:
        for m in tf:
            if m.isfile():
                yield m.name, (lambda m=m: tf.extractfile(m).read())


# ------------------------------------------------------------------------------------ reuse across versions

BUCKETS_FILE = "buckets.json"  # per bucket of a version: its fingerprint and shard files (names, sizes, sha256)


def previous_buckets(folder: Path | None, required: tuple[str, ...] = ()) -> dict[str, dict]:
    """bucket name -> its record in a previous version's buckets.json; empty when there is none (no
    folder, an object-store path, a version of an older builder, a missing ``required`` file, an
    unreadable record): nothing is reused then."""
    from pipeline.storage import is_remote

    if folder is None or is_remote(folder):
        return {}
    try:
        if not all((Path(folder) / r).is_file() for r in required):
            return {}
        return dict(json.loads((Path(folder) / BUCKETS_FILE).read_text()).get("buckets", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def shards_intact(folder: Path, entries: list[Mapping]) -> list[str]:
    """Shard files of a previous version re-read against their records (size, then sha256): the
    problems, empty when every file is intact and may be reused."""
    problems = []
    for sh in entries:
        p = Path(folder) / sh["name"]
        if not p.is_file():
            problems.append(f"{sh['name']} missing")
        elif p.stat().st_size != sh["bytes"] or file_sha256(p) != sh["sha256"]:
            problems.append(f"{sh['name']} size or sha256 differs from its record")
    return problems


class PreviousMembers:
    """Tar members of a previous version's shards, read one at a time for samples that did not change
    (per-sample reuse inside a bucket that did). Each shard is checked against its record (size, sha256)
    before any of its members is trusted; a damaged shard lends nothing (its samples are built again).
    The member index is built from the tar headers alone (no data read), lazily per shard."""

    def __init__(self, folder: Path, entries: list[Mapping]):
        self.folder = Path(folder)
        self.entries = list(entries)
        self.damaged: list[str] = []
        self._index: dict[str, tuple[Path, int, int]] | None = None
        self.bytes_read = 0

    def _build(self) -> dict[str, tuple[Path, int, int]]:
        index: dict[str, tuple[Path, int, int]] = {}
        for sh in self.entries:
            problems = shards_intact(self.folder, [sh])
            if problems:
                self.damaged += problems
                continue
            path = self.folder / sh["name"]
            with tarfile.open(path) as tf:
                for m in tf:
                    if m.isfile():
                        index[m.name] = (path, m.offset_data, m.size)
        return index

    def __contains__(self, name: str) -> bool:
        if self._index is None:
            self._index = self._build()
        return name in self._index

    def read(self, name: str) -> bytes:
        if name not in self:
            raise KeyError(name)
        path, offset, size = self._index[name]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: member {name} is cut short")
        self.bytes_read += size
        return data


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a published shard into a staging folder (published files are never rewritten, so two
    versions may share the inode); copy when a link is impossible (another file system)."""
    import shutil

    try:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            Path(dst).unlink(missing_ok=True)  # no half copy that looks like the shard
        raise named_write_error(dst, e) from e


def shard_record(info: ShardInfo) -> dict:
    return asdict(info)
