"""The Ray engine (``LINEUP_ENGINE=ray``): the per-image stages as Ray Data jobs.

The unit of work is the same chunk of rows the in-process engine uses (pipeline/engine.py), and the
work on it is the same two pipeline functions, split where the data changes hands:

    chunks (blocks) --map: decode tasks (CPU)--> decoded chunks --map_batches: model actor pool--> results

- decoding runs in Ray tasks, separate from inference, so the model actors never wait on JPEG decoding;
- the model runs in an actor pool (``ActorPoolStrategy``): each actor builds the model once; CPU actors by
  default, ``num_gpus`` per actor where the cluster has GPUs;
- results come back to the driver in chunk order and are assembled by the same code as in-process, so
  both engines write identical Parquet tables (tests/test_ray_engine.py).

Ray starts locally on demand (``ray.init()``: a one-machine cluster in this process's lifetime);
``RAY_ADDRESS`` points at an existing cluster (``ray://head:10001`` or ``auto``). The driver is the
process that calls :func:`run_chunks` (a Dagster step), so Dagster sees its logs, failures and the
metadata it records. Ray is an optional dependency: ``pip install -e .[ray]``.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

DECODE_TASK_CPUS = 0.5
RAY_MISSING = "LINEUP_ENGINE=ray needs Ray: pip install -e '.[ray]' (ray[data] 2.x)"


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def ensure_ray(num_cpus: int | None = None) -> dict:
    """Connect to ``RAY_ADDRESS`` or start a local Ray once per process; returns the cluster's resources."""
    if not ray_available():
        raise RuntimeError(RAY_MISSING)
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        kwargs: dict = {"ignore_reinit_error": True, "logging_level": "WARNING", "log_to_driver": False}
        if address is None:
            # a local cluster: no dashboard, nothing listening beyond this machine, our code importable
            from pipeline.config import REPO_ROOT

            # one logical CPU more than the cores: a decode task can run beside one CPU actor per core
            from pipeline.engine import available_cores

            kwargs.update(include_dashboard=False, num_cpus=num_cpus or available_cores() + 1,
                          runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}})
        ray.init(address=address, **kwargs)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True
    return dict(ray.cluster_resources())


@dataclass
class RayJobStats:
    """What a Ray job did, for the asset's metadata."""

    stage: str
    chunks: int = 0
    items: int = 0
    actors: int = 0
    gpus_per_actor: float = 0.0
    decode_tasks: int = 0
    failures: list[str] = field(default_factory=list)  # chunks whose work raised, with the error
    seconds: float = 0.0
    cluster: dict = field(default_factory=dict)
    ray_stats: str = ""

    def metadata(self) -> dict:
        return {
            "engine": "ray",
            "ray_stage": self.stage,
            "ray_chunks": self.chunks,
            "ray_actors": self.actors,
            "ray_gpus_per_actor": self.gpus_per_actor,
            "ray_decode_tasks": self.decode_tasks,
            "ray_failures": len(self.failures),
            "ray_seconds": round(self.seconds, 3),
            "ray_items_per_s": round(self.items / self.seconds, 2) if self.seconds else 0.0,
            "ray_cluster_cpus": float(self.cluster.get("CPU", 0)),
            "ray_cluster_gpus": float(self.cluster.get("GPU", 0)),
        }


def _decode_row(decode: Callable) -> Callable:
    def run(row: dict) -> dict:
        chunk = pickle.loads(row["payload"])
        try:
            return {"i": row["i"], "payload": pickle.dumps(decode(chunk)), "error": ""}
        except Exception:  # noqa: BLE001 - reported per chunk, the job goes on
            return {"i": row["i"], "payload": b"", "error": traceback.format_exc(limit=5)}

    return run


class _ModelActor:
    """One model per actor; every batch of decoded chunks goes through ``analyze(model, chunk)``."""

    def __init__(self, factory: Callable, args: tuple, kwargs: dict, analyze: Callable, threads: int = 1):
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # pragma: no cover
            pass
        self.model = factory(*args, **kwargs)
        self.analyze = analyze

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out, errors = [], []
        for payload, error in zip(batch["payload"], batch["error"]):
            if error:
                out.append(b"")
                errors.append(error)
                continue
            try:
                out.append(pickle.dumps(self.analyze(self.model, pickle.loads(payload))))
                errors.append("")
            except Exception:  # noqa: BLE001 - reported per chunk
                out.append(b"")
                errors.append(traceback.format_exc(limit=5))
        return {"i": batch["i"], "payload": np.array(out, dtype=object), "error": np.array(errors, dtype=object)}


def chunk_runner(stage: str, decode: Callable | None, analyze: Callable, factory: Callable | None = None,
                 factory_args: tuple = (), factory_kwargs: dict | None = None, actors: int = 2,
                 gpus_per_actor: float | None = None) -> Callable:
    """A ``chunk_runner`` for a stage's partition function: ``runner(chunks)`` runs :func:`run_chunks` on
    chunks of (rows, ...) and keeps the job's stats in ``runner.stats``."""

    def runner(chunks):
        results, runner.stats = run_chunks(stage, chunks, decode=decode, analyze=analyze, factory=factory,
                                           factory_args=factory_args, factory_kwargs=factory_kwargs, actors=actors,
                                           gpus_per_actor=gpus_per_actor, items_of=lambda c: len(c[0]))
        return results

    runner.stats = None
    return runner


def run_chunks(
    stage: str,
    chunks: list,
    decode: Callable | None,
    analyze: Callable,
    factory: Callable | None,
    factory_args: tuple = (),
    factory_kwargs: dict | None = None,
    actors: int = 2,
    gpus_per_actor: float | None = None,
    items_of: Callable = len,
) -> tuple[list, RayJobStats]:
    """``analyze(model, decode(chunk))`` for every chunk on Ray, results in chunk order.

    ``decode`` runs in Ray tasks (None: the chunk goes straight to the actors), ``analyze`` in a pool
    of ``actors`` actors each holding ``factory(*factory_args, **factory_kwargs)``; with no ``factory``
    (no model) ``analyze(None, chunk)`` runs in the tasks. ``gpus_per_actor``
    None = 1 when the cluster has GPUs, else 0 (CPU actors, one CPU each). A chunk whose work raised is
    listed in the stats' failures and makes this function raise after the job, naming them all."""
    cluster = ensure_ray()
    import ray

    stats = RayJobStats(stage, chunks=len(chunks), cluster=cluster)
    stats.items = sum(items_of(c) for c in chunks)
    if not chunks:
        return [], stats
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    stats.actors = max(1, min(int(actors), len(chunks)))
    stats.gpus_per_actor = gpus_per_actor
    t0 = time.perf_counter()
    items = [{"i": i, "payload": pickle.dumps(c), "error": ""} for i, c in enumerate(chunks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if factory is None:  # no model: the whole work is one Ray task per chunk
        ds = ds.map(_decode_row(lambda c: analyze(None, c)), num_cpus=DECODE_TASK_CPUS)
        stats.decode_tasks, stats.actors = len(chunks), 0
    else:
        if decode is not None:
            # half a CPU per decode task. The CPU request differing from the actors' also keeps Ray Data from
            # fusing the decoding into the actors (it fuses a task map into the next actor map when their
            # remote args match), so decoding stays in tasks of its own.
            ds = ds.map(_decode_row(decode), num_cpus=DECODE_TASK_CPUS)
            stats.decode_tasks = len(chunks)
        ds = ds.map_batches(
            _ModelActor,
            fn_constructor_args=(factory, tuple(factory_args), dict(factory_kwargs or {}), analyze),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=stats.actors),
            num_cpus=0 if gpus_per_actor else 1,
            num_gpus=gpus_per_actor or None,
        )
    rows = ds.take_all()
    stats.seconds = time.perf_counter() - t0
    try:
        stats.ray_stats = ds.stats()
    except Exception:  # noqa: BLE001 - stats are informative only
        stats.ray_stats = ""
    rows.sort(key=lambda r: int(r["i"]))
    if [int(r["i"]) for r in rows] != list(range(len(chunks))):
        raise RuntimeError(f"ray {stage}: {len(rows)} results for {len(chunks)} chunks")
    results = []
    for r in rows:
        if r["error"]:
            stats.failures.append(f"chunk {int(r['i'])}: {str(r['error']).strip().splitlines()[-1]}")
            results.append(None)
        else:
            results.append(pickle.loads(r["payload"]))
    if stats.failures:
        raise RayStageError(stats)
    return results, stats


class RayStageError(RuntimeError):
    def __init__(self, stats: RayJobStats):
        self.stats = stats
        super().__init__(f"ray {stats.stage}: {len(stats.failures)} of {stats.chunks} chunks failed: "
                         + "; ".join(stats.failures[:5]))
