"""The code location: every asset, check, job, sensor and schedule, and the one resource."""

import os
import warnings

import dagster as dg

from assets import expression, faces, identity, ingest, multiid, privacy, scoring, sensors, social, training
from assets.deployment import trainer_client
from assets.resources import LineupSettings

# Dagster's Pipes context calls its own preview API on every trainer run (our code does not use it)
warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader.expected_writer_count` is currently in preview",
                        category=dg.PreviewWarning)
# code references (the asset's source file in the UI) are beta in this Dagster: one warning per asset otherwise
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=r"(Function `with_source_code_references`|Class "
                        r"`LocalFileCodeReference`|Class `CodeReferencesMetadataValue`) is currently in beta")

_modules = [ingest, faces, expression, privacy, identity, multiid, scoring, social, training]
# assets that hold people's faces (pixels, boxes, embeddings, identities) or user ids: tagged `pii`,
# so that the catalog can be filtered to what a removal request must reach
PII = {"images": "faces", "faces": "faces", "face_expressions": "faces", "removals": "faces", "identities": "faces",
       "multiid_dataset": "faces", "expression_dataset": "faces", "scores": "faces", "social_dataset": "user_ids",
       "identity_adapter": "faces"}
OWNERS = [o.strip() for o in os.environ.get("LINEUP_OWNERS", "team:lineup").split(",") if o.strip()]


def _label(spec: dg.AssetSpec) -> dg.AssetSpec:
    pii = PII.get(spec.key.to_user_string())
    return spec.replace_attributes(owners=OWNERS, tags={**spec.tags, **({"pii": pii} if pii else {})})


_assets = dg.with_source_code_references(dg.map_asset_specs(_label, dg.load_assets_from_modules(_modules)))

# four groups, by when things are built: per input partition (ingest), across the collection (identity),
# the released datasets and scores (datasets), and the trainers (training)
collection_job = dg.define_asset_job(
    "collection_job",
    selection=dg.AssetSelection.groups("identity", "datasets") - dg.AssetSelection.assets("social_dataset"),
    description="Whole-collection assets: removal requests applied, identities, and the datasets built on them.",
)

social_job = dg.define_asset_job(
    "social_job",
    selection=dg.AssetSelection.assets("social_dataset"),
    description="Preference pairs from the interaction logs at the social input location.",
)

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.groups("training"),
    description="All trainers on the latest published dataset versions (normally started by automation).",
)

# jobs that `make run` runs, in order, after every input partition went through ingest_job
COLLECTION_JOBS: list[str] = ["collection_job", "social_job", "training_job"]

refresh_schedule = dg.ScheduleDefinition(
    name="daily_dataset_refresh",
    job=collection_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    # refreshes between nights are incremental (new faces join identities); the night reclusters everything,
    # which also merges identities that new photos link
    run_config={"resources": {"lineup": {"config": {"identity_mode": "recluster"}}}},
    description="Every night: recluster all faces (ids kept stable by overlap) and rebuild the datasets from "
    "whatever partitions exist. Off by default.",
)

# Declarative automation (eager collection assets, the social refresh at 04:00, trainers on new data
# versions) is evaluated by this sensor; it runs by default whenever the Dagster daemon runs (`make ui`).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates every asset's automation condition: collection assets after new partitions, "
    "social_dataset daily at 04:00, trainers when a dataset gets a new data version that passed its blocking checks.",
)

defs = dg.Definitions(
    assets=_assets,
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=[ingest.ingest_job, collection_job, social_job, training_job],
    sensors=[ingest.new_inputs_sensor, sensors.removal_requests_sensor, automation_sensor],
    schedules=[refresh_schedule],
    resources={
        "lineup": LineupSettings(),
        "trainer_client": trainer_client(),  # a subprocess, or a GPU pod on Kubernetes (LINEUP_DEPLOYMENT)
    },
)
