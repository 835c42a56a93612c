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
        dg.AssetCheckSpec("events_reconcile", asset="social_dataset", blocking=True),
        dg.AssetCheckSpec("shards_match_manifest", asset="social_dataset", blocking=True),
        dg.AssetCheckSpec("no_self_pairs", asset="social_dataset", blocking=True),
    ],
    description="Preference pairs mined from what users did: exposure-normalised engagement per image, a "
    "Beta-Binomial test with a fitted prior, ties and weak evidence dropped, bots and self-engagement excluded, "
    "per-user pairs. WebDataset (train/eval by prompt) and Pick-a-Pic-compatible Parquet.",
)
def social_dataset(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.shards import verify_manifest
    from pipeline.social import SocialConfig, build_social_pairs
    from pipeline.social.report import pair_figures
    from pipeline.social.ingest import find_inputs

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
    write_parquet_atomic(res.rejects, layout.table_file("rejects_social"))
    refresh_catalog(layout)
    st = res.stats
    problems = {s: verify_manifest(out / "webdataset" / s) for s in ("train", "eval") if (out / "webdataset" / s / "manifest.json").exists()}
    self_pairs = sum(1 for a, b in zip(res.pairs.column("winner_uid").to_pylist(), res.pairs.column("loser_uid").to_pylist()) if a == b)
    reconciles = st["events_in"] == st["events_accepted"] + st["events_rejected"]
    if reconciles and not any(problems.values()) and not self_pairs:
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
            "pairs_dropped": dg.MetadataValue.json({k: v for k, v in st.items() if k.startswith("pairs_dropped")}),
            "rejects_by_reason": dg.MetadataValue.json(st["rejects_by_reason"]),
            "prior": dg.MetadataValue.json(st["prior"]),
            "timings_s": dg.MetadataValue.json(st.get("timings_s", {})),
            **pictures(pair_figures(res)),
        },
        check_results=[
            dg.AssetCheckResult(check_name="events_reconcile", passed=reconciles, metadata={k: st[k] for k in ("events_in", "events_accepted", "events_rejected")}),
            dg.AssetCheckResult(check_name="shards_match_manifest", passed=not any(problems.values()), metadata={"problems": dg.MetadataValue.json(problems)}),
            dg.AssetCheckResult(check_name="no_self_pairs", passed=self_pairs == 0, metadata={"self_pairs": self_pairs}),
        ],
    )
