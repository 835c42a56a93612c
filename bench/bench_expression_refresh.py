"""Expression dataset refresh: a collection gains 1% new photos; the new version is written fresh and
as a refresh of the previous one (buckets whose pairs all stayed are hard-linked, changed buckets copy
the crops of their unchanged pairs from the previous tars). Both must give the same files.

    .venv/bin/python bench/bench_expression_refresh.py --n 20000 --new 0.01 --repeat 3

Synthetic: bench_collection.generate's collection (embeddings, boxes, expression descriptors, JPEGs
synthesised per uid); identities are the generator's true labels (no clustering: this measures the
dataset writer). Real: build_expression_pairs and write_expression_dataset with the asset's crop rule
(decode the photo, cut the face). One process, one core for the writer. Prints a JSON summary and writes
bench/results/expression-refresh-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _tars(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def main() -> int:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from bench_collection import generate, reader
    from PIL import Image

    from pipeline.expression.pairs import PairConfig, build_expression_pairs, write_expression_dataset
    from pipeline.faces.calibration import thresholds_for
    from pipeline.faces.crops import face_crop

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--new", type=float, default=0.01, help="share of photos that arrive in the refresh")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--root", default="/tmp/expression-refresh")
    args = ap.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    info = generate(args.n, data)
    images, faces, desc = (pq.read_table(data / f"{t}.parquet") for t in ("images", "faces", "descriptors"))
    labels = np.load(data / "labels.npy")
    faces = faces.append_column("identity_id", pa.array([f"id-{int(x):07d}" for x in labels]))
    rng = np.random.default_rng(7)
    uids = np.array(images.column("uid").to_pylist())
    new_uids = set(rng.choice(uids, size=max(1, round(args.new * len(uids))), replace=False).tolist())
    keep = pc.invert(pc.is_in(faces.column("uid"), pa.array(sorted(new_uids))))
    before_faces, before_desc = faces.filter(keep), desc.filter(pc.invert(pc.is_in(desc.column("uid"), pa.array(sorted(new_uids)))))
    cfg = PairConfig(max_identity_cos=thresholds_for("dlib").different_person_max)
    read_bytes = reader(images)
    boxes = {(u, int(f)): b for u, f, *b in zip(*(faces.column(c).to_pylist() for c in ("uid", "face_index", "x1", "y1", "x2", "y2")))}
    crops = {"n": 0}

    def crop(uid, face_index):  # as the asset's CropReader.crop, over the synthesised bytes
        crops["n"] += 1
        rgb = np.asarray(Image.open(io.BytesIO(read_bytes(uid))).convert("RGB"))
        return np.asarray(face_crop(rgb, boxes[(uid, int(face_index))]))

    def crop_inputs(uid, face_index):
        return [uid, boxes[(uid, int(face_index))]]

    def write(pairs, folder, reuse_from=None):
        shutil.rmtree(folder, ignore_errors=True)
        report: dict = {}
        crops["n"] = 0
        t, c = time.perf_counter(), time.process_time()
        write_expression_dataset(pairs, crop, folder, cfg, version="bench", crop_inputs=crop_inputs,
                                 reuse_from=reuse_from, report=report)
        return {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "crops_cut": crops["n"],
                **{k: v for k, v in report.items() if k != "buckets_not_reused_corrupt"}}

    before = build_expression_pairs(before_faces, before_desc, cfg).pairs
    after = build_expression_pairs(faces, desc, cfg).pairs
    ids_b, ids_a = set(before.column("pair_id").to_pylist()), set(after.column("pair_id").to_pylist())
    write(before, root / "v1")
    runs = {"fresh": [], "refresh": []}
    same = True
    for _ in range(args.repeat):
        runs["fresh"].append(write(after, root / "v2-fresh"))
        runs["refresh"].append(write(after, root / "v2-refresh", reuse_from=root / "v1"))
        same &= _tars(root / "v2-fresh") == _tars(root / "v2-refresh")
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    out = {
        "collection": info, "new_photos": len(new_uids),
        "pairs_before": before.num_rows, "pairs_after": after.num_rows,
        "pairs_new": len(ids_a - ids_b), "pairs_gone": len(ids_b - ids_a),
        "median": med, "speedup_wall": med["fresh"]["wall_s"] / max(med["refresh"]["wall_s"], 1e-9),
        "speedup_cpu": med["fresh"]["cpu_s"] / max(med["refresh"]["cpu_s"], 1e-9),
        "identical_tars": same, "repeat": args.repeat, "cores": 1,
    }
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / f"expression-refresh-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps(out, indent=1, default=float))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
