"""Deterministic train/eval assignment by hashing a key (an identity id, a prompt group, ...).

A key goes to eval when sha256(salt + key), read as a fraction in [0, 1), is below
``eval_fraction``: independent of data order, stable when new keys arrive, and the same on every
machine. Every dataset family splits with this one function, each with its own salt.
"""

from __future__ import annotations

import hashlib


def hash_fraction(key: str, salt: str) -> float:
    """sha256(salt, key) as a fraction in [0, 1) (64 bits)."""
    h = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def hash_split(key: str, eval_fraction: float, salt: str) -> str:
    """'eval' for a deterministic ``eval_fraction`` of keys, else 'train'."""
    return "eval" if hash_fraction(key, salt) < eval_fraction else "train"
