"""Training assets: Diffusion-DPO LoRA, the identity adapter, the social reward model.

One factory (``trainer_asset``) builds all three: each runs its trainer as a subprocess through
Dagster Pipes (the same script runs standalone or on a GPU machine), starts by itself when a new
dataset version lands and its blocking checks passed, and takes a slot in the "gpu" concurrency
pool so two trainings never share one GPU. A ``TrainerSpec`` says only what differs: the dataset
and splits it reads, the base weights it needs and the trainer's own config.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from assets.resources import LineupSettings
from pipeline.config import REPO_ROOT
from pipeline.datasets import latest_version

# start when an upstream dataset has a new version whose blocking checks passed
ON_NEW_DATASET = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()

SMOKE_RESOLUTION = 32
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TrainerSpec:
    name: str  # the asset
    models_dir: str  # its outputs: $LINEUP_HOME/models/<models_dir>/<dataset version>/
    module: str  # the training entry point run in the subprocess
    dataset: str  # the dataset family it reads (datasets/<dataset>/<version>/)
    train_split: str  # folder of the train split inside a version
    eval_split: str | None  # folder of the held-out split, if the trainer evaluates
    upstream: str  # the dataset asset
    kinds: frozenset[str]
    description: str
    base_weights: Callable[[LineupSettings], str | None]  # local base weights, None: none configured
    configure: Callable[[LineupSettings, bool], dict]  # the trainer's own config for (settings, smoke)
    on_success: Callable[[LineupSettings, str, bool], None] | None = None  # (settings, version, smoke)


def _dataset(lineup: LineupSettings, name: str, split: str | None = None) -> str:
    layout = lineup.layout
    version = latest_version(layout, name)
    if version is None:
        raise dg.Failure(f"no published version of dataset {name!r} yet: materialize it first")
    path = layout.datasets / name / version
    return str(path / split) if split else str(path)


def _steps(lineup: LineupSettings, smoke: bool) -> int:
    return lineup.train_steps or (6 if smoke else 2000)


def _smoke_loader(smoke: bool) -> dict:
    return {"resolution": SMOKE_RESOLUTION if smoke else 512, "batch_size": 2 if smoke else 4}


def _diffusion_model(lineup: LineupSettings) -> str | None:
    return lineup.path_setting(lineup.diffusion_model, "LINEUP_DIFFUSION_MODEL")


def _model_spec(lineup: LineupSettings, smoke: bool) -> dict:
    return {"tiny": True} if smoke else {"pretrained": _diffusion_model(lineup)}


def _embedding_dim(lineup: LineupSettings) -> int:
    import pyarrow.parquet as pq

    files = sorted(lineup.layout.table_dir("faces").glob("*.parquet"))
    return pq.read_schema(files[0]).field("embedding").type.list_size if files else 512


def _run_config(spec: TrainerSpec, lineup: LineupSettings, smoke: bool) -> dict:
    version = latest_version(lineup.layout, spec.dataset)
    own = spec.configure(lineup, smoke)
    return {
        "data": _dataset(lineup, spec.dataset, spec.train_split),
        **({"eval_data": _dataset(lineup, spec.dataset, spec.eval_split)} if spec.eval_split else {}),
        **own,
        "train": {"max_steps": _steps(lineup, smoke), **own.get("train", {})},
        # one output folder per dataset version, so that a rerun resumes its own checkpoints
        "output_dir": str(lineup.layout.home / "models" / spec.models_dir / version),
        "resume": "auto",
        "device": lineup.train_device,
    }


def trainer_asset(spec: TrainerSpec) -> dg.AssetsDefinition:
    @dg.asset(
        name=spec.name,
        group_name="training",
        kinds=set(spec.kinds),
        deps=[spec.upstream],
        pool="gpu",
        automation_condition=ON_NEW_DATASET,
        description=spec.description,
    )
    def _train(context: dg.AssetExecutionContext, lineup: LineupSettings,
               pipes_subprocess_client: dg.PipesSubprocessClient):
        smoke = spec.base_weights(lineup) is None
        note = (
            "SMOKE RUN: tiny random-init models because no local base weights are configured; it checks the "
            "plumbing end to end, its losses and accuracies mean nothing."
            if smoke
            else "trained from the configured local base weights"
        )
        context.log.info(f"{spec.module}: {note}")
        result = pipes_subprocess_client.run(
            command=[sys.executable, "-m", spec.module],
            context=context,
            extras={"config": _run_config(spec, lineup, smoke)},
            cwd=str(REPO_ROOT),
        ).get_materialize_result()
        if spec.on_success:
            spec.on_success(lineup, latest_version(lineup.layout, spec.dataset), smoke)
        return result._replace(metadata={**(result.metadata or {}), "smoke_run": smoke, "note": note})

    return _train


def _dpo_config(lineup: LineupSettings, smoke: bool) -> dict:
    return {"model": _model_spec(lineup, smoke), "loader": _smoke_loader(smoke),
            "train": {"checkpoint_every": 5 if smoke else 500}}


def _identity_config(lineup: LineupSettings, smoke: bool) -> dict:
    embedder = lineup.path_setting(lineup.arcface_weights, "LINEUP_ARCFACE_WEIGHTS")
    # without an ArcFace network the adapter is conditioned on the shard's own face embeddings
    train = {} if embedder else {"emb_dim": _embedding_dim(lineup)}
    return {"model": _model_spec(lineup, smoke), "face_embedder": {"path": embedder} if embedder else None,
            "loader": _smoke_loader(smoke), "train": train}


def _clip_weights(lineup: LineupSettings) -> str | None:
    return lineup.path_setting(lineup.clip_weights, "LINEUP_CLIP_WEIGHTS")


def _reward_config(lineup: LineupSettings, smoke: bool) -> dict:
    if smoke:
        return {"train": {"margin": 0.3, "model_name": "lineup-tiny-clip", "model_cfg": TINY_CLIP}}
    return {"train": {"margin": 0.3, "model_name": lineup.clip_model, "pretrained": _clip_weights(lineup)}}


def _publish_scorer(lineup: LineupSettings, version: str, smoke: bool) -> None:
    """Only a reward model trained from real weights becomes the social_reward scorer."""
    if not smoke:
        from pipeline.storage import write_bytes_atomic

        write_bytes_atomic(version.encode(), lineup.layout.home / "models" / "social_reward" / "LATEST")


dpo_lora = trainer_asset(TrainerSpec(
    name="dpo_lora", models_dir="dpo_lora", module="training.run_dpo", dataset="social", upstream="social_dataset",
    train_split="webdataset/train", eval_split="webdataset/eval", kinds=frozenset({"pytorch", "diffusers"}),
    description="Diffusion-DPO (beta 2500, diffusers convention) with a LoRA on the UNet, trained on the "
    "latest social preference dataset; writes a LoRA that diffusers loads with load_lora_weights.",
    base_weights=_diffusion_model, configure=_dpo_config,
))

identity_adapter = trainer_asset(TrainerSpec(
    name="identity_adapter", models_dir="identity_adapter", module="training.run_identity", dataset="multiid", upstream="multiid_dataset",
    train_split="train", eval_split=None, kinds=frozenset({"pytorch", "diffusers"}),
    description="Identity adapter (decoupled cross-attention over reference-face embeddings) trained with the "
    "diffusion loss + 1-cos identity loss + InfoNCE with extended negatives, as in WithAnyone.",
    base_weights=_diffusion_model, configure=_identity_config,
))

social_reward_model = trainer_asset(TrainerSpec(
    name="social_reward_model", models_dir="social_reward", module="training.run_reward", dataset="social", upstream="social_dataset",
    train_split="webdataset/train", eval_split="webdataset/eval", kinds=frozenset({"pytorch"}),
    description="Social Reward scorer: CLIP backbone with its top blocks unfrozen, triplet loss with the prompt "
    "as anchor (margin 0.3), pairwise accuracy on held-out pairs. Its checkpoint becomes a scorer.",
    base_weights=_clip_weights, configure=_reward_config, on_success=_publish_scorer,
))
