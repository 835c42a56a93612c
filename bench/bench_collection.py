"""Every collection asset on a synthetic collection of N faces: identities, multi-identity pairs,
expression pairs, scoring. Wall s, CPU s, peak RSS and output counts per asset and size.

    .venv/bin/python bench/bench_collection.py --sizes 10000              # debug
    .venv/bin/python bench/bench_collection.py --sizes 100000,1000000

What is synthetic: the face embeddings (pipeline.identity.synth.make_mixture, dlib preset: Zipf
identity sizes, singletons, look-alikes, heavy-tailed spreads), the photos (faces grouped in
order of a random permutation into photos of 1-4 people, so multi-person photos mix identities),
the face boxes / landmarks / detector scores / blur / pose, the image bytes (a deterministic,
textured JPEG per photo, synthesised on demand by ``read_bytes(uid)``: no files), the expression
descriptors, and the scoring models (a tiny random-init open_clip and heads, not a real CLIP).
What is real: every builder - build_identities (kNN + clustering), select_references /
build_multiid_dataset (reference selection, the copy-paste guard with pHash, NCC and SIFT +
RANSAC on the synthetic pixels, WebDataset shards), build_expression_pairs +
write_expression_dataset (FAISS neighbours, rules, shards), score_partition + score_candidates.

Each asset runs in its own subprocess (``--worker``) so that peak RSS (ru_maxrss of that process)
does not mix. Where a builder's work cannot finish on 2 cores in the time available, the figure
is measured on part of the work the builder's inputs allow to be cut (multi-identity: a sample of
target photos, references drawn from the whole collection; expression shards: the first pairs
of the pairs table; scoring: the per-partition image stage on a sample of photos) and
extrapolated linearly; the JSON and the table say which figures are extrapolations.

Writes bench/results/collection-<timestamp>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PERSONS_P = {1: 0.60, 2: 0.20, 3: 0.12, 4: 0.08}  # people per photo (share of photos)
# expression top classes (share of faces) in EMOTIONS order: angry, disgust, fear, happy, sad, surprise, neutral
EXPR_P = [0.05, 0.02, 0.03, 0.35, 0.08, 0.06, 0.41]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024  # KiB on Linux


def deep_size(obj) -> int:
    """Bytes of ``obj`` and everything it references (each object once), like pympler's asizeof."""
    import gc

    seen, todo, total = set(), [obj], 0
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, type):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        todo.extend(gc.get_referents(o))
    return total


def rss_now_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


# ------------------------------------------------------------------------------------ the collection


def generate(n: int, out: Path, seed: int = 0, partition_photos: int = 100_000) -> dict:
    """Synthetic collection of ``n`` faces in ``out``: embeddings.npy, images/faces/descriptors parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.expression.descriptor import DESCRIPTOR_SCHEMA
    from pipeline.expression.fer_model import EMOTIONS
    from pipeline.expression.landmarks import GEOMETRY_FEATURES
    from pipeline.identity.synth import make_mixture

    t0 = time.perf_counter()
    mix = make_mixture(n, "dlib", seed=seed)  # faces in random order: consecutive faces are unrelated people
    E, labels = mix.embeddings, mix.labels
    rng = np.random.default_rng(seed + 1)
    # photos: people per photo drawn per photo; faces taken in (random) order
    ks, total = [], 0
    kv, kp = np.array(list(PERSONS_P)), np.array(list(PERSONS_P.values()))
    while total < n:
        k = rng.choice(kv, size=max(1024, int((n - total) / 1.6)), p=kp)
        ks.append(k)
        total += int(k.sum())
    k = np.concatenate(ks)
    k = k[: int(np.searchsorted(np.cumsum(k), n)) + 1]
    k[-1] -= int(k.sum()) - n
    k = k[k > 0]
    P = len(k)
    photo = np.repeat(np.arange(P), k)
    slot = np.arange(n) - np.repeat(np.cumsum(k) - k, k)  # 0.. left to right within the photo
    kk = k[photo]
    uid_int = rng.integers(0, 2**63 - 1, size=P, dtype=np.int64)
    uids = np.array([f"{u:016x}" for u in uid_int.tolist()])
    W = np.minimum(512, 256 + 96 * k) + rng.integers(-16, 17, size=P)
    H = rng.integers(320, 385, size=P)
    # face boxes: a square-ish face in its slot; size log-normal, capped by the slot and the height
    slot_w = W[photo] / kk
    side = np.exp(rng.normal(np.log(135), 0.35, n))
    side = np.clip(side, 36, np.minimum(0.92 * slot_w, 0.7 * H[photo]))
    fh = side * 1.12
    x1 = slot * slot_w + rng.uniform(0, 1, n) * (slot_w - side)
    y1 = rng.uniform(0, 1, n) * (H[photo] - fh)
    x2, y2 = x1 + side, y1 + fh
    lm_rel = np.array([0.3, 0.42, 0.7, 0.42, 0.5, 0.62, 0.35, 0.8, 0.65, 0.8])
    lm = np.empty((n, 10), np.float32)
    lm[:, 0::2] = x1[:, None] + lm_rel[0::2] * side[:, None]
    lm[:, 1::2] = y1[:, None] + lm_rel[1::2] * fh[:, None]
    lm += rng.normal(0, 0.02, (n, 10)).astype(np.float32) * side[:, None].astype(np.float32)
    det = np.clip(rng.normal(1.3, 0.6, n), -0.5, 3.0)
    blur = np.exp(rng.normal(np.log(180), 0.9, n))
    yaw, pitch, roll = rng.normal(0, 15, n), rng.normal(0, 8, n), rng.normal(0, 5, n)
    f32 = lambda a: pa.array(np.asarray(a, np.float32), pa.float32())
    fsl = lambda a, d: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).reshape(-1)), d)
    part_names = np.array([f"part-{i:04d}" for i in range((P + partition_photos - 1) // partition_photos)])
    images = pa.table({
        "uid": uids, "source": pa.array(["synthetic"] * P), "partition": part_names[np.arange(P) // partition_photos],
        "path": pa.array(["synthetic://"] * P), "offset": pa.array(np.zeros(P, np.int64)),
        "length": pa.array(np.full(P, -1, np.int64)), "width": pa.array(W.astype(np.int32)),
        "height": pa.array(H.astype(np.int32)), "format": pa.array(["JPEG"] * P),
        "original_mode": pa.array(["RGB"] * P), "exif_rotated": pa.array(np.zeros(P, bool)),
        "caption": pa.array([f"a photo of {c} {'person' if c == 1 else 'people'}" for c in k.tolist()]),
        "url": pa.nulls(P, pa.string()),
    })
    faces = pa.table({
        "uid": pa.array(uids[photo]), "source": pa.array(["synthetic"] * n),
        "face_index": pa.array(slot.astype(np.int32)), "x1": f32(x1), "y1": f32(y1), "x2": f32(x2), "y2": f32(y2),
        "landmarks": fsl(lm, 10), "det_score": f32(det), "face_width": f32(side), "face_height": f32(fh),
        "blur": f32(blur), "yaw": f32(yaw), "pitch": f32(pitch), "roll": f32(roll), "embedding": fsl(E, E.shape[1]),
        "backend": pa.array(["dlib"] * n), "model_version": pa.array(["synthetic"] * n),
        "image_width": pa.array(W[photo].astype(np.int32)), "image_height": pa.array(H[photo].astype(np.int32)),
    })
    # expression descriptors: a top class per face, its probability 0.35-0.98, the rest Dirichlet-spread
    top = rng.choice(len(EMOTIONS), size=n, p=EXPR_P)
    ptop = rng.uniform(0.35, 0.98, n)
    rest = rng.dirichlet(np.full(len(EMOTIONS) - 1, 0.5), size=n) * (1 - ptop)[:, None]
    probs = np.empty((n, len(EMOTIONS)), np.float32)
    for c in range(len(EMOTIONS)):
        m = top == c
        probs[m] = np.insert(rest[m], c, ptop[m], axis=1)
    class_geo = rng.normal(0.3, 0.08, (len(EMOTIONS), len(GEOMETRY_FEATURES)))
    geo = (class_geo[top] + rng.normal(0, 0.05, (n, len(GEOMETRY_FEATURES)))).astype(np.float32)
    tc = probs.argmax(1)
    desc = {"uid": faces.column("uid"), "face_index": faces.column("face_index"),
            "bbox": fsl(np.stack([x1, y1, x2, y2], 1), 4), "probs": fsl(probs, len(EMOTIONS)),
            "top_class": pa.array(np.array(EMOTIONS)[tc]), "top_prob": f32(probs.max(1)),
            "geometry": fsl(geo, len(GEOMETRY_FEATURES)),
            **{g: f32(geo[:, i]) for i, g in enumerate(GEOMETRY_FEATURES)},
            "model": pa.array(["synthetic"] * n)}
    descriptors = pa.table(desc, schema=DESCRIPTOR_SCHEMA)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", E)
    np.save(out / "labels.npy", labels)
    pq.write_table(images, out / "images.parquet")
    pq.write_table(faces, out / "faces.parquet")
    pq.write_table(descriptors, out / "descriptors.parquet")
    info = {"faces": n, "photos": P, "true_identities": int(mix.params["n_identities"]),
            "photos_by_people": {int(c): int((k == c).sum()) for c in sorted(set(k.tolist()))},
            "faces_ge_100px": int((np.minimum(side, fh) >= 100).sum()), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "info.json").write_text(json.dumps(info))
    return info


def synth_jpeg(uid: str, width: int, height: int, quality: int = 85) -> bytes:
    """A deterministic textured photo for ``uid``: smooth colour field + random shapes + grain.
    Different uids give unrelated pixels (no copies); the shapes give SIFT corners and blobs."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(int(uid[:15], 16))
    small = rng.integers(0, 256, size=(max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(120):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(4, 32, size=2)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((int(x), int(y), int(x + w), int(y + h)), fill=col)
    arr = np.asarray(im, np.int16) + rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def reader(images) -> callable:
    size = dict(zip(images.column("uid").to_pylist(),
                    zip(images.column("width").to_pylist(), images.column("height").to_pylist())))
    calls = {"n": 0, "s": 0.0, "cpu_s": 0.0}  # photos synthesised, their wall s and CPU s (this process)

    def read_bytes(uid: str) -> bytes:
        t, c = time.perf_counter(), time.process_time()
        w, h = size[uid]
        b = synth_jpeg(uid, w, h)
        calls["n"] += 1
        calls["s"] += time.perf_counter() - t
        calls["cpu_s"] += time.process_time() - c
        return b

    read_bytes.calls = calls
    return read_bytes


# ------------------------------------------------------------------------------------------- workers


def _read(data: Path, name: str):
    import pyarrow.parquet as pq

    return pq.read_table(data / f"{name}.parquet")


def w_identities(data: Path, work: Path, args) -> dict:
    import pyarrow.parquet as pq

    from pipeline.identity.build import build_identities

    faces = _read(data, "faces").select(["uid", "face_index"])
    uids, fidx = faces.column("uid").to_numpy(zero_copy_only=False), faces.column("face_index").to_numpy()
    del faces
    res = build_identities(uids, fidx, str(data / "embeddings.npy"), backend_name="dlib")
    pq.write_table(res.assignments, data / "identities.parquet")
    pq.write_table(res.summary, data / "identity_summary.parquet")
    st = res.stats
    return {"outputs": {"identities": st["n_identities"], "singletons": st["n_singletons"],
                        "largest": st["largest_identity"], "faces": st["n_faces"]},
            "detail": {"timings": {k: round(v, 2) for k, v in st["timings"].items()}, "knn_backend": st["knn_backend"]}}


def w_multiid(data: Path, work: Path, args) -> dict:
    import pyarrow as pa

    from pipeline.multiid import MultiIDConfig, build_multiid_dataset
    from pipeline.multiid import plan as mplan
    from pipeline.multiid import selection as msel
    from pipeline.storage import parquet_rows

    # the plan of the build, to measure what it keeps per target (bench-only instrumentation)
    plans = []
    select = mplan._Plan.select

    def select_and_keep(self):
        plans.append(self)
        return select(self)

    mplan._Plan.select = select_and_keep
    # the copy-paste guard's caches (one per bucket's selection, LRU-bounded): how full the fullest got and
    # what an entry weighs, so that the extrapolation can add what a run over every photo would fill
    caches = {"images": [0, 0, 0], "keypoints": [0, 0, 0]}  # entries at most, bytes of the entries sampled, entries sampled
    fp_init = msel._Fingerprints.__init__
    current = []

    def measure(fp):
        for name, lru in (("images", fp.cache), ("keypoints", fp.kps)):
            real = [v for v in lru.values() if v is not msel._NOT_YET]  # the keypoint cache holds placeholders too
            n_real = len(real)
            c = caches[name]
            c[0] = max(c[0], n_real)
            c[1] += sum(deep_size(v) for v in real[:50])
            c[2] += len(real[:50])

    def init_and_watch(self, *a, **k):
        fp_init(self, *a, **k)
        if current:
            measure(current.pop())
        current.append(self)

    msel._Fingerprints.__init__ = init_and_watch
    images, faces, ids = _read(data, "images"), _read(data, "faces"), _read(data, "identities")
    t_load = time.perf_counter() - args.t0
    rss_inputs = rss_now_gb()
    read_bytes = reader(images)
    n_photos = images.num_rows
    uids = sorted(images.column("uid").to_pylist())  # uids are random hex: the first T are a random sample
    targets = set(uids[: args.targets]) if args.targets else None
    if targets is not None:
        images = images.filter(pa.array([u in targets for u in images.column("uid").to_pylist()]))
    cfg = MultiIDConfig(max_candidates_per_person=args.max_candidates)
    out = work / "multiid"
    shutil.rmtree(out, ignore_errors=True)
    res = build_multiid_dataset(images, faces, ids, out, cfg, read_bytes=read_bytes)
    shards = [s for v in res.shards.values() for s in v]
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    st = res.stats
    # what the builder keeps until it returns, measured (object sizes): per bucket its summary tuples (one per
    # sample), its additive counts and its shard infos; its rows are streamed to part files, its sample dicts
    # dropped once its shards are written. Per target = the slope of this between the two runs.
    n_samples = sum(st["per_split"].values())
    retained = deep_size([(b.summary, b.counts, b.infos) for b in plans[0].buckets.values()])
    if current:
        measure(current.pop())
    # bytes the caches could still grow by: (capacity - the most entries seen) x bytes an entry, the capacity
    # being at most the photos (faces) of the largest bucket, a cache living for one bucket's selection
    cache_room = {}
    big = max(plans[0].buckets.values(), key=lambda b: len(b.uids))
    bound = {"images": len(big.uids), "keypoints": sum(len(plans[0].by_uid.get(u, [])) for u in big.uids)}
    for name, cap in (("images", cfg.cache_images), ("keypoints", cfg.cache_keypoints)):
        most, entry_bytes, sampled = caches[name]
        cap = min(cap, bound[name])
        cache_room[name] = {"most_entries": most, "capacity": cap, "bytes_per_entry": round(entry_bytes / max(1, sampled)),
                            "room_bytes": round(max(0, cap - most) * entry_bytes / max(1, sampled))}
    # the run keeps the image rows of its targets only; a run over every photo keeps a dict per photo
    import random

    metas = list(plans[0].img_meta.values())
    some = random.Random(0).sample(metas, min(len(metas), 2000))
    per_photo = deep_size(some) / max(1, len(some)) if some else 0
    cache_room["img_meta"] = {"photos_kept": len(metas), "bytes_per_photo": round(per_photo),
                              "room_bytes": round(per_photo * max(0, n_photos - len(metas)))}
    return {"outputs": {"targets_examined": images.num_rows, "photos": n_photos, "samples": n_samples,
                        "pairs": parquet_rows(out / "pairs.parquet"), "candidates": parquet_rows(out / "candidates.parquet"),
                        "shards": len(shards),
                        "bytes": nbytes},
            "detail": {"targets": st["targets"], "candidates_removed_by": st["candidates_removed_by"],
                       "cache_evictions": st["cache_evictions"], "per_split": st["per_split"],
                       "images_synthesised": read_bytes.calls["n"], "synthesis_s": round(read_bytes.calls["s"], 1),
                       "synthesis_cpu_s": round(read_bytes.calls["cpu_s"], 1),
                       "load_inputs_s": round(t_load, 1), "max_candidates_per_person": args.max_candidates,
                       "retained_bytes": retained, "cache_room": cache_room,
                       "retained_bytes_per_target": round(retained / max(1, images.num_rows)),
                       "rss_after_inputs_gb": round(rss_inputs, 2)}}


def w_expression(data: Path, work: Path, args) -> dict:
    from pipeline.expression.pairs import PairConfig, build_expression_pairs, write_expression_dataset
    from pipeline.faces.calibration import thresholds_for
    from pipeline.faces.crops import face_crop
    from pipeline.identity.build import with_identity_ids

    faces, desc, ids, images = _read(data, "faces"), _read(data, "descriptors"), _read(data, "identities"), _read(data, "images")
    rss_inputs = rss_now_gb()
    t = time.perf_counter()
    fcs = with_identity_ids(faces, ids)
    t_ids = time.perf_counter() - t
    cfg = PairConfig(max_identity_cos=thresholds_for("dlib").different_person_max)
    t, c = time.perf_counter(), time.process_time()
    res = build_expression_pairs(fcs, desc, cfg)
    t_build, c_build = time.perf_counter() - t, time.process_time() - c
    rss_build = peak_rss_gb()
    read_bytes = reader(images)
    boxes = {(u, int(f)): b for u, f, *b in zip(*(fcs.column(c).to_pylist() for c in ("uid", "face_index", "x1", "y1", "x2", "y2")))}
    from PIL import Image

    def crop(uid, face_index):  # as the asset's CropReader.crop, over the synthesised bytes (no cache)
        rgb = np.asarray(Image.open(io.BytesIO(read_bytes(uid))).convert("RGB"))
        return np.asarray(face_crop(rgb, boxes[(uid, int(face_index))]))

    pairs = res.pairs
    n_write = pairs.num_rows if args.write_pairs is None else min(args.write_pairs, pairs.num_rows)
    out = work / "expression"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t, c = time.perf_counter(), time.process_time()
    write_expression_dataset(pairs.slice(0, n_write), crop, out, cfg, res.stats)
    t_write, c_write = time.perf_counter() - t, time.process_time() - c
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    nshards = len(list(out.glob("*.tar")))
    return {"outputs": {"faces": faces.num_rows, "eligible": res.stats["faces_eligible"], "pairs": pairs.num_rows,
                        "pairs_written": n_write, "shards": nshards, "bytes": nbytes},
            "detail": {"rss_after_inputs_gb": round(rss_inputs, 2), "with_identity_ids_s": round(t_ids, 1), "build_s": round(t_build, 1), "build_cpu_s": round(c_build, 1),
                       "peak_rss_after_build_gb": round(rss_build, 2), "write_s": round(t_write, 1),
                       "write_cpu_s": round(c_write, 1), "write_s_per_pair": t_write / max(1, n_write),
                       "synthesis_s": round(read_bytes.calls["s"], 1),
                       "stats": {k: v for k, v in res.stats.items() if isinstance(v, int)},
                       "neighbour_search": res.stats.get("neighbour_search", {}), "search_seconds": res.search_seconds}}


TINY_CLIP = {  # tests/test_scoring_stage.py's tiny architecture
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _tiny_models(d: Path):
    """tests/test_scoring_stage.py's tiny CLIP, aesthetic head and social head, saved to ``d``."""
    import itertools

    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = d / "lineup-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("lineup-tiny-clip", pretrained=None).state_dict(), d / "tiny_clip.pt")
    g = torch.Generator().manual_seed(1)
    sd = {}
    for key, (i, o) in zip([0, 2, 4, 6, 7], itertools.pairwise([16, 32, 8, 8, 4, 1])):
        sd[f"layers.{key}.weight"] = torch.randn(o, i, generator=g) * 0.3
        sd[f"layers.{key}.bias"] = torch.zeros(o)
    torch.save(sd, d / "aesthetic.pth")
    save_file({"weight": torch.randn(1, 32, generator=g), "bias": torch.zeros(1)}, str(d / "social.safetensors"))
    return cfg


def w_scoring(data: Path, work: Path, args) -> dict:
    import pyarrow as pa
    import torch

    from pipeline.identity.build import with_identity_ids
    from pipeline.scoring.clip import ClipConfig
    from pipeline.scoring.heads import HeadConfig
    from pipeline.scoring.stage import (
        IMAGE_SCORE_COLUMNS,
        ImageScorerStage,
        ScoringConfig,
        score_candidates,
        score_partition,
        scorer_fingerprint,
    )
    from pipeline.storage import write_parquet_atomic

    torch.set_num_threads(2)
    images, faces, ids = _read(data, "images"), _read(data, "faces"), _read(data, "identities")
    rss_inputs = rss_now_gb()
    d = work / "scoring"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    mcfg = _tiny_models(d)
    cfg = ScoringConfig(clip=ClipConfig(model_name="lineup-tiny-clip", pretrained=str(d / "tiny_clip.pt"),
                                        model_config=str(mcfg), device="cpu"),
                        aesthetic=HeadConfig(weights=str(d / "aesthetic.pth")),
                        social_reward=HeadConfig(weights=str(d / "social.safetensors")))
    # per-partition image stage on a sample of photos, written into one blob file (path/offset/length rows)
    S = min(args.score_images, images.num_rows)
    sample = images.slice(0, S).to_pylist()
    offset = 0
    with open(d / "blob.bin", "wb") as f:
        for r in sample:
            b = synth_jpeg(r["uid"], r["width"], r["height"])
            f.write(b)
            r.update(path=str(d / "blob.bin"), offset=offset, length=len(b))
            offset += len(b)
    part = pa.Table.from_pylist(sample, schema=images.schema)
    t, c = time.perf_counter(), time.process_time()
    stage = ImageScorerStage(cfg)
    t_load = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    table_k, _ = score_partition(part, stage)
    t_part, c_part = time.perf_counter() - t, time.process_time() - c
    rss_part = peak_rss_gb()
    # collection-level combine: image scores of every photo (synthetic numbers; their cost is per row) + face scores
    P = images.num_rows
    rng = np.random.default_rng(0)
    image_scores = pa.table({"uid": images.column("uid"),
                             **{col: pa.array(rng.normal(0, 1, P).astype(np.float32)) for col in IMAGE_SCORE_COLUMNS},
                             "scorer_fingerprint": pa.array([scorer_fingerprint(cfg)] * P)})
    del part, sample
    t, c = time.perf_counter(), time.process_time()
    fcs = with_identity_ids(faces, ids)
    table, report = score_candidates([], fcs, cfg, image_scores=image_scores)
    write_parquet_atomic(table, d / "scores.parquet")
    t_comb, c_comb = time.perf_counter() - t, time.process_time() - c
    return {"outputs": {"photos": P, "faces": faces.num_rows, "score_rows": table.num_rows,
                        "images_scored_in_partition_sample": table_k.num_rows},
            "detail": {"model": "tiny random-init open_clip (tests' lineup-tiny-clip, 32 px, 1 layer) + tiny heads: "
                                "the pipeline's cost with a tiny model, NOT a real CLIP's",
                       "rss_after_inputs_gb": round(rss_inputs, 2), "scorer_load_s": round(t_load, 2), "partition_sample_images": S,
                       "partition_s": round(t_part, 1), "partition_cpu_s": round(c_part, 1),
                       "partition_ms_per_image": round(1000 * t_part / max(1, S), 2),
                       "partition_cpu_ms_per_image": round(1000 * c_part / max(1, S), 2),
                       "peak_rss_after_partition_gb": round(rss_part, 2),
                       "combine_s": round(t_comb, 1), "combine_cpu_s": round(c_comb, 1),
                       "available": report["available"], "timings_s": report["timings_s"]}}


ASSET_INPUTS = {  # the tables each collection asset loads whole (as the workers above read them)
    "multiid": ("images", "faces", "identities"),
    "expression": ("faces", "descriptors", "identities", "images"),
    "scoring": ("images", "faces", "identities"),
}


def w_inputs(data: Path, work: Path, args) -> dict:
    """Memory of the inputs the other collection assets load whole, table by table (Arrow bytes and
    RSS after each read), plus the faces-with-identity join that expression and scoring build: what
    sets their floor at 10M. Without an identities table (not built at this size) a stand-in with
    the assignments schema is made from the true labels (same rows and columns; ids are the truth)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.identity.build import ASSIGNMENTS_SCHEMA, with_identity_ids
    from pipeline.identity.stable_ids import format_id

    out = {"rss_start_gb": round(rss_now_gb(), 3), "tables": {}}
    ids_path = data / "identities.parquet"
    if not ids_path.exists():  # in the work dir: no other asset may mistake it for a built table
        ids_path = work / "identities_stand_in.parquet"
        faces = _read(data, "faces").select(["uid", "face_index"])
        lab = np.load(data / "labels.npy")
        n = len(lab)
        ids = np.array([format_id(i) for i in range(int(lab.max()) + 1)], dtype=object)
        pq.write_table(pa.table({
            "uid": faces.column("uid"), "face_index": faces.column("face_index"),
            "identity_id": pa.array(ids, pa.string()).take(pa.array(lab)),
            "cluster_size": pa.array(np.bincount(lab)[lab], pa.int64()),
            "sim_to_centroid": pa.array(np.ones(n, np.float32)), "nn_similarity": pa.array(np.ones(n, np.float32)),
            "ivf_cell": pa.array(np.zeros(n, np.int32)),
        }, schema=ASSIGNMENTS_SCHEMA), ids_path)
        del faces, lab, ids
        out["identities_stand_in"] = True
        out["rss_start_gb"] = round(rss_now_gb(), 3)
    loaded = {}
    for name in ("faces", "images", "descriptors", "identities"):
        before = rss_now_gb()
        loaded[name] = _read(data, name) if name != "identities" else pq.read_table(ids_path)
        out["tables"][name] = {"rows": loaded[name].num_rows, "arrow_gb": round(loaded[name].nbytes / 2**30, 3),
                               "rss_added_gb": round(rss_now_gb() - before, 3)}
    before = rss_now_gb()
    joined = with_identity_ids(loaded["faces"], loaded["identities"])
    out["faces_with_ids_join_gb"] = round(rss_now_gb() - before, 3)
    del joined
    out["per_asset_inputs_gb"] = {a: round(sum(out["tables"][t]["arrow_gb"] for t in ts), 3)
                                  for a, ts in ASSET_INPUTS.items()}
    out["rss_all_loaded_gb"] = round(rss_now_gb(), 3)
    return {"outputs": {"faces": loaded["faces"].num_rows, "photos": loaded["images"].num_rows}, "detail": out}


WORKERS = {"identities": w_identities, "multiid": w_multiid, "expression": w_expression, "scoring": w_scoring,
           "inputs": w_inputs}


def run_worker(args) -> None:
    args.t0 = time.perf_counter()
    c0 = time.process_time()
    res = WORKERS[args.worker](Path(args.data), Path(args.work), args)
    res.update(wall_s=round(time.perf_counter() - args.t0, 1), cpu_s=round(time.process_time() - c0, 1),
               peak_rss_gb=round(peak_rss_gb(), 2))
    Path(args.result).write_text(json.dumps(res, default=str))


# -------------------------------------------------------------------------------------------- driver


def _fmt_out(o: dict) -> str:
    return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in o.items())


def run_stage(name: str, data: Path, work: Path, extra: list[str], timeout: float) -> dict:
    result = work / f"{name}-result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--work", str(work), "--result", str(result), *extra]
    print(f"  {name} {' '.join(extra)} ...", flush=True)
    t = time.perf_counter()
    try:
        rc = subprocess.call(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if rc or not result.exists():
        return {"error": f"exit {rc} after {time.perf_counter() - t:.0f} s"}
    r = json.loads(result.read_text())
    print(f"  {name}: {r['wall_s']} s wall, {r['cpu_s']} CPU s, {r['peak_rss_gb']} GB; {_fmt_out(r['outputs'])}", flush=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--assets", default="identities,multiid,expression,scoring")
    ap.add_argument("--root", default="/tmp/collbench")
    ap.add_argument("--targets", default="200,800",
                    help="multi-identity: target photos examined (two sample sizes give the fixed cost and the per-target slope; "
                         "0 = every photo)")
    ap.add_argument("--max-candidates", type=int, default=200, help="MultiIDConfig.max_candidates_per_person")
    ap.add_argument("--write-pairs", type=int, default=5000, help="expression pairs written to shards (-1: all)")
    ap.add_argument("--score-images", type=int, default=2000, help="photos through the per-partition image scorers")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true", help="keep the generated data in --root")
    # worker mode
    ap.add_argument("--worker", default=None)
    ap.add_argument("--data")
    ap.add_argument("--work")
    ap.add_argument("--result")
    ap.add_argument("--targets-one", type=int, dest="targets_one", default=None)
    a = ap.parse_args()
    if a.worker:
        a.targets = a.targets_one
        a.write_pairs = None if a.write_pairs < 0 else a.write_pairs
        run_worker(a)
        return 0

    sizes = [int(s) for s in a.sizes.split(",")]
    assets = a.assets.split(",")
    targets = [int(t) for t in a.targets.split(",")]
    rows, runs = [], []
    for n in sizes:
        data = Path(a.root) / f"n{n}"
        work = Path(a.root) / f"n{n}-work"
        work.mkdir(parents=True, exist_ok=True)
        info_f = data / "info.json"
        if info_f.exists():
            info = json.loads(info_f.read_text())
        else:
            print(f"generating {n:,} faces ...", flush=True)
            c0 = time.process_time()
            info = generate(n, data)
            info["cpu_s"] = round(time.process_time() - c0, 1)
        print(f"N={n:,}: {json.dumps(info)}", flush=True)
        run = {"n": n, "collection": info, "assets": {}}
        common = ["--max-candidates", str(a.max_candidates), "--write-pairs", str(a.write_pairs),
                  "--score-images", str(a.score_images)]
        for name in assets:
            if name not in ("identities", "inputs") and not (data / "identities.parquet").exists():
                run["assets"][name] = {"error": "no identities table"}
                continue
            if name == "multiid":
                rs = [run_stage(name, data, work, common + ["--targets-one", str(t)], a.timeout) for t in targets]
                run["assets"][name] = {"runs": rs}
                ok = [r for r in rs if "error" not in r]
                if len(ok) >= 2 and targets[0] != targets[-1] and all(targets):
                    r0, r1 = ok[0], ok[-1]
                    t0_, t1_ = r0["outputs"]["targets_examined"], r1["outputs"]["targets_examined"]
                    P = r1["outputs"]["photos"]
                    fit = {}
                    for key in ("wall_s", "cpu_s"):
                        slope = (r1[key] - r0[key]) / max(1, t1_ - t0_)
                        fixed = r0[key] - slope * t0_
                        fit[key] = {"fixed": round(fixed, 2), "per_target": slope, "all_photos": round(fixed + slope * P, 1)}
                    # the builder's own CPU: less this bench synthesising the photos it reads (a stand-in for
                    # reading a file, ~6 ms of CPU a photo; a real read is mostly waiting)
                    if "synthesis_cpu_s" in r0["detail"] and "synthesis_cpu_s" in r1["detail"]:
                        own = [r["cpu_s"] - r["detail"]["synthesis_cpu_s"] for r in (r0, r1)]
                        slope = (own[1] - own[0]) / max(1, t1_ - t0_)
                        fit["cpu_s_less_synthesis"] = {"fixed": round(own[0] - slope * t0_, 2), "per_target": slope,
                                                       "all_photos": round(own[0] - slope * t0_ + slope * P, 1)}
                    # memory: the peak of the smaller run (inputs + bounded caches) plus what the builder keeps per
                    # target: the slope of its measured object sizes between the two runs (an RSS slope between two
                    # small runs is mostly caches filling); the ratio at the larger run when a run lacks the figure
                    d0, d1 = r0["detail"], r1["detail"]
                    per_t = ((d1["retained_bytes"] - d0["retained_bytes"]) / max(1, t1_ - t0_) if "retained_bytes" in d0
                             else d1["retained_bytes_per_target"]) / 2**30
                    # plus what the guard's bounded caches would still fill in a longer run (at their capacity)
                    room = sum(c["room_bytes"] for c in d1.get("cache_room", {}).values()) / 2**30
                    fit["peak_rss_gb"] = {"fixed": r0["peak_rss_gb"], "per_target": per_t, "cache_room": round(room, 2),
                                          "all_photos": round(max(r0["peak_rss_gb"], r1["peak_rss_gb"]) + room + per_t * P, 1)}
                    for key in ("samples", "pairs", "shards", "bytes"):
                        fit[key] = round(r1["outputs"][key] / t1_ * P)
                    run["assets"][name]["extrapolated_to_all_photos"] = fit
                for r, t in zip(rs, targets):
                    if "error" not in r:
                        rows.append({"asset": "multi-identity pairs", "N": n, "measured": f"{t:,} target photos of {r['outputs']['photos']:,}",
                                     **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_gb")}, "outputs": _fmt_out(
                                         {k: r["outputs"][k] for k in ("samples", "pairs", "shards", "bytes")})})
                if "extrapolated_to_all_photos" in run["assets"][name]:
                    f = run["assets"][name]["extrapolated_to_all_photos"]
                    rows.append({"asset": "multi-identity pairs", "N": n, "measured": "EXTRAPOLATED to every photo (linear in targets)",
                                 "wall_s": f["wall_s"]["all_photos"], "cpu_s": f["cpu_s"]["all_photos"],
                                 "peak_rss_gb": f["peak_rss_gb"]["all_photos"],
                                 "outputs": _fmt_out({k: f[k] for k in ("samples", "pairs", "shards", "bytes")})})
                continue
            r = run_stage(name, data, work, common, a.timeout)
            run["assets"][name] = r
            if "error" in r:
                rows.append({"asset": name, "N": n, "measured": r["error"]})
                continue
            label = {"identities": "identities", "expression": "expression pairs", "scoring": "scoring",
                     "inputs": "loaded inputs of multi-identity / expression / scoring"}[name]
            measured = "full"
            if name == "expression" and r["outputs"]["pairs_written"] < r["outputs"]["pairs"]:
                measured = f"pairs full; shards for {r['outputs']['pairs_written']:,} of {r['outputs']['pairs']:,} pairs"
                d = r["detail"]
                r["extrapolated_write_all_s"] = round(d["write_s_per_pair"] * r["outputs"]["pairs"], 1)
            if name == "scoring":
                d = r["detail"]
                measured = (f"image stage on {d['partition_sample_images']:,} photos (tiny model), "
                            f"combine over all {r['outputs']['faces']:,} faces")
                r["extrapolated_image_stage_all_photos_s"] = round(d["partition_ms_per_image"] / 1000 * r["outputs"]["photos"], 1)
            rows.append({"asset": label, "N": n, "measured": measured, **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_gb")},
                         "outputs": _fmt_out(r["outputs"])})
        runs.append(run)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    cols = ["asset", "N", "measured", "wall_s", "cpu_s", "peak_rss_gb", "outputs"]
    print("\n| asset | N | measured | wall s | CPU s | peak RSS GB | outputs |\n|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(f"{r[c]:,}" if c == "N" else str(r.get(c, "")) for c in cols) + " |")
    out = REPO / "bench" / "results" / f"collection-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "load_avg": os.getloadavg()},
                               "args": vars(a), "runs": runs, "table": rows}, indent=1, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
