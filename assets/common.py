"""What several asset domains share: the collection assets' automation condition, and how a dataset
release (pipeline.datasets.Release) becomes metadata and check results."""

from __future__ import annotations

import dagster as dg

from assets.ui import viewer_link
from pipeline.datasets import PUBLISHED_CHECK, Release, read_card


def _gpu_pool() -> str | None:
    """The "gpu" concurrency pool (one slot, see assets/instance.py) for assets that run models, on a
    machine with CUDA; on CPU machines they run in parallel like any asset."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return "gpu" if torch.cuda.is_available() else None


GPU_POOL = _gpu_pool()

# Update after new data lands, even when some input partition failed: a failed partition is left out
# and named in the metadata (partitions_missing), it does not block the collection forever. New data
# counts once its blocking checks passed: a partition whose checks failed triggers nothing (and the
# collection does not read it, pipeline/commits.py).
COLLECTION_UPDATE = (
    (dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())
     & dg.AutomationCondition.all_deps_blocking_checks_passed())
    .with_label("eager once upstream blocking checks passed, also when an input partition failed")
)


def release_metadata(rel: Release) -> dict:
    card = read_card(rel.folder)
    return {
        "version": rel.version,
        "path": dg.MetadataValue.path(str(rel.folder)),
        "published": rel.published,
        "reused_published_version": rel.reused,
        **({"dataset_card": dg.MetadataValue.md(card)} if card else {}),
        **viewer_link(rel),
    }


def release_checks(rel: Release, descriptions: dict[str, str]) -> list[dg.AssetCheckResult]:
    """One result per blocking check of the release, with its problems as metadata. A version reused
    from an object store was checked before its upload; its re-read listing counts against every check."""
    def problems(name):
        return rel.problems.get(name, []) + rel.problems.get(PUBLISHED_CHECK, [])

    return [
        dg.AssetCheckResult(
            check_name=name,
            passed=not problems(name),
            description=descriptions.get(name, ""),
            metadata={"problems": dg.MetadataValue.json(problems(name)[:50]), "n_problems": len(problems(name))},
        )
        for name in descriptions
    ]


def engine_runner(lineup, make_ray_runner):
    """The chunk runner of the engine the settings choose: None in-process (the stage's own loop or
    worker processes), else ``make_ray_runner()`` (a Ray job, see pipeline/ray_engine.py). A Ray job
    whose chunks failed fails the step with what Ray did and every failed chunk as metadata."""
    if lineup.engine_name != "ray":
        return None
    from pipeline.ray_engine import RayStageError

    runner = make_ray_runner()

    def run(chunks):
        try:
            return runner(chunks)
        except RayStageError as e:
            raise dg.Failure(str(e), metadata={**e.stats.metadata(),
                                               "ray_failed_chunks": dg.MetadataValue.json(e.stats.failures[:100])}) from e
        finally:
            run.stats = runner.stats

    run.stats = None
    run.pool_plan = getattr(runner, "pool_plan", None)  # the stage sizes its chunks for the actors' device
    return run


def engine_metadata(lineup, runner=None) -> dict:
    """Which engine ran a per-image stage, and for Ray what the job did: throughput, actors, failures."""
    stats = getattr(runner, "stats", None)
    if stats is None:
        return {"engine": "inprocess", "engine_workers": lineup.workers}
    return stats.metadata()
