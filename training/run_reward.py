"""Social reward model training on a preference dataset version: CLI and Dagster Pipes entry point.

    python -m training.run_reward --config reward.json

Config (JSON)::

    {"data": "<dataset dir>", "eval_data": "<held-out dataset dir>" | null, "eval_batches": 8,
     "loader": {LoaderConfig fields; resolution defaults to the model's image size},
     "train": {RewardConfig fields: model_name, model_cfg, pretrained (local file),
               unfreeze_vision_blocks, unfreeze_text_blocks, margin, learning_rate, max_steps},
     "output_dir": "<dir>", "resume": "auto", "device": "auto"}

Writes ``output_dir/reward_model/`` (see training.reward for the format), ``loss_curve.png``,
``metrics.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import checkpoints, data, pipes, rng


def run(cfg: dict, rep: pipes.Reporter) -> dict:
    from training.reward import RewardConfig, RewardModel, RewardTrainer, build_clip, save_reward_model

    t0 = time.time()
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    rcfg = RewardConfig.from_dict(cfg.get("train"))
    rng.seed_everything(rcfg.seed)
    clip, tok = build_clip(rcfg.model_name, rcfg.model_cfg, rcfg.pretrained)
    if rcfg.pretrained is None:
        rep.warning("reward model backbone has random weights (no 'pretrained' file): scores are not meaningful")
    model = RewardModel(clip, tok, rcfg)
    lcfg = data.LoaderConfig.from_dict({"resolution": model.image_size, **cfg.get("loader", {}),
                                        "family": "preference"})
    stream = data.BatchStream(cfg["data"], lcfg)
    trainer = RewardTrainer(model, rcfg, device=cfg.get("device"), manifest=stream.manifest)
    ckpts = out / "checkpoints"
    resume = cfg.get("resume", "auto")
    ck = checkpoints.latest_checkpoint(ckpts) if resume == "auto" else (Path(resume) if resume else None)
    if ck is not None:
        trainer.resume(ck, stream)
        rep.info(f"resumed from {ck} at step {trainer.step}")
    evb = []
    if cfg.get("eval_data"):
        ecfg = data.LoaderConfig.from_dict({**lcfg.to_dict(), "shuffle_buffer": 0,
                                            "resampled": False, "num_workers": 0, "epoch_batches": None})
        for b in data.build_pipeline(data.shard_paths(cfg["eval_data"]), ecfg):
            evb.append(b)
            if len(evb) >= int(cfg.get("eval_batches", 8)):
                break
    before = trainer.evaluate(evb) if evb else {}

    def on_log(m):
        rep.info(f"step {m['step']}/{rcfg.max_steps} triplet {m['triplet_loss']:.4f} "
                 f"batch acc {m['batch_pair_acc']:.3f}")

    trainer.train(stream, rcfg.max_steps, ckpts, on_log)
    after = trainer.evaluate(evb) if evb else {}
    png = pipes.loss_curve_png(trainer.history, out / "loss_curve.png", keys=("triplet_loss", "batch_pair_acc"))
    summary = {"steps": trainer.step, "final_triplet_loss": trainer.history[-1]["triplet_loss"],
               **{f"{k}_before": v for k, v in before.items()}, **after, "duration_s": time.time() - t0}
    path = save_reward_model(model, out / "reward_model", stream.manifest, summary)
    checkpoints.atomic_write_text(out / "metrics.json", json.dumps({"summary": summary, "history": trainer.history}))
    md = {
        **pipes.dataset_metadata(stream.manifest),
        "backbone": rcfg.model_name, "pretrained": str(rcfg.pretrained), **pipes.numeric(summary),
        "reward_model_path": pipes.path_value(path), **pipes.curve_metadata(png),
    }
    rep.materialize(md)
    return summary


def main(argv=None) -> int:
    with pipes.session(argv, "Social reward model training (triplet loss)") as (cfg, rep):
        run(cfg, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
