"""Local photo folders -> the builder's input tables, with the face stage of ``pipeline.faces``.

``get_face_backend(name)`` is ``pipeline.faces.get_backend(name)`` (the direct-dlib fallback that lived
here is gone: ``pipeline.faces`` is always available now).

``faces_tables_from_folder`` turns a folder of photos into the three input tables of the builder
(images, faces, identities), labelling identity_id from ``identities/<name>/`` folder names (ground
truth) and, optionally, group photos by nearest labelled identity (open set: left unlabelled when the
best similarity is below a threshold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.ids import content_uid

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def get_face_backend(name: str = "dlib", **options):
    """The face backend used by the builder's helpers: ``pipeline.faces.get_backend(name, **options)``."""
    from pipeline.faces import get_backend

    return get_backend(name, **options)


def load_rgb_bytes(data: bytes) -> np.ndarray:
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


FACES_SCHEMA_EMB = 128


def _face_field(face, name, default=0.0):
    v = getattr(face, name, default)
    return default if v is None else v


def faces_tables(files: list[tuple[Path, str | None]], backend, source: str = "local") -> tuple[pa.Table, pa.Table, pa.Table]:
    """Images/faces/identities tables for ``[(path, identity_or_None), ...]``.

    A labelled photo gets its identity on its largest face only (the others stay unlabelled).
    """
    img_rows, face_rows, id_rows = [], [], []
    bname = getattr(backend, "name", "dlib")
    mver = getattr(backend, "model_version", "")
    for path, ident in files:
        data = Path(path).read_bytes()
        uid = content_uid(data)
        rgb = load_rgb_bytes(data)
        img_rows.append({"uid": uid, "source": source, "path": str(path), "offset": 0, "length": len(data), "width": rgb.shape[1], "height": rgb.shape[0]})
        faces = backend.analyze([rgb])[0]
        if not faces:
            continue
        areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
        largest = int(np.argmax(areas))
        for i, f in enumerate(faces):
            b = [float(v) for v in f.bbox]
            face_rows.append(
                {
                    "uid": uid, "source": source, "face_index": i,
                    "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3],
                    "landmarks": [float(v) for v in np.asarray(f.landmarks, dtype=np.float32).ravel()],
                    "det_score": float(_face_field(f, "det_score")),
                    "face_width": float(_face_field(f, "face_width", b[2] - b[0])),
                    "face_height": float(_face_field(f, "face_height", b[3] - b[1])),
                    "blur": float(_face_field(f, "blur")),
                    "yaw": float(_face_field(f, "yaw")), "pitch": float(_face_field(f, "pitch")), "roll": float(_face_field(f, "roll")),
                    "embedding": [float(v) for v in np.asarray(f.embedding, dtype=np.float32).ravel()],
                    "backend": bname, "model_version": mver,
                }
            )
            if ident is not None and i == largest:
                id_rows.append({"uid": uid, "face_index": i, "identity_id": ident})
    dim = len(face_rows[0]["embedding"]) if face_rows else FACES_SCHEMA_EMB
    images = pa.Table.from_pylist(img_rows, schema=IMAGES_SCHEMA)
    faces_t = pa.Table.from_pylist(face_rows, schema=faces_schema(dim))
    ids = pa.Table.from_pylist(id_rows, schema=IDENTITIES_SCHEMA)
    return images, faces_t, ids


IMAGES_SCHEMA = pa.schema(
    [("uid", pa.string()), ("source", pa.string()), ("path", pa.string()), ("offset", pa.int64()), ("length", pa.int64()), ("width", pa.int32()), ("height", pa.int32())]
)
IDENTITIES_SCHEMA = pa.schema([("uid", pa.string()), ("face_index", pa.int32()), ("identity_id", pa.string())])


def faces_schema(dim: int = 128) -> pa.Schema:
    f32 = pa.float32()
    return pa.schema(
        [("uid", pa.string()), ("source", pa.string()), ("face_index", pa.int32()),
         ("x1", f32), ("y1", f32), ("x2", f32), ("y2", f32), ("landmarks", pa.list_(f32, 10)),
         ("det_score", f32), ("face_width", f32), ("face_height", f32), ("blur", f32),
         ("yaw", f32), ("pitch", f32), ("roll", f32), ("embedding", pa.list_(f32, dim)),
         ("backend", pa.string()), ("model_version", pa.string())]
    )


def label_groups_by_nearest(faces: pa.Table, identities: pa.Table, group_uids: set[str], min_sim: float) -> pa.Table:
    """Give group-photo faces the identity of the nearest labelled face when cosine >= min_sim.

    Within one photo, faces and identities are matched one-to-one with the Hungarian algorithm
    (maximising the best per-identity similarity), so two faces in a photo never share an identity.
    """
    from scipy.optimize import linear_sum_assignment

    ids = identities.to_pylist()
    lab = {(r["uid"], r["face_index"]): r["identity_id"] for r in ids}
    rows = faces.to_pylist()
    emb = {(r["uid"], r["face_index"]): np.asarray(r["embedding"], np.float32) for r in rows}
    names = sorted(set(lab.values()))
    if not names:
        return identities
    per_name = {n: np.stack([emb[k] for k, v in lab.items() if v == n and k in emb]) for n in names}
    out = list(ids)
    for uid in sorted(group_uids):
        keys = sorted(k for k in emb if k[0] == uid and k not in lab)
        if not keys:
            continue
        S = np.array([[float((per_name[n] @ emb[k]).max()) for n in names] for k in keys])
        r, c = linear_sum_assignment(-S)
        for i, j in zip(r, c):
            if S[i, j] >= min_sim:
                out.append({"uid": uid, "face_index": keys[i][1], "identity_id": names[j]})
    return pa.Table.from_pylist(out, schema=IDENTITIES_SCHEMA)


def shared_faces_files(root: Path) -> list[tuple[Path, str | None]]:
    """``identities/<name>/*`` labelled by folder, then ``groups/*`` unlabelled, in sorted order."""
    root = Path(root)
    out: list[tuple[Path, str | None]] = []
    for d in sorted(p for p in (root / "identities").iterdir() if p.is_dir()):
        out += [(f, d.name) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if (root / "groups").is_dir():
        out += [(f, None) for f in sorted((root / "groups").iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return out
