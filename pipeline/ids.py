"""Stable identifiers."""

from __future__ import annotations

import hashlib

UID_HEX_CHARS = 32  # 128 bits of sha256: collisions are out of reach, keys stay short


def content_uid(data: bytes) -> str:
    """The uid of an image is the hash of its bytes: re-ingesting the same bytes gives the same uid."""
    return hashlib.sha256(data).hexdigest()[:UID_HEX_CHARS]


def stable_key(*parts: object) -> str:
    """A dot-free, deterministic key built from several parts (used for sample and pair ids)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode())
    return h.hexdigest()[:UID_HEX_CHARS]
