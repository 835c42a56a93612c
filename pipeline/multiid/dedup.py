"""Copy-paste guard: perceptual hashes of whole images and of landmark-aligned face crops, and a
geometric keypoint check.

Three kinds of check, all computed once per image / per face and compared per (target face, candidate
reference face):

* **Image pHash** (DCT hash, as in ``imagehash.phash``: grey 32x32, 2-D DCT-II, the 8x8 lowest
  frequencies thresholded at their median -> 64 bits). Catches resized and re-encoded copies of a
  whole photo. Implemented here with scipy (``imagehash`` is not a dependency).
* **Face-crop pHash + NCC**. A square crop centred on the landmarks' centroid, side proportional to
  their RMS radius (so the crop is the same region whatever the image's scale), grey, resized to
  32x32 for the hash and to 48x48 for a normalised cross-correlation searched over small shifts
  (±3 px at 48 px, with ``cv2.matchTemplate``). A mirrored copy is hashed too. Catches composites (a face pasted from one
  photo into another, or cut out of a group still), where the whole-image hashes differ.

* **Keypoints (geometric same-shot check)**. SIFT keypoints (opencv, 600 per region) in the grey region
  around each face (face box grown by 1.0x its size on each side, clipped to the image, resized so the
  face box's longer side is 100 px: ~300 px regions, at most 384), computed once per (uid, face_index)
  for the region and its mirror image. Matches = mutual nearest neighbours passing Lowe's ratio test
  (0.8); a similarity transform (``cv2.estimateAffinePartial2D``, RANSAC 3 px, scale in [0.5, 2] since
  both regions are face-normalised) is fitted and the inliers are counted at a tight 1.5 px residual;
  the better of (reference, mirrored reference) counts. Crops that cut the face at the image edge,
  resized / re-encoded / mirrored copies and composites share exact pixel geometry (many tight inliers,
  most matches consistent); a different photo of the same person only roughly agrees (few tight
  inliers, a low inlier ratio).

A candidate is a near-duplicate when any of: image Hamming <= ``image_hamming_max``, face Hamming
(min over mirror) <= ``face_hamming_max``, face NCC >= ``face_ncc_min``, keypoints: inliers >=
``kp_min_inliers`` and inliers / matches >= ``kp_min_ratio``, or inliers >= ``kp_strong_inliers``.

Why the keypoint check: face_recognition 1.3.0's test images ``obama_partial_face.jpg`` (491x1137) and
``obama_partial_face2.jpg`` (551x1137) are two horizontal crops of ``obama.jpg`` (910x1137), the face
cut at 23 % / 78 % of its width; the hashes and the NCC saw them as different shots (face Hamming 16,
NCC 0.69; dlib cosine 0.979 is under the 0.987 ceiling) and the builder picked one as the other's
reference. Keypoints: 98-100 tight inliers, ratio 0.97-0.99 (vs obama2 / obama3: 2-6 inliers).

Calibration of the keypoint thresholds (``bench/bench_multiid.py --keypoints``, shared/data/faces,
largest face of each labelled photo + the six face_recognition test images, opencv-python-headless 5.0):

    same-person different-photo pairs (842 ordered pairs, known near-duplicates excluded):
        tight inliers p50 3, p95 11, p99 17, max 23; ratio p50 0.50, p95 0.77
    synthetic same-shot pairs (2 x 1048 ordered, ``pipeline.faces.calibration.same_shot_variants``: x0.6, x0.35,
    JPEG q=35, mirror, mirror+x0.8+JPEG q=50, composite, original vs edge-cut crop, two edge-cut crops):
        tight inliers p1 13, p5 21, p50 57; ratio p1 0.87, p5 0.93, p50 1.0
        hardest: two crops sharing half a face (p1 9 inliers, ratio p1 0.78), x0.35 of 150 px crops
    -> kp_min_inliers 10, kp_min_ratio 0.8, kp_strong_inliers 30: copies caught 99.57 %, genuine
       pairs flagged 0.83 % (7 ordered pairs, all among the 150 px john_* crops, 10-13 inliers).
    The known near-duplicates in john_* (salley 189/192, simm 300/304, shimkus 375/376; the README's
    distance < 0.2 pairs) get 40-68 inliers, ratio >= 0.97, and are flagged, which is correct.

bbt_* crops vs the face-api.js__bbt1..5 stills (the README suspects some crops were cut from them): the
best match of each of the 40 crops against any of the 21 still faces has at most 15 tight inliers (median
~4; a real copy of a 150 px crop gets ~35-60), so none is cut from these stills. One chance hit passes
the thresholds (sheldon3 vs the region around Bernadette's face in bbt4: 11 inliers, ratio 0.85), a
different person, which the builder never compares.

Cost: ~50 ms per face for keypoints (region + mirror); ~0.5 ms per compared pair, both orientations and
the RANSAC fits (1.6 ms with opencv's batchDistance, 2.0 ms with BFMatcher's knnMatch + match, on the
~140-keypoint regions of the shared photos: ``bench/bench_multiid.py --matcher``). SIFT's descriptors are
bytes stored as float32, so every squared distance is an exact integer in float32 and one matrix product
gives the very distances batchDistance gives, for both directions of the mutual test.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.fft import dctn

from pipeline.decode import upright

HASH_SIZE = 8
HASH_IMG = 32
NCC_SIZE = 48
NCC_PAD = 3
CROP_SCALE = 4.0  # a face crop's side, in RMS landmark radii (crop_box)


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
    im = upright(im)
    return im.convert("L")


def image_phash(gray_img: Image.Image) -> np.ndarray:
    return phash_bits(np.asarray(gray_img))


def crop_box(landmarks, bbox, scale: float = CROP_SCALE) -> tuple[float, float, float, float]:
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


def _standardised(patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(patch - mean) / std over the valid pixels, zero elsewhere. NCC does not change under this, and
    the correlation sums below stay small enough for float32."""
    k = float(mask.sum())
    if k == 0:
        return np.zeros_like(patch, dtype=np.float32)
    mu = float((patch * mask).sum()) / k
    sd = float(np.sqrt((((patch - mu) ** 2) * mask).sum() / k)) or 1.0
    return ((patch - mu) / sd * mask).astype(np.float32)


def patch_ncc(a: FaceFingerprint, b: FaceFingerprint) -> float:
    """Max normalised cross-correlation of a's centre 48x48 against b over shifts of ±NCC_PAD px.

    Only pixels inside both source images count (a face near an image border is padded differently
    in a photo and in a composite made from it); fewer than half the pixels valid gives -1. The
    masked NCC of every shift comes from six ``cv2.matchTemplate`` correlations (the sums of the
    masks, values and squares over the pixels valid in both), which is exact, not approximate.
    """
    import cv2

    sl = slice(NCC_PAD, NCC_PAD + NCC_SIZE)
    ma = np.ascontiguousarray(a.mask[sl, sl], dtype=np.float32)
    mb = np.ascontiguousarray(b.mask, dtype=np.float32)
    ta = _standardised(a.patch[sl, sl], ma)
    ib = _standardised(b.patch, mb)

    def corr(image, template):
        return cv2.matchTemplate(image, template, cv2.TM_CCORR).astype(np.float64)

    k = corr(mb, ma)
    sa, sb = corr(mb, ta), corr(ib, ma)
    saa, sbb, sab = corr(mb, ta * ta), corr(ib * ib, ma), corr(ib, ta)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = sab - sa * sb / k
        den = np.sqrt(np.maximum(saa - sa * sa / k, 0.0) * np.maximum(sbb - sb * sb / k, 0.0))
        r = np.where((k >= 0.5 * NCC_SIZE * NCC_SIZE) & (den > 1e-6), num / den, -1.0)
    return float(r.max())


def face_hamming(a: FaceFingerprint, b: FaceFingerprint) -> int:
    return min(hamming(a.phash, b.phash), hamming(a.phash, b.phash_mirror))


@dataclass
class DupCheck:
    image_hamming: int
    face_hamming: int
    face_ncc: float
    is_duplicate: bool
    reason: str  # "", "image_phash", "face_phash", "face_ncc", "keypoints" (first that fired)
    kp_inliers: int | None = None  # keypoint check (None when it was not run)
    kp_ratio: float | None = None
    kp_duplicate: bool = False


def compare(img_a: np.ndarray, img_b: np.ndarray, fa: FaceFingerprint, fb: FaceFingerprint,
            image_hamming_max: int, face_hamming_max: int, face_ncc_min: float,
            ka: KeypointSet | None = None, kb: KeypointSet | None = None,
            kp_min_inliers: int = 10, kp_min_ratio: float = 0.8, kp_strong_inliers: int = 30) -> DupCheck:
    ih = hamming(img_a, img_b)
    fh = face_hamming(fa, fb)
    ncc = patch_ncc(fa, fb)
    kp_inl = kp_ratio = None
    kp_dup = False
    if ka is not None and kb is not None:
        m = keypoint_match(ka, kb)
        kp_inl, kp_ratio = m.inliers, m.ratio
        kp_dup = keypoint_same_shot(m, kp_min_inliers, kp_min_ratio, kp_strong_inliers)
    reason = ""
    if ih <= image_hamming_max:
        reason = "image_phash"
    elif fh <= face_hamming_max:
        reason = "face_phash"
    elif ncc >= face_ncc_min:
        reason = "face_ncc"
    elif kp_dup:
        reason = "keypoints"
    return DupCheck(ih, fh, round(ncc, 4), bool(reason), reason, kp_inl, kp_ratio, kp_dup)


# --------------------------------------------------------------------------------------------------
# Geometric same-shot check: local keypoints + RANSAC (robust to crops, scaling, re-encoding, flips,
# composites). Method and calibration: see the module docstring ("Keypoints").
# --------------------------------------------------------------------------------------------------

KP_GROW = 1.0  # region = face box grown by this x its width/height on each side, clipped to the image
KP_FACE_PX = 100  # regions are resized so that the face box's longer side is this many pixels (region ~300 px),
KP_MAX_SIDE = 384  # but the region's longest side at most this,
KP_MAX_UPSCALE = 2.5  # and small faces enlarged at most this much
KP_NFEATURES = 600
KP_RATIO = 0.8  # Lowe's ratio test
KP_RANSAC_PX = 3.0  # RANSAC reprojection threshold, pixels of the reference region (at KP_MAX_SIDE scale)
KP_TIGHT_PX = 1.5  # inliers are counted at this residual after the fit
KP_SCALE_RANGE = (0.5, 2.0)  # both regions are face-normalised: a copy maps at scale ~1


@dataclass
class KeypointSet:
    """SIFT keypoints of the region around one face, and of its mirror image (region pixels)."""

    pts: np.ndarray  # float32 (n, 2)
    desc: np.ndarray | None  # float32 (n, 128)
    pts_m: np.ndarray
    desc_m: np.ndarray | None
    size: tuple[int, int]  # region (w, h) after resizing

    def __post_init__(self):
        # byte-valued descriptors (SIFT's) come as float32 or as the stores' uint8, and are held as float32
        # with their squared norms, for the exact matrix-product distances
        self.desc, self.sq = _held_desc(self.desc)
        self.desc_m, self.sq_m = _held_desc(self.desc_m)

    def stored_desc(self, mirrored: bool = False) -> np.ndarray | None:
        """The descriptors as the stores keep them: bytes when byte-valued (a quarter of the size)."""
        d, sq = (self.desc_m, self.sq_m) if mirrored else (self.desc, self.sq)
        return d.astype(np.uint8) if sq is not None else d


def _held_desc(desc: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(float32 descriptors, their squared norms when byte-valued, else None)."""
    if desc is not None and desc.dtype == np.uint8:  # bytes by type: no need to look
        desc = desc.astype(np.float32)
        return desc, (np.einsum("ij,ij->i", desc, desc) if desc.ndim == 2 and desc.shape[1] <= 128 and desc.size else None)
    return desc, _byte_valued_sq(desc)


def _byte_valued_sq(desc: np.ndarray | None) -> np.ndarray | None:
    """Squared norms of ``desc`` if every value is an integer in [0, 255] and there are at most 128 per row
    (opencv's SIFT saturates its descriptors to bytes, stored as float32): then every squared distance is
    an integer below 2**24, which float32 holds exactly however a BLAS orders its sums. None otherwise."""
    if desc is None or desc.dtype != np.float32 or desc.ndim != 2 or desc.shape[1] > 128 or not desc.size:
        return None
    if desc.min() < 0 or desc.max() > 255 or not np.array_equal(desc, np.round(desc)):
        return None
    return np.einsum("ij,ij->i", desc, desc)


def _cv2():
    import cv2

    return cv2


_SIFT = None


def _sift():
    global _SIFT
    if _SIFT is None:
        _SIFT = _cv2().SIFT_create(nfeatures=KP_NFEATURES)
    return _SIFT


def keypoint_region(gray: np.ndarray, bbox, grow: float = KP_GROW, max_side: int = KP_MAX_SIDE) -> np.ndarray:
    """Grey region around a face box (box grown by ``grow`` x its size on each side, clipped), resized so
    that the face box's longer side is ``KP_FACE_PX`` (the same face is at the same scale in every region,
    so the inlier tolerance means the same thing relative to the face)."""
    cv2 = _cv2()
    g = np.asarray(gray, dtype=np.uint8)
    H, W = g.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in bbox)
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    rx1, ry1 = max(0, int(np.floor(x1 - grow * bw))), max(0, int(np.floor(y1 - grow * bh)))
    rx2, ry2 = min(W, int(np.ceil(x2 + grow * bw))), min(H, int(np.ceil(y2 + grow * bh)))
    reg = g[ry1:ry2, rx1:rx2]
    if reg.size == 0:
        return np.zeros((8, 8), np.uint8)
    s = min(KP_MAX_UPSCALE, KP_FACE_PX / max(bw, bh), max_side / max(reg.shape))
    if abs(s - 1.0) > 1e-3:
        size = (max(8, round(reg.shape[1] * s)), max(8, round(reg.shape[0] * s)))
        reg = cv2.resize(reg, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return np.ascontiguousarray(reg)


def _detect(reg: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    kps, desc = _sift().detectAndCompute(reg, None)
    pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
    return pts, desc


def face_keypoints(gray: np.ndarray, bbox) -> KeypointSet:
    """Keypoints of the region around a face, and of the mirrored region."""
    reg = keypoint_region(gray, bbox)
    pts, desc = _detect(reg)
    pts_m, desc_m = _detect(np.ascontiguousarray(reg[:, ::-1]))
    return KeypointSet(pts, desc, pts_m, desc_m, (reg.shape[1], reg.shape[0]))


def _mutual_ratio_matches(da: np.ndarray, db: np.ndarray, ratio: float, sq_a: np.ndarray | None = None,
                          sq_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(query, train) indices of the matches from ``da`` to ``db`` that pass Lowe's ratio test and are mutual
    nearest neighbours, in query order: what ``BFMatcher(NORM_L2)``'s ``knnMatch(da, db, 2)`` filtered by
    ``match(db, da)`` gives. With both descriptors' squared norms (:func:`_byte_valued_sq`), the squared
    distances come from one matrix product, exact integers, so the distances are the very floats
    ``cv2.batchDistance`` gives and ties go to the lowest index as there (3.4x less CPU:
    ``bench/bench_multiid.py --matcher``); the backward neighbours are read from the same matrix.
    Otherwise ``cv2.batchDistance`` (BFMatcher's kernel), the backward neighbours found only for the train
    descriptors that some ratio-passing match points to."""
    if sq_a is not None and sq_b is not None:
        return _exact_ratio_matches(da, db, ratio, sq_a, sq_b)
    cv2 = _cv2()
    dist, nidx = cv2.batchDistance(da, db, cv2.CV_32F, normType=cv2.NORM_L2, K=2)
    dist = dist.astype(np.float64)  # the test in float64, as Python floats compared it
    query = np.flatnonzero(dist[:, 0] < ratio * dist[:, 1])
    if not len(query):
        return query, query
    train = nidx[query, 0]
    heads = np.unique(train)
    _, back = cv2.batchDistance(np.ascontiguousarray(db[heads]), da, cv2.CV_32F, normType=cv2.NORM_L2, K=1)
    mutual = back[np.searchsorted(heads, train), 0] == query
    return query[mutual], train[mutual]


def _exact_ratio_matches(da, db, ratio, sq_a, sq_b):
    # d2 - |a|^2 per row: |b|^2 - 2 a.b (exact integers); the row's constant changes no row's order
    part = da @ db.T
    part *= -2
    part += sq_b
    rows = np.arange(len(da))
    best = part.argmin(axis=1)  # the first of equals, as batchDistance keeps it
    d0 = part[rows, best]
    part[rows, best] = np.inf
    d1 = part.min(axis=1)
    part[rows, best] = d0
    dist0 = np.sqrt(d0 + sq_a).astype(np.float64)  # float32 sqrt, as batchDistance; compared in float64
    dist1 = np.sqrt(d1 + sq_a).astype(np.float64)
    query = np.flatnonzero(dist0 < ratio * dist1)
    if not len(query):
        return query, query
    train = best[query]
    heads = np.unique(train)
    back = (part[:, heads] + sq_a[:, None]).argmin(axis=0)
    mutual = back[np.searchsorted(heads, train)] == query
    return query[mutual], train[mutual]


def _match_one(pa_: np.ndarray, da, pb: np.ndarray, db, ratio: float = KP_RATIO, ransac_px: float = KP_RANSAC_PX,
               tight_px: float = KP_TIGHT_PX, sq_a: np.ndarray | None = None, sq_b: np.ndarray | None = None) -> tuple[int, int]:
    """(tight inliers, good matches) of a RANSAC similarity fit from a's keypoints to b's.

    good = mutual nearest neighbours passing Lowe's ratio test; the fit is RANSAC with ``ransac_px``;
    inliers are then counted at ``tight_px`` (copies align to ~1 px, different photos of a face only
    roughly).
    """
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return 0, 0
    cv2 = _cv2()
    query, train = _mutual_ratio_matches(da, db, ratio, sq_a, sq_b)
    good = query
    if len(good) < 3:
        return 0, len(good)
    src = pa_[query].reshape(-1, 2)
    dst = pb[train].reshape(-1, 2)
    M, inl = cv2.estimateAffinePartial2D(src.reshape(-1, 1, 2), dst.reshape(-1, 1, 2), method=cv2.RANSAC,
                                         ransacReprojThreshold=ransac_px, maxIters=2000, confidence=0.995, refineIters=10)
    if M is None or inl is None:
        return 0, len(good)
    scale = float(np.hypot(M[0, 0], M[1, 0]))
    if not (KP_SCALE_RANGE[0] <= scale <= KP_SCALE_RANGE[1]):
        return 0, len(good)
    res = np.linalg.norm(src @ M[:, :2].T + M[:, 2] - dst, axis=1)
    return int(np.count_nonzero(res <= tight_px)), len(good)


@dataclass
class KeypointMatch:
    inliers: int  # tight RANSAC inliers of the best of (direct, mirrored)
    good: int  # mutual ratio-test matches of that orientation
    ratio: float  # inliers / good (0 when good == 0)
    mirrored: bool


def keypoint_match(a: KeypointSet, b: KeypointSet, **params) -> KeypointMatch:
    """Best geometric agreement between two face regions, trying b as is and mirrored."""
    best = None
    for mirrored, (pb, db) in ((False, (b.pts, b.desc)), (True, (b.pts_m, b.desc_m))):
        inl, good = _match_one(a.pts, a.desc, pb, db, sq_a=a.sq, sq_b=b.sq_m if mirrored else b.sq, **params)
        if best is None or inl > best[0]:
            best = (inl, good, mirrored)
    inl, good, mirrored = best
    return KeypointMatch(inl, good, round(inl / good, 4) if good else 0.0, mirrored)


def keypoint_same_shot(m: KeypointMatch, min_inliers: int, min_ratio: float, strong_inliers: int) -> bool:
    """Same shot: enough tight inliers that are also most of the matches, or very many inliers."""
    return (m.inliers >= min_inliers and m.ratio >= min_ratio) or m.inliers >= strong_inliers
