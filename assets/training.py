"""Training assets: Diffusion-DPO LoRA, the identity adapter, the social reward model.

One factory (``trainer_asset``) builds all three: each runs its trainer as a subprocess through
Dagster Pipes (the same script runs standalone or on a GPU machine), starts by itself when a new
dataset version lands and its blocking checks passed (``ON_NEW_DATASET``), and takes a slot in
the "gpu" concurrency pool so two trainings never share one GPU. A ``TrainerSpec`` says only what
differs: the dataset and splits it reads, the base weights it needs, what its held-out evaluation
measures and the trainer's own config.

A trainer reads the dataset version that triggered it: the data version of its upstream dataset's
latest materialization in this Dagster instance (LATEST only when the instance has none, e.g. a
dataset published outside it), so a version published while it waited does not swap its data.

Every trainer ends with a held-out evaluation and a promotion decision (training/promotion.py): the
model becomes the family's ``LATEST`` (for the reward model: the social_reward scorer) only when the
95% lower bound of its held-out accuracy beats chance and the incumbent measured on the same pairs.
The decision is in the materialization's metadata and in the blocking ``promotion`` check, which fails
(ERROR) when a real run is not promoted and only warns on a smoke run (never promoted: expected).

Nothing to train is not a failure: with no published dataset version, an empty train split, or no
local base weights while no smoke run was asked for (``smoke_training`` / LINEUP_SMOKE_TRAINING=1),
a trainer is skipped: it logs why and materializes nothing (``skip_reason`` says why without
running anything). Smoke runs train tiny random-init models; they prove the plumbing, their numbers
mean nothing, their metadata says ``smoke_run: true`` and their promotion checks only warn (a smoke
model is never promoted: expected).
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from assets.resources import LineupSettings
from assets.ui import skipped
from pipeline.config import REPO_ROOT
from pipeline.datasets import latest_version
from pipeline.shards import read_manifest

# The trainers' automation condition, in one place: start when an upstream dataset's data version (its
# content id) changed and its blocking checks passed. A refresh that rebuilds the same content keeps
# the data version, so it does not retrain.
ON_NEW_DATASET = (
    dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed())
    .since_last_handled()
    .with_label("dataset data version changed")
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("new dataset version whose blocking checks passed")

SMOKE_RESOLUTION = 32
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
SMOKE_NOTE = ("SMOKE RUN (asked for by smoke_training / LINEUP_SMOKE_TRAINING=1): tiny random-init models; it "
              "checks the plumbing end to end, its losses and accuracies mean nothing.")
REAL_NOTE = "trained from the configured local base weights"
# held-out evaluation cap, in batches: 1024 pairs at batch 4 on a real run; a smoke run's numbers mean
# nothing, so it evaluates only enough to exercise the code (CPU smoke runs are slow)
HELDOUT_EVAL_BATCHES = {"real": 256, "smoke": 8}


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
    weights_hint: str  # how to configure them
    configure: Callable[[LineupSettings, bool], dict]  # the trainer's own config for (settings, smoke)
    evaluates: str = ""  # what its held-out evaluation measures (the promotion check's description)
    preflight: Callable[[LineupSettings, bool], None] | None = None  # raises dg.Failure to refuse a run


def _split_dir(lineup: LineupSettings, spec: TrainerSpec, version: str, split: str) -> Path:
    return lineup.layout.datasets / spec.dataset / version / split


def triggering_version(spec: TrainerSpec, lineup: LineupSettings,
                       instance: dg.DagsterInstance | None) -> tuple[str | None, str]:
    """(dataset version, where it came from): the data version of the upstream dataset's latest
    materialization recorded in ``instance``, else the dataset's LATEST."""
    event = instance.get_latest_materialization_event(dg.AssetKey(spec.upstream)) if instance else None
    tags = (event.asset_materialization.tags or {}) if event and event.asset_materialization else {}
    version = tags.get("dagster/data_version")
    if version:
        return version, f"data version of {spec.upstream}'s latest materialization"
    fallback = f"LATEST of dataset {spec.dataset!r} ({spec.upstream} has no materialization in this instance)"
    return latest_version(lineup.layout, spec.dataset), fallback


def skip_reason(spec: TrainerSpec, lineup: LineupSettings, version: str | None) -> str | None:
    """Why this trainer has nothing to do now on dataset ``version`` (None: it runs)."""
    if version is None:
        return f"no published version of dataset {spec.dataset!r} yet"
    train_dir = _split_dir(lineup, spec, version, spec.train_split)
    if not (train_dir / "manifest.json").exists():  # also a triggering version removed since
        raise dg.Failure(f"dataset {spec.dataset!r} version {version} has no {spec.train_split} manifest "
                         f"({train_dir}): the version is incomplete")
    manifest = read_manifest(train_dir)
    if not manifest.get("shards") or not manifest.get("num_samples"):
        recorded = manifest.get("version")
        # the manifest's own id is named only when it disagrees with its folder (a hand-copied version)
        return (f"the {spec.train_split} split of dataset {spec.dataset!r} version {version} has no samples"
                + (f" (its manifest says version {recorded!r})" if recorded != version else ""))
    if spec.base_weights(lineup) is None and not lineup.smoke_training:
        return (f"no local base weights ({spec.weights_hint}) and no smoke run asked for "
                f"(smoke_training, or LINEUP_SMOKE_TRAINING=1)")
    return None


def _steps(lineup: LineupSettings, smoke: bool) -> int:
    return lineup.train_steps or (6 if smoke else 2000)


def _family_dir(lineup: LineupSettings, spec: TrainerSpec) -> Path:
    return lineup.layout.home / "models" / spec.models_dir


def _run_config(spec: TrainerSpec, lineup: LineupSettings, version: str, smoke: bool) -> dict:
    own = spec.configure(lineup, smoke)
    split = {"eval_data": str(_split_dir(lineup, spec, version, spec.eval_split)),
             "eval_batches": HELDOUT_EVAL_BATCHES["smoke" if smoke else "real"]} if spec.eval_split else {}
    return {
        "data": str(_split_dir(lineup, spec, version, spec.train_split)),
        **split,
        **own,
        "train": {"max_steps": _steps(lineup, smoke), **own.get("train", {})},
        # one output folder per dataset version, so that a rerun resumes its own checkpoints
        "output_dir": str(_family_dir(lineup, spec) / version),
        # the incumbent is read there, and a promoted model moves its LATEST
        "model_family_dir": str(_family_dir(lineup, spec)),
        "resume": "auto",
        "device": lineup.train_device,
        "smoke_run": smoke,
    }


def promotion_check_spec(spec: TrainerSpec) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        "promotion", asset=spec.name, blocking=True,
        description=f"Promoted on held-out evidence: {spec.evaluates}, with a 95% Wilson interval; promoted "
        "(LATEST moves to it) only when the interval's lower bound beats chance (0.5) and the incumbent's accuracy "
        "on the same held-out pairs. Fails with ERROR when a real run is not promoted (the model is kept, with "
        "the reason); on a smoke run it only warns: a smoke model is never promoted, which is expected.")


def trainer_asset(spec: TrainerSpec) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=spec.name,
        specs=[dg.AssetSpec(
            spec.name, group_name="training", kinds=set(spec.kinds), deps=[spec.upstream],
            automation_condition=ON_NEW_DATASET, description=spec.description,
            skippable=True,  # nothing to train is a skip, not a failure
        )],
        check_specs=[promotion_check_spec(spec)] if spec.eval_split else [],
        can_subset=True,  # lets a skipped run leave its checks unreported
        pool="gpu",
    )
    def _train(context: dg.AssetExecutionContext, lineup: LineupSettings,
               trainer_client: dg.ResourceParam[dg.PipesClient]):
        if dg.AssetKey(spec.name) not in context.selected_asset_keys:
            context.log.warning(f"{spec.name}: only its checks were selected; they are reported by a training run")
            return
        version, version_source = triggering_version(spec, lineup, context.instance)
        reason = skip_reason(spec, lineup, version)
        if reason:
            yield skipped(context, spec.name, reason)  # also tags the run, so its page says why
            return
        smoke = lineup.smoke_training
        if spec.preflight:
            spec.preflight(lineup, smoke)
        note = SMOKE_NOTE if smoke else REAL_NOTE
        context.log.info(f"{spec.module} on {spec.dataset} version {version} ({version_source}): {note}")
        # a subprocess here, or a pod on a GPU node (assets/deployment.py); the same command either way
        local = isinstance(trainer_client, dg.PipesSubprocessClient)
        results = list(trainer_client.run(
            command=[sys.executable if local else "python", "-m", spec.module],
            context=context,
            extras={"config": _run_config(spec, lineup, version, smoke)},
            **({"cwd": str(REPO_ROOT)} if local else {}),
        ).get_results())
        for r in results:
            if isinstance(r, dg.MaterializeResult):
                # the dataset as published (datasets/<name>/); the manifest's own name is kept beside it
                shards_name = (r.metadata or {}).get("dataset")
                extra = {"note": note, "dataset": spec.dataset, "dataset_version_source": version_source,
                         "dataset_folder": dg.MetadataValue.path(str(lineup.layout.datasets / spec.dataset / version)),
                         **({"dataset_manifest_name": shards_name} if shards_name is not None else {})}
                r = r._replace(metadata={**(r.metadata or {}), **extra})
            yield r

    return _train


# ------------------------------------------------------------------------------------------------
# The three trainers
# ------------------------------------------------------------------------------------------------


def _smoke_loader(smoke: bool) -> dict:
    return {"resolution": SMOKE_RESOLUTION if smoke else 512, "batch_size": 2 if smoke else 4}


def _diffusion_model(lineup: LineupSettings) -> str | None:
    return lineup.path_setting(lineup.diffusion_model, "LINEUP_DIFFUSION_MODEL")


def _model_spec(lineup: LineupSettings, smoke: bool) -> dict:
    return {"tiny": True} if smoke else {"pretrained": _diffusion_model(lineup)}


def _arcface_weights(lineup: LineupSettings) -> str | None:
    return lineup.path_setting(lineup.arcface_weights, "LINEUP_ARCFACE_WEIGHTS")


def _embedding_dim(lineup: LineupSettings) -> int:
    from pipeline.storage import read_parquet

    files = sorted(lineup.layout.table_dir("faces").glob("*.parquet"))
    return read_parquet(files[0], columns=["embedding"]).schema.field("embedding").type.list_size if files else 512


def _dpo_config(lineup: LineupSettings, smoke: bool) -> dict:
    return {"model": _model_spec(lineup, smoke), "loader": _smoke_loader(smoke),
            "train": {"checkpoint_every": 5 if smoke else 500}}


def _identity_config(lineup: LineupSettings, smoke: bool) -> dict:
    embedder = _arcface_weights(lineup)
    # without an ArcFace network the adapter is conditioned on the shard's own face embeddings
    train = {} if embedder else {"emb_dim": _embedding_dim(lineup)}
    return {"model": _model_spec(lineup, smoke), "face_embedder": {"path": embedder} if embedder else None,
            "loader": _smoke_loader(smoke), "train": train}


def _identity_preflight(lineup: LineupSettings, smoke: bool) -> None:
    """A real run needs the identity loss: without ArcFace weights it would train an adapter that
    learns no identity, and call it real."""
    weights = _arcface_weights(lineup)
    if not smoke and not (weights and Path(weights).is_file()):
        raise dg.Failure(
            "identity_adapter refuses to train on real diffusion weights without ArcFace weights "
            f"({'not found: ' + weights if weights else 'none configured'}): its identity loss would be off. "
            "Set LINEUP_ARCFACE_WEIGHTS (or arcface_weights) to an iresnet .pth.")


def _clip_weights(lineup: LineupSettings) -> str | None:
    return lineup.path_setting(lineup.clip_weights, "LINEUP_CLIP_WEIGHTS")


def _reward_config(lineup: LineupSettings, smoke: bool) -> dict:
    if smoke:
        return {"train": {"margin": 0.3, "model_name": "lineup-tiny-clip", "model_cfg": TINY_CLIP}}
    return {"train": {"margin": 0.3, "model_name": lineup.clip_model, "pretrained": _clip_weights(lineup)}}


dpo_lora = trainer_asset(TrainerSpec(
    name="dpo_lora", models_dir="dpo_lora", module="training.run_dpo", dataset="social", upstream="social_dataset",
    train_split="webdataset/train", eval_split="webdataset/eval", kinds=frozenset({"pytorch", "diffusers"}),
    description="Diffusion-DPO with a LoRA on the UNet (diffusers' loss, beta_dpo 2500 = the paper's 5000), "
    "trained on the triggering social preference dataset version and evaluated on its held-out split; writes a "
    "LoRA with its adapter config that diffusers loads with load_lora_weights. models/dpo_lora/LATEST names the "
    "promoted LoRA.",
    base_weights=_diffusion_model, weights_hint="LINEUP_DIFFUSION_MODEL: a local diffusers SD folder",
    configure=_dpo_config,
    evaluates="implicit reward accuracy on the held-out pairs (the LoRA prefers the winner more than the reference "
    "model does; ties count half, so an unchanged LoRA reads 0.5)",
))

identity_adapter = trainer_asset(TrainerSpec(
    name="identity_adapter", models_dir="identity_adapter", module="training.run_identity", dataset="multiid",
    upstream="multiid_dataset", train_split="train", eval_split="eval", kinds=frozenset({"pytorch", "diffusers"}),
    description="Identity adapter (decoupled cross-attention over reference-face embeddings) trained with the "
    "diffusion loss + 1-cos identity loss (weight 1.0) + InfoNCE with extended negatives (0.01), both off at "
    "t > 0.6, as in WithAnyone's training code. A real run needs ArcFace weights and refuses to start without "
    "them. models/identity_adapter/LATEST names the promoted adapter.",
    base_weights=_diffusion_model, weights_hint="LINEUP_DIFFUSION_MODEL: a local diffusers SD folder",
    configure=_identity_config, preflight=_identity_preflight,
    evaluates="identity win rate on the held-out split's faces (a face is more like its ground truth under the "
    "trained adapter than under the untrained one: one-step Sim(GT) with the face embedder, an embedding-level "
    "proxy without one; ties count half)",
))

social_reward_model = trainer_asset(TrainerSpec(
    name="social_reward_model", models_dir="social_reward", module="training.run_reward", dataset="social",
    upstream="social_dataset", train_split="webdataset/train", eval_split="webdataset/eval",
    kinds=frozenset({"pytorch"}),
    description="Social Reward scorer: CLIP backbone with its top blocks unfrozen, triplet loss with the prompt "
    "as anchor (margin 0.3), pairwise accuracy on held-out pairs. A promoted model (models/social_reward/LATEST) "
    "is the social_reward scorer.",
    base_weights=_clip_weights, weights_hint="LINEUP_CLIP_WEIGHTS: a local open_clip checkpoint",
    configure=_reward_config,
    evaluates="pairwise accuracy on the held-out pairs (the winner scores above the loser; ties count half, so a "
    "collapsed scorer reads 0.5)",
))
