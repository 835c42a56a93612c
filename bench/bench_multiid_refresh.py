"""Multi-identity refresh: a fresh full build vs a build that reuses the previous version (per target).

    PYTHONPATH=. .venv/bin/python bench/bench_multiid_refresh.py --faces 3000 --add 0.01

The collection is bench_collection.py's synthetic one (Zipf identities, photos of 1-4 people, textured JPEGs
synthesised on demand), with the true identity labels as identities (no clustering: what is measured is the
builder). Version A is built from it; B adds ``--add`` (1%) new faces, each in a new one-person photo of a
randomly chosen person who has at least two faces (scattered over identities and components). B is built
twice: from scratch, and with ``reuse_from`` = A's folder. Each build runs in its own subprocess (CPU s of
that build and its worker processes, wall s, peak RSS of the build process and of its largest worker). The
two B folders are compared byte for byte.

The photos are synthesised once, before any build, into ``<root>/photos/<uid>.jpg``, and the builds read
them from there (as a real build reads its photos: a file read, then the decode). Before, every build
synthesised each photo it read inside its timed run (~3.5 ms a photo, more than decoding it): 13.4 of the
5k refresh's 35.7 CPU-s were this bench drawing JPEGs, a cost no real run pays. ``--synth-reads`` keeps
the old way (to compare with figures taken before).

``--workers 1,2``: every build is run once per worker count (A fresh, B fresh, B refresh), side by side in
one run; the parallel efficiency is wall(1 worker) / (n x wall(n workers)) and the folders built with n
workers are compared byte for byte with those built with one.

``--efficiency 3 --workers 1,2``: wall-clock parallel efficiency alone: fresh builds of A only, 1 process then
2 workers, 3 rounds back to back, medians (bench/results/multiid-efficiency-<timestamp>.json); run it on
a quiet machine, wall figures mean nothing while other jobs take the cores (the CPU overhead still does).

Writes bench/results/multiid-refresh-<timestamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_collections(n: int, add: float, root: Path, seed: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.bench_collection import generate

    a = root / "A"
    info = generate(n, a, seed=seed)
    images, faces = pq.read_table(a / "images.parquet"), pq.read_table(a / "faces.parquet")
    labels = np.load(a / "labels.npy")
    ids = pa.table({"uid": faces.column("uid"), "face_index": faces.column("face_index"),
                    "identity_id": pa.array([f"id{int(x):06d}" for x in labels])})
    pq.write_table(ids, a / "identities.parquet")
    # B: new one-face photos of people with >= 2 faces, the new face a copy of one of theirs, moved a little
    rng = np.random.default_rng(seed + 99)
    counts = np.bincount(labels)
    eligible = np.flatnonzero(counts[labels] >= 2)
    k = max(1, round(add * n))
    src = rng.choice(eligible, size=k, replace=False)
    E = np.asarray(faces.column("embedding").combine_chunks().flatten().to_numpy(), np.float32).reshape(n, -1)
    new_faces, new_imgs = [], []
    rows = faces.take(pa.array(src)).to_pylist()
    img_of = {r["uid"]: r for r in images.to_pylist()}
    for j, (i, r) in enumerate(zip(src.tolist(), rows)):
        uid = f"{int(rng.integers(0, 2**62)):016x}"
        e = E[i] + rng.normal(0, 0.02, E.shape[1]).astype(np.float32)
        w, h = int(r["x2"] - r["x1"]) + 200, int(r["y2"] - r["y1"]) + 160
        dx, dy = 100 - r["x1"], 80 - r["y1"]
        new_faces.append({**r, "uid": uid, "face_index": 0, "x1": r["x1"] + dx, "x2": r["x2"] + dx, "y1": r["y1"] + dy,
                          "y2": r["y2"] + dy, "landmarks": [v + (dx if q % 2 == 0 else dy) for q, v in enumerate(r["landmarks"])],
                          "embedding": e.tolist(), "image_width": w, "image_height": h})
        new_imgs.append({**img_of[r["uid"]], "uid": uid, "width": w, "height": h, "caption": "a photo of 1 person"})
    b = root / "B"
    b.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables([images, pa.Table.from_pylist(new_imgs, schema=images.schema)]), b / "images.parquet")
    pq.write_table(pa.concat_tables([faces, pa.Table.from_pylist(new_faces, schema=faces.schema)]), b / "faces.parquet")
    new_ids = pa.table({"uid": [f["uid"] for f in new_faces], "face_index": pa.array([0] * k, ids.schema.field("face_index").type),
                        "identity_id": [f"id{int(labels[i]):06d}" for i in src]})
    pq.write_table(pa.concat_tables([ids, new_ids]), b / "identities.parquet")
    return {**info, "added_faces": k, "added_identities": len(set(labels[src].tolist()))}


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its waited-for children (the builder's forked workers)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def write_photo_files(data: Path, folder: Path) -> dict:
    """Every photo of the collection ``data`` synthesised once into ``folder/<uid>.jpg`` (not timed)."""
    import pyarrow.parquet as pq

    from bench.bench_collection import synth_jpeg

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    images = pq.read_table(data / "images.parquet", columns=["uid", "width", "height"]).to_pydict()
    n = 0
    for uid, w, h in zip(images["uid"], images["width"], images["height"]):
        path = folder / f"{uid}.jpg"
        if not path.exists():
            path.write_bytes(synth_jpeg(uid, w, h))
            n += 1
    return {"photos_written": n, "seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum(p.stat().st_size for p in folder.iterdir())}


def file_reader(folder: Path):
    """read_bytes(uid) over the photo files; counts the reads (this process's)."""
    calls = {"n": 0, "s": 0.0, "cpu_s": 0.0}

    def read_bytes(uid: str) -> bytes:
        calls["n"] += 1
        return (folder / f"{uid}.jpg").read_bytes()

    read_bytes.calls = calls
    return read_bytes


def step(data: Path, out: Path, reuse: Path | None, cap: int, keypoints: bool, workers: int = 1,
         guard_cache: Path | None = None, photos: Path | None = None) -> dict:
    """One build in this process: CPU s, wall s, peak RSS, the build's stats. ``photos``: the folder of
    photo files (else each photo is synthesised when read, inside the timed build)."""
    import pyarrow.parquet as pq

    from bench.bench_collection import reader
    from pipeline.multiid import MultiIDConfig, build_multiid_dataset

    images, faces, ids = (pq.read_table(data / f"{t}.parquet") for t in ("images", "faces", "identities"))
    cfg = MultiIDConfig(max_candidates_per_person=cap, keypoints=keypoints)
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    c0, w0 = _cpu_with_children(), time.perf_counter()
    read_bytes = reader(images) if photos is None else file_reader(photos)
    # photos decoded for the copy-paste guard (pHashes, NCC patches, keypoints) in this process
    from pipeline.multiid import dedup

    decodes = {"n": 0}
    open_gray = dedup.open_gray

    def counted_open_gray(data):
        decodes["n"] += 1
        return open_gray(data)

    dedup.open_gray = counted_open_gray
    # the build's progress lines on stderr (a step's stdout is its JSON)
    res = build_multiid_dataset(images, faces, ids, out, cfg, read_bytes=read_bytes, version="bench", reuse_from=reuse,
                                workers=workers, guard_cache=guard_cache, progress=lambda line: print(line, file=sys.stderr, flush=True))
    st = res.stats
    return {"cpu_s": round(_cpu_with_children() - c0, 1), "wall_s": round(time.perf_counter() - w0, 1),
            # this bench synthesising the photos it reads (this process's reads only: not its workers'); 0 with files
            "synthesis_cpu_s_parent": round(read_bytes.calls["cpu_s"], 1), "photos_read_parent": read_bytes.calls["n"],
            "photo_reads": "synthesised" if photos is None else "files", "photos_decoded_parent": decodes["n"],
            "workers": workers, "targets": sum(st["targets"].values()),
            "load_avg_1min": [round(load0, 1), round(os.getloadavg()[0], 1)],  # before, after (other jobs share the cores)
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024, 2),
            "worker_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024, 2),
            "samples": sum(st["per_split"].values()), "buckets": st["buckets_reused"] + st["buckets_rebuilt"],
            **{k: st[k] for k in ("buckets_reused", "buckets_rebuilt", "selections_run", "targets_reused", "targets_reselected",
                                  "reselect_reasons", "bytes_copied", "bytes_written", "bytes_reused")},
            **{k: st.get(k) for k in ("guard_decisions_reused", "guard_decisions_computed", "targets_derived", "not_derived_because",
                                  "candidates_screened_from_previous", "candidate_rows_changed_by_walk",
                                  "photo_hashes_reused", "photo_hashes_computed",
                                  "face_features_reused", "face_features_computed", "face_features_entries",
                                  "face_features_bytes")}}


def largest_component_share(data: Path) -> float:
    import pyarrow.parquet as pq

    from pipeline.multiid.plan import _cooccurrence_components

    ids = pq.read_table(data / "identities.parquet").to_pydict()
    by_uid: dict[str, list] = {}
    for u, i in zip(ids["uid"], ids["identity_id"]):
        by_uid.setdefault(u, []).append(type("F", (), {"identity_id": i})())
    comp = _cooccurrence_components(by_uid)
    sizes: dict[int, int] = {}
    for i in ids["identity_id"]:
        sizes[id(comp[i])] = sizes.get(id(comp[i]), 0) + 1
    return max(sizes.values()) / len(ids["identity_id"])


def files_equal(a: Path, b: Path) -> list[str]:
    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    da, db = digest(a), digest(b)
    return [k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]


def _run_step(args, data: Path, out: Path, reuse: Path | None, workers: int, guard: Path | None = None) -> dict:
    """One build in a subprocess (:func:`step`): its CPU s (with its workers'), wall s, peak RSS, stats."""
    cmd = [sys.executable, __file__, "--cap", str(args.cap), *(["--no-keypoints"] if args.no_keypoints else []),
           "--workers", str(workers), "--step", str(data), str(out), str(reuse) if reuse else "-",
           *(["--guard-cache", str(guard)] if guard else []), *(["--synth-reads"] if args.synth_reads else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def efficiency(root: Path, info: dict, counts: list[int], args) -> int:
    """Fresh builds of A, one per worker count, ``args.efficiency`` rounds back to back (1, 2, 1, 2, ...: a
    change of load hits both alike); medians per worker count. Efficiency = median wall(first count) x that
    count / (n x median wall(n)); CPU overhead = median CPU s(n) / median CPU s(first count)."""
    import statistics

    runs: dict[int, list[dict]] = {w: [] for w in counts}
    for k in range(args.efficiency):
        for w in counts:
            runs[w].append(_run_step(args, root / "A", root / f"out-A-w{w}", None, w))
            print(json.dumps({"round": k, "workers": w, **{x: runs[w][-1][x] for x in ("cpu_s", "wall_s", "load_avg_1min")}}),
                  flush=True)
    same = all(not files_equal(root / f"out-A-w{counts[0]}", root / f"out-A-w{w}") for w in counts[1:])
    med = {w: {"wall_s": statistics.median(r["wall_s"] for r in runs[w]), "cpu_s": statistics.median(r["cpu_s"] for r in runs[w]),
               "worker_peak_rss_gb": max(r["worker_peak_rss_gb"] for r in runs[w]), "peak_rss_gb": max(r["peak_rss_gb"] for r in runs[w])}
           for w in counts}
    base = counts[0]
    for w in counts:
        med[w]["parallel_efficiency"] = round(med[base]["wall_s"] * base / (w * med[w]["wall_s"]), 3)
        med[w]["cpu_overhead"] = round(med[w]["cpu_s"] / max(med[base]["cpu_s"], 0.1), 3)
    res = {"collection": info, "config": {"max_candidates_per_person": args.cap, "keypoints": not args.no_keypoints},
           "cpus": os.cpu_count(), "runs": {str(w): r for w, r in runs.items()}, "medians": {str(w): m for w, m in med.items()},
           "byte_identical": same}
    path = REPO / "bench" / "results" / f"multiid-efficiency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print("| workers | median wall s | median CPU s | efficiency | CPU overhead | peak RSS GB (largest worker) |")
    print("|---|---|---|---|---|---|")
    for w in counts:
        m = med[w]
        print(f"| {w} | {m['wall_s']} | {m['cpu_s']} | {m['parallel_efficiency']} | {m['cpu_overhead']} | "
              f"{m['peak_rss_gb']} ({m['worker_peak_rss_gb']}) |")
    print(f"loads (1 min, before/after each run): {[r['load_avg_1min'] for w in counts for r in runs[w]]}")
    print(f"{args.efficiency} rounds on {os.cpu_count()} CPUs; outputs byte-identical across worker counts: {same}  ({path})")
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=3000)
    ap.add_argument("--add", type=float, default=0.01)
    ap.add_argument("--cap", type=int, default=200, help="MultiIDConfig.max_candidates_per_person (200, as in production)")
    ap.add_argument("--no-keypoints", action="store_true")
    ap.add_argument("--root", default="/tmp/wt-mreuse/refresh")
    ap.add_argument("--workers", default="1", help="worker counts to run every build with, e.g. 1,2")
    ap.add_argument("--efficiency", type=int, default=0, metavar="N",
                    help="only fresh builds of collection A, with each worker count of --workers in turn, N rounds "
                         "back to back: medians of wall and CPU s, parallel efficiency and CPU overhead")
    ap.add_argument("--step", nargs=3, metavar=("DATA", "OUT", "REUSE"))
    ap.add_argument("--guard-cache", default=None, help="(with --step) the guard's decisions file")
    ap.add_argument("--synth-reads", action="store_true",
                    help="synthesise each photo when a build reads it, inside the timed build (the old way), instead of "
                         "reading the photo files written once beforehand")
    ap.add_argument("--keep-photos", action="store_true",
                    help="keep <root>/photos from an earlier run with the same --faces (drawing 60k photos takes minutes)")
    args = ap.parse_args()
    counts = [int(w) for w in str(args.workers).split(",")]
    if args.step:
        data, out, reuse = args.step
        photos = None if args.synth_reads else Path(data).parent / "photos"
        print(json.dumps(step(Path(data), Path(out), None if reuse == "-" else Path(reuse), args.cap, not args.no_keypoints,
                              counts[0], Path(args.guard_cache) if args.guard_cache else None, photos)))
        return 0
    root = Path(args.root)
    if args.keep_photos:  # the same collection is drawn again (same seed); the photo files are taken as they are
        for p in root.glob("out-*"):
            shutil.rmtree(p)
        for p in root.glob("guard*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    else:
        shutil.rmtree(root, ignore_errors=True)
    info = make_collections(args.faces, args.add, root)
    if not args.synth_reads:  # B's photos hold A's
        info["photo_files"] = write_photo_files(root / "B", root / "photos")
    if args.efficiency:
        return efficiency(root, info, counts, args)
    info["largest_component_share_of_faces"] = round(largest_component_share(root / "B"), 3)

    def run(data, out, reuse, workers, guard=None):
        return _run_step(args, data, out, reuse, workers, guard)

    res = {"collection": info, "config": {"max_candidates_per_person": args.cap, "keypoints": not args.no_keypoints}}
    ok = True
    for w in counts:
        sfx = "" if w == counts[0] else f"-w{w}"
        # A builds the guard's decisions file; B's refresh reads it (as the asset does: it lives under the home),
        # B's fresh build has none
        guard = root / f"guard{sfx}.parquet"
        guard.unlink(missing_ok=True)
        res[f"A_fresh{sfx}"] = run(root / "A", root / f"out-A{sfx}", None, w, guard)
        res[f"B_fresh{sfx}"] = run(root / "B", root / f"out-B-fresh{sfx}", None, w)
        res[f"B_refresh{sfx}"] = run(root / "B", root / f"out-B-refresh{sfx}", root / f"out-A{sfx}", w, guard)
        res[f"B_refresh_equals_fresh{sfx}"] = not files_equal(root / f"out-B-fresh{sfx}", root / f"out-B-refresh{sfx}")
        ok &= res[f"B_refresh_equals_fresh{sfx}"]
        if sfx:
            same = not files_equal(root / "out-B-fresh", root / f"out-B-fresh{sfx}")
            res[f"B_fresh{sfx}_equals_{counts[0]}_worker"] = same
            ok &= same
            for k in ("A_fresh", "B_fresh", "B_refresh"):
                res[f"{k}{sfx}"]["parallel_efficiency"] = round(
                    res[k]["wall_s"] * counts[0] / (w * res[f"{k}{sfx}"]["wall_s"]), 2)
                # what the wall-based figure cannot hide on a shared machine: the CPU the workers add
                res[f"{k}{sfx}"]["cpu_overhead"] = round(res[f"{k}{sfx}"]["cpu_s"] / max(res[k]["cpu_s"], 0.1), 2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = REPO / "bench" / "results" / f"multiid-refresh-{stamp}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["collection"]))
    print("| build | workers | CPU s | CPU s / target | wall s | efficiency | CPU overhead | load | peak RSS GB (worker) | "
          "buckets rebuilt/all | targets reselected / derived / reused | reasons |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in res.items():
        if not isinstance(r, dict) or "cpu_s" not in r:
            continue
        print(f"| {k} | {r['workers']} | {r['cpu_s']} | {r['cpu_s'] / max(1, r['targets']):.3f} | {r['wall_s']} | "
              f"{r.get('parallel_efficiency', '')} | {r.get('cpu_overhead', '')} | {r['load_avg_1min']} | "
              f"{r['peak_rss_gb']} ({r['worker_peak_rss_gb']}) | "
              f"{r['buckets_rebuilt']}/{r['buckets']} | {r['targets_reselected']} / {r.get('targets_derived')} / {r['targets_reused']} | "
              f"{r['reselect_reasons']} |")
    for w in counts:
        sfx = "" if w == counts[0] else f"-w{w}"
        r = res[f"B_refresh{sfx}"]
        print(f"{w} worker(s): B refresh {res[f'B_fresh{sfx}']['wall_s'] / r['wall_s']:.1f}x faster than B fresh (wall), "
              f"{res[f'B_fresh{sfx}']['cpu_s'] / max(r['cpu_s'], 0.1):.1f}x (CPU); guard decisions reused "
              f"{r['guard_decisions_reused']}, computed {r['guard_decisions_computed']}")
    print(f"refresh byte-identical to fresh, and n workers to {counts[0]}: {ok}  ({path})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
