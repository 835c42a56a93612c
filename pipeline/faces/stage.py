"""The face stage: images -> faces table rows (one row per detected face)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa

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
    dim = int(backend.embedding_dim)
    cols: dict[str, list] = {k: [] for k in ("uid", "source", "face_index", "image_width", "image_height")}
    boxes, lmks, embs, feats, scores = [], [], [], [], []
    without: list[str] = []
    n_images = 0
    start = time.perf_counter()
    before = dict(getattr(backend, "timings", {}) or {})

    def flush(batch):
        nonlocal n_images
        results = backend.analyze([b[2] for b in batch])
        for (uid, source, img), faces in zip(batch, results):
            n_images += 1
            if not faces:
                without.append(uid)
                continue
            order = sorted(
                range(len(faces)), key=lambda k: (float(faces[k].bbox[0]), float(faces[k].bbox[1]))
            )
            h, w = img.shape[:2]
            for idx, k in enumerate(order):
                f = faces[k]
                cols["uid"].append(uid)
                cols["source"].append(source)
                cols["face_index"].append(idx)
                cols["image_width"].append(w)
                cols["image_height"].append(h)
                boxes.append(f.bbox)
                lmks.append(f.landmarks.reshape(10))
                if f.embedding.shape[0] != dim:
                    raise ValueError(
                        f"backend {backend.name} returned a {f.embedding.shape[0]}-d embedding, expected {dim}"
                    )
                embs.append(f.embedding)
                scores.append(f.det_score)
                feats.append((f.face_width, f.face_height, f.blur, f.yaw, f.pitch, f.roll))
        if progress is not None:
            progress(n_images, len(boxes))

    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    total = time.perf_counter() - start

    n = len(boxes)
    schema = faces_schema(dim)
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
    table = pa.Table.from_arrays(arrays, schema=schema)
    if n:
        table = table.sort_by([("uid", "ascending"), ("face_index", "ascending")])
    after = dict(getattr(backend, "timings", {}) or {})
    timings = {
        "images": n_images,
        "faces": n,
        "images_without_face": len(without),
        "total_s": total,
        "images_per_s": n_images / total if total > 0 else 0.0,
        "faces_per_s": n / total if total > 0 else 0.0,
    }
    for k, v in after.items():
        if isinstance(v, (int, float)):
            timings[k] = float(v) - float(before.get(k, 0.0))
    return table, without, timings
