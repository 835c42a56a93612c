"""Per-target reuse across versions of the multi-identity dataset.

Bucket reuse (build.py, ``buckets.json``) takes a whole bucket of co-occurrence components from the previous
version when nothing in it changed. At scale one component holds most faces (people are chained together by
the photos they share), so a refresh that touches a few people everywhere touches every bucket. This module
goes one level down: what decides a target photo's sample, its pair rows and its candidate rows is

- the photo itself: its image row, every face row (embedding bytes included) and identity row
  (:func:`photo_digests`);
- the split of each of its labelled faces (the eval override included);
- for each of its people (usable labelled faces), the candidate set: every photo holding a face of that
  identity, each by its own digest and the splits of its labelled faces (a candidate photo's split, and
  whether its crop shows a face of the other split, come from them);
- the config (less the keys that only lay out files), the builder, library and face-model versions.

:class:`TargetFingerprints` hashes exactly these; ``targets.parquet`` records them per target with the
target's outcome, its sample's key, split and shard, and its share of the additive counts. A refresh runs the
selection only for targets whose fingerprint changed (or whose previous shard fails its sha256); the others'
tar members are copied from the previous version's shards, their rows from its tables. The version written
is the same, byte for byte, as a fresh build's.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

TARGETS_FILE = "targets.parquet"
TARGETS_SCHEMA = pa.schema([
    ("target_uid", pa.string()),
    ("fingerprint", pa.binary()),  # what decides the target's sample and rows (16 bytes)
    ("photo_digest", pa.binary()),  # parts of the fingerprint, kept to say why a target was selected again
    ("splits", pa.string()),
    ("people_digest", pa.binary()),
    ("examined", pa.binary()),  # the fingerprint over the candidates examined (under the cap) only
    ("outcome", pa.string()),  # "kept" or the reason the target was dropped
    ("key", pa.string()),  # the sample's key, split, shard ("<split>/<tar>") and summary, when kept
    ("split", pa.string()),
    ("shard", pa.string()),
    ("persons", pa.list_(pa.string())),
    ("refs", pa.list_(pa.int32())),
    ("counts", pa.string()),  # JSON: the target's share of candidates_removed_by, duplicate flags, unreadable
])
# config keys that lay out files but do not change a sample's bytes
LAYOUT_ONLY = ("reuse_buckets", "cache_images", "cache_keypoints", "shard_max_count", "shard_max_bytes", "dataset_name")


def photo_digests(tables: Iterable[tuple[pa.Table, list[str], list[str]]], block: int = 65_536) -> dict[str, bytes]:
    """uid -> 16-byte digest of the photo's rows in each (table, columns, sort_by): numbers and list values
    by their float64 bytes (as :func:`pipeline.datasets.fingerprint_table`: an embedding that changes in its
    last bit changes the digest), strings by their text. A missing column counts as absent.

    Rows are visited in sort order ``block`` rows at a time (sort indices, then a block taken and converted):
    a sorted copy of the faces table with its embeddings as float64 was ~3 GB at once at 1M faces."""
    import pyarrow.compute as pc

    hs: dict[str, hashlib._Hash] = {}
    for ti, (t, cols, sort_by) in enumerate(tables):
        if t.num_rows == 0:
            continue
        present = [c for c in cols if c in t.column_names]
        order = pc.sort_indices(t.select(sort_by), sort_keys=[(c, "ascending") for c in sort_by])
        head = json.dumps([ti, present]).encode()
        for s in range(0, t.num_rows, block):
            tb = t.select(present + (["uid"] if "uid" not in present else [])).take(order.slice(s, block))
            nums, lists, texts = [], [], []
            for c in present:
                col = tb.column(c).combine_chunks()
                if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
                    lengths = np.asarray(pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False), np.int64)
                    offs = np.concatenate([[0], np.cumsum(lengths)])
                    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype="<f8")
                    lists.append((flat, offs))
                elif pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
                    nums.append(np.asarray(col.to_numpy(zero_copy_only=False), dtype="<f8"))
                else:
                    texts.append(col.to_pylist())
            M = np.stack(nums, axis=1) if nums else np.zeros((tb.num_rows, 0), "<f8")
            for i, u in enumerate(tb.column("uid").to_pylist()):
                h = hs.get(u)
                if h is None:
                    h = hs[u] = hashlib.sha256()
                parts = [head, M[i].tobytes()]
                parts += [flat[offs[i]:offs[i + 1]].tobytes() + b"\x1e" for flat, offs in lists]
                parts.append("\x1f".join("\x00" if v is None else str(v) for v in (x[i] for x in texts)).encode())
                h.update(b"\x1d".join(parts) + b"\x1c")
    return {u: h.digest()[:16] for u, h in hs.items()}


def common_digest(common: dict) -> bytes:
    """The part of every target's fingerprint that is the same for all: config (less LAYOUT_ONLY), versions."""
    c = dict(common)
    c["config"] = {k: v for k, v in c["config"].items() if k not in LAYOUT_ONLY}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).digest()


class TargetFingerprints:
    """Fingerprints of the targets among ``uids`` (one bucket: a target's candidates lie in its co-occurrence
    component); ``split_of`` carries the eval override, ``usable(face)`` says whether a face is a person.

    :meth:`whole` covers each person's every face (cheap: one digest per identity, shared by its targets);
    :meth:`examined` only the faces the selection examines (``examined_candidates``: at most ``cap`` per
    person, chosen by a hash of (target, candidate)). A person with more faces than the cap who gains one
    changes the whole fingerprint of all their targets, the examined one only of the targets whose subset
    the new face enters (~cap / faces of them); the others need only their over-cap count updated
    (:meth:`over_cap`)."""

    def __init__(self, uids: list[str], by_uid: dict, digests: dict[str, bytes], split_of: Callable[[str], str],
                 usable: Callable, common: bytes, cap: int):
        self.by_uid, self.digests, self.usable, self.common, self.cap = by_uid, digests, usable, common, cap
        self.splits = {u: ",".join(f"{f.face_index}:{split_of(f.identity_id)}" for f in by_uid.get(u, [])
                                   if f.identity_id is not None) for u in uids}
        self.faces_of: dict[str, list] = defaultdict(list)  # identity -> its faces, in (uid, face_index) order
        for u in sorted(uids):
            for f in by_uid.get(u, []):
                if f.identity_id is not None:
                    self.faces_of[f.identity_id].append(f)
        self._ident: dict[str, bytes] = {}
        self._photos: dict[str, bytes] = {}
        self._face_parts: dict[tuple[str, int], bytes] = {}
        self._unchanged: dict[str, bool] = {}
        self._by_ref: dict[str, dict] = {}  # photo -> what the fingerprints take of it (met once per candidate)
        self._subsets: dict[tuple[str, str], list] = {}  # (target, identity) -> its examined faces, over the cap
        self._changed: dict[str, list] = {}  # identity -> its faces in photos new or changed (seed_examined)
        self._changed_photos: dict[str, set] = {}

    def people(self, u: str) -> list[str]:
        return sorted({f.identity_id for f in self.by_uid.get(u, []) if f.identity_id is not None and self.usable(f)})

    def _photo(self, p: str) -> bytes:
        got = self._photos.get(p)
        if got is None:
            got = self._photos[p] = p.encode() + b"\x1f" + self.digests.get(p, b"-") + self.splits[p].encode() + b"\x1e"
        return got

    def examined_of(self, u: str, iid: str) -> list:
        """The faces of person ``iid`` that target ``u`` examines (rules.examined_candidates), chosen once per
        build over the cap (the examined fingerprint and the derivation of a target both need them)."""
        from pipeline.multiid.rules import examined_candidates

        got = self._subsets.get((u, iid))  # (only a person over the cap has one: looked up before listing them all)
        if got is not None:
            return got
        everyone = [c for c in self.faces_of[iid] if c.uid != u]
        if len(everyone) <= self.cap:
            return everyone
        got = self._subsets[(u, iid)] = examined_candidates(u, everyone, self.cap)
        return got

    def n_everyone(self, u: str, iid: str) -> int:
        """How many faces of person ``iid`` lie outside photo ``u`` (its candidates before the cap), counted."""
        return len(self.faces_of[iid]) - sum(f.identity_id == iid for f in self.by_uid.get(u, []))

    def over_cap_people(self, u: str) -> bool:
        """Whether one of ``u``'s people has more candidates than the cap (choosing its subset hashes them all)."""
        return any(self.n_everyone(u, iid) > self.cap for iid in self.people(u))

    def seed_examined(self, u: str, old_refs: Iterable[tuple[int, str, int]], prev: PreviousTargets) -> int:
        """Choose target ``u``'s examined subsets of its people over the cap from its previous candidate rows
        (target face index, ref uid, ref face index), one per examined candidate: the new subset is the ``cap`` lowest
        hashes among the previous subset's faces still there and the faces of the photos new or changed since,
        so only those are hashed, not every face of the person (a person with thousands of faces has as many
        targets, each hashing them all: 24M hashes in a 1% refresh at 100k faces). A face outside the previous
        subset whose photo is unchanged hashed above its last member then and still does. When a member has gone
        and the person had more faces than the cap, the face to take its place is unknown: that subset is left
        to :meth:`examined_of` (all hashed). Returns how many subsets were seeded."""
        from pipeline.multiid.rules import examined_candidates

        refs_of: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for fi, ref_uid, ref_fi in old_refs:
            refs_of[fi].append((ref_uid, ref_fi))
        seeded = 0
        for f in self.by_uid.get(u, []):
            iid = f.identity_id
            if iid is None or not self.usable(f) or (u, iid) in self._subsets or self.n_everyone(u, iid) <= self.cap:
                continue
            was = refs_of.get(f.face_index)
            if not was:
                continue
            by_ref = self.face_by_ref(iid)
            pool = {r: c for r in was if (c := by_ref.get(r)) is not None}
            if len(pool) < len(was) and len(was) >= self.cap:
                continue
            for c in self._changed_faces(iid, prev):
                if c.uid != u:
                    pool.setdefault(c.ref, c)
            # in (uid, face index) order, as the selection lists them (refs sort so)
            self._subsets[(u, iid)] = examined_candidates(u, [pool[r] for r in sorted(pool)], self.cap)
            seeded += 1
        return seeded

    def _changed_faces(self, iid: str, prev: PreviousTargets) -> list:
        """Person ``iid``'s faces in photos new or changed since the previous version (listed once per person:
        each of their targets needs them)."""
        got = self._changed.get(iid)
        if got is None:
            got = self._changed[iid] = [c for c in self.faces_of[iid] if not self.unchanged(c.uid, prev)]
        return got

    def changed_photos(self, iid: str, prev: PreviousTargets) -> set[str]:
        """The photos of person ``iid``'s faces that are new or changed since the previous version."""
        got = self._changed_photos.get(iid)
        if got is None:
            got = self._changed_photos[iid] = {c.uid for c in self._changed_faces(iid, prev)}
        return got

    def subsets_of(self, uids) -> dict[tuple[str, str], frozenset]:
        """The examined subsets chosen so far for targets ``uids`` ((target, person) -> the faces' refs), for a
        selection job: it then hashes none of them again."""
        want = set(uids)
        return {k: frozenset(c.ref for c in v) for k, v in self._subsets.items() if k[0] in want}

    def chosen_subsets(self, uids) -> dict[tuple[str, str], list[tuple[str, int]]]:
        """The examined subsets chosen so far for targets ``uids``, in their order, as refs: what another process
        that chose them sends back (:meth:`adopt_subsets`)."""
        want = set(uids)
        return {k: [c.ref for c in v] for k, v in self._subsets.items() if k[0] in want}

    def adopt_subsets(self, chosen: dict[tuple[str, str], list[tuple[str, int]]]) -> None:
        """Take the subsets another process chose (:meth:`chosen_subsets`)."""
        for (u, iid), refs in chosen.items():
            face_of = self.face_by_ref(iid)
            self._subsets[(u, iid)] = [face_of[r] for r in refs]

    def whole(self, u: str) -> tuple[bytes, bytes, str, bytes]:
        """(fingerprint, photo digest, splits, people digest)."""
        people = self.people(u)
        h = hashlib.sha256(json.dumps(people).encode())
        for iid in people:
            d = self._ident.get(iid)
            if d is None:
                hi = hashlib.sha256(iid.encode())
                for p in dict.fromkeys(f.uid for f in self.faces_of[iid]):
                    hi.update(self._photo(p))
                d = self._ident[iid] = hi.digest()
            h.update(d)
        people_d = h.digest()[:16]
        own = self.digests.get(u, b"-")
        fp = hashlib.sha256(self.common + own + self.splits[u].encode() + b"\x1f" + people_d).digest()[:16]
        return fp, own, self.splits[u], people_d

    def examined(self, u: str) -> bytes:
        """The examined fingerprint, choosing the examined candidates as the selection does (a hash per
        candidate of a person over the cap: run only for targets whose whole fingerprint changed)."""
        return self._examined(u, {iid: [(c.uid, c.face_index) for c in self.examined_of(u, iid)] for iid in self.people(u)})

    def examined_from_rows(self, u: str, rows: list[tuple[str, str, int]]) -> bytes:
        """The examined fingerprint of a target just selected, from its candidate rows (identity, ref uid,
        ref face index; one per examined candidate, in examined order): no second choice of the subset. The
        caller gives a target dropped before its candidates none: it is selected again
        whenever its whole fingerprint changes (it is dropped early then, cheaply)."""
        per: dict[str, list] = defaultdict(list)
        for iid, r, fi in rows:
            per[iid].append((r, fi))
        return self._examined(u, {iid: per.get(iid, []) for iid in self.people(u)})

    def early(self, u: str) -> bytes:
        """The examined fingerprint of a target dropped before its candidates: its outcome (no face, too
        many, unlabelled, in both splits, unreadable...) depends only on its own rows, bytes and splits."""
        own = self.digests.get(u, b"-")
        return hashlib.sha256(self.common + b"early" + own + self.splits[u].encode()).digest()[:16]

    def _examined(self, u: str, per_person: dict[str, list[tuple[str, int]]]) -> bytes:
        h = hashlib.sha256(json.dumps(sorted(per_person)).encode())
        for iid in sorted(per_person):
            h.update(b"".join([self._face_part(r, fi) for r, fi in per_person[iid]]))
        own = self.digests.get(u, b"-")
        return hashlib.sha256(self.common + b"examined" + own + self.splits[u].encode() + b"\x1f" + h.digest()).digest()[:16]

    def _face_part(self, p: str, fi: int) -> bytes:
        """What the examined fingerprint takes of a candidate face (once per face: met by each of its targets)."""
        got = self._face_parts.get((p, fi))
        if got is None:
            got = self._face_parts[(p, fi)] = f"{fi}\x1f".encode() + self._photo(p)
        return got

    def face_by_ref(self, iid: str) -> dict:
        """(uid, face index) -> face, of person ``iid`` (once per person: each derived target of theirs needs it)."""
        got = self._by_ref.get(iid)
        if got is None:
            got = self._by_ref[iid] = {c.ref: c for c in self.faces_of[iid]}
        return got

    def unchanged(self, p: str, prev: PreviousTargets) -> bool:
        """Whether photo ``p`` (its rows, bytes and faces' splits) is as in the previous version (once per photo)."""
        got = self._unchanged.get(p)
        if got is None:
            was = prev.get(p)
            got = self._unchanged[p] = (was is not None and was["photo_digest"] == self.digests.get(p, b"-")
                                        and was["splits"] == self.splits.get(p))
        return got

    def over_cap(self, u: str) -> int:
        """Candidates of ``u``'s people left unexamined over the cap (``not_examined_over_cap``)."""
        return sum(max(0, self.n_everyone(u, iid) - self.cap) for iid in self.people(u))


def patch_over_cap(counts: str, over: int) -> str:
    """A reused target's counts with its over-cap count updated (when the target reached its candidates:
    ``candidates_total`` is counted for every person then, even at 0)."""
    c = json.loads(counts)
    removed = c["candidates_removed_by"]
    if "candidates_total" not in removed:
        return counts
    removed.pop("not_examined_over_cap", None)
    if over:
        removed["not_examined_over_cap"] = over
    return target_counts(dict(sorted(removed.items())), c["duplicate_flags_independent"], c["unreadable"])


def reselect_reason(prev: dict | None, fp: tuple[bytes, bytes, str, bytes]) -> str | None:
    """Why a target is selected again (None: its previous sample and rows may be reused)."""
    if prev is None:
        return "new_photo"
    if prev["fingerprint"] == fp[0]:
        return None
    if prev["photo_digest"] != fp[1]:
        return "photo_changed"
    if prev["splits"] != fp[2]:
        return "split_changed"
    if prev["people_digest"] != fp[3]:
        return "candidates_changed"
    return "config_or_code_changed"


class TargetTally:
    """Each target's share of the selection's additive counters: the counters are emptied before each
    target (so a key a target touches is recorded, even at 0) and restored to their totals at the end.
    ``on_candidates(uid, rows)``: run on a target's candidate rows, as (identity, ref uid, ref face index,
    status), once their statuses are final (the selection streams its rows away); its result is kept in
    ``seen[uid]``."""

    def __init__(self, on_candidates: Callable[[str, list[tuple]], object] | None = None):
        self.by_target: dict[str, str] = {}  # uid -> JSON [counter, ...]: :meth:`shares`
        self.on_candidates = on_candidates
        self.seen: dict[str, object] = {}

    def shares(self, uid: str) -> list[dict]:
        """Target ``uid``'s share of each counter (keys it touched, even at 0)."""
        return json.loads(self.by_target[uid])

    def candidates(self, uid: str, rows: list[tuple]) -> None:
        """Called by the selection for each target that reached its candidates (``rows`` may be empty)."""
        if self.on_candidates is not None:
            self.seen[uid] = self.on_candidates(uid, rows)

    def each(self, uids: Iterable[str], *counters: Counter):
        totals = [Counter(c) for c in counters]
        for uid in uids:
            for c in counters:
                c.clear()
            yield uid
            # as one JSON string: a few hundred bytes a target, not a few dicts (a bucket may hold most targets)
            self.by_target[uid] = json.dumps(list(counters), separators=(",", ":"))
            for t, c in zip(totals, counters):
                t.update(c)
        for t, c in zip(totals, counters):
            c.clear()
            c.update(t)


def target_counts(removed: dict, flags: dict, unreadable: dict) -> str:
    return json.dumps({"candidates_removed_by": removed, "duplicate_flags_independent": flags, "unreadable": unreadable},
                      sort_keys=True, separators=(",", ":"))


class PreviousTargets:
    """The previous version's targets.parquet, indexed by uid, and its shards' records (for the sha256
    check before any of their members is copied)."""

    def __init__(self, folder: Path | None, bucket_records: dict):
        from pipeline.storage import read_parquet

        self.folder = Path(folder) if folder is not None else None
        self.table: pa.Table | None = None
        self.row: dict[str, int] = {}
        self.shard_records: dict[str, dict] = {}
        self._intact: dict[str, list[str]] = {}
        # shards checked on a thread of this process (check_beside), taken for intact until settled: plain
        # dicts under the GIL, no lock (a process forked meanwhile reads its copy, and never waits for the thread)
        self._beside: dict[str, None] = {}  # (ordered, for membership)
        self._beside_done: dict[str, list[str]] = {}
        self._checker: threading.Thread | None = None
        self._checker_error: BaseException | None = None
        self.assumed: set[str] = set()  # shards taken for intact while their check was not done
        if self.folder is None or not bucket_records or not (self.folder / TARGETS_FILE).is_file():
            return
        try:
            t = read_parquet(self.folder / TARGETS_FILE)
            self.table = t.select(TARGETS_SCHEMA.names).cast(TARGETS_SCHEMA)
        except (OSError, ValueError, KeyError, pa.ArrowInvalid):
            self.table = None
            return
        self.row = {u: i for i, u in enumerate(self.table.column("target_uid").to_pylist())}
        self._fp = self.table.column("fingerprint").to_pylist()
        self._parts = list(zip(*(self.table.column(c).to_pylist() for c in ("photo_digest", "splits", "people_digest", "examined"))))
        self.shard = dict(zip(self.table.column("target_uid").to_pylist(), self.table.column("shard").to_pylist()))
        for rec in bucket_records.values():
            for split, shards in rec.get("shards", {}).items():
                for sh in shards:
                    self.shard_records[f"{split}/{sh['name']}"] = sh

    def __getstate__(self):
        # a copy elsewhere checks for itself what is not checked yet
        return {**self.__dict__, "_beside": {}, "_beside_done": dict(self._beside_done), "_checker": None, "_checker_error": None}

    def __bool__(self) -> bool:
        return self.table is not None

    def get(self, uid: str) -> dict | None:
        i = self.row.get(uid)
        if i is None:
            return None
        pd, sp, pe, ex = self._parts[i]
        return {"fingerprint": self._fp[i], "photo_digest": pd, "splits": sp, "people_digest": pe, "examined": ex}

    def take(self, uids: list[str]) -> pa.Table:
        return self.table.take(pa.array([self.row[u] for u in uids], pa.int64()))

    def shard_checks(self) -> dict[str, list[str]]:
        """The previous shards checked so far and their problems (what another process sends back)."""
        return dict(self._intact)

    def adopt_shard_checks(self, checks: dict[str, list[str]], assumed: Iterable[str] = ()) -> None:
        """What another process checked (and took for intact, :meth:`shard_problems`) here too."""
        self._intact.update(checks)
        self.assumed.update(assumed)

    def shard_problems(self, shard: str) -> list[str]:
        """Problems of one previous shard ("<split>/<tar>"): missing from the records, or not matching them.
        A shard still being checked beside (:meth:`check_beside`) is taken for intact: :meth:`settle` says
        afterwards whether that held."""
        if shard not in self._intact:
            if shard in self._beside_done:
                self._intact[shard] = self._beside_done[shard]
            elif shard in self._beside:
                self.assumed.add(shard)
                return []
            else:
                self._intact[shard] = self._problems(shard)
        return self._intact[shard]

    def check_beside(self, shards: Iterable[str | None]) -> None:
        """Start checking these previous shards on a thread of this process, while the build goes on (the
        sha256 of ~7 GB at 100k faces, on the critical path before the selection when checked first). Until
        :meth:`settle`, a shard not checked yet is taken for intact, in this process and in the processes it
        forks (they never wait for this thread, which they do not have)."""
        if self._checker is not None:
            raise RuntimeError("previous shards are being checked already: settle() first")
        todo = [sh for sh in dict.fromkeys(shards) if sh is not None and sh not in self._intact]
        if not todo:
            return
        self._beside, self._beside_done, self._checker_error = dict.fromkeys(todo), {}, None

        def check() -> None:
            try:
                for sh in todo:
                    self._beside_done[sh] = self._problems(sh)
            except Exception as e:  # noqa: BLE001 (raised again by settle(), in the builder's thread)
                self._checker_error = e

        self._checker = threading.Thread(target=check, name="previous-shard-check", daemon=True)
        self._checker.start()

    def settle(self, raise_error: bool = True) -> list[str]:
        """Wait for the check started by :meth:`check_beside`; the shards it found damaged that were taken for
        intact meanwhile (a build that did so is wrong: it is made again, knowing them; one that asked after
        the verdict saw it). The check's own error (a disk that cannot be read) is raised here, unless
        ``raise_error`` is false (the build failed already)."""
        if self._checker is None:
            return []
        self._checker.join()
        self._checker = None
        beside, self._beside = self._beside, {}
        if self._checker_error is not None:
            if raise_error:
                raise self._checker_error
            return []
        self._intact.update(self._beside_done)
        return sorted(sh for sh in beside if self._intact[sh] and sh in self.assumed)

    def _problems(self, shard: str) -> list[str]:
        from pipeline.shards import shards_intact

        rec = self.shard_records.get(shard)
        if rec is None:
            return [f"{shard} not in the previous version's records"]
        split = shard.split("/", 1)[0]
        return [f"{split}/{p}" for p in shards_intact(self.folder / split, [rec])]


def reused_records(path: Path, keys: set[str]):
    """The samples ``keys`` of one previous tar, every member's bytes as written (in the tar's order, which is
    key order): records that :func:`pipeline.shards.write_shards` writes back to the same bytes."""
    from pipeline.shards import iter_shard

    for rec in iter_shard(path, exts=None, keys=keys):
        rec.pop("__shard__")
        yield rec


# the statuses of the candidates the walk reached (a reference chosen, or judged against the chosen ones)
WALKED = ("selected", "redundant", "near_duplicate_face_ncc", "near_duplicate_keypoints")


class _CandidateBatch:
    """A batch of the previous version's candidate rows (a table in target order) with the columns the
    derivation reads as Python lists, converted once per batch: a dict per row of every column, and the rows kept
    rebuilt from those dicts, were two fifths of a 1% refresh's derivation at 100k faces (~3.5M previous rows read
    for 24k targets)."""

    __slots__ = ("face", "face_hamming", "identity", "image_hamming", "ref_face", "ref_uid", "scored", "similarity", "status",
                 "table")

    def __init__(self, table: pa.Table):
        self.table = table
        self.face, self.identity, self.ref_uid, self.ref_face, self.status, self.image_hamming, self.face_hamming, self.similarity = (
            table.column(c).to_pylist() for c in ("target_face_index", "identity_id", "ref_uid", "ref_face_index", "status",
                                                   "image_hamming", "face_hamming", "similarity"))
        self.scored = table.column("score").is_valid().to_pylist()


class PreviousCandidates:
    """One target's previous candidate rows: rows ``start``..``stop`` of ``batch`` (in their order). A derived
    target's rows that stay are taken from the batch's table by index (:func:`derive_added_candidates`)."""

    __slots__ = ("batch", "start", "stop")

    def __init__(self, batch: _CandidateBatch | None, start: int, stop: int):
        self.batch, self.start, self.stop = batch, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def indices(self) -> range:
        return range(self.start, self.stop)

    def refs(self):
        """(target face index, ref uid, ref face index) of each row."""
        b = self.batch
        return ((b.face[i], b.ref_uid[i], b.ref_face[i]) for i in self.indices())


NO_PREVIOUS_CANDIDATES = PreviousCandidates(None, 0, 0)


class PreviousRows:
    """The previous candidate rows of the targets a refresh selects again although only their people's
    candidates changed (the derivation could not keep their choice: a new candidate ranks above the last
    reference chosen...), in Arrow files the derivation wrote (uncompressed, read memory-mapped: forked
    workers share the pages). ``index``: target -> (file number, first row, end row); ``changed``: the
    photos new or changed since that version.

    Screening a candidate (selection.screen_candidate: its filters, pHashes, similarity and score) depends
    only on the two photos' rows, bytes and faces' splits and on the settings, which a target selected for
    this reason keeps: so a candidate whose photo is unchanged gets its previous row's screening, and the
    row itself when the walk leaves it as it was (before, a 1% refresh at 100k faces screened every candidate
    of those targets again, a dict each, and rebuilt their rows from the dicts)."""

    def __init__(self, paths: list[Path], index: dict[str, tuple[int, int, int]], changed: frozenset[str]):
        self.paths, self.index, self.changed = [Path(p) for p in paths], index, changed
        self._tables: list[pa.Table] | None = None

    def __getstate__(self):  # a Ray task on another node shares no disk: the rows travel with it
        return {"paths": [], "index": self.index, "changed": self.changed, "_tables": self._opened()}

    def _opened(self) -> list[pa.Table]:
        if self._tables is None:
            self._tables = [pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in self.paths]
        return self._tables

    def of(self, uid: str) -> PreviousCandidates | None:
        """Target ``uid``'s previous rows (indices local to their batch), or None."""
        at = self.index.get(uid)
        if at is None:
            return None
        k, start, stop = at
        t = self._opened()[k].slice(start, stop - start)
        return PreviousCandidates(_CandidateBatch(t), 0, t.num_rows)


class PreviousRowsWriter:
    """Writes the previous rows of the targets to select again (:class:`PreviousRows`) to ``path``, a few
    targets' rows at a time; :meth:`close` gives (path, index) or None when no row was written."""

    BATCH = 65_536

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self.index: dict[str, tuple[int, int]] = {}
        self.pending: list[pa.Table] = []
        self.n_pending = self.n = 0
        self._writer = None

    def add(self, uid: str, rows: PreviousCandidates) -> None:
        if not len(rows):
            return
        self.index[uid] = (self.n, self.n + len(rows))
        self.n += len(rows)
        self.pending.append(rows.batch.table.slice(rows.start, len(rows)))
        self.n_pending += len(rows)
        if self.n_pending >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self._writer is None:
            self._writer = pa.ipc.new_file(str(self.path), self.schema)
        self._writer.write_table(pa.concat_tables(self.pending).combine_chunks())
        self.pending, self.n_pending = [], 0

    def close(self) -> tuple[Path, dict[str, tuple[int, int]]] | None:
        self._flush()
        if self._writer is None:
            return None
        self._writer.close()
        return self.path, self.index


def previous_candidates_by_target(tables: Iterable[pa.Table]):
    """(target uid, :class:`PreviousCandidates`) from tables of candidate rows in target order (a target's rows
    contiguous, targets ascending; a target's rows may run on into the next table)."""
    def in_order(u: str, last: str | None) -> str:
        if last is not None and u <= last:
            raise RuntimeError(f"rows of target {u!r} after those of {last!r}: not in target order")
        return u

    carry, last = None, None
    for t in tables:
        if carry is not None:
            t = pa.concat_tables([carry, t])
        if not t.num_rows:
            continue
        uids = t.column("target_uid").to_pylist()
        batch = _CandidateBatch(t)
        start = 0
        for i in range(1, len(uids)):
            if uids[i] != uids[start]:
                last = in_order(uids[start], last)
                yield last, PreviousCandidates(batch, start, i)
                start = i
        carry = t.slice(start)  # the last target's rows may go on in the next table
    if carry is not None and carry.num_rows:
        last = in_order(carry.column("target_uid")[0].as_py(), last)
        yield last, PreviousCandidates(_CandidateBatch(carry), 0, carry.num_rows)


def derive_added_candidates(u: str, old_cands: PreviousCandidates, old_pairs: list[dict], counts: str, tf: TargetFingerprints,
                            prev: PreviousTargets, by_uid: dict, ctx: dict) -> dict | str:
    """Target ``u``'s rows in this version from its previous rows, when its people only gained candidates that
    the selection never examines: each new one stops at a filter before the walk (ref_quality, pHash, the
    similarity bounds...) or ranks below the last reference chosen of a person who has ``refs_per_person``
    (``not_examined_enough_chosen``); a candidate gone (deleted, or pushed out of the examined subset over the cap
    by a new one) was never reached by the walk either. The choice is then the previous one; only the counts of
    candidates and survivors change. A string when the target must be selected again: a candidate reached by
    the walk gone, a candidate's photo changed, a new candidate that would be examined or whose
    photo cannot be read: then why, as a word. ``ctx``: the bucket's ``prepared`` (selection._prepare), ``fingerprints``
    (selection._new_fingerprints), ``img_meta``, ``split_of``, ``cfg``.

    Returns {"candidates": rows, "pairs": rows, "counts": the target's counts, "faces": {face index: (new
    candidates, new survivors)}}: what selecting it again would give (byte-identical versions: tests). A candidate
    row is either a previous one, as its index in ``old_cands.batch.table``, or a new one (a dict)."""
    from pipeline.multiid import selection as sel

    cfg, fps, prep = ctx["cfg"], ctx["fingerprints"], ctx["prepared"]
    if not old_cands or cfg.examine_all_candidates:
        return "no_candidate_rows"
    fs = by_uid.get(u, [])
    usable = [f for f in fs if sel.unusable_reason(f, cfg.min_face_px, cfg.det_score_min, cfg.blur_min) is None]
    splits = {ctx["split_of"](f.identity_id) for f in fs if f.identity_id is not None}
    b = old_cands.batch
    status, scored, ref_uid, ref_face = b.status, b.scored, b.ref_uid, b.ref_face
    by_face: dict[int, list[int]] = defaultdict(list)
    for i in old_cands.indices():
        by_face[b.face[i]].append(i)
    if len(splits) != 1 or set(by_face) - {f.face_index for f in usable}:
        return "own_faces_changed"
    (split,) = splits
    rows: list[int | dict] = []
    added_by: dict[int, tuple[int, int]] = {}
    removed: Counter = Counter()
    target_fp = None
    over_cap = 0
    for f in usable:
        over_cap += max(0, tf.n_everyone(u, f.identity_id) - cfg.max_candidates_per_person)
        # over the cap a new face may enter the examined subset and push another out of it
        cands = tf.examined_of(u, f.identity_id)
        old = {(ref_uid[i], ref_face[i]): i for i in by_face.get(f.face_index, [])}
        now = {c.ref for c in cands}
        gone = [ref for ref in old if ref not in now]
        if len(old) != len(by_face.get(f.face_index, [])) or [c.ref for c in cands if c.ref in old] != [r for r in old if r in now]:
            return "candidates_out_of_order"
        n_gone = n_survivors = 0
        for ref in gone:  # a candidate gone (deleted, or pushed over the cap) that the walk never reached
            i = old.pop(ref)
            if status[i] in WALKED or status[i] == "unreadable_reference":  # (its error is in the counts)
                return "walked_candidate_gone"
            removed[status[i]] -= 1
            n_gone += 1
            n_survivors -= scored[i]  # not examined, counted as a survivor
        # its old candidates' photos as they were (those left are this person's faces now: a photo of theirs that
        # changed is among the person's changed faces, listed once per person)
        changed = tf.changed_photos(f.identity_id, prev)
        if changed and not changed.isdisjoint(ref[0] for ref in old):
            return "candidate_photo_changed"
        face_of = tf.face_by_ref(f.identity_id)  # the old refs left are this person's faces (a gone one returned above)
        chosen = [face_of[ref] for ref, i in old.items() if status[i] == "selected"]
        last = max((sel.rank_key(sel.candidate_score(cfg, min(1.0, float(f.emb @ c.emb)), sel.pose_diff(f, c)[0],
                                                     prep["quality"][c.ref]), c) for c in chosen), default=None)
        n_new = 0
        for c in cands:
            if c.ref in old:
                rows.append(old[c.ref])
                continue
            if target_fp is None:
                target_fp = fps.get(u)
                if target_fp is None:
                    return "target_unreadable"
            row, _ = sel.screen_candidate(u, f, c, split, target_fp[0], target_fp[1], fps, prep, ctx["img_meta"], by_uid, cfg,
                                          ctx["split_of"])
            if row["status"] == "unreadable_reference":
                return "new_candidate_unreadable"
            if row["score"] is not None:  # a survivor: not examined only below the last of enough references
                if len(chosen) < cfg.refs_per_person:
                    return "new_survivor_walked_fewer_than_refs"
                if sel.rank_key(row["score"], c) < last:
                    return "new_survivor_ranks_above_last_chosen"
                row["status"] = "not_examined_enough_chosen"
                n_survivors += 1
            n_new += 1
            removed[row["status"]] += 1
            rows.append(row)
        if n_new or n_gone:
            added_by[f.face_index] = (n_new - n_gone, n_survivors)
    if not added_by:
        return "no_candidate_changed"
    pairs = []
    for r in old_pairs:
        n_new, n_survivors = added_by.get(r["target_face_index"], (0, 0))
        pairs.append({**r, "n_candidates": r["n_candidates"] + n_new, "n_survivors": r["n_survivors"] + n_survivors})
    c = json.loads(counts)
    total = Counter(c["candidates_removed_by"])
    total.update(removed)  # update, not +=: a key counted 0 stays (as the selection's counter keeps it)
    for status, n in removed.items():
        if n < 0 and total[status] == 0:  # the selection counts a status only when a row has it
            del total[status]
    total["candidates_total"] += sum(n for n, _ in added_by.values())
    total.pop("not_examined_over_cap", None)
    if over_cap:
        total["not_examined_over_cap"] = over_cap
    return {"candidates": rows, "pairs": pairs, "faces": added_by,
            "counts": target_counts(dict(sorted(total.items())), c["duplicate_flags_independent"], c["unreadable"])}


def patched_records(records, faces_of_key: dict[str, dict[int, tuple[int, int]]]):
    """Records of a previous tar with, for the samples of derived targets (``faces_of_key``: key -> {face index:
    (new candidates, new survivors)}), the JSON's counts of candidates and survivors raised."""
    for rec in records:
        added = faces_of_key.get(rec["__key__"])
        if added:
            rec["json"] = _patched_json(rec["json"], added)
        yield rec


_COUNT_FIELDS = re.compile(rb'"(n_candidates|n_survivors)":(-?[0-9]+)')


def _patched_json(data: bytes, added: dict[int, tuple[int, int]]):
    """A previous sample's JSON with its faces' counts raised: the digits rewritten in place. The previous
    tar passed its sha256, so its JSON is this builder's (compact, sorted keys: pipeline.shards.encode_member), where
    these two fields belong to the faces alone, in their order: re-encoding the whole sample gave the same
    bytes at four times the cost (5 of a 1% refresh's CPU-s at 100k faces). When the fields found are not
    exactly the faces' (another writer), the sample is re-encoded."""
    s = json.loads(data)
    faces = s["faces"]
    now = []
    for fj in faces:
        n_new, n_survivors = added.get(fj["face_index"], (0, 0))
        now += [fj["n_candidates"] + n_new, fj["n_survivors"] + n_survivors]
    was = [x for fj in faces for x in ((b"n_candidates", fj["n_candidates"]), (b"n_survivors", fj["n_survivors"]))]
    if [(name, int(v)) for name, v in _COUNT_FIELDS.findall(data)] == was:
        it = iter(now)
        return _COUNT_FIELDS.sub(lambda m: b'"%s":%d' % (m.group(1), next(it)), data)
    for fj, c, sv in zip(faces, now[0::2], now[1::2]):
        fj["n_candidates"], fj["n_survivors"] = c, sv
    return s  # written as a fresh build writes it (pipeline.shards.encode_member)
