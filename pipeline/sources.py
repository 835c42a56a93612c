"""Input discovery and reading: image folders, WebDataset/img2dataset tars, Parquet manifests.

Each input shard (a tar, a Parquet manifest, or a batch of N loose image files) becomes one
partition. Partitions are *registered* once (partitions/<key>.json records exactly what each
one holds), so a partition's content never shifts when new files arrive: new files form new
partitions. Every image is located by (path, offset, length) so that later stages re-read the
bytes directly, also from inside a tar, without unpacking it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from pipeline.decode import IMAGE_EXTENSIONS
from pipeline.storage import write_bytes_atomic

SIDECAR_EXTENSIONS = {".json", ".txt"}
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

    def to_json(self) -> str:
        d = asdict(self)
        d["members"] = list(self.members)
        return json.dumps(d, indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> PartitionSpec:
        d = json.loads(text)
        d["members"] = tuple(d.get("members", ()))
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


def read_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: expected {length} bytes at offset {offset}, read {len(data)}")
    return data


def _slug(text: str, limit: int = 48) -> str:
    s = _SLUG_RE.sub("-", text).strip("-")[:limit]
    return s or "x"


def load_registry(registry_dir: Path) -> list[PartitionSpec]:
    registry_dir = Path(registry_dir)
    if not registry_dir.exists():
        return []
    specs = [PartitionSpec.from_json(p.read_text()) for p in registry_dir.glob("*.json")]
    return sorted(specs, key=lambda s: (s.seq, s.key))


def load_partition(registry_dir: Path, key: str) -> PartitionSpec:
    p = Path(registry_dir) / f"{key}.json"
    if not p.exists():
        raise KeyError(f"partition {key!r} is not registered (no {p})")
    return PartitionSpec.from_json(p.read_text())


def _is_excluded(rel: PurePosixPath, exclude_dirs: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in rel.parts) or (
        len(rel.parts) > 1 and rel.parts[0] in exclude_dirs
    )


def scan_input(input_root: Path, exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS):
    """(loose files, tar files, parquet manifests) under input_root, as sorted relative paths."""
    input_root = Path(input_root)
    if not input_root.exists():
        raise FileNotFoundError(f"input folder {input_root} does not exist (set LINEUP_INPUT)")
    loose, tars, manifests = [], [], []
    for p in sorted(input_root.rglob("*")):
        if not p.is_file():
            continue
        rel = PurePosixPath(p.relative_to(input_root).as_posix())
        if _is_excluded(rel, exclude_dirs):
            continue
        suffix = p.suffix.lower()
        if suffix == ".tar":
            tars.append(str(rel))
        elif suffix == ".parquet":
            manifests.append(str(rel))
        else:
            loose.append(str(rel))
    return loose, tars, manifests


def plan_new_partitions(
    input_root: Path,
    registry_dir: Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS,
) -> list[PartitionSpec]:
    """The partitions that new inputs would form, given what is registered already (writes nothing)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    input_root = Path(input_root).resolve()
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
    fresh = [
        r
        for r in loose
        if (str(input_root), r) not in seen_files
        and not (PurePosixPath(r).suffix.lower() in SIDECAR_EXTENSIONS and str(PurePosixPath(r).with_suffix("")) in image_stems)
    ]
    for i in range(0, len(fresh), batch_size):
        batch = tuple(fresh[i : i + batch_size])
        key = unique_key(f"files-{n_file_batches:06d}", batch[0])
        n_file_batches += 1
        new.append(PartitionSpec(key=key, kind="files", root=str(input_root), members=batch, seq=seq))
        seq += 1
    return new


def register_partitions(registry_dir: Path, specs: list[PartitionSpec]) -> None:
    for s in specs:
        write_bytes_atomic(s.to_json().encode(), Path(registry_dir) / f"{s.key}.json")


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


def _sidecar_meta(image_path: Path) -> dict:
    meta = {}
    txt = image_path.with_suffix(".txt")
    if txt.exists():
        meta["caption"] = txt.read_text(errors="replace").strip()
    js = image_path.with_suffix(".json")
    if js.exists():
        try:
            meta.update(_json_meta(js.read_bytes()))
        except ValueError:
            pass
    return meta


def _json_meta(data: bytes) -> dict:
    obj = json.loads(data.decode("utf-8", errors="replace"))
    if not isinstance(obj, dict):
        raise ValueError("sidecar json is not an object")
    out = {}
    for k in ("caption", "url", "key", "width", "height"):
        if k in obj and obj[k] is not None:
            out[k] = obj[k]
    if "TEXT" in obj and "caption" not in out:  # LAION-style metadata
        out["caption"] = obj["TEXT"]
    return out


def _iter_files(spec: PartitionSpec) -> Iterator[Record]:
    root = Path(spec.root)
    for rel in spec.members:
        p = root / rel
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            yield Record(source=rel, reject_reason="unsupported file type", reject_detail=f"extension {p.suffix or '(none)'!r} is not jpg/jpeg/png/webp")
            continue
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            yield Record(source=rel, reject_reason="file not found", reject_detail=f"{p} disappeared after registration")
            continue
        yield Record(source=rel, path=str(p), offset=0, length=size, meta=_sidecar_meta(p))


def _member_problem(m: tarfile.TarInfo) -> str:
    name = m.name
    pure = PurePosixPath(name)
    if name.startswith("/") or pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in pure.parts:
        return "path with '..'"
    if m.issym() or m.islnk():
        return "link member"
    if not m.isfile():
        return "" if m.isdir() else "special file member"
    return ""


def _iter_tar(spec: PartitionSpec, max_member_bytes: int) -> Iterator[Record]:
    shard = Path(spec.path)
    shard_name = shard.name
    try:
        tf = tarfile.open(shard, mode="r:")  # plain tar only: offsets must point into the file itself
    except (tarfile.TarError, OSError) as e:
        yield Record(source=shard_name, reject_reason="unreadable tar", reject_detail=str(e))
        return
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tf:
            for m in tf:
                problem = _member_problem(m)
                if problem:
                    yield Record(source=f"{shard_name}/{m.name}", reject_reason="unsafe tar member", reject_detail=f"{problem}: refused {m.name!r}")
                    continue
                if m.isdir():
                    continue
                pure = PurePosixPath(m.name)
                base = pure.name
                if "." not in base:
                    yield Record(source=f"{shard_name}/{m.name}", reject_reason="member without extension", reject_detail="WebDataset members are key.ext")
                    continue
                stem, ext = base.split(".", 1)
                key = str(pure.parent / stem) if str(pure.parent) != "." else stem
                ext = ext.lower()
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = m
                if ext == "json" or ext == "txt":
                    if m.size > 1_000_000:
                        continue
                    groups[key][f"{ext}:data"] = tf.extractfile(m).read()
    except tarfile.TarError as e:
        yield Record(source=shard_name, reject_reason="corrupt tar", reject_detail=f"stopped reading after {len(order)} samples: {e}")
    for key in order:
        g = groups[key]
        images = [e for e in g if not e.endswith(":data") and "." + e.split(".")[-1] in IMAGE_EXTENSIONS]
        others = [e for e in g if not e.endswith(":data") and e not in images and e not in ("json", "txt")]
        source = f"{shard_name}/{key}"
        for e in others:
            yield Record(source=f"{source}.{e}", reject_reason="member not ingested", reject_detail=f".{e} members are not read (no pickle or binary decoding)")
        if not images:
            yield Record(source=source, reject_reason="sample has no image", reject_detail=f"members: {sorted(e for e in g if not e.endswith(':data'))}")
            continue
        meta = {"key": key}
        if "json:data" in g:
            try:
                meta.update(_json_meta(g["json:data"]))
            except ValueError as e:
                meta["json_error"] = str(e)
        if "txt:data" in g and "caption" not in meta:
            meta["caption"] = g["txt:data"].decode("utf-8", errors="replace").strip()
        for e in sorted(images):
            m = g[e]
            src = f"{source}.{e}" if len(images) > 1 else source
            if m.size > max_member_bytes:
                yield Record(source=src, reject_reason="file too large", reject_detail=f"{m.size} bytes > limit {max_member_bytes}")
                continue
            yield Record(source=src, path=str(shard), offset=m.offset_data, length=m.size, meta=dict(meta))


def _iter_parquet(spec: PartitionSpec) -> Iterator[Record]:
    manifest = Path(spec.path)
    try:
        table = pq.read_table(manifest)
    except Exception as e:  # pyarrow raises several types for bad files
        yield Record(source=manifest.name, reject_reason="unreadable manifest", reject_detail=str(e))
        return
    if "path" not in table.column_names:
        yield Record(source=manifest.name, reject_reason="manifest has no 'path' column", reject_detail=f"columns: {table.column_names}")
        return
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        raw = row.get("path")
        source = f"{manifest.name}#{i}"
        if not raw:
            yield Record(source=source, reject_reason="empty path", reject_detail="row has no path")
            continue
        p = Path(raw)
        if not p.is_absolute():
            p = manifest.parent / p
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            yield Record(source=source, reject_reason="unsupported file type", reject_detail=f"{raw}")
            continue
        try:
            size = p.stat().st_size
        except OSError:
            yield Record(source=source, reject_reason="file not found", reject_detail=str(p))
            continue
        meta = {k: row[k] for k in ("caption", "url", "key") if row.get(k) is not None}
        yield Record(source=f"{manifest.name}#{i}:{raw}", path=str(p), offset=0, length=size, meta=meta)


def iter_partition(spec: PartitionSpec, max_member_bytes: int = 50_000_000) -> Iterator[Record]:
    if spec.kind == "files":
        yield from _iter_files(spec)
    elif spec.kind == "tar":
        yield from _iter_tar(spec, max_member_bytes)
    elif spec.kind == "parquet":
        yield from _iter_parquet(spec)
    else:
        raise ValueError(f"unknown partition kind {spec.kind!r}")


def count_partition_inputs(spec: PartitionSpec) -> int:
    """How many input units a partition holds, by listing its source again, independently of
    :func:`iter_partition`: loose files; manifest rows; tar members (a sample's .json/.txt sidecars
    count only when the sample has nothing else). Every unit ends as an image row or a reject row, so
    this is what the ``images`` table and the rejects must add up to."""
    if spec.kind == "files":
        return len(spec.members)
    if spec.kind == "parquet":
        try:
            meta = pq.ParquetFile(spec.path)
        except Exception:  # noqa: BLE001 - an unreadable manifest is one reject
            return 1
        return meta.metadata.num_rows if "path" in meta.schema_arrow.names else 1
    if spec.kind == "tar":
        try:
            tf = tarfile.open(spec.path, mode="r:")
        except (tarfile.TarError, OSError):
            return 1
        units, groups = 0, {}
        try:
            with tf:
                for m in tf:
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
        except tarfile.TarError:
            units += 1  # the "corrupt tar" reject
        return units + sum(n if n else 1 for n in groups.values())
    raise ValueError(f"unknown partition kind {spec.kind!r}")
