"""Materialize the whole asset graph from the command line (what `make run` and `make demo` call).

It registers new input partitions exactly as the sensor does, runs the per-partition job for
each partition not built yet, then the whole-collection assets, all on a persistent Dagster
instance under $LINEUP_HOME/dagster, so the runs show up in `make ui` afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # the UI keeps the full event log


def _social_input(settings) -> bool:
    try:
        return settings is not None and settings.social_path.exists()
    except Exception:  # no input configured at all
        return False


def _trainable(layout):
    """The training assets whose dataset has a published version."""
    import dagster as dg

    from pipeline.datasets import latest_version

    keys = []
    if latest_version(layout, "social"):
        keys += [dg.AssetKey("dpo_lora"), dg.AssetKey("social_reward_model")]
    if latest_version(layout, "multiid"):
        keys.append(dg.AssetKey("identity_adapter"))
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m assets.run", description=__doc__)
    ap.add_argument("--input", help="what to ingest (default: $LINEUP_INPUT)")
    ap.add_argument("--home", help="data root (default: $LINEUP_HOME or ./data)")
    ap.add_argument("--rebuild", action="store_true", help="re-run every partition, not only new ones")
    ap.add_argument("--no-training", action="store_true", help="build the datasets but do not train")
    args = ap.parse_args(argv)
    if args.input:
        os.environ["LINEUP_INPUT"] = str(Path(args.input).resolve())
    if args.home:
        os.environ["LINEUP_HOME"] = str(Path(args.home).resolve())
    if not os.environ.get("LINEUP_INPUT"):
        print("error: nothing to ingest: set LINEUP_INPUT or pass --input DIR", file=sys.stderr)
        return 2
    from pipeline.config import default_home

    home = default_home()
    from assets.instance import ensure_dagster_home

    ensure_dagster_home(home)

    import dagster as dg

    from assets.definitions import COLLECTION_JOBS, defs
    from assets.partitions import input_partitions
    from pipeline.config import Layout
    from pipeline.sources import load_registry, register_new_inputs

    layout = Layout(home)
    input_root = Path(os.environ["LINEUP_INPUT"])
    t0 = time.perf_counter()
    new = register_new_inputs(input_root, layout.partitions)
    specs = [s for s in load_registry(layout.partitions) if Path(s.root) == input_root.resolve()]
    instance = dg.DagsterInstance.get()
    known = set(instance.get_dynamic_partitions(input_partitions.name))
    missing = [s.key for s in load_registry(layout.partitions) if s.key not in known]
    if missing:
        instance.add_dynamic_partitions(input_partitions.name, missing)
    print(f"lineup: {len(specs)} input partitions under {input_root} ({len(new)} new); data in {home}")

    ingest_job = defs.resolve_job_def("ingest_job")
    todo = [s.key for s in specs if args.rebuild or not layout.partition_file("faces", s.key).exists()]
    failed = []
    for i, key in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] partition {key}", flush=True)
        result = ingest_job.execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False, run_config=QUIET
        )
        if not result.success:
            failed.append(key)
    settings = defs.resources["lineup"] if hasattr(defs, "resources") else None
    for name in COLLECTION_JOBS:
        if name == "social_job" and not _social_input(settings):
            print("no social input (LINEUP_SOCIAL or <input>/social): social_job skipped")
            continue
        if name == "training_job" and args.no_training:
            print("training_job skipped (--no-training)")
            continue
        job = defs.resolve_job_def(name)
        selection = None
        if name == "training_job":
            selection = _trainable(layout)
            if not selection:
                print("no published dataset to train on: training_job skipped")
                continue
        print(f"running {name}" + (f" ({', '.join(k.to_user_string() for k in selection)})" if selection else ""), flush=True)
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET, asset_selection=selection)
        if not result.success:
            failed.append(name)
    from assets.summary import print_summary

    print_summary(layout, time.perf_counter() - t0)
    if failed:
        print(f"FAILED: {failed} (see `make ui` for the run logs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
