"""Diffusion-DPO LoRA trainer: loss convention, learning on a learnable toy set, gradient scope,
exact resume, and the exported LoRA loading into diffusers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training import data, models, precision, synthetic, text
from training.dpo import DPOConfig, DPOTrainer, dpo_loss

UNET = dict(models.TINY_UNET_CONFIG, block_out_channels=[16, 32], cross_attention_dim=16, sample_size=8)
RES = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pref_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    train = synthetic.write_dataset(root / "v1", "preference", synthetic.preference_samples(64, size=RES, ties=2))
    held = synthetic.write_dataset(root / "heldout", "preference", synthetic.preference_samples(64, size=RES, seed=5))
    return train, held


def make_trainer(manifest=None, **kw) -> DPOTrainer:
    cfg = DPOConfig(**{"beta_dpo": 2500, "learning_rate": 1e-3, "lora_rank": 4, "vae_latent": "mean", **kw})
    unet = models.build_unet({"config": UNET})
    vae = models.build_vae({"tiny": True})
    te = text.build_text_encoder({"type": "hash", "max_length": 8}, UNET["cross_attention_dim"])
    return DPOTrainer(unet, vae, models.build_scheduler(), te, cfg, device="cpu", manifest=manifest)


def stream_for(d, **kw):
    return data.BatchStream(d, data.LoaderConfig(**{"resolution": RES, "batch_size": 8, "shuffle_buffer": 16, **kw}))


def test_dpo_loss_is_the_diffusers_formula_on_a_hand_computed_case():
    """-logsigmoid(beta_dpo * (ref_diff - model_diff)) with beta_dpo 2500, as the current diffusers
    example computes it; a tie (ref_diff == model_diff) counts half in the implicit accuracy."""
    beta_dpo = 2500.0
    # pairs: winner losses then loser losses; model_diff = (0, 0, -0.25), ref_diff = (0.0004, -0.0002, -0.25)
    model = torch.tensor([0.5, 0.25, 0.125, 0.5, 0.25, 0.375])
    ref = torch.tensor([0.5004, 0.25, 0.125, 0.5, 0.2502, 0.375])
    loss, m = dpo_loss(model, ref, beta_dpo)
    logits = [2500 * 0.0004, 2500 * -0.0002, 0.0]  # beta_dpo * (ref_diff - model_diff) = (1, -0.5, 0)
    expect = sum(math.log1p(math.exp(-x)) for x in logits) / 3  # -log sigmoid(x) = log(1 + e^-x)
    assert loss.item() == pytest.approx(expect, rel=1e-4)
    assert loss.item() == pytest.approx((0.31326169 + 0.97407698 + 0.69314718) / 3, rel=1e-4)
    assert m["implicit_acc"] == pytest.approx((1 + 0 + 0.5) / 3)  # win, loss, tie (half)
    assert m["reward_margin"] == pytest.approx(sum(logits) / 3, rel=1e-3)


def test_old_beta_option_is_refused_by_name():
    with pytest.raises(ValueError, match="beta_dpo"):
        DPOConfig.from_dict({"beta": 5000})


def test_dpo_learns_toy_preference_and_only_lora_trains(pref_dirs):
    train, held = pref_dirs
    stream = stream_for(train)
    tr = make_trainer(stream.manifest)
    evb = [next(stream_for(held, batch_size=64, shuffle_buffer=0))] * 2
    before = tr.evaluate(evb)
    # LoRA B=0 at init: model == reference, every pair a tie, which counts half
    assert before["eval_implicit_acc"] == 0.5 and before["eval_pairs"] == 128

    base = {n: p.detach().clone() for n, p in tr.unet.named_parameters() if "lora_" not in n}
    tr.train_step(stream)
    grads = {n for n, p in tr.unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)
    assert all(not p.requires_grad for n, p in tr.unet.named_parameters() if "lora_" not in n)
    assert all(not p.requires_grad for p in tr.vae.parameters())

    for _ in range(29):
        tr.train_step(stream)
    after = tr.evaluate(evb)
    # winners (red) vs losers (blue): the LoRA must prefer winners well above chance
    assert after["eval_implicit_acc"] > 0.65, after
    assert after["eval_reward_margin"] > 0
    for n, p in tr.unet.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # frozen weights untouched
    assert stream.counter.skipped >= 1  # ties were dropped, counted


def test_resume_gives_same_state(pref_dirs, tmp_path):
    train, _ = pref_dirs
    # straight: 4 steps
    s1 = stream_for(train, batch_size=4)
    a = make_trainer(s1.manifest)
    for _ in range(4):
        a.train_step(s1)
    # 2 steps, checkpoint, fresh process-like objects, resume, 2 steps
    s2 = stream_for(train, batch_size=4)
    b = make_trainer(s2.manifest)
    for _ in range(2):
        b.train_step(s2)
    ck = b.save_checkpoint(tmp_path / "ckpt", s2)
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["manifest"]["config_fingerprint"] == s2.manifest["config_fingerprint"]
    assert meta["data_position"] == {"epoch": 0, "batch": 2}
    torch.manual_seed(999)  # perturb global RNG: the checkpoint must restore it
    s3 = stream_for(train, batch_size=4)
    c = make_trainer(s3.manifest)
    c.resume(ck, s3)
    assert c.step == 2
    for _ in range(2):
        c.train_step(s3)
    la, lc = a.lora_state_dict(), c.lora_state_dict()
    assert la.keys() == lc.keys()
    for k in la:
        torch.testing.assert_close(la[k], lc[k], rtol=0, atol=1e-6)
    # a checkpoint from other data is refused
    other = make_trainer({"config_fingerprint": "different"})
    with pytest.raises(ValueError, match="fingerprint"):
        other.resume(ck)


def _tiny_pipeline(unet, vae, tmp_path):
    transformers = pytest.importorskip("transformers")
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16))
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDPMScheduler(clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_exported_lora_loads_with_diffusers(pref_dirs, tmp_path):
    train, _ = pref_dirs
    stream = stream_for(train, batch_size=4)
    tr = make_trainer(stream.manifest)
    for _ in range(2):
        tr.train_step(stream)
    path = tr.export_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()
    meta = json.loads((tmp_path / "lora" / "training_meta.json").read_text())
    assert meta["dataset"]["config_fingerprint"] == stream.manifest["config_fingerprint"]

    # reference output with the trained LoRA
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    emb = torch.randn(1, 8, 16)
    with torch.no_grad():
        want = tr.unet(x, torch.tensor([10]), emb).sample

    fresh_unet = models.build_unet({"config": UNET})
    pipe = _tiny_pipeline(fresh_unet, models.build_vae({"tiny": True}), tmp_path)
    with torch.no_grad():
        plain = pipe.unet(x, torch.tensor([10]), emb).sample
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        got = pipe.unet(x, torch.tensor([10]), emb).sample
    assert not torch.allclose(plain, want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lora_with_alpha_unlike_rank_loads_at_its_scale(tmp_path):
    """The exported file carries its adapter config: a rank-4 LoRA with lora_alpha 16 (scale 4) loads
    into a fresh diffusers pipeline and reproduces the trainer's UNet; the same weights without the
    metadata load at scale 1 and do not."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors import safe_open

    tr = make_trainer(lora_rank=4, lora_alpha=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a LoRA far from zero, so that its scale shows in the output
        for n, p in tr.unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tr.export_lora(tmp_path / "lora")
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["unet.r"] == 4 and header["unet.lora_alpha"] == 16

    torch.manual_seed(0)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 8, 16)
    with torch.no_grad():
        want = tr.unet(x, t, emb).sample
        plain = models.build_unet({"config": UNET})(x, t, emb).sample
    pipe = _tiny_pipeline(models.build_unet({"config": UNET}), models.build_vae({"tiny": True}), tmp_path)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        got = pipe.unet(x, t, emb).sample
    assert (want - plain).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # control: the same tensors saved without the adapter metadata load at lora_alpha = rank
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp_path / "bare"), unet_lora_layers=tr.lora_state_dict())
    bare = _tiny_pipeline(models.build_unet({"config": UNET}), models.build_vae({"tiny": True}), tmp_path)
    bare.load_lora_weights(str(tmp_path / "bare"))
    with torch.no_grad():
        assert not torch.allclose(bare.unet(x, t, emb).sample, want, atol=1e-3)


def test_fp16_goes_through_a_grad_scaler():
    """The rule: fp16 on CUDA is loss-scaled; bf16 (the default) and CPU runs are not; anything else
    is refused."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision.needs_loss_scaling(cuda, "fp16")
    assert not precision.needs_loss_scaling(cuda, "bf16") and not precision.needs_loss_scaling(cpu, "fp16")
    assert DPOConfig().mixed_precision == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        make_trainer(mixed_precision="fp8")


def test_loss_scaling_clips_true_gradients_and_skips_overflowing_steps(pref_dirs):
    """What an fp16 run on CUDA goes through, exercised on CPU with an enabled scaler: the update and
    the reported gradient norm equal the unscaled run's, and an overflowing step is skipped."""
    train, _ = pref_dirs
    plain, scaled = make_trainer(), make_trainer()
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    mp = plain.train_step(stream_for(train, batch_size=4))
    ms = scaled.train_step(stream_for(train, batch_size=4))
    assert ms["loss_scale"] == 2.0**12 and "loss_scale" not in mp
    assert ms["grad_norm"] == pytest.approx(mp["grad_norm"], rel=1e-5)
    for k, v in plain.lora_state_dict().items():
        torch.testing.assert_close(scaled.lora_state_dict()[k], v, rtol=0, atol=1e-6)

    over = make_trainer()
    over.scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # scaled gradients overflow float32
    before = over.lora_state_dict()
    m = over.train_step(stream_for(train, batch_size=4))
    assert over.scaler.get_scale() == pytest.approx(1.5e38)  # backed off
    for k, v in over.lora_state_dict().items():
        assert torch.equal(v, before[k]), k  # the step was skipped
    assert not math.isfinite(m["grad_norm"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs CUDA")
def test_fp16_on_cuda_trains_with_an_active_scaler(pref_dirs):
    train, _ = pref_dirs
    cfg = DPOConfig(beta_dpo=2500, learning_rate=1e-3, lora_rank=4, vae_latent="mean", mixed_precision="fp16")
    tr = DPOTrainer(models.build_unet({"config": UNET}), models.build_vae({"tiny": True}), models.build_scheduler(),
                    text.build_text_encoder({"type": "hash", "max_length": 8}, UNET["cross_attention_dim"]), cfg,
                    device="cuda")
    s = stream_for(train, batch_size=4)
    ms = [tr.train_step(s) for _ in range(3)]
    assert tr.scaler.is_enabled() and all(math.isfinite(m["dpo_loss"]) for m in ms)
    assert all(p.dtype == torch.float32 for p in tr.trainable_parameters())
