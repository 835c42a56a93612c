"""The copy-paste guard's masked NCC (cv2.matchTemplate sums) against a direct loop over the shifts."""

import numpy as np
import pytest

from pipeline.multiid.dedup import NCC_PAD, NCC_SIZE, FaceFingerprint, patch_ncc


def ncc_by_loop(a: FaceFingerprint, b: FaceFingerprint) -> float:
    """Reference: every shift, masked means and norms computed directly."""
    sl = slice(NCC_PAD, NCC_PAD + NCC_SIZE)
    pa_, ma = a.patch[sl, sl].astype(np.float64), a.mask[sl, sl].astype(np.float64)
    best = -1.0
    for dy in range(2 * NCC_PAD + 1):
        for dx in range(2 * NCC_PAD + 1):
            pb = b.patch[dy:dy + NCC_SIZE, dx:dx + NCC_SIZE].astype(np.float64)
            m = ma * b.mask[dy:dy + NCC_SIZE, dx:dx + NCC_SIZE]
            k = m.sum()
            if k < 0.5 * NCC_SIZE * NCC_SIZE:
                continue
            xa, xb = pa_ - (pa_ * m).sum() / k, pb - (pb * m).sum() / k
            den = np.sqrt((xa * xa * m).sum() * (xb * xb * m).sum())
            if den > 1e-6:
                best = max(best, float((xa * xb * m).sum() / den))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_masked_ncc_matches_the_loop(seed):
    rng = np.random.default_rng(seed)
    n = NCC_SIZE + 2 * NCC_PAD
    base = rng.integers(0, 256, (n + 8, n + 8)).astype(np.float32)
    a_patch = base[:n, :n]
    shift = rng.integers(0, 4, 2)
    b_patch = base[shift[0]:shift[0] + n, shift[1]:shift[1] + n] if seed % 2 else rng.integers(0, 256, (n, n)).astype(np.float32)
    ma, mb = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    if seed % 3 == 0:
        ma[:, : rng.integers(1, 20)] = 0  # a face at the left image border
    if seed % 4 == 0:
        mb[: rng.integers(1, 30), :] = 0
    a = FaceFingerprint(None, None, np.ascontiguousarray(a_patch), ma)
    b = FaceFingerprint(None, None, np.ascontiguousarray(b_patch), mb)
    assert patch_ncc(a, b) == pytest.approx(ncc_by_loop(a, b), abs=1e-5)
    if seed % 2:  # a shifted copy of the same pixels correlates perfectly at its shift
        assert patch_ncc(a, b) > 0.999


def test_too_little_overlap_and_flat_patches_give_minus_one():
    n = NCC_SIZE + 2 * NCC_PAD
    rng = np.random.default_rng(0)
    p = rng.integers(0, 256, (n, n)).astype(np.float32)
    none = np.zeros((n, n), np.float32)
    assert patch_ncc(FaceFingerprint(None, None, p, none), FaceFingerprint(None, None, p, np.ones_like(p))) == -1.0
    flat = np.full((n, n), 7, np.float32)
    one = np.ones((n, n), np.float32)
    assert patch_ncc(FaceFingerprint(None, None, flat, one), FaceFingerprint(None, None, p, one)) == -1.0
