"""Training assets: Diffusion-DPO LoRA, the identity adapter, the social reward model.

Each runs its trainer as a subprocess through Dagster Pipes (the same script runs standalone or on
a GPU machine), starts by itself when a new dataset version lands and its blocking checks passed,
and takes a slot in the "gpu" concurrency pool so two trainings never share one GPU.
"""

import sys

import dagster as dg

from assets.resources import LineupSettings
from pipeline.config import REPO_ROOT
from pipeline.datasets import latest_version

# start when an upstream dataset has a new version whose blocking checks passed
ON_NEW_DATASET = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _dataset(lineup: LineupSettings, name: str, split: str | None = None) -> str:
    layout = lineup.layout
    version = latest_version(layout, name)
    if version is None:
        raise dg.Failure(f"no published version of dataset {name!r} yet: materialize it first")
    path = layout.datasets / name / version
    return str(path / split) if split else str(path)


def _model_spec(lineup: LineupSettings) -> tuple[dict, bool]:
    path = lineup.path_setting(lineup.diffusion_model, "LINEUP_DIFFUSION_MODEL")
    return ({"pretrained": path}, False) if path else ({"tiny": True}, True)


SMOKE_RESOLUTION = 32


def _steps(lineup: LineupSettings, smoke: bool) -> int:
    return lineup.train_steps or (6 if smoke else 2000)


def _run_settings(lineup: LineupSettings, model: str, version: str) -> dict:
    """Output folder per dataset version (so a rerun resumes its own checkpoints), and device."""
    return {
        "output_dir": str(lineup.layout.home / "models" / model / version),
        "resume": "auto",
        "device": lineup.train_device,
    }


def _embedding_dim(lineup: LineupSettings) -> int:
    import pyarrow.parquet as pq

    files = sorted(lineup.layout.table_dir("faces").glob("*.parquet"))
    return pq.read_schema(files[0]).field("embedding").type.list_size if files else 512


def _run(context, client: dg.PipesSubprocessClient, module: str, config: dict, smoke: bool):
    note = (
        "SMOKE RUN: tiny random-init models because no local base weights are configured; it checks the "
        "plumbing end to end, its losses and accuracies mean nothing."
        if smoke
        else "trained from the configured local base weights"
    )
    context.log.info(f"{module}: {note}")
    result = client.run(
        command=[sys.executable, "-m", module],
        context=context,
        extras={"config": config},
        cwd=str(REPO_ROOT),
    ).get_materialize_result()
    return result._replace(metadata={**(result.metadata or {}), "smoke_run": smoke, "note": note})


@dg.asset(
    group_name="training",
    kinds={"pytorch", "diffusers"},
    deps=["social_dataset"],
    pool="gpu",
    automation_condition=ON_NEW_DATASET,
    description="Diffusion-DPO (beta 2500, diffusers convention) with a LoRA on the UNet, trained on the "
    "latest social preference dataset; writes a LoRA that diffusers loads with load_lora_weights.",
)
def dpo_lora(context: dg.AssetExecutionContext, lineup: LineupSettings, pipes_subprocess_client: dg.PipesSubprocessClient):
    model, smoke = _model_spec(lineup)
    version = latest_version(lineup.layout, "social")
    config = {
        "data": _dataset(lineup, "social", "webdataset/train"),
        "eval_data": _dataset(lineup, "social", "webdataset/eval"),
        "model": model,
        "loader": {"resolution": SMOKE_RESOLUTION if smoke else 512, "batch_size": 2 if smoke else 4},
        "train": {"max_steps": _steps(lineup, smoke), "checkpoint_every": 5 if smoke else 500},
        **_run_settings(lineup, "dpo_lora", version),
    }
    return _run(context, pipes_subprocess_client, "training.run_dpo", config, smoke)


@dg.asset(
    group_name="training",
    kinds={"pytorch", "diffusers"},
    deps=["multiid_dataset"],
    pool="gpu",
    automation_condition=ON_NEW_DATASET,
    description="Identity adapter (decoupled cross-attention over reference-face embeddings) trained with the "
    "diffusion loss + 1-cos identity loss + InfoNCE with extended negatives, as in WithAnyone.",
)
def identity_adapter(context: dg.AssetExecutionContext, lineup: LineupSettings, pipes_subprocess_client: dg.PipesSubprocessClient):
    model, smoke = _model_spec(lineup)
    version = latest_version(lineup.layout, "multiid")
    embedder = lineup.path_setting(lineup.arcface_weights, "LINEUP_ARCFACE_WEIGHTS")
    train = {"max_steps": _steps(lineup, smoke)}
    if not embedder:
        # without an ArcFace network the adapter is conditioned on the shard's own face embeddings
        train["emb_dim"] = _embedding_dim(lineup)
    config = {
        "data": _dataset(lineup, "multiid", "train"),
        "model": model,
        "face_embedder": {"path": embedder} if embedder else None,
        "loader": {"resolution": SMOKE_RESOLUTION if smoke else 512, "batch_size": 2 if smoke else 4},
        "train": train,
        **_run_settings(lineup, "identity_adapter", version),
    }
    return _run(context, pipes_subprocess_client, "training.run_identity", config, smoke)


@dg.asset(
    group_name="training",
    kinds={"pytorch"},
    deps=["social_dataset"],
    pool="gpu",
    automation_condition=ON_NEW_DATASET,
    description="Social Reward scorer: CLIP backbone with its top blocks unfrozen, triplet loss with the prompt "
    "as anchor (margin 0.3), pairwise accuracy on held-out pairs. Its checkpoint becomes a scorer.",
)
def social_reward_model(context: dg.AssetExecutionContext, lineup: LineupSettings, pipes_subprocess_client: dg.PipesSubprocessClient):
    clip_weights = lineup.path_setting(lineup.clip_weights, "LINEUP_CLIP_WEIGHTS")
    smoke = clip_weights is None
    version = latest_version(lineup.layout, "social")
    train = {"max_steps": _steps(lineup, smoke), "margin": 0.3}
    if smoke:
        train.update({"model_name": "lineup-tiny-clip", "model_cfg": TINY_CLIP})
    else:
        train.update({"model_name": lineup.clip_model, "pretrained": clip_weights})
    config = {
        "data": _dataset(lineup, "social", "webdataset/train"),
        "eval_data": _dataset(lineup, "social", "webdataset/eval"),
        "train": train,
        **_run_settings(lineup, "social_reward", version),
    }
    result = _run(context, pipes_subprocess_client, "training.run_reward", config, smoke)
    if not smoke:  # only a model trained from real weights becomes the social_reward scorer
        from pipeline.storage import write_bytes_atomic

        write_bytes_atomic(version.encode(), lineup.layout.home / "models" / "social_reward" / "LATEST")
    return result
