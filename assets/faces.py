"""Faces: the per-partition face stage asset and its checks."""

import dagster as dg
import numpy as np

from assets.common import GPU_POOL, engine_metadata, engine_runner
from assets.ingest import images
from assets.partitions import check_partitions, input_partitions
from assets.resources import LineupSettings
from assets.ui import pictures, table_metadata
from pipeline.catalog import refresh_catalog
from pipeline.faces.report import face_figures
from pipeline.faces.stage import face_checks, ray_chunk_runner, reconcile_faces, run_face_partition
from pipeline.storage import read_parquet, write_parquet_atomic

_BACKENDS: dict = {}  # loaded face models, kept for the life of the process


def face_backend(settings: LineupSettings):
    from pipeline.faces import get_backend

    key = (settings.face_backend, tuple(sorted(settings.face_backend_options().items())))
    if key not in _BACKENDS:
        _BACKENDS[key] = get_backend(settings.face_backend, **settings.face_backend_options())
    return _BACKENDS[key]


@dg.asset(
    partitions_def=input_partitions,
    group_name="ingest",
    pool=GPU_POOL,
    kinds={"parquet"},
    deps=[images],
    check_specs=[
        dg.AssetCheckSpec("embeddings_unit_norm", asset="faces", blocking=True, **check_partitions(),
                          description="Every embedding is finite and has unit L2 norm."),
        dg.AssetCheckSpec("bbox_inside_image", asset="faces", blocking=True, **check_partitions(),
                          description="Every face box lies inside its image (1 px tolerance)."),
        dg.AssetCheckSpec("counts_reconcile", asset="faces", blocking=True, **check_partitions(),
                          description="Read back: every image row is scanned or rejected, and each image has as many "
                          "face rows as its scan says."),
    ],
    description="Every face in the partition's images: box, 5 landmarks, detector score, quality, "
    "L2-normalised identity embedding, backend and model version.",
)
def faces(context: dg.AssetExecutionContext, lineup: LineupSettings):
    layout = lineup.layout
    key = context.partition_key
    imgs = read_parquet(layout.partition_file("images", key))
    backend = face_backend(lineup)
    context.log.info(f"{key}: {imgs.num_rows} images, backend {backend!r}")
    runner = engine_runner(lineup, lambda: ray_chunk_runner(backend, lineup.workers))
    res = run_face_partition(
        imgs, backend, key, lineup.limits, lineup.face_batch_size,
        progress=lambda i, n: context.log.info(f"{key}: faces {i}/{n} images"), workers=lineup.workers,
        chunk_runner=runner,
    )
    write_parquet_atomic(res.faces, layout.partition_file("faces", key))
    write_parquet_atomic(res.scan, layout.partition_file("face_scan", key))
    write_parquet_atomic(res.rejects.to_table(), layout.partition_file("rejects_faces", key))
    refresh_catalog(layout)
    reconcile = reconcile_faces(layout.partition_file("images", key), layout.partition_file("faces", key),
                                layout.partition_file("face_scan", key), layout.partition_file("rejects_faces", key))
    checks = face_checks(res.faces, imgs)
    figs = face_figures(res.faces, imgs, lineup.limits)
    n = res.faces.num_rows
    det = np.asarray(res.faces.column("det_score").to_pylist()) if n else np.zeros(0)
    yield dg.MaterializeResult(
        metadata={
            **table_metadata(res.faces, layout.partition_file("faces", key)),  # first: what the UI shows on top
            **pictures(layout.home, f"faces/{key}", figs, shows_uids=res.faces.column("uid").to_pylist()),
            "images": res.images_in,
            "faces": n,
            "images_with_faces": res.images_with_faces,
            "images_without_faces": res.images_without_faces,
            "rejected": len(res.rejects),
            "backend": backend.name,
            "model_version": backend.model_version,
            "seconds": round(res.seconds, 2),
            **engine_metadata(lineup, runner),
            "images_per_s": round(res.images_in / res.seconds, 2) if res.seconds else 0.0,
            "faces_per_s": round(n / res.seconds, 2) if res.seconds else 0.0,
            "median_det_score": round(float(np.median(det)), 3) if n else 0.0,
            "timings": dg.MetadataValue.json({k: round(float(v), 3) for k, v in res.timings.items()}),
        },
        check_results=[
            *[
                dg.AssetCheckResult(check_name=name, passed=ok, description=why)
                for name, (ok, why) in checks.items()
            ],
            dg.AssetCheckResult(
                check_name="counts_reconcile",
                passed=reconcile.pop("passed"),
                description="image rows = scanned + rejected, and face rows per image = its scan's count (read back)",
                metadata={k: dg.MetadataValue.json(v) if isinstance(v, list) else v for k, v in reconcile.items()},
            ),
        ],
    )
