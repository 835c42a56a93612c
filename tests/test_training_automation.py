"""Trainers start on a new data version whose blocking checks passed, never on an unchanged refresh."""

import dagster as dg

from assets.resources import LineupSettings
from assets.training import identity_adapter


def _requested(result) -> set[str]:
    return {r.key.to_user_string() for r in result.results if r.true_subset.size}


def test_trainers_follow_data_versions_not_materializations(tmp_path):
    content = {"version": "v-aaa", "checks_pass": True}

    @dg.asset(name="multiid_dataset", check_specs=[dg.AssetCheckSpec("identity_disjoint_splits", asset="multiid_dataset", blocking=True)])
    def stand_in():  # what multiid_dataset reports: its content id as the data version
        return dg.MaterializeResult(
            data_version=dg.DataVersion(content["version"]),
            check_results=[dg.AssetCheckResult(check_name="identity_disjoint_splits", passed=content["checks_pass"])],
        )

    settings = LineupSettings(home=str(tmp_path / "home"), input_dir=str(tmp_path))
    resources = {"lineup": settings, "trainer_client": dg.PipesSubprocessClient()}
    defs = dg.Definitions(assets=[stand_in, identity_adapter], resources=resources)
    instance = dg.DagsterInstance.ephemeral()

    def refresh():
        return dg.materialize([stand_in], instance=instance, raise_on_error=False).success

    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert _requested(tick) == set()
    assert refresh()
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert _requested(tick) == {"identity_adapter"}  # a first version: train
    for _ in range(2):  # the daily refresh rebuilds the same content: no retraining
        assert refresh()
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert _requested(tick) == set()
    content.update(version="v-bbb", checks_pass=False)  # new content, but a blocking check failed
    refresh()
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert _requested(tick) == set()
    content.update(version="v-ccc", checks_pass=True)  # new content that passed
    assert refresh()
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert _requested(tick) == {"identity_adapter"}
