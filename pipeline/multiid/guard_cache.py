"""The copy-paste guard's decisions, kept across builds.

The costly part of the guard (face NCC, SIFT keypoints + RANSAC; about two thirds of a target's CPU time,
measured with cProfile in bench_multiid_refresh.py) depends only on the two faces compared and on the
guard's settings. A refresh selects again the targets whose people gained or lost a face, and those
targets meet mostly the same (target face, candidate face) pairs as last time: the decisions recorded
here are taken instead of computed again.

A decision is keyed by both faces' content (the photo's uid, which is its content hash, the face index,
box and landmarks) and by the guard's settings, so a changed photo, face model or threshold never meets
an old decision. The file lives outside the dataset versions (the versions stay byte-identical to a
fresh build); it holds the two photo uids of each decision in the clear so that a removal can drop them
(:func:`purge_guard_decisions`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.multiid import dedup

GUARD_VERSION = 1  # bump when dedup.compare's results change for the same inputs
SCHEMA = pa.schema([
    ("k0", pa.uint64()), ("k1", pa.uint64()),
    ("a_uid", pa.string()), ("b_uid", pa.string()),
    ("image_hamming", pa.int32()), ("face_hamming", pa.int32()), ("face_ncc", pa.float64()),
    ("is_duplicate", pa.bool_()), ("reason", pa.string()),
    ("kp_inliers", pa.int32()), ("kp_ratio", pa.float64()), ("kp_duplicate", pa.bool_()),
])


def face_key(f) -> str:
    """A face's content: its photo (uid = content hash), index, box and landmarks."""
    box = ",".join(f"{float(v):.2f}" for v in f.bbox)
    lm = ",".join(f"{float(v):.2f}" for v in np.asarray(f.landmarks, dtype=np.float64).ravel())
    return f"{f.uid}:{f.face_index}:{box}:{lm}"


class GuardDecisions:
    """Decisions read from ``path`` (if any), looked up by (face a, face b); new ones collected for :meth:`save`."""

    def __init__(self, path: Path | None, settings: dict):
        self.path = Path(path) if path is not None else None
        self.salt = hashlib.sha256(json.dumps({"v": GUARD_VERSION, **settings}, sort_keys=True).encode()).digest()[:16]
        self.keys = np.zeros(0, dtype=[("k0", "<u8"), ("k1", "<u8")])
        self.table: pa.Table | None = None
        self.new: list[dict] = []
        self._new_at: dict[tuple[int, int], int] = {}  # key -> its row in ``new`` (a pair met twice in one build)
        self.hits = 0
        if self.path is not None and self.path.exists():
            from pipeline.storage import read_parquet

            t = read_parquet(self.path)
            order = np.lexsort((t.column("k1").to_numpy(), t.column("k0").to_numpy()))
            t = t.take(pa.array(order))
            self.table = t
            self.keys = np.empty(t.num_rows, dtype=self.keys.dtype)
            self.keys["k0"], self.keys["k1"] = t.column("k0").to_numpy(), t.column("k1").to_numpy()
            self._cols = {c: t.column(c).to_pylist() for c in SCHEMA.names[4:]}

    def __len__(self) -> int:
        return len(self.keys)

    def _key(self, a, b) -> tuple[int, int]:
        h = hashlib.blake2b(self.salt + face_key(a).encode() + b"|" + face_key(b).encode(), digest_size=16).digest()
        return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")

    def compare(self, a, b, compute) -> dedup.DupCheck:
        """The decision for faces ``a`` (target side) and ``b``: the recorded one, else ``compute()``'s, recorded."""
        k = self._key(a, b)
        at = self._new_at.get(k)
        if at is not None:
            self.hits += 1
            r = self.new[at]
            return dedup.DupCheck(r["image_hamming"], r["face_hamming"], r["face_ncc"], r["is_duplicate"], r["reason"],
                                  r["kp_inliers"], r["kp_ratio"], r["kp_duplicate"])
        if len(self.keys):
            probe = np.array([k], dtype=self.keys.dtype)
            i = int(np.searchsorted(self.keys, probe[0]))
            if i < len(self.keys) and self.keys[i] == probe[0]:
                self.hits += 1
                c = self._cols
                return dedup.DupCheck(c["image_hamming"][i], c["face_hamming"][i], c["face_ncc"][i], c["is_duplicate"][i],
                                      c["reason"][i], c["kp_inliers"][i], c["kp_ratio"][i], c["kp_duplicate"][i])
        chk = compute()
        self._new_at[k] = len(self.new)
        self.new.append({"k0": k[0], "k1": k[1], "a_uid": a.uid, "b_uid": b.uid, "image_hamming": chk.image_hamming,
                         "face_hamming": chk.face_hamming, "face_ncc": chk.face_ncc, "is_duplicate": chk.is_duplicate,
                         "reason": chk.reason, "kp_inliers": chk.kp_inliers, "kp_ratio": chk.kp_ratio,
                         "kp_duplicate": chk.kp_duplicate})
        return chk

    def save(self, more: list[dict] = ()) -> int:
        """Write the recorded decisions plus the new ones (this process's and ``more``, from workers) to the
        file, atomically; returns how many distinct decisions were added (two workers may judge one pair)."""
        from pipeline.storage import write_parquet_atomic

        rows = self.new + list(more)
        if self.path is None or not rows:
            return 0
        new = pa.Table.from_pylist(rows, schema=SCHEMA)
        t = new if self.table is None else pa.concat_tables([self.table.select(SCHEMA.names).cast(SCHEMA), new])
        # one row per key (two workers may judge the same pair): the first wins, all are equal
        _, first = np.unique(np.stack([t.column("k0").to_numpy(), t.column("k1").to_numpy()], 1), axis=0, return_index=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(t.take(pa.array(np.sort(first))), self.path)
        return len(first) - (self.table.num_rows if self.table is not None else 0)


def purge_guard_decisions(path: Path, uids) -> int:
    """Drop every decision that involves a photo in ``uids`` (a removal); returns how many were dropped."""
    import pyarrow.compute as pc

    from pipeline.storage import read_parquet, write_parquet_atomic

    path = Path(path)
    if not path.exists():
        return 0
    t = read_parquet(path)
    gone = pa.array(sorted({str(u) for u in uids}), pa.string())
    hit = pc.or_(pc.is_in(t.column("a_uid"), gone), pc.is_in(t.column("b_uid"), gone))
    n = int(pc.sum(hit).as_py() or 0)
    if n:
        write_parquet_atomic(t.filter(pc.invert(hit)), path)
    return n
