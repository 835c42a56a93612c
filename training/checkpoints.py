"""Checkpoints (trainable weights, optimizer, step, RNG and data position) and the atomic writes every
output file of a run goes through."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from training.rng import rng_state, set_rng_state


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


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, read in 1 MiB chunks (records which base weights a run used)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
