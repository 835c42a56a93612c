"""Diffusion-DPO LoRA training on a preference dataset version: CLI and Dagster Pipes entry point.

    python -m training.run_dpo --config dpo.json [--set train.max_steps=100]

Config (JSON)::

    {"data": "<dataset version dir>", "eval_data": "<dir>" | null, "eval_batches": 4,
     "loader": {LoaderConfig fields; family is forced to "preference"},
     "model": {"pretrained": "<local diffusers SD folder>"} | {"unet": {...}, "vae": {...},
               "text_encoder": {"type": "hash"|"clip", ...}} | {"tiny": true},
     "train": {DPOConfig fields: beta, learning_rate, lora_rank, max_steps, ...},
     "output_dir": "<dir>", "resume": "auto" | "<checkpoint dir>" | null, "device": "auto"}

Writes ``output_dir/lora/pytorch_lora_weights.safetensors`` (+ training_meta.json),
``output_dir/checkpoints/checkpoint-*``, ``output_dir/loss_curve.png`` and ``output_dir/metrics.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (e.g. by a Pipes subprocess client)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import checkpoints, data, distributed, models, pipes, rng


def eval_batches(cfg: dict, loader_cfg: data.LoaderConfig) -> list[dict]:
    if not cfg.get("eval_data"):
        return []
    ecfg = data.LoaderConfig.from_dict({**loader_cfg.to_dict(), "resampled": False,
                                        "num_workers": 0, "shuffle_buffer": 0, "epoch_batches": None})
    stream = data.build_pipeline(data.shard_paths(cfg["eval_data"]), ecfg)
    out = []
    for b in stream:
        out.append(b)
        if len(out) >= int(cfg.get("eval_batches", 4)):
            break
    return out


def run(cfg: dict, rep: pipes.Reporter) -> dict:
    from training.dpo import DPOConfig, DPOTrainer

    t0 = time.time()
    dev = distributed.init_distributed_from_env()  # torchrun: one process per GPU
    if dev:
        cfg = {**cfg, "device": dev}
    rank, _ = distributed.dist_info()
    if rank != 0:
        rep = pipes.Quiet()
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    lcfg = data.LoaderConfig.from_dict({**cfg.get("loader", {}), "family": "preference"})
    tcfg = DPOConfig.from_dict(cfg.get("train"))
    rng.seed_everything(tcfg.seed)
    stream = data.BatchStream(cfg["data"], lcfg)
    rep.info(f"dataset {stream.manifest.get('dataset')} version {stream.manifest.get('version')} "
             f"fingerprint {stream.manifest.get('config_fingerprint')}: {stream.manifest['num_samples']} samples")
    unet, vae, sched, te = models.build_diffusion(cfg.get("model") or {})
    trainer = DPOTrainer(unet, vae, sched, te, tcfg, device=cfg.get("device"), manifest=stream.manifest)
    ckpts = out / "checkpoints"
    resume = cfg.get("resume", "auto")
    ck = checkpoints.latest_checkpoint(ckpts) if resume == "auto" else (Path(resume) if resume else None)
    if ck is not None:
        trainer.resume(ck, stream)
        rep.info(f"resumed from {ck} at step {trainer.step}")
    evb = eval_batches(cfg, lcfg)
    before = trainer.evaluate(evb) if evb else {}

    def on_log(m):
        rep.info(f"step {m['step']}/{tcfg.max_steps} loss {m['dpo_loss']:.4f} acc {m['implicit_acc']:.3f} "
                 f"margin {m['reward_margin']:.4f} ({m['step_time_s']:.2f}s/step)")

    trainer.train(stream, tcfg.max_steps, ckpts, on_log)
    trainer.save_checkpoint(ckpts, stream)
    if rank != 0:
        return {}
    after = trainer.evaluate(evb) if evb else {}
    png = pipes.loss_curve_png(trainer.history, out / "loss_curve.png", keys=("dpo_loss", "implicit_acc"))
    last = trainer.history[-10:]
    summary = {
        "steps": trainer.step,
        "final_dpo_loss": sum(h["dpo_loss"] for h in last) / max(len(last), 1),
        "final_implicit_acc": sum(h["implicit_acc"] for h in last) / max(len(last), 1),
        "final_reward_margin": sum(h["reward_margin"] for h in last) / max(len(last), 1),
        **{f"{k}_before": v for k, v in before.items()}, **after,
        "skipped_ties": stream.counter.skipped, "bad_samples": stream.counter.errors,
        "duration_s": time.time() - t0,
    }
    lora = trainer.export_lora(out / "lora", {"metrics": summary})
    checkpoints.atomic_write_text(out / "metrics.json", json.dumps({"summary": summary, "history": trainer.history},
                                                              default=str))
    md = {
        **pipes.dataset_metadata(stream.manifest),
        "beta": tcfg.beta, "lora_rank": tcfg.lora_rank, "device": str(trainer.device),
        **pipes.numeric(summary), "lora_path": pipes.path_value(lora), **pipes.curve_metadata(png),
    }
    rep.materialize(md)
    return summary


def main(argv=None) -> int:
    with pipes.session(argv, "Diffusion-DPO LoRA training") as (cfg, rep):
        run(cfg, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
