"""The Dagster instance that `make run`, `make demo` and `make ui` share: $LINEUP_HOME/dagster."""

import fcntl
import os
from pathlib import Path

# one training at a time per GPU: every training asset takes a slot in the "gpu" pool
DAGSTER_YAML = """telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""


def ensure_dagster_home(home: Path | None = None) -> Path:
    from pipeline.config import default_home

    path = Path(os.environ.get("DAGSTER_HOME") or (home or default_home()) / "dagster")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(path)
    ready = path / ".initialised"
    if ready.exists():
        return path
    # two processes starting on a new home would both create the storage's tables, and one dies with
    # `table ... already exists` (issue 21): the first creates the instance under the lock, the other waits
    with open(path / ".init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not ready.exists():
                cfg = path / "dagster.yaml"
                if not cfg.exists():
                    tmp = cfg.with_suffix(".yaml.tmp")
                    tmp.write_text(DAGSTER_YAML)
                    tmp.replace(cfg)
                from dagster import DagsterInstance

                with DagsterInstance.from_config(str(path)) as instance:
                    instance.get_runs(limit=1)  # storage created and migrated
                ready.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


if __name__ == "__main__":
    print(ensure_dagster_home())
