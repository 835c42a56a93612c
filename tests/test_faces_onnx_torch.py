"""The insightface backend through PyTorch (onnx2torch) on the generated SCRFD / ArcFace models
of test_faces_insightface.py: the same faces and embeddings as through onnxruntime."""

import numpy as np
import pytest

pytest.importorskip("onnx2torch")
pytest.importorskip("onnxruntime")
from test_faces_insightface import (
    EMB_DIM,
    expected_face,
    make_arcface,
    make_pooled_head,
    make_scrfd,
    scene,
)

from pipeline.faces import get_backend
from pipeline.faces.onnx_torch import TorchOnnxSession, choose_runtime


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "buffalo_l"
    d.mkdir()
    make_scrfd(d / "det_10g.onnx")
    make_arcface(d / "w600k_r50.onnx")
    make_pooled_head(d / "genderage.onnx", 96, 3)
    return d


def test_session_matches_onnxruntime(pack):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    for name, shape in (("det_10g.onnx", (1, 3, 160, 192)), ("w600k_r50.onnx", (5, 3, 112, 112))):
        ref = ort.InferenceSession(str(pack / name), providers=["CPUExecutionProvider"])
        ours = TorchOnnxSession(pack / name, "cpu")
        assert [i.name for i in ours.get_inputs()] == [i.name for i in ref.get_inputs()]
        assert [o.name for o in ours.get_outputs()] == [o.name for o in ref.get_outputs()]
        assert ours.get_inputs()[0].shape[1:] == list(ref.get_inputs()[0].shape)[1:]
        x = rng.normal(size=shape).astype(np.float32)
        names = [o.name for o in ref.get_outputs()]
        for a, b in zip(ref.run(names, {ref.get_inputs()[0].name: x}), ours.run(names, {ours.get_inputs()[0].name: x})):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="missing inputs"):
            ours.run(None, {})


def test_backend_torch_runtime_same_faces(pack):
    ort_backend = get_backend("insightface", model_dir=pack, det_size=(160, 160), runtime="onnxruntime", device="cpu")
    torch_backend = get_backend("insightface", model_dir=pack, det_size=(160, 160), runtime="torch", device="cpu")
    assert torch_backend.runtime == "torch" and torch_backend.providers == ["torch:cpu"]
    assert ort_backend.runtime == "onnxruntime"
    images = [scene(), scene((0, 0, 255)), scene()]
    a, b = ort_backend.analyze(images), torch_backend.analyze(images)
    assert [len(r) for r in b] == [1, 0, 1]
    box, kps = expected_face()
    np.testing.assert_allclose(b[0][0].bbox, box, atol=0.01)
    np.testing.assert_allclose(b[0][0].landmarks, kps, atol=0.01)
    assert b[0][0].embedding.shape == (EMB_DIM,)
    for fa, fb in zip(a[0] + a[2], b[0] + b[2]):
        np.testing.assert_allclose(fa.bbox, fb.bbox, atol=1e-3)
        np.testing.assert_allclose(fa.embedding, fb.embedding, atol=1e-5)
        assert fa.det_score == pytest.approx(fb.det_score, abs=1e-5)


def test_runtime_choice_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pipeline.faces.onnx_torch.onnxruntime_has_cuda", lambda: False)
    assert choose_runtime("auto", "auto") == ("onnxruntime", "cpu")
    assert choose_runtime("torch", "auto") == ("torch", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_runtime("auto", "auto") == ("torch", "cuda")  # only torch has CUDA
    assert choose_runtime("auto", "cpu") == ("onnxruntime", "cpu")
    monkeypatch.setattr("pipeline.faces.onnx_torch.onnxruntime_has_cuda", lambda: True)
    assert choose_runtime("auto", "auto") == ("onnxruntime", "cuda")
    with pytest.raises(ValueError, match="runtime"):
        choose_runtime("tensorrt")
