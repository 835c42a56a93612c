"""Materialize the whole asset graph from the command line (what `make run` and `make demo` call).

It registers new input partitions exactly as the sensor does, runs the per-partition job for each
partition whose committed unit is missing, failed its checks or is stale (partition_plan), then the
whole-collection assets, the social preference pairs and the trainers, all on the persistent Dagster
instance under $LINEUP_HOME/dagster. Each finished run is given the code-location origin of
workspace.yaml (the one the UI loads), so it shows on the Overview timeline and the job pages like a
run launched from the UI. The LINEUP_* settings of the run are saved in $LINEUP_HOME/run_settings.json,
which `make ui` loads.

Nothing to build is not a failure: a collection without faces builds empty dataset versions, a log
without photos builds only the social pairs, a trainer without data skips. The exit status is 1 only
when something that should have been built failed; the closing summary lists what was built,
skipped (and why) and failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # the UI keeps the full event log
SKIP_KEY = "skipped_because"  # assets that decide not to build say why in an observation with this key


def workspace_job_origin(job_name: str, workspace: Path | None = None):
    """The origin the UI gives a run of ``job_name``: workspace.yaml's code location, its repository."""
    from dagster._core.remote_origin import RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    from pipeline.config import REPO_ROOT

    (location,) = WorkspaceFileTarget([str(workspace or REPO_ROOT / "workspace.yaml")]).create_origins()
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job_name)


def give_workspace_origin(instance, run_id: str, job_name: str) -> None:
    """An in-process run has no code-location origin, and the Overview timeline (which groups runs by
    it) leaves it out. Give it the workspace's, the way `dagster run migrate-repository` does."""
    run = instance.get_run_by_id(run_id)
    if run is not None and run.remote_job_origin is None:
        instance.run_storage.replace_job_origin(run, workspace_job_origin(job_name))


@dataclass
class Outcome:
    built: dict[str, str] = field(default_factory=dict)  # asset -> short note
    skipped: dict[str, str] = field(default_factory=dict)  # asset or job -> reason
    failed: dict[str, str] = field(default_factory=dict)  # step or job -> error

    def record(self, result, job_name: str) -> None:
        """What one in-process run built, skipped and failed, from its events."""
        for ev in result.get_asset_materialization_events():
            mat = ev.event_specific_data.materialization
            key = mat.asset_key.to_user_string()
            part = f"[{mat.partition}]" if mat.partition else ""
            note = str(mat.metadata.get("version").value) if "version" in mat.metadata else ""
            empty = mat.metadata.get("empty_because")
            if empty is not None and empty.value:  # built, but holds nothing: say why
                note = f"{note}  (empty: {empty.value})".strip()
            self.built[key + part] = note
        for ev in result.get_asset_observation_events():
            obs = ev.event_specific_data.asset_observation
            if SKIP_KEY in obs.metadata:
                self.skipped[obs.asset_key.to_user_string()] = str(obs.metadata[SKIP_KEY].value)
        for ev in result.get_step_failure_events():
            err = ev.event_specific_data.error
            while err is not None and err.cause is not None and "DagsterExecutionStepExecutionError" in (err.cls_name or ""):
                err = err.cause  # the user code's own error, not dagster's wrapper
            msg = (err.message or "").strip().splitlines()[0][:300] if err else "failed"
            self.failed[f"{job_name}:{ev.step_key}"] = msg
        if not result.success and not result.get_step_failure_events():
            self.failed[job_name] = "run failed (see `make ui`)"
        for ev in result.get_step_skipped_events():  # a step skipped because an upstream step failed
            self.skipped.setdefault(ev.step_key, "an upstream step failed or a blocking check did not pass")


def _social_path() -> Path | None:
    from pipeline.config import as_path

    if os.environ.get("LINEUP_SOCIAL"):
        return as_path(os.environ["LINEUP_SOCIAL"])
    if os.environ.get("LINEUP_INPUT"):
        return as_path(os.environ["LINEUP_INPUT"]) / "social"
    return None


def partition_plan(layout, keys: list[str], backend, rebuild: bool = False) -> dict[str, tuple[str, str]]:
    """key -> (what to run, why) for the partitions that need a run: the whole ingest job when the face
    unit is missing (never run, or killed between its files), failed its checks, or is stale (another
    input or face model); only face_expressions when that unit alone is missing, failed or stale.
    Committed, current partitions are left alone (pipeline/commits.py)."""
    from pipeline.commits import PASSED, read_marker, unit_state
    from pipeline.faces.stage import face_unit_inputs

    plan = {}
    for k in keys:
        if rebuild:
            plan[k] = ("all", "--rebuild")
            continue
        state = unit_state(layout, "faces", k, face_unit_inputs(layout, k, backend))
        if state != PASSED:
            plan[k] = ("all", f"faces {state}")
            continue
        faces_sha = read_marker(layout, "faces", k)["files"]["faces"]["sha256"]
        expr = read_marker(layout, "face_expressions", k)
        if expr is None or expr.get("status") != PASSED:
            plan[k] = ("face_expressions", f"face_expressions {'missing' if expr is None else expr.get('status')}")
        elif expr.get("inputs", {}).get("faces_sha256") != faces_sha:
            plan[k] = ("face_expressions", "face_expressions stale (its faces were re-run)")
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m assets.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="what to ingest (default: $LINEUP_INPUT)")
    ap.add_argument("--home", help="data root (default: $LINEUP_HOME or ./data)")
    ap.add_argument("--rebuild", action="store_true", help="re-run every partition, not only new ones")
    ap.add_argument("--no-training", action="store_true", help="build the datasets but do not train")
    args = ap.parse_args(argv)
    from pipeline.config import as_path, is_url

    if args.input:
        os.environ["LINEUP_INPUT"] = args.input if is_url(args.input) else str(Path(args.input).resolve())
    if args.home:
        os.environ["LINEUP_HOME"] = str(Path(args.home).resolve())
    social = _social_path()
    if not os.environ.get("LINEUP_INPUT") and not os.environ.get("LINEUP_SOCIAL"):
        print("error: nothing to do: set LINEUP_INPUT (photos, tar shards, Parquet manifests, optional social/) "
              "and/or LINEUP_SOCIAL (an interaction log), or pass --input DIR", file=sys.stderr)
        return 2
    input_root = as_path(os.environ["LINEUP_INPUT"]) if os.environ.get("LINEUP_INPUT") else None
    if input_root is not None and not input_root.is_dir():
        print(f"error: LINEUP_INPUT={input_root} is not a folder", file=sys.stderr)
        return 2

    from pipeline.config import REPO_ROOT, default_home

    home = default_home()
    from assets.instance import ensure_dagster_home

    ensure_dagster_home(home)
    if (REPO_ROOT / "data").is_dir() or home.is_relative_to(REPO_ROOT):
        (REPO_ROOT / "data").mkdir(exist_ok=True)
        (REPO_ROOT / "data" / ".last_home").write_text(str(home))  # `make ui` opens this home by default
    from pipeline.run_settings import save_run_settings

    save_run_settings(home)  # what `make ui` needs to see this run's input, social log and flags

    import dagster as dg

    from assets.definitions import defs
    from assets.partitions import input_partitions
    from pipeline.config import Layout, default_store
    from pipeline.sources import load_registry, register_new_inputs

    store = default_store(home)
    layout = Layout(home, None if store == home else store)
    t0 = time.perf_counter()
    out = Outcome()
    instance = dg.DagsterInstance.get()
    specs = []
    if input_root is not None:
        new = register_new_inputs(input_root, layout.partitions)
        specs = [s for s in load_registry(layout.partitions) if str(as_path(s.root)) == str(input_root)]
        known = set(instance.get_dynamic_partitions(input_partitions.name))
        missing = [s.key for s in load_registry(layout.partitions) if s.key not in known]
        if missing:
            instance.add_dynamic_partitions(input_partitions.name, missing)
        print(f"lineup: {len(specs)} input partitions under {input_root} ({len(new)} new); data in {layout.root}")
    else:
        print(f"lineup: no LINEUP_INPUT, social log only; data in {home}")

    ingest_job = defs.resolve_job_def("ingest_job")
    keys = [s.key for s in specs]
    if keys:
        from assets.faces import face_backend

        plan = partition_plan(layout, keys, face_backend(defs.resources["lineup"]), args.rebuild)
    else:
        plan = {}
    for i, (key, (what, why)) in enumerate(plan.items(), 1):
        print(f"[{i}/{len(plan)}] partition {key} ({why})", flush=True)
        selection = None if what == "all" else [dg.AssetKey(what)]
        result = ingest_job.execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False, run_config=QUIET, asset_selection=selection,
        )
        give_workspace_origin(instance, result.run_id, "ingest_job")
        out.record(result, f"ingest_job[{key}]")
    from pipeline.commits import failed_units

    # a partition whose checks failed is reported on every run until it passes or its input changes
    for stage in ("images", "faces"):
        for key, reasons in failed_units(layout, stage, keys).items():
            out.failed[f"partition {key}: {stage} checks"] = "; ".join(reasons)[:300] or "failed"

    def run_job(name: str, selection=None):
        job = defs.resolve_job_def(name)
        label = f" ({', '.join(k.to_user_string() for k in selection)})" if selection else ""
        print(f"running {name}{label}", flush=True)
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET,
                                        asset_selection=selection)
        give_workspace_origin(instance, result.run_id, name)
        out.record(result, name)

    if load_registry(layout.partitions):
        run_job("collection_job")
    else:
        out.skipped["collection_job"] = "no photos: LINEUP_INPUT holds no images, tar shards or manifests"
    if social is not None and social.is_dir():
        run_job("social_job")
    else:
        out.skipped["social_job"] = f"no interaction log at {social} (set LINEUP_SOCIAL)"
    if args.no_training:
        out.skipped["training_job"] = "--no-training"
    else:
        run_job("training_job")

    from assets.summary import print_summary

    print_summary(layout, time.perf_counter() - t0, out)
    return 1 if out.failed else 0


if __name__ == "__main__":
    sys.exit(main())
