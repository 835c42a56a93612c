"""Diffusion-DPO with a LoRA on a diffusers UNet2DConditionModel.

Loss (Wallace et al. 2023, as implemented in SalesforceAIResearch/DiffusionDPO ``train.py`` and
diffusers' ``examples/research_projects/diffusion_dpo``)::

    L_w, L_l         = per-sample MSE(eps_theta(x_t, t, c), target) of winner / loser (mean over C,H,W)
    L_w_ref, L_l_ref = the same with the reference model (here: the same UNet, LoRA disabled)
    inside           = -beta/2 * ((L_w - L_l) - (L_w_ref - L_l_ref))
    loss             = -log sigmoid(inside), averaged over the batch

**Beta convention.** ``DPOConfig.beta`` is exactly ``--beta_dpo`` of both reference scripts: they
write ``scale_term = -0.5 * args.beta_dpo``, i.e. the 1/2 is applied inside, as here. Published
values: 5000 (Diffusion-DPO, SD1.5 and SDXL full fine-tunes), 2500 (diffusers' LoRA script
default). The paper's beta*T*omega(lambda_t) is folded into this one constant.

Multi-GPU: launch with torchrun; the run scripts init torch.distributed, the loaders split shards by
node and worker, the gradients of the trainable (LoRA / adapter) parameters are all-reduced
(averaged) each step, rank 0 writes checkpoints (with every rank's data position) and outputs.
Noise and timesteps of a step come from a generator seeded by (seed, rank, step), so a resume
reproduces them and ranks draw different ones.

Winner and loser share the noise and the timestep (the batch is [winners; losers] with the noise
and t repeated). Logged: ``implicit_acc`` = fraction of pairs with model_diff < ref_diff (inside >
0), ``reward_margin`` = mean of ``inside`` (implicit reward of winner minus loser), the raw model /
reference MSE.

The LoRA is a peft adapter added with ``unet.add_adapter`` on ``to_q/to_k/to_v/to_out.0``; the
reference pass runs under ``unet.disable_adapters()``. Output: ``pytorch_lora_weights.safetensors``
in diffusers' format (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` saved
by ``StableDiffusionLoraLoaderMixin.save_lora_weights``), loadable with
``pipe.load_lora_weights(dir)``, plus ``training_meta.json`` (dataset manifest version and
fingerprint, config, metrics).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training import checkpoints, distributed, precision, rng
from training.config import Options

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def dpo_loss(model_losses: torch.Tensor, ref_losses: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """``model_losses``/``ref_losses``: per-sample MSE of [winners; losers] (shape [2B]).
    Returns the mean DPO loss and detached metrics."""
    lw, ll = model_losses.float().chunk(2)
    rw, rl = ref_losses.float().chunk(2)
    model_diff = lw - ll
    ref_diff = rw - rl
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "dpo_loss": loss.item(),
        "implicit_acc": (inside > 0).float().mean().item(),
        "reward_margin": inside.mean().item(),
        "model_mse": model_losses.mean().item(),
        "ref_mse": ref_losses.mean().item(),
        "model_diff": model_diff.mean().item(),
        "ref_diff": ref_diff.mean().item(),
    }
    return loss, metrics


@dataclass
class DPOConfig(Options):
    options_name: ClassVar[str] = "DPO"

    beta: float = 2500.0  # = beta_dpo of the reference scripts (the 1/2 is applied inside)
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
    extra: dict = field(default_factory=dict)


class DiffusionTrainerBase:
    """What the DPO and identity trainers share: device/precision setup, RNG, optimizer, the step
    loop with gradient accumulation, checkpoints and resume."""

    def __init__(self, unet, vae, scheduler, text_encoder: nn.Module, cfg, device=None, manifest=None):
        self.cfg = cfg
        self.device = precision.pick_device(device)
        self.manifest = checkpoints.manifest_info(manifest)
        self.wdtype = precision.weight_dtype(self.device, cfg.mixed_precision)
        self.unet, self.vae, self.scheduler, self.text_encoder = unet, vae, scheduler, text_encoder
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False).eval()
        self.unet.to(self.device, dtype=self.wdtype)
        self.vae.to(self.device, dtype=self.wdtype)
        self.text_encoder.to(self.device)
        self.rank, self.world = distributed.dist_info()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device)

    # subclasses: add trainable modules, then call _finish_setup()
    def _finish_setup(self) -> None:
        for p in self.trainable_parameters():
            p.data = p.data.float()  # trainable weights in fp32 (diffusers' cast_training_params)
        gc = self.cfg.gradient_checkpointing
        if gc or (gc is None and self.device.type == "cuda"):
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters(), lr=self.cfg.learning_rate, weight_decay=self.cfg.adam_weight_decay
        )
        warm = max(0, self.cfg.lr_warmup_steps)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trainable_module().parameters() if p.requires_grad]

    def trainable_module(self) -> nn.Module:
        return self.unet

    @property
    def ckpt_module(self) -> nn.Module:
        return self.trainable_module()

    # ------------------------------------------------------------------------------------------
    def encode_text(self, batch: Mapping) -> torch.Tensor:
        if "text_emb" in batch:
            return batch["text_emb"].to(self.device, self.wdtype)
        return self.text_encoder(batch["caption"]).to(self.device, self.wdtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        pixels = pixels.to(self.device, self.wdtype)
        dist = self.vae.encode(pixels).latent_dist
        if getattr(self.cfg, "vae_latent", "sample") == "mean":
            z = dist.mode()
        else:
            z = dist.sample(generator=generator if generator is not None else self.generator)
        return z * self.vae.config.scaling_factor

    def sample_noise_t(self, latents: torch.Tensor, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(latents.shape, generator=generator, device=self.device, dtype=torch.float32)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator,
                          device=self.device).long()
        return noise.to(latents.dtype), t

    def target_for(self, latents, noise, t) -> torch.Tensor:
        ptype = self.scheduler.config.prediction_type
        if ptype == "epsilon":
            return noise
        if ptype == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"unsupported prediction type {ptype}")

    # ------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping, generator=None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def train_step(self, batches: Iterator[Mapping]) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` batches."""
        t0 = time.perf_counter()
        # noise/timesteps of this step depend only on (seed, rank, step): exact resume, distinct ranks
        self.generator.manual_seed(rng.step_seed(self.cfg.seed, self.rank, self.step))
        self.optimizer.zero_grad(set_to_none=True)
        acc = self.cfg.gradient_accumulation_steps
        sums: dict[str, float] = {}
        for _ in range(acc):
            batch = next(batches)
            with precision.autocast(self.device, self.cfg.mixed_precision):
                loss, metrics = self.compute_loss(batch)
            (loss / acc).backward()
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + v / acc
                else:
                    sums[k] = v
        params = self.trainable_parameters()
        distributed.allreduce_grads(params)
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm) if self.cfg.max_grad_norm \
            else torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.lr_sched.step()
        self.step += 1
        sums.update(step=self.step, grad_norm=float(gnorm), lr=self.lr_sched.get_last_lr()[0],
                    step_time_s=time.perf_counter() - t0)
        sums["loss"] = sums.get("loss", sums.get("dpo_loss", 0.0))
        self.history.append(sums)
        return sums

    def train(self, stream, max_steps: int | None = None, ckpt_dir: str | Path | None = None,
              on_log: Callable[[dict], None] | None = None) -> list[dict]:
        """Train until ``max_steps`` (total, counting resumed steps). ``stream`` is a BatchStream
        (its position goes into checkpoints) or any iterator of batches."""
        max_steps = max_steps if max_steps is not None else self.cfg.max_steps
        it = iter(stream)
        while self.step < max_steps:
            m = self.train_step(it)
            if on_log and (self.step % self.cfg.log_every == 0 or self.step == max_steps):
                on_log(m)
            if ckpt_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(ckpt_dir, stream)
        return self.history

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str | Path, stream=None) -> Path | None:
        """Rank 0 writes; every rank's data position is recorded (``data_positions[rank]``)."""
        positions = distributed.gather_objects(dict(getattr(stream, "position", {}) or {}))
        if self.rank != 0:
            distributed.barrier()
            return None
        state = {
            "step": self.step,
            "data_position": positions[0],
            "data_positions": positions,
            "manifest": self.manifest,
            "config": self.cfg.to_dict(),
            "lr_sched": self.lr_sched.state_dict(),
            "history": self.history,
        }
        path = checkpoints.save_checkpoint(Path(ckpt_dir), self.ckpt_module, self.optimizer, state, self.generator)
        distributed.barrier()
        return path

    def resume(self, ckpt: str | Path, stream=None, strict_data: bool = True) -> dict:
        """Load a checkpoint (adapter weights, optimizer, step, RNG, LR schedule) and put ``stream``
        back at the recorded data position. With ``strict_data`` a checkpoint trained on a different
        dataset version (manifest fingerprint) is refused."""
        state = checkpoints.load_checkpoint(Path(ckpt), self.ckpt_module, self.optimizer, self.generator)
        fp_ck, fp_now = state["manifest"].get("config_fingerprint"), self.manifest.get("config_fingerprint")
        if strict_data and fp_ck != fp_now:
            raise ValueError(f"checkpoint was trained on dataset fingerprint {fp_ck}, this data is {fp_now}")
        self.step = int(state["step"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.history = list(state.get("history") or [])
        positions = state.get("data_positions") or [state.get("data_position")]
        pos = positions[self.rank] if self.rank < len(positions) else None
        if stream is not None and pos and hasattr(stream, "restore"):
            stream.restore(pos)
        return state


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
        return dpo_loss(model_losses, ref_losses, self.cfg.beta)

    @torch.no_grad()
    def evaluate(self, batches, seed: int = 1234) -> dict:
        """Implicit accuracy / reward margin on held-out batches, with its own fixed noise (does not
        touch the training RNG)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        n, acc, margin, loss = 0, 0.0, 0.0, 0.0
        for batch in batches:
            with precision.autocast(self.device, self.cfg.mixed_precision):
                ml, rl = self.per_sample_losses(batch, g)
            _, m = dpo_loss(ml, rl, self.cfg.beta)
            b = batch["pixels_w"].shape[0]
            n += b
            acc += m["implicit_acc"] * b
            margin += m["reward_margin"] * b
            loss += m["dpo_loss"] * b
        return {"eval_implicit_acc": acc / max(n, 1), "eval_reward_margin": margin / max(n, 1),
                "eval_dpo_loss": loss / max(n, 1), "eval_pairs": n}

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
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            save_directory=str(out_dir), unet_lora_layers=self.lora_state_dict(), safe_serialization=True
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

