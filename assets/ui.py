"""Small helpers that turn pipeline results into Dagster metadata.

Pictures are files under the home (pipeline/pictures.py), linked from metadata by a URL that
`make ui` (assets/serve.py) serves beside the Dagster UI under ``UI_PREFIX``; the event log holds
only the link, never the PNG. Tables use Dagster's own types (row count, column schema, tables).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import dagster as dg

from pipeline.pictures import pictures_dir, save_pictures

UI_PREFIX = "/lineup"  # where assets/serve.py serves pictures and dataset viewer pages, beside the UI
PICTURE_KEY = "picture: {}"  # metadata key of a picture's link: says it is a picture, and which


def picture_url(home: Path, path: Path) -> str:
    return f"{UI_PREFIX}/pictures/{Path(path).relative_to(pictures_dir(home)).as_posix()}"


def pictures(home: Path, owner: str, figs: dict[str, bytes], shows_uids: Iterable[str] = ()) -> dict[str, dg.MetadataValue]:
    """Write each PNG under $LINEUP_HOME/pictures/<owner>/ (recording the uids whose pixels it shows,
    so that removals can purge it) and return one link per picture for the materialization."""
    saved = save_pictures(home, owner, figs, shows_uids)
    return {PICTURE_KEY.format(name): dg.MetadataValue.url(picture_url(home, path)) for name, path in saved.items()}


def viewer_link(rel) -> dict[str, dg.MetadataValue]:
    """A link to a published version's viewer page (pipeline/viewer.py), served by `make ui`; nothing
    for a version in an object store, or one published before viewer pages existed."""
    from pipeline.storage import is_remote
    from pipeline.viewer import VIEWER_PAGE

    if not rel.published or is_remote(rel.folder) or not (Path(rel.folder) / VIEWER_PAGE).exists():
        return {}
    return {"viewer_page": dg.MetadataValue.url(f"{UI_PREFIX}/datasets/{rel.name}/{rel.version}/{VIEWER_PAGE}")}


def _column_type(t) -> str:
    return str(t).replace("large_", "")


def table_schema(schema) -> dg.TableSchema:
    """A pyarrow schema as Dagster's column schema."""
    return dg.TableSchema(columns=[dg.TableColumn(f.name, _column_type(f.type)) for f in schema])


def table_metadata(table, path: Path | str | None = None) -> dict:
    """`dagster/row_count` and `dagster/column_schema` of a Parquet table written by the asset
    (and where it is), so the UI's Overview shows rows and columns."""
    meta = {"dagster/row_count": dg.MetadataValue.int(table.num_rows),
            "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(table.schema))}
    if path is not None:
        meta["path"] = dg.MetadataValue.path(str(path))
    return meta


def table_preview(rows: list[dict], limit: int = 20) -> dg.MetadataValue:
    """Up to ``limit`` rows as a Dagster table (strings, cut to 80 characters)."""
    shown = rows[:limit]
    cols = list(rows[0]) if rows else ["(empty)"]
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: str(r.get(c, ""))[:80] for c in cols}) for r in shown],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, "string") for c in cols]),
    )


def skipped(context, asset_key: str, reason: str) -> dg.AssetObservation:
    """An asset that decides not to build says why: a warning in the log, a tag on the run (visible on
    the run's page and in the runs list, not only on its Events tab) and an observation."""
    context.log.warning(f"{asset_key} skipped: {reason}")
    context.instance.add_run_tags(context.run.run_id, {f"lineup/skipped/{asset_key}": reason[:200]})
    return dg.AssetObservation(asset_key=asset_key, metadata={"skipped_because": reason})


def uids_in(table) -> list[str]:
    """Every image uid a table names (columns `uid` and `*_uid`): what a picture drawn from it may show."""
    if table is None:
        return []
    out: set[str] = set()
    for name in table.column_names:
        if name == "uid" or name.endswith("_uid"):
            out.update(str(v) for v in table.column(name).to_pylist() if v is not None)
    return sorted(out)
