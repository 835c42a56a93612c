"""Diffusion-DPO with a LoRA on a diffusers UNet2DConditionModel.

Loss (Wallace et al. 2023), exactly as the current diffusers example computes it
(``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``, huggingface/diffusers at
commit 071190da: ``logits = ref_diff - model_diff``, ``loss = -F.logsigmoid(args.beta_dpo *
logits).mean()``, ``--beta_dpo`` default 2500)::

    L_w, L_l         = per-sample MSE(eps_theta(x_t, t, c), target) of winner / loser (mean over C,H,W)
    L_w_ref, L_l_ref = the same with the reference model (here: the same UNet, LoRA disabled)
    model_diff       = L_w - L_l;   ref_diff = L_w_ref - L_l_ref
    loss             = -log sigmoid(beta_dpo * (ref_diff - model_diff)), averaged over the batch

**Beta convention.** ``DPOConfig.beta_dpo`` is the *effective* scale inside the sigmoid, as in
that example. The paper writes the loss with beta/2 (its beta*T*omega(lambda_t) folded into one
constant), so beta_dpo 2500 (our default) is the paper's beta 5000 (SD1.5 / SDXL). Older
versions of both reference scripts multiplied by 0.5 * beta_dpo; this code did too, and trained
with half the intended strength. The option was renamed from ``beta`` so that an old config
cannot silently double its strength.

The step loop, multi-GPU all-reduce, checkpoints and resume are ``training/loop.py``'s; latents,
noise and targets ``training/diffusion.py``'s.

Winner and loser share the noise and the timestep (the batch is [winners; losers] with the noise
and t repeated). Logged: ``implicit_acc`` = fraction of pairs with model_diff < ref_diff, ties
(model_diff == ref_diff) counting half as in the diffusers example, so a fresh LoRA (B = 0: the
model is the reference) reads 0.5; ``reward_margin`` = mean of beta_dpo * (ref_diff - model_diff)
(implicit reward of winner minus loser); the raw model / reference MSE.

The LoRA is a peft adapter added with ``unet.add_adapter`` on ``to_q/to_k/to_v/to_out.0``; the
reference pass runs under ``unet.disable_adapters()``. Output: ``pytorch_lora_weights.safetensors``
in diffusers' format (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` saved
by ``StableDiffusionLoraLoaderMixin.save_lora_weights``), loadable with
``pipe.load_lora_weights(dir)``, with the adapter config (rank, lora_alpha, target modules) in the
file's ``lora_adapter_metadata`` header so that a LoRA with lora_alpha != rank loads at the right
scale, plus ``training_meta.json`` (dataset manifest version and
fingerprint, config, metrics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from training import checkpoints, precision
from training.config import Options
from training.diffusion import DiffusionTrainerBase
from training.metrics import pairwise_accuracy

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def dpo_loss(model_losses: torch.Tensor, ref_losses: torch.Tensor, beta_dpo: float) -> tuple[torch.Tensor, dict]:
    """``model_losses``/``ref_losses``: per-sample MSE of [winners; losers] (shape [2B]).
    Returns the mean DPO loss and detached metrics (see the module docstring)."""
    lw, ll = model_losses.float().chunk(2)
    rw, rl = ref_losses.float().chunk(2)
    model_diff = lw - ll
    ref_diff = rw - rl
    logits = beta_dpo * (ref_diff - model_diff)
    loss = -F.logsigmoid(logits).mean()
    metrics = {
        "dpo_loss": loss.item(),
        "implicit_acc": pairwise_accuracy(logits),
        "reward_margin": logits.mean().item(),
        "model_mse": model_losses.mean().item(),
        "ref_mse": ref_losses.mean().item(),
        "model_diff": model_diff.mean().item(),
        "ref_diff": ref_diff.mean().item(),
    }
    return loss, metrics


@dataclass
class DPOConfig(Options):
    options_name: ClassVar[str] = "DPO"

    beta_dpo: float = 2500.0  # effective scale inside the sigmoid (diffusers' --beta_dpo; paper beta 5000)
    learning_rate: float = 1e-4
    adam_weight_decay: float = 1e-2
    lora_rank: int = 8
    lora_alpha: int | None = None  # default: = rank
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # used on CUDA only; CPU runs fp32
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on CPU
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    lr_warmup_steps: int = 0
    vae_latent: str = "sample"  # "sample" (as the reference scripts) | "mean" (posterior mode)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DPOConfig:
        if d and "beta" in d:
            raise ValueError("DPO option 'beta' is now 'beta_dpo', the effective scale inside the sigmoid (diffusers' "
                             "convention): an old 'beta: B' trained like 'beta_dpo: B/2'; the paper's 5000 is 2500")
        return super().from_dict(d)


class DPOTrainer(DiffusionTrainerBase):
    def __init__(self, unet, vae, scheduler, text_encoder, cfg: DPOConfig, device=None, manifest=None):
        super().__init__(unet, vae, scheduler, text_encoder, cfg, device, manifest)
        from peft import LoraConfig

        self.lora_config = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
            init_lora_weights="gaussian", target_modules=list(LORA_TARGETS),
        )
        self.unet.add_adapter(self.lora_config)
        self._finish_setup()

    def per_sample_losses(self, batch: Mapping, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample MSE of [winners; losers] for the LoRA model and the reference (LoRA off)."""
        B = batch["pixels_w"].shape[0]
        pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])
        latents = self.encode_images(pixels, generator)
        noise, t = self.sample_noise_t(latents[:B], B, generator)
        noise, t = noise.repeat(2, 1, 1, 1), t.repeat(2)  # winner and loser share noise and t
        noisy = self.scheduler.add_noise(latents, noise, t)
        emb = self.encode_text(batch).repeat(2, 1, 1)
        target = self.target_for(latents, noise, t).float()
        pred = self.unet(noisy, t, emb).sample
        model_losses = (pred.float() - target).pow(2).mean(dim=[1, 2, 3])
        with torch.no_grad():
            self.unet.disable_adapters()
            try:
                ref_pred = self.unet(noisy, t, emb).sample
            finally:
                self.unet.enable_adapters()
            ref_losses = (ref_pred.float() - target).pow(2).mean(dim=[1, 2, 3])
        return model_losses, ref_losses

    def compute_loss(self, batch: Mapping, generator=None) -> tuple[torch.Tensor, dict]:
        model_losses, ref_losses = self.per_sample_losses(batch, generator or self.generator)
        return dpo_loss(model_losses, ref_losses, self.cfg.beta_dpo)

    @torch.no_grad()
    def evaluate(self, batches, seed: int = 1234) -> dict:
        """Implicit accuracy (ties half) / reward margin on held-out batches, with its own fixed noise
        (does not touch the training RNG)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        n, acc, margin, loss = 0, 0.0, 0.0, 0.0
        for batch in batches:
            with precision.autocast(self.device, self.cfg.mixed_precision):
                ml, rl = self.per_sample_losses(batch, g)
            _, m = dpo_loss(ml, rl, self.cfg.beta_dpo)
            b = batch["pixels_w"].shape[0]
            n += b
            acc += m["implicit_acc"] * b
            margin += m["reward_margin"] * b
            loss += m["dpo_loss"] * b
        if n == 0:  # an empty held-out split has no accuracy, not 0 or 1
            return {"eval_pairs": 0}
        return {"eval_implicit_acc": acc / n, "eval_reward_margin": margin / n, "eval_dpo_loss": loss / n,
                "eval_pairs": n}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}

    def export_lora(self, out_dir: str | Path, extra_meta: Mapping | None = None) -> Path:
        """``out_dir/pytorch_lora_weights.safetensors`` (diffusers format; ``pipe.load_lora_weights``)
        + ``training_meta.json``."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # the adapter config (rank, lora_alpha, target modules) goes into the file's safetensors
        # header, so that load_lora_weights applies lora_alpha / rank, not the rank it infers alone
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            save_directory=str(out_dir), unet_lora_layers=self.lora_state_dict(), safe_serialization=True,
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
        )
        meta = {
            "kind": "diffusion-dpo-lora",
            "step": self.step,
            "dataset": self.manifest,
            "config": self.cfg.to_dict(),
            "lora": {"rank": self.cfg.lora_rank, "alpha": self.cfg.lora_alpha or self.cfg.lora_rank,
                     "target_modules": LORA_TARGETS},
            **dict(extra_meta or {}),
        }
        checkpoints.atomic_write_text(out_dir / "training_meta.json", json.dumps(meta, indent=2, default=str))
        return out_dir / "pytorch_lora_weights.safetensors"

