"""Train/eval splits that are disjoint by identity and by photo, and the check that proves it.

An identity goes to eval when ``sha256(salt + identity_id)`` read as a fraction in [0, 1) is below
``eval_fraction`` (pipeline/splits.py): deterministic, independent of the data's order and stable
when identities are added. A target goes to the split of its people; a target whose labelled faces
(all of them, usable or not) fall in both splits is dropped (``split_straddle``). A photo feeds one
split only: references come from photos of their split, and a reference crop from a photo that also
shows someone of the other split must not show that face (build.py).

:func:`split_leaks` checks the written dataset independently of the builder: it reads the samples
back from the shards and the faces and identities from the catalog tables, and lists every photo
and every identity that reaches both splits, through a target photo (all its faces) or through
the region a reference crop shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from pipeline.splits import hash_split


def identity_split(identity_id: str, eval_fraction: float, salt: str = "multiid-v1") -> str:
    return hash_split(identity_id, eval_fraction, salt)


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


def split_leaks(dataset_dir: Path, faces: pa.Table, identities: pa.Table, splits: tuple[str, ...] = ("train", "eval")) -> list[str]:
    """Problems (empty when none) in a written multi-identity dataset: a photo used in two splits, or an
    identity visible in two splits. Samples come from the shards under ``dataset_dir/<split>/``; who is
    in a photo, and where, comes from the ``faces`` and ``identities`` tables, not from the samples."""
    from pipeline.multiid.rules import boxes_overlap
    from pipeline.shards import iter_samples

    ident = {(u, int(f)): i for u, f, i in zip(*(identities.column(c).to_pylist() for c in ("uid", "face_index", "identity_id")))}
    faces_of: dict[str, list[tuple[tuple, str | None]]] = {}
    for u, f, x1, y1, x2, y2 in zip(*(faces.column(c).to_pylist() for c in ("uid", "face_index", "x1", "y1", "x2", "y2"))):
        faces_of.setdefault(u, []).append(((x1, y1, x2, y2), ident.get((u, int(f)))))
    photos: dict[str, dict[str, str]] = {s: {} for s in splits}  # split -> uid -> where it was first used
    people: dict[str, dict[str, str]] = {s: {} for s in splits}
    problems = []
    for split in splits:
        folder = Path(dataset_dir) / split
        if not folder.exists():
            continue
        for rec in iter_samples(folder, ("json",)):
            s = json.loads(rec["json"])
            key = rec["__key__"]
            if s.get("split") != split:
                problems.append(f"{key}: stored under {split}/ but says split {s.get('split')!r}")
            t = s["target"]["uid"]
            photos[split].setdefault(t, f"target of {key}")
            for _box, i in faces_of.get(t, []):
                if i is not None:
                    people[split].setdefault(i, f"in target photo {t} of {key}")
            for fj in s["faces"]:
                for r in fj["refs"]:
                    photos[split].setdefault(r["uid"], f"reference of {key}")
                    region = r.get("crop_box") if r.get("kind") == "face_crop" else None
                    for box, i in faces_of.get(r["uid"], []):
                        if i is not None and (region is None or boxes_overlap(box, region)):
                            people[split].setdefault(i, f"visible in reference {r['uid']} of {key}")
    for a_i, a in enumerate(splits):
        for b in splits[a_i + 1:]:
            for uid in sorted(set(photos[a]) & set(photos[b])):
                problems.append(f"photo {uid} in {a} ({photos[a][uid]}) and in {b} ({photos[b][uid]})")
            for i in sorted(set(people[a]) & set(people[b])):
                problems.append(f"identity {i} in {a} ({people[a][i]}) and in {b} ({people[b][i]})")
    return problems
