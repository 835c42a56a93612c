"""Candidate scores: CLIP, aesthetics, learned social reward, face quality, identity similarity."""

import dagster as dg
import pyarrow as pa

from assets.common import COLLECTION_UPDATE, GPU_POOL, engine_metadata, engine_runner
from assets.faces import faces
from assets.identity import identities
from assets.ingest import images
from assets.resources import LineupSettings
from pipeline.catalog import refresh_catalog
from pipeline.identity.build import with_identity_ids
from pipeline.storage import read_parquet, write_parquet_atomic


@dg.asset(
    group_name="datasets",
    pool=GPU_POOL,
    kinds={"parquet", "pytorch"},
    # the learned social reward comes from social_reward_model's LATEST file: lineage, not a table read
    deps=[images, faces, identities, "social_reward_model"],
    automation_condition=COLLECTION_UPDATE,
    description="Per image and face: CLIP text-image score, aesthetic score, learned social reward, face "
    "quality, identity similarity. Image-level scores are computed once per input partition and scorer "
    "configuration (tables/image_scores), so a new partition costs only its own images. Scorers without "
    "local weights are reported unavailable and skipped.",
)
def scores(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.collection import load_collection, load_identities
    from pipeline.per_image import discard_precomputed, take_image_scores
    from pipeline.scoring.stage import (
        IMAGE_SCORES_SCHEMA,
        ImageScorerStage,
        ray_score_runner,
        score_candidates,
        score_partition,
        scorer_fingerprint,
    )

    layout = lineup.layout
    coll = load_collection(layout)
    imgs = coll.images
    fcs = with_identity_ids(coll.faces, load_identities(layout, coll.faces))
    cfg = scoring_config(lineup)
    # image-level scores once per partition and scorer configuration; face-level scores for the collection
    fp = scorer_fingerprint(cfg)
    parts, computed, reused, from_fused, image_report = [], [], [], [], {}
    stage = runner = None
    for key in coll.built:
        path = layout.partition_file("image_scores", key)
        if path.exists() and set(read_parquet(path).column("scorer_fingerprint").to_pylist()) <= {fp}:
            parts.append(read_parquet(path))
            reused.append(key)
            discard_precomputed(layout, "image_scores", key)  # superseded by the scores kept
            continue
        mine = imgs.filter(pa.array([p == key for p in imgs.column("partition").to_pylist()], pa.bool_()))
        precomputed = take_image_scores(layout, key, cfg, mine)  # by the fused pass of its ingestion
        if precomputed is not None:
            table_k, image_report = precomputed
            write_parquet_atomic(table_k, path)
            parts.append(table_k)
            computed.append(key)
            from_fused.append(key)
            continue
        if stage is None:  # the scorers load once, for every partition that needs its scores computed
            stage = ImageScorerStage(cfg)
            runner = engine_runner(lineup, lambda: ray_score_runner(cfg, lineup.ray_actors))
        table_k, image_report = score_partition(mine, stage, lineup.limits, chunk_runner=runner)
        write_parquet_atomic(table_k, path)
        parts.append(table_k)
        computed.append(key)
    image_scores = pa.concat_tables(parts) if parts else IMAGE_SCORES_SCHEMA.empty_table()
    table, report = score_candidates([], fcs, cfg, image_scores=image_scores)
    for name, why in image_report.get("unavailable", {}).items():
        report["unavailable"].setdefault(name, why)
    for name in ("clip", "aesthetic", "social_reward"):
        if name not in report["available"] and name not in report["unavailable"]:
            report["unavailable"][name] = f"{name}: no score in the image scores (it was unavailable when they were computed)"
    write_parquet_atomic(table, layout.table_file("scores"))
    refresh_catalog(layout)
    for name, why in report["unavailable"].items():
        context.log.warning(f"scorer {name} unavailable: {why}")
    return dg.MaterializeResult(
        metadata={
            "rows": table.num_rows,
            "available_scorers": dg.MetadataValue.json(report["available"]),
            "unavailable_scorers": dg.MetadataValue.json(report["unavailable"]),
            "timings_s": dg.MetadataValue.json(report["timings_s"]),
            "device": report["device"],
            "image_scores_computed_for": dg.MetadataValue.json(computed),
            "image_scores_reused_for": len(reused),
            # computed by the fused pass of their ingestion (pipeline/per_image.py): no photo decoded here
            "image_scores_from_fused_pass": len(from_fused),
            "empty_because": coll.empty_reason or "",
            **engine_metadata(lineup, runner),
            "collection": dg.MetadataValue.json(coll.coverage()),
        }
    )


def scoring_config(lineup: LineupSettings):
    """The scorers the settings name (weights from local files only; the learned social reward from
    social_reward_model's LATEST file when no weights are given)."""
    from pipeline.scoring.clip import ClipConfig
    from pipeline.scoring.heads import HeadConfig
    from pipeline.scoring.stage import ScoringConfig

    layout = lineup.layout
    reward = lineup.path_setting(lineup.social_reward_weights, "LINEUP_SOCIAL_REWARD")
    latest_reward = layout.home / "models" / "social_reward" / "LATEST"
    if reward is None and latest_reward.exists():  # written only by a reward model trained from real weights
        reward = str(latest_reward.parent / latest_reward.read_text().strip() / "reward_model")
    return ScoringConfig(
        clip=ClipConfig(
            model_name=lineup.clip_model,
            pretrained=lineup.path_setting(lineup.clip_weights, "LINEUP_CLIP_WEIGHTS"),
            model_config=lineup.clip_model_config or None,
        ),
        aesthetic=HeadConfig(weights=lineup.path_setting(lineup.aesthetic_weights, "LINEUP_AESTHETIC_WEIGHTS")),
        social_reward=HeadConfig(weights=reward),
    )
