"""dlib's 150x150 face chips from its 5-point landmarks, without dlib: numpy (exact) and torch (batched).

dlib computes its descriptor on ``extract_image_chips(img, get_face_chip_details(shape, 150,
0.25))`` (dlib/image_transforms/interpolation.h). Reproduced here step by step:

- ``get_face_chip_details``: Umeyama similarity from dlib's 5-point template (scaled by the
  padding into a 150 px square) to the landmarks, stored as a rotated rectangle
  (``centered_drect`` of the mapped chip centre) and an angle.
- ``extract_image_chips`` (all faces of one image together): when a chip is more than 2x
  smaller than its rectangle, the source is first reduced with ``pyramid_down<2>`` (a separable
  [1 4 6 4 1] filter on integers, every other pixel, ``(n - 3) / 2`` pixels out, integer
  division by 256), as many levels as needed until the rectangle is at most 4x the chip area;
  the pyramid is built on the images' sub-rectangle covering all faces (grown by a border),
  so its pixel phase depends on that rectangle.
- bilinear sampling of each chip pixel with dlib's rules: a pixel whose 2x2 neighbourhood is
  not fully inside the source is 0, and the interpolated value is truncated (not rounded).

:func:`extract_face_chips` is the exact numpy version (checked pixel for pixel against
``dlib.get_face_chips`` in the tests). :func:`extract_face_chips_batch` is the batched version
for GPUs: the pyramid is built once per whole image (``crop_to_faces=False`` in the numpy
version gives the same chips), all faces of an image's level are sampled with one ``grid_sample``,
and the sampling maps of a whole batch of images reach the device in one copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# dlib's 5-point template in a unit square (get_face_chip_details): the two corners of the
# image-right eye, the two of the image-left eye, the bottom of the nose
DLIB_5PT_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)
CHIP_SIZE = 150
CHIP_PADDING = 0.25


def dlib_chip_template(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """Where dlib's 5 landmarks land in a ``size`` chip with ``padding`` (5, 2)."""
    return (padding + DLIB_5PT_TEMPLATE) / (2 * padding + 1) * size


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama) taking ``src`` (N, 2) to ``dst``: (A (2, 2), t (2,)),
    dst ~= A @ src + t; dlib's find_similarity_transform (reflections resolved as dlib does)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mf, mt = src.mean(0), dst.mean(0)
    sf = ((src - mf) ** 2).sum(1).mean()
    cov = (dst - mt).T @ (src - mf) / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    det = np.linalg.det(cov)
    if det < 0 or (det == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        if d[1] < d[0]:
            s[1, 1] = -1
        else:
            s[0, 0] = -1
    r = u @ s @ vt
    c = (np.diag(d) @ s).trace() / sf if sf != 0 else 1.0
    return c * r, mt - c * r @ mf


@dataclass
class ChipDetails:
    """dlib's chip_details: a rotated rectangle (left, top, right, bottom, dlib's inclusive
    convention) of the source mapped onto a rows x cols chip."""

    rect: np.ndarray  # float64 (4,) l, t, r, b
    angle: float
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


def face_chip_details(landmarks: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for one face's 5 dlib landmarks (5, 2) in image pixels
    (dlib's shape predictor gives integer points; pass them as they are)."""
    pts = np.asarray(landmarks, np.float64).reshape(5, 2)
    A, t = similarity_transform(dlib_chip_template(size, padding), pts)
    p = A @ np.array([1.0, 0.0])
    angle = math.atan2(p[1], p[0])
    scale = math.hypot(p[0], p[1])
    centre = A @ np.array([size / 2.0, size / 2.0]) + t
    w = size * scale - 1  # centered_drect: width--, height--
    rect = np.array([centre[0] - w / 2, centre[1] - w / 2, centre[0] + w / 2, centre[1] + w / 2])
    return ChipDetails(rect, angle, size, size)


# -- dlib rectangle helpers (drectangle: inclusive, width = r - l + 1) --------------------------


def _area(rect) -> float:
    l, t, r, b = rect
    if t > b or l > r:
        return 0.0
    return (r - l + 1) * (b - t + 1)


def _rect_down(rect) -> np.ndarray:
    # pyramid_down<2>::point_down: p / 2 - (1.25, 0.75)
    l, t, r, b = rect
    return np.array([l / 2 - 1.25, t / 2 - 0.75, r / 2 - 1.25, b / 2 - 0.75])


def _rotate(centre, p, angle):
    s, c = math.sin(angle), math.cos(angle)
    x, y = p[0] - centre[0], p[1] - centre[1]
    return np.array([c * x - s * y + centre[0], s * x + c * y + centre[1]])


def _corners(rect, angle):
    l, t, r, b = rect
    centre = ((l + r) / 2, (t + b) / 2)
    return [_rotate(centre, p, angle) for p in ((l, t), (r, t), (l, b), (r, b))]


def _lround(x: float) -> int:
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


def pyramid_down2(img: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2> on an RGB uint8 image: (rows - 3) // 2 x (cols - 3) // 2."""
    nr, nc = img.shape[:2]
    if nr <= 8 or nc <= 8:
        return np.zeros((0, 0) + img.shape[2:], np.uint8)
    x = img.astype(np.int32)
    wc = (nc - 3) // 2
    tmp = (
        x[:, 0 : 2 * wc : 2]
        + 4 * x[:, 1 : 2 * wc + 1 : 2]
        + 6 * x[:, 2 : 2 * wc + 2 : 2]
        + 4 * x[:, 3 : 2 * wc + 3 : 2]
        + x[:, 4 : 2 * wc + 4 : 2]
    )
    hr = (nr - 3) // 2
    out = (
        tmp[0 : 2 * hr : 2]
        + 4 * tmp[1 : 2 * hr + 1 : 2]
        + 6 * tmp[2 : 2 * hr + 2 : 2]
        + 4 * tmp[3 : 2 * hr + 3 : 2]
        + tmp[4 : 2 * hr + 4 : 2]
    )
    return (out // 256).astype(np.uint8)


def _affine_from_3(src: list, dst: list) -> np.ndarray:
    """The 2x3 affine map taking 3 points exactly onto 3 others."""
    S = np.array([[p[0], p[1], 1.0] for p in src])
    D = np.array([[p[0], p[1]] for p in dst])
    return np.linalg.solve(S, D).T


def bilinear_dlib(src: np.ndarray, M: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """dlib's transform_image with interpolate_bilinear: chip pixel (c, r) samples ``src`` at
    M @ (c, r, 1); 0 where the 2x2 neighbourhood leaves ``src``; values truncated."""
    out = np.zeros((rows, cols, 3), np.uint8)
    if src.size == 0:
        return out
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float64)
    px = M[0, 0] * xs + M[0, 1] * ys + M[0, 2]
    py = M[1, 0] * xs + M[1, 1] * ys + M[1, 2]
    left = np.floor(px).astype(np.int64)
    top = np.floor(py).astype(np.int64)
    h, w = src.shape[:2]
    ok = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    if not ok.any():
        return out
    l, t = left[ok], top[ok]
    fx = (px[ok] - l)[:, None]
    fy = (py[ok] - t)[:, None]
    s = src.astype(np.float64)
    tl, tr, bl, br = s[t, l], s[t, l + 1], s[t + 1, l], s[t + 1, l + 1]
    v = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    out[ok] = v.astype(np.uint8)  # truncation, as dlib's static_cast<unsigned char>
    return out


def _chip_level(rect, size) -> tuple[int, np.ndarray]:
    """(pyramid level, -1 = none; the rectangle at that level)."""
    level = -1
    while _area(_rect_down(rect)) > size:
        level += 1
        rect = _rect_down(rect)
    return level, rect


def _chip_map(rect_at_level, d: ChipDetails) -> np.ndarray:
    tl, tr, bl, _ = _corners(rect_at_level, d.angle)
    return _affine_from_3([(0, 0), (d.cols - 1, 0), (0, d.rows - 1)], [tl, tr, bl])


def extract_face_chips(
    image: np.ndarray, details: list[ChipDetails], crop_to_faces: bool = True
) -> list[np.ndarray]:
    """dlib's extract_image_chips (bilinear, with its image pyramid) for the faces of one RGB
    uint8 image. ``crop_to_faces=False`` builds the pyramid on the whole image instead of on
    the sub-rectangle around the faces (what :func:`extract_face_chips_torch` does)."""
    img = np.ascontiguousarray(image)
    h, w = img.shape[:2]
    if not details:
        return []
    max_depth = 0
    bb = None  # integer rectangle l, t, r, b (None = empty)
    for d in details:
        depth, grow = 0, 2.0
        rect = _rect_down(d.rect)
        while _area(rect) > d.size:
            rect = _rect_down(rect)
            depth += 1
            grow = grow * 2 + 2
        pts = np.array(_corners(d.rect, d.angle))
        rot = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
        g = np.array([rot[0] - grow, rot[1] - grow, rot[2] + grow, rot[3] + grow])
        g = np.array([max(g[0], 0), max(g[1], 0), min(g[2], w - 1), min(g[3], h - 1)])
        gi = [_lround(v) for v in g]
        if not (gi[1] > gi[3] or gi[0] > gi[2]):
            bb = gi if bb is None else [min(bb[0], gi[0]), min(bb[1], gi[1]), max(bb[2], gi[2]), max(bb[3], gi[3])]
        max_depth = max(depth, max_depth)
    if not crop_to_faces:
        bb = [0, 0, w - 1, h - 1]
    elif bb is None:  # every face outside the image: all chips are black
        bb = [0, 0, -1, -1]
    sub = img[max(bb[1], 0) : bb[3] + 1, max(bb[0], 0) : bb[2] + 1]
    levels = []
    for _ in range(max_depth):
        levels.append(pyramid_down2(levels[-1] if levels else sub))
    chips = []
    for d in details:
        if d.angle == 0 and d.rows == d.rect[3] - d.rect[1] + 1 and d.cols == d.rect[2] - d.rect[0] + 1:
            chips.append(_basic_chip(img, d))
            continue
        rect = d.rect - np.array([bb[0], bb[1], bb[0], bb[1]], dtype=np.float64)
        level, rect = _chip_level(rect, d.size)
        src = sub if level == -1 else levels[level]
        chips.append(bilinear_dlib(src, _chip_map(rect, d), d.rows, d.cols))
    return chips


def _basic_chip(img: np.ndarray, d: ChipDetails) -> np.ndarray:
    """dlib's basic_extract_image_chip: an unscaled, unrotated copy with a zero border."""
    l, t, r, b = (_lround(v) for v in d.rect)
    out = np.zeros((b - t + 1, r - l + 1, 3), np.uint8)
    h, w = img.shape[:2]
    il, it, ir, ib = max(l, 0), max(t, 0), min(r, w - 1), min(b, h - 1)
    if il <= ir and it <= ib:
        out[it - t : ib - t + 1, il - l : ir - l + 1] = img[it : ib + 1, il : ir + 1]
    return out


# -- torch, batched ----------------------------------------------------------------------------


def pyramid_down2_torch(img):
    """:func:`pyramid_down2` on a (3, H, W) float tensor of integer values (exact in float32:
    every partial sum is an integer below 2**24)."""
    import torch

    nr, nc = img.shape[-2:]
    if nr <= 8 or nc <= 8:
        return img.new_zeros(img.shape[:-2] + (0, 0))
    wc, hr = (nc - 3) // 2, (nr - 3) // 2
    x = img
    tmp = (
        x[..., 0 : 2 * wc : 2]
        + 4 * x[..., 1 : 2 * wc + 1 : 2]
        + 6 * x[..., 2 : 2 * wc + 2 : 2]
        + 4 * x[..., 3 : 2 * wc + 3 : 2]
        + x[..., 4 : 2 * wc + 4 : 2]
    )
    out = (
        tmp[..., 0 : 2 * hr : 2, :]
        + 4 * tmp[..., 1 : 2 * hr + 1 : 2, :]
        + 6 * tmp[..., 2 : 2 * hr + 2 : 2, :]
        + 4 * tmp[..., 3 : 2 * hr + 3 : 2, :]
        + tmp[..., 4 : 2 * hr + 4 : 2, :]
    )
    return torch.floor(out / 256.0)


def chip_sampling_maps(details: list[ChipDetails]) -> list[tuple[int, np.ndarray]]:
    """(pyramid level, 2x3 chip -> level-pixel map) of each face, pyramid over the whole image."""
    out = []
    for d in details:
        level, rect = _chip_level(np.asarray(d.rect, np.float64), d.size)
        out.append((level, _chip_map(rect, d)))
    return out


def chip_sampling_batch(details_per_image: list[list[ChipDetails]]) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The host half of :func:`extract_face_chips_batch`, so that the device gets one copy per batch:
    ``rows`` (F, 7) float64, one per face of every image ordered by (image, pyramid level), each the 2x3
    chip -> level-pixel map then the face's position in input order; ``groups`` (image, level, start, stop)
    of consecutive rows sampled together (one grid_sample each, as the per-image version did)."""
    rows, groups, position = [], [], 0
    for i, details in enumerate(details_per_image):
        maps = chip_sampling_maps(details)
        for level in sorted({lv for lv, _ in maps}):
            start = len(rows)
            for k, (lv, M) in enumerate(maps):
                if lv == level:
                    rows.append([*M.reshape(6), position + k])
            groups.append((i, level, start, len(rows)))
        position += len(details)
    return np.asarray(rows, np.float64).reshape(-1, 7), groups


def extract_face_chips_batch(images: list, details_per_image: list[list[ChipDetails]], size: int = CHIP_SIZE):
    """Chips (F, size, size, 3) uint8 of every face of a batch of images, in input order (image by image,
    face by face): each image a (3, H, W) or (H, W, 3) uint8 tensor on one device; its whole-image pyramid,
    dlib's border and truncation rules. The sampling maps of the whole batch are built on the host and
    copied to the device in one go, and nothing is read back: no synchronisation per image or face."""
    import torch
    import torch.nn.functional as F

    if len(images) != len(details_per_image):
        raise ValueError(f"{len(images)} images but {len(details_per_image)} lists of chip details")
    n = sum(len(d) for d in details_per_image)
    dev = images[0].device if images else torch.device("cpu")
    out = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=dev)
    if n == 0:
        return out
    rows, groups = chip_sampling_batch(details_per_image)
    table = torch.as_tensor(rows, device=dev)  # the batch's one host -> device copy
    maps = table[:, :6].reshape(-1, 2, 3)
    ys, xs = torch.meshgrid(
        torch.arange(size, device=dev, dtype=torch.float64),
        torch.arange(size, device=dev, dtype=torch.float64),
        indexing="ij",
    )
    grid_in = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (size, size, 3)
    by_level = torch.zeros_like(out)  # chips in the rows' order, (image, level)
    for i, image in enumerate(images):
        mine = [g for g in groups if g[0] == i]
        if not mine:
            continue
        if image.shape[0] != 3:
            image = image.permute(2, 0, 1)
        levels = [image.to(torch.float32)]
        for _ in range(max(level for _, level, _, _ in mine) + 1):
            levels.append(pyramid_down2_torch(levels[-1]))
        for _, level, start, stop in mine:
            src = levels[level + 1]
            h, w = src.shape[-2:]
            if h < 2 or w < 2:
                continue  # no 2x2 neighbourhood anywhere: dlib's chips are black
            pts = torch.einsum("hwk,njk->nhwj", grid_in, maps[start:stop])  # (n, size, size, 2) source pixels
            px, py = pts[..., 0], pts[..., 1]
            fl, ft = torch.floor(px), torch.floor(py)
            ok = (fl >= 0) & (ft >= 0) & (fl + 1 < w) & (ft + 1 < h)
            # align_corners=True: -1 and 1 are the centres of the first and last pixels
            grid = torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1).to(torch.float32)
            s = F.grid_sample(
                src[None].expand(stop - start, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                align_corners=True,
            )
            s = torch.floor(s.clamp(0, 255) + 1e-4) * ok[:, None].to(s.dtype)
            by_level[start:stop] = s.permute(0, 2, 3, 1).to(torch.uint8)
    # back to input order with the positions copied up with the maps (an index on the device)
    out.index_copy_(0, table[:, 6].long(), by_level)
    return out


def extract_face_chips_torch(image, details: list[ChipDetails], size: int = CHIP_SIZE):
    """Chips (N, size, size, 3) uint8 of the faces of one image: :func:`extract_face_chips_batch` of one."""
    return extract_face_chips_batch([image], [details], size)
