"""run_* scripts: standalone CLI (in-process) and under Dagster Pipes (a real PipesSubprocessClient)."""


import json
import os
import sys
from pathlib import Path

import pytest

from training import synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {
    "unet": {"config": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
                        "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
                        "attention_head_dim": 8, "norm_num_groups": 8}},
    "vae": {"tiny": True},
    "text_encoder": {"type": "hash", "max_length": 8},
}


@pytest.fixture(scope="module")
def dsets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {
        "pref": synthetic.write_dataset(root / "pref", "preference", synthetic.preference_samples(16, size=16)),
        "held": synthetic.write_dataset(root / "held", "preference", synthetic.preference_samples(8, size=16, seed=3)),
        "id": synthetic.write_dataset(root / "id", "multiid", synthetic.identity_samples(8, size=32, emb_dim=16)),
        "id_held": synthetic.write_dataset(root / "id_held", "multiid",
                                           synthetic.identity_samples(4, size=32, emb_dim=16, seed=9)),
    }


def dpo_config(dsets, out):
    return {"data": str(dsets["pref"]), "eval_data": str(dsets["held"]), "eval_batches": 1,
            "loader": {"resolution": 16, "batch_size": 4, "shuffle_buffer": 8},
            "model": TINY_MODEL, "train": {"max_steps": 3, "checkpoint_every": 2, "log_every": 1,
                                           "lora_rank": 4, "vae_latent": "mean"},
            "output_dir": str(out), "device": "cpu"}


def test_run_dpo_standalone_and_resume(dsets, tmp_path, capsys):
    from training import run_dpo

    cfgp = tmp_path / "dpo.json"
    cfgp.write_text(json.dumps(dpo_config(dsets, tmp_path / "out")))
    assert run_dpo.main(["--config", str(cfgp)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('{"materialization"')][-1]
    md = json.loads(line)["materialization"]
    assert md["steps"] == 3 and md["dataset_fingerprint"] and Path(md["lora_path"]).exists()
    assert "eval_implicit_acc" in md and md["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    assert (tmp_path / "out" / "loss_curve.png").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == \
        ["checkpoint-0000002", "checkpoint-0000003"]
    # run again with more steps: resumes from the latest checkpoint
    assert run_dpo.main(["--config", str(cfgp), "--set", "train.max_steps=4"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "step 4/4" in err


def test_run_identity_and_reward_standalone(dsets, tmp_path, capsys):
    from training import run_identity, run_reward

    cfg = {"data": str(dsets["id"]), "eval_data": str(dsets["id_held"]),
           "loader": {"resolution": 32, "ref_resolution": 32, "batch_size": 4, "shuffle_buffer": 4},
           "model": TINY_MODEL, "face_embedder": {"path": str(tmp_path / "absent.pth")},
           "train": {"max_steps": 2, "emb_dim": 16, "checkpoint_every": 0}, "output_dir": str(tmp_path / "id"),
           "device": "cpu"}
    (tmp_path / "id.json").write_text(json.dumps(cfg))
    assert run_identity.main(["--config", str(tmp_path / "id.json")]) == 0
    out = capsys.readouterr()
    md = json.loads([ln for ln in out.out.splitlines() if ln.startswith('{"materialization"')][-1])["materialization"]
    assert md["identity_terms"] is False and md["face_embedder"]["status"] == "absent"
    assert "identity terms disabled" in out.err
    # the identity adapter ends with a held-out evaluation too: 4 images x 2 faces, the proxy without an embedder
    assert md["eval_pairs"] == md["heldout_pairs"] == 8 and md["eval_id_win_rate_before"] == 0.5
    assert "embedding-level proxy" in md["heldout_measure"] and md["heldout_accuracy"] == md["eval_id_win_rate"]
    (check,) = _reports(out.out, "check")
    assert check["check_name"] == "promotion" and check["passed"] == md["promoted"] is False  # 8 faces: too few
    assert (tmp_path / "id" / "promotion.json").exists()

    tiny_clip = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                                 "head_width": 16},
                 "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    rcfg = {"data": str(dsets["pref"]), "eval_data": str(dsets["held"]),
            "train": {"model_name": "lineup-pipes-clip", "model_cfg": tiny_clip, "unfreeze_vision_blocks": 1,
                      "max_steps": 2, "learning_rate": 1e-3}, "loader": {"batch_size": 4, "shuffle_buffer": 4},
            "output_dir": str(tmp_path / "rw"), "device": "cpu"}
    (tmp_path / "rw.json").write_text(json.dumps(rcfg))
    assert run_reward.main(["--config", str(tmp_path / "rw.json")]) == 0
    md = json.loads([ln for ln in capsys.readouterr().out.splitlines()
                     if ln.startswith('{"materialization"')][-1])["materialization"]
    assert 0 <= md["pairwise_acc"] <= 1 and (tmp_path / "rw" / "reward_model" / "reward_config.json").exists()


def test_run_dpo_under_dagster_pipes(dsets, tmp_path):
    dg = pytest.importorskip("dagster")

    cfg = dpo_config(dsets, tmp_path / "out")
    cfg["train"]["max_steps"] = 2
    cfg.pop("eval_data")

    @dg.asset
    def dpo_lora(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient):
        return pipes_subprocess_client.run(
            command=[sys.executable, str(REPO / "training" / "run_dpo.py")],
            context=context, extras={"config": cfg},
            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "")},
        ).get_materialize_result()

    res = dg.materialize([dpo_lora], resources={"pipes_subprocess_client": dg.PipesSubprocessClient(cwd=str(REPO))},
                         raise_on_error=True)
    assert res.success
    mats = res.get_asset_materialization_events()
    md = mats[-1].materialization.metadata
    assert md["steps"].value == 2
    assert md["dataset_fingerprint"].value == json.loads((dsets["pref"] / "manifest.json").read_text())[
        "config_fingerprint"]
    assert Path(md["lora_path"].value).exists()
    assert "data:image/png;base64," in md["loss_curve"].value


def _reports(out: str, kind: str) -> list[dict]:
    return [json.loads(ln)[kind] for ln in out.splitlines() if ln.startswith(f'{{"{kind}"')]


TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_dpo_run_ends_with_a_heldout_evaluation_and_its_check(dsets, tmp_path, capsys):
    from training import run_dpo

    cfg = dpo_config(dsets, tmp_path / "out")
    cfg["eval_batches"] = None  # the whole held-out split
    cfg["train"]["max_steps"] = 2
    (tmp_path / "dpo.json").write_text(json.dumps(cfg))
    assert run_dpo.main(["--config", str(tmp_path / "dpo.json")]) == 0
    out = capsys.readouterr().out
    md = _reports(out, "materialization")[-1]
    # 8 held-out pairs: every one evaluated, before (a fresh LoRA: all ties, 0.5) and after training
    assert md["eval_pairs"] == 8 and md["eval_implicit_acc_before"] == 0.5 and md["smoke_run"] is False
    assert md["dataset_version"] == "pref" and "dataset_split" in md
    (check,) = _reports(out, "check")
    assert check["check_name"] == "promotion" and check["severity"] == "ERROR"
    # 8 pairs cannot give a 95% lower bound above 0.5 unless nearly all are right: never promoted on
    # accuracy alone (the old check passed at any accuracy above 0.5)
    assert md["heldout_accuracy"] == md["eval_implicit_acc"] and md["heldout_ci_low"] < md["eval_implicit_acc"]
    assert check["passed"] == md["promoted"] == (md["heldout_ci_low"] > 0.5)
    assert check["metadata"]["heldout_pairs"] == 8 and "implicit reward accuracy" in md["heldout_measure"]


def test_empty_heldout_split_is_reported_as_empty(dsets, tmp_path, capsys):
    from training import run_reward

    empty = synthetic.write_dataset(tmp_path / "empty_eval", "preference", [])
    cfg = {"data": str(dsets["pref"]), "eval_data": str(empty), "smoke_run": True,
           "train": {"model_name": "lineup-pipes-clip2", "model_cfg": TINY_CLIP, "unfreeze_vision_blocks": 1,
                     "max_steps": 1}, "loader": {"batch_size": 4, "shuffle_buffer": 4},
           "output_dir": str(tmp_path / "rw"), "device": "cpu"}
    (tmp_path / "rw.json").write_text(json.dumps(cfg))
    assert run_reward.main(["--config", str(tmp_path / "rw.json")]) == 0
    out = capsys.readouterr().out
    md = _reports(out, "materialization")[-1]
    assert md["eval_pairs"] == 0 and md["heldout"].startswith("empty")
    assert "pairwise_acc" not in md and "pairwise_acc_before" not in md  # not 0, not 1: absent
    (check,) = _reports(out, "check")
    assert check["check_name"] == "promotion" and check["passed"] is False and check["severity"] == "WARN"
    assert check["metadata"]["heldout_pairs"] == 0 and "heldout_accuracy" not in check["metadata"]
    assert check["metadata"]["promotion_reason"] == "empty held-out split: nothing was measured"


def test_real_identity_run_without_face_embedder_is_refused(dsets, tmp_path):
    from training import run_identity

    cfg = {"data": str(dsets["id"]), "model": {"pretrained": str(tmp_path / "sd15")},
           "face_embedder": None, "train": {"max_steps": 1}, "output_dir": str(tmp_path / "id"), "device": "cpu"}
    (tmp_path / "id.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="refusing a real identity-adapter run without face-embedder weights"):
        run_identity.main(["--config", str(tmp_path / "id.json")])
    assert not (tmp_path / "id" / "adapter").exists()
