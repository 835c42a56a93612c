"""Ingestion of one partition: read, hash, decode-check, deduplicate; rejects with reasons."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.decode import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    DecodeError,
    decode_image,
)
from pipeline.ids import UID_HEX_CHARS, content_uid
from pipeline.rejects import Rejects
from pipeline.removals import removed_source
from pipeline.sources import PartitionSpec, iter_partition, manifest_roots_from_env
from pipeline.storage import parquet_rows

IMAGES_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("source", pa.string()),
        ("partition", pa.string()),
        ("path", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("original_mode", pa.string()),
        ("exif_rotated", pa.bool_()),
        ("caption", pa.string()),
        ("url", pa.string()),
    ]
)


@dataclass
class IngestLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES  # loose files, tar members and manifest rows: checked before reading
    min_side: int = DEFAULT_MIN_SIDE
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES  # memory a decode may take (decode.decode_bytes)
    # folders manifest rows may point into besides the manifest's own and the input root
    manifest_roots: tuple[str, ...] = field(default_factory=manifest_roots_from_env)


@dataclass
class IngestResult:
    images: pa.Table
    rejects: Rejects
    inputs: int
    duplicates: int
    seconds: float
    stats: dict = field(default_factory=dict)
    row_records: list[int] = field(default_factory=list)  # per image row: the index of its input record

    @property
    def accepted(self) -> int:
        return self.images.num_rows

    def reconciles(self) -> bool:
        return self.inputs == self.accepted + len(self.rejects)


INGEST_CHUNK = 32  # records per unit of work handed to a worker process or a Ray task
# Bytes to read per extra worker process before one is started: a worker costs about 0.4 CPU-s to start
# (interpreter, numpy, Pillow, pyarrow) and hashing + decode-checking takes 0.01-0.04 CPU-s per MB
# (docs/scaling-out.md, "The in-process engine's workers"), so 32 MB (about 1 CPU-s of work) pays for its
# start a few times over.
INGEST_BYTES_PER_WORKER = 32_000_000


def ingest_workers(records: list, requested: int, bytes_per_worker: int | None = None) -> int:
    """How many worker processes a partition's records are worth: at most ``requested``, one per
    ``bytes_per_worker`` bytes to read (default INGEST_BYTES_PER_WORKER; 1 = all in this process, no
    pool started)."""
    per_worker = INGEST_BYTES_PER_WORKER if bytes_per_worker is None else bytes_per_worker
    to_read = sum(r.length for r in records if not r.reject_reason)
    return max(1, min(int(requested), to_read // max(1, per_worker)))


def inspect_record(rec, limits: IngestLimits):
    """Read, hash and decode-check one record: ``(outcome, decoded image or None)``. The outcome is what
    :func:`ingest_partition` decides on ({} for a record rejected at listing, ``read_error``, or ``uid``
    with ``image`` or ``decode_error``); the decoded image is there for a fused pass (pipeline/per_image.py)
    to run every per-image model on, so nothing decodes the photo again."""
    res, data = read_record(rec)
    if data is None:
        return res, None
    try:
        img = decode_image(data, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes, min_side=limits.min_side,
                           max_decoded_bytes=limits.max_decoded_bytes)
    except DecodeError as e:
        return decode_failed(res, e.reason, e.detail), None
    return decoded(res, img), img


def read_record(rec) -> tuple[dict, bytes | None]:
    """The reading half of :func:`inspect_record`: ``(outcome so far, bytes)``; the outcome holds the
    ``uid`` of the bytes read, or is final (a listing reject: {}, or ``read_error``) with no bytes."""
    if rec.reject_reason:
        return {}, None
    try:
        data = rec.read()
    except (OSError, ValueError) as e:
        return {"read_error": str(e)}, None
    return {"uid": content_uid(data)}, data


def decoded(res: dict, img) -> dict:
    """The outcome of a record whose bytes decoded: what ingestion records of the image, from anything
    with :class:`pipeline.decode.DecodedImage`'s fields (a device decoder's result too)."""
    res["image"] = (img.width, img.height, img.format, img.original_mode, img.orientation_applied,
                    img.orientation_note)
    return res


def decode_failed(res: dict, reason: str, detail: str) -> dict:
    """The outcome of a record whose bytes did not decode (pipeline.decode's reason and detail)."""
    res["decode_error"] = (reason, detail)
    return res


# what ingestion makes of a record (:func:`verdict`)
LISTING_REJECT, UNREADABLE, REMOVED, DUPLICATE, UNDECODABLE, ACCEPTED = (
    "listing reject", "unreadable", "removed", "duplicate", "undecodable", "accepted")


def verdict(rec, res: dict, removed: set[str] | None, seen) -> str:
    """What ingestion makes of a record from its outcome, given the bytes ``removed`` on request and the
    uids accepted before it in the partition (``seen``). One home for the order of these rules:
    :func:`ingest_partition` and the device-fused pass (pipeline/per_image.py, which asks it before decoding:
    an outcome with neither ``image`` nor ``decode_error`` yet is ACCEPTED when its bytes decode)."""
    if rec.reject_reason:
        return LISTING_REJECT
    if "read_error" in res:
        return UNREADABLE
    if removed and res["uid"] in removed:
        return REMOVED
    if res["uid"] in seen:
        return DUPLICATE
    if "decode_error" in res:
        return UNDECODABLE
    return ACCEPTED


def inspect_records(_model, chunk: tuple[list, IngestLimits]) -> list[dict]:
    """Read, hash and decode-check each record of a chunk on its own (no state shared between records):
    the part of ingestion every engine spreads over cores. :func:`ingest_partition` decides, in input
    order, what each outcome means (removed, duplicate, reject, accepted)."""
    records, limits = chunk
    return [inspect_record(rec, limits)[0] for rec in records]


def ingest_partition(
    spec: PartitionSpec,
    limits: IngestLimits | None = None,
    progress: Callable[[int], None] | None = None,
    removed: set[str] | None = None,
    workers: int = 1,
    chunk_runner: Callable | None = None,
) -> IngestResult:
    """Read, hash and decode-check one partition on its own. The same bytes twice in this partition:
    the second is a "duplicate image" reject. The same bytes in another partition are not looked up
    here (that would depend on which partition finished first): the collection decides who owns an
    image (sql/image_copies.sql) and reports the other copies as duplicates. Bytes in ``removed``
    (pipeline.removals) are rejected as "removed on request".

    The per-record work (:func:`inspect_records`) runs in chunks: here, on ``workers`` worker processes,
    or through ``chunk_runner(chunks) -> results in order`` (Ray); the outcome is the same either way."""
    from pipeline.engine import map_chunks

    limits = limits or IngestLimits()
    rejects = Rejects(stage="ingest", partition=spec.key)
    rows: list[dict] = []
    row_records: list[int] = []
    seen: dict[str, str] = {}
    inputs = duplicates = 0
    orientation_notes: dict[str, str] = {}  # accepted images whose EXIF orientation had to be guessed
    t0 = time.perf_counter()
    records = list(iter_partition(spec, max_member_bytes=limits.max_bytes, manifest_roots=limits.manifest_roots))
    chunks = [(records[i : i + INGEST_CHUNK], limits) for i in range(0, len(records), INGEST_CHUNK)]
    workers_used = ingest_workers(records, workers)
    if chunk_runner is not None:
        results = chunk_runner(chunks)
    else:
        results = map_chunks(inspect_records, chunks, workers=workers_used, factory=_no_model)
    inspected = (res for chunk_results in results for res in chunk_results)
    for index, (rec, res) in enumerate(zip(records, inspected)):
        inputs += 1
        if progress and inputs % 100 == 0:
            progress(inputs)
        kind = verdict(rec, res, removed, seen)
        if kind == LISTING_REJECT:
            rejects.add(rec.source, rec.reject_reason, rec.reject_detail)
            continue
        if kind == UNREADABLE:
            rejects.add(rec.source, "unreadable file", res["read_error"])
            continue
        uid = res["uid"]
        if kind == REMOVED:
            # named by a hash of the content only: file names often name the person
            rejects.add(removed_source(uid), "removed on request", "these bytes were removed by a removal request")
            continue
        if kind == DUPLICATE:
            duplicates += 1
            rejects.add(rec.source, "duplicate image", f"same bytes as {seen[uid]}", uid=uid)
            continue
        if kind == UNDECODABLE:
            rejects.add(rec.source, *res["decode_error"], uid=uid)
            continue
        width, height, fmt, mode, rotated, orientation_note = res["image"]
        seen[uid] = rec.source
        if orientation_note:
            orientation_notes[rec.source] = orientation_note
        row_records.append(index)
        rows.append(
            {
                "uid": uid,
                "source": rec.source,
                "partition": spec.key,
                "path": rec.path,
                "offset": rec.offset,
                "length": rec.length,
                "width": width,
                "height": height,
                "format": fmt,
                "original_mode": mode,
                "exif_rotated": rotated,
                "caption": rec.meta.get("caption"),
                "url": rec.meta.get("url"),
            }
        )
    if inputs != len(records):
        raise RuntimeError(f"{spec.key}: {inputs} inspection results for {len(records)} inputs")
    table = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
    seconds = time.perf_counter() - t0
    return IngestResult(
        images=table,
        rejects=rejects,
        inputs=inputs,
        duplicates=duplicates,
        seconds=seconds,
        stats={
            "images_per_s": (inputs / seconds) if seconds > 0 else 0.0,
            "inprocess_workers": None if chunk_runner is not None else workers_used,  # ingest_workers: 1 = no pool
            "orientation_fallbacks": len(orientation_notes),
            "orientation_notes": dict(list(orientation_notes.items())[:50]),  # the first ones, to look at
        },
        row_records=row_records,
    )


def _no_model():
    return None


def ray_ingest_runner(tasks: int):
    """A ``chunk_runner`` for :func:`ingest_partition` on Ray: every chunk read, hashed and decode-checked
    in a Ray task (no model, so no actors). The job's stats land in ``runner.stats``."""
    from pipeline.ray_engine import chunk_runner

    return chunk_runner("ingest", None, inspect_records, actors=tasks)


_CONTENT_UID = re.compile(f"[0-9a-f]{{{UID_HEX_CHARS}}}")


class PhotoChanged(OSError):
    """The bytes at an accepted image's locator are no longer the bytes it was ingested with (the file was
    edited in place or replaced): reading them would give another photo under the old uid."""

    reason = "photo changed since ingestion"


def read_accepted_bytes(row: dict) -> bytes:
    """An accepted image's bytes read again from its (path, offset, length) locator, checked against its uid
    (the uid is their hash), so a photo edited in place raises :class:`PhotoChanged` (an OSError, which
    every reader already turns into a skip or a reject) instead of standing in for the one ingested."""
    from pipeline.sources import read_bytes

    data = read_bytes(row["path"], int(row["offset"]), int(row["length"]))
    uid = row.get("uid")
    # every uid ingestion makes is a content hash; a table made by hand (tests' synthetic ids) cannot be checked
    if isinstance(uid, str) and _CONTENT_UID.fullmatch(uid) and content_uid(data) != uid:
        raise PhotoChanged(f"{row.get('source') or row['path']}: the bytes read now hash to {content_uid(data)}, "
                           f"not to its uid {row['uid']}: edited or replaced since ingestion; re-run its partition")
    return data


def load_image(row: dict, limits: IngestLimits | None = None):
    """Decode an accepted image again from its (path, offset, length) locator (bytes checked against its uid)."""
    limits = limits or IngestLimits()
    data = read_accepted_bytes(row)
    return decode_image(data, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes, min_side=limits.min_side,
                           max_decoded_bytes=limits.max_decoded_bytes)


def decoded_images(images: pa.Table, limits: IngestLimits | None = None, only: set[str] | None = None):
    """(uid, rgb) for each accepted image (optionally only some uids); unreadable ones are skipped
    here because the faces stage has already recorded them as rejects."""
    for row in images.to_pylist():
        if only is not None and row["uid"] not in only:
            continue
        try:
            yield row["uid"], load_image(row, limits).rgb
        except (DecodeError, OSError):
            continue


def reconcile_ingest(spec, images_path: Path, rejects_path: Path) -> dict:
    """The partition's inputs listed again from the source (sources.count_partition_inputs) against the
    image rows and reject rows read back from the files written."""
    from pipeline.sources import count_partition_inputs

    listed = count_partition_inputs(spec)
    rows = parquet_rows(images_path) if images_path.exists() else 0
    rejected = parquet_rows(rejects_path) if rejects_path.exists() else 0
    return {"inputs_listed": listed, "image_rows": rows, "reject_rows": rejected, "passed": listed == rows + rejected}


INGEST_STAGE = "images"  # the commit unit (pipeline/commits.py) of images + rejects_ingest


def run_ingest_stage(layout, key: str, limits: IngestLimits | None = None, removed: set[str] | None = None,
                     workers: int = 1, chunk_runner: Callable | None = None,
                     progress: Callable[[int], None] | None = None):
    """Ingest one registered partition, I/O included: ``images`` and ``rejects_ingest`` committed as one
    unit once counts_reconcile passed on the staged files (the source listed again = image rows + reject
    rows read back). Returns ``(spec, IngestResult, UnitResult)``."""
    from pipeline.sources import load_partition

    spec = load_partition(layout.partitions, key)
    res = ingest_partition(spec, limits, progress=progress, removed=removed, workers=workers, chunk_runner=chunk_runner)
    return spec, res, commit_ingest(layout, spec, res)


def commit_ingest(layout, spec, res: IngestResult):
    """``images`` and ``rejects_ingest`` of one ingested partition committed as one unit once
    counts_reconcile passed on the staged files. Returns the UnitResult."""
    import hashlib

    from pipeline.commits import commit_unit

    def counts_reconcile(staged):
        r = reconcile_ingest(spec, staged["images"], staged["rejects_ingest"])
        return r["passed"], (f"{r['inputs_listed']} inputs listed from the source; {r['image_rows']} image rows + "
                             f"{r['reject_rows']} reject rows read back")

    return commit_unit(layout, INGEST_STAGE, spec.key, {"images": res.images, "rejects_ingest": res.rejects.to_table()},
                       {"counts_reconcile": counts_reconcile},
                       {"input": hashlib.sha256(spec.to_json().encode()).hexdigest()[:32]})
