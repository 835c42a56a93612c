"""Build the multi-identity paired dataset (MultiID-2M style, after WithAnyone).

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

import bisect
import hashlib
import heapq
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cache import LRU
from pipeline.datasets import fingerprint_table
from pipeline.decode import encode_jpeg
from pipeline.ids import stable_key
from pipeline.multiid import dedup
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.reuse import (
    TARGETS_FILE,
    TARGETS_SCHEMA,
    PreviousTargets,
    TargetFingerprints,
    TargetTally,
    common_digest,
    patch_over_cap,
    photo_digests,
    reselect_reason,
    reused_records,
    target_counts,
)
from pipeline.multiid.rules import boxes_overlap, crop_box, examined_candidates
from pipeline.multiid.splits import identity_split
from pipeline.shards import (
    BUCKETS_FILE,
    ShardInfo,
    config_fingerprint,
    link_or_copy,
    previous_buckets,
    shard_record,
    shards_intact,
    write_manifest,
    write_shards,
)
from pipeline.splits import hash_fraction
from pipeline.storage import read_parquet, write_parquet_stream_atomic

SIM_BINS = np.round(np.linspace(-1.0, 1.0, 201), 4)  # 0.01 wide
PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


def _r(x: float, n: int = 6) -> float:
    return round(float(x), n)


def reader_from_images(images: pa.Table) -> Callable[[str], bytes]:
    """read_bytes(uid) over the images table: bytes at path[offset:offset+length]."""
    loc = {r["uid"]: (r["path"], r["offset"], r["length"]) for r in images.select(["uid", "path", "offset", "length"]).to_pylist()}

    from pipeline.ingest import read_accepted_bytes  # local files and object-store URLs alike
    from pipeline.sources import open_input

    def read_bytes(uid: str) -> bytes:
        path, off, n = loc[uid]
        if n is not None and n >= 0:  # checked against the uid: a photo edited in place is skipped, not used
            return read_accepted_bytes({"uid": uid, "path": path, "offset": int(off or 0), "length": int(n)})
        with open_input(path) as f:
            f.seek(int(off or 0))
            return f.read()

    return read_bytes


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


class _Fingerprints:
    """Decodes images on demand and caches, per image, its pHash and its faces' crop fingerprints
    (~25 KB a face) and, per face that can ever be compared (``eligible(face)``), the keypoints of the
    region around it (~0.6 MB a face). Both caches are LRU-bounded (``max_images``, ``max_keypoints``):
    targets are visited in uid order and a person's candidates recur across their targets, so recent
    entries are the useful ones; an evicted entry is recomputed (decode + SIFT, ~50 ms) when needed."""

    def __init__(self, read_bytes, faces_by_uid, eligible=None, keypoints: bool = True,
                 max_images: int = 20_000, max_keypoints: int = 2_000):
        self.read_bytes = read_bytes
        self.faces_by_uid = faces_by_uid
        self.eligible = eligible or (lambda f: True)
        self.keypoints = keypoints
        self.cache: LRU = LRU(max_images)
        self.kps: LRU = LRU(max_keypoints)
        self.decoded: LRU = LRU(8)  # the last photos decoded, for their faces' keypoints (not counted in the stats)
        self.errors: dict[str, str] = {}

    def get(self, uid: str):
        if uid in self.errors:
            return None
        if uid not in self.cache:
            try:
                g = dedup.open_gray(self.read_bytes(uid))
                fps = {f.face_index: dedup.face_fingerprint(g, f.landmarks, f.bbox) for f in self.faces_by_uid.get(uid, [])}
                self.cache[uid] = (dedup.image_phash(g), fps)
                if self.keypoints:
                    # keypoints are computed when a face is compared (kp), not for every eligible face of the
                    # photo; the cache still takes an entry per eligible face here (a placeholder), so that its
                    # contents and its eviction count are those of computing them all now
                    self.decoded[uid] = g
                    for f in self.faces_by_uid.get(uid, []):
                        if self.eligible(f):
                            self.kps[(uid, f.face_index)] = _NOT_YET
            except Exception as e:  # noqa: BLE001 - unreadable image becomes a counted reason, not a crash
                self.errors[uid] = f"{type(e).__name__}: {e}"
                return None
        return self.cache[uid]

    def kp(self, uid: str, face_index: int) -> dedup.KeypointSet | None:
        """Keypoints of one face's region (cached per (uid, face_index); computed on a miss)."""
        if not self.keypoints or self.get(uid) is None:
            return None
        key = (uid, face_index)
        got = self.kps[key] if key in self.kps else _NOT_YET  # noqa: SIM401 - get() would not mark it recently used
        if got is _NOT_YET:
            f = next(f for f in self.faces_by_uid[uid] if f.face_index == face_index)
            g = self.decoded[uid] if uid in self.decoded else dedup.open_gray(self.read_bytes(uid))
            self.decoded[uid] = g
            got = self.kps[key] = dedup.face_keypoints(np.asarray(g), f.bbox)
        return got


@dataclass
class MultiIDResult:
    """``samples``: the sample JSONs by key. A build that writes keeps none in memory (a bucket's samples are
    dropped once its shards are written): they are read back from the shards of ``out_dir`` on first use
    (pass the folder to :meth:`samples_in` when the version has moved since, e.g. once published). The
    same for ``pairs`` and ``candidates``: a build that writes streams them to ``out_dir`` and reads them
    back from there on first use."""

    _pairs: pa.Table | None
    _candidates: pa.Table | None
    _samples: list[dict] | None
    stats: dict
    shards: dict[str, list[ShardInfo]]
    out_dir: Path | None
    config: MultiIDConfig
    read_bytes: Callable[[str], bytes] | None = field(default=None, repr=False)

    @property
    def pairs(self) -> pa.Table:
        if self._pairs is None:
            from pipeline.storage import read_parquet

            self._pairs = read_parquet(self.out_dir / "pairs.parquet")
        return self._pairs

    @property
    def candidates(self) -> pa.Table:
        if self._candidates is None:
            from pipeline.storage import read_parquet

            self._candidates = read_parquet(self.out_dir / "candidates.parquet")
        return self._candidates

    @property
    def samples(self) -> list[dict]:
        if self._samples is None:
            self._samples = self.samples_in(self.out_dir)
        return self._samples

    def samples_in(self, folder: Path, first: int | None = None) -> list[dict]:
        """The samples of this build, read from its shards in ``folder`` (sorted by key); ``first``: only the
        first that many by key (their members found from the tar headers: the others are not read)."""
        if self._samples is not None:
            return self._samples[:first] if first is not None else self._samples
        import heapq
        import tarfile

        from pipeline.storage import as_dir  # a local folder or an object-store one

        shards = [as_dir(folder) / split / sh.name for split in ("train", "eval") for sh in self.shards.get(split, [])]
        if first is not None:
            names = []
            for i, path in enumerate(shards):
                with path.open("rb") as f, tarfile.open(fileobj=f) as tf:
                    names += [(m.name[:-5], i) for m in tf if m.isfile() and m.name.endswith(".json")]  # (key, shard)
            wanted: dict[int, set[str]] = defaultdict(set)
            for key, i in heapq.nsmallest(first, names):
                wanted[i].add(key + ".json")
        out = []
        for i, path in enumerate(shards):
            if first is not None and i not in wanted:
                continue
            with path.open("rb") as f, tarfile.open(fileobj=f) as tf:
                out += [json.loads(tf.extractfile(m).read()) for m in tf if m.isfile() and m.name.endswith(".json")
                        and (first is None or m.name in wanted[i])]
        return sorted(out, key=lambda s: s["key"])

    def contact_sheet(self, n: int = 4, keys: list[str] | None = None) -> bytes:
        from pipeline.multiid.report import contact_sheet

        chosen = [s for s in self.samples if keys is None or s["key"] in keys][:n]
        return contact_sheet(chosen, self.read_bytes)


def _image_ext(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return PIL_EXT.get(im.format or "", "img")


def ref_crop(data: bytes, bbox, margin: float, max_side: int, quality: int) -> tuple[bytes, list[float], list[float]]:
    """JPEG face crop: bbox grown by ``margin`` on each side, squared, clipped; (bytes, crop_box, bbox_in_crop)."""
    from PIL import Image

    from pipeline.decode import upright

    with Image.open(io.BytesIO(data)) as im0:
        im = upright(im0).convert("RGB")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    box = crop_box(bbox, margin, *im.size)
    crop = im.crop(tuple(box))
    s = 1.0
    if max(crop.size) > max_side:
        s = max_side / max(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * s)), max(1, round(crop.size[1] * s))), Image.LANCZOS)
    in_crop = [_r((x1 - box[0]) * s, 2), _r((y1 - box[1]) * s, 2), _r((x2 - box[0]) * s, 2), _r((y2 - box[1]) * s, 2)]
    return encode_jpeg(crop, quality), [float(v) for v in box], in_crop


def _hist(values, bins=SIM_BINS) -> dict:
    return _hist_from_counts(np.histogram(np.asarray(values, dtype=np.float64), bins=bins)[0], bins)


def _hist_counts(values, bins=SIM_BINS) -> dict[str, int]:
    """The non-zero bins of a histogram, by bin index (JSON-friendly, additive over buckets)."""
    counts = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)[0]
    return {str(int(i)): int(counts[i]) for i in np.nonzero(counts)[0]}


def _hist_from_counts(counts, bins=SIM_BINS) -> dict:
    edges = np.asarray(bins, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    nz = np.nonzero(counts)[0]
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "nonzero": {f"{edges[i]:.2f}": int(counts[i]) for i in nz}}


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


CANDIDATE_SCHEMA = pa.schema([
    ("target_uid", pa.string()), ("target_face_index", pa.int32()), ("identity_id", pa.string()),
    ("ref_uid", pa.string()), ("ref_face_index", pa.int32()), ("similarity", pa.float32()),
    ("image_hamming", pa.int32()), ("face_hamming", pa.int32()), ("face_ncc", pa.float32()),
    ("kp_inliers", pa.int32()), ("kp_ratio", pa.float32()),
    ("ref_quality", pa.float32()), ("pose_diff", pa.float32()), ("score", pa.float32()), ("status", pa.string()),
])

PAIRS_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("target_uid", pa.string()), ("target_face_index", pa.int32()),
    ("identity_id", pa.string()), ("ref_rank", pa.int32()), ("ref_member", pa.string()), ("ref_uid", pa.string()),
    ("ref_face_index", pa.int32()), ("similarity", pa.float32()), ("theta_tr", pa.float32()),
    ("image_hamming", pa.int32()), ("face_hamming", pa.int32()), ("face_ncc", pa.float32()),
    ("kp_inliers", pa.int32()), ("kp_ratio", pa.float32()),
    ("target_quality", pa.float32()), ("ref_quality", pa.float32()), ("pose_diff", pa.float32()),
    ("yaw_diff", pa.float32()), ("pitch_diff", pa.float32()), ("score", pa.float32()),
    ("n_candidates", pa.int32()), ("n_survivors", pa.int32()), ("backend", pa.string()), ("model_version", pa.string()),
])


def select_references(images: pa.Table, faces: pa.Table, identities: pa.Table, config: MultiIDConfig,
                      read_bytes: Callable[[str], bytes] | None = None) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Reference selection without writing anything: (samples JSON, pair rows, candidate rows, stats).

    Splits are by identity (hash of the identity id) and by photo: a photo feeds one split only.
    When the hash leaves eval without a sample but the collection has at least two, a group of people
    who appear together moves to eval: the co-occurrence component (people linked by sharing a photo)
    of a sample, lowest identity hash first, so that its photos and references move with it (small
    collections; recorded in the stats as ``eval_fallback``). Selection runs per bucket of components
    (:class:`_Plan`), which gives the same samples as one run over the whole collection."""
    plan = _Plan(images, faces, identities, config, read_bytes or reader_from_images(images), keep_rows=True)
    plan.select()
    pair_rows = _in_target_order(b.pair_rows for b in plan.active())
    cand_rows = _in_target_order(b.cand_rows for b in plan.active())
    return plan.samples(), pair_rows, cand_rows, plan.stats()


def _in_target_order(parts) -> list[dict]:
    """Rows of several buckets in the order of one run over the collection: by target uid (stable)."""
    rows = [r for part in parts for r in part]
    return sorted(rows, key=lambda r: r["target_uid"])


def bucket_of(group: str, n: int) -> int:
    """The bucket of a co-occurrence component (named by its smallest identity id, or ``photo:<uid>`` for
    a photo without a labelled face): a hash modulo the fixed ``reuse_buckets``."""
    return int.from_bytes(hashlib.sha256(f"multiid-bucket\x1f{group}".encode()).digest()[:8], "big") % n


CANDIDATE_BATCH = 20_000  # candidate (and pair) rows turned into an Arrow table and written at a time
MERGE_BATCH = 16_384  # rows read at a time from each part file when the parts are merged in target order


class _RowParts:
    """One selection run's candidate and pair rows, appended to two Parquet part files as they are
    produced (in the order :func:`_select` visits targets: by target uid). ``paths[name]`` is None while
    no row of that table was written."""

    def __init__(self, folder: Path, stem: str):
        self.folder, self.stem = folder, stem
        self.paths: dict[str, Path | None] = {"pairs": None, "candidates": None}
        self._writers: dict = {}

    def write(self, name: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        from pipeline.storage import named_write_error

        try:
            if name not in self._writers:
                self.paths[name] = self.folder / f"{self.stem}-{name}.parquet"
                self._writers[name] = pq.ParquetWriter(self.paths[name], table.schema, compression="zstd")
            self._writers[name].write_table(table)
        except OSError as e:  # a full disk names the part file it was writing
            raise named_write_error(self.folder / f"{self.stem}-{name}.parquet", e) from e

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


def _part_batches(path: Path | None, schema: pa.Schema, uids: pa.Array | None = None):
    """The rows of a part file (or of a previous version's table), a batch at a time, cast to
    ``schema``; with ``uids``, only the rows of those targets."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if path is None:
        return
    f = pq.ParquetFile(path)
    for batch in f.iter_batches(batch_size=MERGE_BATCH, columns=schema.names):
        t = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
        if uids is not None:
            t = t.filter(pc.is_in(t.column("target_uid"), uids))
        if t.num_rows:
            yield t


class _Uids:
    """A sorted uid column as a sequence for :mod:`bisect` (a few scalars read, not the column compared)."""

    def __init__(self, col):
        self.col = col

    def __len__(self) -> int:
        return len(self.col)

    def __getitem__(self, i: int) -> str:
        return self.col[i].as_py()


def _merge_in_target_order(sources: list, schema: pa.Schema):
    """Tables in the order of one run over the collection (by target uid, stable: each target's rows
    keep their order), from ``sources``, iterators of tables each sorted by target uid, where all rows of
    a target come from one source (a bucket, or a previous version). Yields pieces; holds about one
    batch per source, not the whole table."""
    import pyarrow.compute as pc

    its = [iter(s) for s in sources]
    bufs: list[pa.Table | None] = [None] * len(its)
    done = [False] * len(its)

    def pull(i: int) -> None:
        nxt = next(its[i], None)
        if nxt is None:
            done[i] = True
        else:
            bufs[i] = nxt if bufs[i] is None or not bufs[i].num_rows else pa.concat_tables([bufs[i], nxt])

    for i in range(len(its)):
        pull(i)
    while True:
        for i in range(len(its)):
            while not done[i] and (bufs[i] is None or not bufs[i].num_rows):
                pull(i)
        live = [i for i in range(len(its)) if bufs[i] is not None and bufs[i].num_rows]
        if not live:
            return
        # rows below the smallest "last uid read so far" of the sources not exhausted are final: no
        # source can still produce a smaller uid (a target's rows may continue in the next batch)
        lasts = [(bufs[i].column("target_uid")[-1].as_py(), i) for i in live if not done[i]]
        bound = min(lasts)[0] if lasts else None
        pieces = []
        for i in live:
            b = bufs[i]
            k = b.num_rows if bound is None else bisect.bisect_left(_Uids(b.column("target_uid")), bound)
            if k:
                pieces.append(b.slice(0, k))
                bufs[i] = b.slice(k)
        if pieces:
            t = pa.concat_tables(pieces)
            yield t.take(pc.sort_indices(t, sort_keys=[("target_uid", "ascending")])) if len(pieces) > 1 else t
        for last, i in lasts:
            if last == bound:
                pull(i)
QUALITY_COLUMNS = ["similarity", "theta_tr", "pose_diff", "face_hamming", "image_hamming", "face_ncc", "ref_quality"]  # data_quality
IMAGE_COLUMNS = ["uid", "source", "caption", "width", "height"]  # what a sample takes from the images table


@dataclass
class _Bucket:
    """The photos of some co-occurrence components, selected and sharded together."""

    index: int
    uids: list[str]
    identities: set[str]
    base_fingerprint: str = ""
    override: list[str] = field(default_factory=list)  # identities of this bucket moved to eval by the fallback
    samples: list[dict] = field(default_factory=list)
    pair_rows: list[dict] = field(default_factory=list)
    cand_rows: list[dict] = field(default_factory=list)
    pairs: Path | None = None  # the rows as Parquet part files (a build that writes keeps no row in memory)
    cands: Path | None = None
    summary: list[tuple] = field(default_factory=list)  # per sample: (key, split, faces' identity ids, refs per face)
    infos: dict = field(default_factory=dict)  # split -> the ShardInfos written for this bucket
    counts: dict = field(default_factory=dict)
    previous: dict | None = None  # the record of an identical bucket in the previous version (reused)
    # per-target reuse (a build that writes): targets.parquet rows of this bucket; the samples copied from
    # the previous version's tars (split -> previous shard -> keys); why targets were selected again
    targets: pa.Table | None = None
    copied: dict = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    n_reused: int = 0
    reused: list[str] = field(default_factory=list)  # in a bucket selected again, its targets reused (rows: previous version)
    n_over_cap: int = 0  # of them, targets whose people gained or lost faces only outside their examined candidates
    evictions: dict = field(default_factory=dict)  # the cache evictions of this run's selection (not recorded)
    bytes_copied: int = 0
    bytes_written: int = 0

    @property
    def name(self) -> str:
        return f"b{self.index:04d}"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.base_fingerprint, self.override]).encode()).hexdigest()[:32]

    def per_split(self) -> Counter:
        return Counter(t[1] for t in self.summary)

    def state(self) -> tuple:
        return (self.override, self.samples, self.pair_rows, self.cand_rows, self.pairs, self.cands, self.summary, self.counts,
                self.previous, self.targets, self.copied, self.reasons, self.n_reused, self.reused, self.n_over_cap, self.evictions)

    def restore(self, state: tuple) -> None:
        (self.override, self.samples, self.pair_rows, self.cand_rows, self.pairs, self.cands, self.summary, self.counts,
         self.previous, self.targets, self.copied, self.reasons, self.n_reused, self.reused, self.n_over_cap, self.evictions) = state


def _summary(samples: list[dict]) -> list[tuple]:
    return [(s["key"], s["split"], tuple(fj["identity_id"] for fj in s["faces"]), tuple(len(fj["refs"]) for fj in s["faces"]))
            for s in samples]


def _summary_of_targets(t: pa.Table) -> list[tuple]:
    """The summary of the kept targets of targets.parquet rows (what :func:`_summary` gives from their samples)."""
    cols = [t.column(c).to_pylist() for c in ("outcome", "key", "split", "persons", "refs")]
    return sorted((k, sp, tuple(p), tuple(r)) for o, k, sp, p, r in zip(*cols) if o == "kept")


class _Plan:
    """Reference selection bucket by bucket, reusing the buckets of a previous version that have the same
    fingerprint. A sample depends only on the photos of its co-occurrence component (a target's
    references are faces of its people in other photos, so in photos of the same component), on the
    config, the builder and the face models: a bucket's fingerprint covers exactly these, plus which of
    its identities the eval fallback moved. Inside a bucket that changed, a target's own fingerprint
    (:class:`pipeline.multiid.reuse.TargetFingerprints`) decides whether it is selected again."""

    def __init__(self, images: pa.Table, faces: pa.Table, identities: pa.Table, config: MultiIDConfig, read_bytes,
                 previous: Path | None = None, out_dir: Path | None = None, keep_rows: bool = False, workers: int = 1,
                 guard_cache: Path | None = None):
        from pipeline import __version__
        from pipeline.multiid.release import BUILDER_VERSION, FACE_COLUMNS

        config.validate()
        self.cfg = cfg = config.resolved()
        self.read_bytes = read_bytes
        self.by_uid = _faces_from_table(faces, identities)
        backends = sorted(set(faces.column("backend").to_pylist())) if "backend" in faces.column_names and faces.num_rows else [cfg.backend]
        self.mversions = sorted(set(faces.column("model_version").to_pylist())) if "model_version" in faces.column_names and faces.num_rows else [""]
        if any(b != cfg.backend for b in backends):
            raise ValueError(f"faces table comes from backend(s) {backends}, config says {cfg.backend!r}: thresholds would not apply")
        # the few image columns a sample uses, not every column of every row
        self.img_meta = {r["uid"]: r for r in images.select([c for c in IMAGE_COLUMNS if c in images.column_names]).to_pylist()}
        self.component = _cooccurrence_components(self.by_uid)
        groups: dict[int, list[str]] = defaultdict(list)
        # a component's smallest identity, once per component: min() per photo over a component that holds
        # most identities (co-occurrence chains people together at scale) was quadratic, ~20 min at 1M faces
        smallest: dict[int, str] = {}  # id() of the component's set (shared by its identities) -> its min
        for uid in sorted(set(self.img_meta) | set(self.by_uid)):
            ids = [f.identity_id for f in self.by_uid.get(uid, []) if f.identity_id is not None]
            if ids:
                comp = self.component[ids[0]]
                group = smallest.get(id(comp))
                if group is None:
                    group = smallest[id(comp)] = min(comp)
            else:
                group = f"photo:{uid}"
            groups[bucket_of(group, cfg.reuse_buckets)].append(uid)
        self.buckets = {b: _Bucket(b, uids, {f.identity_id for u in uids for f in self.by_uid.get(u, []) if f.identity_id is not None})
                        for b, uids in sorted(groups.items())}
        # fingerprints: what decides a bucket's samples, its shards and its rows
        common_parts = {"builder": BUILDER_VERSION, "library": __version__, "config": cfg.to_dict(),
                        "backends": backends, "model_versions": self.mversions}
        common = json.dumps(common_parts, sort_keys=True, default=str)
        face_cols = FACE_COLUMNS + ["source"]
        tables = [(images, IMAGE_COLUMNS, ["uid"]), (faces, face_cols, ["uid", "face_index"]),
                  (identities, ["uid", "face_index", "identity_id"], ["uid", "face_index"])]
        # each table's rows by bucket (ascending), as index arrays: no Python object per row of the tables
        import pyarrow.compute as pc

        all_uids = pa.array([u for b in self.buckets.values() for u in b.uids], pa.string())
        bucket_no = np.array([b.index for b in self.buckets.values() for _ in b.uids], np.int64)
        rows_of = []
        for t, _, _ in tables:
            pos = pc.fill_null(pc.index_in(t.column("uid"), value_set=all_uids), -1).to_numpy()
            of_row = np.where(pos >= 0, bucket_no[np.maximum(pos, 0)], -1) if len(pos) else np.zeros(0, np.int64)
            order = np.argsort(of_row, kind="stable")
            rows_of.append((order, of_row[order]))
        for b in self.buckets.values():
            h = hashlib.sha256(common.encode())
            for (t, cols, sort_by), (order, sorted_b) in zip(tables, rows_of):
                rows = order[np.searchsorted(sorted_b, b.index, "left"):np.searchsorted(sorted_b, b.index, "right")]
                h.update(fingerprint_table(t, cols, sort_by, rows=rows).encode())
            b.base_fingerprint = h.hexdigest()[:32]
        self.previous = Path(previous) if previous is not None else None
        # out_dir: each bucket's shards are written as soon as it is selected, and its samples dropped;
        # keep_rows: keep the row dicts (select_references), else the rows are streamed to Parquet part
        # files in ``parts_dir`` (in out_dir, else a temporary folder; the caller removes it)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.keep_rows = keep_rows
        self.parts_dir: Path | None = None
        if not keep_rows:
            import tempfile

            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            self.parts_dir = Path(tempfile.mkdtemp(prefix=".rows-", dir=self.out_dir))
        self.previous_records = previous_buckets(self.previous, ("pairs.parquet", "candidates.parquet", TARGETS_FILE))
        # per-target reuse when writing: each photo's digest, and the previous version's targets
        self.per_target = self.out_dir is not None
        self.digests = photo_digests(tables) if self.per_target else {}
        self.common_digest = common_digest(common_parts)
        self.prev_targets = PreviousTargets(self.previous if self.per_target else None, self.previous_records)
        self.selections = 0
        self.workers = max(1, int(workers)) if not keep_rows else 1
        from pipeline.multiid.guard_cache import GuardDecisions

        self.guard = GuardDecisions(guard_cache, {k: getattr(cfg, k) for k in (
            "image_hamming_max", "face_hamming_max", "face_ncc_min", "keypoints", "kp_min_inliers", "kp_min_ratio",
            "kp_strong_inliers")}) if guard_cache is not None else None
        self.corrupt: list[str] = []
        self.eval_fallback: list[str] = []

    def split_of(self, identity_id: str) -> str:
        if identity_id in self.eval_fallback:
            return "eval"
        return identity_split(identity_id, self.cfg.eval_fraction, self.cfg.split_salt)

    def active(self) -> list[_Bucket]:
        return list(self.buckets.values())

    def _run(self, b: _Bucket, override: set) -> None:
        """Fill bucket ``b`` with the eval override ``override``: from the previous version when it holds
        an intact bucket with the same fingerprint, else by selecting references over its photos; a build
        that writes selects only the targets whose fingerprint changed (:mod:`pipeline.multiid.reuse`)."""
        b.override = sorted(override & b.identities)
        b.previous = None
        b.copied, b.reasons, b.n_reused, b.n_over_cap, b.evictions = {}, Counter(), 0, 0, {"images": 0, "keypoints": 0}
        b.reused = []
        rec = self.previous_records.get(b.name)
        targets = [u for u in b.uids if u in self.img_meta]
        if rec is not None and rec.get("fingerprint") == b.fingerprint and self.prev_targets:
            problems = [f"{split}/{p}" for split, shards in sorted(rec.get("shards", {}).items())
                        for p in shards_intact(self.previous / split, shards)]
            if not problems and all(u in self.prev_targets.row for u in targets):
                b.previous = rec
                b.counts = rec["counts"]
                b.targets = self.prev_targets.take(targets)
                b.summary = _summary_of_targets(b.targets)
                b.n_reused = len(targets)
                b.samples = []
                b.pair_rows = b.cand_rows = []  # taken from the previous version's tables when written
                b.pairs = b.cands = None
                return
            self.corrupt += [f"{b.name}: {p}" for p in problems]
        img_meta = {u: self.img_meta[u] for u in b.uids if u in self.img_meta}
        by_uid = {u: self.by_uid[u] for u in b.uids if u in self.by_uid}
        # each run its own part files: a trial of the eval fallback that is undone keeps the earlier run's
        if not self.per_target:
            if self.keep_rows:
                b.samples, pair_rows, cand_rows, b.counts = _select(img_meta, by_uid, self.cfg, self.read_bytes, override,
                                                                     self.mversions)
                b.pair_rows, b.cand_rows, b.pairs, b.cands = pair_rows, cand_rows, None, None
            else:
                b.samples, b.counts, b.pairs, b.cands = _select_parallel(
                    self.workers, self.parts_dir, f"{b.name}-{self.selections}", img_meta, by_uid, self.cfg, self.read_bytes,
                    override, self.mversions, guard=self.guard)
                b.pair_rows, b.cand_rows = [], []
            b.evictions = b.counts.pop("cache_evictions")
            b.summary = _summary(b.samples)
            self.selections += 1
            return
        self._run_per_target(b, override, targets, img_meta, by_uid)

    def _run_per_target(self, b: _Bucket, override: set, targets: list[str], img_meta: dict, by_uid: dict) -> None:
        """Select only the targets of ``b`` whose fingerprint differs from the previous version's (or whose
        previous shard fails its sha256); take the others' rows from that version and copy their members."""
        cfg = self.cfg

        def split_of(i: str) -> str:
            return "eval" if i in override else identity_split(i, cfg.eval_fraction, cfg.split_salt)

        def usable(f) -> bool:
            return unusable_reason(f, cfg.min_face_px, cfg.det_score_min, cfg.blur_min) is None

        tf = TargetFingerprints(b.uids, by_uid, self.digests, split_of, usable, self.common_digest, cfg.max_candidates_per_person)
        fps = {u: tf.whole(u) for u in targets}
        over_cap: dict[str, int] = {}  # reused targets whose examined candidates are the same, their over-cap count not
        prev = self.prev_targets
        reuse, run = [], []
        for u in targets:
            was = prev.get(u) if prev else None
            reason = reselect_reason(was, fps[u]) if prev else "no_previous_version"
            if reason == "candidates_changed":
                if was["examined"] == tf.early(u):  # dropped before its candidates, and still will be
                    reason = None
                elif was["examined"] == tf.examined(u):
                    reason, over_cap[u] = None, tf.over_cap(u)
            if reason is None:
                shard = prev.shard[u]
                problems = prev.shard_problems(shard) if shard is not None else []
                if problems:
                    reason = "previous_shard_damaged"
                    self.corrupt += [f"{b.name}: {p}" for p in problems if f"{b.name}: {p}" not in self.corrupt]
            if reason is None:
                reuse.append(u)
            else:
                run.append(u)
                b.reasons[reason] += 1
        b.n_reused, b.n_over_cap = len(reuse), len(over_cap)
        b.reused = reuse
        b.pair_rows, b.cand_rows, b.pairs, b.cands = [], [], None, None
        samples, counts, tally = [], {}, None
        if run:
            # the selected targets' rows are streamed to part files like a whole bucket's (:meth:`_run`); what
            # targets.parquet needs of them (the examined fingerprint, the unreadable references) is taken
            # as each target's candidate rows are final, not read back
            def on_candidates(u: str, rows: list[dict]) -> tuple[bytes, list[str]]:
                return (tf.examined_from_rows(u, [(r["identity_id"], r["ref_uid"], r["ref_face_index"]) for r in rows]),
                        [r["ref_uid"] for r in rows if r["status"] == "unreadable_reference"])

            tally = TargetTally(on_candidates)
            samples, counts, b.pairs, b.cands = _select_parallel(
                self.workers, self.parts_dir, f"{b.name}-{self.selections}", img_meta, by_uid, cfg, self.read_bytes, override,
                self.mversions, targets=run, tally=tally, guard=self.guard)
            b.evictions = counts["cache_evictions"]
            self.selections += 1
        # targets.parquet rows of the selected targets
        sample_of = {s["target"]["uid"]: s for s in samples}
        errors = counts.get("unreadable", {})
        rows = []
        for u in run:
            reasons, removed, flags = tally.shares(u)
            (outcome,) = reasons
            # candidates_total is counted for every person of a target that reached its candidates
            examined, unreadable_refs = tally.seen[u] if "candidates_total" in removed else (tf.early(u), [])
            seen = [*unreadable_refs, *([u] if outcome == "unreadable_target" else [])]
            s = sample_of.get(u)
            fp, own, splits, people = fps[u]
            rows.append({
                "target_uid": u, "fingerprint": fp, "photo_digest": own, "splits": splits, "people_digest": people,
                "examined": examined,
                "outcome": outcome, "key": s and s["key"], "split": s and s["split"], "shard": None,
                "persons": s and [fj["identity_id"] for fj in s["faces"]], "refs": s and [len(fj["refs"]) for fj in s["faces"]],
                "counts": target_counts(dict(sorted(removed.items())), dict(sorted(flags.items())),
                                        {x: errors[x] for x in sorted(set(seen))}),
            })
        parts = [pa.Table.from_pylist(rows, schema=TARGETS_SCHEMA)]
        if reuse:
            kept = prev.take(reuse)
            # the fingerprint columns are this version's (a target reused under the cap has a new whole one)
            for c, vals in zip(("fingerprint", "photo_digest", "splits", "people_digest"), zip(*(fps[u] for u in reuse))):
                kept = kept.set_column(kept.schema.get_field_index(c), c, pa.array(list(vals), TARGETS_SCHEMA.field(c).type))
            if over_cap:
                counts_col = [patch_over_cap(c, over_cap[u]) if u in over_cap else c
                              for u, c in zip(reuse, kept.column("counts").to_pylist())]
                kept = kept.set_column(kept.schema.get_field_index("counts"), "counts", pa.array(counts_col, pa.string()))
            parts.append(kept)
            for o, k, sp, sh in zip(*(kept.column(c).to_pylist() for c in ("outcome", "key", "split", "shard"))):
                if o == "kept":
                    b.copied.setdefault(sp, {}).setdefault(sh, set()).add(k)
        t = pa.concat_tables(parts)
        b.targets = t.take(pa.array(sorted(range(t.num_rows), key=t.column("target_uid").to_pylist().__getitem__), pa.int64()))
        b.samples = samples
        b.summary = _summary_of_targets(b.targets)
        # the similarity histograms: those of the selected targets' rows now; the reused targets' rows stay in
        # the previous version's tables, counted in one pass for all buckets once selection is over
        # (:meth:`_count_reused_rows`)
        b.counts = _bucket_counts(b.targets, counts.get("similarity_all_candidates", {}), counts.get("similarity_selected", {}))

    def _emit(self, b: _Bucket) -> None:
        """Write bucket ``b``'s shards (hard links for a reused bucket; replacing what an earlier run of the
        same bucket wrote) and drop its samples. Nothing without ``out_dir``. The samples of reused targets
        are copied member by member from the previous version's tars (checked against their sha256 in
        :meth:`_run`), merged in key order with the new ones: the tars are those of a fresh build."""
        if self.out_dir is None:
            return
        cfg = self.cfg
        shard_of: dict[str, str] = {}
        b.bytes_copied = b.bytes_written = 0
        for split in ("train", "eval"):
            d = self.out_dir / split
            d.mkdir(parents=True, exist_ok=True)
            for old in b.infos.get(split, []):
                (d / old.name).unlink(missing_ok=True)
            if b.previous is not None:
                infos = [ShardInfo(**sh) for sh in b.previous["shards"].get(split, [])]
                for sh in infos:
                    link_or_copy(self.previous / split / sh.name, d / sh.name)
            else:
                split_samples = [s for s in b.samples if s["split"] == split]
                streams = [self._counted(_shard_samples(split_samples, cfg, self.read_bytes), "bytes_written", b)]
                for src, keys in sorted(b.copied.get(split, {}).items()):
                    streams.append(self._counted(reused_records(self.previous / src, keys), "bytes_copied", b))
                order: list[str] = []
                merged = heapq.merge(*streams, key=lambda r: r["__key__"])
                infos = write_shards((order.append(r["__key__"]) or r for r in merged), d,
                                     f"{cfg.dataset_name}-{split}-{b.name}", cfg.shard_max_count, cfg.shard_max_bytes)
                at = 0
                for sh in infos:
                    shard_of.update((k, f"{split}/{sh.name}") for k in order[at:at + sh.samples])
                    at += sh.samples
                if at != len(order) or len(order) != len(split_samples) + sum(len(k) for k in b.copied.get(split, {}).values()):
                    raise RuntimeError(f"{b.name}/{split}: {len(order)} samples written, {at} in shards: a previous tar "
                                       "lacks a sample its record lists")
            b.infos[split] = infos
        if b.previous is None and b.targets is not None:
            keys = b.targets.column("key").to_pylist()
            b.targets = b.targets.set_column(b.targets.schema.get_field_index("shard"), "shard",
                                             pa.array([shard_of.get(k) if k else None for k in keys], pa.string()))
        b.samples = []

    @staticmethod
    def _counted(records, attr: str, b: _Bucket):
        """``records`` passed through, the bytes of their image members (the photo, the crops; not the JSON)
        added to ``b.<attr>``."""
        for r in records:
            setattr(b, attr, getattr(b, attr) + sum(len(v) for k, v in r.items() if not k.startswith("__") and k != "json"))
            yield r

    def select(self) -> None:
        self._select_buckets()
        if self.previous is not None:
            self._count_reused_rows()

    def _select_buckets(self) -> None:
        cfg = self.cfg
        for b in self.buckets.values():
            self._run(b, set())
            self._emit(b)
        n = sum(len(b.summary) for b in self.buckets.values())
        if not (cfg.eval_fraction > 0 and n >= 2 and not any(b.per_split()["eval"] for b in self.buckets.values())):
            return
        # the eval fallback: other buckets do not change when one component moves to eval, so only the
        # bucket of the component tried is selected again (with its identities overridden)

        def lowest_hash(t):  # t: a sample's summary (key, split, identity ids, refs)
            return min(hash_fraction(i, cfg.split_salt) for i in t[2]), t[0]

        bucket_of_id = {i: b for b in self.buckets.values() for i in b.identities}
        tried: set[frozenset] = set()
        for t in sorted((t for b in self.buckets.values() for t in b.summary), key=lowest_hash):
            override = frozenset(self.component[t[2][0]])
            if override in tried:
                continue
            tried.add(override)
            if len(tried) > 10:
                break
            b = bucket_of_id[t[2][0]]
            kept = b.state()
            self._run(b, set(override))
            per_split = Counter()
            for x in self.buckets.values():
                per_split.update(x.per_split())
            if per_split["eval"] and per_split["train"]:
                self.eval_fallback = sorted(override)
                self._emit(b)
                return
            b.restore(kept)

    def samples(self) -> list[dict]:
        """The samples in memory (all of them without ``out_dir``; none once written)."""
        return sorted((s for b in self.buckets.values() for s in b.samples), key=lambda s: s["key"])

    def rows_in_target_order(self, name: str, schema: pa.Schema):
        """The ``name`` table ("pairs" or "candidates") of this build, in pieces, in the order of one run over
        the collection: the part files of the buckets selected (of their targets selected again), and the
        rows of the reused buckets and of the reused targets of the others from the previous version's table
        (in their order there: one pass over it), merged by target uid."""
        attr = {"pairs": "pairs", "candidates": "cands"}[name]
        # a selection run in parallel left one part file per chunk of targets, each sorted by target uid
        sources = [_part_batches(p, schema) for b in self.active() if b.previous is None
                   for p in (getattr(b, attr) if isinstance(getattr(b, attr), list) else [getattr(b, attr)])]
        reused = self._reused_uids()
        if reused:
            sources.append(_part_batches(self.previous / f"{name}.parquet", schema, pa.array(reused, pa.string())))
        return _merge_in_target_order(sources, schema)

    def _reused_uids(self) -> list[str]:
        """The targets whose rows are the previous version's: those of reused buckets, and the reused targets of
        the buckets selected again."""
        return sorted(u for b in self.active() for u in (b.uids if b.previous is not None else b.reused))

    def _count_reused_rows(self) -> None:
        """Add to each bucket selected again the similarity histograms of its reused targets' rows, from the
        previous version's tables: one streamed pass over two columns for all buckets (the rows are not held)."""
        import pyarrow.compute as pc

        owners = [b for b in self.active() if b.previous is None and b.reused]
        if not owners:
            return
        uids = pa.array(sorted(u for b in owners for u in b.reused), pa.string())
        owner = np.empty(len(uids), np.int64)  # position in ``uids`` -> index in ``owners``
        at = {u: i for i, u in enumerate(uids.to_pylist())}
        for i, b in enumerate(owners):
            owner[[at[u] for u in b.reused]] = i
        schema = pa.schema([("target_uid", pa.string()), ("similarity", pa.float32())])
        for name, key in (("pairs", "similarity_selected"), ("candidates", "similarity_all_candidates")):
            hist = np.zeros((len(owners), len(SIM_BINS) - 1), np.int64)
            for t in _part_batches(self.previous / f"{name}.parquet", schema, uids):
                who = owner[pc.index_in(t.column("target_uid"), value_set=uids).to_numpy(zero_copy_only=False)]
                sim = np.asarray(t.column("similarity").to_numpy(zero_copy_only=False), dtype=np.float64)
                for i in np.unique(who):
                    hist[i] += np.histogram(sim[who == i], bins=SIM_BINS)[0]
            for i, b in enumerate(owners):
                total = hist[i].copy()
                for k, n in b.counts[key].items():
                    total[int(k)] += int(n)
                b.counts[key] = {str(int(j)): int(total[j]) for j in np.nonzero(total)[0]}

    def stats(self) -> dict:
        cfg = self.cfg
        summ = [t for b in self.buckets.values() for t in b.summary]
        merged = _merge_counts([b.counts for b in self.buckets.values()])
        by_identity = sorted({f.identity_id for fs in self.by_uid.values() for f in fs if f.identity_id is not None})
        mixed = 0
        for fs in self.by_uid.values():
            mixed += len({self.split_of(f.identity_id) for f in fs if f.identity_id is not None}) > 1
        stats = {
            "images": len(self.img_meta),
            "targets": merged["targets"],
            "persons": merged["persons"],
            "candidates_removed_by": merged["candidates_removed_by"],
            "duplicate_flags_independent": merged["duplicate_flags_independent"],
            "unreadable": merged["unreadable"],
            # this run's selections only (a reused bucket or target ran none): not recorded in the version
            "cache_evictions": {k: sum(b.evictions.get(k, 0) for b in self.buckets.values()) for k in ("images", "keypoints")},
            "per_split": dict(sorted(Counter(t[1] for t in summ).items())),
            "identities": {"total": len(by_identity), "eval": sum(self.split_of(i) == "eval" for i in by_identity)},
            "photos_in_both_splits_by_faces": mixed,
            "refs_per_person_hist": dict(sorted(Counter(r for t in summ for r in t[3]).items())),
            "persons_per_target_hist": dict(sorted(Counter(len(t[2]) for t in summ).items())),
            "similarity_hist_all_candidates": _hist_from_counts(merged["similarity_all_candidates"]),
            "similarity_hist_selected": _hist_from_counts(merged["similarity_selected"]),
            "thresholds": {"sim_low": cfg.sim_low, "sim_high": cfg.sim_high},
        }
        if self.eval_fallback:
            stats["eval_fallback"] = self.eval_fallback
        return stats


def _merge_counts(parts: list[dict]) -> dict:
    """Sum the additive statistics of several buckets (a key met in any bucket is kept, even at 0)."""
    out = {k: Counter() for k in ("targets", "candidates_removed_by", "duplicate_flags_independent", "cache_evictions")}
    persons = 0
    unreadable: dict[str, str] = {}
    sims = {k: np.zeros(len(SIM_BINS) - 1, np.int64) for k in ("similarity_all_candidates", "similarity_selected")}
    for c in parts:
        for k in out:
            out[k].update(c.get(k, {}))
        persons += int(c.get("persons", 0))
        unreadable.update(c.get("unreadable", {}))
        for k, arr in sims.items():
            for i, n in c.get(k, {}).items():
                arr[int(i)] += int(n)
    merged = {k: dict(sorted(v.items())) for k, v in out.items()}
    merged["cache_evictions"] = {"images": merged["cache_evictions"].get("images", 0),
                                 "keypoints": merged["cache_evictions"].get("keypoints", 0)}
    merged.update(persons=persons, unreadable=dict(sorted(unreadable.items())), **sims)
    return merged


def _bucket_counts(targets: pa.Table, sim_all: dict, sim_selected: dict) -> dict:
    """A bucket's additive counts from its targets' shares (targets.parquet) and the similarity histograms
    of its rows: what :func:`_select` over all its targets counts (less the cache evictions, which depend on
    the run)."""
    reasons, removed, flags = Counter(), Counter(), Counter()
    unreadable: dict[str, str] = {}
    persons = 0
    for o, p, c in zip(*(targets.column(k).to_pylist() for k in ("outcome", "persons", "counts"))):
        reasons[o] += 1
        persons += len(p) if o == "kept" else 0
        c = json.loads(c)
        removed.update(c["candidates_removed_by"])  # Counter.update keeps keys counted 0 (as _select has them)
        flags.update(c["duplicate_flags_independent"])
        unreadable.update(c["unreadable"])
    return {
        "targets": dict(sorted(reasons.items())), "persons": persons,
        "candidates_removed_by": dict(sorted(removed.items())), "duplicate_flags_independent": dict(sorted(flags.items())),
        "unreadable": dict(sorted(unreadable.items())),
        "similarity_all_candidates": dict(sim_all), "similarity_selected": dict(sim_selected),
    }


def _cooccurrence_components(by_uid: dict[str, list[FaceRec]]) -> dict[str, set[str]]:
    """identity -> the set of identities linked to it by sharing photos (transitively)."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for fs in by_uid.values():
        ids = [f.identity_id for f in fs if f.identity_id is not None]
        for i in ids:
            find(i)
        for a, b in zip(ids, ids[1:]):
            parent[find(a)] = find(b)
    groups: dict[str, set[str]] = {}
    for i in parent:
        groups.setdefault(find(i), set()).add(i)
    return {i: groups[find(i)] for i in parent}


def _select(img_meta: dict, by_uid: dict[str, list[FaceRec]], cfg: MultiIDConfig, read_bytes, eval_override: set,
            mversions: list[str], sink: _RowParts | None = None, targets: set[str] | None = None, tally=None, decisions=None):
    """Reference selection over the photos of ``img_meta`` / ``by_uid`` (the whole collection, or one
    bucket's co-occurrence components: a target's candidates are faces of its people, so they lie in its
    component). Returns (samples, pair rows, candidate rows, counts), ``counts`` being the additive part
    of the statistics (:func:`_merge_counts` sums them over buckets). With ``sink``, the rows go to it in
    batches as they are produced (what stays in memory is one batch, whatever the number of targets)
    and both row lists come back ``None``. ``targets``: only these photos are targets (every photo still
    serves as a candidate); ``tally`` (reuse.TargetTally): records each target's share of the counts and
    is shown each target's candidate rows once their statuses are final. ``decisions``
    (guard_cache.GuardDecisions): the copy-paste guard's recorded decisions, taken instead of computed."""
    def split_of(identity_id: str) -> str:
        return "eval" if identity_id in eval_override else identity_split(identity_id, cfg.eval_fraction, cfg.split_salt)

    by_identity: dict[str, list[FaceRec]] = defaultdict(list)
    for uid in sorted(by_uid):
        for f in by_uid[uid]:
            if f.identity_id is not None:
                by_identity[f.identity_id].append(f)
    px_min = min(cfg.min_face_px, cfg.ref_min_face_px)
    # a fresh cache per run: its eviction counts then depend only on the photos of this run
    fps = _Fingerprints(read_bytes, by_uid, lambda f: unusable_reason(f, px_min, cfg.det_score_min, cfg.blur_min) is None,
                        keypoints=cfg.keypoints, max_images=cfg.cache_images, max_keypoints=cfg.cache_keypoints)
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
    kp_args = {"kp_min_inliers": cfg.kp_min_inliers, "kp_min_ratio": cfg.kp_min_ratio, "kp_strong_inliers": cfg.kp_strong_inliers}
    flags: Counter = Counter()

    def guard(uid: str, f: FaceRec, c: FaceRec, row: dict, t_phash, t_fps, got) -> dedup.DupCheck:
        """The whole copy-paste guard, target face ``f`` against candidate ``c``: recorded in ``row`` and
        in the order-independent flags (which therefore count the candidates examined)."""
        def judge() -> dedup.DupCheck:
            return dedup.compare(t_phash, got[0], t_fps[f.face_index], got[1][c.face_index],
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
    qual = qualities([f for u in sorted(by_uid) for f in by_uid[u]], cfg.backend)  # same batch for the same photos

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
    n_persons = 0
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
        for f in usable:
            cands = [c for c in by_identity[f.identity_id] if c.uid != uid]
            if len(cands) > cfg.max_candidates_per_person:
                removed["not_examined_over_cap"] += len(cands) - cfg.max_candidates_per_person
                cands = examined_candidates(uid, cands, cfg.max_candidates_per_person)
            removed["candidates_total"] += len(cands)
            survivors = []
            for c in cands:
                # unit vectors: a float32 dot product of two equal embeddings can read 1.0000001, over any sim_high
                row = {"target_uid": uid, "target_face_index": f.face_index, "identity_id": f.identity_id, "ref_uid": c.uid,
                       "ref_face_index": c.face_index, "similarity": min(1.0, float(f.emb @ c.emb)), "image_hamming": None, "face_hamming": None,
                       "face_ncc": None, "kp_inliers": None, "kp_ratio": None, "ref_quality": qual[c.ref], "pose_diff": pose_diff(f, c)[0], "score": None, "status": None}
                t_cands.append(row)
                if unusable_reason(c, cfg.ref_min_face_px, cfg.det_score_min, cfg.blur_min) is not None:
                    row["status"] = "ref_quality"
                    continue
                c_split, c_mixed = photo_split[c.uid]
                if c_split != split:
                    row["status"] = "photo_in_other_split"
                    continue
                if c_mixed:
                    meta_c = img_meta.get(c.uid, {})
                    box = (crop_box(c.bbox, cfg.crop_margin, meta_c.get("width") or 1 << 30, meta_c.get("height") or 1 << 30)
                           if cfg.ref_mode == "crop" else (0, 0, 1 << 30, 1 << 30))
                    if any(o.identity_id is not None and split_of(o.identity_id) != split and boxes_overlap(o.bbox, box)
                           for o in by_uid[c.uid]):
                        row["status"] = "crop_shows_other_split"
                        continue
                got = fps.get(c.uid)
                if got is None:
                    row["status"] = "unreadable_reference"
                    continue
                chk = None
                if cfg.examine_all_candidates:
                    chk = guard(uid, f, c, row, t_phash, t_fps, got)
                    dup = chk.is_duplicate
                    reason = chk.reason
                else:
                    # the cheap part of the guard (the two pHashes) for every candidate; NCC and keypoints
                    # only in rank order below, until enough references are chosen
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
                    mid, half = (cfg.sim_low + cfg.sim_high) / 2, (cfg.sim_high - cfg.sim_low) / 2
                    band = 1.0 - abs(row["similarity"] - mid) / max(half, 1e-9)
                    pdiff = min(1.0, row["pose_diff"] / cfg.pose_norm_deg)
                    row["score"] = cfg.w_pose * pdiff + cfg.w_quality * row["ref_quality"] + cfg.w_sim * band
                    survivors.append((row, c, chk))
            survivors.sort(key=lambda t: (-round(t[0]["score"], 9), t[1].uid, t[1].face_index))
            chosen = []
            n_guarded_out = 0  # ranked candidates the rest of the guard (NCC, keypoints) removed on the walk
            for i, (row, c, chk) in enumerate(survivors):
                if len(chosen) >= cfg.refs_per_person:
                    row["status"] = "ranked_out" if chk is not None else "not_examined_enough_chosen"
                    continue
                if chk is None:
                    chk = guard(uid, f, c, row, t_phash, t_fps, fps.get(c.uid))
                    survivors[i] = (row, c, chk)
                    if chk.is_duplicate:
                        row["status"] = "near_duplicate_" + chk.reason
                        n_guarded_out += 1
                        continue
                redundant = any(c.uid == o.uid for _, o, _ in chosen)
                if not redundant:
                    got = fps.get(c.uid)
                    for _, o, _ in chosen:
                        og = fps.get(o.uid)
                        def judge(got=got, og=og, c=c, o=o) -> dedup.DupCheck:
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
        for row in t_cands:
            removed[row["status"]] += 1
        if tally is not None:
            tally.candidates(uid, t_cands)
        cand_rows += t_cands
        if sink is not None and len(cand_rows) >= CANDIDATE_BATCH:
            flush("candidates", cand_rows, CANDIDATE_SCHEMA)
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
        target_reasons["kept"] += 1
    samples.sort(key=lambda s: s["key"])
    counts = {
        "targets": dict(sorted(target_reasons.items())),
        "persons": n_persons,
        "candidates_removed_by": dict(sorted(removed.items())),
        "duplicate_flags_independent": dict(sorted(flags.items())),
        "unreadable": dict(sorted(fps.errors.items())),
        "cache_evictions": {"images": fps.cache.evictions, "keypoints": fps.kps.evictions},
        "similarity_all_candidates": _hist_counts([r["similarity"] for r in cand_rows]),
        "similarity_selected": _hist_counts([r["similarity"] for r in pair_rows]),
    }
    if sink is not None:
        flush("candidates", cand_rows, CANDIDATE_SCHEMA)
        flush("pairs", pair_rows, PAIRS_SCHEMA)
        counts["similarity_all_candidates"] = {str(int(i)): int(sim_counts["candidates"][i]) for i in np.nonzero(sim_counts["candidates"])[0]}
        counts["similarity_selected"] = {str(int(i)): int(sim_counts["pairs"][i]) for i in np.nonzero(sim_counts["pairs"])[0]}
        return samples, None, None, counts
    return samples, pair_rows, cand_rows, counts


PARALLEL_MIN_TARGETS = 64  # a selection over fewer targets runs in the calling process (a fork costs more)
CHUNKS_PER_WORKER = 2  # chunks of targets per worker: balances targets of unequal cost
_FORKED: dict = {}  # the selection's arguments, inherited by the forked workers (never pickled)
_WORKER: dict = {}  # a worker's own bookkeeping (empty in the parent, so empty in every fresh fork)


def _select_chunk(i: int, chunk: list[str]):
    """In a forked worker: :func:`_select` over the targets ``chunk``, its rows to its own part files."""
    a = _FORKED
    tally = TargetTally(a["tally"].on_candidates) if a["tally"] is not None else None
    guard = a["guard"]
    # the decisions this worker adds and has not sent yet (it inherited the parent's, already kept there;
    # it keeps its own for its next chunks)
    if guard is not None and "sent" not in _WORKER:
        _WORKER["sent"], _WORKER["hits"] = len(guard.new), guard.hits
    new_at, hits_at = (_WORKER["sent"], _WORKER["hits"]) if guard is not None else (0, 0)
    sink = _RowParts(a["parts_dir"], f"{a['stem']}-c{i:03d}")
    try:
        samples, _, _, counts = _select(a["img_meta"], a["by_uid"], a["cfg"], a["read_bytes"], a["override"], a["mversions"],
                                        sink=sink, targets=set(chunk), tally=tally, decisions=guard)
    finally:
        sink.close()
    decided = None
    if guard is not None:
        decided = (guard.new[new_at:], guard.hits - hits_at)
        _WORKER["sent"], _WORKER["hits"] = len(guard.new), guard.hits
    return samples, counts, sink.paths, (tally.by_target, tally.seen) if tally is not None else None, decided


def _add_counts(total: dict, part: dict) -> None:
    """Add one chunk's :func:`_select` counts to ``total`` (keys met in any chunk kept, even at 0)."""
    for k, v in part.items():
        if k == "persons":
            total[k] = total.get(k, 0) + v
        elif k == "unreadable":  # photo uid -> error: the same photo fails the same way in every chunk
            total.setdefault(k, {}).update(v)
        else:
            c = total.setdefault(k, {})
            for kk, n in v.items():
                c[kk] = c.get(kk, 0) + n


def _select_parallel(workers: int, parts_dir: Path, stem: str, img_meta: dict, by_uid: dict, cfg: MultiIDConfig, read_bytes,
                     override: set, mversions: list[str], targets=None, tally=None, guard=None):
    """:func:`_select` with its rows streamed to part files, over ``workers`` forked processes when there are
    enough targets. Returns (samples, counts, pairs part files, candidates part files): one file (or None)
    from one process, a list of files (one per chunk, each sorted by target uid) from several. A target's selection depends only on
    the collection, not on the other targets (each run has its own decoding cache; its eviction counts,
    which no version records, are the only figures that differ), so the rows, samples and counts are
    those of one run over all targets."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    uids = sorted(img_meta) if targets is None else sorted(set(img_meta) & set(targets))
    if workers <= 1 or len(uids) < PARALLEL_MIN_TARGETS or "fork" not in mp.get_all_start_methods():
        sink = _RowParts(parts_dir, stem)
        try:
            samples, _, _, counts = _select(img_meta, by_uid, cfg, read_bytes, override, mversions, sink=sink,
                                            targets=None if targets is None else set(targets), tally=tally, decisions=guard)
        finally:
            sink.close()
        return samples, counts, sink.paths["pairs"], sink.paths["candidates"]
    n = min(len(uids), workers * CHUNKS_PER_WORKER)
    # targets grouped by person (their smallest identity id): a person's targets share their candidates, so
    # each worker's decoding and keypoint caches serve its chunk as they serve one run (contiguous runs of
    # uids, which are random, made every worker decode most photos: twice the CPU of one run, measured)
    def person(u: str) -> str:
        ids = [f.identity_id for f in by_uid.get(u, []) if f.identity_id is not None]
        return min(ids) if ids else ""
    order = sorted(uids, key=lambda u: (person(u), u))
    bounds = [round(i * len(order) / n) for i in range(n + 1)]
    chunks = [order[bounds[i]:bounds[i + 1]] for i in range(n)]
    _FORKED.update(parts_dir=parts_dir, stem=stem, img_meta=img_meta, by_uid=by_uid, cfg=cfg, read_bytes=read_bytes,
                   override=override, mversions=mversions, tally=tally, guard=guard)
    import cv2

    # OpenCV's thread pool is stopped before the fork and restored after: a child that inherits a pool whose
    # threads did not survive the fork hangs as soon as it touches it (seen: setNumThreads in the child)
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_select_chunk, range(n), chunks))
    finally:
        _FORKED.clear()
        cv2.setNumThreads(cv_threads)
    samples, counts = [], {}
    pairs, cands = [], []
    for s, c, paths, t, decided in results:
        if decided is not None:
            guard.new += decided[0]
            guard.hits += decided[1]
        samples += s
        _add_counts(counts, c)
        if paths["pairs"] is not None:
            pairs.append(paths["pairs"])
        if paths["candidates"] is not None:
            cands.append(paths["candidates"])
        if t is not None:
            tally.by_target.update(t[0])
            tally.seen.update(t[1])
    samples.sort(key=lambda s: s["key"])
    for k in ("targets", "candidates_removed_by", "duplicate_flags_independent", "unreadable"):
        counts[k] = dict(sorted(counts.get(k, {}).items()))
    counts.setdefault("persons", 0)
    for k in ("similarity_all_candidates", "similarity_selected"):
        counts[k] = {kk: v for kk, v in sorted(counts.get(k, {}).items(), key=lambda kv: int(kv[0])) if v}
    return samples, counts, pairs or None, cands or None


def _shard_samples(samples: list[dict], cfg: MultiIDConfig, read_bytes):
    """WebDataset records, one at a time (the bytes of one sample in memory, not the dataset's)."""
    for s in samples:
        data = read_bytes(s["target"]["uid"])
        ext = _image_ext(data)
        s["target"]["member"] = f"target.{ext}"
        rec = {"__key__": s["key"], f"target.{ext}": data}
        cache: dict[str, bytes] = {}
        for fj in s["faces"]:
            for r in fj["refs"]:
                rb = cache.get(r["uid"]) or cache.setdefault(r["uid"], read_bytes(r["uid"]))
                if cfg.ref_mode == "crop":
                    crop, box, in_crop = ref_crop(rb, r["bbox"], cfg.crop_margin, cfg.crop_max_side, cfg.jpeg_quality)
                    r["crop_box"], r["bbox_in_crop"], r["kind"] = box, in_crop, "face_crop"
                    rec[r["member"]] = crop
                else:
                    rext = _image_ext(rb)
                    r["member"] = r["member"].rsplit(".", 1)[0] + f".{rext}"
                    r["kind"] = "image"
                    rec[r["member"]] = rb
        rec["json"] = s
        yield rec


def hf_features(config: MultiIDConfig, samples: list[dict] | None = None, target_exts=("jpg", "png", "webp")):
    """datasets.Features for ``load_dataset("webdataset", ..., features=...)``.

    Samples carry a varying number of ``ref_<i>.jpg`` members (1..max_faces x refs_per_person) and a
    target extension that follows the original bytes, which defeats HF's feature inference from the
    first 5 samples; declare every possible member instead (missing ones load as None). HF decodes
    ``.json`` members to dicts: pass the dataset's ``samples`` (``MultiIDResult.samples`` or
    ``metrics.load_samples(dir)``) to type that column from them; without them it is left untyped.
    """
    import datasets

    feats = {f"target.{e}": datasets.Image() for e in target_exts}
    for i in range(config.max_faces * config.refs_per_person):
        feats[f"ref_{i}.jpg"] = datasets.Image()
    if samples:
        schema = pa.Table.from_pylist([{"json": s} for s in samples]).schema
        feats["json"] = datasets.Features.from_arrow_schema(schema)["json"]
    else:
        feats["json"] = datasets.Value("string")
    feats["__key__"] = datasets.Value("string")
    feats["__url__"] = datasets.Value("string")
    return datasets.Features(feats)


def build_multiid_dataset(images: pa.Table, faces: pa.Table, identities: pa.Table, out_dir: Path | None,
                          config: MultiIDConfig = MultiIDConfig(), read_bytes: Callable[[str], bytes] | None = None,
                          version: str | None = None, reuse_from: Path | None = None, workers: int = 1,
                          guard_cache: Path | None = None) -> MultiIDResult:
    """Select references, write ``out_dir/{train,eval}/`` shards + manifests (``version`` is the dataset
    version id they record), ``out_dir/pairs.parquet``, ``out_dir/candidates.parquet`` and
    ``out_dir/buckets.json``; return everything. ``out_dir=None``: select only, write nothing. Whether the
    splits leak is decided by :func:`pipeline.multiid.splits.split_leaks` on what was written, not here.

    Shards are written per bucket of co-occurrence components (``<name>-<split>-b<bucket>-<n>.tar``).
    ``reuse_from``: a previous version's local folder; each bucket whose fingerprint equals one recorded
    there, and whose shard files still match their recorded sha256, is not selected again: its shards are
    hard-linked, its rows and counts taken from that version (``stats["buckets_reused"]``). In the other
    buckets, each target whose fingerprint (``out_dir/targets.parquet``, :mod:`pipeline.multiid.reuse`) equals
    the previous version's, and whose previous shard matches its sha256, is not selected again either: its
    tar members are copied from that shard, its rows taken from that version (``stats["targets_reused"]``,
    ``"targets_reselected"``, ``"reselect_reasons"``, ``"bytes_copied"``). The files written are the same,
    byte for byte, as without ``reuse_from``.

    ``workers`` > 1: the targets of each large enough selection are split into contiguous runs of uids
    selected in forked worker processes (:func:`_select_parallel`); the files written are the same, byte
    for byte, as with one worker (tests/test_multiid_parallel.py).

    ``guard_cache``: a file of the copy-paste guard's decisions (:mod:`pipeline.multiid.guard_cache`), read
    before and written after the build: a pair of faces already judged under the same settings is not
    judged again (``stats["guard_decisions_reused"]`` / ``"guard_decisions_computed"``)."""
    import shutil

    read_bytes = read_bytes or reader_from_images(images)
    out_dir = Path(out_dir) if out_dir is not None else None
    # with out_dir, each bucket is written as soon as it is selected (its samples then dropped); its rows are
    # streamed to part files as they are produced, merged into pairs.parquet / candidates.parquet at the end:
    # what stays in memory per target is a summary tuple, not its rows nor its sample dicts
    plan = _Plan(images, faces, identities, config, read_bytes, reuse_from if out_dir is not None else None, out_dir=out_dir,
                 workers=workers, guard_cache=guard_cache)
    try:
        return _build(plan, out_dir, version, read_bytes)
    finally:
        shutil.rmtree(plan.parts_dir, ignore_errors=True)


def _build(plan: _Plan, out_dir: Path | None, version: str | None, read_bytes) -> MultiIDResult:
    """build_multiid_dataset once its plan is made (the caller removes the plan's part files)."""
    from pipeline.multiid.metrics import dataset_quality_stats

    cfg = plan.cfg
    plan.select()
    stats = plan.stats()
    buckets = plan.active()
    shards: dict[str, list[ShardInfo]] = {"train": [], "eval": []}
    # the two tables, streamed in target order (to out_dir, else to the temporary folder and read back)
    dest = out_dir if out_dir is not None else plan.parts_dir
    write_parquet_stream_atomic(plan.rows_in_target_order("pairs", PAIRS_SCHEMA), PAIRS_SCHEMA, dest / "pairs.parquet")
    write_parquet_stream_atomic(plan.rows_in_target_order("candidates", CANDIDATE_SCHEMA), CANDIDATE_SCHEMA,
                                dest / "candidates.parquet")
    for b in buckets:
        b.pairs = b.cands = None
    stats["data_quality"] = dataset_quality_stats(read_parquet(dest / "pairs.parquet", columns=QUALITY_COLUMNS))
    pairs = cands = None
    if out_dir is None:
        pairs, cands = read_parquet(dest / "pairs.parquet"), read_parquet(dest / "candidates.parquet")
    samples = None if out_dir is not None else plan.samples()
    reused_bytes = sum(sh.bytes for b in buckets if b.previous is not None for v in b.infos.values() for sh in v)
    if out_dir is not None:
        conf = cfg.to_dict()
        records = {}
        for b in buckets:
            rec = {"fingerprint": b.fingerprint, "photos": len(b.uids), "eval_override": b.override, "shards": {}, "counts": b.counts}
            for split in ("train", "eval"):
                infos = b.infos.get(split, [])
                shards[split] += infos
                if infos:
                    rec["shards"][split] = [shard_record(i) for i in infos]
            records[b.name] = rec
        for split in ("train", "eval"):
            summ = [t for b in buckets for t in b.summary if t[1] == split]
            write_manifest(out_dir / split, cfg.dataset_name, shards[split], conf, version=version, split=split, extra={
                "num_persons": sum(len(t[2]) for t in summ),
                "num_refs": sum(sum(t[3]) for t in summ), "ref_mode": cfg.ref_mode,
                "counts": {k: stats[k] for k in ("images", "targets", "candidates_removed_by", "duplicate_flags_independent")},
            })
        # targets.parquet: each bucket's targets are sorted by uid, and a target is in one bucket
        write_parquet_stream_atomic(_merge_in_target_order([[b.targets] for b in buckets if b.targets is not None and b.targets.num_rows],
                                                           TARGETS_SCHEMA), TARGETS_SCHEMA, out_dir / TARGETS_FILE)
        from pipeline.storage import write_bytes_atomic

        write_bytes_atomic(json.dumps({"bucket_count": cfg.reuse_buckets, "buckets": records}, sort_keys=True, indent=1).encode(),
                           out_dir / BUCKETS_FILE)
        stats["config_fingerprint"] = config_fingerprint(conf)
    # how the build went (not written into the version: a reused build writes the same files as a fresh one)
    stats["buckets_reused"] = sum(b.previous is not None for b in buckets)
    stats["buckets_rebuilt"] = sum(b.previous is None for b in buckets)
    stats["bytes_reused"] = reused_bytes
    stats["selections_run"] = plan.selections
    stats["buckets_not_reused_corrupt"] = plan.corrupt
    # per-target reuse (a build that writes): targets taken from the previous version (those of reused buckets
    # included) vs selected again, and why; member bytes copied from its tars vs written from the photos
    stats["targets_reused"] = sum(b.n_reused for b in buckets)
    stats["targets_reused_over_cap_updated"] = sum(b.n_over_cap for b in buckets)
    stats["targets_reselected"] = sum(sum(b.reasons.values()) for b in buckets)
    stats["reselect_reasons"] = dict(sorted(sum((b.reasons for b in buckets), Counter()).items()))
    stats["bytes_copied"] = sum(b.bytes_copied for b in buckets)
    stats["bytes_written"] = sum(b.bytes_written for b in buckets)
    if plan.guard is not None:
        stats["guard_decisions_reused"] = plan.guard.hits
        stats["guard_decisions_computed"] = plan.guard.save()
    return MultiIDResult(pairs, cands, samples, stats, shards, out_dir, cfg, read_bytes)

