"""Build the multi-identity dataset on ../shared/data/faces and print counts and distributions.

    .venv/bin/python bench/bench_multiid.py [--min-face-px 60] [--eval-fraction 0.2] [--out /tmp/multiid] [--calibrate]

Faces: pipeline.faces dlib backend when present, else direct dlib (pipeline/multiid/localfaces.py).
Identities: folder names for identities/*; group-photo faces get the nearest labelled identity when
cosine >= sim_low (Hungarian within each photo), else stay unlabelled (open set).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.multiid import MultiIDConfig, build_multiid_dataset  # noqa: E402
from pipeline.multiid.calibration import calibrate_on_folder  # noqa: E402
from pipeline.multiid.localfaces import faces_tables, get_face_backend, label_groups_by_nearest, shared_faces_files  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "faces"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-face-px", type=float, default=100.0)
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--out", default="/tmp/multiid_bench")
    ap.add_argument("--calibrate", action="store_true")
    a = ap.parse_args()
    be = get_face_backend("dlib")
    if a.calibrate:
        print(json.dumps(calibrate_on_folder(ROOT, be).to_dict(), indent=1))
    t = time.time()
    images, faces, ids = faces_tables(shared_faces_files(ROOT), be, source="shared_faces")
    t_faces = time.time() - t
    cfg = MultiIDConfig(min_face_px=a.min_face_px, eval_fraction=a.eval_fraction)
    groups = {r["uid"] for r in images.to_pylist() if "/groups/" in r["path"]}
    ids = label_groups_by_nearest(faces, ids, groups, min_sim=cfg.resolved().sim_low)
    t = time.time()
    res = build_multiid_dataset(images, faces, ids, Path(a.out), cfg)
    st = {k: v for k, v in res.stats.items() if not k.startswith("similarity_hist")}
    st["similarity_hist_selected"] = res.stats["similarity_hist_selected"]["nonzero"]
    st["timing_s"] = {"faces": round(t_faces, 1), "build": round(time.time() - t, 1)}
    st["shards"] = {k: [(s.name, s.samples, s.bytes) for s in v] for k, v in res.shards.items()}
    print(json.dumps(st, indent=1, default=str))
    Path(a.out, "contact_sheet.png").write_bytes(res.contact_sheet(n=6))


if __name__ == "__main__":
    main()
