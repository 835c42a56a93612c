"""Scorer plumbing shared by every scorer: availability with a reason, device choice."""

from __future__ import annotations

import os
from pathlib import Path


class ScorerUnavailable(RuntimeError):
    """A scorer cannot run here (weights not configured, missing or unreadable); the message says why."""


def pick_device(name: str | None = None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_file(path: str | os.PathLike | None, what: str, hint: str = "") -> Path:
    if not path:
        raise ScorerUnavailable(f"{what}: no weights configured{'; ' + hint if hint else ''}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ScorerUnavailable(f"{what}: weights not found at {p}{'; ' + hint if hint else ''}")
    return p


def load_state_dict(path: Path) -> dict:
    """A tensor state dict from .safetensors or a torch file loaded with weights_only=True (no pickle code)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        # TRY004 does not fit: the file's content is wrong, not the type of the argument
        raise ValueError(f"{path} does not hold a state dict")  # noqa: TRY004
    return sd
