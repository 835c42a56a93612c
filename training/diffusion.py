"""The diffusion trainers' common ground (Diffusion-DPO and the identity adapter): a frozen diffusers
UNet + VAE + text encoder, latents from the VAE, noise and timesteps, and the prediction target."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from training import precision
from training.loop import TrainerBase


class DiffusionTrainerBase(TrainerBase):
    """What the DPO and identity trainers share on top of the loop: the frozen UNet/VAE/text encoder
    on the device in the frozen-weight dtype, gradient checkpointing, latents, noise, timesteps and
    the prediction target."""

    def __init__(self, unet, vae, scheduler, text_encoder: nn.Module, cfg, device=None, manifest=None):
        self._setup_loop(cfg, device, manifest)
        self.wdtype = precision.weight_dtype(self.device, cfg.mixed_precision)
        self.unet, self.vae, self.scheduler, self.text_encoder = unet, vae, scheduler, text_encoder
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False).eval()
        self.unet.to(self.device, dtype=self.wdtype)
        self.vae.to(self.device, dtype=self.wdtype)
        self.text_encoder.to(self.device)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device)

    # subclasses: add trainable modules, then call _finish_setup()
    def _finish_setup(self) -> None:
        for p in self.trainable_parameters():
            p.data = p.data.float()  # trainable weights in fp32 (diffusers' cast_training_params)
        gc = self.cfg.gradient_checkpointing
        if gc or (gc is None and self.device.type == "cuda"):
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self._setup_optimizer(self.cfg.learning_rate, self.cfg.adam_weight_decay, self.cfg.lr_warmup_steps)

    def trainable_module(self) -> nn.Module:
        return self.unet

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
