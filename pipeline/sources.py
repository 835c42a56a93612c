"""Input discovery and reading: image folders, WebDataset/img2dataset tars, Parquet manifests.

Each input shard (a tar, a Parquet manifest, or a batch of N loose image files) becomes one
partition. Partitions are *registered* once (partitions/<key>.json records exactly what each
one holds), so a partition's content never shifts when new files arrive: new files form new
partitions. Every image is located by (path, offset, length) so that later stages re-read the
bytes directly, also from inside a tar, without unpacking it.

Reading never trusts the input: sizes are checked from stat / the tar header before a byte is read,
only regular files are opened (never a FIFO or a device), manifest rows must resolve (symlinks
included) inside the manifest's folder, the input root or LINEUP_MANIFEST_ROOTS, and every input
unit that cannot be read ends as one reject Record with a reason, never as an exception. The one
exception is an object store that does not serve a read at all (:class:`StoreUnreachable`): that is
the environment's fault, not the photo's, and it fails the step instead of rejecting photos.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from pipeline.config import as_path, is_url
from pipeline.decode import IMAGE_EXTENSIONS
from pipeline.storage import as_dir, write_bytes_atomic

SIDECAR_EXTENSIONS = {".json", ".txt"}
MAX_SIDECAR_BYTES = 1_000_000  # a caption / metadata file beside an image; larger ones are not read
MANIFEST_ROOTS_ENV = "LINEUP_MANIFEST_ROOTS"
DEFAULT_BATCH_SIZE = 500
DEFAULT_EXCLUDE_DIRS = ("social",)  # the social logs live under the input root but are not images
_SLUG_RE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class PartitionSpec:
    key: str
    kind: str  # "files" | "tar" | "parquet"
    root: str  # the input root the sources are relative to
    path: str = ""  # the tar or parquet file (kind tar/parquet)
    members: tuple[str, ...] = ()  # relative paths (kind files)
    seq: int = 0  # registration order: a uid belongs to the earliest partition that holds it
    # loose files whose names are not UTF-8, as escaped labels (_label): each is one "file name not
    # UTF-8" reject. The name itself is never written: JSON can only hold it as a lone surrogate
    # escape, which DuckDB's reader (the catalog's view of this registry) refuses for the whole file.
    refused_names: tuple[str, ...] = ()

    def to_json(self) -> str:
        d = asdict(self)
        d["members"] = list(self.members)
        if self.refused_names:
            d["refused_names"] = list(self.refused_names)
        else:  # registry files of partitions without such names stay as they always were
            del d["refused_names"]
        return json.dumps(d, indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> PartitionSpec:
        d = json.loads(text)
        d["members"] = tuple(d.get("members", ()))
        d["refused_names"] = tuple(d.get("refused_names", ()))
        return PartitionSpec(**d)


@dataclass
class Record:
    """One input item: an image to read, or a problem to reject."""

    source: str
    path: str = ""
    offset: int = 0
    length: int = 0
    meta: dict = field(default_factory=dict)
    reject_reason: str = ""
    reject_detail: str = ""

    def read(self) -> bytes:
        return read_bytes(self.path, self.offset, self.length)


# ------------------------------------------------------------------ object-store inputs (s3://, fsspec)
# Inputs under an s3:// LINEUP_INPUT are read through these few functions; local paths take the code
# paths below unchanged.


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def open_input(path: str):
    """A binary file object for a local path or an object-store URL."""
    if is_url(path):
        fs, key = _fs(path)
        return fs.open(key, "rb")
    return open(path, "rb")


def _open_tar(shard) -> tarfile.TarFile:
    """A plain (uncompressed) tar: member offsets must point into the file itself."""
    if is_url(shard):
        fobj = open_input(str(shard))
        try:
            return _ClosingTar(tarfile.open(fileobj=fobj, mode="r:"), fobj)
        except BaseException:
            fobj.close()
            raise
    return tarfile.open(shard, mode="r:")


class _ClosingTar:
    """A TarFile over an object-store file that closes that file too (tarfile leaves a given fileobj open)."""

    def __init__(self, tf: tarfile.TarFile, fobj):
        self._tf = tf
        self._fobj = fobj

    def __getattr__(self, name):
        return getattr(self._tf, name)

    def __iter__(self):
        return iter(self._tf)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._tf.close()
        self._fobj.close()


def _url_size(url: str, max_bytes: int) -> tuple[int, str, str]:
    """_readable_size for an object: one HEAD request."""
    fs, key = _fs(url)
    try:
        info = from_store(url, lambda timeout: fs.info(key, **_deadline(fs, timeout)))
    except FileNotFoundError:
        return 0, "file not found", f"{url} does not exist (any more)"
    if info.get("type") != "file":
        return 0, "not a regular file", f"{url} is a prefix, not an object; not opened"
    size = int(info.get("size") or 0)
    if size > max_bytes:
        return size, "file too large", f"{size} bytes > limit {max_bytes}; not read"
    return size, "", ""


class StoreUnreachable(RuntimeError):
    """An object store did not serve a read: no connection, a timeout, throttling past the client's
    retries, refused credentials. Not an OSError, so no reader takes it for the photo's fault (a reject, an
    unreadable target): the step fails and can be run again, and the datasets do not change with an
    outage."""


STORE_TIMEOUT_S = 120.0  # LINEUP_STORE_TIMEOUT_S: the most one request about a photo may take, retries included


def store_timeout_s() -> float:
    """The deadline of one request to the object store (``LINEUP_STORE_TIMEOUT_S``, seconds). s3fs retries a
    request 5 times around botocore's own retries, each attempt waiting up to its read timeout: against a store
    that accepts connections and never answers, one ranged GET with the defaults went on for over 15 minutes
    (measured: killed at 15 min), and every worker with it."""
    raw = os.environ.get("LINEUP_STORE_TIMEOUT_S", "")
    try:
        value = float(raw) if raw.strip() else STORE_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not value > 0:  # the setting's fault, not any photo's: StoreUnreachable fails the step, no reader rejects for it
        raise StoreUnreachable(f"LINEUP_STORE_TIMEOUT_S={raw!r}: give a number of seconds above 0")
    return value


def from_store(url: str, call):
    """``call(timeout)``, a request about the object at ``url`` that must finish within ``timeout`` seconds
    (:func:`store_timeout_s`; fsspec cancels it then): an object that is not there raises FileNotFoundError as
    before (the photo's own fault), any other failure, the deadline included, :class:`StoreUnreachable`."""
    timeout = store_timeout_s()
    try:
        return call(timeout)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # every other failure is the store's (s3fs, botocore, aiohttp, fsspec's deadline)
        why = (f"no answer within {timeout:g} s (LINEUP_STORE_TIMEOUT_S)" if _is_timeout(e)
               else f"{type(e).__name__}: {str(e).strip()[:300]}")
        raise StoreUnreachable(
            f"{url}: the object store did not serve it ({why}); nothing was "
            "rejected for it. Run again once the store answers; check AWS_ENDPOINT_URL and the credentials (on Ray, "
            "the driver's AWS_* and FSSPEC_* variables are what the workers get)") from e


def _deadline(fs, timeout: float) -> dict:
    """The keyword that gives a request of ``fs`` its deadline: fsspec's for an asynchronous filesystem (s3fs,
    gcsfs), which cancels the request when it passes; none for a synchronous one, which has no such knob."""
    return {"timeout": timeout} if getattr(fs, "async_impl", False) else {}


def _is_timeout(e: BaseException) -> bool:
    from fsspec.exceptions import FSTimeoutError

    return isinstance(e, (FSTimeoutError, TimeoutError))


def read_bytes(path: str, offset: int, length: int) -> bytes:
    if is_url(path):  # one ranged GET
        fs, key = _fs(path)
        data = from_store(path, lambda timeout: fs.cat_file(key, start=offset, end=offset + length, **_deadline(fs, timeout))) if length else b""
        if len(data) != length:
            raise OSError(f"{path}: expected {length} bytes at offset {offset}, read {len(data)}")
        return data
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: expected {length} bytes at offset {offset}, read {len(data)}")
    return data


def _slug(text: str, limit: int = 48) -> str:
    s = _SLUG_RE.sub("-", text).strip("-")[:limit]
    return s or "x"


def _registry_file(p: Path) -> PartitionSpec:
    try:
        return PartitionSpec.from_json(p.read_text(encoding="utf-8"))
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"partition registry file {p} cannot be read: {type(e).__name__}: {e}") from None


def load_registry(registry_dir: Path) -> list[PartitionSpec]:
    registry_dir = as_dir(registry_dir)
    if not registry_dir.exists():
        return []
    specs = [_registry_file(p) for p in registry_dir.glob("*.json")]
    return sorted(specs, key=lambda s: (s.seq, s.key))


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def repair_registry(registry_dir: Path) -> list[str]:
    """Rewrite registry files that earlier versions wrote with a non-UTF-8 file name among their members
    (a lone surrogate escape in the JSON, which DuckDB refuses, so the catalog could not be built):
    such a name moves to ``refused_names`` as its escaped label. Ingestion gives it the same "file name
    not UTF-8" reject, with the same source, as before, so committed partitions stay true. Returns the
    keys rewritten; idempotent (an atomic rewrite per file)."""
    fixed = []
    for spec in load_registry(registry_dir):
        bad = [m for m in spec.members if _not_utf8(m)]
        if not bad:
            continue
        members = tuple(m for m in spec.members if not _not_utf8(m))
        refused = tuple(sorted({*spec.refused_names, *(_label(m) for m in bad)}))
        repaired = PartitionSpec(spec.key, spec.kind, spec.root, spec.path, members, spec.seq, refused)
        write_bytes_atomic(repaired.to_json().encode(), as_dir(registry_dir) / f"{spec.key}.json")
        fixed.append(spec.key)
    return fixed


def load_partition(registry_dir: Path, key: str) -> PartitionSpec:
    p = as_dir(registry_dir) / f"{key}.json"
    if not p.exists():
        raise KeyError(f"partition {key!r} is not registered (no {p})")
    return _registry_file(p)


def _is_excluded(rel: PurePosixPath, exclude_dirs: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in rel.parts) or (
        len(rel.parts) > 1 and rel.parts[0] in exclude_dirs
    )


def scan_input(input_root: Path, exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS):
    """(loose files, tar files, parquet manifests) under input_root, as sorted relative paths."""
    input_root = as_path(input_root)
    if not input_root.exists():
        raise FileNotFoundError(f"input folder {input_root} does not exist (set LINEUP_INPUT)")
    loose, tars, manifests = [], [], []
    if is_url(input_root):  # one listing of the prefix, not a request per object
        base = input_root.path.rstrip("/")
        found = [PurePosixPath(k[len(base) + 1:]) for k in input_root.fs.find(base) if k.startswith(base + "/")]
    else:
        found, plain = _walk_local(input_root, exclude_dirs)
    for rel in sorted(found):
        p = PurePosixPath(rel)
        if _is_excluded(rel, exclude_dirs):
            continue
        suffix = p.suffix.lower()
        # a tar or manifest is opened as a shard only when it is a regular file in the folder itself:
        # a link, FIFO or device under such a name is a loose entry, rejected with its reason
        if suffix == ".tar" and (is_url(input_root) or rel in plain):
            tars.append(str(rel))
        elif suffix == ".parquet" and (is_url(input_root) or rel in plain):
            manifests.append(str(rel))
        else:
            loose.append(str(rel))
    return loose, tars, manifests


def _walk_local(input_root: Path, exclude_dirs: tuple[str, ...]) -> tuple[list[PurePosixPath], set[PurePosixPath]]:
    """Every entry under input_root that is an input unit, and which of them are regular files.

    A loop over a stack, not recursion, so any depth works. Everything that is not a folder is listed
    (links, FIFOs, sockets, devices too), so each ends as an image or a reject with a reason; links are
    never followed here. A folder is listed as an entry itself when its name looks like an image
    (x.jpg/) or when it cannot be listed; its files, when it can, are entries of their own."""
    found: list[PurePosixPath] = []
    plain: set[PurePosixPath] = set()
    stack: list[PurePosixPath] = [PurePosixPath()]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(input_root / rel_dir) as it:
                entries = list(it)
        except OSError:
            if not rel_dir.parts:
                raise
            if PurePosixPath(rel_dir.name).suffix.lower() not in IMAGE_EXTENSIONS:  # (those are listed already)
                found.append(rel_dir)  # its reject says why it could not be read
            continue
        for entry in entries:
            rel = rel_dir / entry.name
            if _is_excluded(rel, exclude_dirs):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = entry.is_file(follow_symlinks=False)
            except OSError:
                is_dir = is_file = False
            if is_dir and not rel_dir.parts and entry.name in exclude_dirs:
                continue
            if is_dir:
                stack.append(rel)
                if PurePosixPath(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(rel)
                continue
            found.append(rel)
            if is_file:
                plain.add(rel)
    return found, plain


def plan_new_partitions(
    input_root: Path,
    registry_dir: Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS,
) -> list[PartitionSpec]:
    """The partitions that new inputs would form, given what is registered already (writes nothing)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    input_root = as_path(input_root)
    existing = load_registry(registry_dir)
    taken_keys = {s.key for s in existing}
    seen_files = {(s.root, m) for s in existing for m in s.members}
    seen_shards = {s.path for s in existing if s.kind in ("tar", "parquet")}
    seq = max((s.seq for s in existing), default=-1) + 1
    n_file_batches = sum(1 for s in existing if s.kind == "files")
    loose, tars, manifests = scan_input(input_root, exclude_dirs)
    new: list[PartitionSpec] = []

    def unique_key(base: str, path: str) -> str:
        key = base
        if key in taken_keys:
            key = f"{base}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        taken_keys.add(key)
        return key

    for kind, rels in (("tar", tars), ("parquet", manifests)):
        for rel in rels:
            full = str(input_root / rel)
            if full in seen_shards:
                continue
            stem = _slug(PurePosixPath(rel).stem)
            key = unique_key(f"{kind}-{stem}", full)
            new.append(PartitionSpec(key=key, kind=kind, root=str(input_root), path=full, seq=seq))
            seq += 1

    # sidecars (key.json / key.txt next to key.jpg) travel with their image, not as inputs
    image_stems = {str(PurePosixPath(r).with_suffix("")) for r in loose if PurePosixPath(r).suffix.lower() in IMAGE_EXTENSIONS}
    seen_refused = {(s.root, label) for s in existing for label in s.refused_names}
    fresh = [
        r
        for r in loose
        if (str(input_root), r) not in seen_files
        and not (_not_utf8(r) and (str(input_root), _label(r)) in seen_refused)
        and not (PurePosixPath(r).suffix.lower() in SIDECAR_EXTENSIONS and str(PurePosixPath(r).with_suffix("")) in image_stems)
    ]
    for i in range(0, len(fresh), batch_size):
        batch = fresh[i : i + batch_size]
        key = unique_key(f"files-{n_file_batches:06d}", _label(batch[0]))
        n_file_batches += 1
        members = tuple(r for r in batch if not _not_utf8(r))
        refused = tuple(_label(r) for r in batch if _not_utf8(r))
        new.append(PartitionSpec(key=key, kind="files", root=str(input_root), members=members, seq=seq, refused_names=refused))
        seq += 1
    return new


def register_partitions(registry_dir: Path, specs: list[PartitionSpec]) -> None:
    repair_registry(registry_dir)  # every registration path passes here, so an old registry heals on the next run
    for s in specs:
        write_bytes_atomic(s.to_json().encode(), as_dir(registry_dir) / f"{s.key}.json")


def register_new_inputs(
    input_root: Path,
    registry_dir: Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS,
) -> list[PartitionSpec]:
    """Plan and record the partitions for inputs not registered yet; returns the new ones."""
    new = plan_new_partitions(input_root, registry_dir, batch_size, exclude_dirs)
    register_partitions(registry_dir, new)
    return new


# ---------------------------------------------------------------- reading one partition


def manifest_roots_from_env() -> tuple[str, ...]:
    """Folders besides the manifest's own and the input root that manifest rows may point into:
    LINEUP_MANIFEST_ROOTS, os.pathsep-separated, symlinks resolved."""
    raw = os.environ.get(MANIFEST_ROOTS_ENV, "")
    parts = re.split(r":(?!//)", raw) if os.pathsep == ":" else raw.split(os.pathsep)  # s3://... stays whole
    return tuple(p.strip() if is_url(p.strip()) else os.path.realpath(os.path.expanduser(p.strip()))
                 for p in parts if p.strip())


def _label(text: str) -> str:
    """Text as a UTF-8 table can hold it: characters that are not valid UTF-8 (the undecodable bytes
    of a file name, a lone surrogate from JSON) are written as backslash escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _meta_text(value) -> str | None:
    """A caption / url / key as text, whatever type the sidecar or manifest gave it."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return _label(value)


def _reject(source: str, reason: str, detail: str = "") -> Record:
    return Record(source=_label(source), reject_reason=reason, reject_detail=_label(detail))


def _readable_size(p: Path | str, max_bytes: int) -> tuple[int, str, str]:
    """(size, reject reason, detail) for a file about to be read, from stat alone: nothing is opened.
    Only regular files pass (a FIFO would block the read forever, a device never ends)."""
    if is_url(p):
        return _url_size(str(p), max_bytes)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return 0, "file not found", f"{p} does not exist (any more)"
    except (OSError, ValueError) as e:
        return 0, "unreadable file", f"{p}: {e}"
    if not stat.S_ISREG(st.st_mode):
        return 0, "not a regular file", f"{p} is a folder, FIFO, socket or device; not opened"
    if st.st_size > max_bytes:
        return st.st_size, "file too large", f"{st.st_size} bytes > limit {max_bytes}; not read"
    return st.st_size, "", ""


def _image_record(source: str, path: str, offset: int, length: int, meta: dict) -> Record:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # the images table could not hold a path to read it back from
        return _reject(source, "file name not UTF-8", f"{_label(path)}: rename it to read it")
    clean = {k: _meta_text(v) for k, v in meta.items() if k in ("caption", "url", "key") and v is not None}
    return Record(source=_label(source), path=path, offset=offset, length=length, meta=clean)


def _read_small(p: Path) -> bytes | None:
    """A sidecar's bytes, or None when it is missing, not a regular file, too large or unreadable."""
    size, problem, _ = _readable_size(p, MAX_SIDECAR_BYTES)
    if problem:
        return None
    try:
        return read_bytes(str(p), 0, size)
    except (OSError, ValueError):
        return None


def _sidecar_meta(image_path: Path, root_real: str | None = None) -> dict:
    """Caption / url / key from key.txt and key.json beside an image; a sidecar that is a link leading
    out of the input folder (root_real) is not read, so its target cannot become a caption."""

    def read(side: Path) -> bytes | None:
        leads_out = (root_real is not None and not is_url(side) and os.path.islink(side)
                     and not _inside(os.path.realpath(side), [root_real]))
        return None if leads_out else _read_small(side)

    meta = {}
    txt = read(image_path.with_suffix(".txt"))
    if txt is not None:
        meta["caption"] = txt.decode("utf-8", errors="replace").strip()
    js = read(image_path.with_suffix(".json"))
    if js is not None:
        try:
            meta.update(_json_meta(js))
        except (ValueError, RecursionError):  # a broken sidecar costs the caption, not the image
            pass
    return meta


def _json_meta(data: bytes) -> dict:
    obj = json.loads(data.decode("utf-8", errors="replace"))
    if not isinstance(obj, dict):
        raise ValueError("sidecar json is not an object")  # noqa: TRY004 - callers catch ValueError
    out = {}
    for k in ("caption", "url", "key", "width", "height"):
        if k in obj and obj[k] is not None:
            out[k] = obj[k]
    if obj.get("TEXT") is not None and "caption" not in out:  # LAION-style metadata
        out["caption"] = obj["TEXT"]
    return out


def _loose_entry_problem(p: Path, rel: str, root_real: str) -> tuple[str, str]:
    """(reject reason, detail) for a listed entry that is not a regular file inside the input folder,
    from lstat / realpath alone (nothing is opened); ("", "") for one that may be read. A link may lead
    to a regular file inside the folder, as a manifest row may; anything else it leads to is refused."""
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return "file not found", f"{rel} does not exist (any more)"
    except (OSError, ValueError) as e:
        return "unreadable file", f"{rel}: {type(e).__name__}: {e}"
    if stat.S_ISLNK(st.st_mode):
        try:
            real = os.path.realpath(p, strict=True)
        except FileNotFoundError:
            return "broken link", f"{rel} -> {os.readlink(p)!r} leads nowhere"
        except OSError as e:  # ELOOP: a link that leads back to itself
            return "broken link", f"{rel}: {e.strerror or e}"
        if not _inside(real, [root_real]):
            return "link outside the input folder", f"{rel} leads to {_label(real)}, outside {_label(root_real)}; not read"
        try:
            st = os.stat(real)
        except OSError as e:
            return "unreadable file", f"{rel}: {type(e).__name__}: {e}"
        if stat.S_ISDIR(st.st_mode):
            return "link to a folder", f"{rel} leads to {_label(real)}: links to folders are not followed (its files are listed where they are)"
    if stat.S_ISDIR(st.st_mode):
        try:
            os.scandir(p).close()
        except OSError as e:
            return "unreadable folder", f"{rel}: {type(e).__name__}: {e}; the files in it are not listed"
        return "not a regular file", f"{rel} is a folder (its files are inputs of their own)"
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        return "not a regular file", f"{rel} is a {kind}; not opened"
    return "", ""


def _iter_files(spec: PartitionSpec, max_bytes: int) -> Iterator[Record]:
    root = as_path(spec.root)
    root_real = str(root) if is_url(root) else os.path.realpath(root)
    for label in spec.refused_names:
        yield _reject(label, "file name not UTF-8", f"{_label(str(root))}/{label}: rename it to read it")
    for rel in spec.members:
        p = root / rel
        if not is_url(root):
            problem, detail = _loose_entry_problem(p, rel, root_real)
            if problem:
                yield _reject(rel, problem, detail)
                continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            yield _reject(rel, "unsupported file type", f"extension {p.suffix or '(none)'!r} is not jpg/jpeg/png/webp")
            continue
        size, problem, detail = _readable_size(p, max_bytes)
        if problem:
            yield _reject(rel, problem, detail)
            continue
        yield _image_record(rel, str(p), 0, size, _sidecar_meta(p, root_real))


def _member_problem(m: tarfile.TarInfo) -> str:
    name = m.name
    pure = PurePosixPath(name)
    if name.startswith("/") or pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in pure.parts:
        return "path with '..'"
    if m.issym() or m.islnk():
        return "link member"
    if m.issparse():  # its data is stored in pieces: (offset, size) would not locate the image
        return "sparse member"
    if not m.isfile():
        return "" if m.isdir() else "special file member"
    return ""


def _tar_tail_problem(shard: Path, offset: int) -> str:
    """Where tar iteration ended quietly (tarfile stops at a header it cannot parse, without an
    error), everything after it must be zero padding; otherwise members after it were lost."""
    try:
        with open_input(str(shard)) as f:
            f.seek(offset)
            pos = offset
            while chunk := f.read(1 << 20):
                stripped = chunk.lstrip(b"\0")
                if stripped:
                    at = pos + len(chunk) - len(stripped)
                    return f"unreadable header or data at byte {at}; members after it are not listed"
                pos += len(chunk)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def _tar_members(shard: Path) -> tuple[list[tarfile.TarInfo], str]:
    """The members tarfile can list, and why listing stopped early ("" when it reached the end)."""
    members: list[tarfile.TarInfo] = []
    try:
        with _open_tar(shard) as tf:  # plain tar only: offsets must point into the file itself
            for m in tf:  # one at a time, so the members before a bad header are kept
                members.append(m)  # noqa: PERF402
            end = tf.offset
    except Exception as e:  # noqa: BLE001 - tarfile raises TarError, but also ValueError, EOFError on bad headers
        return members, f"{type(e).__name__}: {e}"
    return members, _tar_tail_problem(shard, end)


def _iter_tar(spec: PartitionSpec, max_member_bytes: int) -> Iterator[Record]:
    shard = as_path(spec.path)
    shard_name = shard.name
    try:
        _open_tar(shard).close()
    except Exception as e:  # noqa: BLE001 - see _tar_members
        yield _reject(shard_name, "unreadable tar", f"{type(e).__name__}: {e}")
        return
    listed, stopped = _tar_members(shard)
    groups: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
    for m in listed:
        problem = _member_problem(m)
        if problem:
            yield _reject(f"{shard_name}/{m.name}", "unsafe tar member", f"{problem}: refused {m.name!r}")
            continue
        if m.isdir():
            continue
        pure = PurePosixPath(m.name)
        base = pure.name
        if "." not in base:
            yield _reject(f"{shard_name}/{m.name}", "member without extension", "WebDataset members are key.ext")
            continue
        stem, ext = base.split(".", 1)
        key = str(pure.parent / stem) if str(pure.parent) != "." else stem
        groups.setdefault(key, []).append((ext.lower(), m))
    if stopped:
        yield _reject(shard_name, "corrupt tar", f"stopped reading after {len(listed)} members: {stopped}")
    for key, members in groups.items():
        source = f"{shard_name}/{key}"
        sidecars: dict[str, tarfile.TarInfo] = {}
        images: dict[str, tarfile.TarInfo] = {}
        others = 0
        for ext, m in members:
            if ext in ("json", "txt"):
                sidecars.setdefault(ext, m)  # a second caption file changes nothing; it is no input of its own
            elif "." + ext.split(".")[-1] in IMAGE_EXTENSIONS and ext not in images:
                images[ext] = m
            elif "." + ext.split(".")[-1] in IMAGE_EXTENSIONS:
                first = images[ext]
                yield _reject(f"{source}.{ext}", "duplicate tar member", f"{m.name!r} again at byte {m.offset}; the first one, at byte {first.offset}, is read")
            else:
                others += 1
                yield _reject(f"{source}.{ext}", "member not ingested", f".{ext} members are not read (no pickle or binary decoding)")
        if not images:
            if not others:  # nothing but captions: the sample itself is the one unit
                yield _reject(source, "sample has no image", f"members: {sorted(sidecars)}")
            continue
        meta = {"key": key}
        if "json" in sidecars:
            data = _tar_sidecar(shard, sidecars["json"])
            try:
                meta.update(_json_meta(data) if data is not None else {})
            except (ValueError, RecursionError):
                pass
        if "txt" in sidecars and "caption" not in meta:
            data = _tar_sidecar(shard, sidecars["txt"])
            if data is not None:
                meta["caption"] = data.decode("utf-8", errors="replace").strip()
        for ext in sorted(images):
            m = images[ext]
            src = f"{source}.{ext}" if len(images) > 1 else source
            if m.size > max_member_bytes:
                yield _reject(src, "file too large", f"{m.size} bytes > limit {max_member_bytes}; not read")
                continue
            yield _image_record(src, str(shard), m.offset_data, m.size, meta)


def _tar_sidecar(shard: Path, m: tarfile.TarInfo) -> bytes | None:
    if m.size > MAX_SIDECAR_BYTES:
        return None
    try:
        return read_bytes(str(shard), m.offset_data, m.size)
    except (OSError, ValueError):
        return None


def _manifest_problem(manifest: Path) -> tuple[pq.ParquetFile | None, str, str]:
    """The opened manifest, or (None, reject reason, detail) when it cannot be read row by row."""
    try:
        pf = pq.ParquetFile(open_input(str(manifest)) if is_url(manifest) else manifest)
        names = pf.schema_arrow.names
        md = pf.metadata
        group_rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        return None, "unreadable manifest", f"{type(e).__name__}: {e}"
    if "path" not in names:
        return None, "manifest has no 'path' column", f"columns: {names}"
    if md.num_rows < 0 or any(n < 0 for n in group_rows) or sum(group_rows) != md.num_rows:
        return None, "unreadable manifest", f"footer says {md.num_rows} rows, its row groups {group_rows}"
    return pf, "", ""


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _manifest_row(raw, source: str, manifest: Path, roots: list[str], max_bytes: int, row: dict) -> Record:
    if raw is None or raw == "" or raw == b"":
        return _reject(source, "empty path", "row has no path")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _reject(source, "bad path value", f"bytes that are not UTF-8: {raw[:80]!r}")
    if not isinstance(raw, str):
        return _reject(source, "bad path value", f"{type(raw).__name__} {raw!r:.80}, not a string")
    if "\0" in raw:
        return _reject(source, "bad path value", f"{raw!r:.120} holds a NUL byte")
    if is_url(raw) or is_url(manifest):  # object keys: no links to resolve, '..' folded like a path
        import posixpath

        url = raw if is_url(raw) else f"{manifest.parent}/{raw}"
        scheme, key = url.split("://", 1)
        real = f"{scheme}://{posixpath.normpath(key)}"
        if PurePosixPath(real).suffix.lower() not in IMAGE_EXTENSIONS:
            return _reject(source, "unsupported file type", raw)
        if not any(real.startswith(r.rstrip("/") + "/") for r in roots):
            return _reject(source, "path outside allowed roots", f"{raw} is {real}, outside {roots} (set {MANIFEST_ROOTS_ENV} to allow more)")
        size, problem, detail = _readable_size(real, max_bytes)
        if problem:
            return _reject(source, problem, detail)
        return _image_record(f"{source}:{raw}", real, 0, size, row)
    p = Path(raw)
    if not p.is_absolute():
        p = manifest.parent / p
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
        return _reject(source, "unsupported file type", raw)
    real = os.path.realpath(p)  # symlinks resolved: a link that leads out is outside
    if not _inside(real, roots):
        return _reject(source, "path outside allowed roots", f"{raw} resolves to {real}, outside {roots} (set {MANIFEST_ROOTS_ENV} to allow more)")
    size, problem, detail = _readable_size(real, max_bytes)
    if problem:
        return _reject(source, problem, detail)
    return _image_record(f"{source}:{raw}", real, 0, size, row)


def _iter_parquet(spec: PartitionSpec, max_bytes: int, manifest_roots: tuple[str, ...]) -> Iterator[Record]:
    manifest = as_path(spec.path)
    name = manifest.name
    pf, problem, detail = _manifest_problem(manifest)
    if pf is None:
        yield _reject(name, problem, detail)
        return
    if is_url(manifest):
        roots = [str(manifest.parent), spec.root, *manifest_roots]
    else:
        roots = [os.path.realpath(manifest.parent), os.path.realpath(spec.root), *manifest_roots]
    columns = [c for c in ("path", "caption", "url", "key") if c in pf.schema_arrow.names]
    i = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            rows = pf.read_row_group(g, columns=columns).to_pylist()
            if len(rows) != n:
                raise ValueError(f"read {len(rows)} rows, the footer says {n}")
        except Exception as e:  # noqa: BLE001 - a corrupt page costs its rows, not the manifest
            for j in range(n):
                yield _reject(f"{name}#{i + j}", "unreadable manifest row", f"row group {g}: {type(e).__name__}: {e}")
            i += n
            continue
        for row in rows:
            yield _manifest_row(row.get("path"), f"{name}#{i}", manifest, roots, max_bytes, row)
            i += 1


def iter_partition(
    spec: PartitionSpec, max_member_bytes: int = 50_000_000, manifest_roots: tuple[str, ...] | None = None
) -> Iterator[Record]:
    """Every input unit of a partition as a Record: an image to read (never larger than
    max_member_bytes: loose files, tar members and manifest rows are sized before they are read)
    or a reject. manifest_roots: folders manifest rows may point into besides the manifest's own
    and the input root (default: LINEUP_MANIFEST_ROOTS)."""
    if spec.kind == "files":
        yield from _iter_files(spec, max_member_bytes)
    elif spec.kind == "tar":
        yield from _iter_tar(spec, max_member_bytes)
    elif spec.kind == "parquet":
        roots = manifest_roots_from_env() if manifest_roots is None else tuple(
            r if is_url(r) else os.path.realpath(r) for r in manifest_roots)
        yield from _iter_parquet(spec, max_member_bytes, roots)
    else:
        raise ValueError(f"unknown partition kind {spec.kind!r}")


def count_partition_inputs(spec: PartitionSpec) -> int:
    """How many input units a partition holds, by listing its source again, independently of
    :func:`iter_partition`: loose files; manifest rows; tar members (a sample's .json/.txt sidecars
    count only when the sample has nothing else). Every unit ends as an image row or a reject row, so
    this is what the ``images`` table and the rejects must add up to. An unreadable manifest or tar
    is one unit; a tar that stops early (a header that does not parse) adds one."""
    if spec.kind == "files":
        return len(spec.members) + len(spec.refused_names)
    if spec.kind == "parquet":
        try:
            meta = pq.ParquetFile(open_input(spec.path) if is_url(spec.path) else spec.path)
            if "path" not in meta.schema_arrow.names:
                return 1
            md = meta.metadata
            per_group = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        except Exception:  # noqa: BLE001 - an unreadable manifest is one reject
            return 1
        # a footer whose total disagrees with its row groups cannot be read row by row: one reject
        return md.num_rows if md.num_rows >= 0 and min(per_group, default=0) >= 0 and sum(per_group) == md.num_rows else 1
    if spec.kind == "tar":
        try:
            _open_tar(spec.path).close()
        except Exception:  # noqa: BLE001 - the "unreadable tar" reject
            return 1
        units, groups = 0, {}
        members, stopped = _tar_members(as_path(spec.path))
        for m in members:
            if m.isdir() and not _member_problem(m):
                continue
            pure = PurePosixPath(m.name)
            if _member_problem(m) or "." not in pure.name:
                units += 1
                continue
            stem, ext = pure.name.split(".", 1)
            key = str(pure.parent / stem)
            if ext.lower() in ("json", "txt"):
                groups.setdefault(key, 0)
            else:
                groups[key] = groups.get(key, 0) + 1
        units += 1 if stopped else 0  # the "corrupt tar" reject
        return units + sum(n if n else 1 for n in groups.values())
    raise ValueError(f"unknown partition kind {spec.kind!r}")
