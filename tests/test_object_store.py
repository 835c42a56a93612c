"""Input and store in an object store: a local S3-compatible server (moto in server mode, 127.0.0.1 only),
a full `make run` against it in-process and on Ray, the catalog read by a plain DuckDB connection, the
training loader reading shards from the store, and the publish protocol that replaces the rename.
Skipped without moto/s3fs (pip install -e '.[s3]')."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import moto_s3, photos_into_store

pytest.importorskip("moto")
pytest.importorskip("s3fs")
pytest.importorskip("upath")

REPO = Path(__file__).resolve().parent.parent
BUCKET = "lineup-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free 127.0.0.1 port, the standard AWS variables pointing at it."""
    with moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as got:
        yield got

def _upload_input(fs, shared_faces: Path, prefix: str) -> None:
    """Loose photos, a tar shard, a Parquet manifest naming photos elsewhere in the bucket, a broken file."""
    photos = {person: sorted((shared_faces / "identities" / person).iterdir())[:2]
              for person in ("angelina_jolie", "elon_musk", "jennifer_aniston")}
    for p in photos["angelina_jolie"]:
        fs.pipe_file(f"{BUCKET}/{prefix}/input/photos/angelina_jolie_{p.name}", p.read_bytes())
    fs.pipe_file(f"{BUCKET}/{prefix}/input/photos/broken.jpg", b"not a jpeg")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in photos["elon_musk"]:
            data = p.read_bytes()
            info = tarfile.TarInfo(f"elon_musk_{p.stem}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    fs.pipe_file(f"{BUCKET}/{prefix}/input/shards/elon-000000.tar", buf.getvalue())
    urls = []
    for p in photos["jennifer_aniston"]:
        fs.pipe_file(f"{BUCKET}/{prefix}/elsewhere/jennifer_aniston_{p.name}", p.read_bytes())
        urls.append(f"s3://{BUCKET}/{prefix}/elsewhere/jennifer_aniston_{p.name}")
    sink = io.BytesIO()
    pq.write_table(pa.table({"path": urls, "caption": ["a portrait"] * len(urls)}), sink)
    fs.pipe_file(f"{BUCKET}/{prefix}/input/manifests/jennifer.parquet", sink.getvalue())


def _run(env: dict, home: Path, prefix: str, engine: str) -> subprocess.CompletedProcess:
    run_env = {**os.environ, **env, "LINEUP_HOME": str(home), "LINEUP_INPUT": f"s3://{BUCKET}/{prefix}/input",
               "LINEUP_STORE": f"s3://{BUCKET}/{prefix}/store", "LINEUP_ENGINE": engine,
               "LINEUP_SMOKE_TRAINING": "1", "DAGSTER_TELEMETRY_DISABLED": "1",
               # the manifest's photos live outside the input prefix: allowed explicitly
               "LINEUP_MANIFEST_ROOTS": f"s3://{BUCKET}/{prefix}/elsewhere"}
    run_env.pop("LINEUP_SOCIAL", None)
    return subprocess.run([sys.executable, "-m", "assets.run"], cwd=REPO, env=run_env, capture_output=True,
                          text=True, timeout=1500, check=False)  # the caller reads the exit status


def _store_table(fs, prefix: str, name: str) -> pa.Table:
    files = sorted(fs.glob(f"{BUCKET}/{prefix}/store/tables/{name}/*.parquet"))
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])


ENGINES = ["inprocess", pytest.param("ray", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("ray") is None, reason="ray is not installed (pip install -e '.[ray]')"))]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("engine", ENGINES)
def test_full_run_on_object_store(s3, shared_faces, tmp_path, engine):
    import duckdb
    import fsspec

    fs, env = s3
    prefix = f"run-{engine}"
    _upload_input(fs, shared_faces, prefix)
    home = tmp_path / "home"
    res = _run(env, home, prefix, engine)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "failed (0): none" in res.stdout
    for trainer in ("identity_adapter",):
        assert f"    {trainer}" in res.stdout.split("skipped")[0], res.stdout[-3000:]

    # tables, the registry and datasets are in the store; the home folder holds only local state
    assert not (home / "tables").exists() and not (home / "datasets").exists() and not (home / "partitions").exists()
    assert len(fs.glob(f"{BUCKET}/{prefix}/store/partitions/*.json")) == 3  # files, tar, manifest
    images = _store_table(fs, prefix, "images")
    assert images.num_rows == 6 and all(p.startswith("s3://") for p in images.column("path").to_pylist())
    faces = _store_table(fs, prefix, "faces")
    assert faces.num_rows >= 6

    # the local catalog, read by a plain DuckDB connection plus the one registration the README names
    con = duckdb.connect(str(home / "lineup.duckdb"), read_only=True)
    con.register_filesystem(fsspec.filesystem("s3"))
    assert con.execute("SELECT count(*) FROM faces").fetchall() == [(faces.num_rows,)]
    assert con.execute("SELECT reason FROM rejects").fetchall() == [("not an image",)]
    con.close()

    # published versions: the marker written after the files, LATEST after the marker
    version = fs.cat_file(f"{BUCKET}/{prefix}/store/datasets/multiid/LATEST").decode().strip()
    vdir = f"{BUCKET}/{prefix}/store/datasets/multiid/{version}"
    marker = json.loads(fs.cat_file(f"{vdir}/_PUBLISHED.json"))
    listed = {k[len(vdir) + 1:]: v["size"] for k, v in fs.find(vdir, detail=True).items()}
    assert {k: v["bytes"] for k, v in marker["files"].items()} == {k: v for k, v in listed.items() if k != "_PUBLISHED.json"}
    assert not list((home / "staging").rglob("*.tar")), "the local staging copies are removed after upload"

    # the training loader reads the shards from the store
    from training.data import BatchStream, LoaderConfig

    train = f"s3://{vdir}/train"
    manifest = json.loads(fs.cat_file(f"{vdir}/train/manifest.json"))
    assert manifest["num_samples"] >= 1
    batch = next(BatchStream(train, LoaderConfig(family="identity", resolution=32, batch_size=1, shuffle_buffer=1)))
    assert batch  # one decoded batch from an s3:// shard

    # the manifest's rows name their photos by URL, which holds this run's prefix: compare without it
    sources = [src.replace(f"/{prefix}/", "/<run>/") for src in faces.column("source").to_pylist()]
    faces = faces.set_column(faces.schema.get_field_index("source"), "source", pa.array(sources, pa.string()))
    faces_by_engine[engine] = faces.sort_by([("uid", "ascending"), ("face_index", "ascending")])
    if len(faces_by_engine) == 2:
        assert faces_by_engine["ray"].equals(faces_by_engine["inprocess"])


faces_by_engine: dict[str, pa.Table] = {}


def test_publish_without_rename(s3, tmp_path):
    """A version is visible only once its marker is written; a damaged published version is reported."""
    from pipeline.config import Layout, as_path
    from pipeline.datasets import (
        PUBLISHED_CHECK,
        latest_version,
        published_versions,
        release,
        verify_published,
    )
    from pipeline.storage import write_bytes_atomic

    fs, _ = s3
    layout = Layout(tmp_path / "home", as_path(f"s3://{BUCKET}/publish"))
    # an upload cut short: files, no marker; even a LATEST naming it does not make it visible
    write_bytes_atomic(b"half", layout.datasets / "demo" / "v-cut" / "a.tar")
    write_bytes_atomic(b"v-cut", layout.datasets / "demo" / "LATEST")
    assert published_versions(layout, "demo") == [] and latest_version(layout, "demo") is None

    def build(folder):
        (folder / "a.tar").write_bytes(b"shard bytes")
        (folder / "manifest.json").write_text("{}")
        return "built"

    def checks(folder, result):
        return {"files_there": [] if (folder / "a.tar").exists() else ["no a.tar"]}

    rel = release(layout, "demo", "v-1", build, checks)
    assert rel.published and not rel.reused and rel.result == "built"
    assert latest_version(layout, "demo") == "v-1" and published_versions(layout, "demo") == ["v-1"]
    assert fs.cat_file(f"{BUCKET}/publish/datasets/demo/v-1/a.tar") == b"shard bytes"
    assert verify_published(layout, "demo", "v-1") == []
    again = release(layout, "demo", "v-1", build, checks)
    assert again.reused and again.passed
    fs.rm_file(f"{BUCKET}/publish/datasets/demo/v-1/a.tar")
    damaged = release(layout, "demo", "v-1", build, checks)
    assert damaged.problems[PUBLISHED_CHECK] == ["a.tar: missing or resized"]


@pytest.mark.timeout(300)
def test_an_unreachable_store_fails_the_step_instead_of_rejecting_photos(s3, shared_faces, tmp_path, monkeypatch):
    """The store stops answering after the photos were ingested: ingesting them again and the multi-identity
    selection fail with StoreUnreachable, naming a photo, instead of ending as "unreadable" rejects and
    targets (which published emptier datasets, exit status 0). A photo that is not in the store is still
    the photo's fault: FileNotFoundError, a reject."""
    import socket

    import s3fs
    from test_shard_reuse import _collection, _groups

    from pipeline.ingest import ingest_partition
    from pipeline.multiid import MultiIDConfig, build_multiid_dataset
    from pipeline.sources import PartitionSpec, StoreUnreachable, read_bytes

    fs = s3[0]
    photos = sorted((shared_faces / "identities").rglob("*.jpg"))[:3]
    names = [f"{p.parent.name}_{p.name}" for p in photos]
    for p, name in zip(photos, names):
        fs.pipe_file(f"{BUCKET}/gone/{name}", p.read_bytes())
    spec = PartitionSpec(key="g0", kind="files", root=f"s3://{BUCKET}/gone", members=tuple(names))
    assert ingest_partition(spec).accepted == 3
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{BUCKET}/gone/not-there.jpg", 0, 10)
    images, faces, ids = _collection(tmp_path, _groups(1), photos_per_group=8)
    images = photos_into_store(fs, images, f"{BUCKET}/mid")
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False)
    assert build_multiid_dataset(images, faces, ids, tmp_path / "up", cfg, version="v1", workers=1).stats["targets"].get("kept", 0) > 0

    sock = socket.socket()  # a port nobody listens on: the store is down
    sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()[1]
    sock.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StoreUnreachable, match=f"s3://{BUCKET}/gone/.*did not serve it"):
            ingest_partition(spec)
        with pytest.raises(StoreUnreachable, match=f"s3://{BUCKET}/mid/"):
            build_multiid_dataset(images, faces, ids, tmp_path / "down", cfg, version="v1", workers=1)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert not (tmp_path / "down" / "pairs.parquet").exists()


@pytest.mark.timeout(90)
def test_a_store_that_never_answers_fails_the_read_at_its_deadline(monkeypatch):
    """A store that accepts connections and never answers (a hung proxy, a stalled server): s3fs's retries
    around botocore's kept one ranged GET waiting for over 15 minutes. With LINEUP_STORE_TIMEOUT_S the read,
    and the HEAD ingestion makes first, end with StoreUnreachable that says so, at the deadline."""
    import socket
    import threading
    import time

    import s3fs

    from pipeline.sources import StoreUnreachable, _url_size, read_bytes

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held = []

    def accept() -> None:
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("LINEUP_STORE_TIMEOUT_S", "3")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        for call in (lambda: read_bytes(f"s3://{BUCKET}/stalled/a.jpg", 0, 100), lambda: _url_size(f"s3://{BUCKET}/stalled/a.jpg", 10**6)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnreachable, match=r"stalled/a\.jpg.*no answer within 3 s \(LINEUP_STORE_TIMEOUT_S\)"):
                call()
            assert time.monotonic() - t0 < 10
        assert held  # the requests reached the store: they were cut off waiting for its answer
        monkeypatch.setenv("LINEUP_STORE_TIMEOUT_S", "soon")
        with pytest.raises(StoreUnreachable, match="LINEUP_STORE_TIMEOUT_S='soon'"):  # no photo rejected for a bad setting
            read_bytes(f"s3://{BUCKET}/stalled/a.jpg", 0, 100)
    finally:
        srv.close()
        for c in held:
            c.close()
        s3fs.S3FileSystem.clear_instance_cache()
