"""Scale-out benchmark of the face stage on ../shared/data/faces: the in-process engine (worker processes)
and the Ray engine (CPU actors) against face_recognition in its strongest form here (one process per
core, images scaled to a long side of 1024), side by side in one run, repeated, medians; then Ray's own
overhead per job, per task and per image.

Usage: .venv/bin/python bench/bench_scale.py [--repeats 3] [--workers 2] [--options '{"upsample": 1}']

Every variant goes from the JPEG files to embeddings (decoding included, in the workers), on warm pools
(worker processes, Ray's local cluster) started before the clock. Recall on the group photos is
measured against the union of every variant's faces of at least 100 px (boxes matched at IoU >= 0.3):
"equal recall" means each variant finds all of them. CPU seconds are summed over this process and all
its descendants (workers, Ray's processes, sampled every 0.1 s: CpuMeter), so they do not depend on the
machine's other load.
Writes a markdown table and bench/results/scale-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LINEUP_TEST_FACES") or REPO.parent / "shared" / "data" / "faces").resolve()
MIN_FACE = 100
FR_LONG_SIDE = 1024


class CpuMeter:
    """CPU seconds (user + system) spent by this process and its descendants while the meter runs.

    Ray starts and ends actor processes within each job, so a before/after difference of the live
    processes misses them: a thread samples every descendant every 0.1 s and keeps each one's last
    reading (a process that ends between two samples loses at most 0.1 s)."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}

    def _sample(self, first: bool = False) -> None:
        procs = [self._me]
        try:
            procs += self._me.children(recursive=True)
        except self._psutil.Error:
            pass
        for p in procs:
            try:
                t = p.cpu_times()
            except self._psutil.Error:
                continue
            key = (p.pid, p.create_time()) if hasattr(p, "create_time") else p.pid
            value = t.user + t.system
            if first:
                self._first[key] = value
            self._last[key] = value

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._sample(first=True)

        def loop():
            while not self._stop.wait(0.1):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = sum(v - self._first.get(k, 0.0) for k, v in self._last.items())


# ------------------------------------------------------------------------- face_recognition, strongest form


def _fr_init():
    import face_recognition  # noqa: F401 - load dlib's models once per worker


def _fr_one(path: str):
    import face_recognition
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    scale = 1.0
    if max(rgb.size) > FR_LONG_SIDE:
        scale = FR_LONG_SIDE / max(rgb.size)
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb)
    locs = face_recognition.face_locations(arr)
    encs = face_recognition.face_encodings(arr, locs)
    boxes = [(left / scale, top / scale, right / scale, bottom / scale) for (top, right, bottom, left) in locs]
    return path, boxes, len(encs)


def run_face_recognition(pool, paths):
    out = {}
    for path, boxes, _ in pool.map(_fr_one, paths, chunksize=4):
        out[path] = boxes
    return out


# ------------------------------------------------------------------------- lineup, both engines


def lineup_boxes(table) -> dict:
    out: dict = {}
    cols = [table.column(c).to_pylist() for c in ("source", "x1", "y1", "x2", "y2")]
    for src, x1, y1, x2, y2 in zip(*cols):
        boxes = out.setdefault(str(DATA / src), [])
        if (x1, y1, x2, y2) not in boxes:  # --copies: the same photo's faces once
            boxes.append((x1, y1, x2, y2))
    return out


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_faces(found_by_variant: dict, group_paths: list[str]) -> dict:
    """Per group photo: the union of every variant's faces >= MIN_FACE px wide (IoU >= 0.3 = same face)."""
    ref: dict = {p: [] for p in group_paths}
    for found in found_by_variant.values():
        for p in group_paths:
            for b in found.get(p, []):
                if b[2] - b[0] >= MIN_FACE and not any(iou(b, r) >= 0.3 for r in ref[p]):
                    ref[p].append(b)
    return ref


def recall(found: dict, ref: dict) -> tuple[int, int]:
    hit = sum(1 for p, faces in ref.items() for r in faces if any(iou(r, b) >= 0.3 for b in found.get(p, [])))
    return hit, sum(len(v) for v in ref.values())


def ray_overhead(repeats: int) -> dict:
    """A Ray job with a model that does nothing: the cold start (the actor pool built: processes, imports),
    a warm job of one chunk (the pool reused, as by every later partition of a run) and the cost of each
    further chunk (64 chunks), on a pool of 2 actors."""
    from pipeline.ray_engine import release_pools, run_chunks

    def noop(_model, chunk):
        return chunk

    def job(n):
        t0 = time.perf_counter()
        run_chunks("noop", list(range(n)), decode=lambda c: c, analyze=noop, factory=dict, actors=2,
                   items_of=lambda c: 1)
        return time.perf_counter() - t0

    cold = []
    for _ in range(repeats):
        release_pools()
        cold.append(job(2))
    one = statistics.median(job(1) for _ in range(repeats))
    many = statistics.median(job(64) for _ in range(repeats))
    release_pools()
    return {"cold_job_s_2_chunks": statistics.median(cold), "job_s_1_chunk": one, "job_s_64_chunks": many,
            "per_task_s": (many - one) / 63}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--options", default="{}", help="face backend options for lineup (JSON), e.g. {\"upsample\": 1}")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-fr", action="store_true", help="leave out face_recognition (Ray against in-process only)")
    ap.add_argument("--copies", type=int, default=1, help="the photos this many times over (steady-state throughput)")
    args = ap.parse_args()
    options = {"device": "cpu", **json.loads(args.options)}

    from pipeline.faces import get_backend
    from pipeline.faces.stage import ray_chunk_runner, run_face_partition
    from pipeline.ingest import ingest_partition
    from pipeline.sources import PartitionSpec

    members = tuple(sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*")
                           if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
    paths = [str(DATA / m) for m in members]
    groups = [p for p in paths if "/groups/" in p]
    ids = [p for p in paths if "/identities/" in p]
    images = ingest_partition(PartitionSpec(key="bench", kind="files", root=str(DATA), members=members)).images
    import pyarrow as pa

    images = pa.concat_tables([images] * args.copies)
    paths = paths * args.copies
    n = images.num_rows
    print(f"{n} photos ({len(ids)} identity, {len(groups)} group); {os.cpu_count()} CPUs; lineup options {options}",
          flush=True)

    backend = get_backend("dlib", **options)
    import multiprocessing as mp

    variants = {}
    if not args.skip_fr:
        fr_pool = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_fr_init)
        list(fr_pool.map(_fr_one, paths[:args.workers]))  # warm: workers started, models loaded
        variants["face_recognition, 2 processes, long side 1024"] = lambda: run_face_recognition(fr_pool, paths)
    run_face_partition(images.slice(0, args.batch_size * args.workers * 2), backend, "warm",
                       batch_size=args.batch_size, workers=args.workers)  # warm the engine's worker pool
    variants |= {
        f"lineup in-process, {args.workers} worker processes": lambda: lineup_boxes(run_face_partition(
            images, backend, "bench", batch_size=args.batch_size, workers=args.workers).faces),
    }
    if not args.skip_ray:
        from pipeline.ray_engine import ensure_ray

        ensure_ray()
        # warm like the in-process pool: the actors live as long as this process, as in a run of many partitions
        run_face_partition(images.slice(0, args.batch_size * args.workers * 2), backend, "warm", batch_size=args.batch_size,
                           chunk_runner=ray_chunk_runner(backend, args.workers, gpus_per_actor=0))
        variants[f"lineup Ray, {args.workers} CPU actors"] = lambda: lineup_boxes(run_face_partition(
            images, backend, "bench", batch_size=args.batch_size,
            chunk_runner=ray_chunk_runner(backend, args.workers, gpus_per_actor=0)).faces)

    walls: dict = {v: [] for v in variants}
    cpus: dict = {v: [] for v in variants}
    found: dict = {}
    for rep in range(args.repeats):
        order = list(variants)
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate: no variant always runs first
        for v in order:
            with CpuMeter() as meter:
                t0 = time.perf_counter()
                found[v] = variants[v]()
                walls[v].append(time.perf_counter() - t0)
            cpus[v].append(meter.seconds)
            print(f"rep {rep} {v}: {walls[v][-1]:.2f} s wall, {cpus[v][-1]:.2f} CPU s", flush=True)

    ref = reference_faces(found, groups)
    base = next(iter(variants))
    rows = {}
    for v in variants:
        hit, total = recall(found[v], ref)
        wall, cpu = statistics.median(walls[v]), statistics.median(cpus[v])
        rows[v] = {
            "median_wall_s": wall, "median_cpu_s": cpu, "images_per_s": n / wall, "images_per_cpu_s": n / cpu,
            "walls": walls[v], "cpus": cpus[v], "group_faces_ge_100px_found": hit, "group_faces_ge_100px": total,
            "identity_photos_with_a_face": sum(1 for p in ids if found[v].get(p)),
            "group_faces_all_sizes": sum(len(found[v].get(p, [])) for p in groups),
        }
    for v in variants:
        rows[v]["speedup_wall"] = rows[base]["median_wall_s"] / rows[v]["median_wall_s"]
        rows[v]["speedup_cpu"] = rows[base]["median_cpu_s"] / rows[v]["median_cpu_s"]
    overhead = {}
    if not args.skip_ray:
        overhead = ray_overhead(args.repeats)
        ray_v = f"lineup Ray, {args.workers} CPU actors"
        inp_v = f"lineup in-process, {args.workers} worker processes"
        overhead["per_image_s_vs_inprocess"] = (rows[ray_v]["median_wall_s"] - rows[inp_v]["median_wall_s"]) / n
    lines = ["| variant | images/s | median wall s | median CPU s | group faces >= 100 px found | identity photos with a face | group faces, all sizes | speed-up vs " + base + " (wall / CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in rows.items():
        lines.append(f"| {v} | {r['images_per_s']:.2f} | {r['median_wall_s']:.1f} | {r['median_cpu_s']:.1f} | "
                     f"{r['group_faces_ge_100px_found']}/{r['group_faces_ge_100px']} | {r['identity_photos_with_a_face']}/{len(ids)} | "
                     f"{r['group_faces_all_sizes']} | {r['speedup_wall']:.2f}x / {r['speedup_cpu']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if overhead:
        print(f"Ray overhead: cold job {overhead['cold_job_s_2_chunks']:.2f} s (2 chunks, pool built), warm job "
              f"{overhead['job_s_1_chunk']:.2f} s (1 chunk), {overhead['per_task_s'] * 1000:.1f} ms per "
              f"further task, {overhead['per_image_s_vs_inprocess'] * 1000:.1f} ms per image vs in-process")
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_after": os.getloadavg()},
           "images": n, "copies": args.copies, "repeats": args.repeats, "workers": args.workers, "options": options, "results": rows,
           "ray_overhead": overhead, "table": table}
    d = REPO / "bench" / "results"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    if not args.skip_fr:
        fr_pool.shutdown()


if __name__ == "__main__":
    main()
