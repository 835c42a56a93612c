"""The multi-identity paired dataset (MultiID-2M style) built on the identities."""

import dagster as dg

from assets.common import COLLECTION_UPDATE, release_checks, release_metadata
from assets.identity import identities
from assets.ingest import images
from assets.resources import LineupSettings
from assets.ui import pictures, table_metadata, uids_in
from pipeline.catalog import refresh_catalog
from pipeline.storage import read_parquet

CHECKS = {
    "identity_disjoint_splits": "No photo and no person in both train and eval: samples re-read from the shards, "
    "faces and identities from the catalog (target photos and what each reference crop shows).",
    "shards_match_manifest": "Tars re-read from disk match manifest.json (sha256, sizes, sample counts), and their "
    "keys match the pairs table.",
}


@dg.asset(
    group_name="datasets",
    kinds={"webdataset"},
    deps=[identities, images],
    automation_condition=COLLECTION_UPDATE,
    check_specs=[dg.AssetCheckSpec(name, asset="multiid_dataset", blocking=True, description=d) for name, d in CHECKS.items()],
    description="MultiID-2M-style pairs: every person in a target photo gets references of the same identity "
    "from other photos (similarity band calibrated per face backend; copy-paste guard), train/eval disjoint by "
    "identity and by photo, WebDataset shards, manifests and a dataset card per content-addressed version.",
)
def multiid_dataset(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.collection import load_collection, load_identities
    from pipeline.datasets import release, reusable_version, sync_catalog_table
    from pipeline.multiid import MultiIDConfig, build_multiid_dataset
    from pipeline.multiid.metrics import load_samples
    from pipeline.multiid.release import empty_explanation, multiid_card, multiid_version, split_counts
    from pipeline.multiid.release import release_checks as checks_of
    from pipeline.multiid.report import contact_sheet, similarity_histograms
    from pipeline.removals import card_entries

    layout = lineup.layout
    coll = load_collection(layout)
    ids = load_identities(layout, coll.faces)
    backends = sorted(set(coll.faces.column("backend").to_pylist()))
    cfg = MultiIDConfig(backend=backends[0] if backends else lineup.face_backend)
    version, parts = multiid_version(coll.images, coll.faces, ids, cfg, card_entries(layout))
    empty_reason = coll.empty_reason or (None if ids.num_rows else "no identities assigned yet")
    sources = sorted(set(coll.images.column("partition").to_pylist()))
    context.log.info(f"multiid version {version} from {coll.images.num_rows} images, {coll.faces.num_rows} faces")

    previous = reusable_version(layout, "multiid")  # unchanged buckets' shards are hard-linked from it

    def build(folder):
        return build_multiid_dataset(coll.images, coll.faces, ids, folder, cfg, version=version, reuse_from=previous,
                                     workers=lineup.workers, guard_cache=layout.multiid_guard_cache,
                                     engine=lineup.engine_name,
                                     feature_store_bytes=int(lineup.multiid_feature_store_gb * (1 << 30)),
                                     progress=lambda line: context.log.info(f"multiid: {line}"))

    def checks(folder, res):
        pairs = res.pairs if res is not None else read_parquet(folder / "pairs.parquet")
        return checks_of(folder, coll.faces, ids, pairs)

    def card(folder, res):
        return multiid_card(version, folder, res.stats, cfg, parts, [f"input partition {s}" for s in sources],
                            lineup.identity_method, lineup.dataset_contact, empty_reason, card_entries(layout))

    rel = release(layout, "multiid", version, build, checks, card)
    pairs = read_parquet(rel.folder / "pairs.parquet")
    # the catalog shows the version LATEST names, not one that failed its checks or lost to a newer build
    sync_catalog_table(layout, "multiid", "pairs.parquet", "multiid_pairs")
    sync_catalog_table(layout, "multiid", "candidates.parquet", "multiid_candidates")
    candidates = read_parquet(rel.folder / "candidates.parquet", columns=["similarity", "status"])
    refresh_catalog(layout)
    stats = rel.result.stats if rel.result is not None else {}
    empty_reason = empty_reason or (empty_explanation(stats) if stats else None)
    # the contact sheet's 4 samples only: reading every sample back would hold the whole dataset's JSON
    samples = rel.result.samples_in(rel.folder, first=4) if rel.result is not None else load_samples(rel.folder, first=4)
    from pipeline.multiid.build import reader_from_images

    sheet = contact_sheet(samples[:4], reader_from_images(coll.images)) if samples else None
    return dg.MaterializeResult(
        metadata={
            **release_metadata(rel),
            "empty_because": empty_reason or "",
            "samples_per_split": dg.MetadataValue.json(split_counts(rel.folder)),
            "pairs": pairs.num_rows,
            "candidates_removed_by": dg.MetadataValue.json(stats.get("candidates_removed_by", {})),
            "target_drops": dg.MetadataValue.json(stats.get("targets", {})),
            "eval_fallback": dg.MetadataValue.json(stats.get("eval_fallback", [])),
            # shard reuse: buckets taken from the previous version vs selected and written again
            "buckets_reused": stats.get("buckets_reused", 0),
            "buckets_rebuilt": stats.get("buckets_rebuilt", 0),
            "bytes_reused": stats.get("bytes_reused", 0),
            # per-target reuse: targets whose sample and rows were copied vs selected again, and why
            "targets_reused": stats.get("targets_reused", 0),
            "targets_reselected": stats.get("targets_reselected", 0),
            "reselect_reasons": dg.MetadataValue.json(stats.get("reselect_reasons", {})),
            "bytes_copied": stats.get("bytes_copied", 0),
            # previous tars that failed their sha256 (their targets selected again), and selections made twice for it
            "previous_shards_damaged": dg.MetadataValue.json(stats.get("buckets_not_reused_corrupt", [])),
            "selections_voided_by_damaged_shards": stats.get("selections_voided_by_damaged_shards", 0),
            # what the copy-paste guard took from the stores kept across builds, and what it added to them
            "guard_stores": dg.MetadataValue.json({k: stats[k] for k in (
                "guard_decisions_reused", "guard_decisions_computed", "photo_hashes_reused", "photo_hashes_computed",
                "face_features_reused", "face_features_computed", "face_features_entries", "face_features_bytes")
                if k in stats}),
            "data_quality": dg.MetadataValue.json(stats.get("data_quality", {})),
            "collection": dg.MetadataValue.json(coll.coverage()),
            "lineage": dg.MetadataValue.json({k: v for k, v in parts.items() if k != "config"}),
            **pictures(layout.home, f"multiid_dataset/{rel.version}",
                       {**({"pairs_contact_sheet": sheet} if sheet else {}), **similarity_histograms(pairs, candidates)},
                       shows_uids=uids_in(pairs)),
            **table_metadata(pairs),
        },
        data_version=dg.DataVersion(version),
        check_results=release_checks(rel, CHECKS),
    )
