"""5-point similarity alignment to the ArcFace 112x112 template, and a pose estimate.

As insightface's ``face_align.norm_crop``: the similarity transform is Umeyama's least-squares
estimate (what skimage's ``SimilarityTransform.estimate`` computes, and insightface calls), the
warp is ``cv2.warpAffine``. ``cv2.estimateAffinePartial2D`` is not used: it is a robust
(RANSAC/LMedS) fit from minimal subsets, which on five noisy landmarks differs from the
least-squares transform (measured: up to hundreds of pixels of translation on jittered points).
"""

from __future__ import annotations

import numpy as np

# insightface's arcface_dst (face_align.py): left eye, right eye, nose tip, left and right
# mouth corners, image-left first, for a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
ARCFACE_SIZE = 112

# A generic 3D face at the same 5 points: x, y are the ArcFace template's (centred on the
# nose tip, y up, in template pixels), z (towards the camera) from a generic head model
# scaled to the template (eyes ~0.41, mouth corners ~0.38 inter-ocular distances behind
# the nose tip), so the template itself reads as yaw = pitch = roll = 0.
_IOD = float(ARCFACE_TEMPLATE[1, 0] - ARCFACE_TEMPLATE[0, 0])
FACE_3D = np.column_stack(
    [
        ARCFACE_TEMPLATE[:, 0].astype(np.float64) - ARCFACE_TEMPLATE[2, 0],
        -(ARCFACE_TEMPLATE[:, 1].astype(np.float64) - ARCFACE_TEMPLATE[2, 1]),
        np.array([-0.41, -0.41, 0.0, -0.38, -0.38]) * _IOD,
    ]
)


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) taking ``src`` points to ``dst``.

    Returns the 3x3 homogeneous matrix T with dst ~= T @ [src, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2:
        raise ValueError(f"point sets must have the same (N, d) shape, got {src.shape} and {dst.shape}")
    n, d = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    cov = dst_c.T @ src_c / n
    sign = np.ones(d)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    T = np.eye(d + 1)
    if rank == 0:
        return T * np.nan
    if rank == d - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            T[:d, :d] = u @ vt
        else:
            s_ = sign[-1]
            sign[-1] = -1
            T[:d, :d] = u @ np.diag(sign) @ vt
            sign[-1] = s_
    else:
        T[:d, :d] = u @ np.diag(sign) @ vt
    if estimate_scale:
        var = src_c.var(axis=0).sum()
        scale = (s * sign).sum() / var if var > 0 else 1.0
    else:
        scale = 1.0
    T[:d, d] = dst_mean - scale * (T[:d, :d] @ src_mean)
    T[:d, :d] *= scale
    return T


def estimate_norm(landmarks: np.ndarray, image_size: int = ARCFACE_SIZE) -> np.ndarray:
    """The 2x3 affine matrix taking image points to the ArcFace template (insightface's estimate_norm)."""
    lmk = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio, diff_x = image_size / 128.0, 8.0 * image_size / 128.0
    else:
        raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}")
    dst = ARCFACE_TEMPLATE.astype(np.float64) * ratio
    dst[:, 0] += diff_x
    return umeyama(lmk, dst)[:2]


def invert_affine(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    A = M[:, :2]
    t = M[:, 2]
    Ai = np.linalg.inv(A)
    return np.hstack([Ai, (-Ai @ t)[:, None]])


def apply_affine(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    return p @ np.asarray(M, dtype=np.float64)[:, :2].T + np.asarray(M, dtype=np.float64)[:, 2]


def warp_affine(image: np.ndarray, M: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp ``image`` (HxWxC uint8) with the forward 2x3 matrix M into an output of (width, height):
    ``cv2.warpAffine`` with bilinear sampling and a zero border, exactly what insightface's
    ``norm_crop`` does (output pixel (x, y) samples the input at M^-1 (x, y))."""
    import cv2

    return cv2.warpAffine(
        np.ascontiguousarray(image), np.asarray(M, dtype=np.float64), (int(size[0]), int(size[1])),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = ARCFACE_SIZE) -> np.ndarray:
    """The aligned ArcFace crop (image_size x image_size) of the face with these 5 landmarks."""
    M = estimate_norm(landmarks, image_size)
    return warp_affine(image, M, (image_size, image_size))


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image: a blur measure (higher = sharper)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        a = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]
    return float(lap.var())


def estimate_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 5 landmarks (insightface order, image pixels).

    A scaled-orthographic fit of a generic 3D face (:data:`FACE_3D`) to the 5 points by
    least squares, projected onto the nearest rotation. Rough (5 points, a generic face):
    good for filtering profiles and tilted faces, not for measurement. Signs: roll > 0 when
    the eye line turns clockwise in the image (right eye lower), yaw > 0 when the nose moves
    towards the image right of the eye midpoint, pitch > 0 when the nose moves up towards
    the eye line (head tilted up).
    """
    p = np.asarray(landmarks, dtype=np.float64).reshape(5, 2).copy()
    if not np.all(np.isfinite(p)):
        return float("nan"), float("nan"), float("nan")
    p[:, 1] = -p[:, 1]  # y up
    X = FACE_3D - FACE_3D.mean(axis=0)
    x = p - p.mean(axis=0)
    M, *_ = np.linalg.lstsq(X, x, rcond=None)  # (3, 2): x ~= X @ M
    M = M.T  # (2, 3) rows r1, r2 (scaled)
    u, _, vt = np.linalg.svd(M, full_matrices=False)
    R2 = u @ vt  # nearest matrix with orthonormal rows
    r1, r2 = R2[0], R2[1]
    r3 = np.cross(r1, r2)
    R = np.stack([r1, r2, r3])
    # R = Rz(roll) @ Ry(yaw) @ Rx(pitch) (model -> camera, camera y up)
    yaw = np.degrees(np.arcsin(np.clip(-R[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(R[2, 1], R[2, 2]))
    roll = np.degrees(np.arctan2(R[1, 0], R[0, 0]))
    # Report in image terms: roll clockwise-positive in the y-down image; yaw/pitch as documented.
    return float(yaw), float(-pitch), float(-roll)
