"""Build the multi-identity dataset on ../shared/data/faces and print counts and distributions.

    .venv/bin/python bench/bench_multiid.py [--min-face-px 60] [--eval-fraction 0.2] [--out /tmp/multiid] [--calibrate]
        [--keypoints [--extra-photos DIR]] [--matcher [--repeats 3]]

--calibrate: similarity band (calibration.calibrate_on_folder). --keypoints: inlier-count / inlier-ratio
distributions of the keypoint same-shot check, genuine same-person pairs vs synthetic copies, the
operating point of the configured thresholds, and bbt_* crops vs the groups/face-api.js__bbt* stills
(calibration.keypoint_distributions). --extra-photos: a folder of obama*.jpg / biden.jpg (face_recognition
1.3.0 tests/test_images) added as identities "obama" / "biden"; their three obama crops are a known
same-shot set. --matcher: only the keypoint matcher's CPU time (dedup.keypoint_match, one core, one BLAS
thread) over ordered pairs of the photos' faces, with opencv's batchDistance and with the exact matrix
product, side by side, each repeated; the two must agree on every pair.

Faces: ``pipeline.faces.get_backend("dlib")``.
Identities: folder names for identities/*; group-photo faces get the nearest labelled identity when
cosine >= sim_low (Hungarian within each photo), else stay unlabelled (open set).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.faces import get_backend
from pipeline.faces.calibration import calibrate_on_folder, keypoint_distributions
from pipeline.faces.folders import (
    faces_tables,
    label_groups_by_nearest,
    labelled_files,
)
from pipeline.multiid import MultiIDConfig, build_multiid_dataset

ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "faces"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-face-px", type=float, default=100.0)
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--out", default="/tmp/multiid_bench")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--keypoints", action="store_true")
    ap.add_argument("--extra-photos", default=None)
    ap.add_argument("--matcher", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    be = get_backend("dlib")
    if a.matcher:
        matcher_report(be, a.repeats)
        return
    if a.calibrate:
        print(json.dumps(calibrate_on_folder(ROOT, be).to_dict(), indent=1))
    if a.keypoints:
        keypoint_report(be, a.extra_photos)
    t = time.time()
    images, faces, ids = faces_tables(labelled_files(ROOT), be, source="shared_faces")
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


NEAR_DUPLICATES = [  # inspected by eye: the same photo (README: "several pairs are near-duplicates")
    {"john_salley/000189_02159361.jpg", "john_salley/000192_02159531.jpg"},
    {"john_simm/000300_00470148.jpg", "john_simm/000304_00470122.jpg"},
    {"john_shimkus/000375_03227651.jpg", "john_shimkus/000376_02340068.jpg"},
    {"test_images/obama.jpg", "test_images/obama_partial_face.jpg", "test_images/obama_partial_face2.jpg"},
]


def keypoint_report(be, extra_dir) -> None:
    import cv2
    import numpy as np

    from pipeline.faces.folders import load_rgb_bytes
    from pipeline.multiid import dedup

    cfg = MultiIDConfig()
    extra = []
    if extra_dir:
        extra = [(p, "obama" if "obama" in p.name else "biden") for p in sorted(Path(extra_dir).glob("*.jpg")) if p.name.startswith(("obama", "biden"))]
    t = time.time()
    d = keypoint_distributions(ROOT, be, extra, NEAR_DUPLICATES)

    def rule(r):
        return dedup.keypoint_same_shot(dedup.KeypointMatch(r[0], r[2], r[1], False), cfg.kp_min_inliers, cfg.kp_min_ratio, cfg.kp_strong_inliers)

    g, c = d["rows"]["genuine"], d["rows"]["copies"]
    out = {k: v for k, v in d.items() if k != "rows"}
    out["thresholds"] = {"kp_min_inliers": cfg.kp_min_inliers, "kp_min_ratio": cfg.kp_min_ratio, "kp_strong_inliers": cfg.kp_strong_inliers}
    out["copies_caught"] = round(float(np.mean([rule(r) for r in c])), 4)
    out["genuine_flagged"] = round(float(np.mean([rule(r) for r in g])), 4)
    out["genuine_flagged_pairs"] = [r for r in g if rule(r)]
    out["copies_missed"] = [r for r in c if not rule(r)]
    # bbt_* identity crops vs every face of the face-api.js bbt stills
    def kps(path):
        rgb = load_rgb_bytes(Path(path).read_bytes())
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return [(i, dedup.face_keypoints(gray, f.bbox)) for i, f in enumerate(be.analyze([rgb])[0])]

    stills = [(p.name, i, k) for p in sorted((ROOT / "groups").glob("face-api.js__bbt*.jpg")) for i, k in kps(p)]
    bbt = []
    for p in sorted((ROOT / "identities").glob("bbt_*/*")):
        for _, k in kps(p)[:1]:
            m, still, i = max(((dedup.keypoint_match(k, ks), sn, i) for sn, i, ks in stills), key=lambda t: t[0].inliers)
            bbt.append({"crop": f"{p.parent.name}/{p.name}", "still": still, "face": i, "inliers": m.inliers, "ratio": m.ratio,
                        "same_shot": dedup.keypoint_same_shot(m, cfg.kp_min_inliers, cfg.kp_min_ratio, cfg.kp_strong_inliers)})
    out["bbt_crops_vs_stills"] = bbt
    out["timing_s"] = round(time.time() - t, 1)
    print(json.dumps(out, indent=1, default=str))


def matcher_report(be, repeats: int, max_faces: int = 120) -> None:
    import statistics

    import cv2
    from threadpoolctl import threadpool_limits

    from pipeline.faces.folders import load_rgb_bytes
    from pipeline.multiid import dedup

    kps = []
    for p in sorted(ROOT.glob("*/*/*.jpg")) + sorted(ROOT.glob("groups/*.jpg")):
        if len(kps) >= max_faces:
            break
        rgb = load_rgb_bytes(p.read_bytes())
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        kps += [dedup.face_keypoints(gray, f.bbox) for f in be.analyze([rgb])[0]]
    kps = kps[:max_faces]
    plain = []  # the same keypoints without squared norms: opencv's batchDistance path
    for k in kps:
        c = dedup.KeypointSet(k.pts, k.desc, k.pts_m, k.desc_m, k.size)
        c.sq = c.sq_m = None
        plain.append(c)
    pairs = [(i, j) for i in range(len(kps)) for j in range(len(kps)) if i != j]
    times = {"batchDistance": [], "product": []}
    with threadpool_limits(1, user_api="blas"):
        for _ in range(repeats):
            for name, sets in (("batchDistance", plain), ("product", kps)):
                t = time.process_time()
                got = [dedup.keypoint_match(sets[i], sets[j]) for i, j in pairs]
                times[name].append(time.process_time() - t)
                if name == "batchDistance":
                    want = got
                elif got != want:
                    raise SystemExit("the two matchers disagree")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"faces": len(kps), "ordered_pairs": len(pairs), "keypoints_median": statistics.median(len(k.pts) for k in kps),
           "repeats": repeats, "cpu_s": times, "ms_per_pair_median": {k: round(1000 * v / len(pairs), 3) for k, v in med.items()},
           "speedup": round(med["batchDistance"] / med["product"], 2), "identical": True}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
