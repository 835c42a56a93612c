"""Face stage: detect -> 5 landmarks -> align -> embed (backends: dlib offline default, insightface ONNX)."""

from .base import BACKEND_NAMES, DetectedFace, FaceBackend, get_backend
from .stage import FACES_SCHEMA, detect_faces, faces_schema

__all__ = [
    "BACKEND_NAMES",
    "FACES_SCHEMA",
    "DetectedFace",
    "FaceBackend",
    "detect_faces",
    "faces_schema",
    "get_backend",
]
