"""Model builders: the diffusers UNet, VAE and noise scheduler a trainer fine-tunes, from a local
pipeline folder, an explicit config, the test-size ``tiny`` config or the SD1.5 shape with random
weights (benchmarks). Nothing is ever fetched from a hub."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from training.text import build_text_encoder

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def build_unet(spec: Mapping[str, Any]):
    """A UNet2DConditionModel from ``{"pretrained": dir, "subfolder": "unet"}``, ``{"config": {...}}``,
    ``{"tiny": true}`` (tests) or ``{"sd15_random": true}`` (SD1.5 shape, random init: benchmarks)."""
    from diffusers import UNet2DConditionModel

    if spec.get("pretrained"):
        return UNet2DConditionModel.from_pretrained(
            spec["pretrained"], subfolder=spec.get("subfolder", "unet"), local_files_only=True
        )
    if spec.get("sd15_random"):
        torch.manual_seed(int(spec.get("init_seed", 0)))
        return UNet2DConditionModel()  # the class defaults are the SD1.5 UNet
    cfg = dict(spec.get("config") or TINY_UNET_CONFIG)
    torch.manual_seed(int(spec.get("init_seed", 0)))
    return UNet2DConditionModel(**cfg)


def build_vae(spec: Mapping[str, Any]):
    from diffusers import AutoencoderKL

    if spec.get("pretrained"):
        return AutoencoderKL.from_pretrained(
            spec["pretrained"], subfolder=spec.get("subfolder", "vae"), local_files_only=True
        )
    if spec.get("sd15_random"):
        torch.manual_seed(int(spec.get("init_seed", 0)))
        return AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
    cfg = dict(spec.get("config") or TINY_VAE_CONFIG)
    torch.manual_seed(int(spec.get("init_seed", 0)))
    return AutoencoderKL(**cfg)


def build_scheduler(spec: Mapping[str, Any] | None = None):
    """DDPMScheduler: from a local pipeline dir, or the SD1.5 training schedule."""
    from diffusers import DDPMScheduler

    spec = spec or {}
    if spec.get("pretrained"):
        return DDPMScheduler.from_pretrained(spec["pretrained"], subfolder=spec.get("subfolder", "scheduler"))
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=spec.get("prediction_type", "epsilon"),
    )


def build_diffusion(spec: Mapping[str, Any]):
    """(unet, vae, scheduler, text_encoder) from a run config's ``model`` section.

    ``{"pretrained": "/models/sd15"}`` reads a local diffusers pipeline folder (unet/, vae/,
    scheduler/, text_encoder/ + tokenizer/ through transformers); each part can be given on its own
    (``unet``, ``vae``, ``scheduler``, ``text_encoder`` specs; see build_unet etc.). ``{"tiny": true}``
    builds the test-size models and a hash text encoder."""
    spec = dict(spec or {})
    root = spec.get("pretrained")
    unet_spec = spec.get("unet") or ({"pretrained": root} if root else {"tiny": True} if spec.get("tiny") else None)
    vae_spec = spec.get("vae") or ({"pretrained": root} if root else {"tiny": True} if spec.get("tiny") else None)
    if unet_spec is None or vae_spec is None:
        raise ValueError("model: give 'pretrained' (a local diffusers folder), 'unet'+'vae' specs, or 'tiny': true")
    sched_spec = spec.get("scheduler") or ({"pretrained": root} if root else {})
    te_spec = spec.get("text_encoder") or ({"type": "clip", "path": root} if root else {"type": "hash"})
    unet = build_unet(unet_spec)
    vae = build_vae(vae_spec)
    sched = build_scheduler(sched_spec)
    te = build_text_encoder(te_spec, unet.config.cross_attention_dim)
    return unet, vae, sched, te
