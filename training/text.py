"""Text conditioning for the diffusion trainers: a weight-free hashing encoder (tests, benchmarks, smoke
runs) or transformers' CLIP text model from a local pipeline folder."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


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
