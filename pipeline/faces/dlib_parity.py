"""Parity of the PyTorch port of dlib's descriptor against dlib itself, on real photos.

Used by tests/test_faces_dlib_torch.py (a subset of the photos) and bench/bench_dlib_torch.py
(every face of ../shared/data/faces, with timings). Faces are found the way the default face
stage finds them (:class:`pipeline.faces.dlib_backend.DlibBackend`: HOG, dlib's 5-point shape
at full resolution); the reference is dlib's own ``compute_face_descriptor`` on the same image
and shapes (dlib cuts its own chips inside), so a chip difference shows up in the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.decode import upright

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class ParityFace:
    file: str  # relative to the photo folder
    face_index: int  # order of detection within the image
    landmarks: np.ndarray  # int (5, 2): dlib's 5 points, as its shape predictor returns them
    reference: np.ndarray  # float32 (128,): dlib's compute_face_descriptor (raw, not normalised)
    dlib_chip: np.ndarray  # uint8 (150, 150, 3): dlib.get_face_chips on the same shapes


@dataclass
class ParityImage:
    file: str
    image: np.ndarray
    faces: list[ParityFace]


def photo_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(upright(im).convert("RGB"))


def collect_faces(folder: Path, files: list[Path] | None = None, backend=None) -> list[ParityImage]:
    """Every face the default dlib face stage finds in ``files`` (default: every photo under
    ``folder``), with dlib's reference descriptors and chips."""
    import dlib

    from .dlib_backend import DlibBackend

    backend = backend or DlibBackend(descriptor="dlib")
    out = []
    for path in files if files is not None else photo_files(folder):
        img = load_rgb(path)
        kept, shapes, _ = backend._analyze_image(img)
        faces = []
        if kept:
            refs = backend._rec.compute_face_descriptor(img, shapes, 0)
            chips = dlib.get_face_chips(img, shapes, 150, 0.25)
            for i, (shape, ref, chip) in enumerate(zip(shapes, refs, chips)):
                pts = np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)], dtype=np.int64)
                faces.append(ParityFace(str(path.relative_to(folder)), i, pts, np.asarray(ref, np.float32), np.asarray(chip)))
        out.append(ParityImage(str(path.relative_to(folder)), img, faces))
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def our_chips(images: list[ParityImage]) -> list[np.ndarray]:
    """Chips cut by :mod:`pipeline.faces.dlib_chip` (numpy, dlib's algorithm) from the same landmarks."""
    from .dlib_chip import extract_face_chips, face_chip_details

    chips = []
    for im in images:
        chips += extract_face_chips(im.image, [face_chip_details(f.landmarks) for f in im.faces])
    return chips


def identity_agreement(files: list[str], a: np.ndarray, b: np.ndarray, backend_name: str = "dlib") -> dict:
    """Cluster two embedding sets of the same faces with the default identity pipeline and
    compare the partitions (identity ids are arbitrary labels, so compare co-membership)."""
    from sklearn.metrics import adjusted_rand_score

    from pipeline.identity.build import build_identities

    def labels(E):
        E = np.asarray(E, np.float32)
        E = E / np.linalg.norm(E, axis=1, keepdims=True)
        r = build_identities(files, np.arange(len(files)), E, backend_name=backend_name)
        t = r.assignments
        key = dict(zip(zip(t.column("uid").to_pylist(), t.column("face_index").to_pylist()), t.column("identity_id").to_pylist()))
        return np.unique([key[(u, i)] for i, u in enumerate(files)], return_inverse=True)[1]

    la, lb = labels(a), labels(b)
    same_a = la[:, None] == la[None, :]
    same_b = lb[:, None] == lb[None, :]
    disagree_rows = int((same_a != same_b).any(axis=1).sum())
    return {
        "faces": len(files),
        "identities_a": int(la.max() + 1) if len(la) else 0,
        "identities_b": int(lb.max() + 1) if len(lb) else 0,
        "adjusted_rand": float(adjusted_rand_score(la, lb)) if len(la) else float("nan"),
        "faces_with_different_co_membership": disagree_rows,
        "identical_partition": disagree_rows == 0,
    }
