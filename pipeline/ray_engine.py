"""The Ray engine (``LINEUP_ENGINE=ray``): the per-image stages on a Ray cluster, local or remote.

The unit of work is the same chunk of rows the in-process engine uses (pipeline/engine.py), and the work on
it is the same pipeline functions, ``analyze(model, decode(chunk))``:

- a chunk holds row *locators* (path or ``s3://`` URL, offset, length), never pixels: the actor that takes
  it reads the bytes from the store and decodes them itself, so decoded RGB never crosses the network and
  no decode task can be starved by actors holding every CPU (the hang of issue 22);
- the model runs in a pool of Ray actors, each building it once. Pools are sized from the *cluster's*
  resources (``LINEUP_ENGINE_WORKERS`` only caps them), live as long as the driver process (a run over many
  partitions loads the models once per actor) and start work as soon as one actor is up; if none comes up
  within ``LINEUP_RAY_START_TIMEOUT`` seconds (the cluster is full) the stage fails saying so;
- stages without a model (ingestion) run as one Ray task per chunk;
- results stream back as chunks finish and are assembled in chunk order by the same code as in-process,
  so both engines write identical tables (tests/test_ray_engine.py, tests/test_ray_cluster.py).

Where Ray runs: without ``RAY_ADDRESS`` a private local cluster (``address="local"``: never a cluster some
earlier ``ray start`` left behind); with ``RAY_ADDRESS`` (``auto``, ``host:6379``, ``ray://head:10001``)
that cluster. The log says which one. Workers get what they need through the job's ``runtime_env``: the
driver's ``AWS_*`` and ``LINEUP_*`` variables (not ``LINEUP_HOME``), this package's code (``py_modules`` on
a remote cluster), and model weights named by local paths in a stage's configuration, shipped through
Ray's object store and unpacked on the worker (:func:`ship_local_paths`). Workers therefore need only the
store (S3) and the Python dependencies, never the driver's disk. Ray is an optional dependency:
``pip install -e .[ray]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("lineup.ray")

RAY_MISSING = "LINEUP_ENGINE=ray needs Ray: pip install -e '.[ray]' (ray 2.x)"
START_TIMEOUT_ENV = "LINEUP_RAY_START_TIMEOUT"  # seconds to wait for the first actor of a pool
STALL_TIMEOUT_ENV = "LINEUP_RAY_STALL_TIMEOUT"  # seconds without any chunk finishing before a stage fails
DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_STALL_TIMEOUT_S = 900.0
GPU_ACTOR_CPUS = 2.0  # CPUs each GPU actor asks for: decoding threads beside the model
GPU_CHUNKS_PER_CALL = 4  # chunks per call to a GPU actor, decoded on threads while the model runs
INFLIGHT_PER_ACTOR = 2  # calls queued per actor, so the next chunk is there when one finishes
# the driver's variables that reach the workers: credentials/endpoint for the store, the stages' settings
WORKER_ENV_PREFIXES = ("AWS_", "LINEUP_", "FSSPEC_")  # the store's endpoint, keys, client settings
DRIVER_ONLY_ENV = ("LINEUP_HOME",)  # a driver-local folder: workers must never see or use it
# Test hook: colon-separated path prefixes the workers refuse to open (an audit hook), proving they read
# only the store and what the job ships them.
FORBID_READS_ENV = "LINEUP_RAY_FORBID_READS"


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


# ----------------------------------------------------------------------------------- joining a cluster

_JOINED: dict = {}  # what ensure_ray connected to: address, local or not, nodes
_JOINED_ENV: dict = {}  # the store's AWS_* variables it connected with (changed ones mean reconnecting)


def worker_runtime_env(local: bool) -> dict:
    """The job's ``runtime_env``: the variables the stages read and, on a remote cluster, this package."""
    from pipeline.config import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES) and k not in DRIVER_ONLY_ENV}
    env["OMP_NUM_THREADS"] = "1"  # the actors are the parallelism
    runtime_env: dict = {"env_vars": env}
    if local:  # same machine: import the code where it is
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    else:  # other machines: Ray uploads the package to the cluster once per content hash
        import pipeline

        runtime_env["py_modules"] = [str(Path(pipeline.__file__).parent)]
    return runtime_env


def ensure_ray(num_cpus: int | None = None) -> dict:
    """Join ``RAY_ADDRESS`` or start a private local cluster, once per process; returns the cluster's
    resources. ``num_cpus`` sizes a local cluster only (default: this process's cores)."""
    if not ray_available():
        raise RuntimeError(RAY_MISSING)
    import ray

    address = os.environ.get("RAY_ADDRESS", "").strip() or None
    runtime_env = worker_runtime_env(local=address is None)
    store_env = {k: v for k, v in runtime_env["env_vars"].items() if k.startswith("AWS_")}
    moved = _JOINED.get("requested") != (address or "local") or _JOINED_ENV != store_env
    if ray.is_initialized() and _JOINED and moved:
        # joined by us with another RAY_ADDRESS or another store (endpoint, keys): the job's runtime_env is
        # fixed at ray.init, so the workers would read with the old one (a changed LINEUP_* setting, such as
        # a driver-side timeout, does not tear down the pools)
        log.info("ray: RAY_ADDRESS or the workers' settings changed since this process joined; reconnecting")
        shutdown()
    if not ray.is_initialized():
        kwargs: dict = {"logging_level": "WARNING", "log_to_driver": False, "runtime_env": runtime_env}
        if address is None:
            from pipeline.engine import available_cores

            # "local", not None: None would join a cluster whose session file an earlier `ray start` left
            kwargs.update(address="local", include_dashboard=False, num_cpus=num_cpus or available_cores())
        else:
            kwargs["address"] = address  # its resources are the cluster's: num_cpus may not be given
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError) as e:
            if address is None:
                raise
            raise RayJoinError(address, e) from e
        _JOINED.clear()
        _JOINED_ENV.clear()
        _JOINED_ENV.update(store_env)  # kept apart from _JOINED: it holds the store's keys, never shown
        _JOINED.update(requested=address or "local", local=address is None, address=_cluster_address(),
                       nodes=sum(1 for n in ray.nodes() if n.get("Alive")))
        line = (f"ray: {'started a private local' if address is None else 'joined the'} cluster at "
                f"{_JOINED['address']} (RAY_ADDRESS={address or 'unset'}): {_JOINED['nodes']} node(s), "
                f"{dict(ray.cluster_resources())}")
        log.info(line)
        if not logging.getLogger().handlers and not log.handlers:  # nobody configured logging: still say it
            print(line, file=sys.stderr, flush=True)
    return dict(ray.cluster_resources())


def _cluster_address() -> str:
    import ray

    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - Ray client mode has no GCS address here
        return os.environ.get("RAY_ADDRESS", "") or "local"


def joined_cluster() -> dict:
    """Where this process's Ray jobs run (empty before :func:`ensure_ray`)."""
    return dict(_JOINED)


def shutdown() -> None:
    """Drop this process's actor pools and disconnect (tests; a process exit does the same)."""
    import ray

    release_pools()
    _SHIPPED.clear()
    _READABLE.clear()
    _JOINED.clear()
    _JOINED_ENV.clear()
    if ray.is_initialized():
        ray.shutdown()


# ------------------------------------------------------------------------------------------ pool sizing


@dataclass(frozen=True)
class PoolPlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    chunks_per_call: int


def plan_pool(cluster: dict, requested: int = 0, gpus_per_actor: float | None = None, chunks: int | None = None) -> PoolPlan:
    """How many actors of what size, from the cluster's resources: as many as the cluster holds, capped by
    ``requested`` (0 = no cap) and by the number of chunks. Reading and decoding happen in the actors, so
    nothing else needs a CPU reserved for it; a cluster of less than one CPU gets one actor of what it has."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        fit = int(gpus // gpus_per_actor)
        if fit < 1:
            raise RuntimeError(f"ray: an actor needs {gpus_per_actor} GPU, the cluster has {gpus}")
        cpus_per_actor = min(GPU_ACTOR_CPUS, cpus / fit) if cpus else 0.0
        per_call = GPU_CHUNKS_PER_CALL
    else:
        if cpus <= 0:
            raise RuntimeError("ray: the cluster has no CPU for the stage's actors")
        cpus_per_actor = 1.0 if cpus >= 1 else cpus
        fit = int(cpus // cpus_per_actor)
        per_call = 1
    actors = fit if requested <= 0 else min(int(requested), fit)
    if chunks is not None:
        actors = min(actors, max(1, -(-chunks // per_call)))
    return PoolPlan(max(1, actors), cpus_per_actor, float(gpus_per_actor), per_call)


# ------------------------------------------------------------------------- weights through the object store

_SHIPPED: dict[tuple, object] = {}  # (path, size, mtime) -> ObjectRef of its bytes, once per process


@dataclass(frozen=True)
class ShippedPath:
    """A driver-local file or folder, carried as bytes in Ray's object store; unpacked on the worker."""

    name: str
    is_dir: bool
    digest: str
    ref: object


def _local_path(value) -> Path | None:
    from pipeline.config import is_url

    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or is_url(value) or not os.path.isabs(value):
        return None
    p = Path(value)
    return p if p.is_file() or p.is_dir() else None


def ship_local_paths(obj):
    """``obj`` (a stage's configuration: dataclasses, dicts, lists, tuples, strings) with every absolute local
    path that exists replaced by a :class:`ShippedPath`, so a worker on another machine gets the weights
    from the object store instead of a path that exists only here."""
    import ray

    p = _local_path(obj)
    if p is not None:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _SHIPPED:
            if p.is_dir():
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tf:
                    tf.add(str(p), arcname=p.name)
                data = buf.getvalue()
            else:
                data = p.read_bytes()
            # the name is part of what is shipped (open_clip names a config by its file name)
            digest = hashlib.sha256(p.name.encode() + b"\0" + data).hexdigest()[:24]
            _SHIPPED[key] = ShippedPath(p.name, p.is_dir(), digest, ray.put(data))
        return _SHIPPED[key]
    return _map_config(obj, ship_local_paths)


def unship_paths(obj):
    """The worker's side of :func:`ship_local_paths`: each ShippedPath written once under a temporary folder
    (named by its content hash) and replaced by the local path there."""
    if isinstance(obj, ShippedPath):
        import tempfile

        import ray

        root = Path(tempfile.gettempdir()) / "lineup-ray-shipped" / obj.digest
        target = root / obj.name
        if not target.exists():
            tmp = root.with_name(f"{obj.digest}.{os.getpid()}.tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            data = ray.get(obj.ref)
            if obj.is_dir:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
                    tf.extractall(tmp, filter="data")  # our own tar; "data" refuses links and traversal anyway
            else:
                (tmp / obj.name).write_bytes(data)
            try:
                tmp.rename(root)  # whole or not at all: another worker may have won the race
            except OSError:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    return _map_config(obj, unship_paths)


def _map_config(obj, fn):
    if isinstance(obj, ShippedPath):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes) if any(changes[k] is not getattr(obj, k) for k in changes) else obj
    if isinstance(obj, dict):
        return {k: fn(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(fn(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------------- the worker's side

_GUARDED = False


def _guard_reads() -> None:
    """In a worker: refuse to open anything under $LINEUP_RAY_FORBID_READS (tests prove isolation with it)."""
    global _GUARDED
    prefixes = tuple(p for p in os.environ.get(FORBID_READS_ENV, "").split(os.pathsep) if p)
    if _GUARDED or not prefixes:
        return

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if os.path.abspath(path).startswith(prefixes):
                raise PermissionError(f"a Ray worker may not read the driver's disk: {path}")

    sys.addaudithook(hook)
    _GUARDED = True


class WorkersCannotRead(RuntimeError):
    """A worker node of the joined cluster cannot open the local paths a job's rows point at."""


_READABLE: set = set()  # (cluster address, node ids, folder) already probed from every node


def locator_paths(chunks: list) -> list[str]:
    """The paths of the rows a per-image stage's chunks hand the workers: every chunk is ``(rows, ...)``,
    a row an input record (``.path``) or an image row (``["path"]``)."""
    out = []
    for chunk in chunks:
        for row in chunk[0] if chunk else ():
            path = row.get("path") if isinstance(row, dict) else getattr(row, "path", None)
            if path:
                out.append(str(path))
    return out


def require_readable(paths, what: str = "the photos", per_call: int = 3) -> None:
    """Fail now, naming the node, the path and the fix, when a node of a joined cluster cannot read the
    local (non-URL) paths a job is about to hand its workers. Without this, on a cluster whose nodes do not
    share this machine's disk, every photo became an "unreadable file" reject (or an unreadable target) and
    the run published empty datasets with exit status 0. A private local cluster shares this disk and is not
    probed; a path is probed by opening it on every node that can run work (one zero-CPU task per node),
    at most ``per_call`` folders a call, each folder once per cluster and set of nodes. Nodes that join
    later are not probed."""
    local = [p for p in dict.fromkeys(paths) if p and "://" not in p]
    if not local or _JOINED.get("local", True):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted((n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)),
                   key=lambda n: n["NodeID"])
    cluster = (_JOINED.get("address"), tuple(n["NodeID"] for n in nodes))
    sample: dict[str, str] = {}
    for p in local:
        folder = os.path.dirname(os.path.abspath(p))
        if (*cluster, folder) not in _READABLE and folder not in sample:
            sample[folder] = p
            if len(sample) >= per_call:
                break
    if not sample or not nodes:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_reads)
    refs = [(n, probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(list(sample.values())))
            for n in nodes]
    timeout = _timeout(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)
    failed = []
    for node, ref in refs:
        try:
            errors = ray.get(ref, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - a node that cannot even run the probe is named with its error
            errors = [("(the probe itself)", f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")]
        failed += [f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]}): {path}: {err}" for path, err in errors]
    if failed:
        raise WorkersCannotRead(
            f"the Ray workers cannot read {what}, which are on this machine's disk ({len(failed)} failed "
            f"{'read' if len(failed) == 1 else 'reads'} of {len(sample)} sampled path(s) on {len(nodes)} node(s)): "
            + "; ".join(failed[:6])
            + ". Each Ray worker reads the photos itself, and the nodes of the cluster at "
            f"{_JOINED.get('address')} do not share this disk. Put the input in the object store "
            "(LINEUP_INPUT=s3://bucket/prefix; the driver's AWS_* variables reach the workers), mount it at the "
            "same path on every node, or run without RAY_ADDRESS (a private cluster on this machine).")
    _READABLE.update((*cluster, folder) for folder in sample)


def _probe_reads(paths: list[str]) -> list[tuple[str, str]]:
    """On one node: (path, error) for each path it cannot open and read a byte of."""
    _guard_reads()
    errors = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            errors.append((path, f"{type(e).__name__}: {e}"))
    return errors


def _run_task(fn: Callable, chunk):
    """One chunk of a model-free stage (a Ray task): ``(result, "")`` or ``(None, traceback)``."""
    _guard_reads()
    try:
        return fn(None, chunk), ""
    except Exception:  # noqa: BLE001 - reported per chunk, the job goes on
        return None, traceback.format_exc(limit=5)


class _ModelActor:
    """One model per actor, built once; every call reads, decodes and analyses a few chunks."""

    def __init__(self, factory: Callable, args: tuple, kwargs: dict, threads: int = 1):
        _guard_reads()
        try:
            import torch

            torch.set_num_threads(max(1, threads))
        except ImportError:  # pragma: no cover
            pass
        self.model = factory(*unship_paths(tuple(args)), **unship_paths(dict(kwargs)))

    def ready(self) -> bool:
        return True

    def run(self, fns: tuple, chunks: list) -> list:
        """``[(result, error)]`` per chunk of ``analyze(model, decode(chunk))``, ``fns`` = (decode, analyze).
        With several chunks, decoding runs on threads ahead of the model."""
        decode, analyze = fns
        if decode is None and getattr(analyze, "streams_chunks", False):
            return self._stream(analyze, chunks)

        def decoded(c):
            return decode(c) if decode is not None else c

        out = []
        if len(chunks) > 1 and decode is not None:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(4, len(chunks))) as pool:
                futures = [pool.submit(decoded, c) for c in chunks]
                for f in futures:
                    out.append(self._analyze(analyze, f))
            return out
        return [self._analyze(analyze, _Now(decoded, c)) for c in chunks]

    def _stream(self, analyze, chunks: list) -> list:
        """A stage that schedules its own chunks (``analyze(model, chunks)`` yields a result per chunk, in
        order: the face stage decodes the next chunk while the model runs). A chunk that raised fails it
        and the ones after it in this call."""
        out = []
        try:
            for result in analyze(self.model, chunks):
                out.append((result, ""))
        except Exception:  # noqa: BLE001 - reported per chunk
            error = traceback.format_exc(limit=5)
            out += [(None, error)] * (len(chunks) - len(out))
        return out

    def _analyze(self, analyze, pending) -> tuple:
        try:
            return analyze(self.model, pending.result()), ""
        except Exception:  # noqa: BLE001 - reported per chunk
            return None, traceback.format_exc(limit=5)


class _Now:
    """A decode done on the spot, looking like a future (so errors surface in ``result()``)."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def result(self):
        return self.fn(self.arg)


# --------------------------------------------------------------------------------------- actor pools


@dataclass
class _Pool:
    key: tuple
    plan: PoolPlan
    pending: dict  # ready ObjectRef -> actor, not up yet
    ready: list = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    jobs: int = 0
    spawn: Callable | None = None  # starts one more actor of this pool (a replacement)
    lost: int = 0  # actors lost to a dead node, a kill or the OOM killer, not to their model's error

    def replace_lost(self, error: BaseException) -> None:
        """An actor of the pool is gone: start another in its place (at most the pool's size over its life,
        so actors that keep dying do not respawn forever); on a cluster that lost a node, the replacement
        waits for room, or for the autoscaler's next node."""
        self.lost += 1
        again = self.lost <= self.plan.actors and self.spawn is not None
        log.warning("ray: an actor of the %s pool was lost (%s)%s", self.key[1],
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
                    "; starting another in its place" if again else "; not replaced (the pool lost as many as it has)")
        if again:
            actor = self.spawn()
            self.pending[actor.ready.remote()] = actor


_POOLS: dict[tuple, _Pool] = {}


def release_pools(keep: tuple | None = None) -> None:
    """Kill every pool but ``keep``: one stage's actors at a time, so a pool never waits on another
    stage's idle actors for the cluster's CPUs."""
    import ray

    for key in [k for k in _POOLS if k != keep]:
        pool = _POOLS.pop(key)
        for actor in [*pool.ready, *pool.pending.values()]:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)


def _get_pool(factory: Callable, args: tuple, kwargs: dict, plan: PoolPlan) -> tuple[_Pool, bool]:
    import ray

    key = (factory.__module__, factory.__qualname__, repr(args), repr(sorted(kwargs.items())), plan)
    release_pools(keep=key)
    pool = _POOLS.get(key)
    if pool is not None:
        return pool, True
    actor_cls = ray.remote(_ModelActor)
    shipped_args, shipped_kwargs = ship_local_paths(tuple(args)), ship_local_paths(dict(kwargs))
    threads = max(1, int(plan.cpus_per_actor))

    def spawn():
        return actor_cls.options(num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                                 max_restarts=0).remote(factory, shipped_args, shipped_kwargs, threads)

    pending = {}
    for _ in range(plan.actors):
        actor = spawn()
        pending[actor.ready.remote()] = actor
    pool = _Pool(key, plan, pending, spawn=spawn)
    _POOLS[key] = pool
    return pool, False


def _promote_ready(pool: _Pool, timeout: float) -> None:
    """Move actors that came up to ``pool.ready``; an actor whose model failed to build fails the stage, one
    lost before it came up (its node died, it was killed) is replaced."""
    import ray
    from ray.exceptions import RayActorError

    if not pool.pending:
        return
    done, _ = ray.wait(list(pool.pending), num_returns=len(pool.pending), timeout=timeout)
    for ref in done:
        actor = pool.pending.pop(ref)
        try:
            ray.get(ref)  # raises the constructor's error (e.g. missing weights), naming it
        except RayActorError as e:
            if e.actor_init_failed:
                raise
            pool.replace_lost(e)
            continue
        pool.ready.append(actor)


def _wait_first_actor(pool: _Pool, stage: str, start_timeout: float) -> float:
    import ray

    t0 = time.monotonic()
    while not pool.ready:
        left = start_timeout - (time.monotonic() - t0)
        if left <= 0:
            _POOLS.pop(pool.key, None)
            for actor in pool.pending.values():
                ray.kill(actor)
            raise RayStartTimeout(
                f"ray {stage}: none of {pool.plan.actors} actor(s) ({pool.plan.cpus_per_actor} CPU, "
                f"{pool.plan.gpus_per_actor} GPU each) started within {start_timeout:.0f} s "
                f"(${START_TIMEOUT_ENV}); the cluster has {dict(ray.cluster_resources())}, free now "
                f"{dict(ray.available_resources())}: other jobs hold it, or no node fits one actor")
        try:
            _promote_ready(pool, min(left, 1.0))
            if not pool.ready and not pool.pending:
                raise RuntimeError(f"ray {stage}: all {pool.lost} actor(s) of the pool were lost before one came up "
                                   "(their nodes died or they were killed), replacements included")
        except Exception:
            _POOLS.pop(pool.key, None)
            release_pools()
            raise
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------ the jobs


@dataclass
class RayJobStats:
    """What a Ray job did, for the asset's metadata."""

    stage: str
    chunks: int = 0
    items: int = 0
    actors: int = 0  # the pool's size
    actors_used: int = 0  # how many of them took calls in this job (actors still starting took none)
    cpus_per_actor: float = 0.0
    gpus_per_actor: float = 0.0
    tasks: int = 0
    pool_reused: bool = False
    start_seconds: float = 0.0  # waiting for the first actor (0 when the pool was there)
    failures: list[str] = field(default_factory=list)  # chunks whose work raised, with the error
    actors_lost: int = 0  # actors of the pool lost during this job (replaced while the pool's budget lasts)
    seconds: float = 0.0
    cluster: dict = field(default_factory=dict)
    joined: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        return {
            "engine": "ray",
            "ray_stage": self.stage,
            "ray_cluster": str(self.joined.get("address", "")),
            "ray_cluster_nodes": int(self.joined.get("nodes", 0)),
            "ray_chunks": self.chunks,
            "ray_actors": self.actors,
            "ray_actors_used": self.actors_used,
            "ray_cpus_per_actor": self.cpus_per_actor,
            "ray_gpus_per_actor": self.gpus_per_actor,
            "ray_tasks": self.tasks,
            "ray_pool_reused": self.pool_reused,
            "ray_start_seconds": round(self.start_seconds, 3),
            "ray_failures": len(self.failures),
            "ray_actors_lost": self.actors_lost,
            "ray_seconds": round(self.seconds, 3),
            "ray_items_per_s": round(self.items / self.seconds, 2) if self.seconds else 0.0,
            "ray_cluster_cpus": float(self.cluster.get("CPU", 0)),
            "ray_cluster_gpus": float(self.cluster.get("GPU", 0)),
        }


def chunk_runner(stage: str, decode: Callable | None, analyze: Callable, factory: Callable | None = None,
                 factory_args: tuple = (), factory_kwargs: dict | None = None, actors: int = 0,
                 gpus_per_actor: float | None = None) -> Callable:
    """A ``chunk_runner`` for a stage's partition function: ``runner(chunks)`` runs :func:`run_chunks` on
    chunks of (rows, ...) and keeps the job's stats in ``runner.stats``. ``actors`` caps the pool (0: as
    many as the cluster holds). With ``decode`` None and ``analyze.streams_chunks`` set, an actor hands
    ``analyze(model, chunks)`` all the chunks of a call (the stage overlaps their decoding itself)."""

    def runner(chunks):
        ensure_ray()
        require_readable(locator_paths(chunks))
        results, runner.stats = run_chunks(stage, chunks, decode=decode, analyze=analyze, factory=factory,
                                           factory_args=factory_args, factory_kwargs=factory_kwargs, actors=actors,
                                           gpus_per_actor=gpus_per_actor, items_of=lambda c: len(c[0]))
        return results

    def pool_plan() -> PoolPlan:
        # the pool the runner's jobs get on this cluster (started or joined now); run_chunks plans the same
        return plan_pool(ensure_ray(), actors, gpus_per_actor)

    runner.stats = None
    # whether the actors have GPUs decides how large a stage makes its chunks (pipeline/faces/stage.py
    # chunk_images): the driver's own device says nothing about theirs. Tasks (no factory) have no pool.
    runner.pool_plan = pool_plan if factory is not None else None
    return runner


def call_groups(chunks: int, plan: PoolPlan) -> list[list[int]]:
    """The chunk indices of each call to an actor: ``plan.chunks_per_call`` consecutive chunks a call."""
    per_call = max(1, int(plan.chunks_per_call))
    return [list(range(i, min(i + per_call, chunks))) for i in range(0, chunks, per_call)]


def _timeout(env: str, default: float) -> float:
    value = os.environ.get(env, "").strip()
    return float(value) if value else default


def run_chunks(
    stage: str,
    chunks: list,
    decode: Callable | None,
    analyze: Callable,
    factory: Callable | None,
    factory_args: tuple = (),
    factory_kwargs: dict | None = None,
    actors: int = 0,
    gpus_per_actor: float | None = None,
    items_of: Callable = len,
    on_done: Callable[[int], None] | None = None,
) -> tuple[list, RayJobStats]:
    """``analyze(model, decode(chunk))`` for every chunk on Ray, results in chunk order (``on_done(i)`` as
    chunk ``i``'s task returns, without a ``factory``: progress).

    With a ``factory`` the chunks go to this process's pool of actors each holding
    ``factory(*factory_args, **factory_kwargs)`` (built on first use, sized by :func:`plan_pool`, reused by
    later calls with the same model); without one, ``analyze(None, chunk)`` runs in one task per chunk.
    ``gpus_per_actor`` None = 1 when the cluster has GPUs, else 0. A chunk whose work raised is listed in
    the stats' failures and makes this function raise after the job, naming them all; no chunk finishing
    for ``$LINEUP_RAY_STALL_TIMEOUT`` seconds fails it too."""
    cluster = ensure_ray()
    import ray

    stats = RayJobStats(stage, chunks=len(chunks), cluster=cluster, joined=joined_cluster())
    stats.items = sum(items_of(c) for c in chunks)
    if not chunks:
        return [], stats
    t0 = time.perf_counter()
    stall = _timeout(STALL_TIMEOUT_ENV, DEFAULT_STALL_TIMEOUT_S)
    outcomes: dict[int, tuple] = {}
    if factory is None:
        release_pools()  # idle actors of another stage would hold the CPUs these tasks need
        task = ray.remote(_run_task).options(num_cpus=1, max_retries=1)
        fn_ref = ray.put(analyze)
        limit = max(2, int(cluster.get("CPU", 1)) * 2) if actors <= 0 else max(1, int(actors)) * 2
        todo = list(range(len(chunks)))
        running: dict = {}
        last = time.monotonic()
        while todo or running:
            while todo and len(running) < limit:
                i = todo.pop(0)
                running[task.remote(fn_ref, chunks[i])] = i
            done, _ = ray.wait(list(running), num_returns=1, timeout=min(stall, 5.0))
            for ref in done:
                i = running.pop(ref)
                outcomes[i] = ray.get(ref)
                last = time.monotonic()
                if on_done is not None and not outcomes[i][1]:
                    on_done(i)
            _check_stall(stage, last, stall, len(outcomes), len(chunks))
        stats.tasks = len(chunks)
    else:
        # not capped by this job's chunks: the pool is kept for the next partitions, whatever their size
        plan = plan_pool(cluster, actors, gpus_per_actor)
        pool, stats.pool_reused = _get_pool(factory, tuple(factory_args), dict(factory_kwargs or {}), plan)
        stats.cpus_per_actor, stats.gpus_per_actor = plan.cpus_per_actor, plan.gpus_per_actor
        lost_before = pool.lost
        try:
            stats.start_seconds = _wait_first_actor(pool, stage, _timeout(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
            outcomes, stats.actors_used = _run_on_pool(pool, stage, chunks, decode, analyze, stall)
        finally:
            stats.actors_lost = pool.lost - lost_before
        stats.actors = plan.actors
        pool.jobs += 1
    stats.seconds = time.perf_counter() - t0
    results = []
    for i in range(len(chunks)):
        result, error = outcomes[i]
        if error:
            stats.failures.append(f"chunk {i}: {str(error).strip().splitlines()[-1]}")
        results.append(result)
    if stats.failures:
        raise RayStageError(stats)
    return results, stats


def _check_stall(stage: str, last: float, stall: float, done: int, total: int) -> None:
    if time.monotonic() - last > stall:
        import ray

        raise RayStartTimeout(f"ray {stage}: no chunk finished for {stall:.0f} s (${STALL_TIMEOUT_ENV}); {done} of "
                              f"{total} done; the cluster has {dict(ray.cluster_resources())}, free now "
                              f"{dict(ray.available_resources())}")


def _run_on_pool(pool: _Pool, stage: str, chunks: list, decode, analyze, stall: float) -> tuple[dict[int, tuple], int]:
    """Calls of ``plan.chunks_per_call`` chunks, at most INFLIGHT_PER_ACTOR queued per actor; actors that
    come up during the job join it; a call lost with its actor (killed, out of memory) is retried once on
    another actor. Returns the outcomes by chunk and how many actors took calls."""
    import ray
    from ray.exceptions import RayActorError

    todo = call_groups(len(chunks), pool.plan)
    attempts: dict[int, int] = {}
    fns = ray.put((decode, analyze))  # once per job, not once per call
    running: dict = {}  # ref -> (actor, chunk indices)
    load: dict = {}
    outcomes: dict[int, tuple] = {}
    used: set = set()
    last = time.monotonic()
    while todo or running:
        _promote_ready(pool, 0)
        for actor in pool.ready:
            while todo and load.get(actor, 0) < INFLIGHT_PER_ACTOR:
                idx = todo.pop(0)
                ref = actor.run.remote(fns, [chunks[i] for i in idx])
                running[ref] = (actor, idx)
                used.add(actor)
                load[actor] = load.get(actor, 0) + 1
        if not running:  # every ready actor died: wait for one still starting, else give up
            if not pool.pending:
                raise RuntimeError(f"ray {stage}: every actor of the pool died")
            _promote_ready(pool, 1.0)
            _check_stall(stage, last, stall, len(outcomes), len(chunks))
            continue
        done, _ = ray.wait(list(running), num_returns=1, timeout=min(stall, 5.0))
        for ref in done:
            actor, idx = running.pop(ref)
            load[actor] -= 1
            try:
                for i, outcome in zip(idx, ray.get(ref)):
                    outcomes[i] = outcome
            except RayActorError as e:
                if actor in pool.ready:
                    pool.ready.remove(actor)
                    pool.replace_lost(e)
                attempts[idx[0]] = attempts.get(idx[0], 0) + 1
                if attempts[idx[0]] > 1:
                    raise RuntimeError(f"ray {stage}: chunks {idx} lost their actor twice: {e}") from e
                todo.insert(0, idx)
            last = time.monotonic()
        _check_stall(stage, last, stall, len(outcomes), len(chunks))
    return outcomes, len(used)


class RayStageError(RuntimeError):
    def __init__(self, stats: RayJobStats):
        self.stats = stats
        super().__init__(f"ray {stats.stage}: {len(stats.failures)} of {stats.chunks} chunks failed: "
                         + "; ".join(stats.failures[:5]))


class RayJoinError(ConnectionError):
    """``RAY_ADDRESS`` names a cluster this process could not join: the address, and the token."""

    def __init__(self, address: str, error: BaseException):
        mode = os.environ.get("RAY_AUTH_MODE", "").strip() or "unset"
        token = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
                 "RAY_AUTH_TOKEN_PATH" if os.environ.get("RAY_AUTH_TOKEN_PATH") else "none")
        super().__init__(
            f"could not join the Ray cluster at RAY_ADDRESS={address} ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}). Check that it names the head's GCS "
            "port (host:6379) or its client port (ray://host:10001) and that this machine reaches it. A cluster "
            "with token authentication (its nodes run with RAY_AUTH_MODE=token; Ray 2.59+ `ray start --head` "
            "turns it on by itself where ~/.ray/auth_token exists) refuses a driver without its token: set "
            f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) here too (here: RAY_AUTH_MODE {mode}, "
            f"token from {token}).")


class RayStartTimeout(RuntimeError):
    """The cluster gave a stage nothing to run on, or nothing finished, in time."""
