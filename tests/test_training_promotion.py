"""Promotion on held-out evidence: the Wilson interval, the decision rule, and whole reward-model runs
(no skill -> never promoted; skill -> promoted; no better than the incumbent -> kept, unpromoted, except
a tie with a perfect incumbent, which is no regression)."""

from __future__ import annotations

import json

import pytest

from training import promotion, synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_wilson_interval_hand_values_and_edges():
    # 8 of 10: p = 0.8, z = 1.96 -> (0.4902, 0.9433), the textbook values
    lo, hi = promotion.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # all ties (each counting half) are centred on chance, never above it
    lo, hi = promotion.wilson_interval(5.0, 10)
    assert lo < 0.5 < hi and (lo + hi) / 2 == pytest.approx(0.5)
    # a perfect score still has a lower bound below 1, and it grows with the number of pairs
    assert promotion.wilson_interval(16, 16)[0] < promotion.wilson_interval(100, 100)[0] < 1.0
    assert promotion.wilson_interval(0, 0) is None
    assert promotion.evaluation(0, 0, "m") == {"measure": "m", "pairs": 0}  # empty: no accuracy, no interval


def test_decision_needs_the_lower_bound_above_chance_and_the_incumbent():
    strong = promotion.evaluation(95, 100, "m")  # lower bound ~0.888
    weak = promotion.evaluation(60, 100, "m")  # accuracy 0.6 > 0.5, lower bound ~0.502: barely
    coin = promotion.evaluation(55, 100, "m")  # accuracy above 0.5, lower bound below it
    assert weak["ci_low"] > 0.5 > coin["ci_low"]
    assert promotion.decide(strong, None, smoke=False)["promoted"]
    d = promotion.decide(coin, None, smoke=False)
    assert not d["promoted"] and "does not beat chance" in d["reason"] and d["baseline_from"] == "chance"
    # the incumbent measured on the same pairs raises the bar
    d = promotion.decide(strong, {"version": "old", "accuracy": 0.9}, smoke=False)
    assert not d["promoted"] and d["baseline"] == 0.9 and "incumbent old" in d["reason"]
    assert promotion.decide(strong, {"version": "old", "accuracy": 0.8}, smoke=False)["promoted"]
    # a perfect incumbent: a tie on the same pairs is no regression (promoted); anything less is
    perfect = promotion.evaluation(40, 40, "m")
    d = promotion.decide(perfect, {"version": "old", "accuracy": 1.0}, smoke=False)
    assert d["promoted"] and "ties the perfect incumbent old" in d["reason"]
    d = promotion.decide(promotion.evaluation(39, 40, "m"), {"version": "old", "accuracy": 1.0}, smoke=False)
    assert not d["promoted"] and "a regression" in d["reason"]
    # ... and the tie still needs evidence of skill (a lower bound above chance)
    assert not promotion.decide(promotion.evaluation(2, 2, "m"), {"version": "old", "accuracy": 1.0},
                                smoke=False)["promoted"]
    # below the ceiling a tie is not enough: the lower bound must beat the incumbent
    assert not promotion.decide(strong, {"version": "old", "accuracy": 0.95}, smoke=False)["promoted"]
    # an incumbent that could not be measured is no licence to promote
    d = promotion.decide(strong, {"version": "old", "accuracy": None, "error": "ValueError: shapes"}, smoke=False)
    assert not d["promoted"] and "could not be evaluated" in d["reason"]
    # smoke runs and empty held-out splits are never promoted
    assert "smoke run" in promotion.decide(strong, None, smoke=True)["reason"]
    assert not promotion.decide(promotion.evaluation(0, 0, "m"), None, smoke=False)["promoted"]


def _reward_run(train, held, family, version, tmp_path, capsys):
    from training import run_reward

    cfg = {"data": str(train), "eval_data": str(held), "model_family_dir": str(family),
           "train": {"model_name": "lineup-promo-clip", "model_cfg": TINY_CLIP, "unfreeze_vision_blocks": 1,
                     "max_steps": 12, "learning_rate": 1e-3, "checkpoint_every": 0},
           "loader": {"batch_size": 8, "shuffle_buffer": 16}, "output_dir": str(family / version), "device": "cpu"}
    path = tmp_path / f"{version}.json"
    path.write_text(json.dumps(cfg))
    assert run_reward.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    (md,) = [json.loads(ln)["materialization"] for ln in out.splitlines() if ln.startswith('{"materialization"')]
    (check,) = [json.loads(ln)["check"] for ln in out.splitlines() if ln.startswith('{"check"')]
    return md, check


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    root = tmp_path_factory.mktemp("promo")
    return {
        "train": synthetic.write_dataset(root / "train", "preference", synthetic.preference_samples(48, size=16)),
        "held": synthetic.write_dataset(root / "held", "preference",
                                        synthetic.preference_samples(64, size=16, seed=5)),
        # labels that are coin flips: no model can have skill on them
        "shuffled_train": synthetic.write_dataset(root / "strain", "preference",
                                                  synthetic.preference_samples(48, size=16, shuffled_labels=True)),
        "shuffled_held": synthetic.write_dataset(root / "sheld", "preference",
                                                 synthetic.preference_samples(64, size=16, seed=7,
                                                                              shuffled_labels=True)),
    }


def test_a_reward_model_trained_on_shuffled_labels_is_never_promoted(pref, tmp_path, capsys):
    family = tmp_path / "models" / "social_reward"
    md, check = _reward_run(pref["shuffled_train"], pref["shuffled_held"], family, "vshuffled", tmp_path, capsys)
    # the old rule (held-out accuracy > 0.5) would have made this the scorer
    assert md["heldout_accuracy"] > 0.5 and md["heldout_pairs"] == 64
    assert md["heldout_ci_low"] <= 0.5 < md["heldout_ci_high"]
    assert md["promoted"] is False and "no evidence of skill" in md["promotion_reason"]
    assert check["check_name"] == "promotion" and check["passed"] is False and check["severity"] == "ERROR"
    assert check["metadata"]["promotion_baseline_from"] == "chance"
    assert not (family / "LATEST").exists()
    kept = family / "vshuffled"
    assert (kept / "reward_model" / "reward_config.json").exists()  # kept, unpromoted, with the reason
    assert json.loads((kept / "promotion.json").read_text())["promoted"] is False


def test_promoted_only_over_chance_and_the_incumbent(pref, tmp_path, capsys):
    family = tmp_path / "models" / "social_reward"
    md, check = _reward_run(pref["train"], pref["held"], family, "va", tmp_path, capsys)
    assert md["promoted"] is True and check["passed"] is True, md["promotion_reason"]
    assert md["heldout_ci_low"] > 0.5 and (family / "LATEST").read_text() == "va"
    # a second model trained the same way: the incumbent is re-measured on the same pairs, where both
    # are perfect (these synthetic pairs are easy). No lower bound can beat 1.0; a tie at the
    # ceiling is no regression, so the newer model replaces it (unit cases, and the "does not beat
    # the model it replaces" branch below the ceiling: test_decision_needs_...)
    md, check = _reward_run(pref["train"], pref["held"], family, "vb", tmp_path, capsys)
    assert md["incumbent_version"] == "va" and md["incumbent_accuracy"] == 1.0 == md["heldout_accuracy"]
    assert md["promoted"] is True and "ties the perfect incumbent va" in md["promotion_reason"]
    assert check["passed"] is True and (family / "LATEST").read_text() == "vb"
    # a rerun of the promoted version compares with what it replaced (va), not with itself
    md, _ = _reward_run(pref["train"], pref["held"], family, "vb", tmp_path, capsys)
    assert md["incumbent_version"] == "va" and md["promoted"] is True
    assert (family / "LATEST").read_text() == "vb"
    # a LATEST whose model folder was removed names nothing to replace: chance is the bar, and it says so
    promotion.publish(family, "vgone")
    md, _ = _reward_run(pref["train"], pref["held"], family, "vc", tmp_path, capsys)
    assert md["promoted"] is True and "vgone" in md["incumbent_note"] and (family / "LATEST").read_text() == "vc"


def test_a_dpo_lora_trained_on_shuffled_labels_is_never_promoted(pref, tmp_path, capsys):
    from test_training_pipes import TINY_MODEL

    from training import run_dpo

    family = tmp_path / "models" / "dpo_lora"
    cfg = {"data": str(pref["shuffled_train"]), "eval_data": str(pref["shuffled_held"]),
           "model_family_dir": str(family), "output_dir": str(family / "vshuffled"), "device": "cpu",
           "loader": {"resolution": 16, "batch_size": 4, "shuffle_buffer": 8},
           "model": TINY_MODEL, "train": {"max_steps": 4, "checkpoint_every": 0, "lora_rank": 4,
                                          "learning_rate": 1e-3, "vae_latent": "mean"}}
    (tmp_path / "dpo.json").write_text(json.dumps(cfg))
    assert run_dpo.main(["--config", str(tmp_path / "dpo.json")]) == 0
    out = capsys.readouterr().out
    (md,) = [json.loads(ln)["materialization"] for ln in out.splitlines() if ln.startswith('{"materialization"')]
    (check,) = [json.loads(ln)["check"] for ln in out.splitlines() if ln.startswith('{"check"')]
    assert md["heldout_pairs"] == 64 and md["heldout_ci_low"] <= 0.5
    assert md["promoted"] is False and check == {**check, "check_name": "promotion", "passed": False,
                                                 "severity": "ERROR"}
    assert (family / "vshuffled" / "lora" / "pytorch_lora_weights.safetensors").exists()  # kept, unpromoted
    assert not (family / "LATEST").exists()


def test_the_incumbent_is_measured_with_its_own_weights_on_the_same_pairs(pref, tmp_path):
    """The generic incumbent measurement (DPO, identity): the incumbent's final trainable weights swapped
    into this run's model, measured, and this run's weights put back."""
    import torch
    from test_training_dpo import make_trainer, stream_for

    from training import runner
    from training.run_dpo import DPORun

    held = [next(iter(stream_for(pref["held"], batch_size=16, shuffle_buffer=0)))]
    old = make_trainer(seed=1)
    s = stream_for(pref["train"])
    for _ in range(3):
        old.train_step(s)
    old.save_checkpoint(tmp_path / "vold" / "checkpoints")
    want = old.evaluate(held)
    new = make_trainer(seed=2)
    new.train_step(stream_for(pref["train"]))
    mine = {n: p.detach().clone() for n, p in new.unet.named_parameters() if p.requires_grad}
    own = new.evaluate(held)
    job = DPORun({"train": {}}, None)
    got = job.evaluate_incumbent(new, tmp_path / "vold", held)
    assert got["eval_reward_margin"] == pytest.approx(want["eval_reward_margin"], rel=1e-4)
    assert got["eval_reward_margin"] != pytest.approx(own["eval_reward_margin"], rel=1e-4)
    for n, p in new.unet.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, mine[n], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):  # no checkpoint: the decision records why, and does not promote
        job.evaluate_incumbent(new, tmp_path / "nothing", held)
    assert runner.promotion.decide(promotion.evaluation(16, 16, "m"), {"version": "x", "accuracy": None,
                                                                    "error": "FileNotFoundError"}, False)["promoted"] is False
