"""The code location: every asset, check, job, sensor and schedule, and the one resource."""

import dagster as dg

from assets import ingest
from assets.resources import LineupSettings

_modules = [ingest]

# jobs that `make run` runs, in order, after every input partition went through ingest_job
COLLECTION_JOBS: list[str] = []

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(_modules),
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=[ingest.ingest_job],
    sensors=[ingest.new_inputs_sensor],
    resources={"lineup": LineupSettings()},
)
