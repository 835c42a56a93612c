"""Where a trainer runs and in which precision: the device choice, autocast and the dtype of the frozen
weights (trainable weights always stay fp32)."""

from __future__ import annotations

import contextlib

import torch


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
