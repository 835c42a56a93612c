"""What the whole-collection assets read: the per-partition tables of every partition that was built.

A partition counts as built when its face unit is committed (pipeline/commits.py: its files written
and its blocking checks passed). One whose faces did not get built (its run failed or was killed, its
checks failed, or it has not run yet) does not block the collection: it is left out and named in
``missing`` (and in ``failed`` with the reasons when its checks failed), so the collection assets build from what exists
and say what they lack. An empty collection is a valid input: the tables are empty, with their schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.commits import committed_keys, failed_units
from pipeline.config import Layout
from pipeline.faces.stage import faces_schema
from pipeline.ingest import IMAGES_SCHEMA
from pipeline.sources import load_registry
from pipeline.storage import read_parquet

DEFAULT_EMBEDDING_DIM = 128
IDENTITY_COLUMNS = pa.schema([("uid", pa.string()), ("face_index", pa.int32()), ("identity_id", pa.string())])


class MixedFaceModels(ValueError):
    """The collection's partitions were embedded by different face models: their embeddings do not compare."""


def partition_face_model(path) -> tuple[str, str, int] | None:
    """(backend, model_version, embedding dim) of one faces file, or None when it has no face."""

    from pipeline.storage import read_parquet

    t = read_parquet(path, columns=["backend", "model_version", "embedding"])
    if t.num_rows == 0:
        return None
    models = set(zip(t.column("backend").to_pylist(), t.column("model_version").to_pylist()))
    if len(models) > 1:
        raise MixedFaceModels(f"{path} holds faces of several models: {sorted(models)}")
    backend, version = models.pop()
    return backend, version, t.schema.field("embedding").type.list_size


@dataclass
class Collection:
    images: pa.Table
    faces: pa.Table
    registered: list[str]  # every registered input partition
    built: list[str]  # partitions whose face unit is committed (its blocking checks passed)
    missing: list[str] = field(default_factory=list)  # registered, not built: left out
    failed: dict[str, list[str]] = field(default_factory=dict)  # partition -> why its face unit failed its checks

    @property
    def empty_reason(self) -> str | None:
        if not self.registered:
            return "no input partitions are registered (nothing ingested yet)"
        if not self.built:
            return f"none of the {len(self.registered)} registered partitions has its faces built yet"
        if self.faces.num_rows == 0:
            return f"no face was found in the {self.images.num_rows} accepted images"
        return None

    def coverage(self) -> dict:
        return {"partitions_registered": len(self.registered), "partitions_built": len(self.built),
                "partitions_missing": self.missing[:50], "n_missing": len(self.missing),
                "partitions_failed_checks": dict(list(self.failed.items())[:50])}


def image_owners(layout: Layout) -> dict[str, str]:
    """uid -> the partition that owns the image (sql/image_copies.sql, the catalog's own rule)."""
    from pipeline.catalog import in_memory_views

    con = in_memory_views(layout)
    try:
        if not con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'image_copies'").fetchone()[0]:
            return {}
        return dict(con.execute('SELECT uid, "partition" FROM image_copies WHERE copy = 1').fetchall())
    finally:
        con.close()


def _owned(table: pa.Table, key: str, owners: dict[str, str]) -> pa.Table:
    mask = pa.array([owners.get(u) == key for u in table.column("uid").to_pylist()], pa.bool_())
    return table.filter(mask)


def load_collection(layout: Layout) -> Collection:
    """Images and faces of every built partition; an image held by several partitions (the same bytes)
    comes once, from the partition that owns it, whatever order the partitions were built in."""
    registered = [s.key for s in load_registry(layout.partitions)]
    # only committed face units (pipeline/commits.py): a partition whose checks failed, or whose run was
    # killed between two of its files, is left out until it is run again
    built = [k for k in committed_keys(layout, "faces", registered) if layout.partition_file("images", k).exists()]
    from pipeline.faces.stage_identity import stage_key

    # one face stage (backend, detector, landmarks, descriptor), whatever hardware built each partition
    models: dict[tuple, list[str]] = {}
    for k in built:
        m = partition_face_model(layout.partition_file("faces", k))
        if m is not None:
            models.setdefault((stage_key(m[0], m[1]), m[2]), []).append(k)
    if len(models) > 1:
        detail = "; ".join(f"{s} ({d}-d): {', '.join(sorted(ks)[:5])}{' ...' if len(ks) > 5 else ''}"
                           for (s, d), ks in sorted(models.items()))
        raise MixedFaceModels(
            "one collection, one face model: the partitions were embedded by different models, whose embeddings "
            f"cannot be compared ({detail}). Re-embed them with one model: `python -m assets.run --rebuild` "
            "with the face_backend you want (make run re-embeds partitions whose model differs from the configured one).")
    owners = image_owners(layout) if built else {}
    images = [_owned(read_parquet(layout.partition_file("images", k)), k, owners) for k in sorted(built)]
    faces = [_owned(read_parquet(layout.partition_file("faces", k)), k, owners) for k in sorted(built)]
    images_t = pa.concat_tables(images, promote_options="default") if images else IMAGES_SCHEMA.empty_table()
    faces_t = pa.concat_tables(faces, promote_options="default") if faces else faces_schema(DEFAULT_EMBEDDING_DIM).empty_table()
    missing = [k for k in registered if k not in built]
    return Collection(images_t, faces_t, registered, built, missing, failed_units(layout, "faces", missing))


def load_identities(layout: Layout, faces: pa.Table) -> pa.Table:
    """The identities table restricted to the collection's faces (an empty table when there is none)."""
    path = layout.table_file("identities")
    if not path.exists():
        return IDENTITY_COLUMNS.empty_table()
    ids = read_parquet(path)
    if faces.num_rows == 0 or ids.num_rows == 0:
        return ids.slice(0, 0)
    keys = set(zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist()))
    mask = [(u, f) in keys for u, f in zip(ids.column("uid").to_pylist(), ids.column("face_index").to_pylist())]
    return ids.filter(pa.array(mask, pa.bool_()))
