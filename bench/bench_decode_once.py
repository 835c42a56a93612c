"""Separate per-image stages against the fused pass (pipeline/per_image.py), side by side in one run.

Usage: .venv/bin/python bench/bench_decode_once.py [--copies 4] [--backend dlib|torch [--device cuda]] [--json out.json]
Input: the shared photos (../shared/data/faces, every image file) referenced ``--copies`` times as that
many partitions (nothing copied: each partition lists the same files). Each partition goes through
ingestion, faces (``--backend dlib``: dlib with HOG, the CPU fused pass; ``--backend torch``: the batched
torch stage on ``--device``, CPU by default, which decodes photos itself, the device-fused pass), expressions (FER) and
image-level scores (the scorers configured by
LINEUP_CLIP_WEIGHTS etc.; without weights they are unavailable and only the photos' reading and decoding
is done for them), once as four separate stages and once fused. One process, one torch thread, no
worker processes, so every read and decode is counted here:

- reads and bytes: calls of pipeline.sources.read_bytes, through which every stage reads a photo;
- decodes: photos decoded (pipeline/read_counter.py: pipeline.decode.decode_image under either name, which
  ingestion, every re-reading stage and the torch stage's CPU decoder call, and nvjpeg's images on CUDA);
- rchar: bytes the process read through system calls (/proc/self/io), a count independent of both;
- CPU-s (process_time plus children) and wall.

The tables of both ways are compared (Table.equals) and the result says whether they are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LINEUP_SHARED_FACES") or (REPO.parent / "shared" / "data" / "faces")).resolve()


def _snapshot(counter) -> dict:
    return {"reads": counter.reads, "bytes": counter.bytes, "decodes": counter.decodes, "rchar": _rchar(),
            "cpu_s": _cpu_s(), "wall_s": time.perf_counter()}


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _cpu_s() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def _delta(a: dict, b: dict) -> dict:
    return {k: round(b[k] - a[k], 3) for k in a}


def decode_ms_per_photo(min_pixels: int = 1_000_000) -> dict:
    """CPU ms of one read + decode (pipeline.ingest.load_image's work) per photo of at least ``min_pixels``
    (web-photo sized), the median of 3 passes: what each re-reading stage spends per photo before its model."""
    import statistics

    from PIL import Image

    from pipeline.decode import decode_image

    big = []
    for p in sorted(DATA.rglob("*")):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
            with Image.open(p) as im:
                if im.width * im.height >= min_pixels:
                    big.append(p)
    passes = []
    for _ in range(3):
        c0 = time.process_time()
        for p in big:
            decode_image(p.read_bytes())
        passes.append((time.process_time() - c0) * 1000 / max(1, len(big)))
    return {"photos": len(big), "cpu_ms_per_photo": round(statistics.median(passes), 1),
            "mean_bytes": round(sum(p.stat().st_size for p in big) / max(1, len(big)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--backend", choices=("dlib", "torch"), default="dlib",
                    help="dlib: HOG on CPU arrays; torch: the batched torch stage on the CPU device")
    ap.add_argument("--device", default="cpu", help="the torch stage's device (cuda: nvjpeg decodes; a GPU check)")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from pipeline.expression.descriptor import ExpressionConfig, ExpressionStage, describe_partition
    from pipeline.faces import get_backend
    from pipeline.faces.stage import run_face_partition
    from pipeline.ingest import ingest_partition
    from pipeline.per_image import PerImageModels, fused_partition
    from pipeline.read_counter import ReadDecodeCounter
    from pipeline.scoring.stage import ScoringConfig, score_partition
    from pipeline.sources import PartitionSpec

    members = tuple(sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*")
                           if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")))
    specs = [PartitionSpec(key=f"copy{i}", kind="files", root=str(DATA), members=members) for i in range(args.copies)]
    if args.backend == "torch":
        from pipeline.faces.torch_stage import TorchFaceStage

        backend = TorchFaceStage(device=args.device, decode_workers=2 if args.device == "cpu" else 16)
    else:
        backend = get_backend("dlib", device="cpu")
    expression = ExpressionStage(ExpressionConfig())
    models = PerImageModels(backend, expression.config, ScoringConfig(), landmarker=expression.landmarker)
    counter = ReadDecodeCounter()
    results, tables = {}, {}

    def separate(spec):
        ing = ingest_partition(spec)
        faces = run_face_partition(ing.images, backend, spec.key, batch_size=8)
        expr = describe_partition(ing.images, faces.faces, expression)
        scores = score_partition(ing.images, models.scorer_stage)
        return ing.images, faces.faces, faces.scan, expr.descriptors, scores[0]

    fused_stats = []

    def fused(spec):
        res = fused_partition(spec, models, face_batch_size=8, expression_stage=expression)
        fused_stats.append({k: res.stats.get(k) for k in ("device_fused", "photos_decoded", "photos_decoded_by")})
        return res.ingest.images, res.faces.faces, res.faces.scan, res.expressions.descriptors, res.image_scores[0]

    for name, run in (("separate", separate), ("fused", fused)):
        before = _snapshot(counter)
        tables[name] = [run(spec) for spec in specs]
        results[name] = _delta(before, _snapshot(counter))
        print(name, results[name], flush=True)
    same = all(a.equals(b) for sep, fus in zip(tables["separate"], tables["fused"]) for a, b in zip(sep, fus))
    out = {
        "backend": args.backend, "model_version": backend.model_version, "fused_pass": fused_stats,
        "photos": len(members), "partitions": args.copies, "inputs": len(members) * args.copies,
        "accepted": sum(t[0].num_rows for t in tables["fused"]), "faces": sum(t[1].num_rows for t in tables["fused"]),
        "tables_equal": same, "load_average": os.getloadavg(), "cores": os.cpu_count(), **results,
        "decode_1mp": decode_ms_per_photo(),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
