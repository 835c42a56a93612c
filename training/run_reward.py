"""Social reward model training on a preference dataset version: CLI and Dagster Pipes entry point.

    python -m training.run_reward --config reward.json

Config (JSON): the runner's keys (see training/runner.py; the loader resolution defaults to the
model's image size) plus::

    "train": {RewardConfig fields: model_name, model_cfg, pretrained (local file),
              unfreeze_vision_blocks, unfreeze_text_blocks, margin, learning_rate, max_steps}

Writes ``output_dir/reward_model/`` (see training.reward for the format), ``loss_curve.png``,
``metrics.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import runner
from training.reward import (
    RewardConfig,
    RewardModel,
    RewardTrainer,
    build_clip,
    evaluate_scorer,
    load_reward_model,
    save_reward_model,
)


class RewardRun(runner.TrainerRun):
    description = "Social reward model training (triplet loss)"
    family = "preference"
    options = RewardConfig
    curve_keys = ("triplet_loss", "batch_pair_acc")
    final_keys = ("triplet_loss", "batch_pair_acc")
    output_key = "reward_model_path"
    heldout_key = "pairwise_acc"
    heldout_measure = "pairwise accuracy: the held-out winner scores above the loser (ties half)"

    def build_models(self) -> None:
        clip, tok = build_clip(self.tcfg.model_name, self.tcfg.model_cfg, self.tcfg.pretrained)
        if self.tcfg.pretrained is None:
            self.rep.warning("reward model backbone has random weights (no 'pretrained' file): scores are not "
                             "meaningful")
        self.model = RewardModel(clip, tok, self.tcfg)

    def loader_defaults(self) -> dict:
        return {"resolution": self.model.image_size}

    def make_trainer(self, manifest: dict) -> RewardTrainer:
        return RewardTrainer(self.model, self.tcfg, device=self.cfg.get("device"), manifest=manifest)

    def progress(self, m: dict) -> str:
        return f"step {m['step']}/{self.tcfg.max_steps} triplet {m['triplet_loss']:.4f} batch acc {m['batch_pair_acc']:.3f}"

    def export(self, trainer: RewardTrainer, out: Path, summary: dict) -> Path:
        return save_reward_model(self.model, out / "reward_model", trainer.manifest, summary)

    def metadata(self, trainer: RewardTrainer) -> dict:
        return {"backbone": self.tcfg.model_name, "pretrained": str(self.tcfg.pretrained)}

    def evaluate_incumbent(self, trainer: RewardTrainer, incumbent_dir: Path, batches: list[dict]) -> dict:
        """The incumbent scorer as the scoring stage loads it (its own base weights and config)."""
        model = load_reward_model(incumbent_dir / "reward_model", device=trainer.device)
        return evaluate_scorer(model, batches, trainer.device, self.tcfg.mixed_precision)


def main(argv=None) -> int:
    return runner.main(RewardRun, argv)


if __name__ == "__main__":
    raise SystemExit(main())
