"""Ingestion: the images asset per input partition, its check, the sensor for new inputs, the ingest job."""


import dagster as dg

from assets.common import GPU_POOL, engine_metadata, engine_runner
from assets.partitions import check_partitions, input_partitions
from assets.resources import NO_INPUT, LineupSettings
from pipeline.catalog import refresh_catalog
from pipeline.engine import engine_name
from pipeline.ingest import ray_ingest_runner, run_ingest_stage
from pipeline.removals import removed_uids
from pipeline.sources import load_registry, plan_new_partitions, register_partitions


def images_pool(fused_per_image: bool, face_device: str, gpu_pool: str | None = GPU_POOL,
                engine: str = "") -> str | None:
    """The images asset's concurrency pool: the GPU's only when the asset runs models on it. That is the
    fused pass (``fused_per_image``): with the face models on the GPU (``auto`` on a GPU machine) it runs
    them there (the device-fused pass, pipeline/per_image.py DeviceStream), and with them held off the GPU
    (``face_device=cpu``) its expression and image-scoring models take the GPU. Not fused (off, or the face
    models on the GPU under the Ray engine: :func:`fused_off_reason`), the asset only reads and checks files,
    and a GPU slot held for that would keep the faces asset, the one that uses the GPU, waiting."""
    if gpu_pool is None or not fused_per_image:
        return None
    face_on_gpu = face_device in ("", "auto") or face_device.startswith("cuda")  # auto: CUDA here, gpu_pool says
    return None if face_on_gpu and engine_name(engine) == "ray" else gpu_pool


# decided when the definitions load, from the settings' defaults (LINEUP_FUSED_PER_IMAGE, LINEUP_FACE_DEVICE,
# LINEUP_ENGINE): a run whose settings would use the GPU without this slot leaves the faces to the faces asset
_DEFAULTS = LineupSettings()
IMAGES_POOL = images_pool(_DEFAULTS.fused_per_image, _DEFAULTS.face_device, engine=_DEFAULTS.engine)


@dg.asset(
    partitions_def=input_partitions,
    group_name="ingest",
    pool=IMAGES_POOL,  # the GPU's only when the fused pass will run models on it
    kinds={"parquet"},
    check_specs=[dg.AssetCheckSpec(
        "counts_reconcile", asset="images", blocking=True, **check_partitions(),
        description="The partition's source listed again (files, manifest rows, tar members) = image rows + "
        "reject rows read back from the files written.")],
    description="Accepted images of one input partition: stable content uid, source, locator, size. "
    "Everything not accepted goes to rejects (stage=ingest) with a reason. With fused_per_image (default) each "
    "photo is read and decoded once here and the faces, expressions and image scores are computed on it, "
    "for those assets to take once this asset's check passed (pipeline/per_image.py).",
)
def images(context: dg.AssetExecutionContext, lineup: LineupSettings):
    layout = lineup.layout
    key = context.partition_key
    context.log.info(f"{key}: reading the partition's inputs")
    progress = lambda n: context.log.info(f"{key}: {n} inputs read")
    fused = {}
    fused_off = fused_off_reason(lineup) if lineup.fused_per_image else "fused_per_image is off"
    if fused_off is None:
        spec, fused_res, unit = run_fused_stage(context, lineup, key, progress)
        res = fused_res.ingest
        fused = {"fused_per_image": True, "photos_decoded": fused_res.stats["photos_decoded"],
                 # device: read once, decoded once by the face backend's decoder in its batches (DeviceStream)
                 "fused_pass": "device" if fused_res.stats.get("device_fused") else "cpu",
                 **({"photos_decoded_by": dg.MetadataValue.json(fused_res.stats["photos_decoded_by"])}
                    if "photos_decoded_by" in fused_res.stats else {}),
                 "fused_timings": dg.MetadataValue.json({k: round(float(v), 3)
                                                         for k, v in fused_res.stats["timings"].items()}),
                 "precomputed": dg.MetadataValue.json(["faces", *(["face_expressions"] if fused_res.expressions
                                                                  else []), "image_scores"] if unit.passed else [])}
        runner = fused_res.stats.get("runner")
    else:
        if lineup.fused_per_image:
            context.log.info(f"{key}: no fused pass: {fused_off}")
        fused = {"fused_per_image": False, "fused_off_reason": fused_off}
        runner = engine_runner(lineup, lambda: ray_ingest_runner(lineup.ray_actors))
        spec, res, unit = run_ingest_stage(layout, key, lineup.limits, removed=removed_uids(layout),
                                           workers=lineup.workers, chunk_runner=runner, progress=progress)
    refresh_catalog(layout)
    reasons = res.rejects.counts_by_reason()
    yield dg.MaterializeResult(
        metadata={
            "inputs": res.inputs,
            "accepted": res.accepted,
            "rejected": len(res.rejects),
            "duplicates": res.duplicates,
            "reject_reasons": dg.MetadataValue.json(reasons),
            "seconds": round(res.seconds, 3),
            "inputs_per_s": round(res.stats["images_per_s"], 1),
            "orientation_fallbacks": res.stats.get("orientation_fallbacks", 0),
            "kind": spec.kind,
            **engine_metadata(lineup, runner),
            **fused,
            # a link, never the rejected inputs' names: file names often name people, and a removal can
            # rewrite the table but not the event log
            "rejects": dg.MetadataValue.path(str(layout.partition_file("rejects_ingest", key))),
            "path": dg.MetadataValue.path(str(layout.partition_file("images", key))),
        },
        check_results=[
            dg.AssetCheckResult(check_name=name, passed=ok, description=why, metadata=unit.files.get("images", {}))
            for name, (ok, why) in unit.checks.items()
        ],
    )


def fused_off_reason(lineup: LineupSettings, gpu_pool: str | None = GPU_POOL,
                     pool: str | None = IMAGES_POOL) -> str | None:
    """Why the images asset leaves the faces to the faces asset (None: it runs the fused pass). A backend
    that decodes on its own device in large batches (the torch stage; any face backend on a GPU) gets the
    device-fused pass in this process (pipeline/per_image.py DeviceStream, run by the face stage's own
    analyze_chunks, which bench/gpu_check.sh times): one stream in the face stage's batches, which the Ray
    engine's chunks spread over actors would not keep, so under Ray the faces asset reads and decodes the
    photos again. On a GPU machine (``gpu_pool``) the fused pass also needs the asset to hold the GPU slot
    (``pool``, :func:`images_pool` of the defaults), since its models run on the GPU: a run whose settings
    differ from the defaults the asset was defined with does not use the GPU outside the pool."""
    from assets.faces import face_backend
    from pipeline.faces.stage import decodes_ahead

    backend = face_backend(lineup)
    if decodes_ahead(backend) and lineup.engine_name == "ray":
        return (f"the face backend {backend.name!r} decodes on its device in the face stage's batches, one stream "
                "in one process; under the Ray engine the faces asset reads and decodes the photos itself")
    if gpu_pool is not None and pool != gpu_pool:
        return (f"the images asset holds no slot of the {gpu_pool!r} pool (defined for face_device="
                f"{_DEFAULTS.face_device!r}, LINEUP_FACE_DEVICE, and engine {_DEFAULTS.engine!r}), and the fused "
                "pass's models would run on the GPU")
    return None


_FUSED_MODELS: dict = {}  # the fused pass's models, kept for the life of the process like the face backends


def fused_models(lineup: LineupSettings):
    """``(PerImageModels, expression stage or None, scoring config)`` for the settings: the face backend
    the faces asset uses, the expression stage when its weights are there, the scorers of the scores asset."""
    from assets.faces import face_backend
    from assets.scoring import scoring_config
    from pipeline.expression.descriptor import ExpressionConfig, ExpressionModelUnavailable, ExpressionStage
    from pipeline.per_image import PerImageModels
    from pipeline.scoring.stage import scorer_fingerprint

    backend = face_backend(lineup)
    expression_config = ExpressionConfig(fer_weights=lineup.path_setting(lineup.fer_weights, "LINEUP_FER_WEIGHTS"))
    scoring = scoring_config(lineup)
    key = (id(backend), expression_config, scorer_fingerprint(scoring))
    if key not in _FUSED_MODELS:
        try:
            expression = ExpressionStage(expression_config)
        except ExpressionModelUnavailable:
            expression = None  # face_expressions fails with the reason itself; the fused pass leaves it out
        models = PerImageModels(backend, expression_config if expression else None, scoring,
                                landmarker=expression.landmarker if expression else None)
        _FUSED_MODELS.clear()
        _FUSED_MODELS[key] = (models, expression, scoring)
    return _FUSED_MODELS[key]


def run_fused_stage(context, lineup: LineupSettings, key: str, progress):
    """The images asset's fused pass (pipeline/per_image.py): the images unit committed, and the faces,
    expressions and image scores precomputed for their assets when it passed."""
    from pipeline.faces.stage import decodes_ahead
    from pipeline.per_image import ray_fused_runner, run_per_image_stage, worker_factory

    models, expression, scoring = fused_models(lineup)
    backend = models.backend
    context.log.info(f"{key}: one pass over the photos: ingestion, faces ({backend!r}), "
                     f"{'expressions, ' if expression else ''}image scores")
    runner = engine_runner(lineup, lambda: ray_fused_runner(backend, models.expression_config, scoring,
                                                            lineup.ray_actors))
    # a backend that decodes on its device runs in this process (as the face stage's does: one stream in its
    # batches, fused_off_reason keeps it off Ray); else workers rebuild the models
    on_device = decodes_ahead(backend)
    factory = None if on_device or not hasattr(backend, "build_spec") else \
        worker_factory(backend, models.expression_config, scoring)
    spec_, res, unit = run_per_image_stage(
        lineup.layout, key, models, lineup.limits, removed=removed_uids(lineup.layout),
        face_batch_size=lineup.face_batch_size, workers=1 if on_device else lineup.workers, expression_stage=expression,
        chunk_runner=runner, factory=factory, progress=progress)
    res.stats["runner"] = runner
    return spec_, res, unit


ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets("images", "faces", "face_expressions"),
    description="Ingest one input partition, then its faces and their expressions.",
)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers new shards / files under the input location (LINEUP_INPUT) as input partitions and "
    "requests an ingest_job run for each. Off by default: turn it on in Automation.",
)
def new_inputs_sensor(context: dg.SensorEvaluationContext, lineup: LineupSettings):
    """Registers new shards / files under the input location as partitions and requests their runs.

    Idempotent: the registry is written first, then every registered partition that the instance does
    not know yet (new now, or left over by a tick that failed after writing the registry) is added
    and requested; run keys make each request happen once."""
    layout = lineup.layout
    if lineup.input_location is None:
        return dg.SkipReason(NO_INPUT)
    try:
        new = plan_new_partitions(lineup.input_path, layout.partitions, lineup.batch_size)
    except FileNotFoundError as e:
        return dg.SkipReason(str(e))
    register_partitions(layout.partitions, new)
    known = set(context.instance.get_dynamic_partitions(input_partitions.name))
    keys = [s.key for s in load_registry(layout.partitions) if s.key not in known]
    if not keys:
        return dg.SkipReason("no new inputs")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=f"ingest-{k}") for k in keys],
        dynamic_partitions_requests=[input_partitions.build_add_request(keys)],
    )
