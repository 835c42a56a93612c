"""Labelled photo folders through the production face stage, for tests, calibration and benchmarks.

A labelled folder is ``identities/<name>/<photo>`` (optionally with ``groups/<photo>``, unlabelled),
as ``../shared/data/faces`` is laid out. Every photo is decoded with :func:`pipeline.decode.decode_image`
and analysed with :func:`pipeline.faces.stage.detect_faces`, exactly as the ``images`` and ``faces``
assets do, so there is one way faces are made. The folder name labels the largest face of each
labelled photo (the others stay unlabelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.decode import IMAGE_EXTENSIONS, decode_image
from pipeline.ids import content_uid

from .stage import detect_faces, embeddings_of

IDENTITIES_SCHEMA = pa.schema([("uid", pa.string()), ("face_index", pa.int32()), ("identity_id", pa.string())])


def load_rgb_bytes(data: bytes) -> np.ndarray:
    """RGB uint8 pixels of image bytes, decoded by the ingest rules (EXIF orientation applied)."""
    return decode_image(data).rgb


def labelled_files(root: Path) -> list[tuple[Path, str | None]]:
    """``identities/<name>/*`` labelled by folder, then ``groups/*`` unlabelled, in sorted order."""
    root = Path(root)
    out: list[tuple[Path, str | None]] = []
    for d in sorted(p for p in (root / "identities").iterdir() if p.is_dir()):
        out += [(f, d.name) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if (root / "groups").is_dir():
        out += [(f, None) for f in sorted((root / "groups").iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    return out


def faces_tables(files: list[tuple[Path, str | None]], backend, source: str = "local") -> tuple[pa.Table, pa.Table, pa.Table]:
    """(images, faces, identities) tables for ``[(path, identity_or_None), ...]``, in the schemas of
    the ``images``, ``faces`` and ``identities`` tables."""
    from pipeline.ingest import IMAGES_SCHEMA

    img_rows, items, labels = [], [], {}
    for path, ident in files:
        data = Path(path).read_bytes()
        uid = content_uid(data)
        img = decode_image(data)
        img_rows.append({"uid": uid, "source": source, "path": str(path), "offset": 0, "length": len(data),
                         "width": img.width, "height": img.height, "format": img.format,
                         "original_mode": img.original_mode, "exif_rotated": img.orientation_applied})
        items.append((uid, source, img.rgb))
        if ident is not None:
            labels[uid] = ident
    faces, _without, _timings = detect_faces(items, backend)
    id_rows = []
    if faces.num_rows:
        area = np.asarray((faces.column("x2").to_numpy() - faces.column("x1").to_numpy())
                          * (faces.column("y2").to_numpy() - faces.column("y1").to_numpy()))
        best: dict[str, tuple[float, int]] = {}
        for uid, fi, a in zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist(), area):
            if uid in labels and (uid not in best or a > best[uid][0]):
                best[uid] = (float(a), int(fi))
        id_rows = [{"uid": u, "face_index": fi, "identity_id": labels[u]} for u, (_, fi) in sorted(best.items())]
    images = pa.Table.from_pylist(img_rows, schema=IMAGES_SCHEMA)
    return images, faces, pa.Table.from_pylist(id_rows, schema=IDENTITIES_SCHEMA)


@dataclass(frozen=True)
class LabelledFaces:
    """One embedding per labelled photo (its largest face) with its identity label."""

    files: list[str]  # "<name>/<photo>"
    labels: np.ndarray  # int64 (N,), index into ``names``
    names: list[str]
    embeddings: np.ndarray  # float32 (N, D), L2-normalised
    no_face: list[str]  # labelled photos in which no face was found (reported, not dropped silently)


def labelled_embeddings(root: Path, backend) -> LabelledFaces:
    """The largest face of every ``identities/<name>/<photo>`` under ``root``, embedded by ``backend``."""
    files = [(p, i) for p, i in labelled_files(root) if i is not None]
    images, faces, ids = faces_tables(files, backend)
    row_of = {(u, int(f)): k for k, (u, f) in enumerate(zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist()))}
    emb = embeddings_of(faces)
    path_of = dict(zip(images.column("uid").to_pylist(), images.column("path").to_pylist()))
    labelled = {r["uid"]: (r["face_index"], r["identity_id"]) for r in ids.to_pylist()}
    names = sorted({i for _, i in files})
    rel, lab, vecs, no_face = [], [], [], []
    for uid, p in path_of.items():
        name = f"{Path(p).parent.name}/{Path(p).name}"
        if uid not in labelled:
            no_face.append(name)
            continue
        fi, ident = labelled[uid]
        rel.append(name)
        lab.append(names.index(ident))
        vecs.append(emb[row_of[(uid, fi)]])
    E = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, emb.shape[1]), np.float32)
    return LabelledFaces(rel, np.asarray(lab, dtype=np.int64), names, E, no_face)


def label_groups_by_nearest(faces: pa.Table, identities: pa.Table, group_uids: set[str], min_sim: float) -> pa.Table:
    """Give group-photo faces the identity of the nearest labelled face when cosine >= min_sim.

    Within one photo, faces and identities are matched one-to-one with the Hungarian algorithm
    (maximising the best per-identity similarity), so two faces in a photo never share an identity.
    """
    from scipy.optimize import linear_sum_assignment

    ids = identities.to_pylist()
    lab = {(r["uid"], r["face_index"]): r["identity_id"] for r in ids}
    E = embeddings_of(faces)
    emb = {(u, int(f)): E[k] for k, (u, f) in enumerate(zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist()))}
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
