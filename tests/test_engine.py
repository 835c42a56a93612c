"""The in-process engine's worker processes give the serial path's faces table, exactly."""

from pathlib import Path

import pyarrow as pa
import pytest

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


def _torch_loaded(_model, chunk):
    import sys

    return ["torch" in sys.modules for _ in chunk]


def test_ingest_workers_never_import_torch():
    """A worker for a stage without a model (ingestion) no longer imports torch (about 2 CPU-s each)."""
    from pipeline.engine import shutdown_pools
    from pipeline.ingest import _no_model

    shutdown_pools()
    try:
        got = list(map_chunks(_torch_loaded, [[1], [2], [3], [4]], workers=2, factory=_no_model))
    finally:
        shutdown_pools()
    assert got == [[False]] * 4


def test_a_small_partition_starts_no_worker_pool(shared_faces, monkeypatch):
    """40 photos (about 6 MB) are not worth a worker's start: no pool, the serial result. A partition
    over the per-worker bytes gets its workers and the same rows."""
    from pipeline import engine, ingest

    engine.shutdown_pools()
    members = tuple(str(p.relative_to(shared_faces)) for p in sorted((shared_faces / "identities").rglob("*.jpg"))[:40])
    spec = PartitionSpec(key="t", kind="files", root=str(shared_faces), members=members)
    serial = ingest_partition(spec, workers=1)
    small = ingest_partition(spec, workers=2)
    assert not engine._POOLS and small.stats["inprocess_workers"] == 1
    assert small.images.equals(serial.images) and small.rejects.rows == serial.rejects.rows
    monkeypatch.setattr(ingest, "INGEST_BYTES_PER_WORKER", 1_000)  # now every worker is worth starting
    try:
        pooled = ingest_partition(spec, workers=2)
        assert len(engine._POOLS) == 1 and pooled.stats["inprocess_workers"] == 2
    finally:
        engine.shutdown_pools()
    assert pooled.images.equals(serial.images)


def test_prefetched_prepares_one_item_ahead_of_the_one_in_use():
    """The face stage's decode-ahead: while the caller uses item i, item i+1 is prepared on a thread and
    item i+2 is not started yet (memory holds two prepared chunks at most); results stay in order and an
    item's error surfaces from its own future."""
    import time

    from pipeline.engine import prefetched

    started = []

    def prepare(x):
        started.append(x)
        if x == 3:
            raise ValueError("bad item 3")
        return x * 10

    items = prefetched(prepare, range(5), ahead=1)
    assert next(items).result() == 0
    deadline = time.monotonic() + 5
    while 1 not in started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started == [0, 1]  # the next one is prepared while this one is in use, no further
    assert [next(items).result() for _ in range(2)] == [10, 20]
    with pytest.raises(ValueError, match="bad item 3"):
        next(items).result()
    assert next(items).result() == 40 and started == [0, 1, 2, 3, 4]



def _workers_then_killed(kind: str, tmp_path: Path) -> list[int]:
    """A process that starts a pool of two workers (``kind``: the builder's forked pool or the engine's spawned
    one), has them run a task, prints their pids and kills itself with SIGKILL; the workers' pids."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pipeline import engine
from pipeline.multiid import parallel

def pid(_model, _chunk=None):
    import time
    time.sleep(0.3)  # both workers get a task
    return os.getpid()

if __name__ == "__main__" and sys.argv[1] == "fork":
    with parallel._fork_pool(2) as pool:
        pids = set(pool.map(pid, range(4)))
        print(*sorted(pids), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
elif __name__ == "__main__":
    pool = engine._pool(dict, (), {{}}, 2)
    pids = set(pool.map(engine._run_chunk, [pid] * 4, range(4)))
    print(*sorted(pids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")
    done = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == -9, done.stderr
    return [int(p) for p in done.stdout.split()]


@pytest.mark.parametrize("kind", ["fork", "spawn"])
def test_workers_end_when_their_parent_is_killed(kind, tmp_path):
    """kill -9 of a process with a worker pool: its workers, idle on their task queue (whose writing end they
    hold too), used to wait there forever; now each ends within seconds of its parent (engine.exit_with_parent)."""
    import time

    pids = _workers_then_killed(kind, tmp_path)
    assert len(pids) == 2

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended (reaped by init later)
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 15
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, pids)), f"workers {pids} outlived their killed parent"
