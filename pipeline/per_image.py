"""The per-image stages fused: each photo read and decoded once per run (issue 23).

Run separately, ingestion, faces, expressions and image-level scores each read and decode every photo
again (4 reads and 4 decodes a photo). The fused pass reads the bytes once per chunk of input records,
decodes them once (:func:`pipeline.ingest.inspect_record`), and on that one decoded array runs the face
backend (:func:`pipeline.faces.stage.analyze_decoded`), the expression landmarks and crops
(:func:`pipeline.expression.descriptor.locate_faces`) and the image scorers. Only small results leave a
worker: face records, 64 x 64 gray face crops (all the FER model reads), score rows; never photos.

What the fused pass does *not* change is who decides and who commits:

- ingestion decides in input order what each record is (removed, duplicate, reject, accepted) with the
  same code (:func:`pipeline.ingest.ingest_partition`, fed the fused chunks' outcomes), and commits
  ``images`` + ``rejects_ingest`` with its own check (:func:`pipeline.ingest.commit_ingest`);
- the other stages' tables are built by the stages' own partition functions (``run_face_partition``,
  ``describe_partition``, ``score_partition``), handed the fused results through their ``chunk_runner``
  instead of decoding, so the chunking, ordering and table building are theirs;
- those tables are only *precomputed*: written under ``$LINEUP_HOME/staging/precomputed/<stage>/<key>/``
  with what they were computed from, and only when the images unit passed its blocking check. The
  downstream asset takes them (:func:`take_precomputed`) only when that matches its own inputs exactly
  (the committed images file's sha256 and the face stage; the committed faces file's sha256 and the FER
  weights; the scorer fingerprint), then runs its own blocking checks and commits as usual
  (pipeline/commits.py). Otherwise (a re-run of one asset, another backend, a failed ingestion) it
  computes as before. A failed ingestion check therefore still keeps faces, expressions and scores out.

Batching: the face backend gets batches of ``face_batch_size`` decoded photos of one chunk, not of the
accepted rows, and the image scorers one batch per chunk (the stage's are 256 photos); the FER batches are
rebuilt exactly as describe_partition builds them. Backends whose result for a photo does not depend on
its batch (dlib, FER) give the same tables (tests/test_per_image.py compares them).

A face backend that decodes on its own device in large batches (the torch stage, any backend on CUDA) is
not fed those chunks: :class:`DeviceStream` reads each record once, decodes each photo once with the
backend's decoder inside the face stage's own loop (``analyze_chunks``, decoding a chunk ahead), takes
ingestion's verdict from that decode and hands the model exactly the face stage's batches, whose faces
such a backend depends on (:func:`device_fused`). It runs in one process (no worker processes, no Ray).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import ingest

# the face stage's table rule (faces numbered left to right), bound here: the boxes a worker crops for the
# expressions are those of the faces table, built once more by the stage itself from the same records
from pipeline.faces.stage import faces_table as _faces_table
from pipeline.ingest import IngestLimits, IngestResult, ingest_workers, inspect_record

PRECOMPUTED = ("faces", "face_expressions", "image_scores")  # the stages a fused pass precomputes
INPUTS_FILE = "inputs.json"


class PerImageModels:
    """What the fused pass runs on a decoded photo, built once per process, worker or Ray actor: the face
    backend, and optionally the expression landmarker (its FER model stays with the caller, which batches
    it as the expression stage does) and the image scorers."""

    def __init__(self, backend, expression_config=None, scoring_config=None, landmarker=None, scorer_stage=None):
        self.backend = backend
        self.expression_config = expression_config
        self.landmarker = landmarker
        if expression_config is not None and landmarker is None:
            from pipeline.expression.landmarks import DlibLandmarks

            self.landmarker = DlibLandmarks(upsample=expression_config.upsample)
        self.scorer_stage = scorer_stage
        if scoring_config is not None and scorer_stage is None:
            from pipeline.scoring.stage import ImageScorerStage

            self.scorer_stage = ImageScorerStage(scoring_config)


def build_models(backend_name: str, expression_config=None, scoring_config=None, **backend_options):
    """A worker's or actor's :class:`PerImageModels` (the backend rebuilt from its ``build_spec``)."""
    from pipeline.faces.registry import get_backend

    return PerImageModels(get_backend(backend_name, **backend_options), expression_config, scoring_config)


def worker_factory(backend, expression_config=None, scoring_config=None) -> tuple[tuple, dict]:
    """``(factory_args, factory_kwargs)`` of :func:`build_models` for workers or actors that rebuild these
    models (the backend from the ``build_spec`` get_backend recorded)."""
    spec = getattr(backend, "build_spec", None)
    if spec is None:
        raise ValueError("workers rebuild the face backend: build it with get_backend()")
    return (spec[0], expression_config, scoring_config), dict(spec[1])


def fused_chunk(models: PerImageModels, chunk):
    """One chunk of input records, each read and decoded once: ``(ingest outcomes, extras)``. The outcomes
    are :func:`pipeline.ingest.inspect_records`'; extras hold, per record, the face record
    ``(uid, source, h, w, faces)`` and the located expression faces, the chunk's image-score table, and
    counts (photos decoded, bytes read) and timings."""
    from pipeline.expression.descriptor import LocatedFaces, boxes_from_faces, locate_faces
    from pipeline.faces.stage import analyze_decoded

    records, limits, face_batch_size = chunk
    outcomes, decoded, seen = [], [], set()
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        res, img = inspect_record(rec, limits)
        outcomes.append(res)
        # a later record with the same bytes is never accepted (ingest_partition: a duplicate): not analysed
        if img is not None and res["uid"] not in seen:
            seen.add(res["uid"])
            decoded.append((i, {"uid": res["uid"], "source": rec.source}, img.rgb, rec.meta.get("caption")))
    timings = {"read_decode_s": time.perf_counter() - t0}
    per_record: list[dict | None] = [None] * len(records)
    size = max(1, int(face_batch_size))
    for b in range(0, len(decoded), size):
        part = decoded[b : b + size]
        face_records, _, t = analyze_decoded(models.backend, ([(row, rgb) for _, row, rgb, _ in part], [], 0.0))
        by_uid = {rec[0]: rec for rec in face_records}
        for i, row, _, _ in part:
            # None: the backend returned nothing for it; the face unit's counts_reconcile then fails
            per_record[i] = {"face_record": by_uid.get(row["uid"])}
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
    if models.landmarker is not None:
        t0 = time.perf_counter()
        for i, row, rgb, _ in decoded:
            rec = per_record[i]["face_record"]
            # only images with faces are described (describe_partition), with the face stage's boxes
            if rec is not None and rec[4]:
                boxes = boxes_from_faces(_faces_table([rec], models.backend))
                # compact: the partition's faces wait for the FER batches in the caller, 4 KB each
                per_record[i]["located"] = locate_faces([(row["uid"], rgb)], models.landmarker,
                                                        models.expression_config, boxes).compact()
            else:
                per_record[i]["located"] = LocatedFaces()
        timings["locate_s"] = time.perf_counter() - t0
    scores = None
    if models.scorer_stage is not None:
        from pipeline.scoring.stage import score_decoded

        t0 = time.perf_counter()
        scores = score_decoded(models.scorer_stage, [(row["uid"], rgb, cap) for _, row, rgb, cap in decoded])
        timings["image_scores_s"] = time.perf_counter() - t0
    # every record read was decoded once (the broken ones too, to find out), and none again
    return outcomes, {"per_record": per_record, "image_scores": scores, "timings": timings,
                      "decoded": sum(1 for res in outcomes if "uid" in res)}


class DeviceStream:
    """The device-fused pass over one partition's input records, for a face backend that decodes on its
    own device in large batches (:func:`pipeline.faces.stage.decodes_ahead`: the torch stage, any backend on
    CUDA). It is the ``decode`` step the face stage's own loop (:func:`pipeline.faces.stage.analyze_chunks`)
    runs on its thread one chunk ahead of the model, so the overlap bench/gpu_check.sh times is kept:

    - chunks of ``size`` records (the face stage's chunk size, :func:`pipeline.faces.stage.chunk_images`),
      each record's bytes read once on the backend's threads and hashed (:func:`pipeline.ingest.read_record`);
    - the bytes of each distinct uid that ingestion would accept if they decode (:func:`pipeline.ingest.verdict`,
      asked in input order) decoded once by the backend's own decoder (``decode_encoded``: nvjpeg on CUDA,
      pipeline.decode on its CPU threads for what nvjpeg does not take); ingestion's outcome (size, format,
      or the decoder's reject reason) is taken from that decode;
    - the accepted photos handed to the model in exactly the face stage's batches (``size`` accepted photos
      in input order, the rest after the last chunk): the torch stage's faces depend on its batch (one
      letterboxed canvas per batch), so the same batches give the same faces table.

    ``handed`` keeps each chunk's batch (row, image, caption, record index) until the caller has run the
    expression landmarks and the image scorers on it."""

    FLUSH = None  # the last chunk: what is left of the accepted photos, one batch

    def __init__(self, backend, records: list, limits: IngestLimits, removed: set[str] | None, size: int):
        from collections import deque

        from pipeline.faces.stage import _decode_threads

        self.backend, self.records, self.limits, self.removed, self.size = backend, records, limits, removed, size
        # a backend that takes RGB arrays (dlib, insightface on CUDA) has no decoder of its own: the face
        # stage's decoding threads and pipeline.decode, as its decode_rows would use for it
        self.pool = backend.decode_pool if hasattr(backend, "decode_encoded") else _decode_threads()
        self.decode_blobs = getattr(backend, "decode_encoded", None) or self._decode_on_threads
        self.outcomes: list[dict] = [{} for _ in records]
        self.seen: set[str] = set()  # uids accepted so far
        self.failed: dict[str, tuple[str, str]] = {}  # uid -> why its bytes did not decode
        self.pending: list[tuple] = []  # accepted, not yet handed to the model
        self.handed = deque()
        self.decoders: dict[str, int] = {}  # photos decoded, by decoder

    def chunks(self) -> list:
        return [(i, min(i + self.size, len(self.records))) for i in range(0, len(self.records), self.size)] + [
            self.FLUSH]

    def decode(self, chunk):
        """One chunk of records read, checked and decoded: ``(decoded [(row, image)], [], seconds)``, the
        decoded part being the batch this chunk completes (often none), as analyze_decoded takes it."""
        t0 = time.perf_counter()
        if chunk is self.FLUSH:
            batch, self.pending = self.pending, []
        else:
            batch = self._read_and_decode(*chunk)
        self.handed.append(batch)
        return [(row, image) for row, image, _, _ in batch], [], time.perf_counter() - t0

    def _read_and_decode(self, lo: int, hi: int) -> list:
        from pipeline.ingest import ACCEPTED, decode_failed, decoded, read_record, verdict

        records = self.records[lo:hi]
        read = list(self.pool.map(read_record, records))
        first: dict[str, int] = {}  # uid -> the record whose bytes are decoded for it
        for i, (rec, (res, data)) in enumerate(zip(records, read), start=lo):
            self.outcomes[i] = res
            if data is None or verdict(rec, res, self.removed, self.seen) != ACCEPTED:
                continue  # a listing reject, unreadable, removed, or a copy of bytes accepted before
            if res["uid"] in self.failed:  # the same bytes as a record that did not decode: the same verdict
                decode_failed(res, *self.failed[res["uid"]])
            else:
                first.setdefault(res["uid"], i)
        images = dict(zip(first, self.decode_blobs([read[i - lo][1] for i in first.values()], self.limits)))
        for image in images.values():  # what the device decoder left to the CPU decoder (PNG, WebP, rotated, ...)
            self.decoders[image.decoder] = self.decoders.get(image.decoder, 0) + 1
        for i, rec in enumerate(records, start=lo):
            res = self.outcomes[i]
            uid = res.get("uid")
            # in input order, so that of the same bytes twice the first is accepted, the second a duplicate
            if uid not in images or "decode_error" in res or verdict(rec, res, self.removed, self.seen) != ACCEPTED:
                continue
            image = images[uid]
            if image.error is not None:
                self.failed[uid] = image.error
                decode_failed(res, *image.error)
                continue
            decoded(res, getattr(image, "found", image))  # the facts: a DecodedImage, or the device's Decoded
            self.seen.add(uid)
            self.pending.append(({"uid": uid, "source": rec.source}, image.image, rec.meta.get("caption"), i))
        if len(self.pending) < self.size:
            return []  # the batch is completed by a later chunk (or the flush)
        batch, self.pending = self.pending[: self.size], self.pending[self.size :]
        return batch


    def _decode_on_threads(self, blobs: list[bytes], limits: IngestLimits) -> list:
        return list(self.pool.map(lambda data: _ArrayDecoded.of(data, limits), blobs))


@dataclass
class _ArrayDecoded:
    """A decode by pipeline.decode for a backend that takes RGB arrays, shaped as the torch stage's
    ``Decoded``: the image (here the DecodedImage's RGB array) or the reject reason, and what ingestion
    records (:func:`pipeline.ingest.decoded` reads them from ``found``)."""

    found: object | None  # pipeline.decode.DecodedImage
    error: tuple[str, str] | None = None
    decoder: str = "cpu"

    @property
    def image(self):
        return None if self.found is None else self.found.rgb

    @classmethod
    def of(cls, data: bytes, limits: IngestLimits):
        from pipeline.decode import DecodeError

        try:
            return cls(ingest.decode_image(data, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes,
                                           min_side=limits.min_side, max_decoded_bytes=limits.max_decoded_bytes))
        except DecodeError as e:
            return cls(None, (e.reason, e.detail))


def host_rgb(image) -> np.ndarray:
    """An RGB (H, W, 3) uint8 array of a decoded photo, for a model that runs on the CPU: a backend's
    (3, H, W) tensor copied from the device on CUDA (a view on the CPU); an RGB array as it is."""
    if isinstance(image, np.ndarray):
        return image
    return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())


def device_fused(models: PerImageModels, records: list, limits: IngestLimits, removed: set[str] | None,
                 face_batch_size: int):
    """The device-fused pass over one partition's records (:class:`DeviceStream` through the face stage's
    :func:`pipeline.faces.stage.analyze_chunks`): ``(ingest outcomes, extra)`` as :func:`fused_chunk` gives
    them for a chunk, here for all the records."""
    from pipeline.expression.descriptor import LocatedFaces, boxes_from_faces, locate_faces
    from pipeline.faces.stage import analyze_chunks, chunk_images

    stream = DeviceStream(models.backend, records, limits, removed, chunk_images(models.backend, face_batch_size))
    per_record: list[dict | None] = [None] * len(records)
    timings: dict[str, float] = {}
    scored = []

    def add(key, seconds):
        timings[key] = timings.get(key, 0.0) + seconds

    for face_records, _, t in analyze_chunks(models.backend, stream.chunks(), decode=stream.decode):
        batch = stream.handed.popleft()
        for k, v in t.items():
            add(k, v)
        by_uid = {rec[0]: rec for rec in face_records}
        hosts = {}  # host copies, only of what a CPU model reads
        t0 = time.perf_counter()
        for row, image, _, i in batch:
            # None: the backend returned nothing for it; the face unit's counts_reconcile then fails
            per_record[i] = {"face_record": by_uid.get(row["uid"])}
            if models.landmarker is not None:
                rec = per_record[i]["face_record"]
                if rec is not None and rec[4]:  # only images with faces are described (describe_partition)
                    hosts[i] = host_rgb(image)
                    boxes = boxes_from_faces(_faces_table([rec], models.backend))
                    per_record[i]["located"] = locate_faces([(row["uid"], hosts[i])], models.landmarker,
                                                            models.expression_config, boxes).compact()
                else:
                    per_record[i]["located"] = LocatedFaces()
        if models.landmarker is not None:
            add("locate_s", time.perf_counter() - t0)
        if models.scorer_stage is not None and batch:
            from pipeline.scoring.stage import score_decoded

            t0 = time.perf_counter()
            items = [(row["uid"], hosts[i] if i in hosts else host_rgb(image), caption)
                     for row, image, caption, i in batch]
            scored.append(score_decoded(models.scorer_stage, items))
            add("image_scores_s", time.perf_counter() - t0)
    scores = (pa.concat_tables([t for t, _ in scored]), scored[-1][1]) if scored else None
    return stream.outcomes, {"per_record": per_record, "image_scores": scores, "timings": timings,
                             "decoded": sum(stream.decoders.values()), "decoders": dict(stream.decoders)}


@dataclass
class PerImageResult:
    ingest: IngestResult
    faces: object  # pipeline.faces.stage.FacePartitionResult
    expressions: object | None  # pipeline.expression.descriptor.DescribeResult
    image_scores: tuple | None  # (IMAGE_SCORES_SCHEMA table, report)
    stats: dict = field(default_factory=dict)


def fused_partition(spec, models: PerImageModels, limits: IngestLimits | None = None, removed: set[str] | None = None,
                    face_batch_size: int = 8, workers: int = 1, expression_stage=None,
                    chunk_runner: Callable | None = None, factory: tuple[tuple, dict] | None = None,
                    progress: Callable[[int], None] | None = None) -> PerImageResult:
    """One partition through the fused pass: ingestion's result (as :func:`ingest_partition` gives it) and
    the faces, expressions (when ``expression_stage`` is given: its FER model runs here, in the stage's
    batches) and image scores (when ``models`` has scorers) of its accepted images, as the separate stages
    would compute them. In-process, ``workers`` processes are started only when the partition's bytes are
    worth them (:func:`pipeline.ingest.ingest_workers`), each holding :func:`build_models` of ``factory``
    (:func:`worker_factory`; None: no workers);
    ``chunk_runner(chunks) -> results in order`` runs :func:`fused_chunk` elsewhere (Ray). A backend that
    decodes on its device (:func:`pipeline.faces.stage.decodes_ahead`) gets :func:`device_fused` in this
    process instead (``workers`` unused; a ``chunk_runner`` is refused)."""
    from pipeline.engine import map_chunks
    from pipeline.faces.stage import decodes_ahead, run_face_partition

    limits = limits or IngestLimits()
    extras: list = []
    workers_used: list[int] = []

    on_device = decodes_ahead(models.backend)
    if on_device and chunk_runner is not None:
        raise ValueError("the device-fused pass runs in one process, in the face stage's batches: no chunk_runner")

    def run_fused(chunks):
        if on_device:  # one stream over the partition's records, regrouped in ingestion's chunks afterwards
            workers_used.append(1)
            outcomes, extra = device_fused(models, [r for records, _ in chunks for r in records], limits, removed,
                                           face_batch_size)
            extras.append(extra)
            out, start = [], 0
            for records, _ in chunks:
                out.append(outcomes[start : start + len(records)])
                start += len(records)
            return out
        fused = [(records, lim, face_batch_size) for records, lim in chunks]
        if chunk_runner is not None:
            results = chunk_runner(fused)
        else:
            n = ingest_workers([r for records, _ in chunks for r in records], workers)
            workers_used.append(n)
            args, kwargs = factory or ((), {})
            results = map_chunks(fused_chunk, fused, local_model=models, workers=n,
                                 factory=build_models if factory else None, factory_args=args, factory_kwargs=kwargs)
        out = []
        for outcomes, extra in results:
            out.append(outcomes)
            extras.append(extra)
        return out

    t0 = time.perf_counter()
    # ingestion's own decisions, looked up on its module (one home; a test may replace it there)
    ing = ingest.ingest_partition(spec, limits, progress=progress, removed=removed, chunk_runner=run_fused)
    ing.stats["inprocess_workers"] = workers_used[0] if workers_used else None
    per_record = [r for e in extras for r in e["per_record"]]
    by_uid = {row["uid"]: per_record[r] for row, r in zip(ing.images.select(["uid"]).to_pylist(), ing.row_records)}
    timings: dict[str, float] = {}
    for e in extras:
        for k, v in e["timings"].items():
            timings[k] = timings.get(k, 0.0) + v

    def served_faces(chunks):  # run_face_partition's chunks, answered from the fused records
        out = [([rec for r in rows if (rec := by_uid[r["uid"]]["face_record"]) is not None], [], {})
               for rows, _ in chunks]
        if out:
            out[0][2].update(timings)
        return out

    faces = run_face_partition(ing.images, models.backend, spec.key, limits, face_batch_size,
                               chunk_runner=served_faces)
    expressions = None
    if expression_stage is not None:
        from pipeline.expression.descriptor import LocatedFaces, describe_located, describe_partition

        def served_expressions(chunks):  # describe_partition's chunks: the FER batches it would run
            return [describe_located(LocatedFaces.joined(by_uid[r["uid"]]["located"] for r in rows),
                                     expression_stage.model) for rows, _, _ in chunks]

        expressions = describe_partition(ing.images, faces.faces, expression_stage, limits,
                                         chunk_runner=served_expressions)
    image_scores = None
    if models.scorer_stage is not None:
        from pipeline.scoring.stage import score_partition

        scored = [e["image_scores"] for e in extras if e["image_scores"] is not None]
        table = pa.concat_tables([t for t, _ in scored]) if scored else None
        report = scored[-1][1] if scored else {}

        def served_scores(chunks):  # score_partition's chunks, their rows picked from the fused tables
            index = {u: i for i, u in enumerate(table.column("uid").to_pylist())} if table is not None else {}
            return [(table.take(pa.array([index[r["uid"]] for r in rows], pa.int64())), report) for rows, _ in chunks]

        image_scores = score_partition(ing.images, models.scorer_stage, limits, chunk_runner=served_scores)
    stats = {"photos_decoded": sum(e["decoded"] for e in extras), "seconds": time.perf_counter() - t0,
             "timings": timings, "device_fused": on_device}
    if on_device:
        stats["photos_decoded_by"] = extras[0]["decoders"] if extras else {}
    return PerImageResult(ing, faces, expressions, image_scores, stats)


# ------------------------------------------------------------------------------ precomputed, then taken


def precomputed_dir(layout, stage: str, key: str):
    """Always local, beside the commit units' staging (pipeline/commits.py)."""
    return layout.home / "staging" / "precomputed" / stage / key


def _canonical(inputs: dict) -> dict:
    return json.loads(json.dumps(dict(inputs), sort_keys=True, default=str))


def put_precomputed(layout, stage: str, key: str, tables: dict[str, pa.Table], inputs: dict,
                    extra: dict | None = None) -> None:
    """Write a stage's tables for partition ``key`` with what they were computed from (``inputs``, the
    stage's own unit inputs). The inputs file is written last: without it nothing is taken."""
    from pipeline.storage import read_parquet, write_bytes_atomic, write_parquet_atomic

    folder = precomputed_dir(layout, stage, key)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, t in tables.items():
        # written, read back and written again: the file then has the bytes commit_unit writes when the
        # stage takes (reads) it, since a table in memory (sliced, taken, chunked arrays) may be written to
        # other bytes than the same rows read back; the faces file's sha256 is what expressions are keyed by
        path = folder / f"{name}.parquet"
        write_parquet_atomic(t, path)
        write_parquet_atomic(read_parquet(path), path)
    meta = {"inputs": _canonical(inputs), "tables": sorted(tables), **(extra or {})}
    write_bytes_atomic(json.dumps(meta, sort_keys=True, default=str).encode(), folder / INPUTS_FILE)


def take_precomputed(layout, stage: str, key: str, inputs: dict) -> tuple[dict[str, pa.Table], dict] | None:
    """The tables a fused pass precomputed for ``stage`` of partition ``key`` and their metadata, if they
    were computed from exactly ``inputs``; else None (then the stage computes them itself). Whatever was
    there is removed, taken or not (:func:`discard_precomputed`): a later run never takes it twice, and
    what was computed from other inputs is never right again."""
    from pipeline.storage import read_parquet

    folder = precomputed_dir(layout, stage, key)
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / INPUTS_FILE).read_text())
        # computed from other inputs: never right again
        tables = ({name: read_parquet(folder / f"{name}.parquet") for name in meta["tables"]}
                  if meta.get("inputs") == _canonical(inputs) else None)
    except (OSError, ValueError, KeyError):
        tables = None  # a write or a take cut short (a killed run): no inputs file, or a table gone
    discard_precomputed(layout, stage, key)
    return None if tables is None else (tables, meta)


def discard_precomputed(layout, stage: str, key: str) -> None:
    """Remove what a fused pass precomputed for ``stage`` of partition ``key``: taken, superseded (the stage
    committed or reused its own result) or never usable. The inputs file goes first, so that a kill halfway
    leaves a folder nothing takes, which the next take or discard removes; repeating it is harmless."""
    folder = precomputed_dir(layout, stage, key)
    (folder / INPUTS_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def drop_precomputed(layout, key: str) -> None:
    """Forget whatever a fused pass precomputed for partition ``key`` (its ingestion did not commit)."""
    for stage in PRECOMPUTED:
        discard_precomputed(layout, stage, key)


def _file_sha256(path) -> str:
    from pipeline.commits import file_digest

    return file_digest(path)["sha256"]


def run_per_image_stage(layout, key: str, models: PerImageModels, limits: IngestLimits | None = None,
                        removed: set[str] | None = None, face_batch_size: int = 8, workers: int = 1,
                        expression_stage=None, chunk_runner: Callable | None = None,
                        factory: tuple[tuple, dict] | None = None,
                        progress: Callable[[int], None] | None = None):
    """The fused pass over one registered partition, I/O included: the images unit committed as
    :func:`pipeline.ingest.run_ingest_stage` commits it and, only when it passed, the faces (and
    expressions, image scores) precomputed for their assets to take. Returns ``(spec, PerImageResult,
    UnitResult)``."""
    from pipeline.faces.stage import face_unit_inputs
    from pipeline.ingest import commit_ingest
    from pipeline.sources import load_partition

    spec = load_partition(layout.partitions, key)
    drop_precomputed(layout, key)
    res = fused_partition(spec, models, limits, removed, face_batch_size, workers, expression_stage, chunk_runner,
                          factory, progress)
    unit = commit_ingest(layout, spec, res.ingest)
    if not unit.passed:
        return spec, res, unit  # nothing downstream may use what this partition's photos gave
    f = res.faces
    face_inputs = face_unit_inputs(layout, key, models.backend)
    face_tables = {"faces": f.faces, "face_scan": f.scan, "rejects_faces": f.rejects.to_table()}
    put_precomputed(layout, "faces", key, face_tables, face_inputs,
                    {"images_in": f.images_in, "seconds": f.seconds,
                     "timings": {k: float(v) for k, v in f.timings.items()}})
    if res.expressions is not None:
        # the expression unit's inputs name the committed faces file by its sha256: the precomputed faces
        # file is written as commit_unit writes it (same table, same writer), so its digest is that of the
        # faces file once committed
        from pipeline.expression.descriptor import expression_unit_inputs

        faces_sha = _file_sha256(precomputed_dir(layout, "faces", key) / "faces.parquet")
        put_precomputed(layout, "face_expressions", key, {"face_expressions": res.expressions.descriptors,
                                                          "rejects": res.expressions.rejects},
                        expression_unit_inputs(faces_sha, expression_stage.config), {"stats": res.expressions.stats})
    if res.image_scores is not None:
        table, report = res.image_scores
        put_precomputed(layout, "image_scores", key, {"image_scores": table},
                        image_score_inputs(layout, key, models.scorer_stage.config),
                        {"report": {"unavailable": report.get("unavailable", {})}})
    return spec, res, unit


def image_score_inputs(layout, key: str, config) -> dict:
    """What a partition's image scores are computed from: its committed images file and the scorers."""
    from pipeline.commits import read_marker
    from pipeline.scoring.stage import scorer_fingerprint

    images_unit = read_marker(layout, "images", key) or {}
    return {"images_sha256": images_unit.get("files", {}).get("images", {}).get("sha256"),
            "scorer_fingerprint": scorer_fingerprint(config)}


# ------------------------------------------------------------------------------ the assets' side


def take_face_stage(layout, key: str, backend):
    """The face stage of partition ``key`` from what a fused pass precomputed, committed as
    :func:`pipeline.faces.stage.run_face_stage` commits it (same blocking checks, same unit inputs), or
    None when nothing was precomputed from exactly these inputs (the caller runs the stage itself)."""
    from pipeline.commits import PASSED, commit_unit, unit_state
    from pipeline.faces.stage import (
        FACE_STAGE,
        FacePartitionResult,
        FaceStageResult,
        face_unit_checks,
        face_unit_inputs,
    )
    from pipeline.rejects import Rejects
    from pipeline.storage import read_parquet

    if unit_state(layout, "images", key) != PASSED:
        discard_precomputed(layout, "faces", key)  # not from the committed images; a run of images writes anew
        return None  # run_face_stage says why it cannot run
    inputs = face_unit_inputs(layout, key, backend)
    taken = take_precomputed(layout, "faces", key, inputs)
    if taken is None:
        return None
    tables, meta = taken
    images_path = layout.partition_file("images", key)
    images = read_parquet(images_path)
    if not set(tables["face_scan"].column("uid").to_pylist()) <= set(images.column("uid").to_pylist()):
        return None  # the images file lost rows since (a removal request): the stage runs on what is there now
    rejects = Rejects(stage="faces", partition=key, rows=tables["rejects_faces"].to_pylist())
    res = FacePartitionResult(tables["faces"], tables["face_scan"], rejects, int(meta["images_in"]),
                              float(meta["seconds"]), {**meta.get("timings", {}), "precomputed": 1.0})
    unit = commit_unit(layout, FACE_STAGE, key, tables, face_unit_checks(images_path), inputs)
    return FaceStageResult(images, res, unit)


def take_expression_stage(layout, key: str, config):
    """The expression stage of partition ``key`` from what a fused pass precomputed, committed as
    :func:`pipeline.expression.descriptor.run_expression_stage` commits it, or None (run it then)."""
    from pipeline.commits import PASSED, commit_unit, read_marker, unit_state
    from pipeline.expression.descriptor import (
        EXPRESSION_STAGE,
        DescribeResult,
        descriptor_unit_checks,
        expression_unit_inputs,
    )
    from pipeline.storage import read_parquet

    if unit_state(layout, "faces", key) != PASSED:
        discard_precomputed(layout, EXPRESSION_STAGE, key)  # keyed by faces that were not committed
        return None
    faces_unit = read_marker(layout, "faces", key) or {}
    inputs = expression_unit_inputs(faces_unit.get("files", {}).get("faces", {}).get("sha256"), config)
    taken = take_precomputed(layout, EXPRESSION_STAGE, key, inputs)
    if taken is None:
        return None
    tables, meta = taken
    res = DescribeResult(tables["face_expressions"], tables["rejects"], {**meta.get("stats", {}), "precomputed": 1})
    faces = read_parquet(layout.partition_file("faces", key), columns=["uid", "face_index"])
    described = tables["face_expressions"].select(["uid", "face_index"]).to_pylist()
    if not {(r["uid"], r["face_index"]) for r in described} <= set(zip(*faces.to_pydict().values())):
        return None  # the faces file lost rows since (a removal request): the stage runs on what is there now
    unit = commit_unit(layout, EXPRESSION_STAGE, key, {"face_expressions": res.descriptors},
                       descriptor_unit_checks(faces), inputs)
    return res, unit


def take_image_scores(layout, key: str, config, images: pa.Table):
    """A partition's image scores from what a fused pass precomputed, as ``score_partition(images, ...)``
    returns them (``images``: the rows the caller scores, the collection's; a subset of the partition's
    when another partition owns some of its bytes), or None."""
    taken = take_precomputed(layout, "image_scores", key, image_score_inputs(layout, key, config))
    if taken is None:
        return None
    tables, meta = taken
    table = tables["image_scores"]
    index = {u: i for i, u in enumerate(table.column("uid").to_pylist())}
    wanted = images.column("uid").to_pylist()
    if any(u not in index for u in wanted):
        return None
    report = {**meta.get("report", {}), "images": len(wanted), "precomputed": True}
    return table.take(pa.array([index[u] for u in wanted], pa.int64())), report  # typed: none may be wanted


def ray_fused_runner(backend, expression_config, scoring_config, actors: int, gpus_per_actor: float | None = None):
    """A ``chunk_runner`` for :func:`fused_partition` on Ray: the models built once per actor, each chunk
    read and decoded in the actor. The job's stats land in ``runner.stats``."""
    from pipeline.ray_engine import chunk_runner

    args, kwargs = worker_factory(backend, expression_config, scoring_config)
    return chunk_runner("per_image", None, fused_chunk, build_models, args, kwargs, actors=actors,
                        gpus_per_actor=gpus_per_actor)
