"""Removal requests: a person (by a photo), an image, or a social user, taken out of everything released.

A request is recorded under ``$LINEUP_HOME/removals/requests/<id>.json`` and applied by the next
collection update (the ``removals`` asset, before identities):

* ``photo``: the faces of the request photo (which need not be in the collection) are embedded by the
  collection's face model. Every face of the collection at or above the backend's ``removal_auto_min``
  cosine to it is removed, together with every face of the identity it was clustered into (the
  identity index finds the person's other photos); faces between ``same_person_min`` and
  ``removal_auto_min`` are listed for review, not removed. The request keeps the embeddings so that
  photos of the person that arrive later are removed too.
* ``identity``: every face of one identity id (the way to confirm a match under review).
* ``image``: one image, by uid or by a path whose bytes hash to it (or its source name).
* ``user``: a social user, as creator (their images) and as actor (their events); applied by the
  social builder.

Removing a face removes its photo: a photo is not released with a person cut out of it. The photos'
rows leave the per-partition tables (images, faces, face_scan, face_expressions); each leaves one
reject row "removed on request" so that counts still reconcile; re-ingesting the same bytes is
rejected the same way. New dataset versions are built without them (their ids change with their
inputs); older versions that contained them are listed as superseded, and ``purge`` deletes them.
Cards name requests only by hashed id and date.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
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


def hashed(value: str) -> str:
    """How a request's subject appears in cards and logs."""
    return hashlib.sha256(f"lineup-removal\x1f{value}".encode()).hexdigest()[:16]


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


def record_request(layout: Layout, kind: str, subject: str, **fields) -> RemovalRequest:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
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


@dataclass
class RemovalPlan:
    """What the requests remove from the collection now."""

    uids: set[str]  # photos to remove
    faces: set[tuple[str, int]]  # faces matched (directly or through their identity)
    review: list[dict]  # photo matches below the automatic threshold: listed, not applied
    per_request: dict[str, dict]  # request id -> counts
    user_hashes: set[str]  # social users to exclude


def plan_removals(requests: list[RemovalRequest], images: pa.Table, faces: pa.Table, identities: pa.Table | None,
                  auto_min: float, review_min: float) -> RemovalPlan:
    from pipeline.faces import embeddings_of

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
    plan = RemovalPlan(set(), set(), [], {}, set())
    for r in requests:
        got: set[tuple[str, int]] = set()
        uids: set[str] = set()
        if r.kind == "photo" and r.embeddings and E.shape[0]:
            Q = np.asarray(r.embeddings, np.float32)
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
        elif r.kind == "identity" and r.identity_id:
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
        plan.per_request[r.id] = {"kind": r.kind, "subject": r.subject_hash, "faces": len(got), "photos": len(uids)}
    plan.review = [x for x in plan.review if (x["uid"], x["face_index"]) not in plan.faces]
    return plan


def removed_uids(layout: Layout) -> set[str]:
    """Every uid removed so far (re-ingesting those bytes is rejected)."""
    p = applied_log(layout)
    out: set[str] = set()
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                out |= set(json.loads(line).get("uids", []))
    return out


def apply_removals(layout: Layout, plan: RemovalPlan, partitions: list[str]) -> dict:
    """Rewrite the per-partition tables without the planned photos; one reject row per removed image
    row; append to the applied log. Returns counts."""
    from pipeline.rejects import REJECT_SCHEMA

    if not plan.uids:
        return {"photos": 0, "rows_removed": {}}
    drop = pa.array(sorted(plan.uids), pa.string())
    rows_removed: dict[str, int] = {}
    for key in partitions:
        for table in PER_PARTITION_TABLES:
            path = layout.partition_file(table, key)
            if not path.exists():
                continue
            t = read_parquet(path)
            keep = pc.invert(pc.is_in(t.column("uid"), value_set=drop))
            n = t.num_rows - pc.sum(keep.cast(pa.int64())).as_py() if t.num_rows else 0
            if not n:
                continue
            if table == "images":
                gone = t.filter(pc.invert(keep))
                rej = pa.Table.from_pylist([
                    {"source": s, "stage": "ingest", "reason": REMOVED_REASON, "detail": "a removal request applied to this image",
                     "partition": key, "uid": None} for s in gone.column("source").to_pylist()], schema=REJECT_SCHEMA)
                rpath = layout.partition_file("rejects_ingest", key)
                old = read_parquet(rpath) if rpath.exists() else REJECT_SCHEMA.empty_table()
                write_parquet_atomic(pa.concat_tables([old.cast(REJECT_SCHEMA), rej]), rpath)
            if table == "faces":  # the face stage's rejects may name the uid too
                fr = layout.partition_file("rejects_faces", key)
                if fr.exists():
                    rt = read_parquet(fr)
                    write_parquet_atomic(rt.filter(pc.invert(pc.is_in(rt.column("uid"), value_set=drop))), fr)
            write_parquet_atomic(t.filter(keep), path)
            rows_removed[table] = rows_removed.get(table, 0) + n
    entry = {"applied_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "requests": sorted(plan.per_request), "uids": sorted(plan.uids), "faces": len(plan.faces)}
    log = applied_log(layout)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    return {"photos": len(plan.uids), "rows_removed": rows_removed}


def card_entries(layout: Layout) -> list[dict]:
    """What a dataset card says about removals: hashed subject, kind and date of every request."""
    return [{"request": r.subject_hash, "kind": r.kind, "filed": r.created_at[:10]} for r in load_requests(layout)]


# ------------------------------------------------------------------------------------ old versions

UID_COLUMNS = ("target_uid", "ref_uid", "uid_a", "uid_b", "winner_uid", "loser_uid", "uid")


def versions_containing(layout: Layout, uids: set[str]) -> dict[str, list[str]]:
    """dataset name -> published versions whose pairs tables name any of ``uids``."""
    out: dict[str, list[str]] = {}
    if not uids or not layout.datasets.exists():
        return out
    value_set = pa.array(sorted(uids), pa.string())
    for ds in sorted(p for p in layout.datasets.iterdir() if p.is_dir()):
        for v in sorted(p for p in ds.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for table_path in v.glob("**/*pairs.parquet"):
                t = read_parquet(table_path)
                cols = [c for c in UID_COLUMNS if c in t.column_names]
                if any(pc.any(pc.is_in(t.column(c), value_set=value_set)).as_py() for c in cols):
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


def mark_superseded(layout: Layout, found: dict[str, list[str]], purge: bool) -> dict[str, list[str]]:
    """Record (or with ``purge`` delete) the old versions that contain removed photos."""
    for name, versions in found.items():
        path = layout.datasets / name / "SUPERSEDED.json"
        known = json.loads(path.read_text()) if path.exists() else {}
        latest = (layout.datasets / name / "LATEST").read_text().strip() if (layout.datasets / name / "LATEST").exists() else None
        for v in versions:
            known[v] = {"reason": "contains photos removed on request",
                        "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), "deleted": purge}
            if purge:
                remove_tree(layout.datasets / name / v)
                if v == latest:
                    (layout.datasets / name / "LATEST").unlink(missing_ok=True)
        write_bytes_atomic(json.dumps(known, indent=1, sort_keys=True).encode(), path)
    return found
