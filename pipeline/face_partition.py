"""The face stage over one ingested partition: decode each accepted image, detect, embed, report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.decode import DecodeError
from pipeline.ingest import IngestLimits, load_image
from pipeline.rejects import Rejects
from pipeline.viz import contact_sheet, draw_boxes, histogram_png

FACE_SCAN_SCHEMA = pa.schema(
    [("uid", pa.string()), ("source", pa.string()), ("partition", pa.string()), ("n_faces", pa.int32()), ("backend", pa.string())]
)


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
) -> FacePartitionResult:
    from pipeline.faces.stage import detect_faces

    rejects = Rejects(stage="faces", partition=partition)
    rows = images.to_pylist()
    t0 = time.perf_counter()

    def decoded() -> Iterator[tuple[str, str, np.ndarray]]:
        for i, row in enumerate(rows):
            if progress and i and i % 50 == 0:
                progress(i, len(rows))
            try:
                img = load_image(row, limits)
            except (DecodeError, OSError) as e:
                rejects.add(row["source"], getattr(e, "reason", "unreadable file"), str(e), uid=row["uid"])
                continue
            yield row["uid"], row["source"], img.rgb

    faces, _without, timings = detect_faces(decoded(), backend, batch_size=batch_size)
    rejected = {r["uid"] for r in rejects.rows}
    counts: dict[str, int] = {}
    for uid in faces.column("uid").to_pylist():
        counts[uid] = counts.get(uid, 0) + 1
    scan = pa.Table.from_pylist(
        [
            {"uid": r["uid"], "source": r["source"], "partition": partition, "n_faces": counts.get(r["uid"], 0), "backend": backend.name}
            for r in rows
            if r["uid"] not in rejected
        ],
        schema=FACE_SCAN_SCHEMA,
    )
    return FacePartitionResult(faces, scan, rejects, len(rows), time.perf_counter() - t0, dict(timings or {}))


def face_checks(faces: pa.Table, images: pa.Table) -> dict[str, tuple[bool, str]]:
    """Named data checks on a faces table: (passed, explanation)."""
    out: dict[str, tuple[bool, str]] = {}
    if faces.num_rows == 0:
        out["embeddings_unit_norm"] = (True, "no faces")
        out["bbox_inside_image"] = (True, "no faces")
        return out
    emb = np.asarray(faces.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    emb = emb.reshape(faces.num_rows, -1)
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


def face_figures(faces: pa.Table, images: pa.Table, limits: IngestLimits | None = None, max_images: int = 8) -> dict[str, bytes]:
    """PNG figures for the UI: face-size and detector-score histograms, a contact sheet with boxes."""
    figs: dict[str, bytes] = {}
    if faces.num_rows:
        sizes = np.minimum(np.asarray(faces.column("face_width").to_pylist()), np.asarray(faces.column("face_height").to_pylist()))
        figs["face_sizes"] = histogram_png({"faces": sizes}, "Face size (shorter box side)", "pixels")
        figs["det_scores"] = histogram_png({"faces": faces.column("det_score").to_pylist()}, "Detector score", "score")
    by_uid: dict[str, list[dict]] = {}
    for r in faces.select(["uid", "face_index", "x1", "y1", "x2", "y2", "det_score"]).to_pylist():
        by_uid.setdefault(r["uid"], []).append(r)
    rows = {r["uid"]: r for r in images.to_pylist()}
    tiles = []
    for uid in sorted(by_uid, key=lambda u: (-len(by_uid[u]), u))[:max_images]:
        try:
            rgb = load_image(rows[uid], limits).rgb
        except (DecodeError, OSError, KeyError):
            continue
        fs = by_uid[uid]
        im = draw_boxes(rgb, [(f["x1"], f["y1"], f["x2"], f["y2"]) for f in fs], [str(f["face_index"]) for f in fs])
        tiles.append((im, f"{len(fs)} face(s)\n{rows[uid]['source'][-22:]}"))
    figs["contact_sheet"] = contact_sheet(tiles, cols=4, tile=200)
    return figs


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
