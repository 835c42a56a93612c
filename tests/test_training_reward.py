"""Social reward model: triplet training on a learnable toy set, pairwise accuracy, checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch

from training import data, synthetic
from training.reward import (
    RewardConfig,
    RewardModel,
    RewardTrainer,
    build_clip,
    load_reward_model,
    save_reward_model,
    triplet_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rw")
    return (synthetic.write_dataset(root / "train", "preference", synthetic.preference_samples(48, size=32)),
            synthetic.write_dataset(root / "held", "preference", synthetic.preference_samples(48, size=32, seed=11)))


def _model(cfg: RewardConfig) -> RewardModel:
    torch.manual_seed(1)
    clip, tok = build_clip(cfg.model_name, cfg.model_cfg, cfg.pretrained)
    return RewardModel(clip, tok, cfg)


def _held(d):
    return [next(data.BatchStream(d, data.LoaderConfig(resolution=32, batch_size=48, shuffle_buffer=0)))]


def test_build_clip_registers_a_config_and_leaves_no_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clip, tok = build_clip("lineup-tiny-leak-check", TINY)
    assert clip.visual.image_size in (32, (32, 32)) and tok(["a face"]).shape[-1] == 16
    assert not list(tmp_path.glob("lineup_openclip_cfg_*"))  # the config's folder is gone once open_clip read it
    again, _ = build_clip("lineup-tiny-leak-check", None)  # still registered: built from its name
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in clip.parameters())


def test_triplet_loss_hand_values():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6]])
    n = torch.tensor([[0.0, 1.0]])
    loss, _ = triplet_loss(a, p, n, 0.3)
    assert loss.item() == pytest.approx(max(0.0, (1 - 0.8) - (1 - 0.0) + 0.3))
    loss, _ = triplet_loss(a, n, p, 0.3)  # swapped: violated by 1 - 0.2 + 0.3
    assert loss.item() == pytest.approx(1.1)


def test_reward_model_learns_toy_preference(dirs, tmp_path):
    train, held = dirs
    cfg = RewardConfig(model_name="lineup-tiny-clip", model_cfg=TINY, unfreeze_vision_blocks=1, learning_rate=1e-3)
    model = _model(cfg)
    trainable = {n for n, p in model.clip.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("visual.") for n in trainable)
    assert any("resblocks.1." in n for n in trainable) and not any("resblocks.0." in n for n in trainable)
    tr = RewardTrainer(model, cfg, device="cpu")
    evb = _held(held)
    before = tr.evaluate(evb)
    s = data.BatchStream(train, data.LoaderConfig(resolution=32, batch_size=8, shuffle_buffer=16))
    for _ in range(15):
        tr.train_step(s)
    after = tr.evaluate(evb)
    assert after["pairwise_acc"] >= 0.9 and after["pairwise_acc"] >= before["pairwise_acc"], (before, after)
    assert after["score_margin"] > before["score_margin"]

    out = save_reward_model(model, tmp_path / "rm", s.manifest, after)
    conf = json.loads((out / "reward_config.json").read_text())
    assert conf["format"] == "lineup-reward-v1" and conf["weights"] == "full"  # no base file: full weights
    assert conf["dataset"]["config_fingerprint"] == s.manifest["config_fingerprint"]
    again = load_reward_model(out)
    b = evb[0]
    torch.testing.assert_close(again.score(b["pixels_w"], b["caption"]), model.score(b["pixels_w"], b["caption"]))


def test_trainable_only_checkpoint_over_local_base(dirs, tmp_path):
    train, held = dirs
    base_cfg = RewardConfig(model_name="lineup-tiny-clip2", model_cfg=TINY)
    base = _model(base_cfg)
    torch.save(base.clip.state_dict(), tmp_path / "base.pt")
    cfg = RewardConfig(model_name="lineup-tiny-clip2", model_cfg=TINY, pretrained=str(tmp_path / "base.pt"),
                       unfreeze_vision_blocks=1, unfreeze_text_blocks=1, learning_rate=1e-3)
    model = _model(cfg)
    tr = RewardTrainer(model, cfg, device="cpu")
    s = data.BatchStream(train, data.LoaderConfig(resolution=32, batch_size=8, shuffle_buffer=16))
    for _ in range(3):
        tr.train_step(s)
    out = save_reward_model(model, tmp_path / "rm", s.manifest)
    conf = json.loads((out / "reward_config.json").read_text())
    assert conf["weights"] == "trainable" and conf["pretrained_sha256"]
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "reward_model.safetensors")))
    assert keys == {n for n, p in model.clip.named_parameters() if p.requires_grad}
    again = load_reward_model(out)
    b = _held(held)[0]
    torch.testing.assert_close(again.score(b["pixels_l"], b["caption"]), model.score(b["pixels_l"], b["caption"]))


def test_collapsed_scorer_reads_chance_not_perfect(dirs):
    """Ties count half: a scorer that gives every image the same score cannot look accurate."""
    _, held = dirs
    cfg = RewardConfig(model_name="lineup-tiny-clip3", model_cfg=TINY, unfreeze_vision_blocks=1)
    model = _model(cfg)
    with torch.no_grad():
        model.clip.visual.proj.zero_()  # every image embeds to the zero vector: score 0 for all
    tr = RewardTrainer(model, cfg, device="cpu")
    evb = _held(held)
    sw = model.score(evb[0]["pixels_w"], evb[0]["caption"])
    sl = model.score(evb[0]["pixels_l"], evb[0]["caption"])
    assert torch.equal(sw, sl)  # the collapse is real: every pair is a tie
    res = tr.evaluate(evb)
    assert res["eval_pairs"] == 48 and res["pairwise_acc"] <= 0.5
    # the triplet loss's batch accuracy counts a tie (winner and loser equally far) half too
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8]])
    assert triplet_loss(a, p, p)[1]["batch_pair_acc"] == 0.5


def test_empty_heldout_split_has_no_accuracy(dirs):
    cfg = RewardConfig(model_name="lineup-tiny-clip4", model_cfg=TINY, unfreeze_vision_blocks=1)
    tr = RewardTrainer(_model(cfg), cfg, device="cpu")
    assert tr.evaluate([]) == {"eval_pairs": 0}  # reported as empty, not as 0 or 1
