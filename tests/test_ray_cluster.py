"""The Ray engine on real clusters: a multi-node cluster on one machine whose only shared storage is an S3
server (moto), and an existing cluster started with `ray start` and reached through RAY_ADDRESS, including
what a leftover `ray_current_cluster` file does to a run without RAY_ADDRESS. Each stage's tables must equal
the in-process engine's. Skipped without ray, moto or s3fs."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import moto_s3, photos_into_store, write_tiny_clip

pytest.importorskip("ray")
pytest.importorskip("moto")
pytest.importorskip("s3fs")

from pipeline.ingest import ingest_partition, ray_ingest_runner
from pipeline.sources import PartitionSpec

BUCKET = "lineup-ray"


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, the AWS variables pointing at it (and so shipped to Ray's workers)."""
    with moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as (fs, _):
        yield fs

def _photos(shared_faces: Path) -> list[Path]:
    ids = sorted((shared_faces / "identities").rglob("*.jpg"))[:5]
    return [*ids, min((shared_faces / "groups").glob("*.jpg"))]


def _tiny_clip(folder: Path):
    """A tiny random-weight CLIP whose config and weights exist only under ``folder`` (the driver's disk)."""
    from pipeline.scoring.clip import ClipConfig
    from pipeline.scoring.stage import ScoringConfig

    cfg_file = folder / "lineup-tiny-clip-cluster.json"
    name = write_tiny_clip(cfg_file, folder / "clip.pt")
    return ScoringConfig(clip=ClipConfig(model_name=name, pretrained=str(folder / "clip.pt"),
                                         model_config=str(cfg_file), device="cpu", batch_size=2), chunk=3)


def _stages(spec, clip_cfg, ray_engine: bool):
    """ingest -> faces -> image scores of one partition, on Ray or in-process; the tables and the Ray stats."""
    from pipeline.faces import get_backend
    from pipeline.faces.stage import ray_chunk_runner, run_face_partition
    from pipeline.scoring.stage import ImageScorerStage, ray_score_runner, score_partition

    runners = {}
    if ray_engine:
        runners = {"ingest": ray_ingest_runner(0), "faces": ray_chunk_runner(get_backend("dlib", device="cpu"), 32),
                   "scores": ray_score_runner(clip_cfg, 0)}
    ing = ingest_partition(spec, chunk_runner=runners.get("ingest"))
    backend = get_backend("dlib", device="cpu")
    faces = run_face_partition(ing.images, backend, spec.key, batch_size=2, chunk_runner=runners.get("faces"))
    captioned = ing.images.set_column(ing.images.schema.get_field_index("caption"), "caption",
                                      pa.array([f"a photo number {i}" for i in range(ing.images.num_rows)]))
    scores, _ = score_partition(captioned, ImageScorerStage(clip_cfg), chunk_runner=runners.get("scores"))
    tables = {"images": ing.images, "rejects": pa.Table.from_pylist(ing.rejects.rows), "faces": faces.faces,
              "scan": faces.scan, "scores": scores}
    return tables, {k: r.stats for k, r in runners.items()}


@pytest.fixture(scope="module")
def multinode(s3):
    """A head with no CPU and two 1-CPU worker nodes (`ray.cluster_utils.Cluster`), so every task and actor
    runs on a worker node; its address. The cluster lives in a private temp folder: its session file must
    not lead other Ray drivers on this machine to it."""
    from ray.cluster_utils import Cluster

    from pipeline import ray_engine

    ray_tmp = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            yield cluster.address
        finally:
            ray_engine.shutdown()
            cluster.shutdown()
            for pid in _ray_processes(ray_tmp):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(600)
def test_multinode_cluster_reads_only_the_store(s3, multinode, shared_faces, tmp_path, monkeypatch):
    """Every chunk runs on a worker node. The input is in S3, the CLIP weights only on the driver's disk;
    the workers refuse to open anything under the driver's home, the photos' folder or the weights' folder,
    and still produce the in-process tables."""
    from pipeline import ray_engine

    names = []
    for p in _photos(shared_faces):
        names.append(f"{p.parent.name}_{p.name}")
        s3.pipe_file(f"{BUCKET}/in/{names[-1]}", p.read_bytes())
    s3.pipe_file(f"{BUCKET}/in/broken.jpg", b"not a jpeg")
    spec = PartitionSpec(key="p0", kind="files", root=f"s3://{BUCKET}/in", members=(*names, "broken.jpg"))
    home = tmp_path / "home"
    home.mkdir()
    clip_cfg = _tiny_clip(home)
    local, _ = _stages(spec, clip_cfg, ray_engine=False)

    monkeypatch.setenv(ray_engine.FORBID_READS_ENV, os.pathsep.join([str(tmp_path), str(shared_faces)]))
    monkeypatch.setenv("LINEUP_HOME", str(home))
    monkeypatch.setenv("RAY_ADDRESS", multinode)
    try:
        on_ray, stats = _stages(spec, clip_cfg, ray_engine=True)

        # the negative control: a worker asked to read the driver's disk is refused (so the guard is live)
        with pytest.raises(ray_engine.RayStageError, match="PermissionError"):
            ray_engine.run_chunks("probe", [str(home / "clip.pt")], decode=None,
                                  analyze=lambda _m, path: Path(path).read_bytes()[:1], factory=None)
        # the same photos from the driver's folder: every worker node would fail to read them, so the stage
        # fails at once naming a node and a path (it used to end as 142 "unreadable file" rejects, rc 0)
        on_disk = PartitionSpec(key="p0", kind="files", root=str(shared_faces),
                                members=tuple(str(p.relative_to(shared_faces)) for p in _photos(shared_faces)))
        with pytest.raises(ray_engine.WorkersCannotRead, match=f"node .*{shared_faces}.*PermissionError.*LINEUP_INPUT=s3://"):
            ingest_partition(on_disk, chunk_runner=ray_ingest_runner(0))
        joined = ray_engine.joined_cluster()
    finally:
        ray_engine.shutdown()

    assert all(p.startswith(f"s3://{BUCKET}/") for p in on_ray["images"].column("path").to_pylist())
    assert local["images"].num_rows == len(names) and local["faces"].num_rows >= len(names)
    assert local["scores"].column("clip_score").null_count == 0
    for name, table in local.items():
        assert on_ray[name].equals(table), name
    assert joined["local"] is False and joined["nodes"] == 3
    assert stats["faces"].actors == 2 and stats["scores"].actors == 2  # one per worker node, 1 CPU each
    assert stats["faces"].failures == [] and stats["ingest"].tasks == 1


@pytest.mark.timeout(600)
def test_multi_identity_selection_on_the_worker_nodes(s3, multinode, tmp_path, monkeypatch):
    """The multi-identity builder's selection and pHash tasks on the worker nodes of a joined cluster (the
    code shipped as `py_modules`), the photos only in S3 and the driver's folder refused to the workers: a
    fresh build and a refresh with the guard's decisions write the in-process builds' bytes."""
    from test_multiid_parallel import _files
    from test_shard_reuse import _collection, _groups

    from pipeline import ray_engine
    from pipeline.multiid import MultiIDConfig, build_multiid_dataset
    from pipeline.multiid import parallel as mparallel

    monkeypatch.setattr(mparallel, "PARALLEL_MIN_TARGETS", 4)
    tasks = []
    real = mparallel._on_ray

    def spy(parts_dir, common, jobs, n_tasks, kind="select", on_done=None):
        tasks.append((kind, len(n_tasks)))
        return real(parts_dir, common, jobs, n_tasks, kind, on_done=on_done)

    monkeypatch.setattr(mparallel, "_on_ray", spy)
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=True, reuse_buckets=4)
    groups = _groups(2)

    def in_store(world):
        images, faces, ids = world
        return photos_into_store(s3, images, f"{BUCKET}/mid"), faces, ids

    base = in_store(_collection(tmp_path, groups, photos_per_group=14))
    grown = in_store(_collection(tmp_path, groups, photos_per_group=14, extra=[("zz-new", [f"{groups[0]}-a", f"{groups[1]}-b"])]))
    one = build_multiid_dataset(*base, tmp_path / "one", cfg, version="v1", workers=1, engine="inprocess")
    fresh2 = build_multiid_dataset(*grown, tmp_path / "fresh2", cfg, version="v2", workers=1, engine="inprocess")

    monkeypatch.setenv(ray_engine.FORBID_READS_ENV, str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", multinode)
    try:
        first = build_multiid_dataset(*base, tmp_path / "ray1", cfg, version="v1", engine="ray",
                                      guard_cache=tmp_path / "guard.parquet")
        refresh = build_multiid_dataset(*grown, tmp_path / "ray2", cfg, version="v2", engine="ray",
                                        reuse_from=first.out_dir, guard_cache=tmp_path / "guard.parquet")
        joined = ray_engine.joined_cluster()
        # the photos left on the driver's disk: the build fails before its first task, naming the photo,
        # instead of counting every target unreadable and writing a dataset without them
        with pytest.raises(ray_engine.WorkersCannotRead, match=f"node .*{tmp_path}.*PermissionError"):
            build_multiid_dataset(*_collection(tmp_path, groups, photos_per_group=14), tmp_path / "local", cfg,
                                  version="v1", engine="ray")
    finally:
        ray_engine.shutdown()

    assert joined["local"] is False and joined["nodes"] == 3
    assert one.stats["targets"].get("kept", 0) > 5 and fresh2.stats["targets"].get("kept", 0) > 5
    assert _files(tmp_path / "ray1") == _files(tmp_path / "one")
    assert _files(tmp_path / "ray2") == _files(tmp_path / "fresh2")
    assert first.stats["guard_decisions_computed"] > 0 and refresh.stats["targets_reused"] > 0
    assert any(kind == "select" and n > 1 for kind, n in tasks) and any(kind == "hash" for kind, _ in tasks), tasks


def _ray_processes(marker: str) -> list[int]:
    """Our `ray start`'s processes: those whose command line names its private temp folder."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@contextmanager
def _ray_start_head(num_cpus: int, **env_vars):
    """`ray start --head --block` in a private temp folder (``env_vars`` added to its environment); yields
    (temp folder, GCS port) once its session file is written; afterwards killed by a signal, as a crash
    would (no clean-up of the session file), with every process of its folder."""
    ray_tmp = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, **env_vars}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus", str(num_cpus),
                             "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
    try:
        for _ in range(600):
            if address_file.exists():
                break
            time.sleep(0.2)
        assert address_file.exists(), "ray start did not come up"
        yield ray_tmp, port
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        time.sleep(1)
        for pid in _ray_processes(ray_tmp):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(600)
def test_existing_cluster_then_its_leftover_session(shared_faces, tmp_path, monkeypatch):
    """`ray start --head --num-cpus 2`, joined through RAY_ADDRESS=auto with 32 actors asked for: the face
    stage finishes on 2 actors with the in-process table. Then the head is killed by a signal, which
    leaves its `ray_current_cluster` file behind: a run without RAY_ADDRESS starts a private cluster."""
    from pipeline import ray_engine
    from pipeline.faces import get_backend
    from pipeline.faces.stage import ray_chunk_runner, run_face_partition

    photos = _photos(shared_faces)
    spec = PartitionSpec(key="p1", kind="files", root=str(shared_faces),
                         members=tuple(str(p.relative_to(shared_faces)) for p in photos))
    images = ingest_partition(spec).images
    backend = get_backend("dlib", device="cpu")
    local = run_face_partition(images, backend, "p1", batch_size=2)

    with _ray_start_head(2) as (ray_tmp, port):
        monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
        monkeypatch.setenv("RAY_ADDRESS", "auto")
        runner = ray_chunk_runner(backend, actors=32)
        on_ray = run_face_partition(images, backend, "p1", batch_size=2, chunk_runner=runner)
        joined = ray_engine.joined_cluster()
        ray_engine.shutdown()
    address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
    assert on_ray.faces.equals(local.faces) and on_ray.scan.equals(local.scan)
    assert joined["local"] is False and joined["address"].endswith(f":{port}")
    assert runner.stats.actors == 2 and runner.stats.cpus_per_actor == 1.0

    assert address_file.exists()  # the leftover that made every partition fail before
    monkeypatch.delenv("RAY_ADDRESS")
    try:
        again = ray_ingest_runner(0)
        res = ingest_partition(spec, chunk_runner=again)
        joined = ray_engine.joined_cluster()
    finally:
        ray_engine.shutdown()
        for pid in _ray_processes(ray_tmp):
            os.kill(pid, signal.SIGKILL)
    assert res.images.equals(images)
    assert joined["local"] is True and not joined["address"].endswith(f":{port}")


@pytest.mark.timeout(300)
def test_cluster_with_token_authentication(shared_faces, tmp_path, monkeypatch):
    """A `ray start --head` cluster with token authentication (RAY_AUTH_MODE=token, as Ray 2.59+ turns on by
    itself where ~/.ray/auth_token exists): a driver without the token fails with what to set, naming the
    address; with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN it joins and ingests as in-process."""
    import secrets

    from pipeline import ray_engine

    photos = _photos(shared_faces)[:2]
    spec = PartitionSpec(key="p2", kind="files", root=str(shared_faces),
                         members=tuple(str(p.relative_to(shared_faces)) for p in photos))
    local = ingest_partition(spec).images
    token = secrets.token_hex(32)
    with _ray_start_head(1, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) as (ray_tmp, port):
        monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of this machine's to fall back on
        for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.delenv(var, raising=False)
        # the refused driver asks the GCS once a second, 20 times by default: 3 are enough to see it refused
        from ray._private import ray_constants

        monkeypatch.setattr(ray_constants, "NUM_REDIS_GET_RETRIES", 3, raising=False)
        try:
            with pytest.raises(ray_engine.RayJoinError, match=f"RAY_ADDRESS=127.0.0.1:{port}.*RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"):
                ingest_partition(spec, chunk_runner=ray_ingest_runner(0))
        finally:
            ray_engine.shutdown()
        # Ray reads its authentication mode once per process: the driver with the token is a new one
        out = tmp_path / "images.parquet"
        code = ("import json, sys, pyarrow.parquet as pq\n"
                "from pipeline import ray_engine\n"
                "from pipeline.ingest import ingest_partition, ray_ingest_runner\n"
                "from pipeline.sources import PartitionSpec\n"
                f"spec = PartitionSpec(key='p2', kind='files', root={str(shared_faces)!r}, members={spec.members!r})\n"
                "pq.write_table(ingest_partition(spec, chunk_runner=ray_ingest_runner(0)).images, sys.argv[1])\n"
                "print(json.dumps(ray_engine.joined_cluster()))\n")
        driver = subprocess.run([sys.executable, "-c", code, str(out)], check=False, capture_output=True, text=True, timeout=180,
                                env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, cwd=Path(__file__).parents[1])
        assert driver.returncode == 0, driver.stderr[-2000:]
        joined = json.loads(driver.stdout.strip().splitlines()[-1])
        on_ray = pq.read_table(out)
    assert joined["local"] is False and joined["address"].endswith(f":{port}")
    assert on_ray.equals(local) and local.num_rows == 2
