"""Face quality in [0, 1] from size, sharpness, head pose and detector confidence.

Each factor is mapped to a sub-score in [0, 1], then combined by a weighted geometric mean
    quality = prod(s_i ** w_i) ** (1 / sum(w_i))
so that one disqualifying factor (a 20-px face, a profile view, a smeared crop) pulls the whole
score to 0 however good the others are, and a face that is good on every axis scores 1.

    size   min(face_width, face_height) in px: 0 at <= size_min, 1 at >= size_good, linear between
    blur   variance of the Laplacian of the aligned grey crop (pipeline.faces' ``blur``, higher is
           sharper): 0 at <= blur_min, 1 at >= blur_good, linear in log(blur) between
    pose   1 - max(|yaw| / max_yaw, |pitch| / max_pitch), clipped to [0, 1] (degrees)
    det    detector score: 0 at <= det_min, 1 at >= det_good, linear between. The defaults suit dlib's
           HOG margin (faces found at the default threshold score ~0..3); ``QualityConfig.for_backend``
           takes the detector range from ``pipeline.faces.calibration`` (SCRFD scores are probabilities).
A missing (NaN/None) input gives that factor weight 0 instead of failing the face.

This is the one face-quality score: the scoring stage reports it, the multi-identity builder ranks
references with it and the expression builder filters pairs with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class QualityConfig:
    size_min: float = 32.0
    size_good: float = 112.0
    blur_min: float = 10.0
    blur_good: float = 100.0
    max_yaw: float = 60.0
    max_pitch: float = 45.0
    det_min: float = -0.2
    det_good: float = 0.5
    w_size: float = 1.0
    w_blur: float = 1.0
    w_pose: float = 1.0
    w_det: float = 0.5

    @classmethod
    def for_backend(cls, backend: str, **overrides) -> QualityConfig:
        """The defaults with the detector-score range of ``backend`` (pipeline.faces.calibration)."""
        from dataclasses import replace

        from pipeline.faces.calibration import thresholds_for

        t = thresholds_for(backend)
        return replace(cls(det_min=t.det_score_min, det_good=t.det_score_good), **overrides)


def _lin(x, lo, hi):
    return np.clip((x - lo) / max(hi - lo, 1e-9), 0.0, 1.0)


def quality_components(
    face_width,
    face_height,
    blur=None,
    yaw=None,
    pitch=None,
    det_score=None,
    config: QualityConfig = QualityConfig(),
) -> dict[str, np.ndarray]:
    w = np.asarray(face_width, np.float64)
    n = w.shape[0] if w.ndim else 1
    w = w.reshape(n)

    def arr(v):
        return np.full(n, np.nan) if v is None else np.asarray(v, np.float64).reshape(n)

    h, b, y, p, d = arr(face_height), arr(blur), arr(yaw), arr(pitch), arr(det_score)
    size = _lin(np.fmin(w, h), config.size_min, config.size_good)
    with np.errstate(divide="ignore", invalid="ignore"):
        blur_s = _lin(np.log(np.maximum(b, 1e-6)), np.log(config.blur_min), np.log(config.blur_good))
    blur_s = np.where(np.isfinite(b), blur_s, np.nan)
    pose = np.clip(1.0 - np.fmax(np.abs(y) / config.max_yaw, np.abs(p) / config.max_pitch), 0.0, 1.0)
    det = _lin(d, config.det_min, config.det_good)
    return {"size": size, "blur": blur_s, "pose": pose, "det": det}


def face_quality(
    face_width,
    face_height,
    blur=None,
    yaw=None,
    pitch=None,
    det_score=None,
    config: QualityConfig = QualityConfig(),
) -> np.ndarray:
    """float32 (N,) quality in [0, 1] (see module docstring); NaN only when every input is missing."""
    comps = quality_components(face_width, face_height, blur, yaw, pitch, det_score, config)
    weights = {"size": config.w_size, "blur": config.w_blur, "pose": config.w_pose, "det": config.w_det}
    n = len(comps["size"])
    num = np.zeros(n)
    den = np.zeros(n)
    zero = np.zeros(n, bool)
    for k, s in comps.items():
        ok = np.isfinite(s)
        wk = weights[k]
        zero |= ok & (s <= 0) & (wk > 0)
        num += np.where(ok, wk * np.log(np.maximum(s, 1e-12)), 0.0)
        den += np.where(ok, wk, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.exp(num / den)
    q = np.where(zero, 0.0, q)
    q = np.where(den > 0, q, np.nan)
    return q.astype(np.float32)


def face_quality_from_table(faces: pa.Table, config: QualityConfig | None = None) -> np.ndarray:
    """Quality for a faces table with pipeline.faces columns (face_width, face_height, blur, yaw, pitch,
    det_score). Without a config, the detector range is the table's backend's (``backend`` column)."""
    if config is None:
        backends = set(faces.column("backend").unique().to_pylist()) if "backend" in faces.column_names else set()
        if len(backends) > 1:
            raise ValueError(f"faces from several backends {sorted(backends)}: their detector scores differ")
        config = QualityConfig.for_backend(backends.pop()) if backends else QualityConfig()

    def col(name):
        if name not in faces.column_names:
            return None
        return np.asarray(faces[name].to_numpy(zero_copy_only=False), dtype=np.float64)

    if "face_width" not in faces.column_names and "bbox" in faces.column_names:
        bb = np.asarray(faces["bbox"].to_pylist(), np.float64).reshape(-1, 4)
        fw, fh = bb[:, 2] - bb[:, 0], bb[:, 3] - bb[:, 1]
    else:
        fw, fh = col("face_width"), col("face_height")
    if fw is None:
        raise KeyError("faces table needs face_width/face_height or bbox columns to compute quality")
    return face_quality(
        fw, fh if fh is not None else fw, col("blur"), col("yaw"), col("pitch"), col("det_score"), config
    )
