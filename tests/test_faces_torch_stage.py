"""The batched PyTorch face stage (pipeline/faces/torch_stage.py) on CPU, on small shared photos."""

import io

import numpy as np
import pytest

pytest.importorskip("facenet_pytorch")
torch = pytest.importorskip("torch")
from PIL import Image

from pipeline.faces.dlib_parity import collect_faces, cosine, load_rgb
from pipeline.faces.torch_stage import (
    MTCNN_CHIP_TEMPLATE,
    BatchedMTCNN,
    TorchFaceStage,
    chip_details_from_points,
    decode_batch,
    dlib_face_backend,
)

SMALL = [
    "identities/bbt_sheldon/sheldon3.png",
    "identities/john_simm/000304_00470122.jpg",
    "identities/angelina_jolie/img1.jpg",
]


@pytest.fixture(scope="module")
def stage():
    return TorchFaceStage(device="cpu", decode_workers=2)


def _iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    i = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)


def test_batched_mtcnn_matches_facenet_pytorch(shared_faces):
    from facenet_pytorch import MTCNN

    ref = MTCNN(keep_all=True, device="cpu", post_process=False, select_largest=False)
    ours = BatchedMTCNN("cpu")
    images = [load_rgb(shared_faces / f) for f in SMALL[:2]]
    # both in one zero-padded canvas (different sizes): each must find what facenet-pytorch finds alone
    H = max(im.shape[0] for im in images)
    W = max(im.shape[1] for im in images)
    canvas = torch.zeros((2, 3, H, W))
    for i, im in enumerate(images):
        canvas[i, :, : im.shape[0], : im.shape[1]] = torch.from_numpy(im.copy()).permute(2, 0, 1).float()
    got = ours.detect(canvas)
    for im, (boxes, probs, pts) in zip(images, got):
        rb, rp, rpts = ref.detect(im, landmarks=True)
        keep = rp >= 0.9
        assert (probs >= 0.9).sum() == keep.sum() == 1
        j = int(np.argmax(probs))
        assert _iou(boxes[j], rb[keep][0]) > 0.85
        # crops by roi_align instead of area resize: landmarks within a few pixels
        assert np.abs(pts[j] - rpts[keep][0]).max() < 4.0


def test_chip_from_mtcnn_points_of_the_template_is_the_identity_chip():
    d = chip_details_from_points(MTCNN_CHIP_TEMPLATE)
    # dlib's convention (get_face_chip_details): the rectangle is centred on the template's
    # point (size/2, size/2) = (75, 75) with width size * scale - 1 = 149, so [0.5, 149.5]
    np.testing.assert_allclose(d.rect, [0.5, 0.5, 149.5, 149.5], atol=1e-9)
    assert abs(d.angle) < 1e-12
    d2 = chip_details_from_points(MTCNN_CHIP_TEMPLATE * 2 + 10)  # the same face, 2x larger, moved
    np.testing.assert_allclose(d2.rect, [10.5, 10.5, 309.5, 309.5], atol=1e-9)  # centre 160, width 299


def test_stage_from_bytes(stage, shared_faces):
    blobs = [(shared_faces / f).read_bytes() for f in SMALL]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(buf, format="PNG")
    blobs += [blobs[2][:500], b"", buf.getvalue()]  # truncated JPEG, empty, a faceless PNG
    out = stage.analyze_encoded(blobs)
    assert [len(r) for r in out[:3]] == [1, 1, 1]
    assert out[3][0] == "truncated image" and out[4][0] == "empty file"
    assert out[5] == []
    ref = collect_faces(shared_faces, [shared_faces / f for f in SMALL])
    for faces, im in zip(out[:3], ref):
        f = faces[0]
        assert f.embedding.shape == (128,) and np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
        assert f.blur > 0 and np.isfinite([f.yaw, f.pitch, f.roll]).all()
        # dlib's shape predictor on MTCNN's box instead of HOG's: close to dlib, not equal
        # (180 shared faces: median 0.9992, min 0.90; bench/bench_dlib_torch.py stage-parity)
        assert cosine(im.faces[0].reference, f.embedding) > 0.98
    # decoded arrays give the same faces as bytes
    again = stage.analyze([load_rgb(shared_faces / f) for f in SMALL])
    for a, b in zip(again, out[:3]):
        np.testing.assert_allclose(a[0].embedding, b[0].embedding, atol=1e-5)
        np.testing.assert_allclose(a[0].bbox, b[0].bbox, atol=1e-3)


def test_decode_batch_on_cpu(shared_faces):
    blob = (shared_faces / SMALL[2]).read_bytes()
    d = decode_batch([blob, b"not an image"], torch.device("cpu"))
    assert d[0].image.shape == (3, *load_rgb(shared_faces / SMALL[2]).shape[:2])
    assert d[1].image is None and d[1].error[0] == "not an image"
    assert decode_batch([blob], torch.device("cpu"), max_pixels=100)[0].error[0] == "decompression bomb"


def test_mtcnn_points_alignment(shared_faces):
    st = TorchFaceStage(device="cpu", landmarks="mtcnn")
    assert "align-mtcnn5" in st.model_version
    ref = collect_faces(shared_faces, [shared_faces / SMALL[0]])[0].faces[0].reference
    (face,) = st.analyze([load_rgb(shared_faces / SMALL[0])])[0]
    assert cosine(ref, face.embedding) > 0.9  # shared photos: median 0.993, min 0.87
    with pytest.raises(ValueError, match="landmarks"):
        TorchFaceStage(device="cpu", landmarks="sp68")


def test_backend_choice_on_cpu():
    b = dlib_face_backend(device="cpu")
    assert type(b).__name__ == "DlibBackend" and b.detector == "hog" and b.descriptor == "torch"
    assert dlib_face_backend(device="cpu", detector="mtcnn").detector == "mtcnn"
