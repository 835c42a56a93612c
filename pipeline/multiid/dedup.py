"""Copy-paste guard: perceptual hashes of whole images and of landmark-aligned face crops.

Two checks, both computed once per image / per face and compared per (target face, candidate
reference face):

* **Image pHash** (DCT hash, as in ``imagehash.phash``: grey 32x32, 2-D DCT-II, the 8x8 lowest
  frequencies thresholded at their median -> 64 bits). Catches resized and re-encoded copies of a
  whole photo. Implemented here with scipy (``imagehash`` is not a dependency).
* **Face-crop pHash + NCC**. A square crop centred on the landmarks' centroid, side proportional to
  their RMS radius (so the crop is the same region whatever the image's scale), grey, resized to
  32x32 for the hash and to 48x48 for a normalised cross-correlation searched over small shifts
  (±3 px at 48 px). A mirrored copy is hashed too. Catches composites (a face pasted from one
  photo into another, or cut out of a group still), where the whole-image hashes differ.

A candidate is a near-duplicate when any of: image Hamming <= ``image_hamming_max``, face Hamming
(min over mirror) <= ``face_hamming_max``, face NCC >= ``face_ncc_min``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn

HASH_SIZE = 8
HASH_IMG = 32
NCC_SIZE = 48
NCC_PAD = 3


def phash_bits(gray: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash (bool array of 64) of a grey image array (any size)."""
    im = Image.fromarray(np.asarray(gray, dtype=np.uint8)).resize((HASH_IMG, HASH_IMG), Image.LANCZOS)
    px = np.asarray(im, dtype=np.float64)
    d = dctn(px, type=2, norm="ortho")[:HASH_SIZE, :HASH_SIZE]
    return (d > np.median(d)).ravel()


def bits_to_hex(bits: np.ndarray) -> str:
    return np.packbits(bits.astype(np.uint8)).tobytes().hex()


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(a != b))


def open_gray(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)
    return im.convert("L")


def image_phash(gray_img: Image.Image) -> np.ndarray:
    return phash_bits(np.asarray(gray_img))


def crop_box(landmarks, bbox, scale: float = 4.0) -> tuple[float, float, float, float]:
    """Square crop (x1, y1, x2, y2) centred on the landmarks, side = scale x their RMS radius.

    Falls back to the bbox centre and side when landmarks are missing or degenerate.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox)
    lm = None if landmarks is None else np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if lm is not None and len(lm) >= 3 and np.all(np.isfinite(lm)):
        c = lm.mean(axis=0)
        r = float(np.sqrt(((lm - c) ** 2).sum(axis=1).mean()))
        if r > 1.0:
            half = scale * r / 2
            return c[0] - half, c[1] - half, c[0] + half, c[1] + half
    c = ((x1 + x2) / 2, (y1 + y2) / 2)
    half = max(x2 - x1, y2 - y1) / 2
    return c[0] - half, c[1] - half, c[0] + half, c[1] + half


@dataclass
class FaceFingerprint:
    phash: np.ndarray  # 64 bools
    phash_mirror: np.ndarray
    patch: np.ndarray  # float32 (NCC_SIZE + 2 * NCC_PAD)^2, grey
    mask: np.ndarray  # float32, 1 where the patch lies inside the source image


def face_fingerprint(gray_img: Image.Image, landmarks, bbox) -> FaceFingerprint:
    bx1, by1, bx2, by2 = crop_box(landmarks, bbox)
    side = bx2 - bx1
    # crop with a margin so the NCC can search shifts; outside the image is masked out
    m = side * NCC_PAD / NCC_SIZE
    box = (round(bx1 - m), round(by1 - m), round(bx2 + m), round(by2 + m))
    size = (NCC_SIZE + 2 * NCC_PAD,) * 2
    patch = np.asarray(gray_img.crop(box).resize(size, Image.BILINEAR), dtype=np.float32)
    valid = Image.new("L", gray_img.size, 255).crop(box).resize(size, Image.BILINEAR)
    mask = (np.asarray(valid, dtype=np.float32) > 254).astype(np.float32)
    core_box = (round(bx1), round(by1), round(bx2), round(by2))
    core = np.asarray(gray_img.crop(core_box), dtype=np.float32)
    cmask = np.asarray(Image.new("L", gray_img.size, 255).crop(core_box)) > 0
    if cmask.any() and not cmask.all():  # fill outside-the-image pixels with the crop's mean
        core = np.where(cmask, core, core[cmask].mean())
    arr = core.round().clip(0, 255).astype(np.uint8)
    return FaceFingerprint(phash_bits(arr), phash_bits(arr[:, ::-1]), patch, mask)


def patch_ncc(a: FaceFingerprint, b: FaceFingerprint) -> float:
    """Max normalised cross-correlation of a's centre 48x48 against b over shifts of ±NCC_PAD px.

    Only pixels inside both source images count (a face near an image border is padded differently
    in a photo and in a composite made from it); fewer than half the pixels valid gives -1.
    """
    sl = slice(NCC_PAD, NCC_PAD + NCC_SIZE)
    pa_, ma = a.patch[sl, sl], a.mask[sl, sl]
    best = -1.0
    for dy in range(2 * NCC_PAD + 1):
        for dx in range(2 * NCC_PAD + 1):
            pb = b.patch[dy:dy + NCC_SIZE, dx:dx + NCC_SIZE]
            m = ma * b.mask[dy:dy + NCC_SIZE, dx:dx + NCC_SIZE]
            k = float(m.sum())
            if k < 0.5 * NCC_SIZE * NCC_SIZE:
                continue
            xa = pa_ - (pa_ * m).sum() / k
            xb = pb - (pb * m).sum() / k
            num = float((xa * xb * m).sum())
            den = float(np.sqrt((xa * xa * m).sum() * (xb * xb * m).sum()))
            if den > 1e-6:
                best = max(best, num / den)
    return best


def face_hamming(a: FaceFingerprint, b: FaceFingerprint) -> int:
    return min(hamming(a.phash, b.phash), hamming(a.phash, b.phash_mirror))


@dataclass
class DupCheck:
    image_hamming: int
    face_hamming: int
    face_ncc: float
    is_duplicate: bool
    reason: str  # "", "image_phash", "face_phash", "face_ncc" (first that fired)


def compare(img_a: np.ndarray, img_b: np.ndarray, fa: FaceFingerprint, fb: FaceFingerprint,
            image_hamming_max: int, face_hamming_max: int, face_ncc_min: float) -> DupCheck:
    ih = hamming(img_a, img_b)
    fh = face_hamming(fa, fb)
    ncc = patch_ncc(fa, fb)
    reason = ""
    if ih <= image_hamming_max:
        reason = "image_phash"
    elif fh <= face_hamming_max:
        reason = "face_phash"
    elif ncc >= face_ncc_min:
        reason = "face_ncc"
    return DupCheck(ih, fh, round(ncc, 4), bool(reason), reason)
