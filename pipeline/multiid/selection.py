"""The multi-identity builder's per-target reference selection (MultiID-2M style, after WithAnyone).

Inputs are the pipeline's tables (images, faces, identities); output is, per split, WebDataset
shards + manifest, plus a pairs table (one row per target person x selected reference), a candidates
table (every reference candidate with the filter that removed it) and statistics.

Recipe, per target image (all images, in uid order):
1. usable faces = box >= ``min_face_px`` on each side, det_score >= floor, blur >= floor; a target
   has ``min_faces``..``max_faces`` usable faces (its people); every person must carry an
   identity_id, and no identity twice in one target; else the target is dropped with a reason.
2. split = the split of its people's identities (splits.py); straddling targets are dropped.
3. for each person, candidates = faces of the same identity in *other* images; filters in order,
   each removal counted under the first filter that fires: ``ref_quality`` (same usability rule,
   ``ref_min_face_px``), ``sim_below_low``, ``near_duplicate_image_phash`` / ``near_duplicate_face_phash``
   / ``near_duplicate_face_ncc`` / ``near_duplicate_keypoints`` (copy-paste guard, dedup.py; the last
   is the geometric SIFT + RANSAC check that catches crops, flips and composites), ``sim_above_high``.
   The two costly checks (face NCC, keypoints) run in step 4, in rank order (unless
   ``examine_all_candidates``); the duplicate checks are also counted independently of order
   (``duplicate_flags_independent``) over the candidates the whole guard examined.
4. survivors are ranked by ``w_pose * pose_diff + w_quality * quality + w_sim * mid_band`` and
   picked greedily, skipping a second reference from the same image or a near-duplicate of an
   already chosen reference (``redundant``); up to ``refs_per_person`` are kept. Walking the ranking,
   a candidate not yet through face NCC and keypoints goes through them first (removed as
   ``near_duplicate_face_ncc`` / ``near_duplicate_keypoints``); once enough are chosen, the rest are
   ``not_examined_enough_chosen`` (``ranked_out`` when the whole guard ran on every candidate). The
   references chosen are those of running the whole guard on every candidate; ``n_survivors`` counts
   the ranked candidates less those the walk removed (the unexamined ones count as survivors).
5. a target is kept when at least ``min_referenced_persons`` of its people have a reference (with
   ``require_all_refs``: every person); a person without one stays in the sample with ``refs: []``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from pipeline.cache import LRU, BytesLRU
from pipeline.ids import stable_key
from pipeline.multiid import dedup
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.rows import (
    CANDIDATE_BATCH,
    CANDIDATE_SCHEMA,
    PAIRS_SCHEMA,
    SIM_BINS,
    _hist_counts,
    _r,
    _RecordSpill,
    _RowParts,
    _TakenRows,
)
from pipeline.multiid.rules import boxes_overlap, crop_box, examined_candidates
from pipeline.multiid.splits import identity_split
from pipeline.sources import StoreUnreachable


@dataclass(slots=True)
class FaceRec:
    uid: str
    face_index: int
    bbox: tuple[float, float, float, float]
    landmarks: list[float] | np.ndarray  # a row of one matrix when the table's landmarks allow it
    det_score: float
    face_width: float
    face_height: float
    blur: float
    yaw: float
    pitch: float
    roll: float
    emb: np.ndarray
    identity_id: str | None
    source: str = ""

    @property
    def ref(self) -> tuple[str, int]:
        return (self.uid, self.face_index)


def _faces_from_table(faces: pa.Table, identities: pa.Table) -> dict[str, list[FaceRec]]:
    """FaceRecs by uid (``__slots__``; a photo's faces share its uid string, an identity's faces its id string,
    all faces their few source strings; ``emb`` a row of one float32 matrix of the normalised embeddings,
    ``landmarks`` a row of one matrix when they are a fixed-size list without nulls), built column by
    column: no dict per row of the faces table (~1 KB a face instead of ~1.3 KB at 1M faces)."""
    import sys

    ident: dict[str, dict[int, str]] = defaultdict(dict)
    for u, fi, iid in zip(*(identities.column(c).to_pylist() for c in ("uid", "face_index", "identity_id"))):
        ident[u][int(fi)] = sys.intern(iid) if isinstance(iid, str) else iid
    n = faces.num_rows
    # normalised into one preallocated matrix a slice at a time (no combined copy of the column, no
    # temporary the size of the matrix); the same numbers as normalising the whole matrix at once
    E, row = None, 0
    for ch in faces.column("embedding").chunks:
        if not len(ch):
            continue
        x = np.asarray(ch.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ch), -1)
        if E is None:
            E = np.empty((n, x.shape[1]), np.float32)
        for s in range(0, len(x), 65_536):
            part = x[s:s + 65_536]
            E[row + s:row + s + len(part)] = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        row += len(x)
        del x
    if E is None:
        E = np.zeros((0, 1), np.float32)

    def col(name):
        if name not in faces.column_names:
            return [None] * n
        c = faces.column(name)
        if c.null_count == 0 and (pa.types.is_floating(c.type) or pa.types.is_integer(c.type)):
            return c.to_numpy().tolist()  # the same Python numbers as to_pylist, without a scalar per row
        return c.to_pylist()

    lms = None
    if "landmarks" in faces.column_names and n:
        lc = faces.column("landmarks").combine_chunks()
        if pa.types.is_fixed_size_list(lc.type) and lc.null_count == 0 and lc.flatten().null_count == 0:
            lms = np.asarray(lc.flatten().to_numpy(zero_copy_only=False)).reshape(n, lc.type.list_size)
        del lc
    if lms is None:
        lms = [list(v or []) for v in col("landmarks")]
    uids, fidx, x1, y1, x2, y2 = (col(c) for c in ("uid", "face_index", "x1", "y1", "x2", "y2"))
    det, fw, fh, blur, yaw, pitch, roll, src = (col(c) for c in ("det_score", "face_width", "face_height", "blur",
                                                                "yaw", "pitch", "roll", "source"))
    sources: dict[str, str] = {}
    out: dict[str, list[FaceRec]] = defaultdict(list)
    for i in range(n):
        fi = int(fidx[i])
        lst = out[uids[i]]
        u = lst[0].uid if lst else uids[i]  # one string per photo
        iid = ident.get(u, {}).get(fi)
        lst.append(
            FaceRec(u, fi, (x1[i], y1[i], x2[i], y2[i]), lms[i], float(det[i] or 0.0),
                    float(fw[i] or x2[i] - x1[i]), float(fh[i] or y2[i] - y1[i]), float(blur[i] or 0.0),
                    float(yaw[i] or 0.0), float(pitch[i] or 0.0), float(roll[i] or 0.0), E[i], None if iid in (None, "", "-1") else str(iid),
                    sources.setdefault(src[i] or "", src[i] or ""))
        )
    for v in out.values():
        v.sort(key=lambda f: f.face_index)
    return out


def unusable_reason(f: FaceRec, min_px: float, det_min: float, blur_min: float) -> str | None:
    if min(f.face_width, f.face_height) < min_px:
        return "too_small"
    if f.det_score < det_min:
        return "low_det_score"
    if f.blur < blur_min:
        return "blurry"
    return None


def qualities(faces: list[FaceRec], backend: str) -> dict[tuple[str, int], float]:
    """The face-quality score (pipeline.faces.quality) of every face, by (uid, face_index)."""
    from pipeline.faces.quality import QualityConfig, face_quality

    if not faces:
        return {}
    cols = np.array([(f.face_width, f.face_height, f.blur, f.yaw, f.pitch, f.det_score) for f in faces], np.float64)
    q = face_quality(*cols.T, config=QualityConfig.for_backend(backend))
    return {f.ref: float(v) if np.isfinite(v) else 0.0 for f, v in zip(faces, q)}


def pose_diff(a: FaceRec, b: FaceRec) -> tuple[float, float, float]:
    dy, dp = abs(a.yaw - b.yaw), abs(a.pitch - b.pitch)
    return math.hypot(dy, dp), dy, dp


def theta(cos: float) -> float:
    return float(np.arccos(np.clip(cos, -1.0, 1.0)))


_NOT_YET = object()  # a keypoint-cache entry whose keypoints are not computed yet
RAW_CACHE_BYTES = 64 << 20  # the photos' bytes a selection keeps (the most recently read)


class _Fingerprints:
    """Decodes images on demand and caches, per image, its pHash and the crop fingerprints (~25 KB a face)
    of its faces that can ever be compared (``eligible(face)``: a target's people and the references that
    pass ``ref_quality`` are), and per such face the keypoints of the region around it (~0.6 MB a face).
    Both caches are LRU-bounded (``max_images``, ``max_keypoints``): targets are visited in uid order and a
    person's candidates recur across their targets, so recent entries are the useful ones; an evicted entry
    is recomputed (decode + SIFT, ~50 ms) when needed. The photos' bytes last read are kept too (at most
    ``max_bytes``): a face's keypoints are computed after its person's other candidates were read, and a
    sample's record (its target photo, its references' crops) is made right after its selection."""

    def __init__(self, read_bytes, faces_by_uid, eligible=None, keypoints: bool = True,
                 max_images: int = 20_000, max_keypoints: int = 2_000, max_bytes: int = RAW_CACHE_BYTES,
                 hashes: dict | None = None, shared=None, stored=None, kept=None):
        self.read_bytes = read_bytes
        # guard_cache.FaceFeatures: the keypoints and NCC patches earlier builds worked out, and where those
        # worked out here are kept for the next build (None: neither)
        self.kept = kept
        self.kept_full: set[str] = set()  # photos whose NCC patches this process made sure are kept
        # guard_cache.PhotoHashes: the pHashes earlier builds worked out (a photo found there is not decoded
        # for them), and where the pHashes decoded here are recorded for the next build (None: neither)
        self.stored = stored
        # face_store.SharedFaceStore of the build's forked workers: each face's keypoints and each photo's NCC
        # patches worked out by one of them (None: by this process, for itself)
        self.shared = shared
        # uid -> the photo's pHashes worked out beforehand (:func:`photo_hashes`, in other processes), or why it
        # could not be read: :meth:`get` then decodes nothing, :meth:`full` only for the faces compared
        self.hashes = hashes or {}
        self.faces_by_uid = faces_by_uid
        self.eligible = eligible or (lambda f: True)
        self.keypoints = keypoints
        self.cache: LRU = LRU(max_images)
        self.kps: LRU = LRU(max_keypoints)
        self.decoded: LRU = LRU(8)  # the last photos decoded, for their faces' keypoints (not counted in the stats)
        # the last photos' bytes (not counted in the stats); with a store, each photo read once by the workers together
        self.raw = BytesLRU(read_bytes if shared is None else shared.reader(read_bytes), max_bytes)
        self._read_unpublished = read_bytes if shared is None else shared.reader(read_bytes, publish=False)
        self.errors: dict[str, str] = {}

    def read(self, uid: str) -> bytes:
        """The photo's bytes, from the recent ones when there (a read can be a download or, in the
        benchmark, a synthesis)."""
        return self.raw.get(uid)

    def read_for_record(self, uid: str) -> bytes:
        """The photo's bytes for a sample's record: the recent ones, or those another worker published, else
        read without publishing them (a record is made once; a refresh's re-selected targets take their
        pHashes from the store, so their photos were first read here, and publishing wrote each a second time:
        5 of a 1% refresh's CPU-s at 100k faces)."""
        held = self.raw.peek(uid)
        return held if held is not None else self._read_unpublished(uid)

    def get(self, uid: str):
        """(image pHash, {face index: its fingerprint}) of the photo's comparable faces; without their NCC
        patches when they came from ``hashes`` (:meth:`full` has them)."""
        if uid in self.errors:
            return None
        if uid not in self.cache and uid in self.hashes:
            pre = self.hashes[uid]
            if isinstance(pre, str):
                self.errors[uid] = pre
                return None
            self.cache[uid] = pre
            self._placeholders(uid)
        if uid not in self.cache and self.stored is not None:
            pre = self.stored.get(uid, self._comparable(uid))
            if pre is not None:
                self.cache[uid] = pre
                self._placeholders(uid)
        if uid not in self.cache:
            try:
                if self.shared is None:
                    self.cache[uid] = self._decode_fingerprints(uid)
                else:  # a photo met by several workers (a refresh has no pHash pass) decoded by one
                    self.cache[uid] = self.shared.get("fp", uid, None, lambda: self._decode_fingerprints(uid))
                self._placeholders(uid)
            except StoreUnreachable:  # the store's fault, not the photo's: the build fails, to be run again
                raise
            except Exception as e:  # noqa: BLE001 - unreadable image becomes a counted reason, not a crash
                self.errors[uid] = f"{type(e).__name__}: {e}"
                return None
        return self.cache[uid]

    def _comparable(self, uid: str) -> list:
        return [f for f in self.faces_by_uid.get(uid, []) if self.eligible(f)]

    def _decode_fingerprints(self, uid: str):
        """The photo decoded for its pHashes and its comparable faces' fingerprints (the one place: tests count
        the calls)."""
        g = dedup.open_gray(self.read(uid))
        faces = self._comparable(uid)
        fps = {f.face_index: dedup.face_fingerprint(g, f.landmarks, f.bbox) for f in faces}
        if self.keypoints:
            self.decoded[uid] = g
        got = (dedup.image_phash(g), fps)
        if self.stored is not None:
            self.stored.record(uid, faces, got)
        return got

    def _placeholders(self, uid: str) -> None:
        # keypoints are computed when a face is compared (kp), not for every eligible face of the photo; the
        # cache still takes an entry per eligible face here (a placeholder), so that its contents and its
        # eviction count are those of computing them all now
        if self.keypoints:
            for f in self.faces_by_uid.get(uid, []):
                if self.eligible(f):
                    self.kps[(uid, f.face_index)] = _NOT_YET

    def full(self, uid: str):
        """:meth:`get` with every face's NCC patch (decoding the photo when its entry came from ``hashes``)."""
        got = self.get(uid)
        if got is None:
            return got
        if all(fp.patch is not None for fp in got[1].values()):
            if self.kept is not None and uid not in self.kept_full:  # decoded here: kept for the next builds
                self.kept_full.add(uid)
                self.kept.put("fp", uid, self._comparable(uid), got)
            return got
        pre = got
        got = self._once("fp", uid, None, lambda: self._full_fingerprints(uid, pre))
        self.cache[uid] = got
        return got

    def _once(self, kind: str, uid: str, face_index, compute):
        """From the store kept across builds when there; else ``compute()`` here, or through the workers'
        shared store so that one worker computes it for all (and kept for the next build)."""
        here = compute if self.shared is None else (lambda: self.shared.get(kind, uid, face_index, compute))
        if self.kept is None:
            return here()
        faces = self._comparable(uid) if face_index is None else [
            f for f in self.faces_by_uid.get(uid, []) if f.face_index == face_index]
        return self.kept.get(kind, uid, faces, here)

    def _full_fingerprints(self, uid: str, got):
        g = self._gray(uid)
        faces = {f.face_index: f for f in self.faces_by_uid.get(uid, [])}
        return (got[0], {i: dedup.face_fingerprint(g, faces[i].landmarks, faces[i].bbox) for i in got[1]})

    def _gray(self, uid: str):
        g = self.decoded[uid] if uid in self.decoded else dedup.open_gray(self.read(uid))
        self.decoded[uid] = g
        return g

    def kp(self, uid: str, face_index: int) -> dedup.KeypointSet | None:
        """Keypoints of one face's region (cached per (uid, face_index); computed on a miss)."""
        if not self.keypoints or self.get(uid) is None:
            return None
        key = (uid, face_index)
        got = self.kps[key] if key in self.kps else _NOT_YET  # noqa: SIM401 - get() would not mark it recently used
        if got is _NOT_YET:
            got = self._once("kp", uid, face_index, lambda: self._compute_keypoints(uid, face_index))
            self.kps[key] = got
        return got

    def _compute_keypoints(self, uid: str, face_index: int) -> dedup.KeypointSet:
        """SIFT on the region around one face (the one place they are computed: tests count the calls)."""
        f = next(f for f in self.faces_by_uid[uid] if f.face_index == face_index)
        return dedup.face_keypoints(np.asarray(self._gray(uid)), f.bbox)


def _face_json(f: FaceRec, q: float, with_embedding: bool = True) -> dict:
    d = {
        "face_index": f.face_index,
        "bbox": [_r(v, 2) for v in f.bbox],
        "landmarks": [_r(v, 2) for v in f.landmarks],
        "identity_id": f.identity_id,
        "det_score": _r(f.det_score, 4),
        "blur": _r(f.blur, 2),
        "yaw": _r(f.yaw, 2),
        "pitch": _r(f.pitch, 2),
        "roll": _r(f.roll, 2),
        "quality": _r(q, 4),
    }
    if with_embedding:
        d["embedding"] = [_r(v) for v in f.emb]
    return d


def _prepare(by_uid: dict[str, list[FaceRec]], cfg: MultiIDConfig, eval_override: set) -> dict:
    """What a selection over these photos derives from all of them before its first target: each identity's
    faces (in uid order), each photo's split, each face's quality."""
    def split_of(identity_id: str) -> str:
        return "eval" if identity_id in eval_override else identity_split(identity_id, cfg.eval_fraction, cfg.split_salt)

    by_identity: dict[str, list[FaceRec]] = defaultdict(list)
    for uid in sorted(by_uid):
        for f in by_uid[uid]:
            if f.identity_id is not None:
                by_identity[f.identity_id].append(f)
    # the split a photo feeds: that of its labelled faces when they agree, else the split most of them
    # are in (ties: train); such a mixed photo is never a target, and a reference from it must not show
    # a face of the other split inside its crop
    photo_split: dict[str, tuple[str | None, bool]] = {}
    for uid, fs_ in by_uid.items():
        votes = Counter(split_of(f.identity_id) for f in fs_ if f.identity_id is not None)
        if not votes:
            photo_split[uid] = (None, False)
        else:
            photo_split[uid] = ("eval" if votes["eval"] > votes["train"] else "train", len(votes) > 1)
    quality = qualities([f for u in sorted(by_uid) for f in by_uid[u]], cfg.backend)  # same batch for the same photos
    return {"by_identity": by_identity, "photo_split": photo_split, "quality": quality}


def _new_fingerprints(read_bytes, by_uid: dict[str, list[FaceRec]], cfg: MultiIDConfig, hashes: dict | None = None,
                      shared=None, stored=None, kept=None) -> _Fingerprints:
    """The decoding and keypoint caches of a selection over these photos (``shared``: a
    face_store.SharedFaceStore of the processes selecting them together; ``stored``: guard_cache.PhotoHashes;
    ``kept``: guard_cache.FaceFeatures)."""
    px_min = min(cfg.min_face_px, cfg.ref_min_face_px)
    return _Fingerprints(read_bytes, by_uid, lambda f: unusable_reason(f, px_min, cfg.det_score_min, cfg.blur_min) is None,
                         keypoints=cfg.keypoints, max_images=cfg.cache_images, max_keypoints=cfg.cache_keypoints,
                         hashes=hashes, shared=shared, stored=stored, kept=kept)


def photo_hashes(uids: list[str], by_uid: dict[str, list[FaceRec]], cfg: MultiIDConfig, read_bytes, store=None,
                 stored=None) -> dict:
    """uid -> (image pHash, {face index: its face pHashes, without the NCC patch}) of its comparable faces, or
    why the photo could not be read: what the cheap part of the copy-paste guard needs of every candidate,
    worked out once per photo (by several processes, each over its own photos) so that the processes that
    then select decode only the photos they compare (:meth:`_Fingerprints.full`). ``store``
    (face_store.SharedFaceStore): the fingerprints with their NCC patches are published there, for the
    selecting processes that compare the photo (then none decodes it again for them), and so are the
    photos' bytes as read (the selecting processes read none again). ``stored`` (guard_cache.PhotoHashes):
    a photo found there is not decoded (what is decoded the caller records, from the result)."""
    fps = _new_fingerprints(read_bytes if store is None else store.reader(read_bytes), by_uid, cfg, stored=stored)
    fps.keypoints = False
    out: dict = {}
    for uid in uids:
        got = fps.get(uid)
        if got is not None and store is not None:
            store.put("fp", uid, None, got)
        out[uid] = fps.errors[uid] if got is None else (
            got[0], {i: dedup.FaceFingerprint(fp.phash, fp.phash_mirror, None, None) for i, fp in got[1].items()})
        fps.cache.pop(uid, None)
    return out


def candidate_score(cfg: MultiIDConfig, similarity: float, pose: float, ref_quality: float) -> float:
    """A surviving candidate's ranking score (step 4 of the recipe)."""
    mid, half = (cfg.sim_low + cfg.sim_high) / 2, (cfg.sim_high - cfg.sim_low) / 2
    band = 1.0 - abs(similarity - mid) / max(half, 1e-9)
    pdiff = min(1.0, pose / cfg.pose_norm_deg)
    return cfg.w_pose * pdiff + cfg.w_quality * ref_quality + cfg.w_sim * band


def rank_key(score: float, c: FaceRec) -> tuple:
    """Where a survivor stands in the walk: best score first, ties by (uid, face index)."""
    return (-round(score, 9), c.uid, c.face_index)


def screen_candidate(uid: str, f: FaceRec, c: FaceRec, split: str, t_phash, t_fps, fps: _Fingerprints, prep: dict, img_meta: dict,
                     by_uid: dict, cfg: MultiIDConfig, split_of, guard=None) -> tuple[dict, object]:
    """Candidate ``c`` of target ``uid``'s person ``f``: its candidate row through the filters of step 3 (the status
    of the first that fires; ``score`` set, status None, when it survives them) and the guard's check when
    ``guard`` (the whole guard, ``examine_all_candidates``) ran on it, else None. Without ``guard`` only the two
    pHashes of the copy-paste guard run here; NCC and keypoints wait for the walk."""
    qual, photo_split = prep["quality"], prep["photo_split"]
    # unit vectors: a float32 dot product of two equal embeddings can read 1.0000001, over any sim_high
    row = {"target_uid": uid, "target_face_index": f.face_index, "identity_id": f.identity_id, "ref_uid": c.uid,
           "ref_face_index": c.face_index, "similarity": min(1.0, float(f.emb @ c.emb)), "image_hamming": None, "face_hamming": None,
           "face_ncc": None, "kp_inliers": None, "kp_ratio": None, "ref_quality": qual[c.ref], "pose_diff": pose_diff(f, c)[0], "score": None, "status": None}
    if unusable_reason(c, cfg.ref_min_face_px, cfg.det_score_min, cfg.blur_min) is not None:
        row["status"] = "ref_quality"
        return row, None
    c_split, c_mixed = photo_split[c.uid]
    if c_split != split:
        row["status"] = "photo_in_other_split"
        return row, None
    if c_mixed:
        meta_c = img_meta.get(c.uid, {})
        box = (crop_box(c.bbox, cfg.crop_margin, meta_c.get("width") or 1 << 30, meta_c.get("height") or 1 << 30)
               if cfg.ref_mode == "crop" else (0, 0, 1 << 30, 1 << 30))
        if any(o.identity_id is not None and split_of(o.identity_id) != split and boxes_overlap(o.bbox, box)
               for o in by_uid[c.uid]):
            row["status"] = "crop_shows_other_split"
            return row, None
    got = fps.get(c.uid)
    if got is None:
        row["status"] = "unreadable_reference"
        return row, None
    chk = None
    if guard is not None:
        chk = guard(uid, f, c, row, t_phash, t_fps, got)
        dup = chk.is_duplicate
        reason = chk.reason
    else:
        # the cheap part of the guard (the two pHashes) for every candidate; NCC and keypoints
        # only in rank order, until enough references are chosen
        ih, fh = dedup.hamming(t_phash, got[0]), dedup.face_hamming(t_fps[f.face_index], got[1][c.face_index])
        row.update(image_hamming=ih, face_hamming=fh)
        dup = ih <= cfg.image_hamming_max or fh <= cfg.face_hamming_max
        reason = "image_phash" if ih <= cfg.image_hamming_max else "face_phash"
    if row["similarity"] < cfg.sim_low:
        row["status"] = "sim_below_low"
    elif dup:
        row["status"] = "near_duplicate_" + reason
    elif row["similarity"] > cfg.sim_high:
        row["status"] = "sim_above_high"
    else:
        row["score"] = candidate_score(cfg, row["similarity"], row["pose_diff"], row["ref_quality"])
    return row, chk


# one BLAS thread: the keypoint matcher's products are small (~200 x 200 x 128), and the builder's
# parallelism is its worker processes (two threads each cost ~1.6x the CPU for the same products)
@threadpool_limits.wrap(limits=1, user_api="blas")
def _select(img_meta: dict, by_uid: dict[str, list[FaceRec]], cfg: MultiIDConfig, read_bytes, eval_override: set,
            mversions: list[str], sink: _RowParts | None = None, targets: set[str] | None = None, tally=None, decisions=None,
            records: _RecordSpill | None = None, prepared: dict | None = None, fingerprints: _Fingerprints | None = None,
            previous=None, known_subsets: dict | None = None):
    """Reference selection over the photos of ``img_meta`` / ``by_uid`` (the whole collection, or one
    bucket's co-occurrence components: a target's candidates are faces of its people, so they lie in its
    component). Returns (samples, pair rows, candidate rows, counts), ``counts`` being the additive part
    of the statistics (:func:`_merge_counts` sums them over buckets). With ``sink``, the rows go to it in
    batches as they are produced (what stays in memory is one batch, whatever the number of targets)
    and both row lists come back ``None``. ``targets``: only these photos are targets (every photo still
    serves as a candidate); ``tally`` (reuse.TargetTally): records each target's share of the counts and
    is shown each target's candidate rows once their statuses are final. ``decisions``
    (guard_cache.GuardDecisions): the copy-paste guard's recorded decisions, taken instead of computed.
    ``records`` (rows._RecordSpill): each sample's shard record is made as soon as it is selected (its
    photos' bytes still in the cache). ``prepared`` (:func:`_prepare` of the same photos and override) and
    ``fingerprints`` (:func:`_new_fingerprints`): made once and shared by the runs of one process over
    chunks of the same photos' targets (a fresh cache by default). ``previous`` (reuse.PreviousRows, with
    ``sink``): targets' previous candidate rows; a candidate whose photo is unchanged is not screened again,
    and its row is taken from there when the walk leaves it as it was. ``known_subsets``: (target, person) -> the refs of the candidates examined over the cap, chosen beforehand
    (reuse.TargetFingerprints.seed_examined: the same as rules.examined_candidates, without hashing them all)."""
    def split_of(identity_id: str) -> str:
        return "eval" if identity_id in eval_override else identity_split(identity_id, cfg.eval_fraction, cfg.split_salt)

    prep = prepared if prepared is not None else _prepare(by_uid, cfg, eval_override)
    by_identity, qual = prep["by_identity"], prep["quality"]
    fps = fingerprints if fingerprints is not None else _new_fingerprints(
        read_bytes, by_uid, cfg, stored=decisions.photos if decisions is not None else None,
        kept=decisions.features if decisions is not None else None)
    evicted_before = (fps.cache.evictions, fps.kps.evictions)
    kp_args = {"kp_min_inliers": cfg.kp_min_inliers, "kp_min_ratio": cfg.kp_min_ratio, "kp_strong_inliers": cfg.kp_strong_inliers}
    flags: Counter = Counter()
    if previous is not None and (sink is None or cfg.examine_all_candidates):
        raise ValueError("previous candidate rows serve a selection that streams its rows and walks the ranking")

    def guard(uid: str, f: FaceRec, c: FaceRec, row: dict, t_phash, t_fps, got) -> dedup.DupCheck:
        """The whole copy-paste guard, target face ``f`` against candidate ``c``: recorded in ``row`` and
        in the order-independent flags (which therefore count the candidates examined)."""
        def judge() -> dedup.DupCheck:
            tg, cg = fps.full(uid), fps.full(c.uid)  # the NCC patches too
            return dedup.compare(tg[0], cg[0], tg[1][f.face_index], cg[1][c.face_index],
                                 cfg.image_hamming_max, cfg.face_hamming_max, cfg.face_ncc_min,
                                 fps.kp(uid, f.face_index), fps.kp(c.uid, c.face_index), **kp_args)
        chk = judge() if decisions is None else decisions.compare(f, c, judge)
        row.update(image_hamming=chk.image_hamming, face_hamming=chk.face_hamming, face_ncc=chk.face_ncc,
                   kp_inliers=chk.kp_inliers, kp_ratio=chk.kp_ratio)
        flags["checked"] += 1
        flags["image_phash"] += chk.image_hamming <= cfg.image_hamming_max
        flags["face_phash"] += chk.face_hamming <= cfg.face_hamming_max
        flags["face_ncc"] += chk.face_ncc >= cfg.face_ncc_min
        flags["keypoints"] += chk.kp_duplicate
        flags["keypoints_only"] += chk.reason == "keypoints"
        flags["any_hash"] += chk.is_duplicate
        flags["sim_above_high"] += row["similarity"] > cfg.sim_high
        flags["hash_only"] += chk.is_duplicate and row["similarity"] <= cfg.sim_high
        flags["sim_only"] += (not chk.is_duplicate) and row["similarity"] > cfg.sim_high
        return chk

    target_reasons: Counter = Counter()
    removed: Counter = Counter()
    samples, pair_rows, cand_rows = [], [], []
    # sink: rows go to Parquet part files in batches as they come (a dict each only for a batch); the
    # histograms are summed batch by batch
    sim_counts = {"candidates": np.zeros(len(SIM_BINS) - 1, np.int64), "pairs": np.zeros(len(SIM_BINS) - 1, np.int64)}

    def flush(name: str, rows: list[dict], schema: pa.Schema) -> None:
        if rows:
            sim_counts[name] += np.histogram(np.asarray([r["similarity"] for r in rows], dtype=np.float64), bins=SIM_BINS)[0]
            sink.write(name, pa.Table.from_pylist(rows, schema=schema))
            rows.clear()

    def write_candidates(table: pa.Table) -> None:
        sim_counts["candidates"] += np.histogram(table.column("similarity").to_numpy().astype(np.float64), bins=SIM_BINS)[0]
        sink.write("candidates", table)

    # a target's candidate rows: dicts, or (with ``previous``) ints, rows of its previous table kept as they were
    taken = _TakenRows(CANDIDATE_SCHEMA, write_candidates) if sink is not None else None
    as_before = Counter()  # candidates screened from their previous rows; of those, rows the walk changed
    n_persons = 0
    faces_by_ref: dict[str, dict] = {}  # identity -> (uid, face index) -> face (persons with a subset chosen beforehand)
    target_uids = sorted(img_meta) if targets is None else sorted(set(img_meta) & set(targets))
    for uid in (target_uids if tally is None else tally.each(target_uids, target_reasons, removed, flags)):
        fs = by_uid.get(uid, [])
        usable = [f for f in fs if unusable_reason(f, cfg.min_face_px, cfg.det_score_min, cfg.blur_min) is None]
        if not fs:
            target_reasons["no_face"] += 1
            continue
        if len(usable) < cfg.min_faces:
            target_reasons["too_few_usable_faces"] += 1
            continue
        if len(usable) > cfg.max_faces:
            target_reasons["too_many_usable_faces"] += 1
            continue
        if any(f.identity_id is None for f in usable):
            target_reasons["unlabelled_person"] += 1
            continue
        pids = [f.identity_id for f in usable]
        if len(set(pids)) != len(pids):
            target_reasons["duplicate_identity_in_target"] += 1
            continue
        all_ids = sorted({f.identity_id for f in fs if f.identity_id is not None})
        splits = {split_of(i) for i in all_ids}
        split = splits.pop() if len(splits) == 1 else None
        if split is None:
            target_reasons["split_straddle"] += 1
            continue
        if fps.get(uid) is None:
            target_reasons["unreadable_target"] += 1
            continue
        t_phash, t_fps = fps.get(uid)
        key = stable_key("multiid", uid)
        persons = []
        t_cands = []
        ok = True
        was = previous.of(uid) if previous is not None else None
        was_of = defaultdict(dict)  # target face -> (candidate ref -> its previous row)
        if was is not None:
            wb = was.batch
            for i in was.indices():
                if wb.status[i] != "unreadable_reference" and wb.ref_uid[i] not in previous.changed:  # (read again)
                    was_of[wb.face[i]][(wb.ref_uid[i], wb.ref_face[i])] = i
        for f in usable:
            known = known_subsets.get((uid, f.identity_id)) if known_subsets else None
            if known is not None:  # chosen beforehand: its faces looked up, not the person's thousands listed
                n_all = len(by_identity[f.identity_id]) - sum(o.identity_id == f.identity_id for o in fs)
                face_of = faces_by_ref.get(f.identity_id)
                if face_of is None:
                    face_of = faces_by_ref[f.identity_id] = {c.ref: c for c in by_identity[f.identity_id]}
                cands = [face_of[r] for r in sorted(known)]  # refs sort as (uid, face index)
            else:
                cands = [c for c in by_identity[f.identity_id] if c.uid != uid]
                n_all = len(cands)
            if n_all > cfg.max_candidates_per_person:
                removed["not_examined_over_cap"] += n_all - cfg.max_candidates_per_person
                if known is None:
                    cands = examined_candidates(uid, cands, cfg.max_candidates_per_person)
            removed["candidates_total"] += len(cands)
            survivors = []  # (score, candidate, its row: a dict or its previous row's index, check, place in t_cands)
            old = was_of.get(f.face_index)
            for c in cands:
                i = old.get(c.ref) if old else None
                if i is not None:  # screened as last time: its filters, pHashes and score
                    as_before["screened"] += 1
                    t_cands.append(i)
                    if wb.scored[i]:  # the score exactly as screening works it out (the row holds it in float32; the
                        # similarity, a float32 dot product, exactly)
                        survivors.append((candidate_score(cfg, wb.similarity[i], pose_diff(f, c)[0], qual[c.ref]),
                                          c, i, None, len(t_cands) - 1))
                    continue
                row, chk = screen_candidate(uid, f, c, split, t_phash, t_fps, fps, prep, img_meta, by_uid, cfg, split_of,
                                            guard if cfg.examine_all_candidates else None)
                t_cands.append(row)
                if row["score"] is not None:
                    survivors.append((row["score"], c, row, chk, len(t_cands) - 1))
            survivors.sort(key=lambda t: rank_key(t[0], t[1]))
            chosen = []
            n_guarded_out = 0  # ranked candidates the rest of the guard (NCC, keypoints) removed on the walk
            for k, (score, c, row, chk, at) in enumerate(survivors):
                if len(chosen) >= cfg.refs_per_person:
                    status = "ranked_out" if chk is not None else "not_examined_enough_chosen"
                    if not isinstance(row, int):
                        row["status"] = status
                    elif wb.status[row] != status:  # walked last time: its row without the guard's figures
                        as_before["rows_changed"] += 1
                        t_cands[at] = {**wb.table.slice(row, 1).to_pylist()[0], "status": status, "face_ncc": None,
                                       "kp_inliers": None, "kp_ratio": None}
                    continue
                if isinstance(row, int):  # reached by the walk: its row as screening gives it
                    as_before["rows_changed"] += 1
                    row = t_cands[at] = {**wb.table.slice(row, 1).to_pylist()[0], "similarity": wb.similarity[row],
                                         "ref_quality": qual[c.ref], "pose_diff": pose_diff(f, c)[0], "score": score,
                                         "status": None, "face_ncc": None, "kp_inliers": None, "kp_ratio": None}
                if chk is None:
                    chk = guard(uid, f, c, row, t_phash, t_fps, fps.get(c.uid))
                    survivors[k] = (score, c, row, chk, at)
                    if chk.is_duplicate:
                        row["status"] = "near_duplicate_" + chk.reason
                        n_guarded_out += 1
                        continue
                redundant = any(c.uid == o.uid for _, o, _ in chosen)
                if not redundant:
                    for _, o, _ in chosen:
                        def judge(c=c, o=o) -> dedup.DupCheck:
                            got, og = fps.full(c.uid), fps.full(o.uid)  # the NCC patches too
                            return dedup.compare(got[0], og[0], got[1][c.face_index], og[1][o.face_index],
                                                 cfg.image_hamming_max, cfg.face_hamming_max, cfg.face_ncc_min,
                                                 fps.kp(c.uid, c.face_index), fps.kp(o.uid, o.face_index), **kp_args)
                        d = judge() if decisions is None else decisions.compare(c, o, judge)
                        if d.is_duplicate or float(c.emb @ o.emb) > cfg.sim_high:
                            redundant = True
                            break
                if redundant:
                    row["status"] = "redundant"
                    continue
                row["status"] = "selected"
                chosen.append((row, c, chk))
            if not chosen:
                ok = False
            # survivors: the candidates that passed every filter run on them (without examine_all_candidates,
            # those ranked below the last reference chosen did not go through NCC and keypoints)
            persons.append((f, cands, len(survivors) - n_guarded_out, chosen))
        removed.update(r["status"] if not isinstance(r, int) else wb.status[r] for r in t_cands)
        if tally is not None:  # (identity, ref uid, ref face index, status) of each row
            tally.candidates(uid, [(r["identity_id"], r["ref_uid"], r["ref_face_index"], r["status"]) if not isinstance(r, int)
                                   else (wb.identity[r], wb.ref_uid[r], wb.ref_face[r], wb.status[r]) for r in t_cands])
        if taken is not None:
            taken.add(wb.table if was is not None else None, t_cands)
        else:
            cand_rows += t_cands
        if sink is not None and len(pair_rows) >= CANDIDATE_BATCH:
            flush("pairs", pair_rows, PAIRS_SCHEMA)
        if not ok and cfg.require_all_refs:
            target_reasons["person_without_reference"] += 1
            continue
        if sum(1 for p in persons if p[3]) < cfg.min_referenced_persons:
            target_reasons["too_few_persons_with_reference"] += 1
            continue
        # assemble the sample
        face_js, used = [], {uid}
        ref_i = 0
        for f, cands, n_survivors, chosen in persons:
            n_persons += 1
            fj = _face_json(f, qual[f.ref])
            fj["n_candidates"] = len(cands)
            fj["n_survivors"] = n_survivors
            fj["refs"] = []
            for rank, (row, c, chk) in enumerate(chosen):
                member = f"ref_{ref_i}.jpg"
                ref_i += 1
                pd, dy, dp = pose_diff(f, c)
                used.add(c.uid)
                rj = {
                    "member": member, "uid": c.uid, "face_index": c.face_index, "identity_id": c.identity_id, "rank": rank,
                    "bbox": [_r(v, 2) for v in c.bbox], "landmarks": [_r(v, 2) for v in c.landmarks],
                    "embedding": [_r(v) for v in c.emb],
                    "similarity": _r(row["similarity"]), "theta_tr": _r(theta(row["similarity"])),
                    "image_hamming": chk.image_hamming, "face_hamming": chk.face_hamming, "face_ncc": _r(chk.face_ncc, 4),
                    "kp_inliers": chk.kp_inliers, "kp_ratio": chk.kp_ratio,
                    "quality": _r(qual[c.ref], 4), "det_score": _r(c.det_score, 4), "blur": _r(c.blur, 2),
                    "face_width": _r(c.face_width, 2), "face_height": _r(c.face_height, 2),
                    "pose_diff": _r(pd, 3), "yaw_diff": _r(dy, 3), "pitch_diff": _r(dp, 3), "score": _r(row["score"]),
                    "source": img_meta.get(c.uid, {}).get("source", c.source),
                }
                fj["refs"].append(rj)
                pair_rows.append({
                    "key": key, "split": split, "target_uid": uid, "target_face_index": f.face_index, "identity_id": f.identity_id,
                    "ref_rank": rank, "ref_member": member, "ref_uid": c.uid, "ref_face_index": c.face_index,
                    "similarity": row["similarity"], "theta_tr": theta(row["similarity"]), "image_hamming": chk.image_hamming,
                    "face_hamming": chk.face_hamming, "face_ncc": chk.face_ncc, "kp_inliers": chk.kp_inliers,
                    "kp_ratio": chk.kp_ratio, "target_quality": qual[f.ref], "ref_quality": qual[c.ref],
                    "pose_diff": pd, "yaw_diff": dy, "pitch_diff": dp, "score": row["score"], "n_candidates": len(cands),
                    "n_survivors": n_survivors, "backend": cfg.backend, "model_version": ",".join(mversions),
                })
            face_js.append(fj)
        person_idx = {f.face_index for f in usable}
        others = []
        for f in fs:
            if f.face_index in person_idx:
                continue
            o = _face_json(f, qual[f.ref], with_embedding=False)
            o["reason"] = unusable_reason(f, cfg.min_face_px, cfg.det_score_min, cfg.blur_min)
            others.append(o)
        meta = img_meta[uid]
        sims = [r["similarity"] for fj in face_js for r in fj["refs"]]
        sample = {
            "key": key, "split": split,
            "target": {"uid": uid, "source": meta.get("source"), "width": meta.get("width"), "height": meta.get("height")},
            "caption": meta.get("caption"),
            "faces": face_js, "other_faces": others,
            "other_identity_ids": sorted({o["identity_id"] for o in others if o["identity_id"]}),
            "num_persons": len(face_js), "num_refs": ref_i,
            "num_persons_with_reference": sum(1 for fj in face_js if fj["refs"]),
            "scores": {"ref_similarity_min": _r(min(sims)), "ref_similarity_mean": _r(float(np.mean(sims))),
                       "target_quality_min": _r(min(fj["quality"] for fj in face_js), 4)},
            "source_uids": sorted(used),
            "backend": cfg.backend, "model_version": ",".join(mversions),
            "thresholds": {"sim_low": cfg.sim_low, "sim_high": cfg.sim_high, "image_hamming_max": cfg.image_hamming_max,
                           "face_hamming_max": cfg.face_hamming_max, "face_ncc_min": cfg.face_ncc_min,
                           "keypoints": cfg.keypoints, "kp_min_inliers": cfg.kp_min_inliers, "kp_min_ratio": cfg.kp_min_ratio,
                           "kp_strong_inliers": cfg.kp_strong_inliers},
        }
        samples.append(sample)
        if records is not None:
            records.add(sample, fps.read_for_record)
        target_reasons["kept"] += 1
    samples.sort(key=lambda s: s["key"])
    counts = {
        "targets": dict(sorted(target_reasons.items())),
        "persons": n_persons,
        "candidates_removed_by": dict(sorted(removed.items())),
        "duplicate_flags_independent": dict(sorted(flags.items())),
        "unreadable": dict(sorted(fps.errors.items())),
        "cache_evictions": {"images": fps.cache.evictions - evicted_before[0], "keypoints": fps.kps.evictions - evicted_before[1]},
        "similarity_all_candidates": _hist_counts([r["similarity"] for r in cand_rows]),
        "similarity_selected": _hist_counts([r["similarity"] for r in pair_rows]),
    }
    if previous is not None:  # how the build went, not recorded in the version
        counts["previous_rows"] = {"screened": as_before["screened"], "rows_changed": as_before["rows_changed"]}
    if sink is not None:
        taken.flush()
        flush("pairs", pair_rows, PAIRS_SCHEMA)
        counts["similarity_all_candidates"] = {str(int(i)): int(sim_counts["candidates"][i]) for i in np.nonzero(sim_counts["candidates"])[0]}
        counts["similarity_selected"] = {str(int(i)): int(sim_counts["pairs"][i]) for i in np.nonzero(sim_counts["pairs"])[0]}
        return samples, None, None, counts
    return samples, pair_rows, cand_rows, counts
