"""Where lineup keeps its data, resolved from the environment with documented defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"


def default_home() -> Path:
    return Path(os.environ.get("LINEUP_HOME", "./data")).expanduser().resolve()


def default_input() -> Path | None:
    value = os.environ.get("LINEUP_INPUT")
    return Path(value).expanduser().resolve() if value else None


@dataclass(frozen=True)
class Layout:
    """The on-disk layout under LINEUP_HOME.

    tables/<name>/<partition>.parquet   partitioned tables (one file per input partition)
    tables/<name>.parquet               whole-collection tables
    partitions/<key>.json               registered input partitions (what each one holds)
    datasets/<name>/<version>/          WebDataset shards and their manifest
    lineup.duckdb                       the catalog: views over the Parquet files
    """

    home: Path

    @property
    def tables(self) -> Path:
        return self.home / "tables"

    @property
    def partitions(self) -> Path:
        return self.home / "partitions"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def catalog(self) -> Path:
        return self.home / "lineup.duckdb"

    def table_dir(self, name: str) -> Path:
        return self.tables / name

    def partition_file(self, table: str, partition_key: str) -> Path:
        return self.tables / table / f"{partition_key}.parquet"

    def table_file(self, table: str) -> Path:
        return self.tables / f"{table}.parquet"
