"""The DuckDB catalog: one view per table, over the Parquet files under LINEUP_HOME/tables.

A table stored as tables/<name>/<partition>.parquet or tables/<name>.parquet becomes the view
<name>; every tables/rejects_<stage>[...] becomes part of the single `rejects` view. A view
whose shape needs more than `SELECT *` has its query in sql/<name>.sql, with {files} standing
for the list of its Parquet files and {tables} for the tables folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.config import SQL_DIR, Layout

REJECTS_PREFIX = "rejects_"


def load_sql(name: str, **params: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no SQL file {path}")
    text = path.read_text()
    return text.format(**params) if params else text


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _file_list(files: list[Path]) -> str:
    return "[" + ", ".join(_sql_str(str(f)) for f in files) + "]"


def table_files(layout: Layout) -> dict[str, list[Path]]:
    """view name -> Parquet files, for every table on disk."""
    out: dict[str, list[Path]] = {}
    if not layout.tables.exists():
        return out
    for entry in sorted(layout.tables.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(entry.glob("*.parquet"))
            name = entry.name
        elif entry.suffix == ".parquet":
            files = [entry]
            name = entry.stem
        else:
            continue
        if not files:
            continue
        if name.startswith(REJECTS_PREFIX):
            out.setdefault("rejects", []).extend(files)
        else:
            out.setdefault(name, []).extend(files)
    return out


def connect(layout: Layout, read_only: bool = False, retries: int = 50) -> duckdb.DuckDBPyConnection:
    """Open the catalog; another process may hold the write lock for a moment, so retry."""
    layout.home.mkdir(parents=True, exist_ok=True)
    delay = 0.05
    for attempt in range(retries):
        try:
            return duckdb.connect(str(layout.catalog), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or attempt == retries - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
    raise RuntimeError("unreachable")


def refresh_catalog(layout: Layout) -> list[str]:
    """(Re)create a view for every table on disk; returns the view names."""
    files = table_files(layout)
    if not files:
        return []
    con = connect(layout)
    try:
        existing = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        for name, fs in files.items():
            if (SQL_DIR / f"{name}.sql").exists():
                body = load_sql(name, files=_file_list(fs), tables=_sql_str(str(layout.tables)))
            else:
                body = f"SELECT * FROM read_parquet({_file_list(fs)}, union_by_name = true)"
            con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {body}')
        for stale in existing - set(files):
            con.execute(f'DROP VIEW IF EXISTS "{stale}"')
    finally:
        con.close()
    return sorted(files)


def query(layout: Layout, sql: str, params: list | None = None) -> pa.Table:
    con = connect(layout, read_only=True)
    try:
        return con.sql(sql, params=params or None).to_arrow_table()
    finally:
        con.close()
