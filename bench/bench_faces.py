"""Face-stage benchmark on ../shared/data/faces: our dlib backend (HOG, MTCNN) vs face_recognition.

Usage: .venv/bin/python bench/bench_faces.py [--repeats 3] [--variants hog,mtcnn,face_recognition]
Prints a markdown table and writes JSON to bench/results/faces-<timestamp>.json.
Throughput counts decoded-array in, embeddings out (decode is excluded for every variant).
Both wall time and process CPU time are recorded: on a shared machine the wall time swings
with other load, CPU seconds do not (every variant here runs on one thread).
Recall = fraction of identity photos (one person each) with >= 1 face found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = (REPO.parent / "shared" / "data" / "faces").resolve()


def load(folder: Path) -> list[tuple[str, np.ndarray]]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
            out.append((str(p.relative_to(DATA)), np.asarray(Image.open(p).convert("RGB"))))
    return out


def run_ours(backend, images, batch_size=8):
    from pipeline.faces.stage import detect_faces

    items = [(name, name, im) for name, im in images]
    t0, c0 = time.perf_counter(), time.process_time()
    table, _without, _ = detect_faces(items, backend, batch_size=batch_size)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    counts = {}
    for uid in table.column("uid").to_pylist():
        counts[uid] = counts.get(uid, 0) + 1
    widths = dict.fromkeys(counts, None)
    for uid, w in zip(table.column("uid").to_pylist(), table.column("face_width").to_pylist()):
        widths[uid] = [*(widths[uid] or []), w]
    return dt, cpu, counts, table, widths


def run_face_recognition(images):
    import face_recognition

    t0, c0 = time.perf_counter(), time.process_time()
    counts, widths = {}, {}
    for name, im in images:
        locs = face_recognition.face_locations(im)
        encs = face_recognition.face_encodings(im, locs)
        counts[name] = len(encs)
        widths[name] = [r - l for (_t, r, _b, l) in locs]
    return time.perf_counter() - t0, time.process_time() - c0, counts, widths


def same_vs_diff(table) -> dict:
    """Median same-identity / different-identity cosine among identity photos with one face."""
    uids = table.column("uid").to_pylist()
    emb = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy()).reshape(len(uids), -1)
    by = {}
    for i, u in enumerate(uids):
        if u.startswith("identities/"):
            by.setdefault(u, []).append(i)
    rows = [v[0] for v in by.values() if len(v) == 1]
    ids = np.array([uids[i].split("/")[1] for i in rows])
    E = emb[rows]
    S = E @ E.T
    iu = np.triu_indices(len(rows), 1)
    same = ids[iu[0]] == ids[iu[1]]
    return {
        "same_median_cos": float(np.median(S[iu][same])),
        "diff_median_cos": float(np.median(S[iu][~same])),
        "diff_max_cos": float(S[iu][~same].max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="hog,mtcnn,face_recognition")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--groups-only", action="store_true", help="only the group photos (face counts by size)")
    args = ap.parse_args()
    torch_threads = None
    ids = load(DATA / "identities")
    groups = load(DATA / "groups")
    if args.groups_only:
        ids = []
    images = ids + groups
    n_ids = len(ids)
    print(f"{len(ids)} identity photos, {len(groups)} group photos; {os.cpu_count()} CPUs", flush=True)

    from pipeline.faces import get_backend

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    backends = {}
    if "hog" in variants:
        backends["hog"] = get_backend("dlib", detector="hog")
    if "hog_dlib_descriptor" in variants:  # dlib's own C++ descriptor instead of the PyTorch port
        backends["hog_dlib_descriptor"] = get_backend("dlib", detector="hog", descriptor="dlib")
    if "hog_nobatch" in variants:
        backends["hog_nobatch"] = get_backend("dlib", detector="hog", descriptor="dlib", batch_descriptors=False)
    if "hog_2048" in variants:
        backends["hog_2048"] = get_backend("dlib", detector="hog", detect_max_side=2048)
    if "hog_up1" in variants:
        backends["hog_up1"] = get_backend("dlib", detector="hog", upsample=1)
    if "mtcnn" in variants:
        import torch

        torch_threads = torch.get_num_threads()
        backends["mtcnn"] = get_backend("dlib", detector="mtcnn")

    results = {}
    for rep in range(args.repeats):
        for v in variants:
            if v == "face_recognition":
                dt, cpu, counts, widths = run_face_recognition(images)
                extra = {}
            else:
                dt, cpu, counts, table, widths = run_ours(backends[v], images, args.batch_size)
                extra = same_vs_diff(table) if rep == 0 and ids else {}
            found_ids = sum(1 for name, _ in ids if counts.get(name, 0) > 0)
            group_faces = sum(counts.get(name, 0) for name, _ in groups)
            extra["group_faces_ge_100px"] = sum(
                1 for name, _ in groups for w in (widths.get(name) or []) if w >= 100
            )
            faces = sum(counts.values())
            r = results.setdefault(
                v,
                {
                    "times": [],
                    "recall": found_ids / max(n_ids, 1),
                    "group_faces": group_faces,
                    "faces": faces,
                },
            )
            r["times"].append(dt)
            r.setdefault("cpu_times", []).append(cpu)
            r.update(extra)
            print(
                f"rep {rep} {v}: {dt:.2f}s wall, {cpu:.2f}s cpu, recall {found_ids}/{n_ids}, group faces {group_faces}",
                flush=True,
            )

    fr = results.get("face_recognition")
    base = statistics.median(fr["times"]) if fr else None
    base_cpu = statistics.median(fr["cpu_times"]) if fr else None
    lines = [
        (
            "| variant | median wall s | images/s (wall) | faces/s (wall) | median CPU s | images/CPU-s "
            "| recall (identities) | faces on groups (>= 100 px wide) "
            "| speed-up wall / CPU vs face_recognition | same-id median cos | diff-id median cos |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        med = statistics.median(r["times"])
        r["median_s"] = med
        r["images_per_s"] = len(images) / med
        r["faces_per_s"] = r["faces"] / med
        cpu = statistics.median(r["cpu_times"])
        r["median_cpu_s"] = cpu
        r["images_per_cpu_s"] = len(images) / cpu
        r["speedup"] = base / med if base else None
        r["speedup_cpu"] = base_cpu / cpu if base_cpu else None
        sp = f"{r['speedup']:.2f}x / {r['speedup_cpu']:.2f}x" if r["speedup"] else "-"
        same = f"{r['same_median_cos']:.3f}" if "same_median_cos" in r else "-"
        diff = f"{r['diff_median_cos']:.3f}" if "diff_median_cos" in r else "-"
        lines.append(
            f"| {v} | {med:.2f} | {r['images_per_s']:.2f} | {r['faces_per_s']:.2f} | {cpu:.2f} "
            f"| {r['images_per_cpu_s']:.2f} | {r['recall']:.3f} | {r['group_faces']} ({r['group_faces_ge_100px']}) | {sp} | {same} | {diff} |"
        )
    table_md = "\n".join(lines)
    print(table_md)
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch_threads": torch_threads,
        },
        "images": len(images),
        "identity_images": n_ids,
        "group_images": len(groups),
        "repeats": args.repeats,
        "results": results,
        "backends": {k: repr(b) for k, b in backends.items()},
        "table": table_md,
    }
    d = REPO / "bench" / "results"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"faces-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
