"""The social dataset asset on a simulated log, and the trainers it starts (Pipes subprocesses)."""

import dagster as dg
import pytest

from assets.resources import LineupSettings
from assets.social import social_dataset
from assets.training import dpo_lora, social_reward_model
from pipeline.catalog import query
from pipeline.config import Layout
from pipeline.datasets import latest_version
from pipeline.social.simulate import SimConfig, simulate


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("social_assets")
    simulate(root / "input" / "social", truth_dir=root / "truth", config=SimConfig(n_events=40_000, inject_bad=1))
    settings = LineupSettings(home=str(root / "home"), input_dir=str(root / "input"), train_steps=2)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([social_dataset], instance=instance, resources={"lineup": settings})
    return root, settings, instance, result


def test_social_dataset_asset(built):
    root, settings, _, result = built
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"events_reconcile": True, "shards_match_manifest": True, "no_self_pairs": True}
    layout = Layout(root / "home")
    version = latest_version(layout, "social")
    assert version and (layout.datasets / "social" / version / "webdataset" / "train" / "manifest.json").exists()
    reasons = {r["reason"] for r in query(layout, "SELECT reason FROM rejects WHERE stage = 'social'").to_pylist()}
    assert {"unknown event", "unknown image", "unparsable timestamp", "duplicate event id"} <= reasons
    n = query(layout, "SELECT count(*) AS n FROM social_pairs").column("n")[0].as_py()
    meta = next(iter(result.asset_materializations_for_node("social_dataset"))).metadata
    assert n == meta["population_pairs"].value + meta["user_pairs"].value > 0
    assert "example_pairs" in meta and "posterior_probability" in meta


def test_trainers_run_as_pipes_subprocesses(built):
    root, settings, instance, _ = built
    # no base weights here: smoke runs, asked for
    settings = LineupSettings(home=settings.home, input_dir=settings.input_dir, train_steps=2, smoke_training=True)
    resources = {"lineup": settings, "trainer_client": dg.PipesSubprocessClient()}
    result = dg.materialize([dpo_lora, social_reward_model], instance=instance, resources=resources)
    assert result.success
    metas = {m.asset_key.path[-1]: m.metadata for m in result.get_asset_materialization_events() and [
        e.event_specific_data.materialization for e in result.get_asset_materialization_events()]}
    assert metas["dpo_lora"]["smoke_run"].value is True  # no base weights here: said so, loudly
    version = latest_version(Layout(root / "home"), "social")
    lora = root / "home" / "models" / "dpo_lora" / version / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.exists()
    reward_dir = root / "home" / "models" / "social_reward"
    assert (reward_dir / version / "reward_model" / "reward_config.json").exists()
    assert not (reward_dir / "LATEST").exists()  # a random-weight smoke model never becomes a scorer
    # both trainers end with a held-out evaluation; a smoke run's (random weights) keeps its figures but
    # is not judged, so a clean demo shows no failed check
    checks = {(c.asset_key.path[-1], c.check_name): c for c in result.get_asset_check_evaluations()}
    assert set(checks) == {("dpo_lora", "heldout_implicit_accuracy"),
                           ("social_reward_model", "heldout_pairwise_accuracy")}
    for (asset, _), c in checks.items():
        assert c.passed and c.metadata["judged"].value is False and "NOT JUDGED" in c.description
        assert isinstance(c.metadata["passed_if_judged"].value, bool)
        pairs = c.metadata["heldout_pairs"].value
        assert pairs == metas[asset]["eval_pairs"].value > 0
        assert metas[asset]["dataset_version"].value and "dataset_split" in metas[asset]


def test_a_new_dataset_version_that_passes_its_checks_starts_training(tmp_path):
    """Declarative automation: the trainers are requested after social_dataset materializes with
    its blocking checks passed, and not when a blocking check failed."""
    simulate(tmp_path / "input" / "social", truth_dir=tmp_path / "truth", config=SimConfig(n_events=40_000))
    settings = LineupSettings(home=str(tmp_path / "home"), input_dir=str(tmp_path / "input"))
    assets = dg.Definitions(
        assets=[social_dataset, dpo_lora, social_reward_model],
        resources={"lineup": settings, "trainer_client": dg.PipesSubprocessClient()},
    )
    instance = dg.DagsterInstance.ephemeral()
    first = dg.evaluate_automation_conditions(defs=assets, instance=instance)
    assert first.total_requested == 0  # no dataset yet

    assert dg.materialize([social_dataset], instance=instance, resources={"lineup": settings}).success
    after = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=first.cursor)
    requested = {k.to_user_string() for k in after.get_requested_keys()} if hasattr(after, "get_requested_keys") else {
        r.key.to_user_string() for r in after.results if r.true_subset.size
    }
    assert {"dpo_lora", "social_reward_model"} <= requested

    # the same dataset with a failed blocking check does not start training
    instance2 = dg.DagsterInstance.ephemeral()
    cur = dg.evaluate_automation_conditions(defs=assets, instance=instance2).cursor
    assert dg.materialize([social_dataset], instance=instance2, resources={"lineup": settings}).success
    instance2.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=dg.AssetKey("social_dataset"), check_name="no_self_pairs", passed=False)
    )
    blocked = dg.evaluate_automation_conditions(defs=assets, instance=instance2, cursor=cur)
    assert blocked.total_requested == 0
