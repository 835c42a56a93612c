"""Per-image CPU cost of each per-image stage, one process, one thread: the measured inputs of the cost
model in docs/benchmarks.md ("Cost model for 100M photos").

Usage: .venv/bin/python bench/bench_stage_costs.py [--repeats 3]
Two sets from ../shared/data/faces: every photo (mostly small: median 0.02 MP, mean 0.75 MP), and the
photos of at least 1 MP (web-photo sized). Prints CPU ms per image (median over repeats) for ingestion
(read + sha256 + full decode check), the face stage (decode + detect + landmarks + descriptor) and
expressions (decode + 68 landmarks + FER, per face), and the bytes per table row before compression.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = (REPO.parent / "shared" / "data" / "faces").resolve()


def cpu_ms(repeats: int, fn, *args) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        c0 = time.process_time()
        out = fn(*args)
        times.append((time.process_time() - c0) * 1000)
    return statistics.median(times), out


def main() -> None:
    import torch
    from PIL import Image

    from pipeline.expression.descriptor import ExpressionConfig, ExpressionStage, describe_partition
    from pipeline.faces import get_backend
    from pipeline.faces.stage import run_face_partition
    from pipeline.ingest import ingest_partition
    from pipeline.sources import PartitionSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    every = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*.jpg"))
    def pixels(member: str) -> int:
        with Image.open(DATA / member) as im:
            return im.size[0] * im.size[1]

    big = [m for m in every if pixels(m) >= 1_000_000]
    backend = get_backend("dlib", device="cpu")
    stage = ExpressionStage(ExpressionConfig(device="cpu"))
    report = {}
    for name, members in (("all photos", every), ("photos >= 1 MP", big)):
        spec = PartitionSpec(key="cost", kind="files", root=str(DATA), members=tuple(members))
        n = len(members)
        mp = sum(pixels(m) for m in members) / n / 1e6
        jpeg = sum((DATA / m).stat().st_size for m in members) / n
        ingest_ms, res = cpu_ms(args.repeats, ingest_partition, spec)
        faces_ms, fr = cpu_ms(args.repeats, run_face_partition, res.images, backend, "cost")
        expr_ms, ex = cpu_ms(args.repeats, describe_partition, res.images, fr.faces, stage)
        # in-memory Arrow bytes per row: what a row costs before zstd (float embeddings barely compress)
        sizes = {t: round(table.nbytes / max(table.num_rows, 1)) for t, table in
                 (("images", res.images), ("faces", fr.faces), ("face_expressions", ex.descriptors))}
        faces = fr.faces.num_rows
        report[name] = {
            "images": n, "mean_megapixels": round(mp, 3), "mean_jpeg_bytes": round(jpeg),
            "faces": faces, "faces_per_image": round(faces / n, 2),
            "ingest_cpu_ms_per_image": round(ingest_ms / n, 1),
            "faces_cpu_ms_per_image": round(faces_ms / n, 1),
            "expressions_cpu_ms_per_face": round(expr_ms / max(faces, 1), 1),
            "arrow_bytes_per_row": sizes,
        }
        print(name, json.dumps(report[name], indent=1), flush=True)
    d = REPO / "bench" / "results"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"stage-costs-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
