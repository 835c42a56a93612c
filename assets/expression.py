"""Expression descriptors per face and the cross-expression pair dataset."""

import dagster as dg

from assets.common import (
    COLLECTION_UPDATE,
    GPU_POOL,
    engine_metadata,
    engine_runner,
    release_checks,
    release_metadata,
)
from assets.faces import faces
from assets.identity import identities
from assets.partitions import input_partitions
from assets.resources import LineupSettings
from assets.ui import pictures, table_metadata, uids_in
from pipeline.catalog import refresh_catalog
from pipeline.faces.calibration import thresholds_for
from pipeline.identity.build import with_identity_ids
from pipeline.storage import read_parquet, read_partitioned


@dg.asset(
    partitions_def=input_partitions,
    group_name="ingest",
    pool=GPU_POOL,
    kinds={"parquet", "pytorch"},
    deps=[faces],
    description="Per face: 7-class expression probabilities (FER mini-Xception weights, run in PyTorch) "
    "and landmark geometry (mouth/eye opening, brow raise, smile curvature).",
)
def face_expressions(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.expression.descriptor import (
        ExpressionConfig,
        ExpressionModelUnavailable,
        ExpressionStage,
        ray_expression_runner,
        run_expression_stage,
    )
    from pipeline.per_image import take_expression_stage

    layout = lineup.layout
    key = context.partition_key
    cfg = ExpressionConfig(fer_weights=lineup.path_setting(lineup.fer_weights, "LINEUP_FER_WEIGHTS"))
    runner = None
    taken = take_expression_stage(layout, key, cfg)  # computed by the fused pass of this run's ingestion
    if taken is not None:
        res, unit = taken
    else:
        try:
            stage = ExpressionStage(cfg)
        except ExpressionModelUnavailable as e:
            raise dg.Failure(f"expression model unavailable: {e}") from e
        runner = engine_runner(lineup, lambda: ray_expression_runner(cfg, lineup.ray_actors))
        res, unit = run_expression_stage(layout, key, stage, lineup.limits, chunk_runner=runner)
    refresh_catalog(layout)
    if not unit.passed:
        raise dg.Failure(f"{key}: face_expressions not committed (kept in {unit.staging}): {'; '.join(unit.reasons)}")
    top = res.descriptors.column("top_class").to_pylist() if res.descriptors.num_rows else []
    counts = {c: top.count(c) for c in sorted(set(top))}
    return dg.MaterializeResult(
        metadata={
            "faces": res.stats.get("faces", 0),
            "described": res.descriptors.num_rows,
            "not_described": res.rejects.num_rows,
            "top_class_counts": dg.MetadataValue.json(counts),
            "stats": dg.MetadataValue.json({k: v for k, v in res.stats.items() if isinstance(v, (int, float, str))}),
            **engine_metadata(lineup, runner),
            "from_fused_pass": taken is not None,
        }
    )


EXPRESSION_CHECKS = {
    "no_same_identity_pairs": "Both faces of every sample in the tars looked up in the catalog's identities table: "
    "never the same identity.",
    "shards_match_manifest": "Tars re-read from disk match manifest.json and the pairs table.",
}


@dg.asset(
    group_name="datasets",
    kinds={"webdataset"},
    deps=[face_expressions, identities],
    automation_condition=COLLECTION_UPDATE,
    check_specs=[dg.AssetCheckSpec(n, asset="expression_dataset", blocking=True, description=d) for n, d in EXPRESSION_CHECKS.items()],
    description="EmojiDiff-style pairs: same expression, different identity, good quality, similar pose; a "
    "content-addressed version with shards, manifest and dataset card.",
)
def expression_dataset(context: dg.AssetExecutionContext, lineup: LineupSettings):
    import numpy as np

    from pipeline.collection import load_collection, load_identities
    from pipeline.commits import committed_keys
    from pipeline.datasets import release, reusable_version, sync_catalog_table
    from pipeline.expression.pairs import (
        PairConfig,
        build_expression_pairs,
        contact_sheet,
        write_expression_dataset,
    )
    from pipeline.expression.release import expression_card, expression_version
    from pipeline.expression.release import release_checks as checks_of
    from pipeline.faces.crops import CropReader
    from pipeline.removals import card_entries

    layout = lineup.layout
    coll = load_collection(layout)
    ids = load_identities(layout, coll.faces)
    described = committed_keys(layout, "face_expressions", coll.built)  # committed expression units only
    desc = read_partitioned(layout.table_dir("face_expressions"), described) if described else None
    empty_reason = coll.empty_reason or (None if desc is not None and desc.num_rows else "no expression descriptors yet")
    if desc is None:
        from pipeline.expression.descriptor import DESCRIPTOR_SCHEMA

        desc = DESCRIPTOR_SCHEMA.empty_table()
    fcs = with_identity_ids(coll.faces, ids)
    backend = fcs.column("backend")[0].as_py() if fcs.num_rows else lineup.face_backend
    cfg = PairConfig(max_identity_cos=thresholds_for(backend).different_person_max)
    version, parts = expression_version(coll.faces, desc, ids, cfg, card_entries(layout), decoding=lineup.limits)
    crops = CropReader(coll.images, fcs, lineup.limits)

    def crop(uid, face_index):
        # a photo edited or gone since ingestion raises OSError / DecodeError: the writer skips that pair with the reason
        return np.asarray(crops.crop_or_raise(uid, face_index))

    def crop_inputs(uid, face_index):  # what decides a crop: the photo (its uid is its content), the box, decoding limits
        return [uid, crops.boxes.get((uid, int(face_index))), parts["decoding"]]

    previous = reusable_version(layout, "expression")
    reuse: dict = {}

    def build(folder):
        res = build_expression_pairs(fcs, desc, cfg)
        write_expression_dataset(res.pairs, crop, folder, cfg, res.stats, version=version, crop_inputs=crop_inputs,
                                 reuse_from=previous, report=reuse)
        return res

    def checks(folder, res):
        # what was written: pairs whose photo changed since ingestion are left out of it (skipped_pairs.parquet)
        return checks_of(folder, ids, read_parquet(folder / "pairs.parquet"))

    def card(folder, res):
        return expression_card(version, folder, res.stats, cfg, parts, lineup.dataset_contact, empty_reason,
                               card_entries(layout))

    rel = release(layout, "expression", version, build, checks, card)
    pairs = read_parquet(rel.folder / "pairs.parquet")
    # the catalog shows the version LATEST names, not one that failed its checks or lost to a newer build
    sync_catalog_table(layout, "expression", "pairs.parquet", "expression_pairs")
    refresh_catalog(layout)
    stats = rel.result.stats if rel.result is not None else {}
    return dg.MaterializeResult(
        metadata={
            **release_metadata(rel),
            "empty_because": empty_reason or "",
            "pairs": pairs.num_rows,
            "max_identity_cos": cfg.max_identity_cos,
            "stats": dg.MetadataValue.json(stats),
            # shard reuse: buckets hard-linked from the previous version vs cropped again (0/0 when reused whole)
            "buckets_reused": reuse.get("buckets_reused", 0),
            "buckets_rebuilt": reuse.get("buckets_rebuilt", 0),
            "bytes_reused": reuse.get("bytes_reused", 0),
            # inside rebuilt buckets: pairs whose crops were copied from the previous tars vs cut again
            "pairs_copied": reuse.get("pairs_copied", 0),
            "pairs_cropped": reuse.get("pairs_cropped", 0),
            # pairs left out because a photo could not be read again (edited in place, gone): the run goes on
            "pairs_skipped": reuse.get("pairs_skipped", 0),
            "pairs_skipped_reasons": dg.MetadataValue.json(reuse.get("skipped_reasons", {})),
            "collection": dg.MetadataValue.json(coll.coverage()),
            **pictures(layout.home, f"expression_dataset/{rel.version}",
                       {"pairs_contact_sheet": contact_sheet(pairs, crop, max_pairs=12)}, shows_uids=uids_in(pairs)),
            **table_metadata(pairs),
        },
        data_version=dg.DataVersion(version),
        check_results=release_checks(rel, EXPRESSION_CHECKS),
    )
