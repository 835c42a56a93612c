"""The code location: every asset, check, job, sensor and schedule, and the one resource."""

import dagster as dg

from assets import expression, faces, identity, ingest, multiid, scoring, social, training
from assets.resources import LineupSettings

_modules = [ingest, faces, expression, identity, multiid, scoring, social, training]

collection_job = dg.define_asset_job(
    "collection_job",
    selection=dg.AssetSelection.groups("identity", "datasets", "scoring"),
    description="Whole-collection assets: identities and the datasets built on them.",
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
    description="Rebuild identities and datasets every night from whatever partitions exist.",
)

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(_modules),
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=[ingest.ingest_job, collection_job, social_job, training_job],
    sensors=[ingest.new_inputs_sensor],
    schedules=[refresh_schedule],
    resources={
        "lineup": LineupSettings(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    },
)
