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
    simulate(root / "input" / "social", truth_dir=root / "truth", config=SimConfig(n_events=80_000, inject_bad=1))
    settings = LineupSettings(home=str(root / "home"), input_dir=str(root / "input"), train_steps=2)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([social_dataset], instance=instance, resources={"lineup": settings})
    return root, settings, instance, result


def test_social_dataset_asset(built):
    root, _, _, result = built
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
    assert "picture: example_pairs" in meta and "picture: posterior_probability" in meta
    # the log-only precision estimate, its interval and the yield against the naive rule, in the
    # metadata and in the card, agreeing with the stats the build wrote
    stats = __import__("json").loads((layout.datasets / "social" / version / "social_stats.json").read_text())
    assert meta["estimated_precision"].value == stats["estimated_precision"]
    assert meta["yield_vs_naive"].value == stats["population_pairs"] / stats["naive_pairs"]
    assert meta["estimated_precision_interval"].value["population"] == stats["estimated_precision_interval"]
    card = (layout.datasets / "social" / version / "README.md").read_text()
    assert f"{stats['estimated_precision']:.3f}" in card and "naive rule" in card


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
    assert not (root / "home" / "models" / "dpo_lora" / "LATEST").exists()
    # both trainers end with a held-out evaluation and a promotion decision; on a smoke run "not promoted"
    # is the expected outcome: a warning that says so, not an error
    checks = {(c.asset_key.path[-1], c.check_name): c for c in result.get_asset_check_evaluations()}
    assert set(checks) == {("dpo_lora", "promotion"), ("social_reward_model", "promotion")}
    assert all(c.severity == dg.AssetCheckSeverity.WARN and not c.passed for c in checks.values())
    for (asset, _), c in checks.items():
        pairs = c.metadata["heldout_pairs"].value
        assert pairs == metas[asset]["eval_pairs"].value > 0
        assert "smoke run: not promoted, expected" in c.metadata["note"].value
        md = metas[asset]
        assert md["promoted"].value is False and md["promotion_reason"].value.startswith("smoke run")
        assert md["heldout_ci_low"].value <= md["heldout_accuracy"].value <= md["heldout_ci_high"].value
        assert md["dataset_version"].value == version and "dataset_split" in md
        assert md["dataset_version_source"].value == "data version of social_dataset's latest materialization"


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
