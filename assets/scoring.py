"""Candidate scores: CLIP, aesthetics, learned social reward, face quality, identity similarity."""

import dagster as dg

from assets.common import COLLECTION_UPDATE, GPU_POOL
from assets.faces import faces
from assets.identity import identities
from assets.ingest import images
from assets.resources import LineupSettings
from pipeline.catalog import refresh_catalog
from pipeline.identity.build import with_identity_ids
from pipeline.storage import write_parquet_atomic


@dg.asset(
    group_name="scoring",
    pool=GPU_POOL,
    kinds={"parquet", "pytorch"},
    deps=[images, faces, identities],
    automation_condition=COLLECTION_UPDATE,
    description="Per image and face: CLIP text-image score, aesthetic score, learned social reward, face "
    "quality, identity similarity. Scorers without local weights are reported unavailable and skipped.",
)
def scores(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.collection import load_collection, load_identities
    from pipeline.ingest import decoded_images
    from pipeline.scoring.clip import ClipConfig
    from pipeline.scoring.heads import HeadConfig
    from pipeline.scoring.stage import ScoringConfig, score_candidates

    layout = lineup.layout
    coll = load_collection(layout)
    imgs = coll.images
    fcs = with_identity_ids(coll.faces, load_identities(layout, coll.faces))
    reward = lineup.path_setting(lineup.social_reward_weights, "LINEUP_SOCIAL_REWARD")
    latest_reward = layout.home / "models" / "social_reward" / "LATEST"
    if reward is None and latest_reward.exists():  # written only by a reward model trained from real weights
        reward = str(latest_reward.parent / latest_reward.read_text().strip() / "reward_model")
    cfg = ScoringConfig(
        clip=ClipConfig(
            model_name=lineup.clip_model,
            pretrained=lineup.path_setting(lineup.clip_weights, "LINEUP_CLIP_WEIGHTS"),
            model_config=lineup.clip_model_config or None,
        ),
        aesthetic=HeadConfig(weights=lineup.path_setting(lineup.aesthetic_weights, "LINEUP_AESTHETIC_WEIGHTS")),
        social_reward=HeadConfig(weights=reward),
    )
    captions = dict(zip(imgs.column("uid").to_pylist(), imgs.column("caption").to_pylist()))
    items = ((uid, rgb, captions.get(uid)) for uid, rgb in decoded_images(imgs, lineup.limits))
    table, report = score_candidates(items, fcs, cfg)
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
            "empty_because": coll.empty_reason or "",
            "collection": dg.MetadataValue.json(coll.coverage()),
        }
    )
