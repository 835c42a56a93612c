"""Where a trainer runs and in which precision: the device choice, autocast, the dtype of the frozen
weights (trainable weights always stay fp32) and loss scaling for fp16.

``mixed_precision`` is "bf16" (the default), "fp16" or "fp32". It applies on CUDA only; CPU runs
stay fp32. fp16 gradients underflow without loss scaling, so fp16 runs always go through a
``torch.amp.GradScaler`` (bf16 has fp32's range and needs none).
"""

from __future__ import annotations

import contextlib

import torch

MIXED_PRECISIONS = ("bf16", "fp16", "fp32")


def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_mixed_precision(mixed_precision: str) -> str:
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision {mixed_precision!r}: use one of {MIXED_PRECISIONS}")
    return mixed_precision


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


def needs_loss_scaling(device: torch.device, mixed_precision: str) -> bool:
    return device.type == "cuda" and mixed_precision == "fp16"


def grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    """The loss scaler of a run: active for fp16 on CUDA, a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(device, mixed_precision))
