"""Small heads over CLIP embeddings: the LAION aesthetic predictor and the learned social reward.

Head checkpoints are state dicts of a stack of Linear layers, read in the order of their key
prefixes, with no activation in between - exactly the two public LAION formats:
  * ``sa_0_4_vit_l_14_linear.pth``: {"weight": (1, 768), "bias": (1,)}  (Linear(768, 1))
  * improved-aesthetic-predictor ``sac+logos+ava1-l14-linearMSE.pth``: layers.{0,2,4,6,7}.{weight,bias}
    (768 -> 1024 -> 128 -> 64 -> 16 -> 1; its Dropouts are identity at inference)
The input is the L2-normalised CLIP image embedding (ViT-L/14 -> 768-d for the LAION heads); the
aesthetic output is on the AVA 1..10 scale.

The learned social reward lives in pipeline/scoring/social.py (it also accepts this head format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.scoring.base import ScorerUnavailable, load_state_dict, pick_device, require_file


class LinearStack(nn.Module):
    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for l in self.layers:
            x = l(x)
        return x


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def linear_stack_from_state_dict(sd: dict) -> LinearStack:
    prefixes = sorted({k[: -len("weight")] for k in sd if k.endswith("weight")}, key=_natural)
    if not prefixes:
        raise ValueError("no Linear weights in the state dict")
    layers = []
    prev_out = None
    for p in prefixes:
        w = sd[p + "weight"]
        if w.ndim != 2:
            raise ValueError(f"{p}weight is not a Linear weight: shape {tuple(w.shape)}")
        if prev_out is not None and w.shape[1] != prev_out:
            raise ValueError(f"{p}weight expects {w.shape[1]} inputs, previous layer gives {prev_out}")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=(p + "bias") in sd)
        lin.weight.data.copy_(w.float())
        if lin.bias is not None:
            lin.bias.data.copy_(sd[p + "bias"].float())
        layers.append(lin)
        prev_out = w.shape[0]
    if prev_out != 1:
        raise ValueError(f"the head must output one score, got {prev_out}")
    return LinearStack(layers).eval()


@dataclass(frozen=True)
class HeadConfig:
    weights: str | None = None  # local .pth / .safetensors state dict
    device: str | None = None


class _HeadScorer:
    what = "head"
    hint = ""

    def __init__(self, config: HeadConfig):
        path = require_file(config.weights, self.what, self.hint)
        try:
            self.head = linear_stack_from_state_dict(load_state_dict(path))
        except Exception as e:
            raise ScorerUnavailable(f"{self.what}: cannot load {path}: {type(e).__name__}: {e}") from e
        self.device = pick_device(config.device)
        self.head.to(self.device)
        self.in_features = self.head.layers[0].in_features
        self.path = path

    def _run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return (
                self.head(torch.from_numpy(np.asarray(x, np.float32)).to(self.device))
                .squeeze(-1)
                .float()
                .cpu()
                .numpy()
            )


class AestheticScorer(_HeadScorer):
    what = "aesthetic"
    hint = "set LINEUP_AESTHETIC_WEIGHTS (or aesthetic_weights) to a LAION aesthetic predictor state dict"

    def score(self, img_emb: np.ndarray) -> np.ndarray:
        if img_emb.shape[1] != self.in_features:
            raise ScorerUnavailable(
                f"aesthetic: head expects {self.in_features}-d embeddings, CLIP gives {img_emb.shape[1]}-d"
            )
        return self._run(img_emb)
