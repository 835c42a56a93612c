"""Generation code path with a tiny Stable Diffusion pipeline built from config (random weights,
saved with save_pretrained and loaded back through the real loader). Images are meaningless."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.expression.generate import (
    GenerationConfig,
    GenerationUnavailable,
    PortraitGenerator,
    build_prompt,
    png_with_metadata,
)


def _bytes_to_unicode():  # GPT-2/CLIP byte -> printable unicode table
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_tokenizer(d):
    """A character-level CLIP tokenizer (no merges): enough to exercise the pipeline offline."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {}
    for t in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    d = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
    tok = _tiny_tokenizer(d)
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=len(tok),
            max_position_embeddings=77,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(d / "tiny-sd")
    return d / "tiny-sd"


def test_generation_txt2img_and_img2img(tiny_sd):
    cfg = GenerationConfig(
        model_path=str(tiny_sd), steps=2, height=32, width=32, device="cpu", guidance_scale=2.0
    )
    gen = PortraitGenerator(cfg)
    out = gen.generate([("a middle-aged man with a beard", "happy", 7), ("a young woman", "neutral", 8)])
    assert len(out) == 2 and out[0].rgb.shape == (32, 32, 3) and out[0].rgb.dtype == np.uint8
    m = out[0].metadata
    assert m["seed"] == 7 and m["model"] == str(tiny_sd) and m["mode"] == "txt2img"
    assert m["prompt"] == build_prompt("a middle-aged man with a beard", "happy") and "smiling" in m["prompt"]
    again = gen.generate([("a middle-aged man with a beard", "happy", 7)])
    np.testing.assert_array_equal(again[0].rgb, out[0].rgb)  # seeded
    assert again[0].uid == out[0].uid
    var = gen.variants(out[0], "a middle-aged man with a beard", ["surprise"], seed=3)
    assert var[0].metadata["source_uid"] == out[0].uid and var[0].metadata["mode"] == "img2img"
    png = png_with_metadata(var[0])
    assert json.loads(Image.open(io.BytesIO(png)).text["lineup"])["expression_prompted"] == "surprise"


def test_generation_unavailable_without_model(tmp_path):
    with pytest.raises(GenerationUnavailable):
        PortraitGenerator(GenerationConfig(model_path=str(tmp_path / "none")))
    with pytest.raises(ValueError):
        build_prompt("x", "bored")
