"""The face stage: decoded images -> the faces table (one row per detected face), per partition.

``detect_faces`` runs a backend over decoded images; ``run_face_partition`` does it for one ingested
partition (decoding each accepted image again, rejecting what no longer decodes, recording how many
faces each image has in ``face_scan``); ``face_checks`` are the faces table's data checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.decode import DecodeError
from pipeline.ingest import IngestLimits, load_image, read_accepted_bytes
from pipeline.rejects import Rejects

from .base import FaceBackend


def faces_schema(embedding_dim: int) -> pa.Schema:
    """The faces table schema for an embedding of ``embedding_dim`` floats."""
    return pa.schema(
        [
            ("uid", pa.string()),
            ("source", pa.string()),
            ("face_index", pa.int32()),  # 0.. left to right by bbox x1 within the image
            ("x1", pa.float32()),
            ("y1", pa.float32()),
            ("x2", pa.float32()),
            ("y2", pa.float32()),
            # insightface order, x,y interleaved: left eye, right eye, nose, left/right mouth corner
            ("landmarks", pa.list_(pa.float32(), 10)),
            ("det_score", pa.float32()),
            ("face_width", pa.float32()),
            ("face_height", pa.float32()),
            ("blur", pa.float32()),
            ("yaw", pa.float32()),
            ("pitch", pa.float32()),
            ("roll", pa.float32()),
            ("embedding", pa.list_(pa.float32(), embedding_dim)),  # L2-normalised
            ("backend", pa.string()),
            ("model_version", pa.string()),
            ("image_width", pa.int32()),
            ("image_height", pa.int32()),
        ]
    )


# The dlib backend's schema (128-d); use faces_schema(backend.embedding_dim) for others.
FACES_SCHEMA = faces_schema(128)

FACE_SCAN_SCHEMA = pa.schema(
    [("uid", pa.string()), ("source", pa.string()), ("partition", pa.string()), ("n_faces", pa.int32()), ("backend", pa.string())]
)


def embeddings_of(faces: pa.Table) -> np.ndarray:
    """The faces table's embedding column as a float32 (N, D) array."""
    col = faces.column("embedding").combine_chunks()
    dim = col.type.list_size
    if faces.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def _fixed_list(values: np.ndarray, size: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, size)


def detect_faces(
    items: Iterable[tuple[str, str, np.ndarray]],
    backend: FaceBackend,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pa.Table, list[str], dict]:
    """Run ``backend`` over ``(uid, source, rgb uint8 HxWx3)`` items.

    Returns ``(faces, uids_without_face, timings)``: the faces table (schema
    ``faces_schema(backend.embedding_dim)``) ordered by (uid, face_index), the uids in which
    no face was found (in input order, for the rejects table), and timings
    ``{"images", "faces", "total_s", "images_per_s", "faces_per_s", <backend timings>}``.
    ``progress(images_done, faces_done)`` is called after each batch. An image the backend
    cannot read raises (decode errors belong to the ingest stage's rejects).
    """
    records: list[tuple] = []
    n_faces = 0
    start = time.perf_counter()
    before = dict(getattr(backend, "timings", {}) or {})

    def flush(batch):
        nonlocal n_faces
        for (uid, source, img), faces in zip(batch, backend.analyze([b[2] for b in batch])):
            records.append((uid, source, img.shape[0], img.shape[1], faces))
            n_faces += len(faces)
        if progress is not None:
            progress(len(records), n_faces)

    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    total = time.perf_counter() - start
    table = faces_table(records, backend)
    timings = _stage_timings(records, table.num_rows, total)
    timings.update(_timing_delta(before, getattr(backend, "timings", {})))
    return table, [r[0] for r in records if not r[4]], timings


def _timing_delta(before: dict, after: dict | None) -> dict[str, float]:
    return {k: float(v) - float(before.get(k, 0.0)) for k, v in (after or {}).items() if isinstance(v, (int, float))}


def _stage_timings(records: list, n_faces: int, total: float) -> dict:
    n_images = len(records)
    return {
        "images": n_images,
        "faces": n_faces,
        "images_without_face": sum(1 for r in records if not r[4]),
        "total_s": total,
        "images_per_s": n_images / total if total > 0 else 0.0,
        "faces_per_s": n_faces / total if total > 0 else 0.0,
    }


def faces_table(records: list[tuple], backend: FaceBackend) -> pa.Table:
    """The faces table from ``(uid, source, height, width, [DetectedFace])`` records: faces numbered left
    to right within each image, rows ordered by (uid, face_index)."""
    dim = int(backend.embedding_dim)
    cols: dict[str, list] = {k: [] for k in ("uid", "source", "face_index", "image_width", "image_height")}
    boxes, lmks, embs, feats, scores = [], [], [], [], []
    for uid, source, h, w, faces in records:
        order = sorted(range(len(faces)), key=lambda k: (float(faces[k].bbox[0]), float(faces[k].bbox[1])))
        for idx, k in enumerate(order):
            f = faces[k]
            if f.embedding.shape[0] != dim:
                raise ValueError(f"backend {backend.name} returned a {f.embedding.shape[0]}-d embedding, expected {dim}")
            cols["uid"].append(uid)
            cols["source"].append(source)
            cols["face_index"].append(idx)
            cols["image_width"].append(w)
            cols["image_height"].append(h)
            boxes.append(f.bbox)
            lmks.append(f.landmarks.reshape(10))
            embs.append(f.embedding)
            scores.append(f.det_score)
            feats.append((f.face_width, f.face_height, f.blur, f.yaw, f.pitch, f.roll))
    n = len(boxes)
    b = np.asarray(boxes, dtype=np.float32).reshape(n, 4)
    q = np.asarray(feats, dtype=np.float32).reshape(n, 6)
    arrays = [
        pa.array(cols["uid"], pa.string()),
        pa.array(cols["source"], pa.string()),
        pa.array(cols["face_index"], pa.int32()),
        pa.array(b[:, 0]),
        pa.array(b[:, 1]),
        pa.array(b[:, 2]),
        pa.array(b[:, 3]),
        _fixed_list(np.asarray(lmks, dtype=np.float32).reshape(n, 10), 10),
        pa.array(np.asarray(scores, dtype=np.float32)),
        pa.array(q[:, 0]),
        pa.array(q[:, 1]),
        pa.array(q[:, 2]),
        pa.array(q[:, 3]),
        pa.array(q[:, 4]),
        pa.array(q[:, 5]),
        _fixed_list(np.asarray(embs, dtype=np.float32).reshape(n, dim), dim),
        pa.array([backend.name] * n, pa.string()),
        pa.array([backend.model_version] * n, pa.string()),
        pa.array(cols["image_width"], pa.int32()),
        pa.array(cols["image_height"], pa.int32()),
    ]
    table = pa.Table.from_arrays(arrays, schema=faces_schema(dim))
    if n:
        table = table.sort_by([("uid", "ascending"), ("face_index", "ascending")])
    return table


# Images per chunk for a backend that runs on a GPU: one model batch, large enough to keep the GPU busy;
# face_batch_size (8) suits CPU worker processes, not a GPU.
GPU_CHUNK_IMAGES = 256


def chunk_images(backend, batch_size: int, chunk_runner: Callable | None = None) -> int:
    """Rows per chunk of the face stage: ``batch_size``, at least :data:`GPU_CHUNK_IMAGES` when the chunks run
    on a GPU (:func:`chunks_run_on_gpu`)."""
    size = max(1, int(batch_size))
    return max(size, GPU_CHUNK_IMAGES) if chunks_run_on_gpu(backend, chunk_runner) else size


def chunks_run_on_gpu(backend, chunk_runner: Callable | None = None) -> bool:
    """Whether the face stage's chunks are analysed on a GPU: by the actors of the pool a Ray runner plans
    (``chunk_runner.pool_plan``: a CPU driver may feed GPU actors, and a GPU driver CPU actors), else by
    ``backend`` in this process."""
    plan = getattr(chunk_runner, "pool_plan", None)
    return plan().gpus_per_actor > 0 if plan is not None else gpu_backend(backend)


def decodes_ahead(backend) -> bool:
    """Whether the face stage decodes the next chunk on threads while ``backend`` analyses this one: on a
    GPU, and for a backend that decodes bytes itself (the torch stage, whatever its device). CPU backends
    keep one chunk at a time (their parallelism is worker processes)."""
    return gpu_backend(backend) or hasattr(backend, "decode_encoded")


def analyze_chunks(backend: FaceBackend, chunks: list, decode: Callable | None = None) -> Iterator[tuple]:
    """THE face stage over chunks of ``(rows, limits)``, results in chunk order: what the asset (through
    :func:`run_face_partition`), the Ray actors (:func:`ray_chunk_runner`), bench/bench_dlib_torch.py and
    the device-fused pass run. Each result is :func:`analyze_decoded`'s: one backend batch per chunk. When
    :func:`decodes_ahead`, chunk i+1 is read and decoded on a thread (nvjpeg on CUDA) while chunk i is
    analysed; otherwise chunk by chunk, as before. ``decode(chunk) -> (decoded [(row, image)], rejects,
    seconds)`` (default :func:`decode_rows`) is how a chunk becomes images: the device-fused pass
    (pipeline/per_image.py) passes its own, which reads input records once, takes ingestion's verdict from
    the backend's decode and hands back the face stage's batches of accepted photos."""
    decode = decode or (lambda chunk: decode_rows(chunk, backend))
    if not decodes_ahead(backend) or len(chunks) < 2:
        for chunk in chunks:
            yield analyze_decoded(backend, decode(chunk))
        return
    from pipeline.engine import prefetched

    for pending in prefetched(decode, chunks, ahead=1):
        yield analyze_decoded(backend, pending.result())


analyze_chunks.streams_chunks = True  # pipeline.ray_engine: an actor hands it all the chunks of a call


def analyze_rows(backend: FaceBackend, chunk: tuple[list[dict], IngestLimits | None]):
    """One chunk of image rows, read and decoded from their locators and analysed as one batch. Returns
    ``(records, rejects, timings)``: records ``(uid, source, height, width, faces)`` in row order, rejects
    ``(source, reason, detail, uid)`` of rows that no longer read or decode (in row order), and the
    seconds spent (decoding and the backend's own timings)."""
    return analyze_decoded(backend, decode_rows(chunk, backend))


def decode_rows(chunk: tuple[list[dict], IngestLimits | None], backend: FaceBackend | None = None):
    """The decoding half of :func:`analyze_rows`: ``(decoded [(row, image)], rejects, decode seconds)``.

    The image is an RGB uint8 (H, W, 3) array, except for a backend that decodes bytes itself
    (``decode_encoded``: the torch stage), which gets its own (3, H, W) tensors on its device. On a GPU
    backend the rows are read (and decoded) on threads; otherwise one by one, as every CPU backend did."""
    rows, limits = chunk
    t0 = time.perf_counter()
    if hasattr(backend, "decode_encoded"):
        decoded, rejects = _decode_on_backend(rows, limits, backend)
    else:
        pool = _decode_threads() if backend is not None and gpu_backend(backend) else None
        outcomes = list(pool.map(lambda row: _load_rgb(row, limits), rows) if pool else (_load_rgb(r, limits) for r in rows))
        decoded = [(row, rgb) for row, (rgb, _) in zip(rows, outcomes) if rgb is not None]
        rejects = [reject for _, reject in outcomes if reject is not None]
    return decoded, rejects, time.perf_counter() - t0


def _reject(row: dict, reason: str, detail: str) -> tuple:
    return (row["source"], reason, detail, row["uid"])


def _load_rgb(row: dict, limits: IngestLimits | None):
    """``(rgb, None)`` or ``(None, reject)``: the decode of one row, read again from its locator."""
    try:
        return load_image(row, limits).rgb, None
    except (DecodeError, OSError) as e:
        return None, _reject(row, getattr(e, "reason", "unreadable file"), str(e))


def _read_row(row: dict):
    """``(bytes, None)`` or ``(None, reject)``: a row's bytes (checked against its uid, see read_accepted_bytes)."""
    try:
        return read_accepted_bytes(row), None
    except OSError as e:
        return None, _reject(row, getattr(e, "reason", "unreadable file"), str(e))


def _decode_on_backend(rows: list[dict], limits: IngestLimits | None, backend) -> tuple[list, list]:
    """Rows read on the backend's threads, then decoded by the backend (nvjpeg on CUDA, its CPU threads
    otherwise), with the reject reasons and details pipeline.decode gives."""
    read = list(backend.decode_pool.map(_read_row, rows))
    readable = [i for i, (data, _) in enumerate(read) if data is not None]
    images = dict(zip(readable, backend.decode_encoded([read[i][0] for i in readable], limits)))
    decoded, rejects = [], []
    for i, (row, (_, unreadable)) in enumerate(zip(rows, read)):
        if unreadable is not None:
            rejects.append(unreadable)
        elif images[i].error is not None:
            rejects.append(_reject(row, images[i].error[0], str(DecodeError(*images[i].error))))
        else:
            decoded.append((row, images[i].image))
    return decoded, rejects


_THREADS = None


def _decode_threads():
    """Decoding threads for a GPU backend that takes RGB arrays (one pool per process)."""
    global _THREADS
    if _THREADS is None:
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.engine import available_cores

        _THREADS = ThreadPoolExecutor(min(16, available_cores()), thread_name_prefix="face-decode")
    return _THREADS


def _image_size(image) -> tuple[int, int]:
    """(height, width) of an RGB (H, W, 3) array or a (3, H, W) tensor."""
    return (image.shape[0], image.shape[1]) if isinstance(image, np.ndarray) else (image.shape[-2], image.shape[-1])


def analyze_decoded(backend: FaceBackend, decoded_chunk):
    """The model half of :func:`analyze_rows`: one backend batch over a decoded chunk ``(decoded [(row,
    image)], rejects, decode seconds)``; images are RGB arrays or, for the torch stage, its tensors."""
    decoded, rejects, decode_s = decoded_chunk
    before = dict(getattr(backend, "timings", {}) or {})
    images = [im for _, im in decoded]
    if images and not isinstance(images[0], np.ndarray):  # the torch stage's own decode (decode_rows)
        results = backend.analyze_tensors(images)
    else:
        results = backend.analyze(images) if images else []
    records = [(row["uid"], row["source"], *_image_size(im), faces) for (row, im), faces in zip(decoded, results)]
    timings = _timing_delta(before, getattr(backend, "timings", {}))
    timings["decode_s"] = timings.get("decode_s", 0.0) + decode_s
    return records, rejects, timings


def ray_chunk_runner(backend, actors: int, gpus_per_actor: float | None = None):
    """A ``chunk_runner`` for :func:`run_face_partition` that runs the chunks on a Ray actor pool:
    ``backend``'s configuration rebuilt once per actor, each call's chunks read, decoded and analysed in
    the actor by :func:`analyze_chunks`. The job's stats land in ``runner.stats``."""
    from pipeline.ray_engine import chunk_runner

    spec = getattr(backend, "build_spec", None)
    if spec is None:
        raise ValueError("the Ray engine rebuilds the face backend in its actors: build it with get_backend()")
    return chunk_runner("faces", None, analyze_chunks, _build_backend, (spec[0],), spec[1], actors, gpus_per_actor)


def gpu_backend(backend) -> bool:
    """Whether the backend runs its models on a GPU (then one process feeds it; no worker processes)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    for obj in (backend, getattr(backend, "_torch_descriptor", None), getattr(backend, "descriptor", None)):
        dev = getattr(obj, "device", None)
        if dev is not None and str(getattr(dev, "type", dev)).startswith("cuda"):
            return True
    return False


@dataclass
class FacePartitionResult:
    faces: pa.Table
    scan: pa.Table  # one row per image: how many faces it has (0 = no face; counted, not rejected)
    rejects: Rejects
    images_in: int
    seconds: float
    timings: dict = field(default_factory=dict)

    @property
    def images_with_faces(self) -> int:
        return sum(1 for n in self.scan.column("n_faces").to_pylist() if n > 0)

    @property
    def images_without_faces(self) -> int:
        return sum(1 for n in self.scan.column("n_faces").to_pylist() if n == 0)

    def reconciles(self) -> bool:
        return self.images_in == self.scan.num_rows + len(self.rejects)


def run_face_partition(
    images: pa.Table,
    backend,
    partition: str,
    limits: IngestLimits | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    chunk_runner: Callable | None = None,
) -> FacePartitionResult:
    """The face stage over one partition's accepted images, in chunks of ``batch_size`` rows (at least
    :data:`GPU_CHUNK_IMAGES` when they run on a GPU, here or in a Ray runner's actors), through :func:`analyze_chunks` here (decoding ahead on threads on a
    GPU or for the torch stage). ``workers`` > 1 spreads the chunks over that many worker processes instead
    (pipeline.engine; needs a backend built by ``get_backend``, which records how to rebuild it in a
    worker, and not on a GPU); ``chunk_runner(chunks) -> results in order`` hands them to another
    engine (Ray). Every way gives the same table: chunks are the same and come back in order."""
    from pipeline.engine import map_chunks

    rejects = Rejects(stage="faces", partition=partition)
    rows = images.to_pylist()
    t0 = time.perf_counter()
    size = chunk_images(backend, batch_size, chunk_runner)
    chunks = [(rows[i : i + size], limits) for i in range(0, len(rows), size)]
    spec = getattr(backend, "build_spec", None)
    if chunk_runner is not None:
        results = chunk_runner(chunks)
    elif workers > 1 and spec is not None and not gpu_backend(backend):
        results = map_chunks(analyze_rows, chunks, local_model=backend, workers=workers, factory=_build_backend,
                             factory_args=(spec[0],),
                             factory_kwargs=spec[1])
    else:
        results = analyze_chunks(backend, chunks)
    records: list[tuple] = []
    timings: dict[str, float] = {}
    done = 0
    for recs, rejected, t in results:
        records += recs
        for source, reason, detail, uid in rejected:
            rejects.add(source, reason, detail, uid=uid)
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
        done += len(recs) + len(rejected)
        if progress:
            progress(done, len(rows))
    faces = faces_table(records, backend)
    total = time.perf_counter() - t0
    timings = {**_stage_timings(records, faces.num_rows, total), **timings}
    # The scan lists the images the backend actually analysed and the faces it returned for each: a
    # measurement independent of the image rows it was given and of the faces table built from it, so
    # that counts_reconcile compares three things (see face_unit_checks).
    scan = pa.Table.from_pylist(
        [{"uid": uid, "source": source, "partition": partition, "n_faces": len(found), "backend": backend.name}
         for uid, source, _, _, found in records],
        schema=FACE_SCAN_SCHEMA,
    )
    return FacePartitionResult(faces, scan, rejects, len(rows), total, timings)


def _build_backend(name: str, **options):
    from .registry import get_backend

    return get_backend(name, **options)


def face_checks(faces: pa.Table, images: pa.Table) -> dict[str, tuple[bool, str]]:
    """Named data checks on a faces table: (passed, explanation)."""
    out: dict[str, tuple[bool, str]] = {}
    if faces.num_rows == 0:
        out["embeddings_unit_norm"] = (True, "no faces")
        out["bbox_inside_image"] = (True, "no faces")
        return out
    emb = embeddings_of(faces)
    finite = np.isfinite(emb).all(axis=1)
    norms = np.linalg.norm(emb, axis=1)
    bad = int((~finite | (np.abs(norms - 1) > 1e-3)).sum())
    out["embeddings_unit_norm"] = (bad == 0, f"{bad} of {faces.num_rows} embeddings not finite or not unit-norm")
    size = {r["uid"]: (r["width"], r["height"]) for r in images.select(["uid", "width", "height"]).to_pylist()}
    tol = 1.0  # detectors may place a box edge a pixel outside the frame
    outside = 0
    for uid, x1, y1, x2, y2 in zip(*(faces.column(c).to_pylist() for c in ("uid", "x1", "y1", "x2", "y2"))):
        w, h = size.get(uid, (0, 0))
        if not (-tol <= x1 < x2 <= w + tol and -tol <= y1 < y2 <= h + tol):
            outside += 1
    out["bbox_inside_image"] = (outside == 0, f"{outside} of {faces.num_rows} boxes outside their image")
    return out


def reconcile_faces(images_path, faces_path, scan_path, rejects_path) -> dict:
    """Read back what the face stage wrote: every image row is scanned or rejected, and the faces table
    holds, per image, as many rows as the scan says it has faces."""
    from pipeline.storage import read_parquet

    def read(path, columns):
        return read_parquet(path, columns=columns) if path is not None and path.exists() else None

    images = read(images_path, ["uid"])
    scan = read(scan_path, ["uid", "n_faces"])
    rejects = read(rejects_path, ["uid"])
    faces = read(faces_path, ["uid"])
    image_uids = set(images.column("uid").to_pylist()) if images is not None else set()
    scanned = dict(zip(scan.column("uid").to_pylist(), scan.column("n_faces").to_pylist())) if scan is not None else {}
    rejected = set(rejects.column("uid").to_pylist()) if rejects is not None else set()
    per_uid: dict[str, int] = {}
    for u in (faces.column("uid").to_pylist() if faces is not None else []):
        per_uid[u] = per_uid.get(u, 0) + 1
    unaccounted = sorted(image_uids - set(scanned) - rejected)
    count_mismatch = sorted(u for u in set(scanned) | set(per_uid) if scanned.get(u, 0) != per_uid.get(u, 0))
    return {
        "images": len(image_uids), "scanned": len(scanned), "rejected": len(rejected),
        "faces": sum(per_uid.values()), "images_unaccounted": unaccounted[:20],
        "face_count_mismatches": count_mismatch[:20],
        "passed": not unaccounted and not count_mismatch and len(image_uids) == len(scanned) + len(rejected),
    }


FACE_TABLES = ("faces", "face_scan", "rejects_faces")  # what one face-stage unit writes per partition
FACE_STAGE = "faces"


def face_unit_checks(images_path) -> dict:
    """The face stage's blocking checks, each reading back the staged files (``{table: path}``) and
    comparing them with the ingest stage's image rows (``images_path``), measured independently:

    - counts_reconcile: the image rows = the images the backend analysed (face_scan) + the images it
      could not decode (rejects_faces), and each image has as many rows in the faces file as the backend
      returned faces for it (face_scan.n_faces);
    - embeddings_unit_norm: every embedding as stored on disk is finite with unit L2 norm;
    - bbox_inside_image: every stored box lies inside its image as measured at ingestion (1 px tolerance).
    """
    from pipeline.storage import read_parquet

    def counts(staged):
        r = reconcile_faces(images_path, staged["faces"], staged["face_scan"], staged["rejects_faces"])
        detail = (f"{r['images']} image rows, {r['scanned']} scanned + {r['rejected']} rejected; "
                  f"{r['faces']} face rows; unaccounted {r['images_unaccounted']}, "
                  f"face-count mismatches {r['face_count_mismatches']}")
        return r["passed"], detail

    def stored(staged, name):
        images = read_parquet(images_path, columns=["uid", "width", "height"])
        return face_checks(read_parquet(staged["faces"]), images)[name]

    return {
        "counts_reconcile": counts,
        "embeddings_unit_norm": lambda staged: stored(staged, "embeddings_unit_norm"),
        "bbox_inside_image": lambda staged: stored(staged, "bbox_inside_image"),
    }


def face_unit_inputs(layout, key: str, backend) -> dict:
    """What a face unit is computed from: the committed images unit (its file's sha256 when committed;
    a removal request that rewrites the file later does not make the faces stale) and the face model. A
    unit committed from other inputs is stale and is run again."""
    from pipeline.commits import read_marker
    from pipeline.faces.stage_identity import stage_id, stage_key

    images_unit = read_marker(layout, "images", key) or {}
    # the face stage (backend, detector, landmarks, descriptor), not the hardware it ran on: a partition
    # built on a GPU is current for a run on a CPU with the same stage (pipeline/faces/stage_identity.py)
    stage = stage_id(backend.face_stage) if getattr(backend, "face_stage", None) else stage_key(backend.name, backend.model_version)
    return {"images_sha256": images_unit.get("files", {}).get("images", {}).get("sha256"), "face_stage": stage}


@dataclass
class FaceStageResult:
    images: pa.Table  # the partition's image rows the stage read
    partition: FacePartitionResult
    unit: object  # pipeline.commits.UnitResult: the checks' verdicts and the files committed


def run_face_stage(layout, key: str, backend, limits: IngestLimits | None = None, batch_size: int = 8,
                   progress: Callable[[int, int], None] | None = None, workers: int = 1,
                   chunk_runner: Callable | None = None) -> FaceStageResult:
    """The face stage of one partition, I/O included: read its image rows, detect and embed, and commit
    faces, face_scan and rejects_faces as one unit (pipeline.commits) once its blocking checks passed."""
    from pipeline.commits import PASSED, commit_unit, unit_state
    from pipeline.storage import read_parquet

    if unit_state(layout, "images", key) != PASSED:
        raise RuntimeError(f"partition {key}: its images are not committed (missing, failed their checks or killed "
                           "mid-write); run its ingestion first")
    images_path = layout.partition_file("images", key)
    images = read_parquet(images_path)
    res = run_face_partition(images, backend, key, limits, batch_size, progress=progress, workers=workers,
                             chunk_runner=chunk_runner)
    unit = commit_unit(layout, FACE_STAGE, key,
                       {"faces": res.faces, "face_scan": res.scan, "rejects_faces": res.rejects.to_table()},
                       face_unit_checks(images_path), face_unit_inputs(layout, key, backend))
    return FaceStageResult(images, res, unit)
