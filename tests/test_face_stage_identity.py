"""One detector per collection (issue 22): the face stage (backend, detector, landmarks, descriptor) is
recorded with the collection, later partitions must match it on whatever hardware they run, and with no
detector configured the recorded one is used instead of the hardware's default (HOG on CPU, MTCNN on CUDA)."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.faces.stage_identity import (
    FaceStageMismatch,
    pin_collection_stage,
    recorded_stage,
    stage_id,
    stage_key,
    stage_of,
)

# what TorchFaceStage writes on a CUDA machine (the descriptor's device and dtype are in the version)
CUDA_MTCNN = "dlib-resnet_v1/mtcnn-facenet_pytorch-batched/align-sp5/torch-cuda-float16"


@pytest.fixture(scope="module")
def backends():
    from pipeline.faces.dlib_backend import DlibBackend
    from pipeline.faces.torch_stage import TorchFaceStage

    return {"hog": DlibBackend(detector="hog", device="cpu"), "mtcnn": DlibBackend(detector="mtcnn", device="cpu"),
            "batched": TorchFaceStage(device="cpu"), "batched_mtcnn5": TorchFaceStage(device="cpu", landmarks="mtcnn")}


def test_each_backend_states_the_stage_its_model_version_names(backends):
    for b in backends.values():
        assert stage_of(b.name, b.model_version) == b.face_stage, b.model_version
    assert stage_of("insightface", "insightface/buffalo_l/det_10g+w600k_r50") == {
        "backend": "insightface", "detector": "det_10g", "landmarks": "det_10g-kps5", "descriptor": "w600k_r50"}


def test_the_stage_is_the_models_not_the_hardware(backends):
    # MTCNN on CPU (DlibBackend) and MTCNN batched on CUDA: other versions, one stage
    assert backends["mtcnn"].model_version != CUDA_MTCNN
    assert stage_key("dlib", CUDA_MTCNN) == stage_id(backends["mtcnn"].face_stage) == stage_id(backends["batched"].face_stage)
    # another detector or other landmarks: another stage
    assert stage_id(backends["hog"].face_stage) != stage_id(backends["mtcnn"].face_stage)
    assert stage_id(backends["batched_mtcnn5"].face_stage) != stage_id(backends["batched"].face_stage)


def test_collection_records_its_stage_and_refuses_another(tmp_path, backends):
    assert recorded_stage(tmp_path) is None
    pin_collection_stage(tmp_path, backends["batched"].face_stage)  # first partition, built on a GPU
    assert recorded_stage(tmp_path)["detector"] == "mtcnn"
    pin_collection_stage(tmp_path, backends["mtcnn"].face_stage)  # a CPU machine, same stage: accepted
    with pytest.raises(FaceStageMismatch, match="detector=hog"):
        pin_collection_stage(tmp_path, backends["hog"].face_stage)  # a CPU default of before: refused


def test_unset_detector_follows_the_collection_not_the_hardware(tmp_path, backends):
    from assets.resources import LineupSettings
    from pipeline.faces import get_backend

    settings = LineupSettings(home=str(tmp_path), face_device="cpu")
    pin_collection_stage(settings.layout.root, backends["batched"].face_stage)  # built on a GPU
    opts = settings.face_backend_options()
    assert opts["detector"] == "mtcnn"
    b = get_backend("dlib", **opts)
    assert b.face_stage == backends["batched"].face_stage and type(b).__name__ == "DlibBackend"
    # an explicit setting still wins (and the faces asset then refuses it against the record)
    assert LineupSettings(home=str(tmp_path), face_detector="hog").face_backend_options()["detector"] == "hog"


def test_workers_rebuild_the_detector_the_driver_resolved():
    from pipeline.faces import get_backend

    b = get_backend("dlib", device="cpu")  # no detector: the CPU default, HOG
    assert b.build_spec == ("dlib", {"device": "cpu", "detector": "hog"})  # a GPU worker builds HOG too


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _collection(tmp_path, versions: list[str]):
    from pipeline.commits import commit_unit
    from pipeline.config import Layout
    from pipeline.faces.stage import faces_schema
    from pipeline.ingest import ingest_partition
    from pipeline.sources import register_new_inputs
    from pipeline.storage import write_parquet_atomic

    layout = Layout(tmp_path / "home")
    inp = tmp_path / "in"
    inp.mkdir(parents=True)
    for i, version in enumerate(versions):
        (inp / f"p{i}.jpg").write_bytes(_jpeg(i))
        (spec,) = register_new_inputs(inp, layout.partitions)
        write_parquet_atomic(ingest_partition(spec).images, layout.partition_file("images", spec.key))
        row = {"uid": f"u{i}", "source": "s", "face_index": 0, "x1": 0.0, "y1": 0.0, "x2": 1.0, "y2": 1.0,
               "landmarks": [0.0] * 10, "det_score": 1.0, "face_width": 1.0, "face_height": 1.0, "blur": 1.0,
               "yaw": 0.0, "pitch": 0.0, "roll": 0.0, "embedding": [1.0] + [0.0] * 127, "backend": "dlib",
               "model_version": version, "image_width": 1, "image_height": 1}
        # committed as the face stage commits it (the collection reads committed units only)
        commit_unit(layout, "faces", spec.key, {"faces": pa.Table.from_pylist([row], schema=faces_schema(128))})
    return layout


def test_collection_takes_one_stage_from_any_hardware(tmp_path, backends):
    from pipeline.collection import MixedFaceModels, load_collection

    mixed_hardware = _collection(tmp_path / "a", [backends["mtcnn"].model_version, CUDA_MTCNN])
    assert len(load_collection(mixed_hardware).built) == 2
    with pytest.raises(MixedFaceModels, match="detector=hog"):
        load_collection(_collection(tmp_path / "b", [backends["hog"].model_version, CUDA_MTCNN]))
