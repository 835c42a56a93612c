"""The offline default face backend: dlib HOG (or MTCNN) -> dlib 5-point shape -> dlib ResNet descriptor.

Weights come from PyPI packages only: ``face-recognition-models`` (dlib's
``shape_predictor_5_face_landmarks.dat`` and ``dlib_face_recognition_resnet_model_v1.dat``)
and, for ``detector="mtcnn"``, ``facenet-pytorch`` (P/R/O-Net weights inside the package).
Nothing is downloaded.

Landmarks (insightface order: left eye, right eye, nose, left/right mouth corner, image-left
first):
- ``detector="mtcnn"``: MTCNN's own 5 points (same order and semantics as insightface's).
- ``detector="hog"``: dlib's 5-point model gives the two corners of each eye and the bottom
  of the nose. Eye centres are the corner midpoints and the nose point is dlib's nose
  bottom (a few pixels below insightface's nose tip). dlib has no mouth points, so the mouth
  corners are *estimated*: the template's mouth corners under the similarity that maps the
  template's eyes onto the detected eye centres, shifted by half of the nose's offset from
  its template position (so a turned head moves them the same way). Yaw and roll from
  these points are meaningful; pitch is weak (only the nose carries it).

The descriptor is dlib's 128-d ResNet, computed on dlib's own 150x150 chip from the
5-point shape fitted at full resolution (detection may run on a downscaled copy).
dlib's native metric is the euclidean distance between the raw vectors (0.6 is dlib's
"same person" threshold). The raw vectors are not unit norm (measured 1.3-1.6 on the
shared photos; they match face_recognition's encodings, cosine 0.9998). This backend
L2-normalises them so that cosine similarity = dot product, as for ArcFace embeddings:
thresholds must then be set on cosine (shared photos: same person median 0.97, different
people median 0.82).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from .align import ARCFACE_TEMPLATE, apply_affine, estimate_pose, laplacian_variance, norm_crop, umeyama
from .base import DetectedFace, FaceBackend, check_rgb, l2_normalize
from .dlib_models import PACKAGE_MODELS, face_recognition_models_dir  # noqa: F401 - re-exported


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return np.asarray(
        Image.fromarray(image).resize(
            size, Image.Resampling.BILINEAR, reducing_gap=None if scale > 1 else 2.0
        )
    )


def detection_scale(height: int, width: int, max_side: int | None, min_side: int | None) -> float:
    """Scale at which an image is searched: down to ``max_side``, small images up 2x below ``min_side``."""
    longest = max(height, width)
    if max_side and longest > max_side:
        return max_side / longest
    if min_side and longest < min_side:
        return 2.0
    return 1.0


# Measured on the shared photos (median over faces found by both detectors, in 112-px
# template pixels, eye-aligned frame): dlib's nose bottom sits ~2.2 px below MTCNN's nose
# tip, and template mouth corners placed from the eyes and nose need ~1.9 px more lift.
NOSE_TIP_LIFT = 2.2
MOUTH_LIFT = 1.9


def nose_mouth_from_eyes_nose(eyes: np.ndarray, nose_bottom: np.ndarray) -> np.ndarray:
    """Estimated nose tip and mouth corners (3, 2) from the eye centres (image-left first) and
    dlib's nose-bottom point, all in image pixels."""
    T = umeyama(ARCFACE_TEMPLATE[:2].astype(np.float64), np.asarray(eyes, dtype=np.float64))
    M = T[:2]  # template -> image
    Minv = np.linalg.inv(T)[:2]
    nose_t = apply_affine(Minv, np.asarray(nose_bottom, dtype=np.float64)[None])[0] - [0.0, NOSE_TIP_LIFT]
    mouth_t = (
        ARCFACE_TEMPLATE[3:].astype(np.float64) + 0.5 * (nose_t - ARCFACE_TEMPLATE[2]) - [0.0, MOUTH_LIFT]
    )
    return apply_affine(M, np.vstack([nose_t[None], mouth_t]))


class DlibBackend(FaceBackend):
    """dlib face backend.

    Options:
    - ``detector``: ``"hog"`` (default; faster than MTCNN at equal recall on the shared
      photos, see bench/bench_faces.py) or ``"mtcnn"`` (facenet-pytorch, CPU torch).
    - ``upsample``: dlib HOG pyramid upsamplings (0 default; each one finds 2x smaller faces
      at ~4x the cost).
    - ``detect_max_side``: images are searched downscaled to this longest side (1024).
    - ``detect_min_side``: images whose longest side is below this are searched at 2x
      (default 400 for HOG, whose smallest face is ~80 px while the 150 px crops hold faces
      about that size; 0 for MTCNN, which finds faces down to 20 px without it).
    - ``num_jitters``: dlib descriptor jitters (0 = one pass; dlib's "1" is the same).
    - ``torch_threads``: torch intra-op threads while MTCNN runs (1 default, restored after
      each call): MTCNN's small convolutions ran ~15x slower with 2 threads than with 1 on
      the shared 2-core box (measured 2 s vs 0.12 s per 150 px image under load).
    - ``min_score``: HOG SVM margin threshold (0.0 = dlib's default); MTCNN probability
      threshold is ``mtcnn_min_prob`` (0.9).
    Images are analysed one after another: dlib's Python objects crash when shared across
    threads, and thread-local copies gave no speed-up on 2 cores (measured); parallelise
    across partitions/processes instead.
    - ``batch_descriptors``: compute descriptors for a whole batch in one dlib call (True).
    - ``descriptor``: ``"auto"`` (default) = ``"torch"``: dlib's network ported to PyTorch
      (pipeline/faces/dlib_torch.py) on dlib's own chips, cosine >= 0.99999 to dlib and ~10x
      faster per face on CPU (bench/bench_dlib_torch.py); ``"dlib"`` = dlib's C++ network.
      ``num_jitters`` > 1 needs dlib's random jitter, so "auto" picks "dlib" then.
    - ``device`` (``"auto"``: CUDA when torch sees one), ``descriptor_dtype`` (``"auto"``:
      float32 on CPU, bfloat16 on CUDA), ``descriptor_threads`` (1; CPU intra-op threads): where
      and how the ported descriptor runs.
    """

    name = "dlib"
    embedding_dim = 128

    def __init__(
        self,
        detector: str = "hog",
        upsample: int = 0,
        detect_max_side: int | None = 1024,
        detect_min_side: int | None = None,
        num_jitters: int = 0,
        min_score: float = 0.0,
        mtcnn_min_prob: float = 0.9,
        torch_threads: int | None = 1,
        batch_descriptors: bool = True,
        models_dir: str | Path | None = None,
        descriptor: str = "auto",
        device: str = "auto",
        descriptor_dtype: str = "auto",
        descriptor_threads: int | None = 1,
    ) -> None:
        import dlib

        if detector not in ("hog", "mtcnn"):
            raise ValueError(f"detector must be 'hog' or 'mtcnn', got {detector!r}")
        self.detector = detector
        self.upsample = int(upsample)
        self.detect_max_side = detect_max_side
        self.detect_min_side = (
            (400 if detector == "hog" else 0) if detect_min_side is None else detect_min_side
        )
        self.num_jitters = int(num_jitters)
        self.min_score = float(min_score)
        self.mtcnn_min_prob = float(mtcnn_min_prob)
        self.torch_threads = torch_threads
        self.batch_descriptors = bool(batch_descriptors)
        folder = Path(models_dir) if models_dir else face_recognition_models_dir()
        self._dlib = dlib
        self._sp = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self._rec = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))
        self._hog = dlib.get_frontal_face_detector() if detector == "hog" else None
        self._mtcnn = None
        if detector == "mtcnn":
            self._mtcnn = self._load_mtcnn()
        if descriptor not in ("auto", "torch", "dlib"):
            raise ValueError(f"descriptor must be 'auto', 'torch' or 'dlib', got {descriptor!r}")
        if descriptor == "auto":
            descriptor = "dlib" if self.num_jitters > 1 else "torch"
        if descriptor == "torch" and self.num_jitters > 1:
            raise ValueError("num_jitters > 1 needs dlib's own descriptor (descriptor='dlib')")
        self.descriptor = descriptor
        self._torch_descriptor = None
        if descriptor == "torch":
            from .dlib_torch import FaceDescriptor

            self._torch_descriptor = FaceDescriptor(
                device=device,
                dtype=descriptor_dtype,
                threads=descriptor_threads,
                path=folder / "dlib_face_recognition_resnet_model_v1.dat",
            )
        det = "hog" if detector == "hog" else "mtcnn-facenet_pytorch"
        self.model_version = f"dlib-{dlib.__version__}/{det}/sp5/resnet_v1/j{self.num_jitters}"
        # what decides the faces, not where they ran (pipeline/faces/stage_identity.py)
        self.face_stage = {"backend": self.name, "detector": "hog" if detector == "hog" else "mtcnn",
                           "landmarks": "dlib-sp5", "descriptor": "dlib-resnet_v1"}
        if self._torch_descriptor is not None:
            self.model_version += f"/{self._torch_descriptor.tag}"
        self.timings: dict[str, float] = {
            "detect_s": 0.0,
            "landmarks_s": 0.0,
            "embed_s": 0.0,
            "quality_s": 0.0,
        }

    @staticmethod
    def _load_mtcnn():
        try:
            from facenet_pytorch import MTCNN
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("detector='mtcnn' needs facenet-pytorch (and torch) installed") from exc
        return MTCNN(keep_all=True, device="cpu", post_process=False, select_largest=False)

    # -- detection ---------------------------------------------------------------------
    def _detect(self, image: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray | None]]:
        """(bbox float (4,) in image pixels, score, 5 points or None) for each face found."""
        h, w = image.shape[:2]
        scale = detection_scale(h, w, self.detect_max_side, self.detect_min_side)
        small = _resize(image, scale) if scale != 1.0 else image
        sx = w / small.shape[1]
        sy = h / small.shape[0]
        out = []
        if self._hog is not None:
            rects, scores, _ = self._hog.run(small, self.upsample, self.min_score)
            for r, s in zip(rects, scores):
                box = np.array(
                    [r.left() * sx, r.top() * sy, (r.right() + 1) * sx, (r.bottom() + 1) * sy],
                    dtype=np.float64,
                )
                out.append((box, float(s), None))
        else:
            import torch

            before = torch.get_num_threads()
            if self.torch_threads:
                torch.set_num_threads(int(self.torch_threads))
            try:
                with torch.inference_mode():
                    boxes, probs, points = self._mtcnn.detect(small, landmarks=True)
            finally:
                if self.torch_threads:
                    torch.set_num_threads(before)
            if boxes is not None:
                for b, p, pts in zip(boxes, probs, points):
                    if p is None or p < self.mtcnn_min_prob:
                        continue
                    box = np.asarray(b, dtype=np.float64) * [sx, sy, sx, sy]
                    out.append((box, float(p), np.asarray(pts, dtype=np.float64) * [sx, sy]))
        return out

    def _analyze_image(self, image: np.ndarray):
        dlib = self._dlib
        t0 = time.perf_counter()
        dets = self._detect(image)
        t1 = time.perf_counter()
        h, w = image.shape[:2]
        shapes = dlib.full_object_detections()
        kept = []
        for box, score, pts in dets:
            x1, y1 = max(0.0, box[0]), max(0.0, box[1])
            x2, y2 = min(float(w), box[2]), min(float(h), box[3])
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            # the shape predictor gets the detector's own (unclipped) box, as it was trained
            r = np.rint(box).astype(int)
            rect = dlib.rectangle(int(r[0]), int(r[1]), int(r[2]) - 1, int(r[3]) - 1)
            shape = self._sp(image, rect)
            shapes.append(shape)
            kept.append((np.array([x1, y1, x2, y2], dtype=np.float32), score, pts, shape))
        t2 = time.perf_counter()
        return kept, shapes, (t1 - t0, t2 - t1)

    @staticmethod
    def _landmarks(shape, pts: np.ndarray | None) -> np.ndarray:
        if pts is not None:
            return pts.astype(np.float32)
        p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
        # dlib 5-point: 0,1 = corners of the image-right eye; 2,3 = image-left eye; 4 = nose bottom
        eye_a = p[0:2].mean(axis=0)
        eye_b = p[2:4].mean(axis=0)
        eyes = np.stack([eye_a, eye_b]) if eye_a[0] <= eye_b[0] else np.stack([eye_b, eye_a])
        return np.vstack([eyes, nose_mouth_from_eyes_nose(eyes, p[4])]).astype(np.float32)

    def _torch_descriptors(self, images, per_image) -> list[list[np.ndarray]]:
        """The ported network on dlib's own chips (the chips dlib's descriptor would see)."""
        chips, counts = [], []
        for im, (kept, shapes, _) in zip(images, per_image):
            counts.append(len(kept))
            if kept:
                chips += [np.asarray(c) for c in self._dlib.get_face_chips(im, shapes, 150, 0.25)]
        flat = self._torch_descriptor(np.stack(chips)) if chips else np.zeros((0, 128), np.float32)
        out, k = [], 0
        for n in counts:
            out.append(list(flat[k : k + n]))
            k += n
        return out

    def analyze(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        images = [check_rgb(im) for im in images]
        per_image = [self._analyze_image(im) for im in images]
        for _, _, (td, tl) in per_image:
            self.timings["detect_s"] += td
            self.timings["landmarks_s"] += tl

        t0 = time.perf_counter()
        descriptors: list[list[np.ndarray]] = []
        jit = self.num_jitters
        if self._torch_descriptor is not None:
            descriptors = self._torch_descriptors(images, per_image)
        elif self.batch_descriptors:
            idx = [i for i, (kept, _, _) in enumerate(per_image) if kept]
            got = [[] for _ in images]
            if idx:
                res = self._rec.compute_face_descriptor(
                    [images[i] for i in idx], [per_image[i][1] for i in idx], jit
                )
                for i, ds in zip(idx, res):
                    got[i] = [np.asarray(d, dtype=np.float32) for d in ds]
            descriptors = got
        else:
            for im, (kept, shapes, _) in zip(images, per_image):
                if not kept:
                    descriptors.append([])
                    continue
                ds = self._rec.compute_face_descriptor(im, shapes, jit)
                descriptors.append([np.asarray(d, dtype=np.float32) for d in ds])
        t1 = time.perf_counter()
        self.timings["embed_s"] += t1 - t0

        results: list[list[DetectedFace]] = []
        for im, (kept, _, _), descs in zip(images, per_image, descriptors):
            faces = []
            for (box, score, pts, shape), d in zip(kept, descs):
                lmk = self._landmarks(shape, pts)
                crop = norm_crop(im, lmk)
                yaw, pitch, roll = estimate_pose(lmk)
                faces.append(
                    DetectedFace(
                        bbox=box,
                        landmarks=lmk,
                        det_score=score,
                        embedding=l2_normalize(d),
                        blur=laplacian_variance(crop),
                        yaw=yaw,
                        pitch=pitch,
                        roll=roll,
                        extra={"descriptor_norm": float(np.linalg.norm(d))},
                    )
                )
            results.append(faces)
        self.timings["quality_s"] += time.perf_counter() - t1
        return results
