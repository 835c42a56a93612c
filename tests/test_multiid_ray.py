"""The multi-identity selection as Ray tasks writes the same files, byte for byte, as one process: the
tasks get the selection's arguments from the object store and send their part files back as bytes, so a
worker never reads the driver's output folder (the workers here refuse to: ``LINEUP_RAY_FORBID_READS``).
Skipped without Ray (pip install -e '.[ray]')."""

import os
from contextlib import contextmanager

import pyarrow as pa
import pytest

pytest.importorskip("ray")

from test_multiid_parallel import _comparable, _files
from test_shard_reuse import _collection, _groups

from pipeline.multiid import MultiIDConfig, build_multiid_dataset
from pipeline.multiid import parallel as mparallel


@contextmanager
def ray_refusing_reads_under(folder):
    """A private local Ray cluster whose workers may not open anything under ``folder``; the variable is
    restored and the cluster stopped afterwards (the workers' variables are fixed when Ray starts)."""
    from pipeline.ray_engine import FORBID_READS_ENV, ensure_ray, shutdown

    shutdown()
    old = os.environ.get(FORBID_READS_ENV)
    os.environ[FORBID_READS_ENV] = str(folder)
    try:
        ensure_ray(num_cpus=2)
        yield
    finally:
        shutdown()
        if old is None:
            os.environ.pop(FORBID_READS_ENV, None)
        else:
            os.environ[FORBID_READS_ENV] = old


@pytest.fixture(scope="module")
def ray_no_driver_disk(tmp_path_factory):
    """A private local Ray cluster whose workers may not open anything under the builds' output folder."""
    out = tmp_path_factory.mktemp("driver-only")
    with ray_refusing_reads_under(out):
        yield out


@pytest.fixture
def on_ray(monkeypatch):
    """Selections of a few targets already go to the tasks; each call's chunks are recorded."""
    monkeypatch.setattr(mparallel, "PARALLEL_MIN_TARGETS", 4)
    calls = []
    real = mparallel._on_ray

    def spy(parts_dir, common, jobs, tasks, kind="select", on_done=None):
        out = real(parts_dir, common, jobs, tasks, kind, on_done=on_done)
        calls.append((kind, len(jobs), len(tasks)))
        return out

    monkeypatch.setattr(mparallel, "_on_ray", spy)
    return calls


@pytest.mark.parametrize("keypoints", [False, True])
def test_ray_build_is_byte_identical(tmp_path, ray_no_driver_disk, on_ray, keypoints):
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=keypoints, reuse_buckets=4)
    world = _collection(tmp_path, _groups(3), photos_per_group=14)  # the photos: a locator every worker reads
    out = ray_no_driver_disk / f"kp{int(keypoints)}"
    one = build_multiid_dataset(*world, out / "one", cfg, version="v1", workers=1, engine="inprocess")
    lines: list[str] = []
    ray = build_multiid_dataset(*world, out / "ray", cfg, version="v1", engine="ray", progress=lines.append)
    assert one.stats["targets"].get("kept", 0) > 10
    # the Ray tasks' progress: the last count of targets selected is every target, as the stats count them
    counts = [line.split(":")[1].split("(")[0].strip() for line in lines if line.startswith("targets selected:")]
    assert counts and counts[-1] == f"{ray.stats['targets_reselected']:,}/{ray.stats['targets_reselected']:,}", lines
    assert _files(out / "one") == _files(out / "ray")
    assert _comparable(one.stats) == _comparable(ray.stats)
    # the tasks ran (a failed one raises): the chunks of several buckets' selections at once, after the
    # photos' pHashes (a fresh build)
    assert any(kind == "select" and jobs > 1 and tasks > 1 for kind, jobs, tasks in on_ray), on_ray
    assert any(kind == "hash" for kind, _, _ in on_ray), on_ray


def test_ray_refresh_with_guard_decisions_is_byte_identical(tmp_path, ray_no_driver_disk, on_ray):
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=True, reuse_buckets=4)
    groups = _groups(2)
    out = ray_no_driver_disk / "refresh"
    base = _collection(tmp_path, groups, photos_per_group=14)
    first = build_multiid_dataset(*base, out / "v1", cfg, version="v1", engine="ray", guard_cache=out / "guard.parquet")
    assert first.stats["guard_decisions_computed"] > 0
    grown = _collection(tmp_path, groups, photos_per_group=14, extra=[("zz-new", [f"{groups[0]}-a", f"{groups[0]}-b"])])
    # the second group's photos edited (their captions): selected again with the same candidates, so their
    # walks meet the pairs the first build judged (a new face's targets may be derived, judging nothing)
    images = grown[0]
    edited = [c if not u.startswith(groups[1]) else "edited" for u, c in zip(images.column("uid").to_pylist(),
                                                                          images.column("caption").to_pylist())]
    grown = (images.set_column(images.schema.get_field_index("caption"), "caption", pa.array(edited, pa.string())), *grown[1:])
    build_multiid_dataset(*grown, out / "fresh", cfg, version="v2", workers=1, engine="inprocess")
    ray = build_multiid_dataset(*grown, out / "r", cfg, version="v2", reuse_from=first.out_dir, engine="ray",
                                guard_cache=out / "guard.parquet")
    assert ray.stats["targets_reselected"] > 0 and ray.stats["targets_reused"] > 0
    assert ray.stats["guard_decisions_reused"] > 0  # the decisions the first build's tasks sent back were kept
    assert _files(out / "r") == _files(out / "fresh")


def test_ray_workers_read_the_photos_from_the_store_only(tmp_path_factory, ray_no_driver_disk, on_ray):
    """As on a cluster: the photos are in S3 (a local moto server) and the workers may open nothing under the
    driver's folder (its copies of the photos, the builds); the build is still the in-process one."""
    from pathlib import Path

    from conftest import moto_s3, photos_into_store

    from pipeline.ray_engine import RayStageError, run_chunks

    driver = tmp_path_factory.mktemp("driver")
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=True, reuse_buckets=4)
    with moto_s3(driver, "photos") as (fs, _):
        images, faces, ids = _collection(driver, _groups(2), photos_per_group=14)
        images = photos_into_store(fs, images, "photos")
        with ray_refusing_reads_under(driver):  # started inside the store's variables, which workers need too
            one = build_multiid_dataset(images, faces, ids, driver / "one", cfg, version="v1", workers=1, engine="inprocess")
            build_multiid_dataset(images, faces, ids, driver / "ray", cfg, version="v1", engine="ray")
            # the negative control: a worker asked to read the driver's folder is refused (the guard is live)
            with pytest.raises(RayStageError, match="PermissionError"):
                run_chunks("probe", [str(driver / "one" / "pairs.parquet")], decode=None,
                           analyze=lambda _m, path: Path(path).read_bytes()[:1], factory=None)
    assert one.stats["targets"].get("kept", 0) > 5
    assert _files(driver / "one") == _files(driver / "ray")
    assert any(kind == "select" and tasks > 1 for kind, _, tasks in on_ray), on_ray
