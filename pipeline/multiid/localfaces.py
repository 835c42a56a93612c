"""Faces for the multi-identity builder when ``pipeline.faces`` is not available (fallback, tests, bench).

``get_face_backend(name)`` returns ``pipeline.faces.get_backend(name)`` when that package imports, and
otherwise (for ``"dlib"``) :class:`DlibDirect`: dlib's HOG detector -> 5-point shape predictor ->
``dlib_face_recognition_resnet_model_v1`` (128-d, L2-normalised here), with the weights shipped in the
``face-recognition-models`` wheel, located without importing that package. Pose (yaw/pitch/roll) is
estimated from the 5 landmarks with a rough geometric heuristic (degrees, signed); blur is the variance
of the Laplacian of the grey face crop resized to 112x112. Good enough to rank references by pose
difference; not a head-pose model.

``faces_tables_from_folder`` turns a folder of photos into the three input tables of the builder
(images, faces, identities), labelling identity_id from ``identities/<name>/`` folder names (ground
truth) and, optionally, group photos by nearest labelled identity (open set: left unlabelled when the
best similarity is below a threshold).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.ids import content_uid

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face-recognition-models is not installed (needed for dlib descriptors)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@dataclass
class Face:
    bbox: tuple[float, float, float, float]
    landmarks: np.ndarray  # (5, 2)
    det_score: float
    embedding: np.ndarray  # (128,), unit norm
    face_width: float
    face_height: float
    blur: float
    yaw: float
    pitch: float
    roll: float
    extra: dict = field(default_factory=dict)


def pose_from_5pts(lm: np.ndarray) -> tuple[float, float, float]:
    """Rough (yaw, pitch, roll) in degrees from 5 points: two eyes (2 points each or 1 each) + nose."""
    lm = np.asarray(lm, dtype=np.float64).reshape(-1, 2)
    if lm.shape[0] != 5:
        return 0.0, 0.0, 0.0
    e1, e2, nose = (lm[0] + lm[1]) / 2, (lm[2] + lm[3]) / 2, lm[4]
    mid = (e1 + e2) / 2
    iod = float(np.linalg.norm(e1 - e2)) or 1.0
    d = e2 - e1
    roll = float(np.degrees(np.arctan2(d[1], d[0])))
    if abs(roll) > 90:
        roll = roll - 180 * np.sign(roll)
    # rotate nose offset into the eye frame
    c, s = np.cos(np.radians(-roll)), np.sin(np.radians(-roll))
    off = nose - mid
    ox, oy = c * off[0] - s * off[1], s * off[0] + c * off[1]
    yaw = float(np.degrees(np.arcsin(np.clip(ox / (0.6 * iod), -1, 1))))
    pitch = float(np.degrees(np.arcsin(np.clip((oy / iod - 0.77) / 0.6, -1, 1))))
    return yaw, pitch, roll


def laplacian_blur(gray: np.ndarray) -> float:
    from scipy.ndimage import laplace

    return float(laplace(gray.astype(np.float32)).var())


class DlibDirect:
    """Same ``analyze([rgb, ...]) -> [[Face, ...], ...]`` interface as ``pipeline.faces`` backends."""

    name = "dlib"
    model_version = "dlib_face_recognition_resnet_model_v1+hog"

    def __init__(self, detect_max_side: int = 800) -> None:
        import dlib

        models = _models_dir()
        self._dlib = dlib
        self.detect_max_side = detect_max_side
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def _detect(self, rgb: np.ndarray):
        from PIL import Image

        h, w = rgb.shape[:2]
        scale = min(1.0, self.detect_max_side / max(h, w))
        small = rgb if scale == 1.0 else np.asarray(Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        upsample = 2 if max(small.shape[:2]) <= 400 else 1
        rects, scores, _ = self.detector.run(small, upsample, 0.0)
        return [((r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale), float(sc)) for r, sc in zip(rects, scores)]

    def analyze(self, images: list[np.ndarray]) -> list[list[Face]]:
        from PIL import Image

        dlib = self._dlib
        out = []
        for rgb in images:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            h, w = rgb.shape[:2]
            faces = []
            for (x1, y1, x2, y2), score in self._detect(rgb):
                rect = dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2)))
                shape = self.shape(rgb, rect)
                lm = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float32)
                emb = np.asarray(self.encoder.compute_face_descriptor(rgb, shape), dtype=np.float32)
                emb /= max(float(np.linalg.norm(emb)), 1e-12)
                cx1, cy1 = max(0, int(x1)), max(0, int(y1))
                cx2, cy2 = min(w, int(x2) + 1), min(h, int(y2) + 1)
                crop = rgb[cy1:cy2, cx1:cx2]
                blur = 0.0
                if crop.size:
                    g = np.asarray(Image.fromarray(crop).convert("L").resize((112, 112), Image.BILINEAR))
                    blur = laplacian_blur(g)
                yaw, pitch, roll = pose_from_5pts(lm)
                faces.append(
                    Face((float(x1), float(y1), float(x2), float(y2)), lm, score, emb, float(x2 - x1), float(y2 - y1), blur, yaw, pitch, roll)
                )
            faces.sort(key=lambda f: (f.bbox[0], f.bbox[1]))
            out.append(faces)
        return out


def get_face_backend(name: str = "dlib"):
    """``pipeline.faces.get_backend(name)`` if available, else the direct dlib fallback."""
    try:
        from pipeline.faces import get_backend  # another helper's package; optional here

        return get_backend(name)
    except ImportError:
        if name != "dlib":
            raise
        return DlibDirect()


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
