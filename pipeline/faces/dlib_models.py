"""Where dlib's weights are: the face-recognition-models package, found without importing it.

Its own module so that the dlib backend and the PyTorch port of dlib's networks (dlib_torch.py,
torch_stage.py) find the same files without importing each other."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_MODELS = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")


def face_recognition_models_dir() -> Path:
    """The ``models/`` folder of the face-recognition-models package, found without importing it
    (its ``__init__`` imports pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the face-recognition-models package is not installed: it holds dlib's weights "
            f"({', '.join(PACKAGE_MODELS)}); pip install face-recognition-models==0.3.0"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [f for f in PACKAGE_MODELS if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"face-recognition-models at {folder} lacks {', '.join(missing)}")
    return folder
