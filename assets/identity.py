"""Identities across the whole collection: the kNN graph, clustering and stable ids."""

import dagster as dg
import numpy as np

from assets.common import COLLECTION_UPDATE
from assets.faces import faces
from assets.resources import LineupSettings
from assets.ui import pictures, table_metadata
from pipeline.catalog import refresh_catalog
from pipeline.identity.store import read_ivf_index, write_ivf_index
from pipeline.storage import read_parquet, write_parquet_atomic


@dg.asset(
    group_name="identity",
    kinds={"parquet", "faiss"},
    deps=[faces, "removals"],
    automation_condition=COLLECTION_UPDATE,
    check_specs=[dg.AssetCheckSpec(
        "clustering_vs_folder_labels", asset="identities",
        description="Pairwise/BCubed F and NMI of the clusters against folder-name labels of single-face photos, "
        "where folders are one person each: a folder counts only when its parent holds two or more folders of "
        "single-face photos (people/<name>/photo.jpg); a lone folder of photos is not a person. A warning below "
        "BCubed F 0.9.")],
    description="Every face gets an identity_id: a FAISS kNN graph over all embeddings, training-free "
    "graph clustering, ids kept stable across refreshes by overlap with the previous assignment.",
)
def identities(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.collection import load_collection
    from pipeline.datasets import fingerprint_table
    from pipeline.faces import embeddings_of
    from pipeline.faces.crops import CropReader
    from pipeline.identity import build_identities
    from pipeline.identity.local_recluster import LOCAL_RECLUSTER_MAX_FACES
    from pipeline.identity.report import evaluate_against_labels, folder_labels, identity_figures

    layout = lineup.layout
    coll = load_collection(layout)
    fcs = coll.faces
    prev_path = layout.table_file("identities")
    previous = read_parquet(prev_path) if prev_path.exists() else None
    index = read_ivf_index(layout) if previous is not None else None
    backend_name = fcs.column("backend")[0].as_py() if fcs.num_rows else lineup.face_backend
    mode = lineup.identity_mode if previous is not None else "recluster"
    context.log.info(f"clustering {fcs.num_rows} faces ({backend_name}) with {lineup.identity_method}, mode {mode}")
    res = build_identities(
        fcs.column("uid").to_pylist(),
        np.asarray(fcs.column("face_index").to_pylist(), dtype=np.int64),
        embeddings_of(fcs),
        previous=previous,
        method=lineup.identity_method,
        threshold=lineup.identity_threshold or None,
        backend_name=backend_name,
        knn_backend=lineup.knn_backend,
        mode=mode,
        index=index,
        local_recluster=lineup.identity_local_recluster,
        local_recluster_max_faces=lineup.identity_local_recluster_max_faces or LOCAL_RECLUSTER_MAX_FACES,
        knn_adaptive=(lineup.knn_probe_patience or True) if lineup.knn_adaptive_probing else False,
    )
    write_ivf_index(layout, res.index)  # before the table: a table never names cells that are not on disk
    write_parquet_atomic(res.assignments, prev_path)
    write_parquet_atomic(res.summary, layout.table_file("identity_summary"))
    refresh_catalog(layout)
    st = res.stats
    quality = evaluate_against_labels(res.assignments, folder_labels(fcs, coll.images)) if fcs.num_rows else None
    figs = identity_figures(res, CropReader(coll.images, fcs, lineup.limits)) if fcs.num_rows else {}
    churn = st.get("churn") or {}
    fingerprint = fingerprint_table(res.assignments, ["uid", "face_index", "identity_id"], ["uid", "face_index"])
    return dg.MaterializeResult(
        metadata={
            "faces": st["n_faces"],
            "identities": st["n_identities"],
            "empty_because": coll.empty_reason or "",
            "singletons": st["n_singletons"],
            "largest_identity": st["largest_identity"],
            # low for a giant merged identity (many people chained together); NaN for a singleton
            "largest_identity_mean_similarity": float(st.get("largest_identity_mean_similarity") or float("nan")),
            "incoherent_split": dg.MetadataValue.json(_jsonable({"rounds": st.get("incoherent_split", [])})),
            "method": st["method"],
            "threshold": float(st["threshold"]),
            "knn_backend": str(st["knn_backend"]),
            "knn_params": dg.MetadataValue.json(_jsonable(st.get("knn_params", {}))),
            "mode": mode if previous is not None else "recluster (first build)",
            "churn": dg.MetadataValue.json(churn),
            # incremental refresh: what the local recluster took, merged, and left to the nightly run
            "local_recluster": dg.MetadataValue.json(_jsonable(st.get("local_recluster") or {"status": "n/a"})),
            "collection": dg.MetadataValue.json(coll.coverage()),
            "timings_s": dg.MetadataValue.json({k: round(float(v), 3) for k, v in st.get("timings", {}).items()}),
            # a count, never the faces' uids: the event log must hold nothing a removal cannot delete
            "doubtful_merges": len(st.get("doubtful_merges", [])),
            **pictures(layout.home, "identities", figs, shows_uids=fcs.column("uid").to_pylist()),
            **table_metadata(res.assignments, prev_path),
        },
        data_version=dg.DataVersion(fingerprint),
        check_results=[
            dg.AssetCheckResult(
                check_name="clustering_vs_folder_labels",
                passed=True if quality is None else quality["bcubed_f"] >= 0.9,
                severity=dg.AssetCheckSeverity.WARN,
                description="no person folders in this collection (people/<name>/photo.jpg, two or more names)"
                if quality is None else
                "pairwise/BCubed F and NMI against person-folder labels of single-face images (warns below BCubed F 0.9)",
                metadata={k: float(v) for k, v in (quality or {}).items()},
            )
        ],
    )


def _jsonable(d: dict) -> dict:
    """knn parameters for the UI: numbers and strings only (round timings)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, str)) or v is None:
            out[k] = v
        elif isinstance(v, float) or hasattr(v, "item"):
            out[k] = round(float(v), 4)
    return out
