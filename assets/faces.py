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
from pipeline.faces.stage import ray_chunk_runner, run_face_stage
from pipeline.faces.stage_identity import pin_collection_stage
from pipeline.per_image import take_face_stage

_BACKENDS: dict = {}  # loaded face models, kept for the life of the process


def face_backend(settings: LineupSettings):
    from pipeline.faces import get_backend

    key = (settings.face_backend, tuple(sorted(settings.face_backend_options().items())))
    if key not in _BACKENDS:
        _BACKENDS[key] = get_backend(settings.face_backend, **settings.face_backend_options())
    return _BACKENDS[key]


FACE_CHECKS = {
    "counts_reconcile": "Read back from the staged files: the image rows written by ingestion = the images the "
    "backend analysed (face_scan) + the images it could not decode (rejects_faces); each image has as many rows "
    "in the faces file as the backend returned faces for it.",
    "embeddings_unit_norm": "Read back from the staged faces file: every stored embedding is finite with unit L2 norm.",
    "bbox_inside_image": "Read back from the staged faces file: every stored box lies inside its image as measured "
    "at ingestion (1 px tolerance).",
}


@dg.asset(
    partitions_def=input_partitions,
    group_name="ingest",
    pool=GPU_POOL,
    kinds={"parquet"},
    deps=[images],
    check_specs=[dg.AssetCheckSpec(n, asset="faces", blocking=True, description=d, **check_partitions())
                 for n, d in FACE_CHECKS.items()],
    description="Every face in the partition's images: box, 5 landmarks, detector score, quality, "
    "L2-normalised identity embedding, backend and model version. Committed as one unit with face_scan and "
    "rejects_faces, only when the blocking checks pass (pipeline/commits.py).",
)
def faces(context: dg.AssetExecutionContext, lineup: LineupSettings):
    layout = lineup.layout
    key = context.partition_key
    backend = face_backend(lineup)
    pin_collection_stage(layout.root, backend.face_stage)  # refused if the collection was built by another stage
    context.log.info(f"{key}: backend {backend!r}")
    runner = None
    stage = take_face_stage(layout, key, backend)  # computed by the fused pass of this run's ingestion
    if stage is not None:
        context.log.info(f"{key}: faces computed by the fused pass of its ingestion (no photo decoded again)")
    else:
        runner = engine_runner(lineup, lambda: ray_chunk_runner(backend, lineup.ray_actors))
        stage = run_face_stage(
            layout, key, backend, lineup.limits, lineup.face_batch_size,
            progress=lambda i, n: context.log.info(f"{key}: faces {i}/{n} images"), workers=lineup.workers,
            chunk_runner=runner,
        )
    refresh_catalog(layout)
    res, unit = stage.partition, stage.unit
    if not unit.passed:
        context.log.error(f"{key}: face unit not committed, kept in {unit.staging}: {'; '.join(unit.reasons)}")
    figs = face_figures(res.faces, stage.images, lineup.limits)
    n = res.faces.num_rows
    det = np.asarray(res.faces.column("det_score").to_pylist()) if n else np.zeros(0)
    yield dg.MaterializeResult(
        metadata={
            # first: what the UI shows on top (the file is there only once the unit is committed)
            **table_metadata(res.faces, layout.partition_file("faces", key) if unit.passed else None),
            **pictures(layout.home, f"faces/{key}", figs, shows_uids=res.faces.column("uid").to_pylist()),
            "images": res.images_in,
            "faces": n,
            "images_with_faces": res.images_with_faces,
            "images_without_faces": res.images_without_faces,
            "rejected": len(res.rejects),
            "committed": unit.passed,
            "from_fused_pass": stage.partition.timings.get("precomputed", 0.0) == 1.0,
            "backend": backend.name,
            "model_version": backend.model_version,
            "seconds": round(res.seconds, 2),
            **engine_metadata(lineup, runner),
            "images_per_s": round(res.images_in / res.seconds, 2) if res.seconds else 0.0,
            "faces_per_s": round(n / res.seconds, 2) if res.seconds else 0.0,
            "median_det_score": round(float(np.median(det)), 3) if n else 0.0,
            "timings": dg.MetadataValue.json({k: round(float(v), 3) for k, v in res.timings.items()}),
            "files": dg.MetadataValue.json(unit.files),
        },
        check_results=[
            dg.AssetCheckResult(check_name=name, passed=ok, description=why)
            for name, (ok, why) in unit.checks.items()
        ],
    )
