"""The multi-identity paired dataset (MultiID-2M style) built on the identities."""

import dagster as dg

from assets.identity import _collection, identities
from assets.ingest import images
from assets.resources import LineupSettings
from assets.ui import pictures
from pipeline.catalog import refresh_catalog
from pipeline.datasets import dataset_dir, dataset_version, fingerprint_rows, is_complete, publish
from pipeline.multiid.report import similarity_histograms
from pipeline.storage import read_parquet, write_parquet_atomic


@dg.asset(
    group_name="datasets",
    kinds={"webdataset"},
    deps=[identities, images],
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec("identity_disjoint_splits", asset="multiid_dataset", blocking=True),
        dg.AssetCheckSpec("shards_match_manifest", asset="multiid_dataset", blocking=True),
    ],
    description="MultiID-2M-style pairs: every person in a target photo gets references of the same identity "
    "from other shots (0.6 <= cos <= 0.8 in ArcFace terms, calibrated per backend; copy-paste guard by "
    "perceptual hashes), identity-disjoint train/eval splits, WebDataset shards + manifest.",
)
def multiid_dataset(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.multiid import MultiIDConfig, build_multiid_dataset
    from pipeline.multiid.splits import check_identity_disjoint
    from pipeline.shards import verify_manifest

    layout, imgs, fcs = _collection(lineup)
    ids = read_parquet(layout.table_file("identities"))
    backend_name = fcs.column("backend")[0].as_py() if fcs.num_rows else lineup.face_backend
    cfg = MultiIDConfig(backend=backend_name)
    version = dataset_version(
        cfg.resolved().to_dict(),
        fingerprint_rows(zip(*(ids.column(c).to_pylist() for c in ("uid", "face_index", "identity_id")))),
        fingerprint_rows(zip(imgs.column("uid").to_pylist())),
    )
    out = dataset_dir(layout, "multiid", version)
    res = build_multiid_dataset(imgs, fcs, ids, out, cfg)
    write_parquet_atomic(res.pairs, layout.table_file("multiid_pairs"))
    write_parquet_atomic(res.candidates, layout.table_file("multiid_candidates"))
    refresh_catalog(layout)
    problems = {split: verify_manifest(out / split) for split in res.shards}
    leaks = check_identity_disjoint(res.samples)
    if is_complete(out) and not leaks and not any(problems.values()):
        publish(layout, "multiid", version)
    st = res.stats
    dq = st.get("data_quality", {})
    yield dg.MaterializeResult(
        metadata={
            "version": version,
            "path": dg.MetadataValue.path(str(out)),
            "targets": len(res.samples),
            "pairs": res.pairs.num_rows,
            "samples_per_split": dg.MetadataValue.json({k: sum(s.samples for s in v) for k, v in res.shards.items()}),
            "candidates_removed_by": dg.MetadataValue.json(st.get("candidates_removed_by", {})),
            "target_drops": dg.MetadataValue.json(st.get("targets", {})),
            "data_quality": dg.MetadataValue.json(dq),
            **pictures({"pairs_contact_sheet": res.contact_sheet(4)}),
            **pictures(similarity_histograms(res.pairs, res.candidates)),
        },
        check_results=[
            dg.AssetCheckResult(check_name="identity_disjoint_splits", passed=not leaks, metadata={"problems": dg.MetadataValue.json(leaks[:20])}),
            dg.AssetCheckResult(
                check_name="shards_match_manifest",
                passed=not any(problems.values()),
                metadata={"problems": dg.MetadataValue.json(problems)},
            ),
        ],
    )
