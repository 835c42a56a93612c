"""The settings a run was made with, saved beside its home so that `make ui` shows that run as it was.

`make run` and `make demo` set LINEUP_INPUT, the social log, the smoke-training flag (...) only for
their own command. Without them the UI's sensors and launches would not know where the input is.
``save_run_settings`` writes every LINEUP_* variable of the run to ``$LINEUP_HOME/run_settings.json``;
``load_run_settings`` reads them back, and `make ui` (assets/serve.py) puts them into its environment
unless the shell sets them itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

FILE_NAME = "run_settings.json"
# not settings of the run: where it lives (the file's own folder), a one-off action, the UI's port
NOT_SAVED = frozenset({"LINEUP_HOME", "LINEUP_PURGE", "LINEUP_UI_PORT"})


def settings_file(home: Path) -> Path:
    return Path(home) / FILE_NAME


def run_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The LINEUP_* variables of an environment that decide what a run reads and builds."""
    return {k: v for k, v in sorted(environ.items()) if k.startswith("LINEUP_") and k not in NOT_SAVED}


def save_run_settings(home: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Write the run's settings beside its home (atomically: a kill leaves the previous file)."""
    path = settings_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run_settings(os.environ if environ is None else environ), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_run_settings(home: Path) -> dict[str, str]:
    """The settings the last run in ``home`` saved; {} when none was saved. A damaged file is an error."""
    path = settings_file(home)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or run `make run` again") from e
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path} must map LINEUP_* names to strings")
    return {k: v for k, v in data.items() if k.startswith("LINEUP_") and k not in NOT_SAVED}


def apply_run_settings(home: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Put the saved settings into ``environ`` (default os.environ) where it does not set them itself.
    Returns what was applied."""
    env = os.environ if environ is None else environ
    applied = {k: v for k, v in load_run_settings(home).items() if k not in env}
    env.update(applied)
    return applied
