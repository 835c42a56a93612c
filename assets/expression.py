"""Expression descriptors per face and the cross-expression pair dataset."""

import dagster as dg

from assets.faces import faces
from assets.identity import identities
from assets.partitions import input_partitions
from assets.resources import LineupSettings
from assets.ui import pictures
from pipeline.catalog import refresh_catalog
from pipeline.datasets import dataset_dir, dataset_version, fingerprint_rows, publish
from pipeline.faces.calibration import thresholds_for
from pipeline.identity.build import with_identity_ids
from pipeline.storage import read_parquet, read_partitioned, write_parquet_atomic


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
    from pipeline.ingest import decoded_images

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
    from pipeline.expression.pairs import (
        PairConfig,
        build_expression_pairs,
        contact_sheet,
        write_expression_dataset,
    )
    from pipeline.faces.crops import CropReader

    layout = lineup.layout
    fcs = read_partitioned(layout.table_dir("faces"))
    imgs = read_partitioned(layout.table_dir("images"))
    desc = read_partitioned(layout.table_dir("face_expressions"))
    ids = read_parquet(layout.table_file("identities"))
    if fcs is None or desc is None:
        raise dg.Failure("no faces or expression descriptors yet")
    fcs = with_identity_ids(fcs, ids)
    backend = fcs.column("backend")[0].as_py() if fcs.num_rows else lineup.face_backend
    cfg = PairConfig(max_identity_cos=thresholds_for(backend).different_person_max)
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
