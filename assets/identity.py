"""Identities across the whole collection, and the multi-identity paired dataset built on them."""

import dagster as dg
import numpy as np

from assets.ingest import faces, images
from assets.resources import LineupSettings
from assets.ui import pictures
from pipeline.catalog import refresh_catalog
from pipeline.datasets import dataset_dir, dataset_version, fingerprint_rows, is_complete, publish
from pipeline.identity import build_identities
from pipeline.identity_report import CropReader, embeddings_of, evaluate_against_labels, folder_labels, identity_figures
from pipeline.storage import read_parquet, read_partitioned, write_parquet_atomic


def _collection(lineup: LineupSettings):
    layout = lineup.layout
    imgs = read_partitioned(layout.table_dir("images"))
    fcs = read_partitioned(layout.table_dir("faces"))
    if imgs is None or fcs is None:
        raise dg.Failure("no faces yet: materialize the images and faces partitions first")
    return layout, imgs, fcs


@dg.asset(
    group_name="identity",
    kinds={"parquet", "faiss"},
    deps=[faces],
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[dg.AssetCheckSpec("clustering_vs_folder_labels", asset="identities")],
    description="Every face gets an identity_id: a FAISS kNN graph over all embeddings, training-free "
    "graph clustering, ids kept stable across refreshes by overlap with the previous assignment.",
)
def identities(context: dg.AssetExecutionContext, lineup: LineupSettings):
    layout, imgs, fcs = _collection(lineup)
    prev_path = layout.table_file("identities")
    previous = read_parquet(prev_path) if prev_path.exists() else None
    emb = embeddings_of(fcs)
    backend_name = fcs.column("backend")[0].as_py() if fcs.num_rows else lineup.face_backend
    context.log.info(f"clustering {len(emb)} faces ({backend_name}) with {lineup.identity_method}")
    res = build_identities(
        fcs.column("uid").to_pylist(),
        np.asarray(fcs.column("face_index").to_pylist()),
        emb,
        previous=previous,
        method=lineup.identity_method,
        threshold=lineup.identity_threshold or None,
        backend_name=backend_name,
        knn_backend=lineup.knn_backend,
        mode=lineup.identity_mode if previous is not None else "recluster",
    )
    write_parquet_atomic(res.assignments, prev_path)
    write_parquet_atomic(res.summary, layout.table_file("identity_summary"))
    refresh_catalog(layout)
    st = res.stats
    quality = evaluate_against_labels(res.assignments, folder_labels(fcs, imgs))
    figs = identity_figures(res, CropReader(imgs, fcs, lineup.limits))
    churn = st.get("churn") or {}
    yield dg.MaterializeResult(
        metadata={
            "faces": st["n_faces"],
            "identities": st["n_identities"],
            "singletons": st["n_singletons"],
            "largest_identity": st["largest_identity"],
            "method": st["method"],
            "threshold": float(st["threshold"]),
            "knn_backend": st["knn_backend"],
            "mode": lineup.identity_mode if previous is not None else "recluster (first build)",
            "churn": dg.MetadataValue.json(churn),
            "timings_s": dg.MetadataValue.json({k: round(float(v), 3) for k, v in st.get("timings", {}).items()}),
            "doubtful_merges": dg.MetadataValue.json(st.get("doubtful_merges", [])[:10]),
            **pictures(figs),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="clustering_vs_folder_labels",
                passed=True if quality is None else quality["bcubed_f"] >= 0.9,
                severity=dg.AssetCheckSeverity.WARN,
                description="no folder labels in this collection" if quality is None else
                "pairwise/BCubed F and NMI against folder-name labels of single-face images (warns below BCubed F 0.9)",
                metadata={k: float(v) for k, v in (quality or {}).items()},
            )
        ],
    )


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
            **pictures(multiid_histograms(res)),
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


def multiid_histograms(res) -> dict[str, bytes]:
    from pipeline.viz import histogram_png

    sims = res.pairs.column("similarity").to_pylist() if "similarity" in res.pairs.column_names else []
    cands = res.candidates
    figs = {}
    if sims:
        figs["target_reference_similarity"] = histogram_png({"selected": sims}, "Target-reference cosine", "cosine")
    if cands.num_rows:
        by_status: dict[str, list[float]] = {}
        for s, st in zip(cands.column("similarity").to_pylist(), cands.column("status").to_pylist()):
            by_status.setdefault(st, []).append(s)
        figs["candidate_similarity"] = histogram_png(by_status, "Candidate cosine by outcome", "cosine")
    return figs
