"""Social reward model (after Social Reward / Picsart Image-Social): an open_clip backbone whose upper
blocks are fine-tuned with a triplet loss on preference pairs.

    anchor = prompt (text) embedding, positive = winner image embedding, negative = loser
    d(x, y) = 1 - cos(x, y);  loss = max(0, d(a, p) - d(a, n) + margin), margin 0.3
    score(image, prompt) = cos(image embedding, prompt embedding)

Evaluated by pairwise accuracy on held-out pairs: a pair counts 1 when score(winner) > score(loser)
and half when the scores tie, so a collapsed scorer (one score for every image) reads 0.5.

Checkpoint format (``save_reward_model`` / ``load_reward_model``), a folder with
- ``reward_config.json``: {"format": "lineup-reward-v1", "model_name", "model_cfg" (open_clip
  config dict, or null for a registered name), "pretrained" (local weights path or null),
  "pretrained_sha256", "unfreeze_vision_blocks", "unfreeze_text_blocks", "image_size", "mean",
  "std", "margin", "weights": "trainable"|"full", "dataset" (manifest version/fingerprint),
  "metrics"};
- ``reward_model.safetensors``: the state dict (open_clip parameter names) of the unfrozen
  parameters when the base weights are a local file (the scorer rebuilds the base from
  ``pretrained`` and overlays them), or of the whole model when there is no base file (e.g. a
  model built from a config in tests).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training import checkpoints, precision
from training.config import Options
from training.loop import TrainerBase
from training.metrics import pairwise_accuracy, pairwise_wins

FORMAT = "lineup-reward-v1"


@dataclass
class RewardConfig(Options):
    options_name: ClassVar[str] = "reward"

    model_name: str = "ViT-H-14"
    model_cfg: dict | None = None  # an open_clip model config (tests: a tiny one)
    pretrained: str | None = None  # local weights file; never a hub tag
    unfreeze_vision_blocks: int = 2
    unfreeze_text_blocks: int = 0
    margin: float = 0.3
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    max_steps: int = 1000
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    lr_warmup_steps: int = 0
    mixed_precision: str = "bf16"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0



def build_clip(model_name: str, model_cfg: Mapping | None = None, pretrained: str | None = None):
    """open_clip model + tokenizer. A ``model_cfg`` is registered under ``model_name`` first;
    ``pretrained`` must be a local file (no hub downloads)."""
    import open_clip

    if model_cfg is not None:
        # open_clip registers configs from files; it reads the file at once and keeps the config in memory,
        # so the folder goes (one was left in /tmp per call: 455 of them here after a few hundred test runs)
        with tempfile.TemporaryDirectory(prefix="lineup_openclip_cfg_") as d:
            (Path(d) / f"{model_name}.json").write_text(json.dumps(dict(model_cfg)))
            open_clip.add_model_config(Path(d))
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"open_clip weights {pretrained!r} not found (local files only)")
    model = open_clip.create_model(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer


class RewardModel(nn.Module):
    def __init__(self, clip_model, tokenizer, cfg: RewardConfig):
        super().__init__()
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.cfg = cfg
        pcfg = getattr(clip_model.visual, "preprocess_cfg", {}) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        size = pcfg.get("size", getattr(clip_model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(pcfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        self.freeze_lower()

    def freeze_lower(self) -> None:
        """Freeze everything, then unfreeze the top blocks (+ final norm and projection) per tower."""
        m = self.clip
        m.requires_grad_(False)
        kv, kt = self.cfg.unfreeze_vision_blocks, self.cfg.unfreeze_text_blocks
        vis = m.visual
        if kv > 0:
            blocks = vis.transformer.resblocks
            for b in list(blocks)[-kv:]:
                b.requires_grad_(True)
            for name in ("ln_post",):
                if hasattr(vis, name):
                    getattr(vis, name).requires_grad_(True)
            if isinstance(getattr(vis, "proj", None), nn.Parameter):
                vis.proj.requires_grad_(True)
        if kt > 0:
            for b in list(m.transformer.resblocks)[-kt:]:
                b.requires_grad_(True)
            m.ln_final.requires_grad_(True)
            if isinstance(getattr(m, "text_projection", None), nn.Parameter):
                m.text_projection.requires_grad_(True)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Loader tensors in [-1, 1] -> CLIP input (resize to the model size, normalise)."""
        x = (pixels.float() + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(self.preprocess(pixels)).float(), dim=-1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        dev = next(self.clip.parameters()).device
        tok = self.tokenizer([c or "" for c in captions]).to(dev)
        return F.normalize(self.clip.encode_text(tok).float(), dim=-1)

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return (self.encode_image(pixels) * self.encode_text(captions)).sum(-1)


def triplet_loss(anchor, pos, neg, margin: float = 0.3) -> tuple[torch.Tensor, dict]:
    dp = 1 - (anchor * pos).sum(-1)
    dn = 1 - (anchor * neg).sum(-1)
    loss = F.relu(dp - dn + margin).mean()
    return loss, {"triplet_loss": loss.item(), "batch_pair_acc": pairwise_accuracy(dn - dp),
                  "d_pos": dp.mean().item(), "d_neg": dn.mean().item()}


class RewardTrainer(TrainerBase):
    def __init__(self, model: RewardModel, cfg: RewardConfig, device=None, manifest=None):
        self._setup_loop(cfg, device, manifest)
        self.model = model.to(self.device).train()
        if not self.trainable_parameters():
            raise ValueError("nothing to train: unfreeze at least one vision or text block")
        self._setup_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.lr_warmup_steps)

    def trainable_module(self) -> nn.Module:
        return self.model

    def compute_loss(self, batch: Mapping, generator=None) -> tuple[torch.Tensor, dict]:
        a = self.model.encode_text(batch["caption"])
        B = batch["pixels_w"].shape[0]
        img = self.model.encode_image(torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(self.device))
        return triplet_loss(a, img[:B], img[B:], self.cfg.margin)

    def evaluate(self, batches: Iterable[Mapping]) -> dict:
        """See ``evaluate_scorer``."""
        return evaluate_scorer(self.model, batches, self.device, self.cfg.mixed_precision)


@torch.no_grad()
def evaluate_scorer(model: RewardModel, batches: Iterable[Mapping], device, mixed_precision: str = "fp32") -> dict:
    """Pairwise accuracy (ties count half) and mean score margin of a scorer on preference batches;
    an empty input reports only ``eval_pairs: 0``. The trained model and the incumbent scorer it
    would replace are measured by this one function on the same batches."""
    was_training = model.training
    model.eval()
    n = 0
    wins = margin = 0.0
    try:
        for b in batches:
            with precision.autocast(device, mixed_precision):
                sw = model.score(b["pixels_w"].to(device), b["caption"])
                sl = model.score(b["pixels_l"].to(device), b["caption"])
            wins += pairwise_wins(sw - sl)
            margin += float((sw - sl).sum())
            n += sw.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        return {"eval_pairs": 0}
    return {"pairwise_acc": wins / n, "score_margin": margin / n, "eval_pairs": n}


def save_reward_model(model: RewardModel, out_dir: str | Path, manifest: Mapping | None = None,
                      metrics: Mapping | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    full = cfg.pretrained is None
    sd = model.clip.state_dict()
    if not full:
        keep = {n for n, p in model.clip.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in sd.items()}, str(out / "reward_model.safetensors"))
    conf = {
        "format": FORMAT, "model_name": cfg.model_name, "model_cfg": cfg.model_cfg, "pretrained": cfg.pretrained,
        "pretrained_sha256": checkpoints.file_sha256(cfg.pretrained) if cfg.pretrained else None,
        "unfreeze_vision_blocks": cfg.unfreeze_vision_blocks, "unfreeze_text_blocks": cfg.unfreeze_text_blocks,
        "image_size": model.image_size, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
        "margin": cfg.margin, "weights": "full" if full else "trainable", "score": "cosine(image, prompt)",
        "dataset": checkpoints.manifest_info(manifest), "metrics": dict(metrics or {}),
        "train_config": cfg.to_dict(),
    }
    checkpoints.atomic_write_text(out / "reward_config.json", json.dumps(conf, indent=2, default=str))
    return out


def load_reward_model(path: str | Path, pretrained: str | None = None, device="cpu") -> RewardModel:
    """Rebuild the scorer from ``save_reward_model``'s folder (``pretrained`` overrides the base path)."""
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "reward_config.json").read_text())
    if conf.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    base = pretrained or conf.get("pretrained")
    cfg = RewardConfig.from_dict(conf["train_config"])
    cfg.pretrained = base if conf["weights"] == "trainable" else None
    clip, tok = build_clip(conf["model_name"], conf.get("model_cfg"), cfg.pretrained)
    sd = load_file(str(path / "reward_model.safetensors"))
    _missing, unexpected = clip.load_state_dict(sd, strict=conf["weights"] == "full")
    if unexpected:
        raise ValueError(f"reward checkpoint has unknown keys {unexpected[:5]}")
    model = RewardModel(clip, tok, cfg).to(device).eval()
    return model
