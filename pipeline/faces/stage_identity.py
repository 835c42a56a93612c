"""Which face stage built a partition, independent of the hardware it ran on, and the collection's record.

A face stage is (backend, detector, landmarks, descriptor). Two partitions built by the same stage on a CPU
and on a GPU compare (the same detector finds the same faces; the descriptor's weights are the same, run by
dlib or by the PyTorch port); two built by different detectors do not (HOG and MTCNN find different faces:
in one comparison 4 faces changed identity). ``model_version`` says more (the dlib release, the device and
dtype of the descriptor): it stays as the trace, the stage identity decides what may share a collection.

The collection records its stage in ``face_stage.json`` at the store's root when its first partition's
faces are built; later partitions must match it, on whatever hardware they run. With no detector configured
the recorded one is used, so ``face_device=auto`` no longer changes the detector with the hardware.
"""

from __future__ import annotations

import json

from pipeline.storage import as_dir, write_bytes_atomic

STAGE_FILE = "face_stage.json"
STAGE_KEYS = ("backend", "detector", "landmarks", "descriptor")


class FaceStageMismatch(ValueError):
    """Faces of this collection were built by another face stage than the one configured."""


def stage_id(stage: dict) -> str:
    return ";".join(f"{k}={stage[k]}" for k in STAGE_KEYS)


def stage_of(backend: str, model_version: str) -> dict:
    """The face stage that wrote ``model_version`` (the formats of pipeline/faces/*_backend.py and
    torch_stage.py; tests/test_face_stage_identity.py checks each backend's own ``face_stage`` against it)."""
    parts = model_version.split("/")
    if backend == "insightface" and len(parts) == 3 and "+" in parts[2]:
        det, rec = parts[2].split("+", 1)
        return {"backend": backend, "detector": det, "landmarks": f"{det}-kps5", "descriptor": rec}
    if backend == "dlib" and parts[0] == "dlib-resnet_v1" and len(parts) >= 3:  # TorchFaceStage (batched MTCNN)
        align = parts[2].removeprefix("align-")
        return {"backend": backend, "detector": "mtcnn", "landmarks": "mtcnn5" if align == "mtcnn5" else "dlib-sp5",
                "descriptor": "dlib-resnet_v1"}
    if backend == "dlib" and parts[0].startswith("dlib-") and len(parts) >= 4:  # DlibBackend
        return {"backend": backend, "detector": "hog" if parts[1] == "hog" else "mtcnn", "landmarks": "dlib-sp5",
                "descriptor": "dlib-resnet_v1"}
    raise ValueError(f"unknown face model {backend!r} {model_version!r}: its face stage cannot be told")


def stage_key(backend: str, model_version: str) -> str:
    """What must be equal for two partitions to share a collection: the stage, or for a model whose stage
    cannot be told, the model itself."""
    try:
        return stage_id(stage_of(backend, model_version))
    except ValueError:
        return f"backend={backend};model_version={model_version}"


def recorded_stage(root) -> dict | None:
    path = as_dir(root) / STAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def pin_collection_stage(root, stage: dict | None) -> dict:
    """The collection's face stage: recorded now if there is none, else it must equal ``stage``."""
    if not stage:
        raise ValueError("this face backend does not state its face stage (FaceBackend.face_stage)")
    stage = {k: stage[k] for k in STAGE_KEYS}
    have = recorded_stage(root)
    if have is None:
        write_bytes_atomic((json.dumps(stage, sort_keys=True) + "\n").encode(), as_dir(root) / STAGE_FILE)
        have = recorded_stage(root)  # two first partitions at once: the last writer's stands, the other fails here
    if stage_id(have) != stage_id(stage):
        raise FaceStageMismatch(
            f"this collection's faces are built by {stage_id(have)} ({as_dir(root) / STAGE_FILE}); the configured "
            f"face stage is {stage_id(stage)}. Configure the recorded one (face_backend / face_detector), or rebuild "
            "every partition with the new one: remove that file and run `python -m assets.run --rebuild`.")
    return have
