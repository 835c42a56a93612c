"""The trainer assets' decisions before any training starts: nothing to train is a skip (not a
failure), a real identity run without ArcFace weights is refused, and the wiring (automation
label, descriptions, checks) is complete. No trainer subprocess runs here."""

import dagster as dg
import pytest

from assets.resources import LineupSettings
from assets.training import ON_NEW_DATASET, dpo_lora, identity_adapter, social_reward_model
from pipeline.config import Layout
from pipeline.datasets import set_latest
from training import synthetic

TRAINERS = [dpo_lora, identity_adapter, social_reward_model]


@pytest.fixture(autouse=True)
def _no_weights_from_the_environment(monkeypatch):
    for var in ("LINEUP_DIFFUSION_MODEL", "LINEUP_ARCFACE_WEIGHTS", "LINEUP_CLIP_WEIGHTS", "LINEUP_SMOKE_TRAINING"):
        monkeypatch.delenv(var, raising=False)


def _multiid_version(home, samples: int, version: str = "v-test") -> None:
    root = home / "datasets" / "multiid" / version
    for split, n in (("train", samples), ("eval", 0)):
        synthetic.write_dataset(root / split, "multiid", synthetic.identity_samples(n, size=32, emb_dim=16))
    set_latest(Layout(home), "multiid", version)


def _materialize(settings: LineupSettings, asset=identity_adapter):
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([asset], instance=instance, raise_on_error=False,
                            resources={"lineup": settings, "trainer_client": dg.PipesSubprocessClient()})
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    return result, logs


@pytest.mark.parametrize("case", ["no published version", "empty train split", "no base weights"])
def test_nothing_to_train_is_a_skip_with_its_reason(tmp_path, case):
    home = tmp_path / "home"
    if case == "empty train split":  # e.g. a folder of single-person photos: nobody has a second photo
        _multiid_version(home, samples=0)
    if case == "no base weights":
        _multiid_version(home, samples=4)
    # smoke runs asked for except in the last case, so that only the case's own reason can skip
    settings = LineupSettings(home=str(home), smoke_training=case != "no base weights")
    result, logs = _materialize(settings)
    assert result.success  # `make run` must not fail on this
    assert result.get_asset_materialization_events() == []
    expected = {"no published version": "no published version of dataset 'multiid' yet",
                "empty train split": "the train split of dataset 'multiid' version v-test has no samples",
                "no base weights": "no local base weights (LINEUP_DIFFUSION_MODEL"}[case]
    assert any(m.startswith("identity_adapter skipped: ") and expected in m for m in logs), logs


def test_real_identity_run_without_arcface_weights_is_refused(tmp_path):
    home = tmp_path / "home"
    _multiid_version(home, samples=4)
    sd = tmp_path / "sd15"
    sd.mkdir()  # "real diffusion weights": the refusal comes before anything is loaded
    for arcface, said in (("", "none configured"), (str(tmp_path / "missing.pth"), "not found")):
        result, _ = _materialize(LineupSettings(home=str(home), diffusion_model=str(sd), arcface_weights=arcface))
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        msg = failure.step_failure_data.error.message
        assert "refuses to train on real diffusion weights without ArcFace weights" in msg and said in msg
        assert result.get_asset_materialization_events() == []


def test_trainer_wiring_is_labelled_and_described():
    assert ON_NEW_DATASET.get_label() == "new dataset version whose blocking checks passed"
    checks = {}
    for a in TRAINERS:
        (spec,) = a.specs
        assert spec.automation_condition is ON_NEW_DATASET  # one name, one condition
        assert spec.description and spec.skippable and spec.group_name == "training"
        checks.update({(c.asset_key.path[-1], c.key.name): c for c in a.check_specs})
    # every trainer is promoted only on held-out evidence, and says so in a blocking check
    assert set(checks) == {(a.key.path[-1], "promotion") for a in TRAINERS}
    assert all(c.blocking and "lower bound beats chance" in c.description for c in checks.values())


def test_the_trainer_reads_the_version_that_triggered_it_not_latest(tmp_path):
    """A version published while the trainer waited (LATEST moved on) does not swap its data."""
    home = tmp_path / "home"
    _multiid_version(home, samples=0, version="v-trigger")  # the version the upstream materialized
    _multiid_version(home, samples=4, version="v-later")  # published afterwards: LATEST

    @dg.asset(name="multiid_dataset")
    def stand_in():
        return dg.MaterializeResult(data_version=dg.DataVersion("v-trigger"))

    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([stand_in], instance=instance).success
    settings = LineupSettings(home=str(home), smoke_training=True)
    result = dg.materialize([identity_adapter], instance=instance, raise_on_error=False,
                            resources={"lineup": settings, "trainer_client": dg.PipesSubprocessClient()})
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert result.success and result.get_asset_materialization_events() == []
    assert any("multiid' version v-trigger has no samples" in m for m in logs), logs


class _ReportsNotPromoted:
    """A trainer client whose run reports what training/runner.py reports for a real model that was not
    promoted (the subprocess itself is tested in tests/test_training_promotion.py)."""

    def __init__(self):
        self.configs = []

    def run(self, *, context, extras, **_):
        self.configs.append(extras["config"])
        reason = "no evidence of skill: the 95% lower bound 0.185 does not beat chance 0.5"
        results = [dg.MaterializeResult(asset_key="social_reward_model", metadata={"promoted": False,
                                                                                   "promotion_reason": reason}),
                   dg.AssetCheckResult(asset_key="social_reward_model", check_name="promotion", passed=False,
                                       severity=dg.AssetCheckSeverity.ERROR, metadata={"promotion_reason": reason})]
        return type("Run", (), {"get_results": lambda self: results})()


def test_a_real_model_not_promoted_is_a_failed_blocking_check(tmp_path):
    home = tmp_path / "home"
    root = home / "datasets" / "social" / "v-social"
    for split in ("webdataset/train", "webdataset/eval"):
        synthetic.write_dataset(root / split, "preference", synthetic.preference_samples(4, size=16))
    set_latest(Layout(home), "social", "v-social")
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"not read: the client is a stand-in")
    client = _ReportsNotPromoted()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([social_reward_model], instance=instance, raise_on_error=False,
                            resources={"lineup": LineupSettings(home=str(home), clip_weights=str(weights)),
                                       "trainer_client": client})
    (cfg,) = client.configs
    assert cfg["smoke_run"] is False and cfg["model_family_dir"] == str(home / "models" / "social_reward")
    assert cfg["output_dir"] == str(home / "models" / "social_reward" / "v-social")
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "promotion" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    spec = next(iter(social_reward_model.check_specs))
    assert spec.blocking  # a failed ERROR check keeps the model from everything downstream
    (mat,) = result.get_asset_materialization_events()
    md = mat.event_specific_data.materialization.metadata
    assert md["promoted"].value is False and md["dataset_version_source"].value.startswith("LATEST")
    # Dagster fails the step on a blocking check that failed with ERROR: the run reads as failed, with why
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "blocking asset check failed with ERROR severity" in failure.step_failure_data.error.message
    assert not (home / "models" / "social_reward" / "LATEST").exists()
