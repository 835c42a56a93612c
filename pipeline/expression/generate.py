"""Optional generation of portraits for cross-expression pairs (diffusers, local weights only).

Text-to-image: ``generate_portraits(requests, config)`` renders each (identity description,
expression, seed) with a Stable-Diffusion-style pipeline loaded by
``StableDiffusionPipeline.from_pretrained(config.model_path)`` - a local folder in diffusers
layout; no hub access (``local_files_only=True``). Image-to-image: ``generate_expression_variants``
re-renders a source portrait with another expression prompt at ``config.strength``.
CUDA (fp16) when present, else CPU fp32. Every image carries its metadata: prompt, negative prompt,
seed, model path, scheduler, steps, guidance, size, mode, and for img2img the source uid; PNG bytes
from ``png_with_metadata`` embed it as a ``lineup`` text chunk.

Generated faces then go through the face stage and ``describe_images`` like any photo: the
expression label used for pairing is the one measured, not the one prompted (both are kept).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.ids import content_uid

EXPRESSION_PHRASES = {
    "angry": "with an angry expression, frowning, eyebrows lowered",
    "disgust": "with a disgusted expression, wrinkled nose",
    "fear": "with a frightened expression, eyes wide open",
    "happy": "smiling broadly, happy expression",
    "sad": "with a sad expression, downturned mouth",
    "surprise": "with a surprised expression, mouth open, eyebrows raised",
    "neutral": "with a neutral expression, relaxed face, mouth closed",
}
PROMPT_TEMPLATE = (
    "a close-up portrait photo of {identity}, {expression}, looking at the camera, natural light, sharp focus"
)
NEGATIVE_PROMPT = "blurry, deformed face, cartoon, painting, multiple people, text, watermark"


class GenerationUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class GenerationConfig:
    model_path: str | None = None  # local diffusers folder (StableDiffusionPipeline layout)
    steps: int = 30
    guidance_scale: float = 7.0
    height: int = 512
    width: int = 512
    strength: float = 0.6  # img2img: how much of the source is re-noised
    negative_prompt: str = NEGATIVE_PROMPT
    device: str | None = None  # None: cuda when available
    batch_size: int = 4


@dataclass
class GeneratedImage:
    uid: str
    rgb: np.ndarray
    metadata: dict = field(default_factory=dict)


def build_prompt(identity: str, expression: str) -> str:
    if expression not in EXPRESSION_PHRASES:
        raise ValueError(f"unknown expression {expression!r}; one of {sorted(EXPRESSION_PHRASES)}")
    return PROMPT_TEMPLATE.format(identity=identity, expression=EXPRESSION_PHRASES[expression])


def png_with_metadata(img: GeneratedImage) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("lineup", json.dumps(img.metadata, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(img.rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class PortraitGenerator:
    def __init__(self, config: GenerationConfig):
        import torch

        if not config.model_path or not Path(config.model_path).expanduser().is_dir():
            raise GenerationUnavailable(
                f"generation: no local diffusers model folder at {config.model_path!r}"
            )
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        path = str(Path(config.model_path).expanduser())
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                path, dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
            )
        except Exception as e:
            raise GenerationUnavailable(f"generation: cannot load {path}: {type(e).__name__}: {e}") from e
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.img2img = StableDiffusionImg2ImgPipeline(**self.pipe.components)
        self.img2img.set_progress_bar_config(disable=True)
        self.config = config
        self.model = path

    def _meta(self, **kw) -> dict:
        c = self.config
        return {
            "model": self.model,
            "scheduler": type(self.pipe.scheduler).__name__,
            "steps": c.steps,
            "guidance_scale": c.guidance_scale,
            "negative_prompt": c.negative_prompt,
            "height": c.height,
            "width": c.width,
            "generator": "diffusers",
            **kw,
        }

    def _finish(self, images, metas) -> list[GeneratedImage]:
        out = []
        for im, m in zip(images, metas):
            rgb = np.asarray(im.convert("RGB"), np.uint8)
            g = GeneratedImage("", rgb, m)
            g.uid = content_uid(png_with_metadata(GeneratedImage("", rgb, {})))
            out.append(g)
        return out

    def generate(self, requests: Sequence[tuple[str, str, int]]) -> list[GeneratedImage]:
        """requests: (identity description, expression, seed) -> one image each, in order."""
        import torch

        out = []
        c = self.config
        for i in range(0, len(requests), c.batch_size):
            chunk = requests[i : i + c.batch_size]
            prompts = [build_prompt(ident, expr) for ident, expr, _ in chunk]
            gens = [torch.Generator(device="cpu").manual_seed(int(seed)) for _, _, seed in chunk]
            res = self.pipe(
                prompt=prompts,
                negative_prompt=[c.negative_prompt] * len(chunk),
                num_inference_steps=c.steps,
                guidance_scale=c.guidance_scale,
                height=c.height,
                width=c.width,
                generator=gens,
            )
            metas = [
                self._meta(mode="txt2img", prompt=p, seed=int(s), identity=ident, expression_prompted=e)
                for p, (ident, e, s) in zip(prompts, chunk)
            ]
            out += self._finish(res.images, metas)
        return out

    def variants(
        self,
        source: GeneratedImage | tuple[str, np.ndarray],
        identity: str,
        expressions: Sequence[str],
        seed: int,
    ) -> list[GeneratedImage]:
        """Image-to-image: the source portrait re-rendered with each expression prompt."""
        import torch
        from PIL import Image

        src_uid, src_rgb = (source.uid, source.rgb) if isinstance(source, GeneratedImage) else source
        c = self.config
        init = Image.fromarray(np.asarray(src_rgb, np.uint8)).convert("RGB").resize((c.width, c.height))
        out = []
        for k, expr in enumerate(expressions):
            p = build_prompt(identity, expr)
            s = int(seed) + k
            res = self.img2img(
                prompt=p,
                negative_prompt=c.negative_prompt,
                image=init,
                strength=c.strength,
                num_inference_steps=c.steps,
                guidance_scale=c.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(s),
            )
            out += self._finish(
                res.images,
                [
                    self._meta(
                        mode="img2img",
                        prompt=p,
                        seed=s,
                        identity=identity,
                        expression_prompted=expr,
                        source_uid=src_uid,
                        strength=c.strength,
                    )
                ],
            )
        return out


def generate_portraits(
    requests: Sequence[tuple[str, str, int]], config: GenerationConfig
) -> list[GeneratedImage]:
    return PortraitGenerator(config).generate(requests)


def config_dict(config: GenerationConfig) -> dict:
    return asdict(config)
