"""The insightface backend on tiny generated ONNX models with SCRFD / ArcFace signatures.

The detector is a real function of its input (not constant outputs): for each stride s it
average-pools channel 0 (R, since SCRFD is fed RGB) over s x s cells, and the score is
sigmoid(10 * (pool - t_s)); t_8 = t_16 = 2 (never fires), t_32 = 0 (fires where the
normalised red channel is bright). Box and keypoint distances are constants (in stride
units), so a red square covering exactly one stride-32 cell of the letterboxed input gives
one known face after decoding, both anchors firing, NMS keeping one, and un-letterboxing.
"""

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from pipeline.faces import get_backend
from pipeline.faces.align import norm_crop
from pipeline.faces.insightface_backend import classify_onnx, distance2bbox, distance2kps, nms

BOX_D = np.array([0.5, 0.75, 1.5, 1.25], dtype=np.float32)  # left, top, right, bottom (stride units)
KPS_PX = np.array(
    [[4, -4], [28, -4], [16, 8], [6, 22], [26, 22]], dtype=np.float32
)  # det pixels from the anchor
EMB_DIM = 32


def _save(model, path: Path) -> None:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_scrfd(path: Path, input_shape=(1, 3, "?", "?")) -> None:
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "slice_starts"))
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "slice_ends"))
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "slice_axes"))
    nodes.append(helper.make_node("Slice", ["input.1", "slice_starts", "slice_ends", "slice_axes"], ["red"]))
    inits.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape_n1"))
    inits.append(numpy_helper.from_array(np.array([10.0], dtype=np.float32), "k"))
    score_names, box_names, kps_names = [], [], []
    for s in (8, 16, 32):
        nodes.append(
            helper.make_node("AveragePool", ["red"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s])
        )
        nodes.append(helper.make_node("Transpose", [f"pool{s}"], [f"t{s}"], perm=[0, 2, 3, 1]))
        nodes.append(
            helper.make_node("Concat", [f"t{s}", f"t{s}"], [f"a{s}"], axis=3)
        )  # 2 anchors per location
        nodes.append(helper.make_node("Reshape", [f"a{s}", "shape_n1"], [f"flat{s}"]))
        inits.append(
            numpy_helper.from_array(np.array([0.0 if s == 32 else 2.0], dtype=np.float32), f"thr{s}")
        )
        nodes.append(helper.make_node("Sub", [f"flat{s}", f"thr{s}"], [f"d{s}"]))
        nodes.append(helper.make_node("Mul", [f"d{s}", "k"], [f"z{s}"]))
        nodes.append(helper.make_node("Sigmoid", [f"z{s}"], [f"score_{s}"]))
        inits.append(numpy_helper.from_array(np.zeros((1,), np.float32), f"zero{s}"))
        nodes.append(helper.make_node("Mul", [f"flat{s}", f"zero{s}"], [f"nil{s}"]))
        inits.append(numpy_helper.from_array(BOX_D[None], f"boxc{s}"))
        nodes.append(helper.make_node("Add", [f"nil{s}", f"boxc{s}"], [f"bbox_{s}"]))
        inits.append(numpy_helper.from_array((KPS_PX.reshape(1, 10) / s).astype(np.float32), f"kpsc{s}"))
        nodes.append(helper.make_node("Add", [f"nil{s}", f"kpsc{s}"], [f"kps_{s}"]))
        score_names.append(f"score_{s}")
        box_names.append(f"bbox_{s}")
        kps_names.append(f"kps_{s}")
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1]) for n in score_names]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in box_names]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 10]) for n in kps_names]
    graph = helper.make_graph(
        nodes,
        "scrfd_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, list(input_shape))],
        outputs,
        inits,
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def arcface_weights() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(3 * 7 * 7, EMB_DIM)).astype(np.float32)


def make_arcface(path: Path, batch="None") -> None:
    inits = [numpy_helper.from_array(arcface_weights(), "W")]
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["p"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "W"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, EMB_DIM])],
        inits,
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def make_pooled_head(path: Path, size: int, out: int) -> None:
    """A distractor like genderage.onnx (96x96 -> 3) or 2d106det.onnx (192x192 -> 212)."""
    inits = [numpy_helper.from_array(np.ones((3, out), np.float32), "W")]
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "W"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, out])],
        inits,
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def buffalo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models") / "buffalo_l"
    d.mkdir()
    make_scrfd(d / "det_10g.onnx")
    make_arcface(d / "w600k_r50.onnx")
    make_pooled_head(d / "genderage.onnx", 96, 3)
    make_pooled_head(d / "2d106det.onnx", 192, 212)
    (d / "README.txt").write_text("not a model")
    return d


def scene(color=(255, 0, 0)) -> np.ndarray:
    # 320x240; the detector input is 160x160, so the letterbox scale is 0.5 and the image
    # fills rows 0..119. The square [192,256)x[128,192) becomes [96,128)x[64,96): the
    # stride-32 cell at row 2, col 3, whose anchor centre is (96, 64) in input pixels.
    img = np.zeros((240, 320, 3), dtype=np.uint8)
    img[128:192, 192:256] = color
    return img


def expected_face():
    cx, cy, s, scale = 96.0, 64.0, 32.0, 0.5
    box = np.array([cx - BOX_D[0] * s, cy - BOX_D[1] * s, cx + BOX_D[2] * s, cy + BOX_D[3] * s]) / scale
    kps = (np.array([cx, cy]) + KPS_PX) / scale
    return box, kps


def test_decode_helpers():
    pts = np.array([[10.0, 20.0]])
    np.testing.assert_allclose(distance2bbox(pts, np.array([[1.0, 2.0, 3.0, 4.0]])), [[9, 18, 13, 24]])
    np.testing.assert_allclose(distance2kps(pts, np.array([[1.0, 2.0, -1.0, -2.0]])), [[11, 22, 9, 18]])
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float32)
    assert nms(boxes, np.array([0.9, 0.95, 0.5]), 0.4) == [1, 2]


def test_models_identified_by_signature(buffalo):
    import onnxruntime as ort

    kinds = {
        p.name: classify_onnx(ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]))
        for p in sorted(buffalo.glob("*.onnx"))
    }
    assert kinds == {
        "det_10g.onnx": "detector",
        "w600k_r50.onnx": "recognizer",
        "genderage.onnx": "other",
        "2d106det.onnx": "other",
    }


def test_detect_align_embed(buffalo):
    backend = get_backend("insightface", model_dir=buffalo, det_size=(160, 160))
    assert backend.name == "insightface" and backend.embedding_dim == EMB_DIM
    assert "det_10g" in backend.model_version and "w600k_r50" in backend.model_version
    assert backend.providers[-1] == "CPUExecutionProvider"
    red, blue = scene(), scene((0, 0, 255))
    results = backend.analyze([red, blue, red])
    assert [len(r) for r in results] == [1, 0, 1]  # blue is channel 2: the model is fed RGB, not BGR
    face = results[0][0]
    box, kps = expected_face()
    np.testing.assert_allclose(face.bbox, box, atol=0.01)
    np.testing.assert_allclose(face.landmarks, kps, atol=0.01)
    assert face.det_score > 0.99
    assert face.face_width == pytest.approx(box[2] - box[0]) and face.face_height == pytest.approx(
        box[3] - box[1]
    )
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(results[2][0].embedding, face.embedding, atol=1e-6)  # batched == same
    # the embedding is the ArcFace model applied to the template-aligned crop, (x - 127.5) / 127.5
    crop = (norm_crop(red, face.landmarks).astype(np.float32) - 127.5) / 127.5
    pooled = crop.transpose(2, 0, 1).reshape(3, 7, 16, 7, 16).mean(axis=(2, 4)).reshape(-1)
    ref = pooled @ arcface_weights()
    np.testing.assert_allclose(face.embedding, ref / np.linalg.norm(ref), atol=1e-4)
    assert np.isfinite([face.blur, face.yaw, face.pitch, face.roll]).all()


def test_signature_not_name_and_fixed_shapes(tmp_path):
    d = tmp_path / "antelopev2"
    d.mkdir()
    make_scrfd(d / "model_b.onnx", input_shape=(1, 3, 160, 160))  # names say nothing
    make_arcface(d / "model_a.onnx", batch=1)  # fixed batch of 1: embedded one by one
    make_pooled_head(d / "1k3d68.onnx", 192, 3309)
    backend = get_backend("insightface", model_dir=d)  # detector input size read from the model
    assert backend.detector_path.name == "model_b.onnx" and backend.recognizer_path.name == "model_a.onnx"
    faces = backend.analyze([scene(), scene()])
    box, _ = expected_face()
    for r in faces:
        assert len(r) == 1
        np.testing.assert_allclose(r[0].bbox, box, atol=0.01)
    np.testing.assert_allclose(faces[0][0].embedding, faces[1][0].embedding, atol=1e-6)


def test_clear_errors(tmp_path, buffalo):
    with pytest.raises(FileNotFoundError, match=r"det_10g\.onnx.*w600k_r50\.onnx"):
        get_backend("insightface", model_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no .onnx files"):
        get_backend("insightface", model_dir=tmp_path)
    only_rec = tmp_path / "incomplete"
    only_rec.mkdir()
    (only_rec / "w600k_r50.onnx").write_bytes((buffalo / "w600k_r50.onnx").read_bytes())
    (only_rec / "det_10g.onnx").write_bytes(b"truncated download")
    with pytest.raises(FileNotFoundError, match=r"no SCRFD detector.*det_10g\.onnx could not be loaded"):
        get_backend("insightface", model_dir=only_rec)
    with pytest.raises(ValueError, match="model_dir"):
        get_backend("insightface")
    with pytest.raises(ValueError, match="unknown face backend"):
        get_backend("retinaface")
