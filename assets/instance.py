"""The Dagster instance that `make run`, `make demo` and `make ui` share: $LINEUP_HOME/dagster."""

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
    cfg = path / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(path)
    return path


if __name__ == "__main__":
    print(ensure_dagster_home())
