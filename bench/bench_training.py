#!/usr/bin/env python
"""Training-step benchmark: Diffusion-DPO LoRA and the identity-adapter trainer.

GPU (the real use): an SD1.5-size UNet2DConditionModel (the class defaults, random init) and an
SD-size VAE (random init) at 512 px (64x64 latents), bf16 autocast, gradient checkpointing on and
off, several batch sizes. Reports steps/s, samples/s and peak memory
(``torch.cuda.max_memory_allocated``) per configuration, one JSON line each, then a JSON summary.
Random weights make the numbers timing-only: no quality is measured here.

    python bench/bench_training.py                       # GPU defaults
    python bench/bench_training.py --tiny                # CPU smoke run with tiny models
    python bench/bench_training.py --which dpo --batch-sizes 1,2,4,8 --grad-ckpt on,off --steps 10

Needs only torch, diffusers, peft, safetensors and numpy (it runs the project's trainers from
``training/``, which import nothing else on these code paths). No weights are downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training import models, precision, text

TINY_UNET = dict(models.TINY_UNET_CONFIG, block_out_channels=[32, 64], cross_attention_dim=32)


def synthetic_pref_batches(bs: int, res: int, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    caps = ["a photo of a cat on a sofa", "portrait of two people smiling in a park"]
    while True:
        yield {"pixels_w": (torch.rand(bs, 3, res, res, generator=g) * 2 - 1).to(device),
               "pixels_l": (torch.rand(bs, 3, res, res, generator=g) * 2 - 1).to(device),
               "caption": [caps[i % 2] for i in range(bs)]}


def synthetic_id_batches(bs: int, res: int, emb_dim: int, device, faces: int = 2, seed=0):
    from training.identity import ARCFACE_TEMPLATE

    g = torch.Generator(device="cpu").manual_seed(seed)
    side = res / (faces + 1)
    bbox = torch.zeros(bs, faces, 4)
    lm = torch.zeros(bs, faces, 5, 2)
    for f in range(faces):
        x1, y1 = side * (f + 0.5), res * 0.3
        bbox[:, f] = torch.tensor([x1, y1, x1 + side, y1 + side])
        lm[:, f] = ARCFACE_TEMPLATE * (side / 112) + torch.tensor([x1, y1])
    n = 0
    while True:
        ids = [[f"id{(n + b * faces + f) % 97}" for f in range(faces)] for b in range(bs)]
        n += bs * faces
        yield {
            "caption": ["two people"] * bs,
            "target": (torch.rand(bs, 3, res, res, generator=g) * 2 - 1),
            "face_mask": torch.ones(bs, faces, dtype=torch.bool), "bbox": bbox, "landmarks": lm,
            "has_landmarks": torch.ones(bs, faces, dtype=torch.bool),
            "refs": torch.zeros(bs, faces, 3, 112, 112), "ref_mask": torch.ones(bs, faces, dtype=torch.bool),
            "ref_landmarks": torch.zeros(bs, faces, 5, 2), "ref_has_landmarks": torch.zeros(bs, faces, dtype=torch.bool),
            "ref_emb": torch.nn.functional.normalize(torch.randn(bs, faces, emb_dim, generator=g), dim=-1),
            "ref_emb_mask": torch.ones(bs, faces, dtype=torch.bool),
            "gt_emb": torch.zeros(bs, faces, emb_dim), "gt_emb_mask": torch.zeros(bs, faces, dtype=torch.bool),
            "identity_ids": ids,
        }


def build_models(tiny: bool, device):
    with torch.device(device):  # initialise directly on the device (fast for the 860M-param UNet)
        if tiny:
            unet = models.build_unet({"config": TINY_UNET})
            vae = models.build_vae({"tiny": True})
        else:
            unet = models.build_unet({"sd15_random": True})
            vae = models.build_vae({"sd15_random": True})
    te = text.HashTextEncoder(unet.config.cross_attention_dim, max_length=77)
    return unet, vae, models.build_scheduler(), te


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(kind: str, bs: int, gc_on: bool, args, device) -> dict:
    from training.dpo import DPOConfig, DPOTrainer
    from training.identity import IdentityConfig, IdentityTrainer
    from training.iresnet import build_iresnet, load_face_embedder

    res = args.resolution
    rec = {"trainer": kind, "batch_size": bs, "gradient_checkpointing": gc_on, "resolution": res,
           "precision": args.precision if device.type == "cuda" else "fp32"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    unet, vae, sched, te = build_models(args.tiny, device)
    if kind == "dpo":
        cfg = DPOConfig(mixed_precision=args.precision, gradient_checkpointing=gc_on, lora_rank=args.lora_rank,
                        learning_rate=1e-5)
        tr = DPOTrainer(unet, vae, sched, te, cfg, device=str(device))
        batches = synthetic_pref_batches(bs, res, device)
        rec["trainable_params"] = sum(p.numel() for p in tr.trainable_parameters())
    else:
        arc = {"layers": [1, 1, 1, 1], "widths": (8, 8, 16, 16), "num_features": 16} if args.tiny else \
            {"arch": "iresnet50", "num_features": 512}
        emb_dim = arc["num_features"]
        with tempfile.TemporaryDirectory() as td:  # random iresnet weights: timing only
            torch.manual_seed(0)
            net = build_iresnet(arc.get("arch", "iresnet50"), arc["num_features"], arc.get("widths"), arc.get("layers"))
            torch.save(net.state_dict(), Path(td) / "arc.pth")
            emb, info = load_face_embedder(Path(td) / "arc.pth", arc.get("arch", "iresnet50"), arc["num_features"],
                                           arc.get("widths"), arc.get("layers"))
        cfg = IdentityConfig(mixed_precision=args.precision, gradient_checkpointing=gc_on, emb_dim=emb_dim,
                             learning_rate=1e-5, bank_size=4033)
        tr = IdentityTrainer(unet, vae, sched, te, cfg, emb, info, device=str(device))
        # a full bank of extended negatives, as in WithAnyone (4033)
        tr.bank.push(torch.randn(4033, emb_dim), [f"bank{i}" for i in range(4033)])
        batches = synthetic_id_batches(bs, res, emb_dim, device)
        rec["trainable_params"] = sum(p.numel() for p in tr.trainable_parameters())
    sync(device)
    rec["build_s"] = round(time.perf_counter() - t_build, 2)
    try:
        for _ in range(args.warmup):
            tr.train_step(batches)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        losses = []
        for _ in range(args.steps):
            m = tr.train_step(batches)
            losses.append(m.get("loss", m.get("dpo_loss")))
        sync(device)
        dt = time.perf_counter() - t0
        rec.update(steps=args.steps, seconds=round(dt, 3), steps_per_s=round(args.steps / dt, 3),
                   samples_per_s=round(args.steps * bs / dt, 2),
                   loss_finite=all(math.isfinite(x) for x in losses))
        if device.type == "cuda":
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if kind == "identity":
            rec["identity_terms"] = tr.identity_terms
            rec["negatives_per_face"] = m.get("negatives")
    except torch.OutOfMemoryError as e:
        rec["error"] = f"OOM: {str(e).splitlines()[0]}"
    except RuntimeError as e:
        rec["error"] = str(e).splitlines()[0][:300]
    del tr, unet, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models at 32 px (CPU smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--which", default="dpo,identity")
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 1,2,4 for dpo; 1,2 for identity)")
    ap.add_argument("--grad-ckpt", default="on,off")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1: on a small shared box more threads thrash)")
    ap.add_argument("--time-budget-s", type=float, default=480, help="stop starting new configs after this")
    ap.add_argument("--out", default=None, help="also write the summary JSON here")
    args = ap.parse_args(argv)

    device = precision.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.resolution = args.resolution or (32 if args.tiny else 512)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    gcs = [{"on": True, "off": False}[x.strip()] for x in args.grad_ckpt.split(",")]
    import diffusers
    import peft

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
           "python": platform.python_version(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "cpu_threads": torch.get_num_threads(), "tiny": args.tiny,
           "unet": "tiny test config" if args.tiny else "SD1.5 default config, random init"}
    print(json.dumps({"env": env}), flush=True)
    results = []
    t_start = time.perf_counter()
    for kind in [w.strip() for w in args.which.split(",") if w.strip()]:
        sizes = [int(x) for x in (args.batch_sizes or ("1,2,4" if kind == "dpo" else "1,2")).split(",")]
        for gc_on in gcs:
            for bs in sizes:
                if time.perf_counter() - t_start > args.time_budget_s:
                    results.append({"trainer": kind, "batch_size": bs, "gradient_checkpointing": gc_on,
                                    "skipped": "time budget"})
                    continue
                rec = run_one(kind, bs, gc_on, args, device)
                print(json.dumps(rec), flush=True)
                results.append(rec)
    summary = {"env": env, "results": results, "total_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
