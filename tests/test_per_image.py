"""The fused per-image pass (pipeline/per_image.py) decodes each photo once and writes the tables the
separate stages write: ingestion, faces, expressions and image scores compared table for table on shared
photos plus a broken file and a duplicate; the precomputed units are taken only for the inputs they were
computed from, and never after a failed ingestion check."""

import shutil

import pytest

from pipeline.read_counter import ReadDecodeCounter
from pipeline.sources import PartitionSpec


@pytest.fixture(scope="module")
def photos(shared_faces, tmp_path_factory):
    """5 identity photos, a group photo, a byte-identical copy and a truncated file (copies under /tmp)."""
    root = tmp_path_factory.mktemp("photos")
    ids = sorted((shared_faces / "identities").rglob("*.jpg"))[:5]
    groups = sorted((shared_faces / "groups").glob("*.jpg"))[:1]
    names = []
    for i, p in enumerate([*ids, *groups]):
        shutil.copy(p, root / f"p{i:02d}.jpg")
        names.append(f"p{i:02d}.jpg")
    shutil.copy(ids[0], root / "z_copy.jpg")
    (root / "z_broken.jpg").write_bytes(ids[1].read_bytes()[:2000])
    return root, (*names, "z_copy.jpg", "z_broken.jpg")


@pytest.fixture(scope="module")
def models():
    from pipeline.expression.descriptor import ExpressionConfig, ExpressionStage
    from pipeline.faces import get_backend
    from pipeline.per_image import PerImageModels
    from pipeline.scoring.stage import ScoringConfig

    backend = get_backend("dlib", device="cpu")
    expression = ExpressionStage(ExpressionConfig())
    scoring = ScoringConfig()  # no weights here: the image scorers are unavailable, their columns null
    return PerImageModels(backend, expression.config, scoring, landmarker=expression.landmarker), expression


def _separate(spec, models, expression):
    from pipeline.expression.descriptor import describe_partition
    from pipeline.faces.stage import run_face_partition
    from pipeline.ingest import ingest_partition
    from pipeline.scoring.stage import score_partition

    ing = ingest_partition(spec)
    faces = run_face_partition(ing.images, models.backend, spec.key, batch_size=4)
    expr = describe_partition(ing.images, faces.faces, expression)
    scores = score_partition(ing.images, models.scorer_stage)
    return ing, faces, expr, scores


def _assert_same(fused, ing, faces, expr, scores):
    assert fused.ingest.images.equals(ing.images)
    assert fused.ingest.rejects.rows == ing.rejects.rows
    assert fused.faces.faces.equals(faces.faces)
    assert fused.faces.scan.equals(faces.scan)
    assert fused.faces.rejects.rows == faces.rejects.rows
    assert fused.expressions.descriptors.equals(expr.descriptors)
    assert fused.expressions.rejects.equals(expr.rejects)
    assert fused.image_scores[0].equals(scores[0])


def test_fused_pass_writes_the_separate_tables_and_decodes_each_photo_once(photos, models, monkeypatch):
    from pipeline.per_image import fused_partition

    root, members = photos
    spec = PartitionSpec(key="t", kind="files", root=str(root), members=members)
    model, expression = models
    counted = ReadDecodeCounter(monkeypatch.setattr)
    ing, faces, expr, scores = _separate(spec, model, expression)
    separate = (counted.reads, counted.decodes, counted.bytes)
    assert ing.accepted == 6 and ing.duplicates == 1 and len(ing.rejects) == 2
    assert faces.faces.num_rows >= 6 and expr.descriptors.num_rows == faces.faces.num_rows
    fused_count = ReadDecodeCounter(monkeypatch.setattr)
    fused = fused_partition(spec, model, face_batch_size=4, expression_stage=expression)
    _assert_same(fused, ing, faces, expr, scores)
    # 8 inputs read and decoded once each (the copy too, to find it is a duplicate; the broken one tried);
    # the separate stages read and decode the 6 accepted photos 3 more times (faces, expressions, scores)
    assert (fused_count.reads, fused_count.decodes) == (8, 8)
    assert separate[:2] == (8 + 3 * 6, 8 + 3 * 6)
    accepted_bytes = sum(ing.images.column("length").to_pylist())
    assert separate[2] == fused_count.bytes + 3 * accepted_bytes


def test_fused_pass_on_ray_equals_in_process(photos, models):
    pytest.importorskip("ray")
    from pipeline.per_image import fused_partition, ray_fused_runner
    from pipeline.ray_engine import ensure_ray, shutdown

    root, members = photos
    spec = PartitionSpec(key="t", kind="files", root=str(root), members=members)
    model, expression = models
    local = fused_partition(spec, model, face_batch_size=4, expression_stage=expression)
    ensure_ray()
    try:
        runner = ray_fused_runner(model.backend, model.expression_config, model.scorer_stage.config, actors=1)
        on_ray = fused_partition(spec, model, face_batch_size=4, expression_stage=expression, chunk_runner=runner)
    finally:
        shutdown()
    _assert_same(on_ray, local.ingest, local.faces, local.expressions, local.image_scores)
    assert runner.stats.failures == [] and runner.stats.chunks == 1


def _materialize_per_image_assets(tmp_path, root, fused: bool, **settings):
    """``images``, ``faces`` and ``face_expressions`` of one partition of ``root`` in a fresh home, with the
    fused pass on or off: its layout, spec, instance and settings, the committed tables by stage (``committed``)
    and the metadata by asset (``metas``)."""
    from types import SimpleNamespace

    import dagster as dg

    from assets.expression import face_expressions
    from assets.faces import faces
    from assets.ingest import images
    from assets.partitions import input_partitions
    from assets.resources import LineupSettings
    from pipeline.config import Layout
    from pipeline.sources import register_new_inputs

    home = tmp_path / f"home-{fused}"
    layout = Layout(home)
    (spec,) = register_new_inputs(root, layout.partitions, batch_size=100)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(input_partitions.name, [spec.key])
    lineup = LineupSettings(home=str(home), input_dir=str(root), engine_workers=1, fused_per_image=fused, **settings)
    r = dg.materialize([images, faces, face_expressions], partition_key=spec.key, instance=instance,
                       resources={"lineup": lineup})
    assert r.success
    committed = {s: _committed(layout, s, spec.key) for s in ("images", "faces", "face_expressions")}
    metas = {n: next(iter(r.asset_materializations_for_node(n))).metadata for n in ("images", "faces", "face_expressions")}
    return SimpleNamespace(layout=layout, spec=spec, instance=instance, lineup=lineup, committed=committed, metas=metas)


def _committed(layout, stage, key):
    from pipeline.commits import read_marker
    from pipeline.storage import read_parquet

    marker = read_marker(layout, stage, key)
    assert marker["status"] == "passed"
    return {name: read_parquet(layout.partition_file(name, key)) for name in marker["files"]}


def test_assets_commit_the_same_files_fused_or_not_and_a_failed_ingestion_precomputes_nothing(photos, tmp_path,
                                                                                              monkeypatch):
    import dagster as dg

    import pipeline.ingest as ingest_mod
    from assets.ingest import images
    from pipeline.per_image import PRECOMPUTED, precomputed_dir

    root, _ = photos
    committed, metas = {}, {}
    for fused in (False, True):
        run = _materialize_per_image_assets(tmp_path, root, fused)
        layout, spec, committed[fused], metas[fused] = run.layout, run.spec, run.committed, run.metas
        # what the fused pass precomputed was taken (and removed) except the image scores, which wait for `scores`
        left = [s for s in PRECOMPUTED if precomputed_dir(layout, s, spec.key).exists()]
        assert left == (["image_scores"] if fused else [])
    # row for row (a table in several chunks and the same table in one are written to different bytes)
    for stage, tables in committed[False].items():
        for name, table in tables.items():
            assert committed[True][stage][name].equals(table), (stage, name)
    assert metas[True]["faces"]["from_fused_pass"].value and metas[True]["face_expressions"]["from_fused_pass"].value
    assert not metas[False]["faces"]["from_fused_pass"].value
    assert metas[True]["images"]["photos_decoded"].value == 8

    # the images check fails: nothing is precomputed for its faces, expressions or scores
    real = ingest_mod.ingest_partition

    def lossy(*a, **k):
        res = real(*a, **k)
        res.images = res.images.slice(1)
        return res

    monkeypatch.setattr(ingest_mod, "ingest_partition", lossy)
    r = dg.materialize([images], partition_key=spec.key, instance=run.instance, resources={"lineup": run.lineup},
                       raise_on_error=False)
    assert [e.passed for e in r.get_asset_check_evaluations()] == [False]
    assert not any(precomputed_dir(layout, s, spec.key).exists() for s in PRECOMPUTED)


def test_workers_start_only_when_the_partition_is_worth_them(photos, models, monkeypatch):
    """The fused pass sizes its worker pool as ingestion does (ingest_workers: one worker per 32 MB to
    read): these 8 photos start none; with the threshold lowered the chunks go to 2 workers, same tables."""
    from pipeline import engine, ingest
    from pipeline.per_image import PerImageModels, fused_partition, worker_factory

    root, members = photos
    spec = PartitionSpec(key="t", kind="files", root=str(root), members=members)
    backend = models[0].backend
    faces_only = PerImageModels(backend)
    factory = worker_factory(backend)
    engine.shutdown_pools()
    monkeypatch.setattr(ingest, "INGEST_CHUNK", 4)  # two chunks, so a pool could take them
    small = fused_partition(spec, faces_only, face_batch_size=4, workers=2, factory=factory)
    assert not engine._POOLS and small.ingest.stats["inprocess_workers"] == 1
    monkeypatch.setattr(ingest, "INGEST_BYTES_PER_WORKER", 1_000)
    try:
        pooled = fused_partition(spec, faces_only, face_batch_size=4, workers=2, factory=factory)
        assert len(engine._POOLS) == 1 and pooled.ingest.stats["inprocess_workers"] == 2
    finally:
        engine.shutdown_pools()
    assert pooled.ingest.images.equals(small.ingest.images) and pooled.faces.faces.equals(small.faces.faces)
    assert pooled.faces.scan.equals(small.faces.scan)


def test_precomputed_image_scores_are_taken_for_the_rows_asked_even_none(tmp_path):
    """The scores asset asks for the collection's rows of a partition: a subset in another order, or none
    (every photo removed on request); other scorer settings take nothing."""
    import pyarrow as pa

    from pipeline.config import Layout
    from pipeline.per_image import image_score_inputs, put_precomputed, take_image_scores
    from pipeline.scoring.stage import IMAGE_SCORES_SCHEMA, ScoringConfig

    layout, cfg = Layout(tmp_path / "home"), ScoringConfig()
    table = pa.Table.from_pylist([{"uid": u, "clip_score": s} for u, s in (("a", 0.1), ("b", 0.2), ("c", 0.3))],
                                 schema=IMAGE_SCORES_SCHEMA)
    for wanted in (["c", "a"], []):
        put_precomputed(layout, "image_scores", "k", {"image_scores": table}, image_score_inputs(layout, "k", cfg))
        got, report = take_image_scores(layout, "k", cfg, pa.table({"uid": pa.array(wanted, pa.string())}))
        assert got.column("uid").to_pylist() == wanted and report["images"] == len(wanted)
    put_precomputed(layout, "image_scores", "k", {"image_scores": table}, image_score_inputs(layout, "k", cfg))
    assert take_image_scores(layout, "k", ScoringConfig(chunk=8, enabled=("clip",)), table) is None


def test_precomputed_units_are_not_taken_once_a_removal_rewrote_their_inputs(photos, models, tmp_path):
    """A removal request rewrites the images or faces file in place (their markers keep the sha256 they
    were committed with): what the fused pass computed before holds the removed photo, so it is not taken."""
    from pipeline.config import Layout
    from pipeline.per_image import run_per_image_stage, take_expression_stage, take_face_stage
    from pipeline.sources import register_new_inputs
    from pipeline.storage import read_parquet, write_parquet_atomic

    root, _ = photos
    model, expression = models
    layout = Layout(tmp_path / "home")
    (spec,) = register_new_inputs(root, layout.partitions, batch_size=100)
    run_per_image_stage(layout, spec.key, model, expression_stage=expression)
    assert take_face_stage(layout, spec.key, model.backend).unit.passed
    faces_file = layout.partition_file("faces", spec.key)
    write_parquet_atomic(read_parquet(faces_file).slice(1), faces_file)  # a face removed
    assert take_expression_stage(layout, spec.key, expression.config) is None
    run_per_image_stage(layout, spec.key, model, expression_stage=expression)
    images_file = layout.partition_file("images", spec.key)
    write_parquet_atomic(read_parquet(images_file).slice(1), images_file)  # a photo removed
    assert take_face_stage(layout, spec.key, model.backend) is None


@pytest.fixture(scope="module")
def device_photos(shared_faces, tmp_path_factory):
    """Photos for the device-fused pass, in an order that makes the face stage's batches of 4 accepted
    photos straddle the chunks of 4 records: a truncated file, a byte-identical copy and a non-image among
    them, a group photo and a PNG (which nvjpeg would leave to the CPU decoder)."""
    root = tmp_path_factory.mktemp("device-photos")
    ids = sorted((shared_faces / "identities").rglob("*.jpg"))[:5]
    group = min((shared_faces / "groups").glob("*.jpg"))
    png = min(shared_faces.rglob("*.png"))
    for i, p in enumerate(ids):
        shutil.copy(p, root / f"p{i}.jpg")
    shutil.copy(group, root / "group.jpg")
    shutil.copy(png, root / "photo.png")
    shutil.copy(ids[0], root / "copy.jpg")
    (root / "broken.jpg").write_bytes(ids[1].read_bytes()[:2000])
    (root / "text.jpg").write_bytes(b"not an image, whatever its name says")
    members = ("p0.jpg", "broken.jpg", "p1.jpg", "copy.jpg", "p2.jpg", "text.jpg", "p3.jpg", "p4.jpg",
               "group.jpg", "photo.png")
    return PartitionSpec(key="d", kind="files", root=str(root), members=members)


@pytest.fixture(scope="module")
def torch_stage():
    pytest.importorskip("facenet_pytorch")
    from pipeline.faces.torch_stage import TorchFaceStage

    return TorchFaceStage(device="cpu", decode_workers=2)


def test_device_fused_pass_writes_the_separate_tables_reading_and_decoding_each_photo_once(
        device_photos, torch_stage, models, monkeypatch):
    """The torch stage (on CPU here; nvjpeg on CUDA) decodes on its device in its own batches: the fused pass
    reads each record once, decodes each photo once with the stage's decoder, takes ingestion's verdict from
    that decode, and gives every table the separate stages give (the faces from the same batches)."""
    from pipeline import ingest
    from pipeline.faces.stage import decodes_ahead
    from pipeline.per_image import PerImageModels, fused_partition

    _, expression = models
    assert decodes_ahead(torch_stage)
    model = PerImageModels(torch_stage, expression.config, models[0].scorer_stage.config,
                           landmarker=expression.landmarker)
    # ingestion's chunks of 4 records hold 2, 3 and 2 accepted photos: a pass that batched the faces by them
    # would not give the face stage's batches of 4 accepted photos (the torch stage's faces depend on them)
    monkeypatch.setattr(ingest, "INGEST_CHUNK", 4)
    counted = ReadDecodeCounter(monkeypatch.setattr)
    ing, faces, expr, scores = _separate(device_photos, model, expression)
    separate = (counted.reads, counted.decodes, counted.bytes)
    assert (ing.inputs, ing.accepted, ing.duplicates) == (10, 7, 1)
    assert {r["reason"] for r in ing.rejects.rows} == {"duplicate image", "truncated image", "not an image"}
    assert "png" in ing.images.column("format").to_pylist() and faces.faces.num_rows >= 7
    fused_count = ReadDecodeCounter(monkeypatch.setattr)
    fused = fused_partition(device_photos, model, face_batch_size=4, expression_stage=expression)
    _assert_same(fused, ing, faces, expr, scores)
    # 10 records read once; the 9 distinct byte strings decoded once (the copy is known by its hash); the
    # separate stages read and decode the 7 accepted photos 3 more times (faces, expressions, scores)
    assert (fused_count.reads, fused_count.decodes) == (10, 9)
    assert fused.stats["device_fused"] and fused.stats["photos_decoded"] == 9
    assert fused.stats["photos_decoded_by"] == {"cpu": 9}  # on CUDA the plain JPEGs would be "nvjpeg"
    assert separate[:2] == (10 + 3 * 7, 10 + 3 * 7)
    assert separate[2] == fused_count.bytes + 3 * sum(ing.images.column("length").to_pylist())


def test_device_fused_pass_gives_ingestions_rejects_for_removed_and_repeated_broken_bytes(device_photos, torch_stage,
                                                                                        tmp_path):
    """Bytes removed on request, the same broken bytes twice, a copy in a later chunk, a broken EXIF
    orientation, photos over the pixel limit: the verdicts and notes ingestion gives, the broken bytes
    decoded once."""
    from PIL import Image

    from pipeline.ingest import IngestLimits, ingest_partition
    from pipeline.per_image import PerImageModels, fused_partition

    root = tmp_path / "more"
    shutil.copytree(device_photos.root, root)
    shutil.copy(root / "broken.jpg", root / "broken2.jpg")
    with Image.open(root / "p3.jpg") as im:  # an EXIF orientation out of range: kept unrotated, with a note
        exif = Image.Exif()
        exif[0x0112] = 9
        im.save(root / "bad_exif.jpg", exif=exif, quality=90)
    spec = PartitionSpec(key="e", kind="files", root=str(root),
                         members=(*device_photos.members, "broken2.jpg", "copy.jpg", "bad_exif.jpg"))
    removed = {ingest_partition(PartitionSpec(key="x", kind="files", root=str(root), members=("p2.jpg",)))
               .images.column("uid")[0].as_py()}
    # a pixel limit that the larger half of the photos exceed: "decompression bomb", refused unread
    sizes = sorted(w * h for w, h in zip(*ingest_partition(spec).images.select(["width", "height"]).to_pydict()
                                          .values()))
    limits = IngestLimits(max_pixels=sizes[len(sizes) // 2])
    ing = ingest_partition(spec, limits, removed=removed)
    fused = fused_partition(spec, PerImageModels(torch_stage), limits, removed=removed, face_batch_size=4)
    assert fused.ingest.images.equals(ing.images) and fused.ingest.rejects.rows == ing.rejects.rows
    assert fused.ingest.stats["orientation_notes"] == ing.stats["orientation_notes"] == {
        "bad_exif.jpg": "EXIF orientation 9 is not 1-8; kept unrotated"}
    reasons = [r["reason"] for r in ing.rejects.rows]
    assert reasons.count("truncated image") == 2 and "decompression bomb" in reasons
    assert "removed on request" in reasons and "not an image" in reasons
    assert fused.stats["photos_decoded"] == 9  # 11 distinct byte strings, one removed, one copy


def test_only_the_ray_engine_keeps_a_device_backend_off_the_fused_pass(monkeypatch, tmp_path):
    """A face backend that decodes on its device (the torch stage, a GPU) gets the device-fused pass in
    process; under Ray (chunks spread over actors, not one stream in the face stage's batches) the images
    asset says why and leaves the faces to the faces asset. A CPU backend gets the fused pass either way."""
    import assets.faces as faces_module
    from assets.ingest import fused_off_reason
    from assets.resources import LineupSettings

    class DecodesItself:
        name = "torch-stage"

        def decode_encoded(self, blobs):
            raise AssertionError("not called here")

    class CpuArrays:
        name = "dlib"
        device = "cpu"

    for engine, backend, off in (("", DecodesItself, False), ("ray", DecodesItself, True), ("", CpuArrays, False),
                                 ("ray", CpuArrays, False)):
        settings = LineupSettings(home=str(tmp_path), engine_workers=1, engine=engine)
        monkeypatch.setattr(faces_module, "face_backend", lambda lineup, b=backend: b())
        reason = fused_off_reason(settings, gpu_pool=None, pool=None)
        assert (reason is not None) == off and (not off or "Ray" in reason), (engine, backend)
    # nor does the pass itself take another engine's chunk runner for such a backend
    from pipeline.per_image import PerImageModels, fused_partition

    with pytest.raises(ValueError, match="one process"):
        fused_partition(PartitionSpec(key="k", kind="files", root=str(tmp_path), members=()),
                        PerImageModels(DecodesItself()), chunk_runner=lambda chunks: [])


def test_assets_commit_the_same_files_with_the_device_fused_pass(device_photos, torch_stage, tmp_path, monkeypatch):
    """The images asset runs the device-fused pass for the torch stage and says so; faces and expressions
    take what it computed; every committed file equals the one the separate assets commit."""

    import assets.faces as faces_module

    monkeypatch.setattr(faces_module, "face_backend", lambda lineup: torch_stage)
    committed, metas = {}, {}
    for fused in (False, True):
        run = _materialize_per_image_assets(tmp_path, device_photos.root, fused, face_batch_size=4)
        committed[fused], metas[fused] = run.committed, run.metas
    for stage, tables in committed[False].items():
        for name, table in tables.items():
            assert committed[True][stage][name].equals(table), (stage, name)
    assert metas[True]["images"]["fused_pass"].value == "device"
    assert metas[True]["images"]["photos_decoded"].value == 9
    assert metas[True]["faces"]["from_fused_pass"].value and metas[True]["face_expressions"]["from_fused_pass"].value
    assert not metas[False]["faces"]["from_fused_pass"].value


def test_images_asset_takes_the_gpu_slot_only_to_run_models_on_it(monkeypatch, tmp_path):
    """On a GPU machine the images asset holds a slot of the "gpu" pool only when its fused pass will run
    models there: the face models on the GPU (face_device auto: the device-fused pass) or held on CPU (its
    expression and scoring models on the GPU); with the fused pass off, or the face models on the GPU under
    Ray (no device-fused pass there), it only ingests and takes no slot. The definitions are loaded in a
    process that believes it has CUDA; a run whose settings would use the GPU without the slot is not fused."""
    import os
    import subprocess
    import sys

    import assets.faces as faces_module
    from assets.ingest import fused_off_reason, images_pool
    from assets.resources import LineupSettings

    def pools(**env):
        code = ("import torch; torch.cuda.is_available = lambda: True\n"
                "from assets.ingest import images; from assets.faces import faces\n"
                "print(images.op.pool, faces.op.pool)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                             env={**os.environ, "LINEUP_FACE_DEVICE": "", "LINEUP_FUSED_PER_IMAGE": "1", **env})
        return out.stdout.split()

    assert pools() == ["gpu", "gpu"]  # the default on a GPU machine: the device-fused pass runs the face models
    assert pools(LINEUP_ENGINE="ray") == ["None", "gpu"]  # the faces asset decodes and analyses
    assert pools(LINEUP_FACE_DEVICE="cpu") == ["gpu", "gpu"]
    assert pools(LINEUP_FACE_DEVICE="cpu", LINEUP_ENGINE="ray") == ["gpu", "gpu"]
    assert pools(LINEUP_FACE_DEVICE="cpu", LINEUP_FUSED_PER_IMAGE="0") == ["None", "gpu"]
    assert images_pool(True, "cuda:1", "gpu", "ray") is None and images_pool(True, "cpu", None) is None
    assert images_pool(True, "cuda:1", "gpu") == "gpu"

    class CpuArrays:
        name = "dlib"
        device = "cpu"

    monkeypatch.setattr(faces_module, "face_backend", lambda lineup: CpuArrays())
    settings = LineupSettings(home=str(tmp_path), engine_workers=1, face_device="cpu")
    assert "holds no slot" in fused_off_reason(settings, gpu_pool="gpu", pool=None)
    assert fused_off_reason(settings, gpu_pool="gpu", pool="gpu") is None
    assert fused_off_reason(settings, gpu_pool=None, pool=None) is None  # no GPU: nothing to guard


def test_staging_holds_no_precomputation_after_a_run_of_images_and_scores(photos, tmp_path):
    """After images, faces and scores, nothing a fused pass precomputed is left in
    staging: taken, or superseded when scores keeps the image scores it already has for the partition (a
    second ingestion run precomputes them again); what a killed write or take leaves is removed by the
    next take, and a discard can be repeated."""
    import dagster as dg
    import pyarrow as pa

    from assets.faces import faces
    from assets.identity import identities
    from assets.ingest import images
    from assets.partitions import input_partitions
    from assets.resources import LineupSettings
    from assets.scoring import scores
    from pipeline.config import Layout
    from pipeline.per_image import discard_precomputed, precomputed_dir, put_precomputed, take_precomputed
    from pipeline.sources import register_new_inputs

    root, _ = photos
    layout = Layout(tmp_path / "home")
    (spec,) = register_new_inputs(root, layout.partitions, batch_size=100)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(input_partitions.name, [spec.key])
    # no FER weights: the fused pass leaves expressions out (test above), and this test stays short
    settings = LineupSettings(home=str(layout.home), input_dir=str(root), engine_workers=1, fused_per_image=True,
                              fer_weights=str(tmp_path / "no-fer.hdf5"))
    staging = layout.home / "staging" / "precomputed"

    def left():
        return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())

    for run in ("first", "again"):
        r = dg.materialize([images, faces], partition_key=spec.key, instance=instance,
                           resources={"lineup": settings})
        assert r.success
        assert left() == sorted(f"image_scores/{spec.key}/{f}" for f in ("image_scores.parquet", "inputs.json"))
        r = dg.materialize([identities, scores], instance=instance, resources={"lineup": settings})
        assert r.success
        meta = next(iter(r.asset_materializations_for_node("scores"))).metadata
        assert (meta["image_scores_from_fused_pass"].value, meta["image_scores_reused_for"].value) == (
            (1, 0) if run == "first" else (0, 1))
        assert left() == [], run

    # killed halfway: a write without its inputs file, a take that removed the inputs file only
    table = pa.table({"x": [1]})
    put_precomputed(layout, "image_scores", "k", {"t": table}, {"a": 1})
    (precomputed_dir(layout, "image_scores", "k") / "inputs.json").unlink()
    assert take_precomputed(layout, "image_scores", "k", {"a": 1}) is None and left() == []
    put_precomputed(layout, "image_scores", "k", {"t": table}, {"a": 1})
    (precomputed_dir(layout, "image_scores", "k") / "t.parquet").unlink()
    assert take_precomputed(layout, "image_scores", "k", {"a": 1}) is None and left() == []
    discard_precomputed(layout, "image_scores", "k")
    discard_precomputed(layout, "image_scores", "k")
    put_precomputed(layout, "image_scores", "k", {"t": table}, {"a": 1})
    assert take_precomputed(layout, "image_scores", "k", {"a": 1})[0]["t"].equals(table) and left() == []


def test_device_fused_pass_for_a_gpu_backend_that_takes_rgb_arrays(device_photos, models, monkeypatch):
    """A face backend on a GPU without a decoder of its own (dlib or insightface on CUDA) gets the device-fused
    pass too, decoding with pipeline.decode on the face stage's threads as its decode_rows does; here dlib
    on the CPU taken for one (gpu_backend patched): the tables of the separate stages, one decode a photo."""
    from pipeline.faces import stage
    from pipeline.per_image import fused_partition

    model, expression = models
    monkeypatch.setattr(stage, "gpu_backend", lambda backend: True)
    counted = ReadDecodeCounter(monkeypatch.setattr)
    ing, faces, expr, scores = _separate(device_photos, model, expression)
    assert counted.decodes == 10 + 3 * 7
    fused_count = ReadDecodeCounter(monkeypatch.setattr)
    fused = fused_partition(device_photos, model, face_batch_size=4, expression_stage=expression)
    _assert_same(fused, ing, faces, expr, scores)
    assert (fused_count.reads, fused_count.decodes) == (10, 9) and fused.stats["device_fused"]
