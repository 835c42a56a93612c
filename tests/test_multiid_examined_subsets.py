"""A refresh chooses each target's examined candidates over the cap from the target's previous subset and the
faces of new or changed photos (reuse.TargetFingerprints.seed_examined), hashing those only: the subset must be
the one rules.examined_candidates chooses from every face of the person, whatever the change."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.multiid.reuse import TargetFingerprints
from pipeline.multiid.rules import examined_candidates
from pipeline.multiid.selection import FaceRec

CAP = 5


def _face(uid: str, fi: int, iid: str) -> FaceRec:
    return FaceRec(uid, fi, (0, 0, 10, 10), [0.0] * 10, 0.99, 100.0, 100.0, 50.0, 0.0, 0.0, 0.0, np.zeros(4, np.float32), iid)


class _Prev:
    """The previous version's per-photo digest and splits (reuse.PreviousTargets.get, duck-typed)."""

    def __init__(self, digests: dict[str, bytes], splits: dict[str, str]):
        self.rows = {u: {"photo_digest": d, "splits": splits[u]} for u, d in digests.items()}

    def get(self, u):
        return self.rows.get(u)


def _fingerprints(by_uid: dict, digests: dict) -> TargetFingerprints:
    return TargetFingerprints(sorted(by_uid), by_uid, digests, lambda i: "train", lambda f: True, b"c", CAP)


def _collection(n: int, tag: str = "") -> tuple[dict, dict]:
    """Photo "t" holds person p with n other photos of p (one of them with two faces of p)."""
    by_uid = {"t": [_face("t", 0, "p")]}
    for k in range(n):
        u = f"q{k:03d}{tag}"
        by_uid[u] = [_face(u, 0, "p")] + ([_face(u, 1, "p")] if k == 3 else [])
    return by_uid, {u: u.encode() for u in by_uid}


def _previous_rows(tf: TargetFingerprints) -> list[tuple[int, str, int]]:
    """The previous candidate rows' (target face index, ref uid, ref face index)."""
    return [(0, c.uid, c.face_index) for c in tf.examined_of("t", "p")]


@pytest.mark.parametrize("seed", range(12))
def test_the_seeded_subset_is_the_one_every_face_hashed_gives(seed):
    rng = random.Random(seed)
    by_uid, digests = _collection(rng.choice([3, 5, 6, 9, 14]))
    before = _fingerprints(by_uid, digests)
    rows = _previous_rows(before)
    prev = _Prev(digests, before.splits)
    members = {(ref_uid, ref_fi) for _, ref_uid, ref_fi in rows}
    now, now_digests = {u: list(fs) for u, fs in by_uid.items()}, dict(digests)
    for k in range(rng.randint(0, 6)):  # new photos of p
        u = f"n{seed}-{k}"
        now[u], now_digests[u] = [_face(u, 0, "p")], b"new"
    others = sorted(set(by_uid) - {"t"})
    for u in rng.sample(others, rng.randint(0, 2)):  # photos removed: members or not
        now.pop(u)
        now_digests.pop(u)
    for u in rng.sample(sorted(set(now) - {"t"}), min(2, len(now) - 1)):  # changed photos (their rows or faces)
        now_digests[u] = b"changed"
        if rng.random() < 0.5:
            now[u] = [_face(u, 0, "p"), _face(u, 7, "p")]
    tf = _fingerprints(now, now_digests)
    seeded = tf.seed_examined("t", rows, prev)
    everyone = [c for c in tf.faces_of["p"] if c.uid != "t"]
    assert [c.ref for c in tf.examined_of("t", "p")] == [c.ref for c in examined_candidates("t", everyone, CAP)]
    gone_member = bool(members - {f.ref for fs in now.values() for f in fs})
    if len(everyone) > CAP and not (gone_member and len(rows) >= CAP):
        assert seeded == 1
    else:  # under the cap nothing to choose; a member gone over it: left to examined_of (every face hashed)
        assert seeded == 0


def test_a_seeded_subset_hashes_only_the_previous_members_and_the_new_faces(monkeypatch):
    from pipeline.multiid import rules

    by_uid, digests = _collection(400)
    before = _fingerprints(by_uid, digests)
    rows = _previous_rows(before)
    prev = _Prev(digests, before.splits)
    by_uid["zz-new"], digests["zz-new"] = [_face("zz-new", 0, "p")], b"new"
    tf = _fingerprints(by_uid, digests)
    hashed = []
    real = rules.examined_candidates
    monkeypatch.setattr(rules, "examined_candidates", lambda u, cands, cap: hashed.append(len(cands)) or real(u, cands, cap))
    assert tf.seed_examined("t", rows, prev) == 1
    assert hashed == [CAP + 1]
    monkeypatch.undo()
    everyone = [c for c in tf.faces_of["p"] if c.uid != "t"]
    assert [c.ref for c in tf.examined_of("t", "p")] == [c.ref for c in examined_candidates("t", everyone, CAP)]
