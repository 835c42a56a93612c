"""Sensors over folders that people write to: the removal requests of `make forget`."""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from assets.resources import LineupSettings


def pending_requests(request_ids: list[str], cursor: str | None) -> tuple[list[str], str]:
    """Request ids not seen by an earlier tick, and the new cursor (every id seen, as JSON)."""
    seen = set(json.loads(cursor)) if cursor else set()
    new = sorted(set(request_ids) - seen)
    return new, json.dumps(sorted(seen | set(request_ids)))


@dg.sensor(
    job_name="collection_job",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches $LINEUP_HOME/removals/requests (what `make forget` writes) and starts collection_job for "
    "new removal requests: the removals asset applies them, identities and every dataset are rebuilt without them.",
)
def removal_requests_sensor(context: dg.SensorEvaluationContext, lineup: LineupSettings):
    from pipeline.removals import requests_dir

    folder = requests_dir(lineup.layout)
    ids = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    new, cursor = pending_requests(ids, context.cursor)
    if not new:
        return dg.SkipReason(f"no new removal request in {folder}")
    # one run per set of new requests: a tick repeated after a crash asks for the same run key
    key = "removals-" + hashlib.sha256("\n".join(new).encode()).hexdigest()[:16]
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=key, tags={"lineup/removal_requests": ",".join(new)[:200]})],
                           cursor=cursor)
