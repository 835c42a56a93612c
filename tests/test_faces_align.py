import numpy as np
import pytest

from pipeline.faces.align import (
    ARCFACE_TEMPLATE,
    FACE_3D,
    apply_affine,
    estimate_norm,
    estimate_pose,
    invert_affine,
    laplacian_variance,
    norm_crop,
    umeyama,
    warp_affine,
)


def warp_affine_numpy(image: np.ndarray, M: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An independent bilinear sampler in numpy (zero border): output (x, y) = input at M^-1 (x, y)."""
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    W, H = int(size[0]), int(size[1])
    inv = invert_affine(M)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    padded = np.zeros((h + 2, w + 2, img.shape[2]))
    padded[1:-1, 1:-1] = img

    def at(yy, xx):
        return padded[np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]

    out = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
           + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _similarity(scale, angle_deg, tx, ty):
    a = np.radians(angle_deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * scale
    return np.hstack([R, [[tx], [ty]]])


@pytest.mark.parametrize(
    "scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (2.5, 17.0, 310.0, -40.0), (0.4, -63.0, 12.5, 99.0)]
)
def test_umeyama_recovers_similarity(scale, angle, tx, ty):
    M = _similarity(scale, angle, tx, ty)
    src = ARCFACE_TEMPLATE.astype(np.float64)
    dst = apply_affine(M, src)
    T = umeyama(src, dst)
    np.testing.assert_allclose(T[:2], M, atol=1e-9)
    np.testing.assert_allclose(T[2], [0, 0, 1])


def test_umeyama_least_squares_with_noise():
    rng = np.random.default_rng(0)
    M = _similarity(3.0, 25.0, 100.0, 50.0)
    src = ARCFACE_TEMPLATE.astype(np.float64)
    dst = apply_affine(M, src) + rng.normal(0, 0.5, size=(5, 2))
    T = umeyama(src, dst)
    np.testing.assert_allclose(T[:2, :2], M[:, :2], atol=0.05)
    np.testing.assert_allclose(T[:2, 2], M[:, 2], atol=2.0)
    assert np.linalg.norm(apply_affine(T[:2], src) - dst, axis=1).mean() < 1.0


def test_estimate_norm_maps_landmarks_onto_template():
    M = _similarity(4.0, -30.0, 500.0, 200.0)
    lmk = apply_affine(M, ARCFACE_TEMPLATE)  # a face in a large image, rotated by 30 degrees
    N = estimate_norm(lmk)
    np.testing.assert_allclose(apply_affine(N, lmk), ARCFACE_TEMPLATE, atol=1e-4)


def test_warp_matches_numpy_reference_and_cv2_convention():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    M = _similarity(0.8, 12.0, 10.0, -5.0)
    a = warp_affine(img, M, (112, 112)).astype(int)
    b = warp_affine_numpy(img, M, (112, 112)).astype(int)
    inner = (slice(10, 60), slice(10, 80))  # away from the border
    assert np.abs(a[inner] - b[inner]).max() <= 2
    # bilinear sampling of a linear ramp is exact: output(x, y) = ramp(M^-1 (x, y)) (cv2 convention)
    ys, xs = np.mgrid[0:100, 0:100]
    ramp = np.stack([xs * 2, ys * 2, xs + ys], axis=-1).astype(np.uint8)
    M2 = _similarity(1.0, 0.0, -20.3, -30.6)  # pure shift: out(x, y) = in(x + 20.3, y + 30.6)
    out = warp_affine(ramp, M2, (40, 40)).astype(float)
    np.testing.assert_allclose(
        out[5:30, 5:30, 0], 2 * (np.arange(40)[5:30] + 20.3)[None, :].repeat(25, 0), atol=1.01
    )
    np.testing.assert_allclose(
        out[5:30, 5:30, 1], 2 * (np.arange(40)[5:30] + 30.6)[:, None].repeat(25, 1), atol=1.01
    )


def test_norm_crop_puts_landmarks_on_template():
    # draw dots at 5 landmark positions in a rotated, scaled face; after alignment they sit on the template
    M = _similarity(2.0, 20.0, 60.0, 40.0)
    lmk = apply_affine(M, ARCFACE_TEMPLATE)
    img = np.zeros((400, 400, 3), dtype=np.uint8)
    for x, y in lmk:
        img[round(y) - 3 : round(y) + 4, round(x) - 3 : round(x) + 4] = 255
    crop = norm_crop(img, lmk)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE:
        assert crop[round(y), round(x)].min() > 200


def test_pose_from_landmarks():
    T = ARCFACE_TEMPLATE.astype(np.float64)
    yaw, pitch, roll = estimate_pose(T * 3 + 7)
    assert abs(yaw) < 1e-6 and abs(pitch) < 1e-6 and abs(roll) < 1e-6
    c = T.mean(axis=0)
    M = _similarity(1.0, 15.0, 0, 0)
    _, _, roll = estimate_pose(apply_affine(M, T - c) + c)
    assert roll == pytest.approx(15.0, abs=1e-6)
    a = np.radians(25)
    Ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    P = FACE_3D @ Ry.T
    yaw, pitch, roll = estimate_pose(np.c_[P[:, 0], -P[:, 1]] * 2 + 100)
    assert yaw == pytest.approx(25.0, abs=1e-6) and abs(pitch) < 1e-6 and abs(roll) < 1e-6
    nose_right = T.copy()
    nose_right[2, 0] += 6
    assert estimate_pose(nose_right)[0] > 10


def test_laplacian_variance_orders_sharpness():
    rng = np.random.default_rng(2)
    sharp = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    flat = np.full((112, 112, 3), 128, dtype=np.uint8)
    assert laplacian_variance(sharp) > 1000 > laplacian_variance(flat) == 0.0
