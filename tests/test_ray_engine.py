"""The Ray engine writes what the in-process engine writes: each per-image stage on the same input, both
ways, tables compared for equality. Skipped without Ray (pip install -e '.[ray]')."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_tiny_clip
from PIL import Image

pytest.importorskip("ray")

from pipeline.ingest import ingest_partition, ray_ingest_runner
from pipeline.ray_engine import RayStageError, run_chunks
from pipeline.sources import PartitionSpec


@pytest.fixture(scope="module")
def ray_local():
    from pipeline.ray_engine import ensure_ray, shutdown

    yield ensure_ray()
    shutdown()


@pytest.fixture(scope="module")
def faces_images(shared_faces):
    ids = sorted((shared_faces / "identities").rglob("*.jpg"))[:7]
    groups = sorted((shared_faces / "groups").glob("*.jpg"))[:3]
    members = tuple(str(p.relative_to(shared_faces)) for p in [*ids, *groups])
    res = ingest_partition(PartitionSpec(key="t", kind="files", root=str(shared_faces), members=members))
    assert res.accepted == len(members)
    return res.images


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_ingest_same_on_ray(tmp_path: Path, ray_local):
    names = []
    for i in range(70):  # three chunks of 32
        (tmp_path / f"img{i:03d}.jpg").write_bytes(_jpeg(i % 60))  # ten byte-identical copies
        names.append(f"img{i:03d}.jpg")
    (tmp_path / "broken.jpg").write_bytes(_jpeg(1)[:300])
    (tmp_path / "notes.bin").write_bytes(b"x")
    spec = PartitionSpec(key="p", kind="files", root=str(tmp_path), members=(*names, "broken.jpg", "notes.bin"))
    local = ingest_partition(spec)
    runner = ray_ingest_runner(tasks=2)
    on_ray = ingest_partition(spec, chunk_runner=runner)
    assert local.images.num_rows == 60 and local.duplicates == 10
    assert on_ray.images.equals(local.images)
    assert on_ray.rejects.rows == local.rejects.rows
    assert runner.stats.tasks == 3 and runner.stats.failures == []


def test_faces_same_on_ray(faces_images, ray_local):
    from pipeline.faces import get_backend
    from pipeline.faces.stage import ray_chunk_runner, run_face_partition

    backend = get_backend("dlib", device="cpu")
    local = run_face_partition(faces_images, backend, "t", batch_size=4)
    runner = ray_chunk_runner(backend, actors=2)
    on_ray = run_face_partition(faces_images, backend, "t", batch_size=4, chunk_runner=runner)
    assert local.faces.num_rows >= 10
    assert on_ray.faces.equals(local.faces)
    assert on_ray.scan.equals(local.scan)
    meta = runner.stats.metadata()
    assert meta["ray_actors"] == 2 and meta["ray_chunks"] == 3 and meta["ray_failures"] == 0


def test_expressions_same_on_ray(faces_images, ray_local):
    from pipeline.expression.descriptor import (
        ExpressionConfig,
        ExpressionStage,
        describe_partition,
        ray_expression_runner,
    )
    from pipeline.faces import get_backend
    from pipeline.faces.stage import run_face_partition

    faces = run_face_partition(faces_images, get_backend("dlib", device="cpu"), "t").faces
    cfg = ExpressionConfig(device="cpu")
    stage = ExpressionStage(cfg)
    local = describe_partition(faces_images, faces, stage, chunk_size=4)
    on_ray = describe_partition(faces_images, faces, stage, chunk_size=4, chunk_runner=ray_expression_runner(cfg, 2))
    assert local.descriptors.num_rows == faces.num_rows
    assert on_ray.descriptors.equals(local.descriptors)
    assert on_ray.rejects.equals(local.rejects)


def test_scores_same_on_ray(faces_images, ray_local, tmp_path):
    from pipeline.scoring.clip import ClipConfig
    from pipeline.scoring.stage import ImageScorerStage, ScoringConfig, ray_score_runner, score_partition

    cfg_file = tmp_path / "lineup-tiny-clip-ray.json"
    name = write_tiny_clip(cfg_file, tmp_path / "clip.pt")
    rows = faces_images.to_pylist()
    for i, r in enumerate(rows):
        r["caption"] = f"a photo number {i}" if i % 3 else None
    images = pa.Table.from_pylist(rows, schema=faces_images.schema)
    cfg = ScoringConfig(clip=ClipConfig(model_name=name, pretrained=str(tmp_path / "clip.pt"),
                                        model_config=str(cfg_file), device="cpu", batch_size=2), chunk=4)
    stage = ImageScorerStage(cfg)
    local, report = score_partition(images, stage)
    on_ray, _ = score_partition(images, stage, chunk_runner=ray_score_runner(cfg, 2))
    assert "clip" in report["available"] and local.column("clip_score").null_count == images.num_rows // 3 + 1
    assert on_ray.equals(local)


def test_failed_chunks_are_named(ray_local):
    with pytest.raises(RayStageError) as err:
        run_chunks("demo", [1, 2, 3], decode=None, analyze=lambda model, c: 1 // (c - 2), factory=lambda: None,
                   actors=2, items_of=lambda c: 1)
    assert [f.split(":")[0] for f in err.value.stats.failures] == ["chunk 1"]
    assert "ZeroDivisionError" in err.value.stats.failures[0]


def test_assets_on_ray_write_the_same_tables(tmp_path, shared_faces, ray_local):
    """images, faces and face_expressions materialized with engine=ray and in-process: the same Parquet rows,
    and the Ray runs' metadata says what Ray did."""
    import shutil

    import dagster as dg
    import pyarrow.parquet as pq

    from assets.expression import face_expressions
    from assets.faces import faces
    from assets.ingest import images
    from assets.partitions import input_partitions
    from assets.resources import LineupSettings
    from pipeline.config import Layout
    from pipeline.sources import register_new_inputs

    inp = tmp_path / "input"
    inp.mkdir()
    for p in sorted((shared_faces / "identities" / "angelina_jolie").iterdir())[:3]:
        shutil.copy(p, inp / p.name)  # a temporary copy outside the repo
    shutil.copy(shared_faces / "groups" / "face-api.js__bbt1.jpg", inp / "group.jpg")
    (inp / "broken.jpg").write_bytes(b"not a jpeg")
    tables = {}
    # the stages separately on each engine, and fused (pipeline/per_image.py) on Ray
    for engine, fused in (("inprocess", False), ("ray", False), ("ray", True)):
        home = tmp_path / f"{engine}-{fused}"
        (spec,) = register_new_inputs(inp, Layout(home).partitions, batch_size=100)
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(input_partitions.name, [spec.key])
        settings = LineupSettings(home=str(home), input_dir=str(inp), engine=engine, face_batch_size=2,
                                  fused_per_image=fused)
        result = dg.materialize([images, faces, face_expressions], partition_key=spec.key, instance=instance,
                                resources={"lineup": settings})
        assert result.success
        mats = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
        meta = {m.asset_key.path[-1]: m.metadata for m in mats}
        assert meta["faces"]["from_fused_pass"].value == fused
        if fused:  # one Ray job read and decoded every photo once for all three assets
            assert meta["images"]["engine"].value == "ray" and meta["images"]["ray_stage"].value == "per_image"
            assert meta["images"]["ray_failures"].value == 0 and meta["images"]["photos_decoded"].value == 5
            assert meta["face_expressions"]["from_fused_pass"].value
        else:
            assert meta["faces"]["engine"].value == engine
        if engine == "ray" and not fused:
            assert meta["faces"]["ray_actors"].value >= 1 and meta["faces"]["ray_failures"].value == 0
            assert meta["faces"]["ray_chunks"].value == 2  # 4 accepted images in chunks of 2
        tables[engine, fused] = {t: pq.read_table(Layout(home).partition_file(t, spec.key))
                                 for t in ("images", "faces", "face_scan", "face_expressions", "rejects_ingest")}
    for name, table in tables["inprocess", False].items():
        assert table.num_rows > 0, name
        assert tables["ray", False][name].equals(table), name
        assert tables["ray", True][name].equals(table), name


def test_pool_sized_from_the_cluster_not_the_request():
    from pipeline.ray_engine import plan_pool

    two = plan_pool({"CPU": 2.0}, requested=32)  # the ConfigMap's 32 on a 2-CPU cluster
    assert (two.actors, two.cpus_per_actor, two.gpus_per_actor) == (2, 1.0, 0.0)
    assert plan_pool({"CPU": 2.0}, requested=0).actors == 2
    assert plan_pool({"CPU": 64.0}, requested=3).actors == 3
    assert plan_pool({"CPU": 64.0}, requested=0, chunks=5).actors == 5
    gpu = plan_pool({"CPU": 16.0, "GPU": 4.0}, requested=0, chunks=100)
    assert (gpu.actors, gpu.gpus_per_actor, gpu.cpus_per_actor, gpu.chunks_per_call) == (4, 1.0, 2.0, 4)
    tiny = plan_pool({"CPU": 0.5})
    assert (tiny.actors, tiny.cpus_per_actor) == (1, 0.5)
    with pytest.raises(RuntimeError, match="no CPU"):
        plan_pool({"GPU": 0.0})


def test_full_cluster_fails_with_a_clear_message(ray_local, monkeypatch):
    """Every CPU held by another job's actor: the stage's pool cannot start, and the stage says so in
    LINEUP_RAY_START_TIMEOUT seconds instead of waiting for ever."""
    import ray

    from pipeline.ray_engine import RayStartTimeout, release_pools

    release_pools()  # the earlier tests' idle actors
    @ray.remote
    class Hog:
        def ready(self):
            return True

    hog = Hog.options(num_cpus=ray_local["CPU"]).remote()
    ray.get(hog.ready.remote(), timeout=60)
    monkeypatch.setenv("LINEUP_RAY_START_TIMEOUT", "3")
    t0 = __import__("time").monotonic()
    try:
        with pytest.raises(RayStartTimeout, match="started within 3 s"):
            run_chunks("demo", [1, 2], decode=None, analyze=lambda model, c: c, factory=dict, items_of=lambda c: 1)
    finally:
        ray.kill(hog)
    assert __import__("time").monotonic() - t0 < 30
    # the CPUs back: the same stage runs
    monkeypatch.setenv("LINEUP_RAY_START_TIMEOUT", "120")
    results, stats = run_chunks("demo", [1, 2], decode=None, analyze=lambda model, c: c * 10, factory=dict,
                                items_of=lambda c: 1)
    assert results == [10, 20] and stats.actors >= 1


def _dies_once(marker: str):
    """analyze(model, chunk): the first call anywhere kills its actor's process (as a node lost mid-call
    would); every other call returns chunk x 10. (Built here, so Ray pickles it by value.)"""

    def analyze(model, chunk):
        import os

        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return chunk * 10
        os.close(fd)
        os._exit(1)

    return analyze


def test_actors_lost_before_they_are_up_or_mid_call_are_replaced(ray_local, tmp_path):
    """An actor killed while its model builds (its node died before it came up) is replaced, not taken for
    a model that failed to build; an actor that dies with a call in flight loses the call to another actor.
    Both jobs give every chunk's result, and the stats count the actors lost."""
    import ray

    from pipeline.ray_engine import _get_pool, ensure_ray, plan_pool, release_pools

    def slow_model(seconds):  # a model that takes a while to build, so its actor can be lost before it is up
        import time

        time.sleep(seconds)
        return "model"

    release_pools()
    plan = plan_pool(ensure_ray(), 2, None)
    pool, _ = _get_pool(slow_model, (2.0,), {}, plan)
    ray.kill(next(iter(pool.pending.values())))  # lost while its model builds
    results, stats = run_chunks("slow", list(range(6)), decode=None, analyze=lambda model, c: c * 10,
                                factory=slow_model, factory_args=(2.0,), actors=2, items_of=lambda c: 1)
    assert results == [c * 10 for c in range(6)]
    assert stats.pool_reused and stats.actors_lost == 1 and stats.failures == []

    marker = str(tmp_path / "died")
    results, stats = run_chunks("slow", list(range(6)), decode=None, analyze=_dies_once(marker),
                                factory=slow_model, factory_args=(2.0,), actors=2, items_of=lambda c: 1)
    assert Path(marker).exists()  # an actor did die mid-call
    assert results == [c * 10 for c in range(6)]
    assert stats.actors_lost == 1 and stats.metadata()["ray_actors_lost"] == 1


def test_a_task_whose_worker_dies_is_run_again(ray_local, tmp_path):
    """Model-free stages (ingestion, the multi-identity selection) run one Ray task per chunk: a task whose
    worker process dies (its node lost) is run again by Ray, once, and the job gives every chunk's result."""
    marker = str(tmp_path / "died")
    results, stats = run_chunks("tasks", list(range(4)), decode=None, analyze=_dies_once(marker), factory=None,
                                items_of=lambda c: 1)
    assert Path(marker).exists()  # a worker did die mid-task
    assert results == [c * 10 for c in range(4)] and stats.tasks == 4 and stats.failures == []


def test_a_model_that_fails_to_build_still_fails_the_stage(ray_local):
    """Not a lost actor: the constructor's own error fails the stage, naming it (no replacement loop)."""
    from pipeline.ray_engine import release_pools

    def no_weights():
        raise FileNotFoundError("no weights here")

    release_pools()
    with pytest.raises(Exception, match="no weights here"):
        run_chunks("broken", [1, 2], decode=None, analyze=lambda model, c: c, factory=no_weights, items_of=lambda c: 1)


def test_weights_shipped_through_the_object_store(ray_local, tmp_path):
    """A model folder and a file named by local paths in a configuration reach a worker as copies of
    their bytes under the worker's temp folder, names kept; URLs and relative strings are left alone."""
    import ray

    from pipeline.ray_engine import ShippedPath, release_pools, ship_local_paths, unship_paths

    release_pools()  # idle actors of the earlier tests would hold the CPU this task needs

    (tmp_path / "pack" / "sub").mkdir(parents=True)
    (tmp_path / "pack" / "sub" / "det.onnx").write_bytes(b"detector")
    (tmp_path / "clip.pt").write_bytes(b"clip weights")
    config = {"model_dir": tmp_path / "pack", "weights": (str(tmp_path / "clip.pt"), "s3://b/k.pt", "cpu")}
    shipped = ship_local_paths(config)
    assert isinstance(shipped["model_dir"], ShippedPath) and isinstance(shipped["weights"][0], ShippedPath)
    assert shipped["weights"][1:] == ("s3://b/k.pt", "cpu")

    @ray.remote
    def read_on_worker(cfg):
        from pathlib import Path

        cfg = unship_paths(cfg)
        return (cfg["model_dir"], (Path(cfg["model_dir"]) / "sub" / "det.onnx").read_bytes(),
                cfg["weights"][0], Path(cfg["weights"][0]).read_bytes(), cfg["weights"][1:])

    model_dir, det, weights, clip, rest = ray.get(read_on_worker.remote(shipped))
    assert det == b"detector" and clip == b"clip weights" and rest == ("s3://b/k.pt", "cpu")
    assert Path(model_dir).name == "pack" and Path(weights).name == "clip.pt"
    assert not model_dir.startswith(str(tmp_path)) and not weights.startswith(str(tmp_path))


def test_changed_worker_settings_reconnect(monkeypatch):
    """The job's runtime_env is fixed when Ray is joined: a process whose store endpoint (or RAY_ADDRESS)
    changed afterwards must reconnect, or its workers read with the old settings (seen: a later run's
    workers calling a stopped S3 server)."""
    import ray

    from pipeline.ray_engine import ensure_ray, shutdown

    shutdown()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        ensure_ray(num_cpus=1)

        @ray.remote(num_cpus=0)
        def endpoint():
            import os

            return os.environ.get("AWS_ENDPOINT_URL")

        assert ray.get(endpoint.remote()) == "http://127.0.0.1:1"
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
        ensure_ray(num_cpus=1)
        assert ray.get(endpoint.remote()) == "http://127.0.0.1:2"
    finally:
        shutdown()


def test_chunks_are_sized_for_the_actors_device_not_the_drivers(monkeypatch):
    """A CPU driver (face_batch_size 8) feeding a pool whose actors have GPUs makes chunks of
    GPU_CHUNK_IMAGES, so each call gives an actor >= 256 images (GPU_CHUNKS_PER_CALL chunks); feeding CPU
    actors, or actors held off the cluster's GPUs, it keeps chunks of 8, one per call. The cluster is a
    dict: no Ray and no GPU needed."""
    import pyarrow as pa

    from pipeline import ray_engine
    from pipeline.faces.stage import GPU_CHUNK_IMAGES, ray_chunk_runner, run_face_partition

    class CpuBackend:  # the driver's backend: on CPU; actors rebuild it from build_spec
        name, embedding_dim, model_version = "fake", 8, "v0"
        build_spec = ("fake", {"device": "auto"})

    images = pa.table({"uid": [f"u{i:05d}" for i in range(2000)], "source": [f"s{i}" for i in range(2000)]})

    def chunking(cluster, **runner_options):
        monkeypatch.setattr(ray_engine, "ensure_ray", lambda num_cpus=None: cluster)
        runner, seen = ray_chunk_runner(CpuBackend(), actors=0, **runner_options), []

        def spy(chunks):  # the runner's chunks, answered without running them
            seen.extend(chunks)
            return [([], [], {}) for _ in chunks]

        spy.pool_plan = runner.pool_plan
        run_face_partition(images, CpuBackend(), "t", batch_size=8, chunk_runner=spy)
        plan = runner.pool_plan()
        calls = [sum(len(seen[i][0]) for i in call) for call in ray_engine.call_groups(len(seen), plan)]
        assert sum(calls) == images.num_rows
        return [len(rows) for rows, _ in seen], calls

    sizes, calls = chunking({"CPU": 16.0, "GPU": 4.0})
    assert set(sizes[:-1]) == {GPU_CHUNK_IMAGES} and GPU_CHUNK_IMAGES == 256
    assert min(calls) >= 256 and len(calls) == -(-len(sizes) // ray_engine.GPU_CHUNKS_PER_CALL) == 2
    for cluster, options in (({"CPU": 16.0}, {}), ({"CPU": 16.0, "GPU": 4.0}, {"gpus_per_actor": 0.0})):
        sizes, calls = chunking(cluster, **options)
        assert set(sizes) == {8} and set(calls) == {8} and len(calls) == 250

    # the assets' wrapper (assets/common.py engine_runner) hands the plan on
    from assets.common import engine_runner

    class Ray:
        engine_name = "ray"

    runner = ray_chunk_runner(CpuBackend(), actors=0)
    assert engine_runner(Ray(), lambda: runner).pool_plan is runner.pool_plan
