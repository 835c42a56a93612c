"""dlib's chips for a whole batch of images (pipeline/faces/dlib_chip.py extract_face_chips_batch): bit for bit
the chips of the per-image torch version it replaced, on the shared photos' dlib landmarks and on edge
placements (faces reaching out of the image or wholly outside it, tiny and huge faces, rotated ones, an
image too small for a pyramid level), with one host -> device copy per batch whatever its size."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dlib")

import torch.nn.functional as F

from pipeline.faces.dlib_chip import (
    chip_sampling_maps,
    dlib_chip_template,
    extract_face_chips_batch,
    extract_face_chips_torch,
    face_chip_details,
    pyramid_down2_torch,
)


def per_image_reference(image, details, size=150):
    """The per-image torch version as it was before the batched one (commit a24d303), kept as the oracle:
    its sampling maps copied to the device once per pyramid level of every image."""
    if image.shape[0] != 3:
        image = image.permute(2, 0, 1)
    dev = image.device
    n = len(details)
    out = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=dev)
    if n == 0:
        return out
    maps = chip_sampling_maps(details)
    max_level = max(level for level, _ in maps)
    levels = [image.to(torch.float32)]
    for _ in range(max_level + 1):
        levels.append(pyramid_down2_torch(levels[-1]))
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    grid_in = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)
    for level in sorted({lv for lv, _ in maps}):
        idx = [i for i, (lv, _) in enumerate(maps) if lv == level]
        src = levels[level + 1]
        h, w = src.shape[-2:]
        if h < 2 or w < 2:
            continue
        M = torch.as_tensor(np.stack([maps[i][1] for i in idx]), device=dev, dtype=torch.float64)
        pts = torch.einsum("hwk,njk->nhwj", grid_in, M)
        px, py = pts[..., 0], pts[..., 1]
        fl, ft = torch.floor(px), torch.floor(py)
        ok = (fl >= 0) & (ft >= 0) & (fl + 1 < w) & (ft + 1 < h)
        grid = torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1).to(torch.float32)
        s = F.grid_sample(src[None].expand(len(idx), -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=True)
        s = torch.floor(s.clamp(0, 255) + 1e-4) * ok[:, None].to(s.dtype)
        out[idx] = s.permute(0, 2, 3, 1).to(torch.uint8)
    return out


def placed(cx, cy, scale, angle):
    """dlib chip details of a face whose 5 template points sit at (cx, cy), ``scale`` image px per chip px,
    turned by ``angle`` radians (landmarks rounded, as dlib's shape predictor gives them)."""
    t = dlib_chip_template() - 75.0
    c, s = math.cos(angle), math.sin(angle)
    pts = scale * t @ np.array([[c, s], [-s, c]]) + (cx, cy)
    return face_chip_details(np.rint(pts))


def edge_details(h, w, rng):
    return [
        placed(w / 2, h / 2, 0.5, 0.0),  # smaller than the chip: no pyramid level
        placed(w / 2, h / 2, 7.0, 0.4),  # several pyramid levels
        placed(5, 5, 2.0, -0.3),  # reaches out of the top-left corner
        placed(w - 3, h - 2, 3.0, 1.2),  # out of the bottom-right corner
        placed(-4 * w, h / 2, 1.5, 0.0),  # wholly outside: black
        *(placed(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.3, 6), rng.uniform(-3, 3)) for _ in range(4)),
    ]


@pytest.fixture(scope="module")
def batch(shared_faces):
    from pipeline.faces.dlib_parity import collect_faces, photo_files

    files = photo_files(shared_faces)
    picked = [f for f in files if f.parent.name == "groups"][:1] + [f for f in files if "identities" in f.parts][:3]
    rng = np.random.default_rng(7)
    images, details, real = [], [], 0
    for im in collect_faces(shared_faces, picked):
        real += len(im.faces)
        h, w = im.image.shape[:2]
        details.append([face_chip_details(f.landmarks) for f in im.faces] + edge_details(h, w, rng))
        images.append(torch.from_numpy(im.image.copy()))
    assert real >= 4
    # an image with no face, one of 12 px (its first pyramid level has no 2x2 neighbourhood), a CHW one
    images += [images[0], torch.full((12, 20, 3), 200, dtype=torch.uint8), images[1].permute(2, 0, 1)]
    details += [[], [placed(10, 6, 4.0, 0.2), placed(10, 6, 0.3, 0.0)], details[1][:3]]
    return images, details


def test_batch_chips_are_the_per_image_chips_bit_for_bit(batch):
    images, details = batch
    got = extract_face_chips_batch(images, details)
    want = torch.cat([per_image_reference(im, d) for im, d in zip(images, details)])
    assert got.shape == want.shape == (sum(map(len, details)), 150, 150, 3)
    assert torch.equal(got, want)
    assert want.flatten(1).amax(1).min() == 0 and want.flatten(1).amax(1).max() > 0  # black and real chips
    # the one-image form is the batch of one
    assert torch.equal(extract_face_chips_torch(images[2], details[2]), per_image_reference(images[2], details[2]))
    assert extract_face_chips_batch([], []).shape == (0, 150, 150, 3)
    with pytest.raises(ValueError, match="2 images but 1"):
        extract_face_chips_batch(images[:2], details[:1])


def test_one_copy_to_the_device_per_batch(batch, monkeypatch):
    """Whatever the batch size: one torch.as_tensor (the sampling maps), nothing read back (.item, .cpu,
    .tolist, .numpy). The per-image version made one copy per pyramid level of every image."""
    images, details = batch
    calls = {}

    def counted(name, real):
        def f(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)
        return f

    for name in ("as_tensor", "tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    for name in ("item", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for n in (2, len(images)):
        calls.clear()
        extract_face_chips_batch(images[:n], details[:n])
        assert calls == {"as_tensor": 1}, (n, calls)
    calls.clear()
    for im, d in zip(images, details):
        per_image_reference(im, d)
    assert calls["as_tensor"] >= len(images)  # what the batch replaced
