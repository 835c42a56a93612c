"""The DuckDB catalog: views over the Parquet files under LINEUP_HOME/tables.

A table stored as tables/<name>/<partition>.parquet or tables/<name>.parquet becomes the view <name>,
defined over a file glob, so a new partition needs no change to the catalog: the views are created
once and only rewritten when their definition changes (a new table, a new reject stage). Every
tables/rejects_<stage>[...] is part of the single `rejects` view, together with the duplicate images
found at the collection level (sql/duplicate_images.sql). Views whose shape needs more than
`SELECT *` have their query in sql/<name>.sql, with {source} standing for the table's files.

With the tables in an object store (LINEUP_STORE=s3://...), the catalog file stays local and its views
read s3:// globs through fsspec (s3fs) registered in DuckDB; no DuckDB extension is downloaded. A reader
makes that one extra call before querying (:func:`attach_store` does it):
``con.register_filesystem(fsspec.filesystem("s3"))``, with the standard AWS variables set.

Writers never wait on readers: when another process holds the catalog (a notebook, the UI), a view
that needs creating is left for the next refresh, and the caller gets the names it could not write.
"""

from __future__ import annotations

import hashlib
import time

import duckdb
import pyarrow as pa

from pipeline.config import SQL_DIR, Layout

REJECTS_PREFIX = "rejects_"
# per-partition tables whose rows belong to the partition that owns each image (sql/owned_by_partition.sql)
OWNED_TABLES = ("faces", "face_scan", "face_expressions", "image_scores")
# views that read other views come after them
ORDER = ("image_copies", "images", "duplicate_images", *OWNED_TABLES)


def load_sql(name: str, **params: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no SQL file {path}")
    text = path.read_text()
    return text.format(**params) if params else text


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def table_sources(layout: Layout) -> dict[str, list[str]]:
    """view name -> file globs, for every table on disk (rejects tables grouped under 'rejects')."""
    out: dict[str, list[str]] = {}
    if not layout.tables.exists():
        return out
    for entry in sorted(layout.tables.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not any(entry.glob("*.parquet")):
                continue
            name, glob = entry.name, str(entry / "*.parquet")
        elif entry.suffix == ".parquet":
            name, glob = entry.stem, str(entry)
        else:
            continue
        out.setdefault("rejects" if name.startswith(REJECTS_PREFIX) else name, []).append(glob)
    return out


def _reader(globs: list[str]) -> str:
    return f"read_parquet([{', '.join(_sql_str(g) for g in globs)}], union_by_name = true, filename = true)"


def _registry(layout: Layout) -> str:
    """(key, seq) of every registered partition, read from the registry's JSON files."""
    if layout.partitions.exists() and any(layout.partitions.glob("*.json")):
        glob = _sql_str(str(layout.partitions / "*.json"))
        return f"read_json({glob}, columns = {{'key': 'VARCHAR', 'seq': 'BIGINT'}})"
    return "(SELECT NULL::VARCHAR AS key, NULL::BIGINT AS seq WHERE false)"


def view_definitions(layout: Layout) -> dict[str, str]:
    """view name -> its SELECT, in creation order."""
    sources = table_sources(layout)
    views: dict[str, str] = {}
    if "images" in sources:
        views["image_copies"] = load_sql("image_copies", source=_reader(sources["images"]), registry=_registry(layout))
        views["images"] = load_sql("images")
        views["duplicate_images"] = load_sql("duplicate_images")
    for name, globs in sources.items():
        if name == "images":
            continue
        if name in OWNED_TABLES and "images" in sources:
            views[name] = load_sql("owned_by_partition", source=_reader(globs))
        elif name == "rejects":
            parts = [f"SELECT source, stage, reason, detail, \"partition\", uid FROM {_reader(globs)}"]
            views[name] = " UNION ALL ".join([*parts, *(["SELECT * FROM duplicate_images"] if "images" in sources else [])])
        elif (SQL_DIR / f"{name}.sql").exists():
            views[name] = load_sql(name, source=_reader(globs))
        else:
            views[name] = f"SELECT * EXCLUDE (filename) FROM {_reader(globs)}"
    if "images" in sources and "rejects" not in views:
        views["rejects"] = "SELECT * FROM duplicate_images"
    first = [v for v in ORDER if v in views]
    return {**{v: views[v] for v in first}, **{k: v for k, v in views.items() if k not in first}}


def attach_store(con: duckdb.DuckDBPyConnection, layout: Layout) -> duckdb.DuckDBPyConnection:
    """Let ``con`` read the store's files: for an object store, register its fsspec filesystem (s3fs reads
    the endpoint and credentials from the standard AWS variables); nothing to do for a local store."""
    if layout.remote:
        con.register_filesystem(layout.store.fs)
    return con


def connect(layout: Layout, read_only: bool = False, retries: int = 50) -> duckdb.DuckDBPyConnection:
    """Open the catalog; another process may hold the write lock for a moment, so retry."""
    layout.home.mkdir(parents=True, exist_ok=True)
    delay = 0.05
    for attempt in range(retries):
        try:
            return attach_store(duckdb.connect(str(layout.catalog), read_only=read_only), layout)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or attempt == retries - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
    raise RuntimeError("unreachable")


def _tag(body: str) -> str:
    """What a view's comment records: the hash of the definition it was created from (DuckDB re-renders
    the SQL it stores, so the text itself cannot be compared)."""
    return "lineup:" + hashlib.sha256(body.encode()).hexdigest()[:16]


def refresh_catalog(layout: Layout, wait_s: float = 2.0) -> list[str]:
    """Make the catalog's views match the tables on disk; returns the view names.

    Nothing is written when the views already match (the steady state: a new partition is picked up
    by the globs). When a view must change and another process holds the catalog, the change is left
    for the next refresh after ``wait_s`` of retries, instead of failing the caller."""
    wanted = view_definitions(layout)
    if not wanted:
        return []
    tags = {n: _tag(b) for n, b in wanted.items()}
    current: dict[str, str] | None = None
    if layout.catalog.exists():
        try:
            con = duckdb.connect(str(layout.catalog), read_only=True)
            try:
                current = dict(con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
            finally:
                con.close()
        except (duckdb.IOException, duckdb.ConnectionException):
            current = None  # a writer holds it; find out below
    if current == tags:
        return list(wanted)
    try:
        con = connect(layout, retries=max(1, int(wait_s / 0.2)))
    except (duckdb.IOException, duckdb.ConnectionException):
        return list(wanted)  # held by another process: the next refresh writes the views
    try:
        existing = dict(con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
        for stale in set(existing) - set(wanted):
            con.execute(f'DROP VIEW IF EXISTS "{stale}"')
        for name, body in wanted.items():
            if existing.get(name) != tags[name]:
                con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {body}')
                con.execute(f"COMMENT ON VIEW \"{name}\" IS '{tags[name]}'")
    finally:
        con.close()
    return list(wanted)


def query(layout: Layout, sql: str, params: list | None = None) -> pa.Table:
    con = connect(layout, read_only=True)
    try:
        return con.sql(sql, params=params or None).to_arrow_table()
    finally:
        con.close()


def in_memory_views(layout: Layout) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the catalog's views over the same files: for readers inside the pipeline,
    which must not depend on (or wait for) the catalog file."""
    con = attach_store(duckdb.connect(), layout)
    for name, body in view_definitions(layout).items():
        con.execute(f'CREATE VIEW "{name}" AS {body}')
    return con
