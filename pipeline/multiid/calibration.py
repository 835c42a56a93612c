"""Calibrating the reference-similarity band (sim_low, sim_high) for a face backend.

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

Measured on shared/data/faces with dlib_face_recognition_resnet_model_v1 (HOG detector, 5-point
alignment, L2-normalised 128-d; 124 labelled photos of 19 people -> 413 same-person pairs, 7213
different-person pairs; 496 synthetic same-shot copies: 2/3 downscale, JPEG q=35, pasted on a larger
canvas, mirrored), far = 1e-3, dup_recall = 0.99 (``calibrate_on_folder``; ~160 s on 2 cores):

    different-person cosine: p50 0.821, p99 0.894, p99.9 0.909, max 0.920 -> sim_low  = 0.909
    same-person cosine:      p1 0.926, p50 0.973, p99 0.991, max 0.999 (real near-duplicates)
    synthetic copies:        min 0.982, p1 0.988, p50 0.998 (mirrored copies are the lowest)
                                                              -> sim_high = 0.987
    same-person pairs kept in [0.909, 0.987]: 94.9 %; different-person above low: 0.10 %;
    copies below high: 0.8 % (those are left to the hash guard)

So dlib's band is about [0.91, 0.987] where ArcFace's is [0.6, 0.8]: narrow, because dlib packs all
faces into a small cone (different people are already at cosine ~0.82). The rounded values
are the defaults in ``config.BACKEND_THRESHOLDS["dlib"]``.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


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

    from pipeline.multiid.localfaces import load_rgb_bytes

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
    from pipeline.multiid.localfaces import load_rgb_bytes, shared_faces_files

    embs, labels, dup = [], [], []
    for path, ident in shared_faces_files(Path(root)):
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
