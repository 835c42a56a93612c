"""Removal requests applied to the collection before anything is clustered or released."""

import dagster as dg

from assets.faces import faces
from assets.resources import LineupSettings
from assets.ui import pictures, table_preview


@dg.asset(
    group_name="identity",
    kinds={"parquet"},
    deps=[faces],
    automation_condition=dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())
    .with_label("eager, also when an input partition failed"),
    description="Applies removal requests (`make forget PHOTO=/IMAGE=/USER=/IDENTITY=`): the person's photos leave "
    "every per-partition table before identities and datasets are rebuilt; versions that held them are superseded "
    "(PURGE=1 deletes them). Photo matches below the automatic threshold are shown for review.",
)
def removals(context: dg.AssetExecutionContext, lineup: LineupSettings):
    from pipeline.collection import load_collection
    from pipeline.faces.calibration import thresholds_for
    from pipeline.faces.crops import CropReader
    from pipeline.removals import (
        apply_removals,
        load_requests,
        mark_superseded,
        plan_removals,
        versions_containing,
    )
    from pipeline.storage import read_parquet
    from pipeline.viz import contact_sheet

    layout = lineup.layout
    requests = load_requests(layout)
    coll = load_collection(layout)
    backend = coll.faces.column("backend")[0].as_py() if coll.faces.num_rows else lineup.face_backend
    t = thresholds_for(backend)
    ids_path = layout.table_file("identities")
    identities = read_parquet(ids_path) if ids_path.exists() else None
    plan = plan_removals(requests, coll.images, coll.faces, identities, t.removal_auto_min, t.same_person_min)
    crops = CropReader(coll.images, coll.faces, lineup.limits)
    matched = sorted(plan.faces)[:24]
    tiles = [(c, f"removed\n{u[:8]}#{f}") for u, f in matched if (c := crops.crop(u, f)) is not None]
    tiles += [(c, f"review cos {r['cosine']:.3f}\nid {r['identity_id']}") for r in plan.review[:24]
              if (c := crops.crop(r["uid"], r["face_index"])) is not None]
    superseded = versions_containing(layout, plan.uids)
    applied = apply_removals(layout, plan, coll.built)
    mark_superseded(layout, superseded, purge=lineup.purge_removed_versions)
    from pipeline.catalog import refresh_catalog

    refresh_catalog(layout)
    for r in plan.review:
        context.log.warning(f"request {r['request']}: face {r['uid'][:12]}#{r['face_index']} (identity {r['identity_id']}) "
                            f"matches at cosine {r['cosine']} < {t.removal_auto_min}: review it, and confirm with "
                            f"`make forget IDENTITY={r['identity_id']}`")
    return dg.MaterializeResult(
        metadata={
            "requests": len(requests),
            "photos_removed_now": applied["photos"],
            "rows_removed": dg.MetadataValue.json(applied["rows_removed"]),
            "per_request": dg.MetadataValue.json(plan.per_request),
            "awaiting_review": dg.MetadataValue.json(plan.review[:50]),
            "superseded_versions": dg.MetadataValue.json(superseded),
            "purged": lineup.purge_removed_versions,
            "auto_threshold": t.removal_auto_min,
            "review_threshold": t.same_person_min,
            "social_users_excluded": len(plan.user_hashes),
            "matches": table_preview([{"request": k, **v} for k, v in plan.per_request.items()]),
            **pictures(layout.home, "removals", {"matches_for_review": contact_sheet(tiles, cols=6, tile=96)} if tiles else {},
                       shows_uids=[u for u, _ in matched] + [r["uid"] for r in plan.review[:24]]),
        }
    )
