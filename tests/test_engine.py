"""The in-process engine's worker processes give the serial path's faces table, exactly."""

from pathlib import Path

import pyarrow as pa

from pipeline.engine import available_cores, map_chunks, resolve_workers
from pipeline.faces import get_backend
from pipeline.faces.stage import run_face_partition
from pipeline.ingest import ingest_partition
from pipeline.sources import PartitionSpec


def _images(shared_faces: Path, n_identity: int = 14, n_groups: int = 4) -> pa.Table:
    ids = sorted(p for p in (shared_faces / "identities").rglob("*.jpg"))[:n_identity]
    groups = sorted((shared_faces / "groups").glob("*.jpg"))[:n_groups]
    members = tuple(str(p.relative_to(shared_faces)) for p in [*ids, *groups])
    spec = PartitionSpec(key="t", kind="files", root=str(shared_faces), members=members)
    res = ingest_partition(spec)
    assert res.accepted == len(members)
    return res.images


def _square(_model, chunk):
    return [x * x for x in chunk]


def test_map_chunks_keeps_order_without_a_factory():
    assert list(map_chunks(_square, [[1, 2], [3], [4, 5]], workers=4)) == [[1, 4], [9], [16, 25]]


def test_resolve_workers(monkeypatch):
    monkeypatch.delenv("LINEUP_ENGINE_WORKERS", raising=False)
    assert resolve_workers(0) == available_cores()
    assert resolve_workers(3) == 3
    monkeypatch.setenv("LINEUP_ENGINE_WORKERS", "5")
    assert resolve_workers(0) == 5


def test_worker_processes_equal_serial(shared_faces):
    rows = _images(shared_faces).to_pylist()
    rows[5]["length"] += 10**6  # its bytes can no longer be read: a reject in the middle of a chunk
    images = pa.Table.from_pylist(rows, schema=_images(shared_faces, 0, 0).schema)
    backend = get_backend("dlib", device="cpu")
    serial = run_face_partition(images, backend, "t", batch_size=4, workers=1)
    embedded_here = backend.timings["embed_s"]
    pooled = run_face_partition(images, backend, "t", batch_size=4, workers=2)
    assert serial.faces.num_rows >= 17  # every identity photo has a face, the groups several
    assert pooled.faces.equals(serial.faces)
    assert pooled.scan.equals(serial.scan)
    assert pooled.rejects.rows == serial.rejects.rows and len(serial.rejects) == 1
    assert serial.reconciles() and pooled.reconciles()
    # the pooled run's work happened in the workers, not on this process's backend
    assert backend.timings["embed_s"] == embedded_here and pooled.timings["embed_s"] > 0
