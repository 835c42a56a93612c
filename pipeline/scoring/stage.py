"""The candidate-scoring stage shared by every dataset builder.

``score_candidates(images, faces, config) -> (scores, report)``
    images  iterable of (uid, rgb uint8 HxWx3, caption or None)
    faces   optional pa.Table with uid, face_index and pipeline.faces columns (embedding,
            identity_id or reference_embedding, face_width, face_height, blur, yaw, pitch, det_score)
    scores  one row per face (face_index set) and one row per image without faces (face_index null):
            uid, face_index, clip_score, aesthetic, social_reward, face_quality, identity_similarity,
            scorers (the scorers that produced a number for that row). Image-level scores repeat on
            each face row of the image. A scorer that did not run leaves its column null.
    report  {"available": [...], "unavailable": {name: reason}, "timings_s": {...}, "images", "faces", "device"}

Scorers: clip (open_clip, local weights), aesthetic (LAION head on CLIP image embeddings),
social_reward (pipeline/scoring/social.py: the folder training/reward.py saves, or a head over
the stage's CLIP embeddings; unavailable until training has produced a checkpoint),
face_quality (pipeline.faces.quality), identity_similarity (cosine of the face embedding with
its ``reference_embedding`` column when present, else with the leave-one-out centroid of its
identity_id cluster; null for singletons). A scorer whose weights are missing is listed under
"unavailable" with the reason and skipped; nothing is ever scored with random weights unless a
test builds its own tiny model and saves it first.

Incremental use: the image-level scores (clip, aesthetic, social_reward: the expensive part) depend
only on an image's bytes and caption and on the scorers, so they are computed once per input
partition (``score_images``, keyed by ``scorer_fingerprint``) and passed back as ``image_scores``;
then only the cheap face-level scores are computed over the whole collection.

``combine_scores(table, weights)`` gives the weighted mean of the non-null score columns per row
(weights may be negative; a row with no available weighted column gets NaN), which builders use
to filter or rank (``rank_candidates``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.faces.quality import QualityConfig, face_quality_from_table
from pipeline.scoring.base import ScorerUnavailable, pick_device
from pipeline.scoring.clip import ClipConfig, ClipEncoder, clip_scores
from pipeline.scoring.heads import AestheticScorer, HeadConfig
from pipeline.scoring.social import SocialRewardScorer

SCORE_COLUMNS = ("clip_score", "aesthetic", "social_reward", "face_quality", "identity_similarity")
SCORES_SCHEMA = pa.schema(
    [("uid", pa.string()), ("face_index", pa.int32())]
    + [(c, pa.float32()) for c in SCORE_COLUMNS]
    + [("scorers", pa.list_(pa.string()))]
)


@dataclass(frozen=True)
class ScoringConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    aesthetic: HeadConfig = field(default_factory=HeadConfig)
    social_reward: HeadConfig = field(default_factory=HeadConfig)
    quality: QualityConfig | None = None  # None: the defaults, with the faces backend's detector range
    enabled: tuple[str, ...] = ("clip", "aesthetic", "social_reward", "face_quality", "identity_similarity")
    chunk: int = 256  # images held in memory at once


def _row_matrix(col) -> tuple[np.ndarray, np.ndarray]:
    """``(valid, rows)``: which rows of a list-of-float column are non-null, and those rows as a float32
    (n_valid, D) array, read through Arrow buffers (no Python lists)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
    vals = col.filter(pa.array(valid)) if col.null_count else col
    if len(vals) == 0:
        return valid, np.zeros((0, 0), np.float32)
    if pa.types.is_fixed_size_list(vals.type):
        dim = vals.type.list_size
    else:
        lengths = np.asarray(pa.compute.list_value_length(vals).to_numpy(zero_copy_only=False))
        dim = int(lengths[0])
        if (lengths != dim).any():
            raise ValueError("embedding rows of different lengths")
    flat = vals.flatten().to_numpy(zero_copy_only=False)
    return valid, np.asarray(flat, np.float32).reshape(-1, dim)


def _rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a[i] @ b[i]`` for every row, as float32: a batched vector-vector matmul, the same BLAS dot the
    scalar ``a[i] @ b[i]`` and ``np.linalg.norm`` use, so the results are bit-identical to a per-row loop."""
    return np.matmul(a[:, None, :], b[:, :, None]).reshape(len(a))


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in place (a zero row is divided by 1e-12, as the scalar rule did)."""
    norm = np.sqrt(_rowwise_dot(x, x))
    x /= np.maximum(norm, np.float32(1e-12))[:, None]
    return x


def _add_rows_in_order(total: np.ndarray, codes: np.ndarray, x: np.ndarray, min_batch: int = 512) -> None:
    """``total[codes[j]] += x[j]`` for j = 0, 1, ... in that order (each group's sum is the sequential
    one, as ``np.add.at`` gives), but faster: the j-th row of every group is added in one fancy
    ``+=`` (its codes are distinct) while at least ``min_batch`` groups have a j-th row; the rows of
    the few larger groups beyond that go through ``np.add.at`` in order."""
    n = len(codes)
    if n == 0:
        return
    o = np.argsort(codes, kind="stable")
    sc = codes[o]
    starts = np.r_[True, sc[1:] != sc[:-1]]
    rank = np.empty(n, np.int64)
    rank[o] = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    by_rank = np.argsort(rank, kind="stable")  # rank 0 rows, then rank 1 rows, ... each in face order
    bounds = np.r_[0, np.cumsum(np.bincount(rank))]
    r = 0
    while r + 1 < len(bounds) and bounds[r + 1] - bounds[r] >= min_batch:
        j = by_rank[bounds[r] : bounds[r + 1]]
        total[codes[j]] += x[j]
        r += 1
    if bounds[r] < n:
        j = np.sort(by_rank[bounds[r] :])
        np.add.at(total, codes[j], x[j])


def _identity_similarity(faces: pa.Table, block: int = 65536) -> np.ndarray:
    """float32 (N,): cosine of each face's embedding with its reference_embedding, or with the
    leave-one-out centroid of its identity_id cluster (NaN for singletons and faces without one).

    Vectorised over blocks of ``block`` faces, read from the Arrow columns a block at a time, so besides
    the table only O(identities + block) floats are held: the unit embeddings are recomputed per block
    (the same per-row arithmetic each time), each identity's sum is accumulated in face order
    (``_add_rows_in_order``: the sum a per-identity ``emb[idx].sum(0)`` gives), and the per-face dots
    use the same BLAS dot as the scalar code, so the values are bit-identical to a per-face loop."""
    emb_col = faces.column("embedding")
    if emb_col.null_count:
        raise ValueError("identity_similarity: the embedding column has nulls")
    n = faces.num_rows
    out = np.full(n, np.nan, np.float32)
    if n == 0:
        return out

    def unit(lo, hi):
        x = np.array(_row_matrix(emb_col.slice(lo, hi - lo))[1], np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    if "reference_embedding" in faces.column_names:
        ref_col = faces.column("reference_embedding")
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            m, refs = _row_matrix(ref_col.slice(lo, hi - lo))
            if m.any():
                out[lo:hi][m] = _rowwise_dot(unit(lo, hi)[m], _normalise(np.array(refs, np.float32)))
        return out
    if "identity_id" not in faces.column_names:
        return out
    ids = faces.column("identity_id").combine_chunks().dictionary_encode()
    has_id = np.asarray(ids.is_valid().to_numpy(zero_copy_only=False), bool)
    codes = np.asarray(ids.indices.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    k = len(ids.dictionary)
    size = np.bincount(codes[has_id], minlength=k)
    total = np.zeros((k, unit(0, 1).shape[1]), np.float32)
    for lo in range(0, n, block):
        m = has_id[lo : lo + block]
        if m.any():
            _add_rows_in_order(total, codes[lo : lo + block][m], unit(lo, lo + block)[m])
    scored = has_id & (size[codes] >= 2)
    for lo in range(0, n, block):
        m = scored[lo : lo + block]
        if m.any():
            e = unit(lo, lo + block)[m]
            c = _normalise(total[codes[lo : lo + block][m]] - e)
            out[lo : lo + block][m] = _rowwise_dot(e, c)
    return out


IMAGE_SCORE_COLUMNS = ("clip_score", "aesthetic", "social_reward")
IMAGE_SCORES_SCHEMA = pa.schema([("uid", pa.string())] + [(c, pa.float32()) for c in IMAGE_SCORE_COLUMNS]
                                + [("scorer_fingerprint", pa.string())])


_IMAGE_ROWS_SCHEMA = pa.schema([("uid", pa.string())] + [(c, pa.float32()) for c in IMAGE_SCORE_COLUMNS])
_SCORER_NAMES = pa.array(["clip" if c == "clip_score" else c for c in SCORE_COLUMNS], pa.string())


def _last_row_per_uid(img: pa.Table) -> pa.Table:
    """One row per uid, in order of first appearance, with the scores of the uid's last row."""
    enc = img.column("uid").combine_chunks().dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False)
    last = np.zeros(len(enc.dictionary), np.int64)
    np.maximum.at(last, codes, np.arange(img.num_rows, dtype=np.int64))
    out = img.take(pa.array(last))
    return out.set_column(0, "uid", enc.dictionary)


def _concat(arrays, type_) -> pa.ChunkedArray:
    chunks = [ch for a in arrays for ch in (a.chunks if isinstance(a, pa.ChunkedArray) else [a])]
    return pa.chunked_array(chunks, type_)


def _finite_or_null(values: np.ndarray | None, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.float32())
    values = np.asarray(values, np.float32)
    return pa.array(values, pa.float32(), mask=~np.isfinite(values))


def _scorers_column(score_cols: list[pa.ChunkedArray]) -> pa.Array:
    """Per row, the names of the scorers whose column is non-null there (in SCORE_COLUMNS order)."""
    valid = np.stack([np.asarray(c.is_valid().to_numpy(zero_copy_only=False), bool) for c in score_cols], axis=1)
    offsets = np.zeros(len(valid) + 1, np.int32)
    np.cumsum(valid.sum(1), out=offsets[1:])
    names = _SCORER_NAMES.take(pa.array(np.nonzero(valid)[1].astype(np.int32)))
    return pa.ListArray.from_arrays(pa.array(offsets), names)


def scorer_fingerprint(config: ScoringConfig) -> str:
    """What the image-level scores depend on besides the image: the scorers' configs and their weight
    files (path, size, mtime)."""
    import hashlib
    import json
    import os
    from dataclasses import asdict

    def weights(path):
        if not path or not os.path.exists(path):
            return None
        st = os.stat(path)
        return [str(path), st.st_size, st.st_mtime_ns]

    parts = {"clip": asdict(config.clip), "aesthetic": asdict(config.aesthetic), "social_reward": asdict(config.social_reward),
             "enabled": [e for e in config.enabled if e in ("clip", "aesthetic", "social_reward")],
             "files": [weights(config.clip.pretrained), weights(config.aesthetic.weights), weights(config.social_reward.weights)]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _image_config(config: ScoringConfig) -> ScoringConfig:
    return ScoringConfig(clip=config.clip, aesthetic=config.aesthetic, social_reward=config.social_reward,
                         enabled=tuple(e for e in config.enabled if e in ("clip", "aesthetic", "social_reward")),
                         chunk=config.chunk)


def score_images(images: Iterable[tuple[str, np.ndarray, str | None]], config: ScoringConfig, scorers: dict | None = None):
    """Image-level scores only (one row per uid, IMAGE_SCORES_SCHEMA) and the report. ``scorers``: loaded
    once by :func:`load_scorers` (on ``_image_config(config)``) for callers that score many chunks."""
    cfg = _image_config(config)
    table, report = score_candidates(images, None, cfg, scorers=scorers)
    fp = scorer_fingerprint(config)
    out = pa.table({"uid": table.column("uid"), **{c: table.column(c) for c in IMAGE_SCORE_COLUMNS},
                    "scorer_fingerprint": pa.array([fp] * table.num_rows, pa.string())}, schema=IMAGE_SCORES_SCHEMA)
    return out, report


def _load(name, fn, available, unavailable, timings):
    t0 = time.perf_counter()
    try:
        obj = fn()
    except ScorerUnavailable as e:
        unavailable[name] = str(e)
        return None
    timings[f"{name}_load"] = round(time.perf_counter() - t0, 4)
    available.append(name)
    return obj


def load_scorers(config: ScoringConfig, image_scores_given: bool = False) -> dict:
    """The configured scorers, loaded once: {"clip", "aesthetic", "social", "available", "unavailable",
    "timings"}. With ``image_scores_given`` no image-level scorer loads (their scores exist already)."""
    available: list[str] = []
    unavailable: dict[str, str] = {}
    timings: dict[str, float] = {}
    en = set(config.enabled)
    if image_scores_given:
        en -= {"clip", "aesthetic", "social_reward"}
    clip = (
        _load("clip", lambda: ClipEncoder(config.clip), available, unavailable, timings)
        if "clip" in en
        else None
    )
    aesthetic = social = None
    if "aesthetic" in en:
        aesthetic = _load(
            "aesthetic", lambda: AestheticScorer(config.aesthetic), available, unavailable, timings
        )
    if "social_reward" in en:
        social = _load(
            "social_reward",
            lambda: SocialRewardScorer(config.social_reward, base_weights=config.clip.pretrained),
            available,
            unavailable,
            timings,
        )
    if clip is None:  # heads over the stage's CLIP embeddings cannot run without it
        for name, obj in (("aesthetic", aesthetic), ("social_reward", social)):
            if obj is not None and (name == "aesthetic" or obj.needs_clip):
                available.remove(name)
                unavailable[name] = f"{name}: needs CLIP image embeddings, and clip is unavailable"
        aesthetic = None
        if social is not None and social.needs_clip:
            social = None
    return {"clip": clip, "aesthetic": aesthetic, "social": social, "available": available,
            "unavailable": unavailable, "timings": timings}


def score_candidates(
    images: Iterable[tuple[str, np.ndarray, str | None]],
    faces: pa.Table | None = None,
    config: ScoringConfig = ScoringConfig(),
    image_scores: pa.Table | None = None,
    scorers: dict | None = None,
):
    """``scorers``: what :func:`load_scorers` returned, to score many chunks without reloading."""
    loaded = scorers if scorers is not None else load_scorers(config, image_scores is not None)
    clip, aesthetic, social = loaded["clip"], loaded["aesthetic"], loaded["social"]
    available = list(loaded["available"])
    unavailable = dict(loaded["unavailable"])
    timings = dict(loaded["timings"])
    en = set(config.enabled)
    if image_scores is not None:  # image-level scores computed before (score_images): no image scorer loads
        for c in IMAGE_SCORE_COLUMNS:
            if image_scores.num_rows and image_scores.column(c).null_count < image_scores.num_rows:
                available.append("clip" if c == "clip_score" else c)

    img_rows: dict[str, dict] = {}
    order: list[str] = []
    t = {"clip": 0.0, "aesthetic": 0.0, "social_reward": 0.0}
    n_img = 0

    def drop(name, e):
        nonlocal aesthetic, social
        available.remove(name)
        unavailable[name] = str(e)
        if name == "aesthetic":
            aesthetic = None
        else:
            social = None

    def flush(batch):
        if not batch:
            return
        uids = [b[0] for b in batch]
        rgbs = [b[1] for b in batch]
        caps = [b[2] for b in batch]
        rows = {u: {} for u in uids}
        ie = te = None
        if clip is not None:
            t0 = time.perf_counter()
            ie = clip.encode_images(rgbs)
            has_cap = [i for i, c in enumerate(caps) if c]
            te = np.zeros_like(ie)
            if has_cap:
                te[has_cap] = clip.encode_texts([caps[i] for i in has_cap])
            cs = clip_scores(ie, te)
            for i in has_cap:
                rows[uids[i]]["clip_score"] = float(cs[i])
            t["clip"] += time.perf_counter() - t0
        if aesthetic is not None:
            t0 = time.perf_counter()
            try:
                for u, v in zip(uids, aesthetic.score(ie)):
                    rows[u]["aesthetic"] = float(v)
            except ScorerUnavailable as e:
                drop("aesthetic", e)
            t["aesthetic"] += time.perf_counter() - t0
        if social is not None:
            t0 = time.perf_counter()
            try:
                idx, vals = social.score(rgbs, caps, ie, te)
                for i, v in zip(idx, vals):
                    rows[uids[i]]["social_reward"] = float(v)
            except ScorerUnavailable as e:
                drop("social_reward", e)
            t["social_reward"] += time.perf_counter() - t0
        img_rows.update(rows)

    batch = []
    for uid, rgb, caption in images:
        n_img += 1
        if uid in img_rows or any(b[0] == uid for b in batch):
            continue  # one row per uid (content hash): a repeated image is scored once
        order.append(uid)
        batch.append((uid, rgb, caption))
        if len(batch) >= config.chunk:
            flush(batch)
            batch = []
    flush(batch)
    img = pa.Table.from_pylist([{"uid": u, **img_rows[u]} for u in order], schema=_IMAGE_ROWS_SCHEMA)
    if image_scores is not None:  # a uid keeps its first position and takes its last row's scores
        given = image_scores.select(["uid", *IMAGE_SCORE_COLUMNS]).cast(_IMAGE_ROWS_SCHEMA, safe=False)
        img = _last_row_per_uid(pa.concat_tables([img, given]))
    unique_images = img.num_rows
    for k, v in t.items():
        if k in available:
            timings[k] = round(v, 4)
            timings[f"{k}_images_per_s"] = round(unique_images / v, 2) if v > 0 else None

    # face-level scores, and the table, from columns
    parts = []
    if faces is not None and faces.num_rows:
        fq = idsim = None
        if "face_quality" in en:
            t0 = time.perf_counter()
            try:
                fq = face_quality_from_table(faces, config.quality)
                available.append("face_quality")
            except KeyError as e:
                unavailable["face_quality"] = f"face_quality: {e}"
            timings["face_quality"] = round(time.perf_counter() - t0, 4)
        if "identity_similarity" in en:
            if "embedding" in faces.column_names:
                t0 = time.perf_counter()
                idsim = _identity_similarity(faces)
                available.append("identity_similarity")
                timings["identity_similarity"] = round(time.perf_counter() - t0, 4)
            else:
                unavailable["identity_similarity"] = (
                    "identity_similarity: the faces table has no embedding column"
                )
        face_uids = faces.column("uid").combine_chunks().cast(pa.string())
        img_uids = img.column("uid").combine_chunks()
        of_image = img.take(pc.index_in(face_uids, value_set=img_uids))  # null where no image row
        parts.append({"uid": face_uids, "face_index": faces.column("face_index").cast(pa.int32()),
                      **{c: of_image.column(c) for c in IMAGE_SCORE_COLUMNS},
                      "face_quality": _finite_or_null(fq, faces.num_rows),
                      "identity_similarity": _finite_or_null(idsim, faces.num_rows)})
        img = img.filter(pc.invert(pc.is_in(img_uids, value_set=face_uids)))
    else:
        for name in ("face_quality", "identity_similarity"):
            if name in en:
                unavailable[name] = f"{name}: no faces table given"
    parts.append({"uid": img.column("uid"), "face_index": pa.nulls(img.num_rows, pa.int32()),
                  **{c: img.column(c) for c in IMAGE_SCORE_COLUMNS},
                  "face_quality": pa.nulls(img.num_rows, pa.float32()),
                  "identity_similarity": pa.nulls(img.num_rows, pa.float32())})
    cols = {c: _concat([p[c] for p in parts], SCORES_SCHEMA.field(c).type) for c in SCORES_SCHEMA.names[:-1]}
    table = pa.table({**cols, "scorers": _scorers_column([cols[c] for c in SCORE_COLUMNS])}, schema=SCORES_SCHEMA)
    report = {
        "available": available,
        "unavailable": unavailable,
        "timings_s": timings,
        "images": n_img,
        "unique_images": unique_images,
        "faces": 0 if faces is None else faces.num_rows,
        "device": str(pick_device(config.clip.device)),
    }
    return table, report


def combine_scores(table: pa.Table, weights: Mapping[str, float]) -> np.ndarray:
    """Per-row weighted mean of the non-null columns named in ``weights``; NaN where none is present."""
    n = table.num_rows
    num, den = np.zeros(n), np.zeros(n)
    for col, w in weights.items():
        if col not in table.column_names:
            raise KeyError(f"no score column {col!r}; have {table.column_names}")
        v = np.asarray(table[col].to_numpy(zero_copy_only=False), np.float64)
        ok = np.isfinite(v)
        num += np.where(ok, w * v, 0.0)
        den += np.where(ok, abs(w), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def rank_candidates(
    table: pa.Table, weights: Mapping[str, float], min_score: float | None = None, top_k: int | None = None
) -> pa.Table:
    """Rows sorted by combined score (descending, ties by uid/face_index), filtered and cut to top_k."""
    s = combine_scores(table, weights)
    t = table.append_column("combined_score", pa.array(s, pa.float64()))
    keep = np.isfinite(s) if min_score is None else np.isfinite(s) & (s >= min_score)
    t = t.filter(pa.array(keep))
    t = t.sort_by([("combined_score", "descending"), ("uid", "ascending"), ("face_index", "ascending")])
    return t.slice(0, top_k) if top_k is not None else t


# ------------------------------------------------------------------------------ one partition, any engine


class ImageScorerStage:
    """The image-level scorers, loaded once per process or Ray actor."""

    def __init__(self, config: ScoringConfig):
        self.config = config
        self.scorers = load_scorers(_image_config(config))


def decode_score_chunk(chunk):
    """The decoding half of a chunk: ``(uid, rgb, caption)`` of each row that still decodes."""
    from pipeline.ingest import decoded_images

    rows, limits = chunk
    captions = {r["uid"]: r.get("caption") for r in rows}
    return [(uid, rgb, captions.get(uid)) for uid, rgb in decoded_images(pa.Table.from_pylist(rows), limits)]


def score_decoded(stage: ImageScorerStage, items):
    return score_images(items, stage.config, scorers=stage.scorers)


def score_partition(images: pa.Table, stage: ImageScorerStage, limits=None, chunk_runner=None):
    """Image-level scores of one partition's images in chunks of ``config.chunk`` (the same chunks the
    in-process scorer batches); ``chunk_runner(chunks) -> [(table, report)] in order`` hands them to
    another engine (Ray). Returns ``(table, report)`` as :func:`score_images`."""
    rows = images.to_pylist()
    size = max(1, stage.config.chunk)
    chunks = [(rows[i : i + size], limits) for i in range(0, len(rows), size)]
    if chunk_runner is None:
        results = [score_decoded(stage, decode_score_chunk(c)) for c in chunks]
    else:
        results = chunk_runner(chunks)
    if not results:
        return score_decoded(stage, [])
    tables = [t for t, _ in results]
    if chunk_runner is not None:
        # another engine's workers may hold the weights elsewhere (Ray ships them): the fingerprint is the driver's
        fp = scorer_fingerprint(stage.config)
        tables = [t.set_column(t.schema.get_field_index("scorer_fingerprint"), "scorer_fingerprint",
                               pa.array([fp] * t.num_rows, pa.string())) for t in tables]
    report = dict(results[-1][1])
    report["images"] = sum(r.get("images", 0) for _, r in results)
    return pa.concat_tables(tables), report


def ray_score_runner(config: ScoringConfig, actors: int, gpus_per_actor: float | None = None):
    """A ``chunk_runner`` for :func:`score_partition` on Ray: the scorers loaded once per actor, weights shipped."""
    from pipeline.ray_engine import chunk_runner

    return chunk_runner("scores", decode_score_chunk, score_decoded, ImageScorerStage, (config,),
                        actors=actors, gpus_per_actor=gpus_per_actor)
