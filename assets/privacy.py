"""Removal requests applied to the collection before anything is clustered or released."""

import dagster as dg

from assets.faces import faces
from assets.resources import LineupSettings


def scrub_event_log(instance: dg.DagsterInstance, layout, keep: str) -> int:
    """PURGE: delete every earlier run whose event log names a removed photo (runs of older code put uids
    and thumbnails in metadata); the run storage keeps nothing a removal was asked to delete. Idempotent:
    a kill part-way leaves the rest for the next purge."""
    from dagster._serdes import serialize_value

    from pipeline.removals import load_journal, names_removed

    removed = load_journal(layout).removed
    deleted = 0
    for run in instance.get_runs() if removed else []:
        if run.run_id != keep and any(names_removed(serialize_value(e), removed) for e in instance.all_logs(run.run_id)):
            instance.delete_run(run.run_id)
            deleted += 1
    return deleted


@dg.asset(
    group_name="identity",
    kinds={"parquet"},
    deps=[faces],
    automation_condition=dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())
    .with_label("eager, also when an input partition failed"),
    description="Applies removal requests (`make forget PHOTO=/IMAGE=/USER=/IDENTITY=`): the person's photos leave "
    "every table before identities and datasets are rebuilt; versions that held them are superseded "
    "(PURGE=1 deletes them); pictures that showed them are deleted. Photo matches below the automatic threshold "
    "wait for review (`make forget REVIEW=1`). Only counts and links reach this metadata, never uids or pixels.",
)
def removals(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.collection import load_collection
    from pipeline.faces.calibration import thresholds_for
    from pipeline.removals import apply_requests, load_requests
    from pipeline.storage import read_parquet

    layout = lineup.layout
    coll = load_collection(layout)
    backend = coll.faces.column("backend")[0].as_py() if coll.faces.num_rows else lineup.face_backend
    t = thresholds_for(backend)
    ids_path = layout.table_file("identities")
    identities = read_parquet(ids_path) if ids_path.exists() else None
    out = apply_requests(layout, load_requests(layout), coll.images, coll.faces, identities, t.removal_auto_min,
                         t.same_person_min, purge=lineup.purge_removed_versions, limits=lineup.limits)
    runs_deleted = scrub_event_log(context.instance, layout, keep=context.run_id) if out.purged else 0
    if out.awaiting_review:
        context.log.warning(f"{out.awaiting_review} face(s) match a removal request at a cosine between "
                            f"{t.same_person_min} and {t.removal_auto_min}: review them with `make forget REVIEW=1`")
    return dg.MaterializeResult(
        metadata={
            "requests": out.requests,
            "photos_removed_now": out.photos_removed_now,
            "photos_removed_total": out.photos_removed_total,
            "rows_removed": dg.MetadataValue.json(out.rows_removed),
            "pictures_deleted": out.pictures_deleted,
            "per_request": dg.MetadataValue.json(out.per_request),  # request ids, hashed subjects and counts
            "awaiting_review": out.awaiting_review,
            **({"review_list": dg.MetadataValue.path(str(out.review_path))} if out.review_path else {}),
            **{name: dg.MetadataValue.path(str(p)) for name, p in out.review_pictures.items()},
            "superseded_versions": dg.MetadataValue.json(out.superseded),
            "purged": out.purged,
            "runs_deleted": runs_deleted,
            "auto_threshold": t.removal_auto_min,
            "review_threshold": t.same_person_min,
            "social_users_excluded": out.social_users,
        }
    )
