"""Identities across the whole collection: the kNN graph, clustering and stable ids."""

import dagster as dg
import numpy as np

from assets.faces import faces
from assets.resources import LineupSettings
from assets.ui import pictures
from pipeline.catalog import refresh_catalog
from pipeline.faces import embeddings_of
from pipeline.faces.crops import CropReader
from pipeline.identity import build_identities
from pipeline.identity.report import evaluate_against_labels, folder_labels, identity_figures
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
