"""How the per-image stages are scheduled: the in-process engine's worker processes, and the engine choice.

The stages themselves (pipeline/faces/stage.py, ingest.py, ...) are plain functions over chunks of
rows; this module only decides where a chunk runs. Two engines run the same functions:

- ``inprocess`` (default): the asset's own process, plus ``workers`` spawned worker processes that
  each build the stage's model once and then take chunks (decode + inference in the worker, so every
  core decodes and infers). Results come back in input order, so the output equals the serial
  path's (tests/test_engine.py).
- ``ray`` (``LINEUP_ENGINE=ray``): Ray actor pools and tasks, see :mod:`pipeline.ray_engine`.

Worker pools are kept for the life of the process (one per model configuration), so a run over many
partitions pays the start-up (interpreter, torch, model weights: a few seconds) once.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

ENGINES = ("inprocess", "ray")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(requested: int | None) -> int:
    """0 or None = every available core; otherwise the number asked for (at least 1)."""
    if not requested:
        env = os.environ.get("LINEUP_ENGINE_WORKERS", "").strip()
        requested = int(env) if env else 0
    return available_cores() if requested <= 0 else int(requested)


def engine_name(value: str | None = None) -> str:
    """The engine to run per-image stages on: ``value``, else $LINEUP_ENGINE, else ``inprocess``."""
    name = (value or os.environ.get("LINEUP_ENGINE") or "inprocess").strip().lower()
    if name in ("", "local", "in-process", "inprocess"):
        return "inprocess"
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)} (LINEUP_ENGINE)")
    return name


# --------------------------------------------------------------------------------- worker processes

_WORKER_MODEL = None
_POOLS: dict[tuple, ProcessPoolExecutor] = {}


def exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """In a worker process: end it once ``parent`` (its parent's pid) is gone. A pool's idle workers wait on
    their task queue, whose writing end they hold too, so a parent killed outright (kill -9, out of memory)
    left them waiting forever, each holding its share of the parent's memory (seen with forked and spawned
    pools alike). A daemon thread looks every ``every_s``; a pid reused since cannot fool it, since the
    process would have been given another parent."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(factory: Callable, args: tuple, kwargs: dict, parent: int | None = None) -> None:
    """Build the stage's model once per worker. One intra-op thread each: the workers are the parallelism
    (two torch threads per process on two cores were slower than one, see docs/benchmarks.md)."""
    global _WORKER_MODEL
    if parent is not None:
        exit_with_parent(parent)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_MODEL = factory(*args, **kwargs)
    # only a model that brought torch in gets its threads set: importing torch for a stage that never uses
    # it (ingestion) cost about 2 CPU-s per worker
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _run_chunk(fn: Callable, chunk):
    return fn(_WORKER_MODEL, chunk)


def _pool(factory: Callable, args: tuple, kwargs: dict, workers: int) -> ProcessPoolExecutor:
    key = (factory.__module__, factory.__qualname__, args, tuple(sorted(kwargs.items())), workers)
    pool = _POOLS.get(key)
    if pool is None:
        # spawn, not fork: the parent may hold torch/OpenMP threads and open DuckDB handles
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(factory, args, kwargs, os.getpid()))
        _POOLS[key] = pool
    return pool


def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


atexit.register(shutdown_pools)


def map_chunks(
    fn: Callable,
    chunks: Iterable,
    *,
    local_model=None,
    workers: int = 1,
    factory: Callable | None = None,
    factory_args: tuple = (),
    factory_kwargs: dict | None = None,
) -> Iterator:
    """``fn(model, chunk)`` for every chunk, results in chunk order.

    With ``workers`` <= 1 (or no ``factory`` to build the model in a worker, or a single chunk) every
    chunk runs here on ``local_model``. Otherwise the chunks go to ``workers`` spawned processes, each
    holding ``factory(*factory_args, **factory_kwargs)``; ``fn`` and the chunks must pickle."""
    chunks = list(chunks)
    if workers <= 1 or factory is None or len(chunks) < 2:
        for c in chunks:
            yield fn(local_model, c)
        return
    pool = _pool(factory, tuple(factory_args), dict(factory_kwargs or {}), workers)
    try:
        futures = [pool.submit(_run_chunk, fn, c) for c in chunks]
        for f in futures:
            yield f.result()
    except BrokenProcessPool as e:
        shutdown_pools()  # a dead worker (killed, out of memory) breaks the pool: the next call starts afresh
        raise RuntimeError(f"an engine worker process died ({e}); rerun, or set engine_workers=1") from e


# ------------------------------------------------------------------------------ decoding ahead on threads


def prefetched(fn: Callable, items: Iterable, ahead: int = 1) -> Iterator:
    """Futures of ``fn(item)`` in item order, computed on threads at most ``ahead`` items beyond the one
    the caller is using: while it works on item i (a model batch), items i+1..i+ahead are prepared (read and
    decoded), and no more, so memory holds ``ahead + 1`` prepared items at most. ``future.result()``
    raises what ``fn`` raised. Stopping early cancels what was not started."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    todo = iter(list(items))
    pool = ThreadPoolExecutor(max(1, int(ahead)), thread_name_prefix="prefetch")
    try:
        pending = deque(pool.submit(fn, item) for _, item in zip(range(max(1, int(ahead)) + 1), todo))
        while pending:
            current = pending.popleft()
            yield current
            for item in todo:  # the next one starts once the caller is done with this one
                pending.append(pool.submit(fn, item))
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
