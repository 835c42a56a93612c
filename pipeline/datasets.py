"""Dataset versions: content-addressed, published by one rename, never rewritten, each with a card.

A version id is a hash over everything that decides a dataset's content (``version_id``): the input
uids, the face model and a fingerprint of every face row the builder reads (boxes, landmarks,
embeddings), the identity assignment, the builder's config and the builder's own version. The same
inputs give the same id on any machine; one changed embedding gives another id.

Publishing (``staged_version``): the builder writes into ``datasets/<name>/.staging-<id>-<token>/``,
beside a lease ``.lease-<token>.json`` (host, pid, heartbeat renewed every 30 s); when the blocking
checks pass, that folder is renamed to ``datasets/<name>/<id>/`` in one step and ``LATEST`` is pointed
at it. A run killed before the rename leaves only a dot-folder, which no reader lists and the next
build removes once its lease is dead (heartbeat older than 5 min, or its pid gone on this host).

``LATEST`` only moves forward: every build takes a sequence number when it starts (``begin_build``),
and ``set_latest`` (under a publish lock: fcntl locally, a lease object in an object store) refuses to
point ``LATEST`` at a build older than the one it names (``LATEST.json`` records its sequence). The
catalog's tables of a dataset are copied from the version ``LATEST`` names (``sync_catalog_table``). A version folder that exists is complete and is never written
again: rebuilding the same content reuses it. Trainers read ``LATEST`` (or a pinned version).

In an object store (LINEUP_STORE=s3://...) there is no rename, so publishing is: build and check the
version in a local staging folder (``$LINEUP_HOME/staging/<name>/``), upload every file under
``datasets/<name>/<id>/``, then write ``_PUBLISHED.json`` there (every file with its size and sha256)
and only then ``LATEST``. A version is published when, and only when, its ``_PUBLISHED.json`` exists:
readers (``latest_version``, ``published_versions``, the trainers through ``LATEST``) trust nothing
else, so an upload cut short leaves an unlisted prefix that the next build of that version overwrites.
Reusing a published version re-reads its listing against ``_PUBLISHED.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import Layout
from pipeline.storage import is_remote, make_world_readable, write_bytes_atomic

STAGING_PREFIX = ".staging-"
LEASE_PREFIX = ".lease-"  # beside a staging folder: who builds it (host, pid) and when it last said so
UNPUBLISHED_PREFIX = ".unpublished-"
PUBLISHED_MARKER = "_PUBLISHED.json"  # object stores: written after every file of the version
PUBLISHED_CHECK = "published_files_match_marker"  # a reused object-store version: its listing vs the marker


# ------------------------------------------------------------------------------------ fingerprints


def fingerprint_rows(rows: Iterable[Iterable]) -> str:
    """sha256 of rows of plain values (in the given order)."""
    h = hashlib.sha256()
    for row in rows:
        h.update("\x1f".join(str(v) for v in row).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:32]


FINGERPRINT_BLOCK = 65_536  # rows hashed at a time


def fingerprint_table(table: pa.Table, columns: list[str], sort_by: list[str], rows=None) -> str:
    """sha256 of ``columns`` of ``table`` sorted by ``sort_by``: numbers and fixed-size lists by their
    little-endian bytes (an embedding that changes in its last bit changes the fingerprint), strings
    by their UTF-8 text. Columns missing from the table count as absent, not as an error. ``rows``:
    the fingerprint of ``table.take(rows)``. One column at a time, in blocks of rows: no sorted copy of
    the table (at 1M faces that copy and the embeddings as float64 were ~3 GB at once)."""
    import pyarrow.compute as pc

    order = np.arange(table.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    h = hashlib.sha256()
    h.update(json.dumps({"rows": len(order), "columns": columns}).encode())
    if len(order):
        keys = table.select(sort_by).take(pa.array(order, pa.int64()))
        order = order[pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in sort_by]).to_numpy()]
        del keys
    for name in columns:
        h.update(f"\x1d{name}\x1d".encode())
        if name not in table.column_names:
            h.update(b"<absent>")
            continue
        full = table.column(name)
        blocks = (full.take(pa.array(order[i:i + FINGERPRINT_BLOCK], pa.int64())).combine_chunks()
                  for i in range(0, len(order), FINGERPRINT_BLOCK))
        if pa.types.is_fixed_size_list(full.type) or pa.types.is_list(full.type):
            offsets, base = [], 0  # a list column: its values, then the offsets of the whole column
            for col in blocks:
                h.update(np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).astype("<f8").tobytes())
                if pa.types.is_list(full.type):
                    o = np.asarray(col.offsets.to_numpy(), dtype=np.int64)
                    offsets.append(o[(1 if offsets else 0):] - o[0] + base)
                    base = int(offsets[-1][-1])
            if pa.types.is_list(full.type):
                h.update(np.concatenate(offsets).astype("<i8").tobytes() if offsets else np.zeros(1, "<i8").tobytes())
        elif pa.types.is_floating(full.type) or pa.types.is_integer(full.type) or pa.types.is_boolean(full.type):
            for col in blocks:
                h.update(np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64).astype("<f8").tobytes())
        else:
            for col in blocks:
                for v in col.to_pylist():
                    h.update(b"\x00" if v is None else str(v).encode() + b"\x1f")
    return h.hexdigest()[:32]


def version_id(parts: Mapping[str, object]) -> str:
    """The id of a dataset version from its named parts (fingerprints, config dicts, versions)."""
    payload = json.dumps(dict(parts), sort_keys=True, default=str)
    return "v-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def dataset_version(config: dict, *input_fingerprints: str) -> str:
    """Shorthand: a version id from a config and input fingerprints."""
    return version_id({"config": config, "inputs": list(input_fingerprints)})


# ------------------------------------------------------------------------------------ the folders


def dataset_dir(layout: Layout, name: str, version: str) -> Path:
    return layout.datasets / name / version


def latest_version(layout: Layout, name: str) -> str | None:
    p = layout.datasets / name / "LATEST"
    if not p.exists():
        return None
    v = p.read_text().strip()
    return v if v and is_published(layout, name, v) else None


def reusable_version(layout: Layout, name: str) -> Path | None:
    """The folder of the latest published version, for a builder to take unchanged shards from (hard
    links); None when there is none, or in an object store: there a new version is built whole (no hard
    links; a server-side copy of the unchanged shards would do, and is not implemented)."""
    v = latest_version(layout, name)
    if v is None or layout.remote:
        return None
    return Path(dataset_dir(layout, name, v))


def published_versions(layout: Layout, name: str) -> list[str]:
    root = layout.datasets / name
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and is_published(layout, name, p.name))


def is_published(layout: Layout, name: str, version: str) -> bool:
    folder = dataset_dir(layout, name, version)
    if layout.remote:
        return (folder / PUBLISHED_MARKER).exists()
    return folder.is_dir()


def upload_version(layout: Layout, name: str, version: str, folder: Path) -> Path:
    """Publish a locally built and checked version to an object store: every file, then the marker
    listing them (size, sha256), written last. Returns the version's store path."""
    from pipeline.shards import file_sha256  # webdataset (and torch) only when a version is uploaded

    final = dataset_dir(layout, name, version)
    fs = final.fs
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    listing = {}
    for p in files:
        rel = p.relative_to(folder).as_posix()
        fs.put_file(str(p), f"{final.path}/{rel}")
        listing[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    uploaded = {k[len(final.path) + 1:]: int(v.get("size", -1)) for k, v in fs.find(final.path, detail=True).items()}
    short = sorted(rel for rel, meta in listing.items() if uploaded.get(rel) != meta["bytes"])
    if short:
        raise OSError(f"dataset {name} {version}: upload incomplete, {len(short)} files differ ({short[:5]})")
    marker = {"dataset": name, "version": version, "files": listing}
    write_bytes_atomic(json.dumps(marker, indent=1, sort_keys=True).encode(), final / PUBLISHED_MARKER)
    return final


def verify_published(layout: Layout, name: str, version: str) -> list[str]:
    """A published version in an object store re-listed against its marker (names and sizes)."""
    final = dataset_dir(layout, name, version)
    marker = json.loads((final / PUBLISHED_MARKER).read_text())
    found = {k[len(final.path) + 1:]: int(v.get("size", -1)) for k, v in final.fs.find(final.path, detail=True).items()}
    problems = [f"{rel}: missing or resized" for rel, meta in sorted(marker["files"].items())
                if found.get(rel) != meta["bytes"]]
    problems += [f"{rel}: not listed in {PUBLISHED_MARKER}" for rel in sorted(found)
                 if rel not in marker["files"] and rel != PUBLISHED_MARKER]
    return problems


LATEST_RECORD = "LATEST.json"  # beside LATEST: the build sequence of the build that set it
SEQUENCE_FILE = ".build-sequence"  # the last build sequence handed out for the dataset
LEASE_TTL_S = 300.0  # a lease not renewed for this long belongs to a build that died
LEASE_HEARTBEAT_S = 30.0


def latest_record(layout: Layout, name: str) -> dict:
    """{"version", "sequence"} of the build LATEST points to ({} when there is none or it predates the record)."""
    p = layout.datasets / name / LATEST_RECORD
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except ValueError:
        return {}


def begin_build(layout: Layout, name: str) -> int:
    """A new build of ``name`` takes the next build sequence (under the publish lock): builds are ordered
    by when they started, whichever finishes first."""
    with publish_lock(layout, name):
        p = layout.datasets / name / SEQUENCE_FILE
        try:
            last = int(p.read_text().strip()) if p.exists() else 0
        except ValueError:
            last = 0
        last = max(last, int(latest_record(layout, name).get("sequence", 0)))
        write_bytes_atomic(str(last + 1).encode(), p)
        return last + 1


def set_latest(layout: Layout, name: str, version: str, sequence: int | None = None) -> bool:
    """Point LATEST at ``version``, serialised by the publish lock. A build (``sequence`` from
    :func:`begin_build`) older than the one LATEST points to does not move it: LATEST only moves
    forward. Returns whether LATEST now names ``version``. ``sequence=None`` (a manual pin) always moves it."""
    if not is_published(layout, name, version):
        raise FileNotFoundError(f"dataset {name} has no published version {version}")
    with publish_lock(layout, name):
        current = latest_record(layout, name)
        if sequence is not None and int(current.get("sequence", 0)) > sequence:
            return current.get("version") == version
        if sequence is None:
            sequence = int(current.get("sequence", 0))
        # the record first: a kill between the two writes leaves it ahead of LATEST, never behind
        write_bytes_atomic(json.dumps({"version": version, "sequence": sequence}).encode(),
                           layout.datasets / name / LATEST_RECORD)
        write_bytes_atomic(version.encode(), layout.datasets / name / "LATEST")
        return True


@contextlib.contextmanager
def publish_lock(layout: Layout, name: str, timeout_s: float = 600.0):
    """Serialise publishing ``name``: an fcntl lock on a local store; in an object store, a lease object
    (host, pid, token, heartbeat) that another holder may take over once it is older than LEASE_TTL_S."""
    root = layout.datasets / name
    if not layout.remote:
        import fcntl

        Path(root).mkdir(parents=True, exist_ok=True)
        with open(Path(root) / ".publish.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    lease = root / ".publish-lease.json"
    mine = new_lease()
    deadline = time.time() + timeout_s
    while True:
        held = read_lease(lease)
        if held is None or lease_expired(held) or held["token"] == mine["token"]:
            write_bytes_atomic(json.dumps(mine).encode(), lease)
            time.sleep(0.5)  # a rival that wrote at the same moment: the last write wins, read it back
            if (read_lease(lease) or {}).get("token") == mine["token"]:
                break
        if time.time() > deadline:
            raise TimeoutError(f"dataset {name}: publish lease held by {held}")
        time.sleep(1.0)
    try:
        yield
    finally:
        if (read_lease(lease) or {}).get("token") == mine["token"]:
            lease.fs.rm(lease.path)


def new_lease() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "heartbeat": time.time()}


def read_lease(path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (ValueError, OSError):
        return None


def lease_expired(lease: dict, now: float | None = None) -> bool:
    """A lease is dead when its heartbeat is older than LEASE_TTL_S, or, on this host, when its process is
    gone (a pid means nothing on another machine: there only the heartbeat counts)."""
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > LEASE_TTL_S:
        return True
    if lease.get("host") == socket.gethostname():
        pid = int(lease.get("pid", -1))
        if pid == os.getpid():
            return lease.get("token") not in _LIVE_TOKENS
        return pid <= 0 or not _alive(pid)
    return False


_LIVE_TOKENS: set[str] = set()  # leases this process is renewing


def owner_gone(lease: dict | None) -> bool:
    """The process that wrote ``lease`` ran on this host and has ended (no heartbeat needed: for folders a
    process writes once, a pid that is gone is proof; another host's, or a live pid, is never taken for dead)."""
    if not lease or lease.get("host") != socket.gethostname():
        return False
    pid = int(lease.get("pid", -1))
    return pid > 0 and pid != os.getpid() and not _alive(pid)


def staging_root(layout: Layout, name: str) -> Path:
    """Where versions of ``name`` are staged: beside the published ones, or locally for an object store."""
    return (layout.staging if layout.remote else layout.datasets) / name


def clean_stale_staging(layout: Layout, name: str) -> list[str]:
    """Remove staging folders whose build is dead: their lease (``.lease-<token>.json`` beside them, with
    host, pid and a heartbeat renewed while the build runs) expired, or is missing and the folder is older
    than LEASE_TTL_S. A live build on another machine that shares the store keeps its folder."""
    root = staging_root(layout, name)
    removed = []
    if not root.exists():
        return removed
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith(STAGING_PREFIX)):
            continue
        token = p.name.rsplit("-", 1)[-1]
        lease_path = root / f"{LEASE_PREFIX}{token}.json"
        lease = read_lease(lease_path)
        if lease is None:
            if time.time() - p.stat().st_mtime <= LEASE_TTL_S:
                continue  # being created: its lease comes next
        elif not lease_expired(lease):
            continue
        shutil.rmtree(p, ignore_errors=True)
        lease_path.unlink(missing_ok=True)
        removed.append(p.name)
    for lp in root.glob(f"{LEASE_PREFIX}*.json"):  # leases whose folder is gone
        if not (root / f"{STAGING_PREFIX}{lp.stem[len(LEASE_PREFIX):]}").exists() and lease_expired(read_lease(lp) or {}):
            lp.unlink(missing_ok=True)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat:
    """Renews a staging lease every LEASE_HEARTBEAT_S while a build runs."""

    def __init__(self, path: Path, lease: dict):
        self.path, self.lease, self.stop = path, lease, threading.Event()
        _LIVE_TOKENS.add(lease["token"])
        self.beat()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.lease["heartbeat"] = time.time()
        write_bytes_atomic(json.dumps(self.lease).encode(), self.path)

    def run(self) -> None:
        while not self.stop.wait(LEASE_HEARTBEAT_S):
            try:
                self.beat()
            except OSError:
                pass  # a missed beat only shortens the lease

    def end(self) -> None:
        self.stop.set()
        self.thread.join()
        _LIVE_TOKENS.discard(self.lease["token"])
        Path(self.path).unlink(missing_ok=True)


@dataclass
class StagedVersion:
    """A version being written: ``path`` is the staging folder until ``publish()`` renames it."""

    layout: Layout
    name: str
    version: str
    path: Path
    published: bool = False
    notes: dict = field(default_factory=dict)

    @property
    def final(self) -> Path:
        return dataset_dir(self.layout, self.name, self.version)

    def publish(self, make_latest: bool = True, sequence: int | None = None) -> Path:
        """One rename makes the version visible; then LATEST points at it. (Object store: the upload,
        then the marker, then LATEST; the local staging folder is removed.)"""
        if self.layout.remote:
            upload_version(self.layout, self.name, self.version, self.path)
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            make_world_readable(self.path)
            try:
                os.rename(self.path, self.final)
            except OSError:
                if not self.final.is_dir():  # a concurrent build of the same content may have won the race
                    raise
                shutil.rmtree(self.path, ignore_errors=True)
        self.path = self.final
        self.published = True
        if make_latest:
            self.notes["latest"] = set_latest(self.layout, self.name, self.version, sequence)
        return self.final

    def keep_unpublished(self) -> Path:
        """Failed checks: keep the files for inspection under a dot-name no reader lists."""
        target = staging_root(self.layout, self.name) / f"{UNPUBLISHED_PREFIX}{self.version}"
        shutil.rmtree(target, ignore_errors=True)
        os.rename(self.path, target)
        self.path = target
        return target


@contextlib.contextmanager
def staged_version(layout: Layout, name: str, version: str) -> Iterator[StagedVersion]:
    """Write a version into a staging folder; on an exception the folder is removed. Call
    ``publish()`` (or ``keep_unpublished()``) inside the block; leaving it without either removes
    the staging folder too."""
    root = staging_root(layout, name)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(layout, name)
    lease = new_lease()
    heartbeat = _Heartbeat(root / f"{LEASE_PREFIX}{lease['token']}.json", lease)
    path = root / f"{STAGING_PREFIX}{version}-{lease['token']}"
    staged = StagedVersion(layout, name, version, path)
    try:
        path.mkdir()
        yield staged
    finally:
        if not staged.published and staged.path == path and path.exists():
            shutil.rmtree(path, ignore_errors=True)
        heartbeat.end()


# ------------------------------------------------------------------------------------ cards


@dataclass
class DatasetCard:
    """What a dataset card says. Rendered as a Hugging Face dataset card (README.md, YAML header)."""

    name: str
    version: str
    summary: str
    splits: dict[str, int]  # split folder -> samples
    sample_format: str
    sources: list[str]
    licenses: list[str]
    filters: list[dict]  # {"filter", "threshold", "removed"}
    models: list[str]
    limitations: list[str]
    removal: str
    lineage: dict
    tags: list[str] = field(default_factory=list)
    extra_sections: dict[str, str] = field(default_factory=dict)

    def yaml_header(self) -> str:
        total = sum(self.splits.values())
        size = ("n<1K" if total < 1_000 else "1K<n<10K" if total < 10_000 else "10K<n<100K" if total < 100_000
                else "100K<n<1M" if total < 1_000_000 else "1M<n<10M" if total < 10_000_000 else "n>10M")
        lines = ["---", f"pretty_name: {json.dumps(self.name + ' ' + self.version)}", "license: other",
                 "license_name: mixed-see-card", "task_categories:", "- text-to-image", "size_categories:",
                 f"- {size}", "tags:"] + [f"- {t}" for t in ["lineup", *self.tags]]
        lines += ["configs:", "- config_name: default", "  data_files:"]
        for split, n in sorted(self.splits.items()):
            if n:
                hf_split = "validation" if split.endswith("eval") else "train" if split in (".", "") or split.endswith("train") else split
                path = "*.tar" if split in (".", "") else f"{split}/*.tar"
                lines += [f"  - split: {hf_split}", f"    path: {path}"]
        lines += ["---", ""]
        return "\n".join(lines)

    def render(self) -> str:
        out = [self.yaml_header(), f"# {self.name} ({self.version})", "", self.summary, ""]
        out += ["## Splits", "", "| split | samples |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in sorted(self.splits.items())]
        out += ["", "## Sample format", "", self.sample_format, "", "## Sources and licences", ""]
        out += [f"- {s}" for s in self.sources] + [""] + [f"- {lic}" for lic in self.licenses]
        out += ["", "## Filters", "", "| filter | threshold | removed |", "|---|---|---:|"]
        out += [f"| {f['filter']} | {f.get('threshold', '')} | {f.get('removed', '')} |" for f in self.filters]
        out += ["", "## Models used", ""] + [f"- {m}" for m in self.models]
        out += ["", "## Known limitations", ""] + [f"- {x}" for x in self.limitations]
        for title, body in self.extra_sections.items():
            out += ["", f"## {title}", "", body]
        out += ["", "## Removal requests", "", self.removal, "", "## Lineage", "", "```json",
                json.dumps(self.lineage, indent=2, sort_keys=True, default=str), "```", ""]
        return "\n".join(out)

    def write(self, folder: Path) -> Path:
        return write_bytes_atomic(self.render().encode(), (folder if is_remote(folder) else Path(folder)) / "README.md")


def removals_section(entries: list[dict] | None) -> str:
    """The card's list of removal requests in force: hashed subject, kind and date, never the subject."""
    if not entries:
        return "None so far."
    return "\n".join(["| request (hashed) | kind | filed |", "|---|---|---|"]
                     + [f"| {e['request']} | {e['kind']} | {e['filed']} |" for e in entries])


def removal_text(contact: str) -> str:
    return (
        f"This dataset holds photos of real people. To have a person removed, contact {contact} with a photo "
        "of the person (it need not be in the dataset), an image path or uid, or a social user id. Each request "
        "is recorded and applied to every later version; on request the versions that contained the person are "
        "deleted too, and this section lists the removals applied (hashed ids and dates)."
    )


def read_card(folder: Path) -> str | None:
    p = (folder if is_remote(folder) else Path(folder)) / "README.md"
    return p.read_text() if p.exists() else None


# ------------------------------------------------------------------------------------ one release


@dataclass
class Release:
    """What happened to one version: built now or reused, published or held back, and why."""

    name: str
    version: str
    folder: Path  # the published folder, or the kept unpublished one
    reused: bool  # the same content was published before: nothing was rebuilt
    published: bool
    problems: dict[str, list[str]]  # blocking check -> problems (empty = passed)
    result: object = None  # what ``build`` returned (None when reused)
    latest: bool = False  # LATEST points at this version (False: checks failed, or a newer build holds it)

    @property
    def passed(self) -> bool:
        return not any(self.problems.values())


def release(layout: Layout, name: str, version: str, build, checks, card=None) -> Release:
    """Build version ``version`` of dataset ``name`` unless it is published already, check it, publish it.

    ``build(folder) -> result`` writes the version into ``folder`` (a staging folder);
    ``checks(folder, result) -> {check: [problems]}`` reads back what was written (``result`` is None
    when the version is reused); ``card(folder, result)`` returns a :class:`DatasetCard` to write before
    publishing. The version is published (one rename, then LATEST) only when every check passed;
    otherwise it is kept as ``.unpublished-<id>`` for inspection and LATEST does not move.
    """
    sequence = begin_build(layout, name)
    final = dataset_dir(layout, name, version)
    if layout.remote and is_published(layout, name, version):
        # its blocking checks passed before upload; re-read the store's listing against the marker
        listing = verify_published(layout, name, version)
        problems = {PUBLISHED_CHECK: listing}
        latest = not listing and set_latest(layout, name, version, sequence)
        return Release(name, version, final, True, True, problems, latest=latest)
    if final.is_dir():
        problems = checks(final, None)
        latest = not any(problems.values()) and set_latest(layout, name, version, sequence)
        return Release(name, version, final, True, True, problems, latest=latest)
    with staged_version(layout, name, version) as staged:
        result = build(staged.path)
        if card is not None:
            card(staged.path, result).write(staged.path)
        from pipeline.viewer import write_viewer

        write_viewer(staged.path, f"{name} {version}")  # a static page of the version: its card, samples, histograms
        problems = checks(staged.path, result)
        if any(problems.values()):
            folder = staged.keep_unpublished()
            return Release(name, version, folder, False, False, problems, result)
        folder = staged.publish(sequence=sequence)
        return Release(name, version, folder, False, True, problems, result, latest=staged.notes["latest"])


def sync_catalog_table(layout: Layout, name: str, filename: str, table: str) -> bool:
    """Make the catalog's table ``table`` (tables/<table>.parquet) the ``filename`` of the version LATEST
    points to, so that the catalog shows the published version, never one that failed its checks or
    lost the race to a newer build. Copied a row group at a time (multiid candidates run to ~58 rows a
    photo). Returns False, leaving no catalog table, when there is no LATEST or it has no such file."""
    import pyarrow.parquet as pq

    from pipeline.storage import write_parquet_stream_atomic

    v = latest_version(layout, name)
    target = layout.table_file(table)
    source = dataset_dir(layout, name, v) / filename if v is not None else None
    if source is None or not source.exists():
        if target.exists():
            target.unlink()
        return False
    with source.open("rb") as f:
        pf = pq.ParquetFile(f)
        write_parquet_stream_atomic((pf.read_row_group(i) for i in range(pf.num_row_groups)), pf.schema_arrow, target)
    return True
