"""Where lineup keeps its data, resolved from the environment with documented defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"


def default_home() -> Path:
    return Path(os.environ.get("LINEUP_HOME", "./data")).expanduser().resolve()


def is_url(value) -> bool:
    """An object-store location (s3://bucket/prefix, gs://..., memory://...), not a local path."""
    text = str(value)
    return "://" in text and not text.startswith("file://")


def as_path(value):
    """A local path as a resolved ``Path``; a URL as a ``upath.UPath`` (pathlib's API over fsspec: s3 through
    s3fs, with the endpoint and credentials from the standard AWS variables)."""
    if is_url(value):
        from upath import UPath

        return UPath(str(value))
    text = str(value)
    return Path(text.removeprefix("file://")).expanduser().resolve()


def default_input():
    value = os.environ.get("LINEUP_INPUT")
    return as_path(value) if value else None


def default_store(home: Path | None = None):
    """Where tables and datasets live: $LINEUP_STORE (a folder or s3://bucket/prefix), else LINEUP_HOME."""
    value = os.environ.get("LINEUP_STORE")
    return as_path(value) if value else (home or default_home())


def default_layout() -> Layout:
    home = default_home()
    return Layout(home, default_store(home))


@dataclass(frozen=True)
class Layout:
    """Where lineup's data lives.

    Under the store (LINEUP_STORE; default LINEUP_HOME; a local folder or an s3:// prefix):
    tables/<name>/<partition>.parquet   partitioned tables (one file per input partition)
    tables/<name>.parquet               whole-collection tables
    tables/identities.ivf.npz           the IVF cells an incremental identity refresh searches through
    partitions/<key>.json               registered input partitions (what each one holds)
    datasets/<name>/<version>/          WebDataset shards and their manifest
    Always local, under LINEUP_HOME:
    lineup.duckdb                       the catalog: views over the store's Parquet files
    dagster/, models/, removals/        the Dagster instance, trained models, removal requests
    cache/                              digests of input files keyed by path, size and mtime (never data)
    """

    home: Path
    store: object = None  # None: the home folder; else a Path or a upath.UPath (see default_store)

    @property
    def root(self):
        return self.home if self.store is None else self.store

    @property
    def remote(self) -> bool:
        """Tables and datasets live in an object store (no rename, no local file paths)."""
        return self.store is not None and is_url(self.store)

    @property
    def tables(self):
        return self.root / "tables"

    @property
    def partitions(self):
        return self.root / "partitions"

    @property
    def datasets(self):
        return self.root / "datasets"

    @property
    def staging(self) -> Path:
        """Local scratch space where a dataset version for a remote store is built and checked before
        it is uploaded (pipeline/datasets.py)."""
        return self.home / "staging"

    @property
    def catalog(self) -> Path:
        return self.home / "lineup.duckdb"

    @property
    def multiid_guard_cache(self) -> Path:
        """The copy-paste guard's decisions kept across multi-identity builds (pipeline/multiid/guard_cache.py):
        local, under the home, and purged with a removal."""
        return self.home / "cache" / "multiid_guard.parquet"

    def table_dir(self, name: str):
        return self.tables / name

    def partition_file(self, table: str, partition_key: str):
        return self.tables / table / f"{partition_key}.parquet"

    def table_file(self, table: str):
        return self.tables / f"{table}.parquet"
