"""The face stage: detect -> 5 landmarks -> align -> embed, and everything about faces.

Modules: ``base`` (the backend interface), ``registry`` (backends by name), ``dlib_backend`` and
``insightface_backend`` (the backends), ``align`` (ArcFace alignment, pose, blur), ``stage`` (the faces
table: batched detection over a partition, its checks), ``quality`` (one face-quality score),
``calibration`` (per-backend thresholds with how they were measured), ``crops`` (thumbnails),
``report`` (UI pictures), ``folders`` (labelled photo folders through the same stage).
"""

from .base import DetectedFace, FaceBackend
from .registry import BACKEND_NAMES, get_backend
from .stage import FACES_SCHEMA, detect_faces, embeddings_of, faces_schema

__all__ = [
    "BACKEND_NAMES",
    "FACES_SCHEMA",
    "DetectedFace",
    "FaceBackend",
    "detect_faces",
    "embeddings_of",
    "faces_schema",
    "get_backend",
]
