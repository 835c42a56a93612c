"""Diffusion-DPO LoRA training on a preference dataset version: CLI and Dagster Pipes entry point.

    python -m training.run_dpo --config dpo.json [--set train.max_steps=100]

Config (JSON): the runner's keys (see training/runner.py) plus::

    "model": {"pretrained": "<local diffusers SD folder>"} | {"unet": {...}, "vae": {...},
              "text_encoder": {"type": "hash"|"clip", ...}} | {"tiny": true},
    "train": {DPOConfig fields: beta_dpo, learning_rate, lora_rank, max_steps, ...}

Writes ``output_dir/lora/pytorch_lora_weights.safetensors`` (+ training_meta.json),
``output_dir/checkpoints/checkpoint-*``, ``output_dir/loss_curve.png`` and ``output_dir/metrics.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (e.g. by a Pipes subprocess client)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import models, runner
from training.dpo import DPOConfig, DPOTrainer


class DPORun(runner.TrainerRun):
    description = "Diffusion-DPO LoRA training"
    family = "preference"
    options = DPOConfig
    curve_keys = ("dpo_loss", "implicit_acc")
    final_keys = ("dpo_loss", "implicit_acc", "reward_margin")
    output_key = "lora_path"
    heldout_key = "eval_implicit_acc"
    heldout_measure = ("implicit reward accuracy: the LoRA's implicit reward prefers the held-out winner "
                       "(model_diff < ref_diff; ties half)")

    def build_models(self) -> None:
        self.parts = models.build_diffusion(self.cfg.get("model") or {})

    def make_trainer(self, manifest: dict) -> DPOTrainer:
        return DPOTrainer(*self.parts, self.tcfg, device=self.cfg.get("device"), manifest=manifest)

    def progress(self, m: dict) -> str:
        return (f"step {m['step']}/{self.tcfg.max_steps} loss {m['dpo_loss']:.4f} acc {m['implicit_acc']:.3f} "
                f"margin {m['reward_margin']:.4f} ({m['step_time_s']:.2f}s/step)")

    def export(self, trainer: DPOTrainer, out: Path, summary: dict) -> Path:
        return trainer.export_lora(out / "lora", {"metrics": summary})

    def metadata(self, trainer: DPOTrainer) -> dict:
        return {"beta_dpo": self.tcfg.beta_dpo, "lora_rank": self.tcfg.lora_rank, "device": str(trainer.device)}


def main(argv=None) -> int:
    return runner.main(DPORun, argv)


if __name__ == "__main__":
    raise SystemExit(main())
