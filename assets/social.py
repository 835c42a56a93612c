"""Implicit social-feedback preference pairs from interaction logs (the social input location)."""

import dagster as dg

from assets.resources import LineupSettings
from assets.ui import pictures
from pipeline.catalog import refresh_catalog
from pipeline.datasets import dataset_dir, dataset_version, fingerprint_rows, publish
from pipeline.storage import write_parquet_atomic


@dg.asset(
    group_name="social",
    kinds={"duckdb", "webdataset"},
    automation_condition=dg.AutomationCondition.on_cron("0 4 * * *"),
    check_specs=[
        dg.AssetCheckSpec(
            "events_reconcile",
            asset="social_dataset",
            blocking=True,
            description="Rows of the input files (Parquet footers, csv module) = accepted + rejected, read back "
            "from the written tables; for events and for image rows.",
        ),
        dg.AssetCheckSpec(
            "shards_match_manifest",
            asset="social_dataset",
            blocking=True,
            description="Every shard re-read and hashed against its manifest; WebDataset samples, Pick-a-Pic rows "
            "and the pairs table agree for each kind of pairs.",
        ),
        dg.AssetCheckSpec(
            "no_self_pairs",
            asset="social_dataset",
            blocking=True,
            description="No pair in the pairs table or any export shows the same image twice (uids and JPEG bytes "
            "re-read from disk).",
        ),
    ],
    description="Preference pairs mined from what users did: engagement per image against what its audience "
    "predicts (Gamma-Poisson with stratum offsets, fitted prior), a posterior expected-FDR rule per prompt group, "
    "ties and weak evidence dropped, bots (rate rules, remix rings, boosters) and self-engagement excluded. "
    "Default exports (WebDataset train/eval by prompt, Pick-a-Pic Parquet) hold population pairs only; "
    "per-user pairs from images shown together go to per_user/.",
)
def social_dataset(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.social import SocialConfig, build_social_pairs
    from pipeline.social.checks import events_reconcile, no_self_pairs, shards_match_manifest
    from pipeline.social.ingest import find_inputs
    from pipeline.social.report import pair_figures

    layout = lineup.layout
    social_dir = lineup.social_path
    if not social_dir.exists():
        raise dg.Failure(f"no social input at {social_dir}: set LINEUP_SOCIAL or social_dir (see README, Social input)")
    image_files, event_files = find_inputs(social_dir)
    cfg = SocialConfig()
    version = dataset_version(
        cfg.to_dict(),
        fingerprint_rows((str(p.relative_to(social_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in [*image_files, *event_files]),
    )
    out = dataset_dir(layout, "social", version)
    res = build_social_pairs(social_dir, out, cfg)
    write_parquet_atomic(res.pairs, layout.table_file("social_pairs"))
    write_parquet_atomic(res.users, layout.table_file("social_users"))
    write_parquet_atomic(res.images, layout.table_file("social_images"))
    write_parquet_atomic(res.bots, layout.table_file("social_bots"))
    write_parquet_atomic(res.rejects, layout.table_file("rejects_social"))
    refresh_catalog(layout)
    st = res.stats
    reconcile = events_reconcile(social_dir, out)
    shards = shards_match_manifest(out)
    no_self = no_self_pairs(out)
    if reconcile.passed and shards.passed and no_self.passed:
        publish(layout, "social", version)
    return dg.MaterializeResult(
        metadata={
            "version": version,
            "path": dg.MetadataValue.path(str(out)),
            "population_pairs": st["population_pairs"],
            "user_pairs": st["user_pairs"],
            "users_with_pairs": st["users_with_pairs"],
            "events_in": st["events_in"],
            "events_rejected": st["events_rejected"],
            "events_self_excluded": st["events_self_excluded"],
            "events_bot_excluded": st["events_bot_excluded"],
            "bots_flagged": st["bots_flagged"],
            "bots_by_rule": dg.MetadataValue.json(st["bots_by_rule"]),
            "fdr_level": st["fdr_level"],
            "expected_fdr": st["expected_fdr"],
            "pairs_dropped": dg.MetadataValue.json({k: v for k, v in st.items() if k.startswith("pairs_dropped")}),
            "rejects_by_reason": dg.MetadataValue.json(st["rejects_by_reason"]),
            "prior": dg.MetadataValue.json(st["prior"]),
            "exports": dg.MetadataValue.json(shards.metadata["counts"]),
            "timings_s": dg.MetadataValue.json(st.get("timings_s", {})),
            **pictures(pair_figures(res)),
        },
        check_results=[
            dg.AssetCheckResult(check_name="events_reconcile", passed=reconcile.passed, metadata=reconcile.metadata),
            dg.AssetCheckResult(
                check_name="shards_match_manifest",
                passed=shards.passed,
                metadata={k: dg.MetadataValue.json(v) for k, v in shards.metadata.items()},
            ),
            dg.AssetCheckResult(
                check_name="no_self_pairs",
                passed=no_self.passed,
                metadata={"self_pairs": dg.MetadataValue.json(no_self.metadata["self_pairs"])},
            ),
        ],
    )
