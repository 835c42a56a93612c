"""Identity-disjoint train/eval split.

An identity goes to eval when ``sha256(salt + identity_id)`` read as a fraction in [0, 1) is below
``eval_fraction``: deterministic, independent of the data's order and stable when identities are
added. A target goes to the split of its people; **rule**: a target whose labelled faces (all of
them, usable or not) fall in both splits is dropped and counted as ``split_straddle``. References
share their person's identity, so they land in the same split by construction;
:func:`check_identity_disjoint` proves it on the output.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.splits import hash_split


def identity_split(identity_id: str, eval_fraction: float, salt: str = "multiid-v1") -> str:
    return hash_split(identity_id, eval_fraction, salt)


def target_split(identity_ids: Iterable[str], eval_fraction: float, salt: str) -> str | None:
    """The split of a target's people, or None when they straddle both splits."""
    splits = {identity_split(i, eval_fraction, salt) for i in identity_ids}
    if len(splits) > 1:
        return None
    return splits.pop() if splits else "train"


def check_identity_disjoint(samples: Iterable[dict]) -> list[str]:
    """Problems (empty when none): an identity in eval that also appears in train, as a target person,
    another labelled face of a target, or a reference. ``samples`` are the shard JSON dicts."""
    seen: dict[str, set[str]] = {"train": set(), "eval": set()}
    problems = []
    for s in samples:
        split = s["split"]
        ids = set(s.get("other_identity_ids", []))
        for f in s["faces"]:
            ids.add(f["identity_id"])
            for r in f["refs"]:
                ids.add(r["identity_id"])
                if r["identity_id"] != f["identity_id"]:
                    problems.append(f"{s['key']}: reference {r['uid']} has identity {r['identity_id']} != {f['identity_id']}")
        seen[split] |= ids
    for i in sorted(seen["train"] & seen["eval"]):
        problems.append(f"identity {i} appears in both train and eval")
    return problems
