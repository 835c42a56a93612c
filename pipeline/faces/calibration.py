"""Per-backend face-similarity thresholds, in one place, with how each was measured.

Every rule that compares two faces' embeddings reads its threshold from :data:`BACKEND_THRESHOLDS`:

* ``cluster_link``: kNN edges at or above it join identities (``pipeline.identity``).
* ``same_person_min``: at or above it, two faces are the same person (multi-identity references
  must reach it; WithAnyone's 0.6 for ArcFace).
* ``different_person_max``: below it, two faces are different people (cross-expression pairs
  must stay below it).
* ``same_shot_min``: at or above it, two faces are probably the same shot (multi-identity
  references must stay below it; WithAnyone's 0.8 for ArcFace).
* ``removal_auto_min``: at or above it, a face is the person of a removal request's photo and is
  removed without review (between ``same_person_min`` and it: listed for review).
* ``det_score_min`` / ``det_score_good`` / ``blur_min``: when a detected face is usable.

For dlib the numbers are three operating points of one measurement on ``shared/data/faces``
(below); for ArcFace they come from the literature and are NOT measured here (no ArcFace weights
on these machines): re-calibrate with :func:`calibrate_on_folder` before relying on them.

dlib, ``cluster_link`` = 0.93: on the 125 labelled photos (19 people), after L2 normalisation,
same-person cosine has median 0.973, p5 0.941, min 0.893; different-person median 0.821, p95 0.876,
max 0.924. (dlib's raw descriptors have norm ~1.4-1.6 here, so dlib's usual euclidean 0.6 on raw
descriptors is cosine ~0.92 after normalisation; 0.82 would merge most people.) Chinese whispers is
near-perfect for thresholds 0.90-0.94 on that set; 0.93 is the middle of the plateau, leaning to
precision, because a link chains: one wrong edge merges two whole identities, while a reference
or a pair is judged one at a time.

dlib, ``removal_auto_min`` = 0.95: above every different-person cosine measured (max 0.924) by a margin,
while most same-person pairs reach it (median 0.973, p5 0.941); the rest of the person's photos are
found through their identity (the clustering links them at 0.93).

dlib, ``different_person_max`` = 0.90: just under the same-person minimum (0.893 rounds to the
p1 of 0.913 measured below): pairs below it are different people in all but ~1 % of same-person
cases, and the expression builder also requires different identity ids.

Calibrating the reference-similarity band ``same_person_min``/``same_shot_min`` (sim_low, sim_high) for a face backend.

WithAnyone keeps a reference when ArcFace cosine is in [0.6, 0.8]: 0.6 is "surely the same person"
(far above ArcFace's different-person tail, inside its same-person distribution) and 0.8 is the
lower edge of the "same shot" band (copies and near-duplicates of one photo). Those numbers mean
nothing for another descriptor, so we recompute the two *boundaries* they stand for:

* ``sim_low`` = the (1 - far) quantile of the **different-person** cosine distribution: above it,
  at most ``far`` of different-person pairs remain (default far = 1e-3; with fewer pairs than 1/far
  this is the maximum observed).
* ``sim_high`` = the (1 - dup_recall) quantile of the **same-shot** distribution (cosine between a
  face and the same face in a resized / re-encoded / pasted copy of its photo, made synthetically):
  at least ``dup_recall`` of copies lie above it (default 0.99), so the similarity band alone
  removes 99 % of copies; the perceptual-hash guard (dedup.py) catches the rest.
* The fraction of same-person (different photo) pairs kept inside [sim_low, sim_high] is reported.

We did not use quantile matching of the same-person distribution: it needs an ArcFace score
distribution on the same photos, which we do not have offline (:func:`match_quantile` is provided
for when one is available).

Measured on shared/data/faces with ``pipeline.faces.get_backend("dlib")`` (dlib_face_recognition_resnet_model_v1,
HOG detector with 2x search below 400 px, 5-point alignment, L2-normalised 128-d; 125 labelled photos of
19 people -> 417 same-person pairs, 7333 different-person pairs; 497 synthetic same-shot copies: 2/3
downscale, JPEG q=35, pasted on a larger canvas, mirrored), far = 1e-3, dup_recall = 0.99
(``calibrate_on_folder``, ``bench/bench_multiid.py --calibrate``; ~190 s on 2 busy cores):

    different-person cosine: p50 0.821, p99 0.896, p99.9 0.911, max 0.919 -> sim_low  = 0.911
    same-person cosine:      p1 0.913, p50 0.972, p99 0.991, max 0.999 (real near-duplicates)
    synthetic copies:        min 0.981, p1 0.988, p50 0.998 (mirrored copies are the lowest)
                                                              -> sim_high = 0.987 (0.9866)
    same-person pairs kept in [0.911, 0.987]: 93.0 %; different-person above low: 0.10 %;
    copies below high: 0.8 % (those are left to the copy-paste guard)

So dlib's band is about [0.91, 0.987] where ArcFace's is [0.6, 0.8]: narrow, because dlib packs all
faces into a small cone (different people are already at cosine ~0.82). The rounded values
are the dlib values of :data:`BACKEND_THRESHOLDS` below.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BackendThresholds:
    cluster_link: float
    same_person_min: float
    different_person_max: float
    same_shot_min: float
    removal_auto_min: float
    det_score_min: float  # detector confidence floor for a usable face
    det_score_good: float  # detector confidence that counts as full quality
    blur_min: float  # variance-of-Laplacian floor for a usable face
    source: str


_ARCFACE = BackendThresholds(
    cluster_link=0.45, same_person_min=0.6, different_person_max=0.5, same_shot_min=0.8, removal_auto_min=0.7,
    det_score_min=0.5, det_score_good=0.8, blur_min=10.0,
    source="literature, not measured here: WithAnyone's [0.6, 0.8] reference band; ArcFace verification "
    "operating points (same person ~0.4-0.5 and above, different people ~0 +- 0.1)",
)
BACKEND_THRESHOLDS: dict[str, BackendThresholds] = {
    "insightface": _ARCFACE,
    "arcface": _ARCFACE,
    # dlib_face_recognition_resnet_model_v1 cosines (L2-normalised), HOG detector scores (SVM margins ~0..3)
    "dlib": BackendThresholds(
        cluster_link=0.93, same_person_min=0.91, different_person_max=0.90, same_shot_min=0.987, removal_auto_min=0.95,
        det_score_min=0.0, det_score_good=1.0, blur_min=10.0,
        source="calibrated on shared/data/faces (pipeline/faces/calibration.py)",
    ),
}


def thresholds_for(backend: str) -> BackendThresholds:
    try:
        return BACKEND_THRESHOLDS[backend]
    except KeyError:
        raise KeyError(f"no calibrated thresholds for face backend {backend!r}; known: {sorted(BACKEND_THRESHOLDS)}") from None


@dataclass(frozen=True)
class Calibration:
    sim_low: float
    sim_high: float
    same_kept_fraction: float
    diff_above_low_fraction: float
    dup_below_high_fraction: float
    n_same: int
    n_diff: int
    n_dup: int
    quantiles: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _q(a: np.ndarray) -> dict:
    if a.size == 0:
        return {}
    qs = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0]
    return {f"p{int(q * 100)}": round(float(v), 4) for q, v in zip(qs, np.quantile(a, qs))}


def calibrate_thresholds(same, diff, dup, far: float = 1e-3, dup_recall: float = 0.99) -> Calibration:
    """(sim_low, sim_high) from same-person, different-person and same-shot cosine samples."""
    same, diff, dup = (np.asarray(x, dtype=np.float64).ravel() for x in (same, diff, dup))
    if diff.size == 0 or dup.size == 0:
        raise ValueError("need different-person and same-shot similarities")
    low = float(np.quantile(diff, 1.0 - far, method="higher"))
    high = float(np.quantile(dup, 1.0 - dup_recall, method="lower"))
    if not low < high:
        raise ValueError(f"no band: different-person tail {low:.4f} >= same-shot edge {high:.4f}")
    kept = float(np.mean((same >= low) & (same <= high))) if same.size else float("nan")
    return Calibration(
        sim_low=low,
        sim_high=high,
        same_kept_fraction=kept,
        diff_above_low_fraction=float(np.mean(diff > low)),
        dup_below_high_fraction=float(np.mean(dup < high)),
        n_same=int(same.size),
        n_diff=int(diff.size),
        n_dup=int(dup.size),
        quantiles={"same": _q(same), "diff": _q(diff), "dup": _q(dup)},
    )


def match_quantile(value: float, source_sample, target_sample) -> float:
    """Map a threshold from one score distribution to another by equal quantile (same pairs, two models)."""
    src = np.sort(np.asarray(source_sample, dtype=np.float64))
    q = float(np.searchsorted(src, value, side="left")) / max(src.size, 1)
    return float(np.quantile(np.asarray(target_sample, dtype=np.float64), min(max(q, 0.0), 1.0)))


def pair_similarities(embeddings: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """Same-label and different-label cosines over all unordered pairs."""
    E = np.asarray(embeddings, dtype=np.float64)
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    lab = np.asarray(labels)
    S = E @ E.T
    iu = np.triu_indices(len(E), 1)
    same_mask = lab[iu[0]] == lab[iu[1]]
    return S[iu][same_mask], S[iu][~same_mask]


def synthetic_copies(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Same-shot variants of a photo: downscaled, JPEG q=35, pasted on a larger canvas, mirrored."""
    from PIL import Image

    from pipeline.faces.folders import load_rgb_bytes

    h, w = rgb.shape[:2]
    im = Image.fromarray(rgb)
    out = {"resize": np.asarray(im.resize((max(1, w * 2 // 3), max(1, h * 2 // 3)), Image.BICUBIC))}
    b = io.BytesIO()
    im.save(b, "JPEG", quality=35)
    out["jpeg35"] = load_rgb_bytes(b.getvalue())
    canvas = np.full((h + 40, w * 2 + 60, 3), 128, np.uint8)
    canvas[20:20 + h, 30:30 + w] = rgb
    out["composite"] = canvas
    out["mirror"] = np.ascontiguousarray(rgb[:, ::-1])
    return out


def calibrate_on_folder(root: Path, backend, far: float = 1e-3, dup_recall: float = 0.99) -> Calibration:
    """Run the calibration on ``root/identities/<name>/*`` with a face backend (largest face per photo)."""
    from pipeline.faces.folders import labelled_files, load_rgb_bytes

    embs, labels, dup = [], [], []
    for path, ident in labelled_files(Path(root)):
        if ident is None:
            continue
        rgb = load_rgb_bytes(Path(path).read_bytes())
        faces = backend.analyze([rgb])[0]
        if not faces:
            continue
        f = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        e = np.asarray(f.embedding, dtype=np.float64)
        embs.append(e / np.linalg.norm(e))
        labels.append(ident)
        for v in synthetic_copies(rgb).values():
            vf = backend.analyze([v])[0]
            if vf:
                g = max(vf, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
                ge = np.asarray(g.embedding, dtype=np.float64)
                dup.append(float(e @ (ge / np.linalg.norm(ge))))
    same, diff = pair_similarities(np.stack(embs), labels)
    return calibrate_thresholds(same, diff, dup, far=far, dup_recall=dup_recall)


def same_shot_variants(rgb: np.ndarray, bbox, other: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, tuple, tuple]]:
    """Same-shot pairs made from one photo, for calibrating the keypoint check.

    Returns ``{name: (image_a, image_b, bbox_a, bbox_b)}``: two images that come from the same shot and
    the face box in each (the original box mapped through the known geometry, clipped to the image):
    ``resize`` (x0.6), ``resize_small`` (x0.35), ``jpeg35``, ``mirror``, ``mirror_jpeg`` (mirrored,
    x0.8, JPEG q=50), ``composite`` (x0.7 pasted next to ``other`` on a grey canvas), ``crop_edge``
    (original vs the left crop below), ``crop_pair`` (a crop ending at 75 % of the face width vs a crop
    starting at 25 % of it, both JPEG q=85: the obama_partial_face / obama_partial_face2 case).
    """
    from PIL import Image

    from pipeline.faces.folders import load_rgb_bytes

    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in bbox)
    bw = x2 - x1
    im = Image.fromarray(rgb)
    B = (x1, y1, x2, y2)

    def scaled(s):
        return np.asarray(im.resize((max(8, round(w * s)), max(8, round(h * s))), Image.BICUBIC)), (x1 * s, y1 * s, x2 * s, y2 * s)

    def jpeg(a, q):
        b = io.BytesIO()
        Image.fromarray(a).save(b, "JPEG", quality=q)
        return load_rgb_bytes(b.getvalue())

    def mirror_box(b, width):
        return (width - b[2], b[1], width - b[0], b[3])

    out = {}
    a, b = scaled(0.6)
    out["resize"] = (rgb, a, B, b)
    a, b = scaled(0.35)
    out["resize_small"] = (rgb, a, B, b)
    out["jpeg35"] = (rgb, jpeg(rgb, 35), B, B)
    out["mirror"] = (rgb, np.ascontiguousarray(rgb[:, ::-1]), B, mirror_box(B, w))
    a, b = scaled(0.8)
    out["mirror_jpeg"] = (rgb, jpeg(np.ascontiguousarray(a[:, ::-1]), 50), B, mirror_box(b, a.shape[1]))
    a, b = scaled(0.7)
    oth = other if other is not None else np.full_like(a, 90)
    oh = a.shape[0]
    ow = max(8, round(oth.shape[1] * oh / oth.shape[0]))
    oth = np.asarray(Image.fromarray(oth).resize((ow, oh), Image.BICUBIC))
    canvas = np.full((oh + 60, a.shape[1] + ow + 90, 3), 128, np.uint8)
    canvas[30:30 + oh, 30:30 + a.shape[1]] = a
    canvas[30:30 + oh, 60 + a.shape[1]:60 + a.shape[1] + ow] = oth
    out["composite"] = (rgb, jpeg(canvas, 90), B, (b[0] + 30, b[1] + 30, b[2] + 30, b[3] + 30))
    # obama_partial_face2 / obama_partial_face cut obama.jpg's face at 78 % / 23 % of its width
    cut_r = round(x1 + 0.75 * bw)  # left crop: [0, cut_r), face cut on its right edge
    cut_l = round(x1 + 0.25 * bw)  # right crop: [cut_l, w), face cut on its left edge
    if cut_r > 8 and w - cut_l > 8:
        left = np.ascontiguousarray(rgb[:, :cut_r])
        right = np.ascontiguousarray(rgb[:, cut_l:])
        bl = (x1, y1, min(x2, cut_r), y2)
        br = (max(0.0, x1 - cut_l), y1, x2 - cut_l, y2)
        out["crop_edge"] = (rgb, jpeg(left, 85), B, bl)
        out["crop_pair"] = (jpeg(left, 85), jpeg(right, 85), bl, br)
    return out


def keypoint_distributions(root: Path, backend, extra: list[tuple[Path, str]] = (), near_duplicates: list[set[str]] = ()) -> dict:
    """Keypoint-check statistics on ``root/identities/<name>/*`` (+ ``extra`` (path, identity) photos).

    Per labelled photo (largest face): every ordered same-person pair of different photos ("genuine"; pairs
    whose two ``folder/file`` names are in one set of ``near_duplicates`` are reported apart, as "known")
    and the :func:`same_shot_variants` pairs ("copies", both directions). Returns the raw
    (inliers, ratio, good, a, b) rows and their quantiles; thresholds are picked from them by hand (see
    dedup.py's docstring).
    """
    import cv2

    from pipeline.faces.folders import labelled_files, load_rgb_bytes
    from pipeline.multiid import dedup

    files = [(p, i) for p, i in labelled_files(Path(root)) if i is not None] + list(extra)
    rgbs, boxes, kps, labels = {}, {}, {}, {}
    for path, ident in files:
        rgb = load_rgb_bytes(Path(path).read_bytes())
        faces = backend.analyze([rgb])[0]
        if not faces:
            continue
        f = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        name = f"{Path(path).parent.name}/{Path(path).name}"
        rgbs[name], boxes[name], labels[name] = rgb, tuple(float(v) for v in f.bbox), ident
        kps[name] = dedup.face_keypoints(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), boxes[name])
    names = sorted(kps)
    genuine, known, copies = [], [], []
    for a in names:
        for b in names:
            if a != b and labels[a] == labels[b]:
                m = dedup.keypoint_match(kps[a], kps[b])
                row = (m.inliers, m.ratio, m.good, a, b)
                (known if any(a in s and b in s for s in near_duplicates) else genuine).append(row)
    for i, a in enumerate(names):
        for vn, (A, B, ba, bb) in same_shot_variants(rgbs[a], boxes[a], rgbs[names[(i + 7) % len(names)]]).items():
            ka = dedup.face_keypoints(cv2.cvtColor(A, cv2.COLOR_RGB2GRAY), ba)
            kb = dedup.face_keypoints(cv2.cvtColor(B, cv2.COLOR_RGB2GRAY), bb)
            for d, (x, y) in (("ab", (ka, kb)), ("ba", (kb, ka))):
                m = dedup.keypoint_match(x, y)
                copies.append((m.inliers, m.ratio, m.good, a, f"{vn}_{d}"))

    def qs(rows):
        return {"inliers": _q(np.array([r[0] for r in rows], float)), "ratio": _q(np.array([r[1] for r in rows], float)), "n": len(rows)}

    per_variant = {vn: qs([c for c in copies if c[4][:-3] == vn]) for vn in sorted({c[4][:-3] for c in copies})}
    return {"genuine": qs(genuine), "copies": qs(copies), "copies_per_variant": per_variant,
            "known_near_duplicates": sorted(known, reverse=True), "rows": {"genuine": genuine, "copies": copies}}
