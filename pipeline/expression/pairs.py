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
landmark geometry, exact search with FAISS) are the pairs examined; memory and time grow with
faces x neighbours. A class smaller than ``neighbours`` + 1 is examined in full, so small collections
get exactly the all-pairs result. Pairs beyond both faces' neighbour lists are counted
(``not_examined_beyond_neighbours``): with at most ``max_pairs_per_face`` pairs per face, taken by
descending similarity, they only matter when the rules reject nearly all of a face's neighbours.
Every pair records both scores (expression_similarity, identity_cosine). Faces that cannot take
part are returned in ``face_rejects`` with a reason; ``stats`` counts candidate pairs rejected per rule.
"""

from __future__ import annotations

import io
import json
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


def _col(t: pa.Table, name: str, default=None):
    return t[name].to_pylist() if name in t.column_names else default


def _join(faces: pa.Table, descriptors: pa.Table, config: PairConfig):
    from pipeline.faces.quality import face_quality_from_table

    fkeys = list(zip(faces["uid"].to_pylist(), faces["face_index"].to_pylist()))
    if "quality" in faces.column_names:
        quality = np.asarray(faces["quality"].to_numpy(zero_copy_only=False), np.float64)
    else:
        quality = face_quality_from_table(faces, config.quality).astype(np.float64)
    emb = np.asarray(faces["embedding"].to_pylist(), np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    ident = _col(faces, "identity_id", [None] * len(fkeys))
    yaw = np.asarray(_col(faces, "yaw", [np.nan] * len(fkeys)), np.float64)
    pitch = np.asarray(_col(faces, "pitch", [np.nan] * len(fkeys)), np.float64)
    dindex = {
        k: i for i, k in enumerate(zip(descriptors["uid"].to_pylist(), descriptors["face_index"].to_pylist()))
    }
    probs = descriptors["probs"].to_pylist()
    geo = descriptors["geometry"].to_pylist()
    rows, rejects = [], []
    for i, k in enumerate(fkeys):
        j = dindex.get(k)
        if j is None:
            rejects.append((k[0], k[1], "no_expression_descriptor"))
            continue
        p = np.asarray(probs[j], np.float32)
        top = int(p.argmax())
        if not np.isfinite(quality[i]) or quality[i] < config.min_quality:
            rejects.append((k[0], k[1], "low_quality"))
            continue
        if p[top] < config.min_class_prob:
            rejects.append((k[0], k[1], "uncertain_expression"))
            continue
        if config.classes is not None and EMOTIONS[top] not in config.classes:
            rejects.append((k[0], k[1], "expression_not_selected"))
            continue
        g = np.asarray([np.nan if v is None else v for v in geo[j]], np.float32)
        rows.append(
            {
                "key": k,
                "probs": p,
                "geo": g,
                "top": top,
                "emb": emb[i],
                "ident": ident[i],
                "q": quality[i],
                "yaw": yaw[i],
                "pitch": pitch[i],
            }
        )
    return rows, rejects


def _neighbour_pairs(P: np.ndarray, G: np.ndarray, top: np.ndarray, config: PairConfig, stats: dict):
    """Unordered pairs (i < j) of the same class where one is among the other's ``neighbours`` nearest
    in expression space; the pairs of a class left out are counted in ``stats``."""
    import faiss

    geo = np.nan_to_num(G / GEOMETRY_SCALES, nan=0.0)
    X = np.hstack([np.sqrt(np.clip(P, 0, None)) * np.sqrt(config.w_probs),
                   geo * np.sqrt((1 - config.w_probs) / (2 * geo.shape[1]))]).astype(np.float32)
    ia_all, ib_all = [], []
    for c in np.unique(top):
        idx = np.nonzero(top == c)[0]
        m = len(idx)
        if m < 2:
            continue
        k = min(m - 1, max(1, config.neighbours))
        index = faiss.IndexFlatL2(X.shape[1])
        index.add(np.ascontiguousarray(X[idx]))
        _, nn = index.search(np.ascontiguousarray(X[idx]), k + 1)
        a = np.repeat(np.arange(m), k + 1)
        b = nn.reshape(-1)
        ok = (b >= 0) & (b != a)
        lo, hi = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
        pairs = np.unique(lo.astype(np.int64) * m + hi)
        stats["not_examined_beyond_neighbours"] += m * (m - 1) // 2 - len(pairs)
        ia_all.append(idx[pairs // m])
        ib_all.append(idx[pairs % m])
    if not ia_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ia_all), np.concatenate(ib_all)


def build_expression_pairs(
    faces: pa.Table, descriptors: pa.Table, config: PairConfig = PairConfig()
) -> ExpressionResult:
    """faces: uid, face_index, identity_id, embedding, and quality (or face_width/height, blur,
    yaw, pitch, det_score); descriptors: uid, face_index, probs, geometry (describe_images' table)."""
    rows, rejects = _join(faces, descriptors, config)
    stats = {
        "faces": faces.num_rows,
        "faces_eligible": len(rows),
        "faces_rejected": len(rejects),
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
    cands = []
    n = len(rows)
    stats["not_examined_beyond_neighbours"] = 0
    if n >= 2:
        P = np.stack([r["probs"] for r in rows])
        G = np.stack([r["geo"] for r in rows])
        E = np.stack([r["emb"] for r in rows])
        top = np.array([r["top"] for r in rows])
        yaw = np.array([r["yaw"] for r in rows])
        pitch = np.array([r["pitch"] for r in rows])
        stats["candidate_pairs"] = n * (n - 1) // 2
        class_sizes = np.bincount(top, minlength=len(EMOTIONS))
        stats["rejected_different_expression_class"] = int(stats["candidate_pairs"] - (class_sizes * (class_sizes - 1) // 2).sum())
        ia, ib = _neighbour_pairs(P, G, top, config, stats)
        sim = expression_similarity(
            P[ia], G[ia], P[ib], G[ib], w_probs=config.w_probs, scales=GEOMETRY_SCALES
        )
        idcos = (E[ia] * E[ib]).sum(1)
        dyaw, dpitch = np.abs(yaw[ia] - yaw[ib]), np.abs(pitch[ia] - pitch[ib])
        ident = [r["ident"] for r in rows]
        img = [r["key"][0] for r in rows]
        # the rules in the order of the module docstring; each pair is counted under the first that fails
        alive = np.ones(len(ia), bool)

        def reject(mask, name):
            nonlocal alive
            hit = alive & mask
            stats[name] += int(hit.sum())
            alive &= ~hit

        reject(sim < config.min_expression_sim, "rejected_low_expression_similarity")
        reject(np.array([ident[a] is not None and ident[a] == ident[b] for a, b in zip(ia.tolist(), ib.tolist())], bool),
               "rejected_same_identity_id")
        reject(idcos > config.max_identity_cos, "rejected_identity_too_similar")
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
            reject(np.array([img[a] == img[b] for a, b in zip(ia.tolist(), ib.tolist())], bool), "rejected_same_image")
        for t in np.nonzero(alive)[0].tolist():
            a, b = int(ia[t]), int(ib[t])
            ra, rb = rows[a], rows[b]
            ka, kb = sorted([ra["key"], rb["key"]], key=lambda k: (k[0], k[1]))
            if ka != ra["key"]:
                a, b = b, a
            cands.append((float(sim[t]), (ka, kb), a, b, float(idcos[t]), float(dyaw[t]), float(dpitch[t])))
    stats["accepted_before_cap"] = len(cands)
    cands.sort(key=lambda c: (-c[0], c[1]))  # ties broken by the faces' keys: deterministic
    used = np.zeros(n, int)
    out = []
    for s, (ka, kb), a, b, ic, dy, dp in cands:
        if used[a] >= config.max_pairs_per_face or used[b] >= config.max_pairs_per_face:
            continue
        used[a] += 1
        used[b] += 1
        ra, rb = rows[a], rows[b]
        out.append(
            {
                "pair_id": stable_key("expr-pair", ka[0], ka[1], kb[0], kb[1]),
                "expression": EMOTIONS[ra["top"]],
                "uid_a": ra["key"][0],
                "face_index_a": ra["key"][1],
                "identity_a": None if ra["ident"] is None else str(ra["ident"]),
                "uid_b": rb["key"][0],
                "face_index_b": rb["key"][1],
                "identity_b": None if rb["ident"] is None else str(rb["ident"]),
                "expression_similarity": s,
                "identity_cosine": ic,
                "class_prob_a": float(ra["probs"][ra["top"]]),
                "class_prob_b": float(rb["probs"][rb["top"]]),
                "quality_a": float(ra["q"]),
                "quality_b": float(rb["q"]),
                "yaw_diff": None if not np.isfinite(dy) else dy,
                "pitch_diff": None if not np.isfinite(dp) else dp,
            }
        )
    out.sort(key=lambda r: r["pair_id"])
    stats["pairs"] = len(out)
    stats["dropped_by_per_face_cap"] = len(cands) - len(out)
    stats["pairs_per_expression"] = {
        e: sum(1 for r in out if r["expression"] == e)
        for e in EMOTIONS
        if any(r["expression"] == e for r in out)
    }
    rej = pa.table(
        {
            "uid": [r[0] for r in rejects],
            "face_index": [r[1] for r in rejects],
            "reason": [r[2] for r in rejects],
        },
        schema=REJECT_SCHEMA,
    )
    stats["face_reject_reasons"] = {
        k: sum(1 for r in rejects if r[2] == k) for k in sorted({r[2] for r in rejects})
    }
    return ExpressionResult(pa.Table.from_pylist(out, schema=PAIR_SCHEMA), rej, stats)


# ---- outputs -------------------------------------------------------------------------------------

CropFn = Callable[[str, int], np.ndarray]  # (uid, face_index) -> RGB uint8 face crop (or whole image)


def pair_samples(pairs: pa.Table, crop: CropFn, extra: Mapping | None = None):
    """WebDataset samples: <key>.a.jpg, <key>.b.jpg and <key>.json (labels, scores, uids)."""
    for r in pairs.to_pylist():
        meta = dict(r)
        meta["task"] = "cross_expression"
        if extra:
            meta.update(extra)
        yield {
            "__key__": r["pair_id"],
            "a.jpg": encode_jpeg(crop(r["uid_a"], r["face_index_a"])),
            "b.jpg": encode_jpeg(crop(r["uid_b"], r["face_index_b"])),
            "json": meta,
        }


SHARD_PREFIX = "expression-pairs"


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
    rows = pairs.to_pylist()
    by_bucket: dict[int, list[dict]] = {}
    for r in rows:
        by_bucket.setdefault(pair_bucket(r["pair_id"], n_buckets), []).append(r)
    common = json.dumps({"builder": BUILDER_VERSION, "library": __version__, "config": cfg, "max_count": max_count},
                        sort_keys=True, default=str)
    previous = previous_buckets(reuse_from, ("pairs.parquet",)) if crop_inputs is not None else {}
    shards: list = []
    records = {}
    reuse = {"buckets_reused": 0, "buckets_rebuilt": 0, "bytes_reused": 0, "buckets_not_reused_corrupt": []}
    for b, brows in sorted(by_bucket.items()):
        name = f"b{b:04d}"
        fp = None
        if crop_inputs is not None:
            h = hashlib.sha256(common.encode())
            for r in sorted(brows, key=lambda r: r["pair_id"]):
                h.update(json.dumps([r, crop_inputs(r["uid_a"], r["face_index_a"]), crop_inputs(r["uid_b"], r["face_index_b"])],
                                    sort_keys=True, default=str).encode())
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
            infos = write_shards(pair_samples(pa.Table.from_pylist(brows, schema=pairs.schema), crop), out_dir,
                                 f"{SHARD_PREFIX}-{name}", max_count=max_count)
            reuse["buckets_rebuilt"] += 1
        shards += infos
        records[name] = {"fingerprint": fp, "pairs": len(brows),
                         "shards": [shard_record(i) for i in infos]}
    write_parquet_atomic(pairs, out_dir / "pairs.parquet")
    write_bytes_atomic(json.dumps({"bucket_count": n_buckets, "buckets": records}, sort_keys=True, indent=1).encode(),
                       out_dir / BUCKETS_FILE)
    if report is not None:
        report.update(reuse)
    return write_manifest(out_dir, "expression_pairs", shards, cfg, extra={"stats": dict(stats or {})}, version=version)


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
