"""The code location: every asset, check, job, sensor and schedule, and the one resource."""

import dagster as dg

from assets import expression, faces, identity, ingest, multiid, privacy, scoring, social, training
from assets.deployment import trainer_client
from assets.resources import LineupSettings

_modules = [ingest, faces, expression, privacy, identity, multiid, scoring, social, training]

collection_job = dg.define_asset_job(
    "collection_job",
    selection=dg.AssetSelection.groups("privacy", "identity", "datasets", "scoring"),
    description="Whole-collection assets: removal requests applied, identities, and the datasets built on them.",
)

social_job = dg.define_asset_job(
    "social_job",
    selection=dg.AssetSelection.groups("social"),
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
    assets=dg.load_assets_from_modules(_modules),
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=[ingest.ingest_job, collection_job, social_job, training_job],
    sensors=[ingest.new_inputs_sensor, automation_sensor],
    schedules=[refresh_schedule],
    resources={
        "lineup": LineupSettings(),
        "trainer_client": trainer_client(),  # a subprocess, or a GPU pod on Kubernetes (LINEUP_DEPLOYMENT)
    },
)
