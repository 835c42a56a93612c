"""Removal requests: a person (by a photo), an image, or a social user, taken out of everything released.

A request is validated and recorded under ``$LINEUP_HOME/removals/requests/<id>.json`` (assets/forget.py)
and applied by the next collection update (the ``removals`` asset, before identities):

* ``photo``: the faces of the request photo (which need not be in the collection) are embedded by the
  collection's face model. Every face of the collection at or above the backend's ``removal_auto_min``
  cosine to it is removed, together with every face of the identity it was clustered into (the
  identity index finds the person's other photos); faces between ``same_person_min`` and
  ``removal_auto_min`` are listed for review (``removals/review.json``), not removed.
* ``identity``: every face of one identity id (the way to confirm a match under review).
* ``image``: one image, by uid or by a path whose bytes hash to it (or its source name).
* ``user``: a social user, as creator (their images) and as actor (their events); applied by the
  social builder.

Photos that arrive later are matched against the request photo *and every face removed with the
request* (their embeddings are kept in the applied log, never their uids).

The request log is the source of truth; applying it is idempotent and resumable (``apply_requests``):
1. plan: what the requests remove from the collection now;
2. journal: the salted hashes of the photos' uids are appended to ``removals/applied.jsonl`` (fsynced)
   *before* any table is touched;
3. sweep: every table under ``tables/`` is rewritten without any row whose uid hashes into the
   journal (each file atomically; a file already clean is left alone). Rejects rows that name a
   removed photo keep their count but lose the name: source ``removed:<hash>``, no uid. An image row
   removed leaves one such reject row (written before the image row goes, never twice);
4. pictures showing a removed uid are deleted (pipeline/pictures.py);
5. dataset versions holding a removed photo are listed in ``SUPERSEDED.json``; with ``purge`` they
   are deleted (the list is written first, so a kill mid-delete is finished by the next run).
A kill anywhere leaves a state from which the next run reaches the same result as an uninterrupted
run, because steps 3-5 work from the whole journal, not from what this run planned.

Removing a face removes its photo: a photo is not released with a person cut out of it. Re-ingesting
the same bytes is rejected (``removed_uids``). A request that removes nothing changes no dataset
version: cards (and so version ids) list only the requests that removed something, and user requests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Layout
from pipeline.storage import read_parquet, remove_tree, write_bytes_atomic, write_parquet_atomic

KINDS = ("photo", "identity", "image", "user")
PER_PARTITION_TABLES = ("images", "faces", "face_scan", "face_expressions", "image_scores")
REMOVED_REASON = "removed on request"
# columns that name a photo, in any table or dataset version
UID_COLUMNS = ("uid", "target_uid", "ref_uid", "uid_a", "uid_b", "winner_uid", "loser_uid", "representative_uid")


def hashed(value: str) -> str:
    """How a request's subject appears in cards and logs."""
    return hashlib.sha256(f"lineup-removal\x1f{value}".encode()).hexdigest()[:16]


def uid_hash(uid: str) -> str:
    """How a removed photo is remembered: a salted hash of its content uid, never the uid or its name."""
    return hashlib.sha256(f"lineup-removed-photo\x1f{uid}".encode()).hexdigest()[:32]


def removed_source(uid: str) -> str:
    """The ``source`` of a reject row for a removed photo (file names often name the person)."""
    return f"removed:{uid_hash(uid)}"


def _checkpoint(step: str) -> None:
    """A point where a kill leaves durable state behind; tests inject faults here."""
    at = os.environ.get("LINEUP_REMOVALS_KILL_AT")
    if at and step.startswith(at):
        os._exit(137)  # as a SIGKILL would: no cleanup, no finally


@dataclass
class RemovalRequest:
    id: str
    kind: str
    created_at: str
    subject_hash: str  # hashed(subject): what cards and logs show
    uid: str | None = None  # image
    source: str | None = None  # image: a source name to match when no uid was given
    identity_id: str | None = None  # identity
    user_hash: str | None = None  # user: sha256 of the user id (the social builder compares hashes)
    face_model: str | None = None  # photo: the model that made the embeddings
    embeddings: list[list[float]] = field(default_factory=list)  # photo
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def user_hash(user_id: str) -> str:
    return hashlib.sha256(str(user_id).encode()).hexdigest()


def requests_dir(layout: Layout) -> Path:
    return layout.home / "removals" / "requests"


def applied_log(layout: Layout) -> Path:
    return layout.home / "removals" / "applied.jsonl"


def review_file(layout: Layout) -> Path:
    return layout.home / "removals" / "review.json"


def record_request(layout: Layout, kind: str, subject: str, **fields) -> RemovalRequest:
    """Record a request that the caller has validated (assets/forget.py does)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not str(subject).strip():
        raise ValueError("a removal request needs a subject")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rid = "rm-" + hashlib.sha256(f"{kind}\x1f{subject}\x1f{now}".encode()).hexdigest()[:12]
    req = RemovalRequest(rid, kind, now, hashed(subject), **fields)
    write_bytes_atomic(req.to_json().encode(), requests_dir(layout) / f"{rid}.json")
    return req


def load_requests(layout: Layout) -> list[RemovalRequest]:
    d = requests_dir(layout)
    if not d.exists():
        return []
    return sorted((RemovalRequest(**json.loads(p.read_text())) for p in d.glob("*.json")), key=lambda r: (r.created_at, r.id))


def embed_request_photo(data: bytes, backend) -> list[np.ndarray]:
    """Embeddings of the faces in a request photo, largest face first (nothing found: empty)."""
    from pipeline.decode import decode_image

    faces = backend.analyze([decode_image(data).rgb])[0]
    faces = sorted(faces, key=lambda f: -float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
    return [np.asarray(f.embedding, np.float32) for f in faces]


# ------------------------------------------------------------------------------------ the applied log


@dataclass
class Journal:
    """What the applied log says: every photo removed so far (hashed), per request, with the embeddings
    of the faces each request removed (to match photos that arrive later)."""

    removed: set[str] = field(default_factory=set)  # uid_hash of every removed photo
    per_request: dict[str, set[str]] = field(default_factory=dict)  # request id -> uid hashes
    embeddings: dict[str, list[list[float]]] = field(default_factory=dict)  # request id -> removed faces' embeddings
    legacy: bool = False  # lines written by an older version, with the uids in clear

    def __contains__(self, uid: str) -> bool:  # `uid in removed_uids(layout)` (ingest)
        return uid_hash(uid) in self.removed

    def __bool__(self) -> bool:
        return bool(self.removed)

    def __len__(self) -> int:
        return len(self.removed)


def load_journal(layout: Layout) -> Journal:
    p = applied_log(layout)
    j = Journal()
    if not p.exists():
        return j
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill: nothing was swept for it yet, the next plan finds the photos again
        if "uids" in e:  # before hashing: uids in clear
            j.legacy = True
            hs = {uid_hash(u) for u in e["uids"]}
            j.removed |= hs
            for rid in e.get("requests", []):
                j.per_request.setdefault(rid, set()).update(hs)
            continue
        for rid, hs in e.get("requests", {}).items():
            j.per_request.setdefault(rid, set()).update(hs)
            j.removed |= set(hs)
        for rid, embs in e.get("embeddings", {}).items():
            j.embeddings.setdefault(rid, []).extend(embs)
    return j


def removed_uids(layout: Layout) -> Journal:
    """Every photo removed so far; ``uid in removed_uids(layout)`` is true for their bytes (re-ingest)."""
    return load_journal(layout)


def _append_journal(layout: Layout, entry: dict) -> None:
    log = applied_log(layout)
    log.parent.mkdir(parents=True, exist_ok=True)
    torn = log.exists() and log.stat().st_size and not log.read_bytes().endswith(b"\n")
    with open(log, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite_legacy_journal(layout: Layout, j: Journal) -> None:
    entry = {"applied_at": "legacy", "requests": {r: sorted(h) for r, h in j.per_request.items()},
             "embeddings": j.embeddings}
    lost = j.removed - set().union(*j.per_request.values()) if j.per_request else j.removed
    if lost:
        entry["requests"]["-"] = sorted(lost)
    write_bytes_atomic((json.dumps(entry, sort_keys=True) + "\n").encode(), applied_log(layout))


# ------------------------------------------------------------------------------------ planning


@dataclass
class RemovalPlan:
    """What the requests remove from the collection now."""

    uids: set[str]  # photos to remove
    faces: set[tuple[str, int]]  # faces matched (directly or through their identity)
    review: list[dict]  # photo matches below the automatic threshold: listed, not applied
    per_request: dict[str, dict]  # request id -> counts
    user_hashes: set[str]  # social users to exclude
    request_uids: dict[str, set[str]] = field(default_factory=dict)  # request id -> photos it removes now
    request_embeddings: dict[str, list[tuple[str, list[float]]]] = field(default_factory=dict)  # request id -> (uid, embedding) of the faces it removes now


def plan_removals(requests: list[RemovalRequest], images: pa.Table, faces: pa.Table, identities: pa.Table | None,
                  auto_min: float, review_min: float, removed_embeddings: dict[str, list] | None = None) -> RemovalPlan:
    """``removed_embeddings``: request id -> embeddings of the faces it removed before; a later photo
    within ``auto_min`` of any of them is the same person (not only of the request photo)."""
    from pipeline.faces.stage import embeddings_of

    removed_embeddings = removed_embeddings or {}
    keys = list(zip(faces.column("uid").to_pylist(), [int(x) for x in faces.column("face_index").to_pylist()]))
    E = embeddings_of(faces) if faces.num_rows else np.zeros((0, 1), np.float32)
    ident = {}
    if identities is not None and identities.num_rows:
        ident = {(u, int(f)): i for u, f, i in zip(*(identities.column(c).to_pylist() for c in ("uid", "face_index", "identity_id")))}
    members: dict[str, list[tuple[str, int]]] = {}
    for k, i in ident.items():
        members.setdefault(i, []).append(k)
    sources = dict(zip(images.column("source").to_pylist(), images.column("uid").to_pylist())) if images.num_rows else {}
    known_uids = set(images.column("uid").to_pylist()) if images.num_rows else set()
    row_of = {k: i for i, k in enumerate(keys)}
    plan = RemovalPlan(set(), set(), [], {}, set())
    for r in requests:
        got: set[tuple[str, int]] = set()
        uids: set[str] = set()
        queries = list(r.embeddings if r.kind == "photo" else []) + list(removed_embeddings.get(r.id, []))
        if queries and E.shape[0]:
            Q = np.asarray(queries, np.float32)
            if Q.shape[1] != E.shape[1]:
                raise ValueError(f"removal request {r.id} was embedded by {r.face_model} ({Q.shape[1]}-d); the collection's "
                                 f"faces are {E.shape[1]}-d: file the request again with the collection's face model")
            sims = (E @ Q.T).max(axis=1)
            direct = [keys[i] for i in np.nonzero(sims >= auto_min)[0]]
            got |= set(direct)
            for k in direct:
                if k in ident:
                    got |= set(members[ident[k]])
            for i in np.nonzero((sims >= review_min) & (sims < auto_min))[0]:
                if keys[i] not in got:
                    plan.review.append({"request": r.id, "uid": keys[i][0], "face_index": keys[i][1],
                                        "identity_id": ident.get(keys[i]), "cosine": round(float(sims[i]), 4)})
        if r.kind == "identity" and r.identity_id:
            got |= set(members.get(r.identity_id, []))
        elif r.kind == "image":
            uid = r.uid or sources.get(r.source or "")
            if uid in known_uids:
                uids.add(uid)
        elif r.kind == "user" and r.user_hash:
            plan.user_hashes.add(r.user_hash)
        uids |= {u for u, _ in got}
        plan.faces |= got
        plan.uids |= uids
        plan.request_uids[r.id] = uids
        plan.request_embeddings[r.id] = [(k[0], E[row_of[k]].astype(float).round(6).tolist()) for k in sorted(got) if k in row_of]
        plan.per_request[r.id] = {"kind": r.kind, "subject": r.subject_hash, "faces": len(got), "photos": len(uids)}
    plan.review = [x for x in plan.review if (x["uid"], x["face_index"]) not in plan.faces]
    return plan


def card_entries(layout: Layout, users: bool = False) -> list[dict]:
    """What a dataset card says about removals: hashed subject, kind and date of every request that
    removed a photo (the photo datasets), or of every user request (``users=True``: the social dataset,
    whose builder applies them). A request that removed nothing from a photo dataset is not listed there,
    so it changes no photo dataset's version id."""
    j = load_journal(layout)
    return [{"request": r.subject_hash, "kind": r.kind, "filed": r.created_at[:10]} for r in load_requests(layout)
            if ((r.kind == "user") if users else (r.kind != "user" and j.per_request.get(r.id)))]


# ------------------------------------------------------------------------------------ applying

IMAGE_DETAIL = "a removal request applied to this image"
COPY_DETAIL = "an input with the bytes of a removed photo"


def _removed_values(col: pa.ChunkedArray, removed: set[str]) -> list[str]:
    return [u for u in pc.unique(col).to_pylist() if u is not None and uid_hash(u) in removed]


def _removed_mask(t: pa.Table, removed: set[str]) -> pa.Array | None:
    """True for rows that name a removed photo in any uid column; None when none does."""
    mask = None
    for c in UID_COLUMNS:
        if c not in t.column_names or not (pa.types.is_string(t.schema.field(c).type) or pa.types.is_large_string(t.schema.field(c).type)):
            continue
        bad = _removed_values(t.column(c), removed)
        if bad:
            m = pc.fill_null(pc.is_in(t.column(c), value_set=pa.array(bad, t.schema.field(c).type)), False)
            mask = m if mask is None else pc.or_(mask, m)
    return mask


def _uid_columns_of(path) -> list[str] | None:
    """The uid columns of a Parquet file, from its footer (None: read the whole file to find out)."""
    try:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - an object store path: the full read below decides
        return None
    return [c for c in UID_COLUMNS if c in names]


def _hits(path, removed: set[str]) -> bool:
    """Whether a file may name a removed photo: only its uid columns are read (not embeddings)."""
    cols = _uid_columns_of(path)
    if cols == []:
        return False
    t = read_parquet(path, columns=cols) if cols else read_parquet(path)
    mask = _removed_mask(t, removed) if t.num_rows else None
    return mask is not None and bool(pc.any(mask).as_py())


def _table_files(layout: Layout) -> list[Path]:
    if not layout.tables.exists():
        return []
    return sorted(p for p in layout.tables.rglob("*.parquet") if not p.name.startswith("."))


def _anonymised_rejects(t: pa.Table, mask: pa.Array) -> pa.Table:
    """Reject rows that name a removed photo keep their place in the counts but lose the name."""
    from pipeline.rejects import REJECT_SCHEMA

    rows = t.cast(REJECT_SCHEMA).to_pylist()
    for row, hit in zip(rows, mask.to_pylist()):
        if hit:
            row.update(source=removed_source(row["uid"]), reason=REMOVED_REASON,
                       detail=row["detail"] if row["detail"] in (IMAGE_DETAIL, COPY_DETAIL) else COPY_DETAIL, uid=None)
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def sweep_tables(layout: Layout, removed: set[str], checkpoint: Callable[[str], None] = _checkpoint) -> dict[str, int]:
    """Rewrite every table without the rows of removed photos; returns rows removed per table. Idempotent:
    a clean file is not rewritten, and an image row's reject row is added only once."""
    from pipeline.rejects import REJECT_SCHEMA

    out: dict[str, int] = {}
    if not removed:
        return out
    for path in _table_files(layout):
        table = path.parent.name if path.parent != layout.tables else path.stem
        if not _hits(path, removed):
            continue
        t = read_parquet(path)
        mask = _removed_mask(t, removed) if t.num_rows else None
        if mask is None or not pc.any(mask).as_py():
            continue
        n = int(pc.sum(mask.cast(pa.int64())).as_py())
        if table.startswith("rejects") and table != "rejects_faces":
            write_parquet_atomic(_anonymised_rejects(t, mask), path)
        else:
            if table == "images":  # the image row leaves one reject row, so counts still reconcile
                key = path.stem
                rpath = layout.partition_file("rejects_ingest", key)
                old = read_parquet(rpath).cast(REJECT_SCHEMA) if rpath.exists() else REJECT_SCHEMA.empty_table()
                have = {(s, d) for s, d in zip(old.column("source").to_pylist(), old.column("detail").to_pylist())}
                add = [{"source": removed_source(u), "stage": "ingest", "reason": REMOVED_REASON, "detail": IMAGE_DETAIL,
                        "partition": key, "uid": None}
                       for u in t.filter(mask).column("uid").to_pylist() if (removed_source(u), IMAGE_DETAIL) not in have]
                if add:
                    write_parquet_atomic(pa.concat_tables([old, pa.Table.from_pylist(add, schema=REJECT_SCHEMA)]), rpath)
                    checkpoint(f"sweep:rejects_ingest/{key}")
            write_parquet_atomic(t.filter(pc.invert(mask)), path)
        out[table] = out.get(table, 0) + n
        checkpoint(f"sweep:{table}/{path.name}")
    return out


def purge_removed_pictures(layout: Layout, removed: set[str]) -> int:
    """Delete every picture (pipeline/pictures.py) that shows a removed photo or one of its faces."""
    from pipeline.pictures import _read_index, purge_pictures

    shown = {u for row in _read_index(layout.home) for u in row.get("uids", ())}
    hit = [u for u in shown if uid_hash(str(u).split("#")[0]) in removed or uid_hash(str(u)) in removed]
    return len(purge_pictures(layout.home, hit)) if hit else 0


def purge_removed_guard_decisions(layout: Layout, removed: set[str]) -> int:
    """Drop the multi-identity copy-paste guard's kept decisions (pipeline/multiid/guard_cache.py) that
    involve a removed photo, and the removed photos' pHashes kept beside them."""
    from pipeline.multiid.guard_cache import kept_photo_uids, purge_guard_decisions

    path = layout.multiid_guard_cache
    hit = {u for u in kept_photo_uids(path) if uid_hash(u) in removed}
    return purge_guard_decisions(path, hit) if hit else 0


def versions_containing(layout: Layout, removed: set[str]) -> dict[str, list[str]]:
    """dataset name -> published versions whose tables name any removed photo (``removed``: uid hashes)."""
    out: dict[str, list[str]] = {}
    if not removed or not layout.datasets.exists():
        return out
    from pipeline.datasets import UNPUBLISHED_PREFIX, staging_root

    for ds in sorted(p for p in layout.datasets.iterdir() if p.is_dir()):
        # published versions, and those kept unpublished for inspection after a failed check
        folders = [p for p in ds.iterdir() if p.is_dir() and not p.name.startswith(".")]
        kept = staging_root(layout, ds.name)
        folders += [p for p in kept.iterdir() if p.is_dir() and p.name.startswith(UNPUBLISHED_PREFIX)] if kept.exists() else []
        for v in sorted(folders):
            for table_path in sorted(v.rglob("*.parquet")):
                if _hits(table_path, removed):
                    out.setdefault(ds.name, []).append(v.name)
                    break
    return out


def social_versions_with_users(layout: Layout, user_hashes: set[str], keep: str | None = None) -> dict[str, list[str]]:
    """Published social versions (other than ``keep``) in which a removed user acts or creates."""
    found: list[str] = []
    root = layout.datasets / "social"
    if not user_hashes or not root.exists():
        return {}
    for v in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != keep):
        ids: set[str] = set()
        for table, col in (("social_users.parquet", "user_id"), ("social_images.parquet", "creator_id"),
                           ("social_pairs.parquet", "user_id")):
            if (v / table).exists():
                ids |= {x for x in read_parquet(v / table, columns=[col]).column(col).to_pylist() if x is not None}
        if {user_hash(i) for i in ids} & user_hashes:
            found.append(v.name)
    return {"social": found} if found else {}


SUPERSEDED_REASON = "contains photos removed on request"


def mark_superseded(layout: Layout, found: dict[str, list[str]], purge: bool) -> dict[str, list[str]]:
    """Record the old versions that contain removed photos; with ``purge`` delete them and every version
    listed before (the list is written first: a kill mid-delete is finished by the next purge)."""
    names = set(found)
    if purge and layout.datasets.exists():
        names |= {p.parent.name for p in layout.datasets.glob("*/SUPERSEDED.json")}
    for name in sorted(names):
        path = layout.datasets / name / "SUPERSEDED.json"
        known = json.loads(path.read_text()) if path.exists() else {}
        for v in found.get(name, []):
            prev = known.get(v, {})
            known[v] = {"reason": SUPERSEDED_REASON, "at": prev.get("at") or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
                        "deleted": bool(prev.get("deleted")) or purge}
        doomed = sorted(v for v, e in known.items() if e.get("reason") == SUPERSEDED_REASON) if purge else []
        for v in doomed:
            known[v]["deleted"] = True
        write_bytes_atomic(json.dumps(known, indent=1, sort_keys=True).encode(), path)
        if purge:
            from pipeline.datasets import UNPUBLISHED_PREFIX, clean_stale_staging, staging_root

            clean_stale_staging(layout, name)  # what a killed build left may hold the photos too
            latest_file = layout.datasets / name / "LATEST"
            latest = latest_file.read_text().strip() if latest_file.exists() else None
            for v in doomed:
                folder = (staging_root(layout, name) if v.startswith(UNPUBLISHED_PREFIX) else layout.datasets / name) / v
                if folder.exists():
                    remove_tree(folder)
                if v == latest:
                    latest_file.unlink(missing_ok=True)
    return found


_UID_TOKEN = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


def names_removed(text: str, removed: set[str]) -> bool:
    """Whether ``text`` (an event log record, say) names a removed photo by its uid."""
    return bool(removed) and any(uid_hash(t) in removed for t in set(_UID_TOKEN.findall(text)))


def confirm_command(row: dict) -> str:
    """The command that confirms a match listed for review."""
    if row.get("identity_id"):
        return f"make forget IDENTITY={row['identity_id']}"
    return f"make forget IMAGE={row['uid']}"


@dataclass
class Applied:
    requests: int
    photos_removed_now: int  # photos this run planned that were not in the log before
    photos_removed_total: int  # every photo in the log
    rows_removed: dict[str, int]  # table -> rows swept this run
    pictures_deleted: int
    superseded: dict[str, list[str]]
    purged: bool
    awaiting_review: int
    review_path: Path | None
    review_pictures: dict[str, Path]
    social_users: int
    per_request: dict[str, dict]


def apply_requests(layout: Layout, requests: list[RemovalRequest], images: pa.Table, faces: pa.Table,
                   identities: pa.Table | None, auto_min: float, review_min: float, purge: bool = False,
                   limits=None, checkpoint: Callable[[str], None] = _checkpoint) -> Applied:
    """Apply the request log to the collection (see the module docstring for the steps and why a kill
    at any of them is harmless). ``images``/``faces``: the collection; everything under the store's
    tables is swept whatever the collection view holds."""
    from pipeline.catalog import refresh_catalog

    j = load_journal(layout)
    if j.legacy:
        _rewrite_legacy_journal(layout, j)
    plan = plan_removals(requests, images, faces, identities, auto_min, review_min, j.embeddings)
    checkpoint("planned")
    entry: dict = {"requests": {}, "embeddings": {}}
    for rid, uids in plan.request_uids.items():
        new = {uid_hash(u) for u in uids} - j.per_request.get(rid, set())
        if new:
            entry["requests"][rid] = sorted(new)
            embs = [e for (u, e) in plan.request_embeddings.get(rid, []) if uid_hash(u) in new]
            if embs:
                entry["embeddings"][rid] = embs
    new_photos = len(set().union(*entry["requests"].values()) - j.removed) if entry["requests"] else 0
    if entry["requests"]:
        entry["applied_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _append_journal(layout, entry)
        checkpoint("journaled")
        j = load_journal(layout)
    rows = sweep_tables(layout, j.removed, checkpoint)
    if rows:
        refresh_catalog(layout)
        checkpoint("catalog")
    pics = purge_removed_pictures(layout, j.removed)
    checkpoint("pictures")
    purge_removed_guard_decisions(layout, j.removed)
    checkpoint("guard_decisions")
    superseded = mark_superseded(layout, versions_containing(layout, j.removed), purge)
    checkpoint("superseded")
    review = [{**r, "confirm": confirm_command(r)} for r in plan.review]
    review_pictures = _write_review(layout, review, images, faces, limits)
    checkpoint("review")
    per_request = {rid: {**c, "photos_removed_total": len(j.per_request.get(rid, ()))} for rid, c in plan.per_request.items()}
    return Applied(len(requests), new_photos, len(j.removed), rows, pics, superseded, purge, len(review),
                   review_file(layout) if review else None, review_pictures, len(plan.user_hashes), per_request)


def _write_review(layout: Layout, review: list[dict], images: pa.Table, faces: pa.Table, limits) -> dict[str, Path]:
    """The matches awaiting review, as a file (``make forget REVIEW=1`` prints it) and a contact sheet
    under pictures/ (indexed by the uids it shows, so a later removal deletes it). Never in the event log."""
    from pipeline.pictures import pictures_dir, save_pictures

    path = review_file(layout)
    sheet = pictures_dir(layout.home) / "removals" / "review" / "matches_for_review.png"
    if not review:
        path.unlink(missing_ok=True)
        sheet.unlink(missing_ok=True)
        return {}
    write_bytes_atomic(json.dumps(review, indent=1, sort_keys=True).encode(), path)
    from pipeline.faces.crops import CropReader
    from pipeline.viz import contact_sheet

    crops = CropReader(images, faces, limits)
    shown = review[:48]
    tiles = [(c, f"cos {r['cosine']:.3f}\n{r['confirm'].split()[-1][:22]}") for r in shown
             if (c := crops.crop(r["uid"], r["face_index"])) is not None]
    if not tiles:
        return {}
    uids = {r["uid"] for r in shown} | {f"{r['uid']}#{r['face_index']}" for r in shown}
    return save_pictures(layout.home, "removals/review", {"matches_for_review": contact_sheet(tiles, cols=6, tile=96)}, uids)
