"""The face backend interface: detect -> 5 landmarks -> align -> embed, batched.

Every backend takes RGB uint8 HxWx3 arrays and returns, per image, a list of
:class:`DetectedFace` with coordinates in the input image's pixels. Landmarks follow
insightface's 5-point order (the ArcFace template's order), image-left first:
left eye, right eye, nose, left mouth corner, right mouth corner.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DetectedFace:
    bbox: np.ndarray  # float32 (4,) x1, y1, x2, y2 in image pixels
    landmarks: np.ndarray  # float32 (5, 2) insightface order, image pixels
    det_score: float
    embedding: np.ndarray  # float32 (D,), L2-normalised
    face_width: float = 0.0  # bbox width in image pixels
    face_height: float = 0.0  # bbox height in image pixels
    blur: float = 0.0  # variance of the Laplacian of the 112x112 aligned grey crop (higher = sharper)
    yaw: float = 0.0  # degrees, from the 5 landmarks (see align.estimate_pose)
    pitch: float = 0.0
    roll: float = 0.0
    extra: dict = field(default_factory=dict)  # backend-specific details (never written to tables)

    def __post_init__(self) -> None:
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(4)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)
        self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
        self.det_score = float(self.det_score)
        if not self.face_width:
            self.face_width = float(self.bbox[2] - self.bbox[0])
        if not self.face_height:
            self.face_height = float(self.bbox[3] - self.bbox[1])


class FaceBackend(abc.ABC):
    """A face analyser. Subclasses set ``name``, ``model_version`` and ``embedding_dim``."""

    name: str = ""
    model_version: str = ""
    embedding_dim: int = 0
    # (backend, detector, landmarks, descriptor): what a collection may not mix (pipeline/faces/stage_identity.py)
    face_stage: dict | None = None

    @abc.abstractmethod
    def analyze(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """Faces of each RGB uint8 HxWx3 image (one list per image, possibly empty)."""

    def analyze_one(self, image: np.ndarray) -> list[DetectedFace]:
        return self.analyze([image])[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model_version={self.model_version!r}, dim={self.embedding_dim})"


def check_rgb(image: np.ndarray) -> np.ndarray:
    """Validate (and make C-contiguous) one RGB uint8 HxWx3 image."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 HxWx3 array, got dtype={a.dtype} shape={a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image of shape {a.shape}")
    return np.ascontiguousarray(a)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)
