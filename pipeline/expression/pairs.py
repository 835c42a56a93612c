"""Cross-expression pairs (after EmojiDiff): same expression, different identity.

``build_expression_pairs(faces, descriptors, config)`` joins the face table (identity and
quality) with the expression descriptors on (uid, face_index) and keeps a pair (a, b) when
    * both faces are good: quality >= min_quality, top-class probability >= min_class_prob;
    * same expression: the same top class AND descriptor similarity >= min_expression_sim;
    * different identity: different identity_id (when both are known) AND identity cosine
      <= max_identity_cos (a labelling error or an unclustered duplicate is still caught by
      the embedding, and two photos of one person with one expression are rejected twice over);
    * similar head pose when configured: |yaw_a - yaw_b| <= max_yaw_diff, same for pitch (a pair
      whose faces carry no yaw/pitch passes and is counted in stats["pose_rule_skipped_no_pose"]);
    * not the same image unless allow_same_image.
Each face takes part in at most ``max_pairs_per_face`` pairs, chosen greedily by descending
expression similarity (ties broken by the faces' keys), so the output is deterministic.

Candidates come from a nearest-neighbour search, not from all pairs: within each expression class,
every face's ``neighbours`` nearest faces in expression space (sqrt class probabilities and scaled
landmark geometry) are the pairs examined; memory grows with faces x neighbours. A class of at most
``exact_max_class`` eligible faces is searched exactly (FAISS IndexFlatL2: time quadratic in the class);
a larger one with FAISS IndexIVFFlat (nlist = 4 sqrt(class size) cells trained on a seeded sample,
nprobe grown from 1 (x1.5) until the recall of the exact neighbours of 1,000 seeded sample faces reaches
``ivf_target_recall``; time ~ class^1.5). stats["neighbour_search"] records per class the method, and
for IVF nlist, nprobe and the recall measured on the output itself; ``ExpressionResult.search_seconds``
the time per class (kept out of stats, which go into the manifest, so that a rebuild is byte-identical).
A class smaller than ``neighbours`` + 1 is examined in full, so small collections
get exactly the all-pairs result. Pairs beyond both faces' neighbour lists are counted
(``not_examined_beyond_neighbours``): with at most ``max_pairs_per_face`` pairs per face, taken by
descending similarity, they only matter when the rules reject nearly all of a face's neighbours.
Every pair records both scores (expression_similarity, identity_cosine). Faces that cannot take
part are returned in ``face_rejects`` with a reason; ``stats`` counts candidate pairs rejected per rule.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.decode import encode_jpeg
from pipeline.expression.descriptor import GEOMETRY_SCALES, expression_similarity
from pipeline.expression.fer_model import EMOTIONS
from pipeline.faces.quality import QualityConfig
from pipeline.ids import stable_key


@dataclass(frozen=True)
class PairConfig:
    min_expression_sim: float = 0.75
    # Identity embeddings must be less similar than this. 0.5 suits ArcFace-style embeddings
    # (insightface: different people mostly < 0.3). dlib's 128-d descriptor, L2-normalised, is far
    # more compressed: on the 125 shared photos different people reach cosine p95 0.876 / max 0.915
    # and the same person stays >= 0.938 (p5), so with the dlib backend use ~0.85-0.9.
    max_identity_cos: float = 0.5
    min_quality: float = 0.5
    min_class_prob: float = 0.5  # top-class probability of both faces
    max_yaw_diff: float | None = 25.0  # degrees; None disables the pose rule
    max_pitch_diff: float | None = 20.0
    allow_same_image: bool = False
    max_pairs_per_face: int = 3
    classes: tuple[str, ...] | None = None  # restrict to these expressions (None: all seven)
    w_probs: float = 0.7  # weight of the class-probability term in the similarity
    neighbours: int = 64  # nearest faces in expression space examined per face (within its class)
    # classes of at most this many eligible faces get an exact neighbour search (quadratic in the class: 600-700
    # CPU-s for the 1M collection's classes of ~300k); larger ones an IVF search whose probe count grows until
    # the sampled recall of the exact neighbours reaches ivf_target_recall (so the pairs differ slightly from
    # the exact search's). None: always exact.
    exact_max_class: int | None = 50_000
    ivf_target_recall: float = 0.95
    quality: QualityConfig | None = None  # when faces has no quality column; None: the backend's defaults
    # shard reuse across versions: pair p goes to bucket hash(pair_id) % reuse_buckets, each bucket has its
    # own shards, and a new version hard-links the shards of every bucket whose pairs and crop inputs did
    # not change (only cropping and JPEG encoding are saved: the pairs are searched afresh). Fixed, so that
    # a pair keeps its bucket as the collection grows; changing it rebuilds every bucket.
    reuse_buckets: int = 64


PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("expression", pa.string()),
        ("uid_a", pa.string()),
        ("face_index_a", pa.int32()),
        ("identity_a", pa.string()),
        ("uid_b", pa.string()),
        ("face_index_b", pa.int32()),
        ("identity_b", pa.string()),
        ("expression_similarity", pa.float32()),
        ("identity_cosine", pa.float32()),
        ("class_prob_a", pa.float32()),
        ("class_prob_b", pa.float32()),
        ("quality_a", pa.float32()),
        ("quality_b", pa.float32()),
        ("yaw_diff", pa.float32()),
        ("pitch_diff", pa.float32()),
    ]
)
REJECT_SCHEMA = pa.schema([("uid", pa.string()), ("face_index", pa.int32()), ("reason", pa.string())])


@dataclass
class ExpressionResult:
    pairs: pa.Table
    face_rejects: pa.Table
    stats: dict = field(default_factory=dict)
    search_seconds: dict = field(default_factory=dict)  # neighbour search wall seconds per expression class


def _codes(*arrays) -> list[np.ndarray]:
    """Shared integer codes (equal values, equal codes; null: -1) of the values of several arrays."""
    import pyarrow.compute as pc

    chunks = []
    for a in arrays:
        chunks += a.chunks if isinstance(a, pa.ChunkedArray) else [a]
    if not chunks or pa.types.is_null(chunks[0].type):
        return [np.full(len(a), -1, np.int64) for a in arrays]
    enc = pa.concat_arrays([c.cast(chunks[0].type) for c in chunks]).dictionary_encode()
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    out, s = [], 0
    for a in arrays:
        out.append(codes[s : s + len(a)])
        s += len(a)
    return out


def _fixed(col, width: int | None = None) -> np.ndarray:
    """A list column as a float32 (N, width) array (null values: NaN)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.float32)
    return flat.reshape(n, -1 if n else (width or 0))


@dataclass
class _Eligible:
    """The faces that can take part, as arrays (row r of each is eligible face r, in faces' order)."""
    face_row: np.ndarray  # row in the faces table
    P: np.ndarray  # class probabilities (r, 7) float32
    G: np.ndarray  # geometry (r, g) float32, NaN where missing
    top: np.ndarray
    q: np.ndarray  # float64
    yaw: np.ndarray  # float64, NaN where missing
    pitch: np.ndarray
    ident: np.ndarray  # identity code, -1: unknown
    image: np.ndarray  # uid code
    key_rank: np.ndarray  # rank of (uid, face_index) among the eligible faces
    emb: np.ndarray  # the faces' raw embeddings (all faces: index with face_row)
    emb_norm: np.ndarray  # per eligible face


REJECT_REASONS = ("no_expression_descriptor", "low_quality", "uncertain_expression", "expression_not_selected")


def _join(faces: pa.Table, descriptors: pa.Table, config: PairConfig):
    """Eligible faces as arrays, and per face of ``faces`` a reject reason code (-1: eligible)."""
    import pyarrow.compute as pc

    from pipeline.faces.quality import face_quality_from_table

    n = faces.num_rows
    if "quality" in faces.column_names:
        quality = np.asarray(faces["quality"].to_numpy(zero_copy_only=False), np.float64)
    else:
        quality = face_quality_from_table(faces, config.quality).astype(np.float64)
    fu, du = _codes(faces["uid"], descriptors["uid"])
    fkey = (fu << 32) | (faces["face_index"].to_numpy(zero_copy_only=False).astype(np.int64) & 0xFFFFFFFF)
    dkey = (du << 32) | (descriptors["face_index"].to_numpy(zero_copy_only=False).astype(np.int64) & 0xFFFFFFFF)
    # the descriptor of a face: the last row with its key (as a dict built over the rows)
    order = np.argsort(dkey, kind="stable")
    sk = dkey[order]
    last = np.ones(len(sk), bool)
    last[:-1] = sk[1:] != sk[:-1]
    uk, uj = sk[last], order[last]
    pos = np.minimum(np.searchsorted(uk, fkey), max(0, len(uk) - 1))
    found = (uk[pos] == fkey) if len(uk) else np.zeros(n, bool)
    j = np.where(found, uj[pos] if len(uk) else 0, -1)
    P_all = _fixed(descriptors["probs"], len(EMOTIONS))
    jj = np.maximum(j, 0)
    Pf = P_all[jj] if len(P_all) else np.zeros((n, len(EMOTIONS)), np.float32)
    top = Pf.argmax(1) if n else np.zeros(0, np.int64)
    ptop = Pf[np.arange(n), top] if n else np.zeros(0, np.float32)
    reason = np.full(n, -1, np.int8)
    reason[~found] = 0
    low_q = ~np.isfinite(quality) | (quality < config.min_quality)
    reason[(reason < 0) & low_q] = 1
    reason[(reason < 0) & (ptop < config.min_class_prob)] = 2
    if config.classes is not None:
        selected = np.array([e in config.classes for e in EMOTIONS])
        reason[(reason < 0) & ~selected[top]] = 3
    el = np.nonzero(reason < 0)[0]
    G_all = _fixed(descriptors["geometry"])
    emb = _fixed(faces["embedding"])  # as embeddings_of, for fixed-size and plain lists
    emb_norm = np.zeros(len(el), np.float32)
    for s in range(0, len(el), 65536):  # per row, as np.linalg.norm over all rows would give
        emb_norm[s : s + 65536] = np.linalg.norm(emb[el[s : s + 65536]], axis=1)

    def num(name):
        if name not in faces.column_names:
            return np.full(len(el), np.nan)
        return np.asarray(faces[name].to_numpy(zero_copy_only=False), np.float64)[el]

    ident = (_codes(faces["identity_id"])[0][el] if "identity_id" in faces.column_names
             else np.full(len(el), -1, np.int64))
    keys = pa.table({"u": faces["uid"].take(pa.array(el)), "f": faces["face_index"].take(pa.array(el))})
    key_rank = np.empty(len(el), np.int32)
    key_rank[pc.sort_indices(keys, [("u", "ascending"), ("f", "ascending")]).to_numpy()] = np.arange(len(el), dtype=np.int32)
    G = G_all[j[el]] if len(el) else np.zeros((0, G_all.shape[1] if G_all.ndim == 2 else 0), np.float32)
    elig = _Eligible(face_row=el, P=Pf[el], G=G, top=top[el], q=quality[el], yaw=num("yaw"), pitch=num("pitch"),
                     ident=ident, image=fu[el], key_rank=key_rank, emb=emb, emb_norm=emb_norm)
    return elig, reason


PAIR_BLOCK = 8192  # faces whose candidate pairs (about PAIR_BLOCK x neighbours) are scored at once
SCORE_CHUNK = 65536  # candidate pairs whose identity cosines are computed at once (2 x SCORE_CHUNK embeddings)


def _class_neighbours(X: np.ndarray, k: int) -> np.ndarray:
    """Each row's k + 1 nearest rows of X (exact L2, FAISS), as int32.

    One search over all the class's rows: searching in blocks of queries changes a few neighbour lists
    (distances computed by BLAS over a different matrix shape; ties at the k-th neighbour), so the transient
    distances and ids (12 bytes x (k + 1) per face of the class) are the price of identical results."""
    import faiss

    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    _, ids = index.search(X, k + 1)
    return ids.astype(np.int32)


IVF_RECALL_QUERIES = 1000  # sampled faces of a class whose exact neighbours measure the IVF search's recall
IVF_SEED = 0
# nprobe grows by this factor (1, 2, 3, 4, 6, 9, 14, 21, 32, 48, 72, ...): a doubling overshoots the recall target by up
# to 2x the search time (at 100k faces 32 probes gave 0.947, 64 gave 0.992), a calibration step costs 1,000 queries
IVF_NPROBE_GROWTH = 1.5


def neighbour_recall(X: np.ndarray, queries: np.ndarray, exact: np.ndarray, approx: np.ndarray) -> float:
    """Recall of the exact neighbours of rows ``queries`` of X, the row itself left out, counting ties as
    found: a query's hits are min(k, approximate neighbours (other than itself) at a distance within the
    k-th exact neighbour's). ``exact``, ``approx``: (len(queries), k + 1) row ids (approx: -1 where none).
    Distances are recomputed here in float64, so the two searches' own rounding does not matter."""
    Q = X[queries].astype(np.float64)

    def dist(ids):
        V = X[np.maximum(ids, 0).ravel()].astype(np.float64).reshape(*ids.shape, -1)
        return ((V - Q[:, None, :]) ** 2).sum(2)

    k = exact.shape[1] - 1
    if k < 1 or len(queries) == 0:
        return 1.0
    d_exact = np.where(exact == queries[:, None], np.inf, dist(exact))  # the row itself left out
    tau = np.sort(d_exact, 1)[:, k - 1]  # the k-th exact neighbour's distance
    d_approx = dist(approx)
    found = (approx >= 0) & (approx != queries[:, None]) & (d_approx <= tau[:, None] * (1 + 1e-6) + 1e-12)
    return float(np.minimum(k, found.sum(1)).sum() / (k * len(queries)))


def _class_neighbours_ivf(X: np.ndarray, k: int, target_recall: float,
                          seed: int = IVF_SEED) -> tuple[np.ndarray, dict, dict]:
    """Each row's k + 1 nearest rows of X, approximately (FAISS IndexIVFFlat, L2), as int32 (-1 where the
    probed cells held fewer than k + 1 rows), what was done (nlist, nprobe, the measured recall) and its times.

    nlist = round(4 sqrt(rows)) cells trained on a seeded sample (identity.knn.ivf_params, as its faiss-ivf
    backend); nprobe grows from 1 (x IVF_NPROBE_GROWTH) until the recall (``neighbour_recall``) of the exact
    neighbours of IVF_RECALL_QUERIES seeded sample rows reaches ``target_recall`` (or every cell is probed: exact). The
    recall reported is measured again on the full search's lists of those rows, i.e. on the output.
    Deterministic: seeded sample and k-means; each query is searched on its own (one call over all rows,
    as the exact search), so the thread count does not change the lists."""
    import faiss

    from pipeline.identity.knn import ivf_params

    m, d = X.shape
    p = ivf_params(m)
    nlist = p["nlist"]
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    train = np.sort(rng.choice(m, size=p["train_size"], replace=False))
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist)
    index.cp.seed = seed
    index.train(np.ascontiguousarray(X[train]))
    index.add(X)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    q = np.sort(rng.choice(m, size=min(IVF_RECALL_QUERIES, m), replace=False))
    Xq = np.ascontiguousarray(X[q])
    flat = faiss.IndexFlatL2(d)
    flat.add(X)
    _, exact = flat.search(Xq, k + 1)
    del flat
    nprobe, tried = 1, []
    while True:
        index.nprobe = nprobe
        _, approx = index.search(Xq, k + 1)
        tried.append([nprobe, round(neighbour_recall(X, q, exact, approx), 4)])
        if tried[-1][1] >= target_recall or nprobe >= nlist:
            break
        nprobe = min(nlist, max(nprobe + 1, round(nprobe * IVF_NPROBE_GROWTH)))
    calib_s = time.perf_counter() - t
    t = time.perf_counter()
    _, ids = index.search(X, k + 1)
    search_s = time.perf_counter() - t
    recall = neighbour_recall(X, q, exact, ids[q])
    info = {"method": "ivf", "rows": m, "nlist": nlist, "nprobe": nprobe, "recall": round(recall, 4),
            "recall_queries": len(q), "target_recall": target_recall, "nprobe_tried": tried,
            "train_size": len(train)}
    times = {"train_s": round(train_s, 3), "calibrate_s": round(calib_s, 3), "search_s": round(search_s, 3)}
    return ids.astype(np.int32), info, times


def _neighbour_pair_blocks(P: np.ndarray, G: np.ndarray, top: np.ndarray, config: PairConfig, stats: dict,
                           search: dict, seconds: dict):
    """Unordered pairs (i < j) of the same class where one is among the other's ``neighbours`` nearest
    in expression space, yielded in blocks (ascending by class, then i, then j) of about PAIR_BLOCK x
    neighbours pairs; the pairs of a class left out are counted in ``stats``, the search of each class
    (method, IVF parameters, recall) recorded in ``search``, its times in ``seconds``."""
    geo = np.nan_to_num(G / GEOMETRY_SCALES, nan=0.0)
    X = np.hstack([np.sqrt(np.clip(P, 0, None)) * np.sqrt(config.w_probs),
                   geo * np.sqrt((1 - config.w_probs) / (2 * geo.shape[1]))]).astype(np.float32)
    del geo
    for c in np.unique(top):
        idx = np.nonzero(top == c)[0]
        m = len(idx)
        if m < 2:
            continue
        k = min(m - 1, max(1, config.neighbours))
        t = time.perf_counter()
        if config.exact_max_class is None or m <= config.exact_max_class:
            nn = _class_neighbours(np.ascontiguousarray(X[idx]), k)
            search[EMOTIONS[c]] = {"method": "exact", "rows": m}
            seconds[EMOTIONS[c]] = {"search_s": round(time.perf_counter() - t, 3)}
        else:
            nn, search[EMOTIONS[c]], seconds[EMOTIONS[c]] = _class_neighbours_ivf(
                np.ascontiguousarray(X[idx]), k, config.ivf_target_recall)
        examined = 0
        for s in range(0, m, PAIR_BLOCK):
            e = min(m, s + PAIR_BLOCK)
            # pairs whose smaller member is in [s, e): found from it (nn[a] > a) or from the larger (nn[r] == a < r)
            a = np.repeat(np.arange(s, e, dtype=np.int64), k + 1)
            b = nn[s:e].reshape(-1).astype(np.int64)
            f = b > a
            lo1, hi1 = a[f], b[f]
            rest = nn[s + 1 :]
            r, col = np.nonzero((rest >= s) & (rest < e))
            v = rest[r, col].astype(np.int64)
            r = r.astype(np.int64) + s + 1
            f = v < r
            keys = np.unique(np.concatenate([lo1 * m + hi1, v[f] * m + r[f]]))
            examined += len(keys)
            if len(keys):
                yield idx[keys // m], idx[keys % m]
        stats["not_examined_beyond_neighbours"] += m * (m - 1) // 2 - examined


def _identity_cos(el: _Eligible, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Cosine of the identity embeddings of eligible faces ia[t], ib[t] (float32), SCORE_CHUNK pairs at a time."""
    out = np.empty(len(ia), np.float32)
    for s in range(0, len(ia), SCORE_CHUNK):
        a, b = ia[s : s + SCORE_CHUNK], ib[s : s + SCORE_CHUNK]
        Ea = el.emb[el.face_row[a]] / np.maximum(el.emb_norm[a], 1e-12)[:, None]
        Eb = el.emb[el.face_row[b]] / np.maximum(el.emb_norm[b], 1e-12)[:, None]
        out[s : s + SCORE_CHUNK] = (Ea * Eb).sum(1)
    return out


def build_expression_pairs(
    faces: pa.Table, descriptors: pa.Table, config: PairConfig = PairConfig()
) -> ExpressionResult:
    """faces: uid, face_index, identity_id, embedding, and quality (or face_width/height, blur,
    yaw, pitch, det_score); descriptors: uid, face_index, probs, geometry (describe_images' table).

    Memory: the eligible faces' descriptors, the neighbour lists of one class ((neighbours + 1) int32 per
    face), one block of candidate pairs, and (sim, a, b) for every pair that passes the rules (before the
    per-face cap); no Python object per pair until the output rows."""
    import pyarrow.compute as pc

    if config.exact_max_class is not None and config.exact_max_class < 0:
        raise ValueError(f"PairConfig.exact_max_class must be >= 0 or None, got {config.exact_max_class}")
    if not 0.0 < config.ivf_target_recall <= 1.0:
        raise ValueError(f"PairConfig.ivf_target_recall must be in (0, 1], got {config.ivf_target_recall}")
    el, reason = _join(faces, descriptors, config)
    n = len(el.face_row)
    n_rej = int((reason >= 0).sum())
    stats = {
        "faces": faces.num_rows,
        "faces_eligible": n,
        "faces_rejected": n_rej,
        "candidate_pairs": 0,
        "rejected_different_expression_class": 0,
        "rejected_low_expression_similarity": 0,
        "rejected_same_identity_id": 0,
        "rejected_identity_too_similar": 0,
        "rejected_pose": 0,
        "pose_rule_skipped_no_pose": 0,
        "rejected_same_image": 0,
        "accepted_before_cap": 0,
    }
    stats["not_examined_beyond_neighbours"] = 0
    search, seconds = {}, {}
    acc_sim, acc_a, acc_b = [], [], []
    if n >= 2:
        stats["candidate_pairs"] = n * (n - 1) // 2
        class_sizes = np.bincount(el.top, minlength=len(EMOTIONS))
        stats["rejected_different_expression_class"] = int(stats["candidate_pairs"] - (class_sizes * (class_sizes - 1) // 2).sum())
        for ia, ib in _neighbour_pair_blocks(el.P, el.G, el.top, config, stats, search, seconds):
            sim = expression_similarity(el.P[ia], el.G[ia], el.P[ib], el.G[ib], w_probs=config.w_probs,
                                        scales=GEOMETRY_SCALES)
            # the rules in the order of the module docstring; each pair is counted under the first that fails
            alive = np.ones(len(ia), bool)

            def reject(mask, name):
                nonlocal alive
                hit = alive & mask
                stats[name] += int(hit.sum())
                alive &= ~hit

            reject(sim < config.min_expression_sim, "rejected_low_expression_similarity")
            reject((el.ident[ia] >= 0) & (el.ident[ia] == el.ident[ib]), "rejected_same_identity_id")
            live = np.nonzero(alive)[0]
            idcos = np.zeros(len(ia), np.float32)
            idcos[live] = _identity_cos(el, ia[live], ib[live])
            reject(idcos > config.max_identity_cos, "rejected_identity_too_similar")
            dyaw, dpitch = np.abs(el.yaw[ia] - el.yaw[ib]), np.abs(el.pitch[ia] - el.pitch[ib])
            pose_bad = np.zeros(len(ia), bool)
            no_pose = np.zeros(len(ia), bool)
            if config.max_yaw_diff is not None:
                pose_bad |= dyaw > config.max_yaw_diff
                no_pose |= ~np.isfinite(dyaw)
            if config.max_pitch_diff is not None:
                pose_bad |= dpitch > config.max_pitch_diff
                no_pose |= ~np.isfinite(dpitch)
            reject(pose_bad, "rejected_pose")
            stats["pose_rule_skipped_no_pose"] += int((alive & no_pose).sum())  # counted, not rejected
            if not config.allow_same_image:
                reject(el.image[ia] == el.image[ib], "rejected_same_image")
            keep = np.nonzero(alive)[0]
            acc_sim.append(sim[keep])
            acc_a.append(ia[keep].astype(np.int32))
            acc_b.append(ib[keep].astype(np.int32))
    sim = np.concatenate(acc_sim) if acc_sim else np.zeros(0, np.float32)
    ia = np.concatenate(acc_a) if acc_a else np.zeros(0, np.int32)
    ib = np.concatenate(acc_b) if acc_b else np.zeros(0, np.int32)
    del acc_sim, acc_a, acc_b
    stats["accepted_before_cap"] = len(sim)
    # greedily by descending similarity, ties broken by the faces' keys (deterministic); each face in at most
    # max_pairs_per_face pairs: a pair is taken when both faces still have room
    ra, rb = el.key_rank[ia], el.key_rank[ib]
    order = np.lexsort((np.maximum(ra, rb), np.minimum(ra, rb), -sim))
    del ra, rb
    cap = config.max_pairs_per_face
    used = [0] * n
    taken = []
    for s in range(0, len(order), 1 << 20):
        o = order[s : s + (1 << 20)]
        for t, x, y in zip(o.tolist(), ia[o].tolist(), ib[o].tolist()):
            if used[x] < cap and used[y] < cap:
                used[x] += 1
                used[y] += 1
                taken.append(t)
    del used, order
    t = np.asarray(taken, np.int64)
    a, b, s_out = ia[t].astype(np.int64), ib[t].astype(np.int64), sim[t]
    del ia, ib, sim
    swap = el.key_rank[a] > el.key_rank[b]  # a: the face with the smaller key
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    idcos = _identity_cos(el, a, b)
    dyaw, dpitch = np.abs(el.yaw[a] - el.yaw[b]), np.abs(el.pitch[a] - el.pitch[b])
    fa, fb = pa.array(el.face_row[a]), pa.array(el.face_row[b])
    uid_a, uid_b = faces["uid"].take(fa), faces["uid"].take(fb)
    fi_a, fi_b = faces["face_index"].take(fa), faces["face_index"].take(fb)
    pair_id = [stable_key("expr-pair", ua, xa, ub, xb)
               for ua, xa, ub, xb in zip(uid_a.to_pylist(), fi_a.to_pylist(), uid_b.to_pylist(), fi_b.to_pylist())]

    def ident_of(rows):
        if "identity_id" not in faces.column_names:
            return pa.nulls(len(rows), pa.string())
        return pa.array([None if v is None else str(v) for v in faces["identity_id"].take(rows).to_pylist()], pa.string())

    def f32_or_null(x):
        return pa.array(x.astype(np.float32), pa.float32(), mask=~np.isfinite(x))

    emo = np.array(EMOTIONS, dtype=object)
    cols = {
        "pair_id": pa.array(pair_id, pa.string()),
        "expression": pa.array(emo[el.top[a]].tolist() if len(a) else [], pa.string()),
        "uid_a": uid_a, "face_index_a": fi_a, "identity_a": ident_of(fa),
        "uid_b": uid_b, "face_index_b": fi_b, "identity_b": ident_of(fb),
        "expression_similarity": pa.array(s_out, pa.float32()),
        "identity_cosine": pa.array(idcos, pa.float32()),
        "class_prob_a": pa.array(el.P[a, el.top[a]], pa.float32()),
        "class_prob_b": pa.array(el.P[b, el.top[b]], pa.float32()),
        "quality_a": pa.array(el.q[a].astype(np.float32), pa.float32()),
        "quality_b": pa.array(el.q[b].astype(np.float32), pa.float32()),
        "yaw_diff": f32_or_null(dyaw),
        "pitch_diff": f32_or_null(dpitch),
    }
    table = pa.table({f.name: cols[f.name].cast(f.type) for f in PAIR_SCHEMA}, schema=PAIR_SCHEMA)
    table = table.take(pc.sort_indices(table, [("pair_id", "ascending")])).combine_chunks()
    stats["pairs"] = table.num_rows
    stats["dropped_by_per_face_cap"] = stats["accepted_before_cap"] - table.num_rows
    per = np.bincount(el.top[a], minlength=len(EMOTIONS))
    stats["pairs_per_expression"] = {e: int(per[i]) for i, e in enumerate(EMOTIONS) if per[i]}
    rrows = np.nonzero(reason >= 0)[0]
    rr = pa.array(rrows)
    rcodes = reason[rrows]
    rej = pa.table(
        {
            "uid": faces["uid"].take(rr).combine_chunks().cast(pa.string()) if len(rrows) else pa.array([], pa.string()),
            "face_index": faces["face_index"].take(rr).combine_chunks().cast(pa.int32()) if len(rrows) else pa.array([], pa.int32()),
            "reason": pa.array(np.array(REJECT_REASONS, dtype=object)[rcodes].tolist() if len(rrows) else [], pa.string()),
        },
        schema=REJECT_SCHEMA,
    )
    counts = np.bincount(rcodes, minlength=len(REJECT_REASONS))
    stats["face_reject_reasons"] = {r: int(counts[i]) for r, i in sorted((r, i) for i, r in enumerate(REJECT_REASONS)) if counts[i]}
    stats["neighbour_search"] = search
    return ExpressionResult(table, rej, stats, seconds)


# ---- outputs -------------------------------------------------------------------------------------

CropFn = Callable[[str, int], np.ndarray]  # (uid, face_index) -> RGB uint8 face crop (or whole image)


SKIPPED_PAIRS = "skipped_pairs.parquet"  # per version: pairs left out because a photo could not be read again
SKIPPED_SCHEMA = pa.schema([("pair_id", pa.string()), ("uid", pa.string()), ("face_index", pa.int32()),
                            ("reason", pa.string()), ("detail", pa.string())])


def pair_samples(pairs: pa.Table, crop: CropFn, extra: Mapping | None = None, previous=None,
                 unchanged: set | None = None, counts: dict | None = None, skipped: list | None = None):
    """WebDataset samples: <key>.a.jpg, <key>.b.jpg and <key>.json (labels, scores, uids).

    ``previous`` (a :class:`pipeline.shards.PreviousMembers`) and ``unchanged`` (pair ids whose row and
    crop inputs equal the previous version's): those pairs' crops are copied from the previous tars
    instead of decoded and cut again (the same bytes: crops are encoded deterministically).
    ``counts`` gets ``pairs_copied`` / ``pairs_cropped`` / ``pairs_skipped``.

    A pair whose crop cannot be cut (``crop`` raises OSError or DecodeError: the photo was edited in place,
    replaced or removed since ingestion) yields no sample; with ``skipped`` (a list) it gets a row there
    (SKIPPED_SCHEMA, the face that failed and why) and the run goes on, as the multi-identity builder
    skips such a photo. Without ``skipped`` the error is raised."""
    from pipeline.decode import DecodeError

    unchanged = unchanged or set()
    for r in pairs.to_pylist():
        meta = dict(r)
        meta["task"] = "cross_expression"
        if extra:
            meta.update(extra)
        key = r["pair_id"]
        names = (f"{key}.a.jpg", f"{key}.b.jpg")
        if key in unchanged and previous is not None and all(n in previous for n in names):
            a, b = (previous.read(n) for n in names)
            how = "pairs_copied"
        else:
            side = "a"
            try:
                a = encode_jpeg(crop(r["uid_a"], r["face_index_a"]))
                side = "b"
                b = encode_jpeg(crop(r["uid_b"], r["face_index_b"]))
            except (OSError, DecodeError) as e:
                if skipped is None:
                    raise
                skipped.append({"pair_id": key, "uid": r[f"uid_{side}"], "face_index": int(r[f"face_index_{side}"]),
                                "reason": getattr(e, "reason", None) or "photo unreadable",
                                "detail": f"{type(e).__name__}: {e}"})
                how = "pairs_skipped"
            else:
                how = "pairs_cropped"
        if counts is not None:
            counts[how] = counts.get(how, 0) + 1
        if how != "pairs_skipped":
            yield {"__key__": key, "a.jpg": a, "b.jpg": b, "json": meta}


SHARD_PREFIX = "expression-pairs"
PAIR_FINGERPRINTS = "pair_fingerprints.parquet"  # per pair of a version: what decided its sample (reuse, not data)


def pair_bucket(pair_id: str, n: int) -> int:
    """The bucket of a pair: a hash of its id modulo the fixed ``reuse_buckets``."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"expr-bucket\x1f{pair_id}".encode()).digest()[:8], "big") % n


def write_expression_dataset(
    pairs: pa.Table,
    crop: CropFn,
    out_dir: Path,
    config: PairConfig | Mapping,
    stats: Mapping | None = None,
    max_count: int = 10_000,
    version: str | None = None,
    crop_inputs: Callable[[str, int], object] | None = None,
    reuse_from: Path | None = None,
    report: dict | None = None,
) -> Path:
    """Shards ``expression-pairs-b<bucket>-NNNNNN.tar`` (one set per bucket of pairs) + manifest.json
    (recording the dataset ``version`` id), pairs.parquet and buckets.json in out_dir (one version).

    ``crop_inputs(uid, face_index)``: a JSON-able value that decides the crop ``crop`` returns (the image
    uid, the face box, decoding limits); with it every bucket gets a fingerprint (its pair rows, both
    faces' crop inputs, the config, the builder), and with ``reuse_from`` (a previous version's local
    folder) a bucket whose fingerprint is recorded there, and whose shard files still match their recorded
    sha256, is hard-linked instead of cropped again. Returns the manifest path; ``report`` (a dict) is
    filled with what was reused (``buckets_reused``, ``buckets_rebuilt``, ``bytes_reused``,
    ``buckets_not_reused_corrupt``), which is not written into the version."""
    import hashlib

    from pipeline import __version__
    from pipeline.expression.release import BUILDER_VERSION
    from pipeline.shards import (
        BUCKETS_FILE,
        PreviousMembers,
        ShardInfo,
        link_or_copy,
        previous_buckets,
        shard_record,
        shards_intact,
        write_manifest,
        write_shards,
    )
    from pipeline.storage import write_bytes_atomic, write_parquet_atomic

    cfg = asdict(config) if isinstance(config, PairConfig) else dict(config)
    n_buckets = int(cfg.get("reuse_buckets", 1) or 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # rows of each bucket (indices into pairs, in table order): one bucket's rows become Python objects at a time
    bucket_of = np.fromiter((pair_bucket(p, n_buckets) for p in pairs.column("pair_id").to_pylist()), np.int64,
                            count=pairs.num_rows)
    order = np.argsort(bucket_of, kind="stable")
    bounds = np.flatnonzero(np.diff(bucket_of[order])) + 1
    by_bucket = {int(bucket_of[g[0]]): g for g in np.split(order, bounds) if len(g)}
    common = json.dumps({"builder": BUILDER_VERSION, "library": __version__, "config": cfg, "max_count": max_count},
                        sort_keys=True, default=str)
    previous = previous_buckets(reuse_from, ("pairs.parquet",)) if crop_inputs is not None else {}
    # per pair: the fingerprint of what decides its sample (row, both crops' inputs, config, builder), so that
    # a bucket that changed copies the crops of its unchanged pairs instead of cutting them again
    prev_pair_fp: dict[str, str] = {}
    if previous and (Path(reuse_from) / PAIR_FINGERPRINTS).is_file():
        from pipeline.storage import read_parquet

        try:
            t = read_parquet(Path(reuse_from) / PAIR_FINGERPRINTS)
            prev_pair_fp = dict(zip(t.column("pair_id").to_pylist(), t.column("fingerprint").to_pylist()))
        except (OSError, KeyError, ValueError, pa.ArrowException):
            prev_pair_fp = {}  # unreadable: nothing reused per pair, every changed bucket is cropped again
    shards: list = []
    records = {}
    fp_ids: list[str] = []
    fp_values: list[str] = []
    reuse = {"buckets_reused": 0, "buckets_rebuilt": 0, "bytes_reused": 0, "buckets_not_reused_corrupt": [],
             "pairs_copied": 0, "pairs_cropped": 0, "pairs_skipped": 0}
    skipped: list[dict] = []  # pairs whose photo could not be read again: left out, with the reason
    for b, bidx in sorted(by_bucket.items()):
        name = f"b{b:04d}"
        btable = pairs.take(pa.array(bidx))
        brows = btable.to_pylist()
        fp = None
        unchanged: set[str] = set()
        before = len(skipped)
        if crop_inputs is not None:
            h = hashlib.sha256(common.encode())
            for r in sorted(brows, key=lambda r: r["pair_id"]):
                row_fp = hashlib.sha256(common.encode() + json.dumps(
                    [r, crop_inputs(r["uid_a"], r["face_index_a"]), crop_inputs(r["uid_b"], r["face_index_b"])],
                    sort_keys=True, default=str).encode()).hexdigest()[:32]
                h.update(row_fp.encode())
                fp_ids.append(r["pair_id"])
                fp_values.append(row_fp)
                if prev_pair_fp.get(r["pair_id"]) == row_fp:
                    unchanged.add(r["pair_id"])
            fp = h.hexdigest()[:32]
        rec = previous.get(name)
        problems = shards_intact(reuse_from, rec["shards"]) if rec is not None and fp is not None and rec.get("fingerprint") == fp else None
        if problems == []:
            infos = [ShardInfo(**sh) for sh in rec["shards"]]
            for sh in infos:
                link_or_copy(Path(reuse_from) / sh.name, out_dir / sh.name)
                reuse["bytes_reused"] += sh.bytes
            reuse["buckets_reused"] += 1
        else:
            reuse["buckets_not_reused_corrupt"] += [f"{name}: {p}" for p in problems or []]
            members = PreviousMembers(reuse_from, rec["shards"]) if rec is not None and unchanged else None
            infos = write_shards(pair_samples(btable, crop, previous=members, unchanged=unchanged, counts=reuse,
                                              skipped=skipped), out_dir, f"{SHARD_PREFIX}-{name}", max_count=max_count)
            if len(skipped) > before:  # not what the fingerprint promises: never reused, cropped again next time
                fp = None
            if members is not None:
                reuse["bytes_reused"] += members.bytes_read
                reuse["buckets_not_reused_corrupt"] += [f"{name}: {p}" for p in members.damaged if f"{name}: {p}" not in
                                                        reuse["buckets_not_reused_corrupt"]]
            reuse["buckets_rebuilt"] += 1
        shards += infos
        records[name] = {"fingerprint": fp, "pairs": len(brows) - (len(skipped) - before),
                         "shards": [shard_record(i) for i in infos]}
    if skipped:
        gone = {r["pair_id"] for r in skipped}
        pairs = pairs.filter(pa.array([p not in gone for p in pairs.column("pair_id").to_pylist()], pa.bool_()))
        keep = [i for i, p in enumerate(fp_ids) if p not in gone]
        fp_ids, fp_values = [fp_ids[i] for i in keep], [fp_values[i] for i in keep]
    # the pairs table holds exactly the samples in the tars; the skipped ones are listed beside it
    write_parquet_atomic(pairs, out_dir / "pairs.parquet")
    write_parquet_atomic(pa.Table.from_pylist(sorted(skipped, key=lambda r: r["pair_id"]), schema=SKIPPED_SCHEMA),
                         out_dir / SKIPPED_PAIRS)
    if crop_inputs is not None:
        o = np.argsort(np.array(fp_ids, dtype=object), kind="stable") if fp_ids else np.zeros(0, np.int64)
        write_parquet_atomic(pa.table({"pair_id": pa.array([fp_ids[i] for i in o], pa.string()),
                                       "fingerprint": pa.array([fp_values[i] for i in o], pa.string())}),
                             out_dir / PAIR_FINGERPRINTS)
    write_bytes_atomic(json.dumps({"bucket_count": n_buckets, "buckets": records}, sort_keys=True, indent=1).encode(),
                       out_dir / BUCKETS_FILE)
    if report is not None:
        report.update(reuse, skipped_reasons=_count_reasons(skipped))
    written_stats = {**dict(stats or {}), "pairs_skipped_photo_unreadable": len(skipped)}
    return write_manifest(out_dir, "expression_pairs", shards, cfg, extra={"stats": written_stats}, version=version)


def _count_reasons(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return dict(sorted(out.items()))


def contact_sheet(
    pairs: pa.Table, crop: CropFn, max_pairs: int = 24, tile: int = 128, columns: int = 2
) -> bytes:
    """PNG bytes: each pair side by side with its expression label and both scores underneath."""
    from PIL import Image, ImageDraw

    rows = pairs.to_pylist()[:max_pairs]
    pad, text_h = 6, 28
    cell_w, cell_h = 2 * tile + pad, tile + text_h
    ncols = max(1, min(columns, len(rows) or 1))
    nrows = max(1, (len(rows) + ncols - 1) // ncols)
    sheet = Image.new("RGB", (ncols * (cell_w + pad) + pad, nrows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((pad, pad), "no pairs", fill="black")
    for i, r in enumerate(rows):
        x0 = pad + (i % ncols) * (cell_w + pad)
        y0 = pad + (i // ncols) * (cell_h + pad)
        for j, side in enumerate("ab"):
            im = Image.fromarray(
                np.asarray(crop(r[f"uid_{side}"], r[f"face_index_{side}"]), np.uint8)
            ).convert("RGB")
            im.thumbnail((tile, tile))
            sheet.paste(im, (x0 + j * (tile + pad), y0))
        draw.text(
            (x0, y0 + tile + 2),
            f"{r['expression']}  expr_sim={r['expression_similarity']:.2f}  id_cos={r['identity_cosine']:.2f}",
            fill="black",
        )
        draw.text(
            (x0, y0 + tile + 14),
            f"{(r['identity_a'] or '?')[:16]} | {(r['identity_b'] or '?')[:16]}",
            fill=(90, 90, 90),
        )
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def pairs_summary_json(result: ExpressionResult) -> str:
    return json.dumps(result.stats, sort_keys=True)
