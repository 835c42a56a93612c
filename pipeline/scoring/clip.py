"""CLIP image/text encoder (open_clip) from local weights, and the CLIP text-image score.

Weights come from a local file: ``open_clip.create_model_and_transforms(model_name,
pretrained=<local path>)``. ``model_config`` may name a JSON architecture file to register first
(open_clip.add_model_config), which is how tests build a tiny CLIP. Nothing is fetched from a hub:
a model name with an ``hf-hub:`` prefix or a pretrained tag that is not a file is reported
unavailable. clip_score = cosine(image embedding, caption embedding), in [-1, 1] (the
"CLIPScore" of Hessel et al. is 2.5 * max(cosine, 0) on ViT-B/32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.scoring.base import ScorerUnavailable, pick_device, require_file


@dataclass(frozen=True)
class ClipConfig:
    model_name: str = "ViT-L-14"
    pretrained: str | None = None  # local checkpoint file (open_clip_pytorch_model.bin / .safetensors)
    model_config: str | None = None  # optional JSON architecture file to register (custom/tiny models)
    device: str | None = None  # None: cuda when available
    batch_size: int = 64
    precision: str = "fp32"  # "fp16" on CUDA halves memory


class ClipEncoder:
    def __init__(self, config: ClipConfig):
        import open_clip

        if config.model_name.startswith(("hf-hub:", "hf_hub:")):
            raise ScorerUnavailable(
                f"clip: {config.model_name!r} would download from a hub; configure a local file"
            )
        path = require_file(
            config.pretrained, "clip", "set LINEUP_CLIP_WEIGHTS (or clip_weights) to a local open_clip checkpoint"
        )
        if config.model_config:
            open_clip.add_model_config(Path(config.model_config))
        if config.model_name not in open_clip.list_models():
            raise ScorerUnavailable(
                f"clip: unknown architecture {config.model_name!r} (register it with model_config)"
            )
        self.device = pick_device(config.device)
        precision = config.precision if self.device.type == "cuda" else "fp32"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.model_name, pretrained=str(path), device=self.device, precision=precision
            )
        except Exception as e:
            raise ScorerUnavailable(
                f"clip: cannot load {path} as {config.model_name}: {type(e).__name__}: {e}"
            ) from e
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        self.config = config
        self.name = f"{config.model_name}:{path.name}"

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[-1])
            if getattr(self.model, "text_projection", None) is not None
            else int(self.encode_texts(["x"]).shape[1])
        )

    def encode_images(self, rgbs: list[np.ndarray]) -> np.ndarray:
        import torch
        from PIL import Image

        out = []
        with torch.inference_mode():
            for i in range(0, len(rgbs), self.config.batch_size):
                x = torch.stack(
                    [
                        self.preprocess(Image.fromarray(np.asarray(r, np.uint8)).convert("RGB"))
                        for r in rgbs[i : i + self.config.batch_size]
                    ]
                )
                x = x.to(self.device, dtype=next(self.model.parameters()).dtype)
                e = self.model.encode_image(x, normalize=True)
                out.append(e.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.config.batch_size):
                tok = self.tokenizer(list(texts[i : i + self.config.batch_size])).to(self.device)
                out.append(self.model.encode_text(tok, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def clip_scores(img_emb: np.ndarray, txt_emb: np.ndarray) -> np.ndarray:
    return (np.asarray(img_emb) * np.asarray(txt_emb)).sum(1).astype(np.float32)


__all__ = ["ClipConfig", "ClipEncoder", "ScorerUnavailable", "clip_scores"]
