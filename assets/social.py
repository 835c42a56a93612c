"""Implicit social-feedback preference pairs from interaction logs (the social input location)."""

import dagster as dg

from assets.common import release_checks, release_metadata
from assets.resources import LineupSettings
from assets.ui import pictures, skipped, table_metadata, uids_in
from pipeline.catalog import refresh_catalog
from pipeline.storage import read_parquet

CHECKS = {
    "events_reconcile": "Rows of the input files (Parquet footers, csv module) = accepted + rejected, read back "
    "from the written tables; for events and for image rows.",
    "shards_match_manifest": "Every shard re-read and hashed against its manifest; WebDataset samples, Pick-a-Pic rows "
    "and the pairs table agree for each kind of pairs.",
    "no_self_pairs": "No pair in the pairs table or any export shows the same image twice (uids and JPEG bytes "
    "re-read from disk).",
}
TABLES = ("social_pairs", "social_users", "social_images", "social_bots")


@dg.multi_asset(
    name="social_dataset",
    specs=[dg.AssetSpec(
        "social_dataset", group_name="datasets", kinds={"duckdb", "webdataset"},
        automation_condition=dg.AutomationCondition.on_cron("0 4 * * *"),
        skippable=True,  # no interaction log: nothing to build, not a failure
        description="Preference pairs mined from what users did: engagement per image against what its audience "
        "predicts (Gamma-Poisson with stratum offsets, fitted prior), a posterior expected-FDR rule per prompt group, "
        "ties and weak evidence dropped, bots (rate rules, remix rings, boosters) and self-engagement excluded. "
        "Default exports (WebDataset train/eval by prompt, Pick-a-Pic Parquet) hold population pairs only; "
        "per-user pairs from images shown together go to per_user/. A content-addressed version with a card.",
    )],
    check_specs=[dg.AssetCheckSpec(n, asset="social_dataset", blocking=True, description=d) for n, d in CHECKS.items()],
    can_subset=True,  # a skipped run leaves its checks unreported
)
def social_dataset(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.datasets import release, sync_catalog_table
    from pipeline.removals import card_entries, load_requests, mark_superseded, social_versions_with_users
    from pipeline.social import SocialConfig, build_social_pairs
    from pipeline.social.checks import events_reconcile, no_self_pairs, shards_match_manifest
    from pipeline.social.release import social_card, social_version
    from pipeline.social.report import pair_figures

    layout = lineup.layout
    social_dir = lineup.social_path
    if social_dir is None or not social_dir.is_dir():
        where = f"at {social_dir}" if social_dir is not None else "configured"
        yield skipped(context, "social_dataset", f"no interaction log {where} (set LINEUP_SOCIAL or social_dir; "
                      "see README, Social input contract)")
        return
    cfg = SocialConfig()
    removed = {r.user_hash for r in load_requests(layout) if r.kind == "user" and r.user_hash}
    removals = card_entries(layout, users=True)
    try:
        version, parts = social_version(social_dir, cfg, removals, digest_cache=layout.home / "cache" / "social_image_digests.json")
    except FileNotFoundError as e:
        yield skipped(context, "social_dataset", f"no interaction log: {e}")
        return
    context.log.info(f"social version {version} from {social_dir}")

    def build(folder):
        return build_social_pairs(social_dir, folder, cfg, version=version, removed_users=removed)

    outcomes = {}

    def checks(folder, res):
        outcomes.update(events_reconcile=events_reconcile(social_dir, folder), shards_match_manifest=shards_match_manifest(folder),
                        no_self_pairs=no_self_pairs(folder))
        return {name: [] if o.passed else [str(o.metadata)[:2000]] for name, o in outcomes.items()}

    def card(folder, res):
        return social_card(version, folder, res.stats, cfg, parts, lineup.dataset_contact, removals)

    rel = release(layout, "social", version, build, checks, card)
    if removed and rel.published:  # older versions in which a removed user acts or creates
        mark_superseded(layout, social_versions_with_users(layout, removed, keep=version), purge=lineup.purge_removed_versions)
    for name in TABLES:  # the catalog shows the version LATEST names, not one that failed its checks
        sync_catalog_table(layout, "social", f"{name}.parquet", name)
    sync_catalog_table(layout, "social", "social_rejects.parquet", "rejects_social")
    refresh_catalog(layout)
    st = rel.result.stats if rel.result is not None else {}
    keys = ("population_pairs", "user_pairs", "users_with_pairs", "events_in", "events_rejected", "events_self_excluded",
            "events_bot_excluded", "bots_flagged", "fdr_level", "expected_fdr", "estimated_precision",
            "user_estimated_precision", "naive_pairs", "yield_vs_naive", "reposts_folded")
    yield dg.MaterializeResult(
        asset_key="social_dataset",
        metadata={
            **release_metadata(rel),
            "empty_because": st.get("empty_because", ""),
            **{k: st[k] for k in keys if st.get(k) is not None},
            "bots_by_rule": dg.MetadataValue.json(st.get("bots_by_rule", {})),
            "pairs_dropped": dg.MetadataValue.json({k: v for k, v in st.items() if k.startswith("pairs_dropped")}),
            "rejects_by_reason": dg.MetadataValue.json(st.get("rejects_by_reason", {})),
            "prior": dg.MetadataValue.json(st.get("prior", {})),
            "estimated_precision_interval": dg.MetadataValue.json(
                {"population": st.get("estimated_precision_interval"), "per_user": st.get("user_estimated_precision_interval")}
            ),
            "calibration": dg.MetadataValue.json(st.get("calibration") or {}),
            "exports": dg.MetadataValue.json(outcomes["shards_match_manifest"].metadata.get("counts", {})),
            "timings_s": dg.MetadataValue.json(st.get("timings_s", {})),
            "lineage": dg.MetadataValue.json({k: v for k, v in parts.items() if k != "config"}),
            **(pictures(layout.home, f"social_dataset/{rel.version}", pair_figures(rel.result), shows_uids=uids_in(rel.result.pairs))
               if rel.result is not None else {}),
            **(table_metadata(read_parquet(rel.folder / "social_pairs.parquet"))
               if (rel.folder / "social_pairs.parquet").exists() else {}),
        },
        data_version=dg.DataVersion(version),
    )
    yield from release_checks(rel, CHECKS)
