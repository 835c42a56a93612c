"""Identity adapter trainer: InfoNCE, alignment crops, the attention processor, and training steps
with and without face-embedder weights."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from training import data, models, synthetic, text
from training.identity import (
    ARCFACE_TEMPLATE,
    IDAdapter,
    IdentityConfig,
    IdentityTrainer,
    crop_faces,
    info_nce,
)
from training.iresnet import build_iresnet, load_face_embedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = dict(models.TINY_UNET_CONFIG, block_out_channels=[16, 32], cross_attention_dim=16, sample_size=8)
ARC = {"layers": [1, 1, 1, 1], "widths": (8, 8, 16, 16), "num_features": 16}


@pytest.fixture(scope="module")
def id_dir(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("id") / "v1", "multiid",
                                   synthetic.identity_samples(12, size=32, emb_dim=16))


@pytest.fixture(scope="module")
def arc_file(tmp_path_factory):
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("arc") / "backbone.pth"
    torch.save(build_iresnet(**ARC).state_dict(), p)
    return p


def stream_for(d):
    return data.BatchStream(d, data.LoaderConfig(family="identity", resolution=32, ref_resolution=32,
                                                 batch_size=4, shuffle_buffer=8))


def make_trainer(manifest, arc_path, **kw):
    emb, info = load_face_embedder(arc_path, **ARC)
    cfg = IdentityConfig(**{"emb_dim": 16, "bank_size": 64, "learning_rate": 1e-3, "vae_latent": "mean", **kw})
    return IdentityTrainer(models.build_unet({"config": UNET}), models.build_vae({"tiny": True}),
                           models.build_scheduler(), text.build_text_encoder({"type": "hash", "max_length": 8}, 16),
                           cfg, emb, info, device="cpu", manifest=manifest)


def test_info_nce_matches_hand_computation():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    T = 0.1
    got = info_nce(g, pos, negs, mask, T).item()
    # row 0: g=(1,0): pos 0.6; negs (valid) 1.0, -1.0 ; row 1: g=(0,1): pos 1.0; negs 0.0, 1.0
    r0 = -math.log(math.exp(0.6 / T) / (math.exp(0.6 / T) + math.exp(1.0 / T) + math.exp(-1.0 / T)))
    r1 = -math.log(math.exp(1.0 / T) / (math.exp(1.0 / T) + math.exp(0.0 / T) + math.exp(1.0 / T)))
    assert got == pytest.approx((r0 + r1) / 2, rel=1e-5)
    # [N,K,E] negatives give the same as shared [K,E]
    assert info_nce(g, pos, negs.expand(2, 3, 2), mask, T).item() == pytest.approx(got, rel=1e-6)


def test_crop_faces_alignment():
    yy, xx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    img = torch.stack([torch.sin(xx / 9), torch.cos(yy / 7), torch.sin((xx + yy) / 11)]).unsqueeze(0)
    one = torch.tensor([0])
    # landmarks exactly at the template: identity crop
    c = crop_faces(img, one, ARCFACE_TEMPLATE[None], torch.tensor([True]), torch.zeros(1, 4))
    torch.testing.assert_close(c, img, atol=1e-4, rtol=0)
    # bbox fallback covering the image: identity crop too
    c = crop_faces(img, one, torch.zeros(1, 5, 2), torch.tensor([False]), torch.tensor([[0.0, 0, 112, 112]]))
    torch.testing.assert_close(c, img, atol=1e-4, rtol=0)
    # degenerate landmarks (all at one point) fall back to the bbox instead of a singular transform
    c = crop_faces(img, one, torch.full((1, 5, 2), 50.0), torch.tensor([True]), torch.tensor([[0.0, 0, 112, 112]]))
    torch.testing.assert_close(c, img, atol=1e-4, rtol=0)
    # the same face at half scale, shifted, inside a bigger image: recovered (up to resampling)
    big = torch.zeros(1, 3, 160, 160)
    small = torch.nn.functional.interpolate(img, size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
    big[..., 30:86, 50:106] = small
    lm = ARCFACE_TEMPLATE[None] / 2 + torch.tensor([50.0, 30.0])
    c = crop_faces(big, one, lm, torch.tensor([True]), torch.zeros(1, 4))
    assert (c - img)[..., 4:-4, 4:-4].abs().mean() < 0.05


def test_processor_without_identity_equals_default_attention():
    torch.manual_seed(0)
    unet = models.build_unet({"config": UNET})
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.randn(2, 8, 16)
    with torch.no_grad():
        want = unet(x, t, emb).sample
        ad = IDAdapter(unet, emb_dim=16, num_tokens=2)
        tokens, mask = ad.tokens(torch.randn(2, 3, 16), torch.zeros(2, 3, dtype=torch.bool))
        no_faces = unet(x, t, emb, cross_attention_kwargs={"id_tokens": tokens, "id_mask": mask}).sample
        plain = unet(x, t, emb).sample
        with_faces = unet(x, t, emb, cross_attention_kwargs={"id_tokens": tokens, "id_mask": ~mask}).sample
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(no_faces, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_faces, want)
    assert len(ad.layers) == sum("attn2" in k for k in unet.attn_processors) == 4  # every cross-attention


def test_identity_step_with_embedder(id_dir, arc_file, tmp_path):
    s = stream_for(id_dir)
    tr = make_trainer(s.manifest, arc_file, id_terms_max_t=None)  # every face in the loss, whatever its t
    assert tr.identity_terms
    before = {n: p.detach().clone() for n, p in tr.adapter.named_parameters()}
    m = tr.train_step(s)
    for k in ("diffusion_loss", "id_loss", "infonce", "id_cos"):
        assert math.isfinite(m[k]), k
    assert m["cond_source"] == "ref_embedder" and m["id_faces"] == 8
    assert all(p.grad is None for p in tr.unet.parameters() if not p.requires_grad)
    assert all(p.grad is None for p in tr.embedder.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in tr.adapter.named_parameters() if p.requires_grad)
    # the second step sees the first batch's GT embeddings as extended negatives
    m2 = tr.train_step(s)
    assert len(tr.bank) == 16 and m2["negatives"] > m["negatives"]
    out = tr.export_adapter(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "id_adapter.json").read_text())
    assert out.exists() and meta["face_embedder"]["status"] == "loaded" and meta["face_embedder"]["identity_terms"]


def test_identity_resume_is_exact(id_dir, arc_file, tmp_path):
    a_s = stream_for(id_dir)
    a = make_trainer(a_s.manifest, arc_file)
    for _ in range(3):
        a.train_step(a_s)
    b_s = stream_for(id_dir)
    b = make_trainer(b_s.manifest, arc_file)
    b.train_step(b_s)
    ck = b.save_checkpoint(tmp_path / "ck", b_s)
    c_s = stream_for(id_dir)
    c = make_trainer(c_s.manifest, arc_file)
    c.resume(ck, c_s)
    for _ in range(2):
        c.train_step(c_s)
    for (n, p), (_, q) in zip(a.adapter.named_parameters(), c.adapter.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_shard_embeddings_of_another_size(tmp_path, arc_file):
    # shards carry 8-d embeddings (think 128-d dlib), the loss embedder gives 16-d (think ArcFace 512)
    d = synthetic.write_dataset(tmp_path / "v8", "multiid", synthetic.identity_samples(8, size=32, emb_dim=8))
    s = stream_for(d)
    tr = make_trainer(s.manifest, arc_file, emb_dim=8)
    m = tr.train_step(s)
    assert tr.face_dim == 16 and tr.bank.emb.shape[1] == 16
    assert m["cond_source"] == "gt_json_copy" and math.isfinite(m["infonce"])


def test_identity_terms_skipped_without_weights(id_dir, tmp_path, caplog):
    s = stream_for(id_dir)
    with caplog.at_level(logging.WARNING, logger="lineup.training.identity"):
        tr = make_trainer(s.manifest, tmp_path / "missing.pth")
    assert not tr.identity_terms
    assert "identity terms disabled" in caplog.text
    m = tr.train_step(s)
    assert "id_loss" not in m and m["identity_terms"] == 0.0 and m["loss"] == pytest.approx(m["diffusion_loss"])
    assert m["cond_source"] == "gt_json_copy"  # no embedder: the json GT embedding, recorded as such
    tr.export_adapter(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "id_adapter.json").read_text())
    assert meta["face_embedder"]["status"] == "absent" and meta["face_embedder"]["identity_terms"] is False


def test_identity_terms_follow_withanyone_weights_and_stop_at_high_noise(id_dir, arc_file):
    s = stream_for(id_dir)
    tr = make_trainer(s.manifest, arc_file)
    assert (tr.cfg.id_loss_weight, tr.cfg.infonce_weight) == (1.0, 0.01)
    limit = tr.id_terms_max_timestep()
    assert limit == int(0.6 * (tr.scheduler.config.num_train_timesteps - 1))
    batch = next(iter(s))
    latents = tr.encode_images(batch["target"])
    noise = torch.randn_like(latents)
    for t_value, faces in ((limit + 1, 0), (limit, 8)):  # 4 images x 2 faces
        t = torch.full((latents.shape[0],), t_value, dtype=torch.long)
        noisy = tr.scheduler.add_noise(latents, noise, t)
        _, _, m = tr.identity_losses(batch, noisy, noise, t)
        assert m["id_faces"] == faces, t_value


@pytest.mark.parametrize("embedder", [True, False])
def test_heldout_identity_evaluation_against_the_untrained_adapter(id_dir, arc_file, tmp_path, embedder):
    s = stream_for(id_dir)
    tr = make_trainer(s.manifest, arc_file if embedder else tmp_path / "missing.pth")
    held = [next(iter(stream_for(id_dir)))]
    # the untrained adapter against itself: every face a tie, exactly chance
    fresh = tr.evaluate(held)
    assert fresh["eval_pairs"] == 8 and fresh["eval_id_win_rate"] == 0.5
    assert fresh["eval_measure"] == ("sim_gt_one_step" if embedder else "projection_margin_proxy")
    for _ in range(2):
        tr.train_step(s)
    weights = {k: v.clone() for k, v in tr.adapter.state_dict().items()}
    after = tr.evaluate(held)
    assert after["eval_pairs"] == 8 and after["eval_likeness_trained"] != after["eval_likeness_untrained"]
    # Sim(Ref) beside Sim(GT) when faces can be generated and embedded; no such thing for the proxy
    assert (-1 <= after.get("eval_sim_ref_trained", 2) <= 1) if embedder else "eval_sim_ref_trained" not in after
    assert 0 <= after["eval_id_win_rate"] <= 1 and after["eval_id_win_rate"] != 0.5
    for k, v in tr.adapter.state_dict().items():  # the measurement swapped the untrained weights back out
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert tr.evaluate([]) == {"eval_pairs": 0}
