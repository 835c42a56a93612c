"""Expression descriptors per face, cross-expression pairs, and candidate scores."""

import dagster as dg

from assets.identity import identities
from assets.ingest import faces, images
from assets.partitions import input_partitions
from assets.resources import LineupSettings
from assets.ui import pictures
from pipeline.catalog import refresh_catalog
from pipeline.identity_report import with_identity_ids
from pipeline.datasets import dataset_dir, dataset_version, fingerprint_rows, publish
from pipeline.storage import read_parquet, read_partitioned, write_parquet_atomic

# identity cosine above which two faces may be the same person, per face backend: dlib's
# descriptor is compressed (different people reach 0.915 on the shared photos), ArcFace is not
MAX_IDENTITY_COS = {"dlib": 0.9, "insightface": 0.5}


@dg.asset(
    partitions_def=input_partitions,
    group_name="expression",
    kinds={"parquet", "pytorch"},
    deps=[faces],
    description="Per face: 7-class expression probabilities (FER mini-Xception weights, run in PyTorch) "
    "and landmark geometry (mouth/eye opening, brow raise, smile curvature).",
)
def face_expressions(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.expression.descriptor import (
        ExpressionConfig,
        ExpressionModelUnavailable,
        FerExpressionModel,
        boxes_from_faces,
        describe_images,
    )
    from pipeline.face_partition import decoded_images

    layout = lineup.layout
    key = context.partition_key
    fcs = read_parquet(layout.partition_file("faces", key))
    imgs = read_parquet(layout.partition_file("images", key))
    cfg = ExpressionConfig(fer_weights=lineup.path_setting(lineup.fer_weights, "LINEUP_FER_WEIGHTS"))
    try:
        model = FerExpressionModel(cfg)
    except ExpressionModelUnavailable as e:
        raise dg.Failure(f"expression model unavailable: {e}") from e
    with_faces = set(fcs.column("uid").to_pylist())
    res = describe_images(decoded_images(imgs, lineup.limits, only=with_faces), model, cfg, boxes=boxes_from_faces(fcs))
    write_parquet_atomic(res.descriptors, layout.partition_file("face_expressions", key))
    refresh_catalog(layout)
    top = res.descriptors.column("top_class").to_pylist() if res.descriptors.num_rows else []
    counts = {c: top.count(c) for c in sorted(set(top))}
    return dg.MaterializeResult(
        metadata={
            "faces": fcs.num_rows,
            "described": res.descriptors.num_rows,
            "not_described": res.rejects.num_rows,
            "top_class_counts": dg.MetadataValue.json(counts),
            "stats": dg.MetadataValue.json({k: v for k, v in res.stats.items() if isinstance(v, (int, float, str))}),
        }
    )


@dg.asset(
    group_name="datasets",
    kinds={"webdataset"},
    deps=[face_expressions, identities],
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[dg.AssetCheckSpec("no_same_identity_pairs", asset="expression_dataset", blocking=True)],
    description="EmojiDiff-style pairs: same expression, different identity, good quality, similar pose.",
)
def expression_dataset(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.expression.pairs import PairConfig, build_expression_pairs, contact_sheet, write_expression_dataset
    from pipeline.identity_report import CropReader

    layout = lineup.layout
    fcs = read_partitioned(layout.table_dir("faces"))
    imgs = read_partitioned(layout.table_dir("images"))
    desc = read_partitioned(layout.table_dir("face_expressions"))
    ids = read_parquet(layout.table_file("identities"))
    if fcs is None or desc is None:
        raise dg.Failure("no faces or expression descriptors yet")
    fcs = with_identity_ids(fcs, ids)
    backend = fcs.column("backend")[0].as_py() if fcs.num_rows else lineup.face_backend
    cfg = PairConfig(max_identity_cos=MAX_IDENTITY_COS.get(backend, 0.5))
    res = build_expression_pairs(fcs, desc, cfg)
    crops = CropReader(imgs, fcs, lineup.limits)

    def crop(uid, face_index):
        import numpy as np

        return np.asarray(crops.crop(uid, face_index))

    pairs_fp = fingerprint_rows(zip(*(res.pairs.column(c).to_pylist() for c in ("pair_id", "uid_a", "uid_b"))))
    version = dataset_version({"pairs": repr(cfg)}, pairs_fp)
    out = dataset_dir(layout, "expression", version)
    write_expression_dataset(res.pairs, crop, out, cfg, res.stats)
    publish(layout, "expression", version)
    write_parquet_atomic(res.pairs, layout.table_file("expression_pairs"))
    refresh_catalog(layout)
    same = sum(1 for a, b in zip(res.pairs.column("identity_a").to_pylist(), res.pairs.column("identity_b").to_pylist()) if a == b)
    return dg.MaterializeResult(
        metadata={
            "version": version,
            "path": dg.MetadataValue.path(str(out)),
            "pairs": res.pairs.num_rows,
            "max_identity_cos": cfg.max_identity_cos,
            "stats": dg.MetadataValue.json(res.stats),
            **pictures({"pairs_contact_sheet": contact_sheet(res.pairs, crop, max_pairs=12)}),
        },
        check_results=[dg.AssetCheckResult(check_name="no_same_identity_pairs", passed=same == 0, metadata={"same_identity_pairs": same})],
    )


@dg.asset(
    group_name="scoring",
    kinds={"parquet", "pytorch"},
    deps=[images, faces, identities],
    automation_condition=dg.AutomationCondition.eager(),
    description="Per image and face: CLIP text-image score, aesthetic score, learned social reward, face "
    "quality, identity similarity. Scorers without local weights are reported unavailable and skipped.",
)
def scores(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.face_partition import decoded_images
    from pipeline.scoring.clip import ClipConfig
    from pipeline.scoring.heads import HeadConfig
    from pipeline.scoring.stage import ScoringConfig, score_candidates

    layout = lineup.layout
    imgs = read_partitioned(layout.table_dir("images"))
    fcs = read_partitioned(layout.table_dir("faces"))
    ids = read_parquet(layout.table_file("identities"))
    fcs = with_identity_ids(fcs, ids)
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
        }
    )
