"""Shared pieces of the trainers: model builders, text conditioning, RNG and checkpoint helpers.

Only torch, diffusers, peft, safetensors and numpy are imported at module level (transformers is
imported lazily, only for a CLIP text encoder loaded from a local path), so the GPU bench can use
this module on a machine that has nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Nothing may reach a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ----------------------------------------------------------------------------------------------
# Model builders
# ----------------------------------------------------------------------------------------------

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


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------
# Text conditioning
# ----------------------------------------------------------------------------------------------


class HashTextEncoder(nn.Module):
    """Weight-free text conditioning: each lower-cased word maps to a fixed random vector seeded by
    its hash (a random projection of a bag of words, with a position code). Used in tests and the
    benchmark, and as an explicit choice where no text encoder weights are at hand; it carries word
    identity, not meaning."""

    def __init__(self, dim: int, max_length: int = 77, seed: int = 0):
        super().__init__()
        self.dim = dim
        self.max_length = max_length
        self.seed = seed
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("pos", torch.randn(max_length, dim, generator=g) * 0.1, persistent=False)
        self._cache: dict[str, torch.Tensor] = {}

    def _word(self, w: str) -> torch.Tensor:
        if w not in self._cache:
            h = int.from_bytes(hashlib.sha1(f"{self.seed}:{w}".encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(h & 0x7FFF_FFFF_FFFF_FFFF)
            self._cache[w] = torch.randn(self.dim, generator=g)
        return self._cache[w]

    @torch.no_grad()
    def forward(self, captions: list[str | None]) -> torch.Tensor:
        out = torch.zeros(len(captions), self.max_length, self.dim)
        for i, c in enumerate(captions):
            words = re.findall(r"[a-z0-9]+", (c or "").lower())[: self.max_length]
            for j, w in enumerate(words):
                out[i, j] = self._word(w)
        return out + self.pos.cpu()


class CLIPTextConditioner(nn.Module):
    """transformers' CLIPTextModel + tokenizer from a local pipeline dir (``text_encoder``/``tokenizer``)."""

    def __init__(self, path: str, max_length: int = 77):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer  # lazy: optional dependency

        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        self.model.requires_grad_(False).eval()
        self.max_length = min(max_length, self.tokenizer.model_max_length)

    @torch.no_grad()
    def forward(self, captions: list[str | None]) -> torch.Tensor:
        tok = self.tokenizer(
            [c or "" for c in captions], padding="max_length", truncation=True,
            max_length=self.max_length, return_tensors="pt",
        )
        dev = next(self.model.parameters()).device
        return self.model(tok.input_ids.to(dev))[0]


def build_text_encoder(spec: Mapping[str, Any], cross_attention_dim: int) -> nn.Module:
    kind = spec.get("type", "hash")
    if kind == "hash":
        return HashTextEncoder(cross_attention_dim, int(spec.get("max_length", 77)), int(spec.get("seed", 0)))
    if kind == "clip":
        return CLIPTextConditioner(spec["path"], int(spec.get("max_length", 77)))
    raise ValueError(f"unknown text encoder type {kind!r} (use 'hash' or 'clip')")


# ----------------------------------------------------------------------------------------------
# Devices, precision
# ----------------------------------------------------------------------------------------------


def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, mixed_precision: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (CPU training stays fp32)."""
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def weight_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    if device.type == "cuda" and mixed_precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and mixed_precision == "fp16":
        return torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# RNG state and checkpoints
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """All RNG state as tensors/ints/lists, so that torch.load(weights_only=True) reads it back."""
    py = random.getstate()
    npst = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Mapping, generator: torch.Generator | None = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_trainable(module: nn.Module, path: Path, metadata: Mapping[str, str] | None = None) -> dict:
    """Every parameter with requires_grad=True (by its name in ``module``) to a safetensors file."""
    from safetensors.torch import save_file

    sd = {n: p.detach().float().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return sd


def load_trainable(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in sd]
    unknown = [n for n in sd if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        for n, t in sd.items():
            params[n].copy_(t.to(params[n].dtype))


def save_checkpoint(
    ckpt_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping, generator=None
) -> Path:
    """``ckpt_dir/checkpoint-<step>/``: ``trainable.safetensors`` + ``trainer_state.pt`` (optimizer,
    step, RNG, data position, manifest) + ``meta.json``. Written under a temporary name, then renamed."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"checkpoint-{int(state['step']):07d}"
    tmp = ckpt_dir / f".{final.name}.partial"
    tmp.mkdir(exist_ok=True)
    save_trainable(module, tmp / "trainable.safetensors", {"step": state["step"]})
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(generator), **dict(state)},
               tmp / "trainer_state.pt")
    meta = {k: v for k, v in state.items() if isinstance(v, (int, float, str, dict, list, type(None)))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpts = sorted(Path(ckpt_dir).glob("checkpoint-*")) if Path(ckpt_dir).exists() else []
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, generator=None) -> dict:
    path = Path(path)
    load_trainable(module, path / "trainable.safetensors")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    set_rng_state(state.pop("rng"), generator)
    return state


def manifest_info(manifest: Mapping | None) -> dict:
    """The fields of a dataset manifest that every checkpoint records."""
    m = manifest or {}
    return {
        "dataset": m.get("dataset"),
        "version": m.get("version"),
        "config_fingerprint": m.get("config_fingerprint"),
        "num_samples": m.get("num_samples"),
    }


def loss_curve_png(history: list[dict], path: Path, keys=("loss",)) -> Path | None:
    """A PNG of the training curves (matplotlib, Agg); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k in keys:
        xs = [h["step"] for h in history if k in h]
        ys = [h[k] for h in history if k in h]
        if xs:
            ax.plot(xs, ys, label=k)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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


# ----------------------------------------------------------------------------------------------
# Multi-GPU (torchrun): plain torch.distributed, gradients of the trainable parameters all-reduced
# ----------------------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> str | None:
    """Under torchrun (WORLD_SIZE > 1): init the process group (NCCL on CUDA, else gloo) and return
    this rank's device; None for a single process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def allreduce_grads(params) -> None:
    """Average gradients over ranks (what DDP does, without bucketing: the trainable sets here are
    adapters of a few M parameters)."""
    import torch.distributed as dist

    _, world = dist_info()
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def gather_objects(obj) -> list:
    import torch.distributed as dist

    _, world = dist_info()
    if world <= 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


def step_seed(seed: int, rank: int, step: int) -> int:
    """Noise/timestep seed of one optimizer step on one rank: a resume (or another rank) needs no
    generator state to reproduce (or decorrelate) it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:8], "little") & (2**63 - 1)
