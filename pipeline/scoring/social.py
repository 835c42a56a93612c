"""Learned social reward: scores an (image, prompt) with the model that preference training produces.

Two checkpoint formats are accepted at ``HeadConfig.weights``:
  * a folder written by ``training/reward.py:save_reward_model`` (``reward_config.json`` with
    ``"format": "lineup-reward-v1"`` + ``reward_model.safetensors``): an open_clip model
    fine-tuned with a triplet loss; score = cosine(image embedding, prompt embedding). When the
    checkpoint holds only the trainable parameters (``"weights": "trainable"``) the base weights
    are rebuilt from its ``pretrained`` path (or ``base_weights`` here), which must be a local file.
    This module reads the format itself: ``pipeline/`` does not import ``training/``.
  * a Linear-stack head file (see heads.py) over [image_emb, text_emb] (2 x D inputs) or the image
    embedding alone (D inputs) of the stage's CLIP encoder.
Without a checkpoint the scorer is unavailable with the reason; it never scores with random weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline.scoring.base import ScorerUnavailable, pick_device
from pipeline.scoring.heads import HeadConfig, _HeadScorer

REWARD_FORMAT = "lineup-reward-v1"
HINT = ("set LINEUP_SOCIAL_REWARD (or social_reward_weights) to a checkpoint, or let social_reward_model train one "
        "from real CLIP weights")


class _HeadSocial(_HeadScorer):
    what = "social_reward"
    hint = HINT


class SocialRewardScorer:
    """``score(rgbs, captions, img_emb, txt_emb) -> (row indices, scores)``; rows without a caption get none."""

    def __init__(self, config: HeadConfig, base_weights: str | None = None, batch_size: int = 32):
        if not config.weights:
            raise ScorerUnavailable(f"social_reward: no weights configured; {HINT}")
        p = Path(config.weights).expanduser()
        self.device = pick_device(config.device)
        self.batch_size = batch_size
        if p.is_dir():
            self.kind = "reward_clip"
            self._load_reward_folder(p, base_weights)
            self.needs_clip = False
        else:
            self.kind = "head"
            self.head = _HeadSocial(config)
            self.in_features = self.head.in_features
            self.needs_clip = True
        self.path = p

    def _load_reward_folder(self, p: Path, base_weights: str | None) -> None:
        import open_clip
        import torch

        cfg_path = p / "reward_config.json"
        if not cfg_path.is_file() or not (p / "reward_model.safetensors").is_file():
            raise ScorerUnavailable(
                f"social_reward: {p} has no reward_config.json + reward_model.safetensors; {HINT}"
            )
        conf = json.loads(cfg_path.read_text())
        if conf.get("format") != REWARD_FORMAT:
            raise ScorerUnavailable(f"social_reward: {p} is not a {REWARD_FORMAT} checkpoint")
        name = conf["model_name"]
        if conf.get("model_cfg") is not None:
            d = Path(tempfile.mkdtemp(prefix="lineup_reward_cfg_"))
            (d / f"{name}.json").write_text(json.dumps(conf["model_cfg"]))
            open_clip.add_model_config(d)
        base = None
        if conf.get("weights") == "trainable":
            base = base_weights or conf.get("pretrained")
            if not base or not Path(base).is_file():
                raise ScorerUnavailable(
                    f"social_reward: checkpoint holds only fine-tuned layers and its base weights {base!r} are not a local file"
                )
        try:
            from safetensors.torch import load_file

            model = open_clip.create_model(name, pretrained=base)
            _missing, unexpected = model.load_state_dict(
                load_file(str(p / "reward_model.safetensors")), strict=conf.get("weights") == "full"
            )
            if unexpected:
                raise ValueError(f"unknown keys {unexpected[:5]}")
        except Exception as e:
            raise ScorerUnavailable(f"social_reward: cannot load {p}: {type(e).__name__}: {e}") from e
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.image_size = int(conf["image_size"])
        self.mean = torch.tensor(conf["mean"], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(conf["std"], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)

    def _reward_clip(self, rgbs, captions) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = []
        with torch.inference_mode():
            for i in range(0, len(rgbs), self.batch_size):
                chunk = rgbs[i : i + self.batch_size]
                xs = []
                for r in chunk:  # same preprocessing as training: [0, 1], bicubic resize, normalise
                    x = (
                        torch.from_numpy(np.ascontiguousarray(np.asarray(r, np.uint8)[..., :3]))
                        .permute(2, 0, 1)[None]
                        .float()
                        / 255.0
                    )
                    xs.append(
                        F.interpolate(
                            x,
                            size=(self.image_size, self.image_size),
                            mode="bicubic",
                            antialias=True,
                            align_corners=False,
                        )
                    )
                x = (torch.cat(xs).to(self.device) - self.mean) / self.std
                ie = F.normalize(self.model.encode_image(x).float(), dim=-1)
                te = F.normalize(
                    self.model.encode_text(
                        self.tokenizer(list(captions[i : i + self.batch_size])).to(self.device)
                    ).float(),
                    dim=-1,
                )
                out.append((ie * te).sum(-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def score(self, rgbs, captions, img_emb=None, txt_emb=None) -> tuple[list[int], np.ndarray]:
        has_cap = [i for i, c in enumerate(captions) if c]
        if self.kind == "reward_clip":
            if not has_cap:
                return [], np.zeros(0, np.float32)
            return has_cap, self._reward_clip([rgbs[i] for i in has_cap], [captions[i] for i in has_cap])
        if img_emb is None:
            raise ScorerUnavailable("social_reward: this head needs CLIP embeddings, and clip is unavailable")
        d = img_emb.shape[1]
        if self.in_features == 2 * d:
            if not has_cap:
                return [], np.zeros(0, np.float32)
            return has_cap, self.head._run(np.concatenate([img_emb[has_cap], txt_emb[has_cap]], 1))
        if self.in_features == d:
            return list(range(len(rgbs))), self.head._run(img_emb)
        raise ScorerUnavailable(
            f"social_reward: checkpoint expects {self.in_features} inputs; CLIP embeddings are {d}-d"
        )
