"""The multi-identity builder's pure rules, shared by the selection (build.py), per-target reuse
(reuse.py) and the split check (splits.py): which candidates a person's target examines, and the crop
geometry. Kept apart so that none of those modules imports another's internals."""

from __future__ import annotations

import hashlib

from pipeline.ids import UID_HEX_CHARS


def crop_box(bbox, margin: float, width: int, height: int) -> list[int]:
    """The region a reference crop shows: the face box grown by ``margin`` of its size on each side,
    squared, clipped to the image (pixels of the oriented image)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return [max(0, round(cx - side / 2)), max(0, round(cy - side / 2)),
            min(int(width), round(cx + side / 2)), min(int(height), round(cy + side / 2))]


def boxes_overlap(a, b) -> bool:
    """True when two (x1, y1, x2, y2) boxes share any area."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def examined_candidates(uid: str, cands: list, cap: int) -> list:
    """The candidates of a target's person that are examined: all of them, or over ``cap`` the ``cap`` with the
    lowest hash of (target, candidate) (each target a different, reproducible subset), in (uid, face_index) order."""
    if len(cands) <= cap:
        return cands
    # stable_key("multiid-cand", uid, c.uid, c.face_index) of each, from one hash of the common prefix copied
    # per candidate (a refresh sorts every changed target's people: ~20 us a key that way, ~1 us this way)
    head = hashlib.sha256(f"multiid-cand\x1f{uid}\x1f".encode())

    def key(c) -> bytes:  # the digest's first bytes order as its hex prefix does (stable_key's)
        h = head.copy()
        h.update(f"{c.uid}\x1f{c.face_index}".encode())
        return h.digest()[:UID_HEX_CHARS // 2]

    cands = sorted(cands, key=key)
    return sorted(cands[:cap], key=lambda c: (c.uid, c.face_index))
