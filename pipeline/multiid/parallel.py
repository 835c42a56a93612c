"""The multi-identity selection over several processes: every bucket's selection (a :class:`SelectionJob`)
is cut into chunks of targets (a small bucket is one chunk), and the chunks of all buckets run, dearest
first, in forked worker processes or as Ray tasks, each chunk selected by
:func:`pipeline.multiid.selection._select`; the rows, samples and counts are those of one run per bucket.
Forked workers share what the guard derives from a face or a photo (:mod:`pipeline.multiid.face_store`):
each face's keypoints, each photo's fingerprints and bytes are worked out by one of them for all."""

from __future__ import annotations

import contextlib
import heapq
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.multiid import selection
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.face_store import SharedFaceStore
from pipeline.multiid.reuse import TargetTally
from pipeline.multiid.rows import _RecordSpill, _RowParts, _slim_sample

PARALLEL_MIN_TARGETS = 64  # selections over fewer targets in all run in the calling process (a fork costs more)
# at least this many chunks of a large bucket per worker (guided_shares), dearest first: a worker that finishes early takes the next
CHUNKS_PER_WORKER = 4
_WORKER: dict = {}  # a worker's own bookkeeping (empty in the parent, so empty in every fresh fork)


@dataclass
class SelectionJob:
    """One bucket's selection: its photos, its eval override, the targets to select (None: every photo),
    the per-target tally (reuse.TargetTally) and whether shard records are made as samples are selected."""

    stem: str
    img_meta: dict
    by_uid: dict
    override: set
    targets: list[str] | None = None
    tally: TargetTally | None = None
    records: bool = False
    prepared: dict | None = field(default=None, repr=False)
    hashes: dict | None = field(default=None, repr=False)  # photo_hashes of its photos, when worked out beforehand
    # the previous candidate rows of targets selected again (reuse.PreviousRows; read by each worker, sent to Ray tasks)
    previous: object | None = field(default=None, repr=False)
    # (target, person) -> the refs of the candidates it examines, chosen already (reuse.TargetFingerprints.subsets_of)
    known_subsets: dict | None = field(default=None, repr=False)

    def uids(self) -> list[str]:
        return sorted(self.img_meta) if self.targets is None else sorted(set(self.img_meta) & set(self.targets))


def _job_args(job: SelectionJob) -> dict:
    return {"stem": job.stem, "img_meta": job.img_meta, "by_uid": job.by_uid, "override": job.override,
            "tally": job.tally, "records": job.records, "prepared": job.prepared, "hashes": job.hashes,
            "previous": job.previous, "known_subsets": job.known_subsets}


def _select_chunk(common: dict, jobs: list[dict], j: int, i: int, chunk: list[str]):
    """In a forked worker: :func:`_run_chunk` with the arguments it inherited."""
    return _run_chunk(common, jobs[j], j, i, chunk)


def _hash_chunk(common: dict, jobs: list[dict], j: int, i: int, chunk: list[str]):
    """In a forked worker: :func:`pipeline.multiid.selection.photo_hashes` of the photos ``chunk`` of job ``j``."""
    if common.get("face_store") is not None and "store" not in _WORKER:
        _WORKER["store"] = SharedFaceStore(common["face_store"])
    return selection.photo_hashes(chunk, jobs[j]["by_uid"], common["cfg"], common["read_bytes"], _WORKER.get("store"),
                                  stored=_stored(common["guard"]))


def _feature_counts(guard) -> tuple[int, int]:
    """(entries loaded, entries computed) of the feature store beside the guard's decisions, in this process."""
    f = guard.features if guard is not None else None
    return (f.loaded, f.computed) if f is not None else (0, 0)


def _stored(guard):
    """The pHash store kept beside the guard's decisions (guard_cache.PhotoHashes), if any."""
    return guard.photos if guard is not None else None


def _run_chunk(common: dict, a: dict, j: int, i: int, chunk: list[str]):
    """In a worker (a fork, or a Ray task): :func:`_select` over the targets ``chunk`` of job ``j``, its rows
    to its own part files in ``common["parts_dir"]`` (its samples' shard records to its own spill file, and
    then only the few fields of each sample the parent uses come back). The worker keeps its decoding and
    keypoint caches from one chunk to its next of the same job (the chunks are of the same photos)."""
    cfg, guard = common["cfg"], common["guard"]
    tally = TargetTally(a["tally"].on_candidates) if a["tally"] is not None else None
    # the decisions this worker adds and has not sent yet (it inherited the parent's, already kept there;
    # it keeps its own for its next chunks)
    photos = _stored(guard)
    if guard is not None and "sent" not in _WORKER:
        _WORKER["sent"], _WORKER["hits"] = len(guard.new), guard.hits
        # and the photos' pHashes it records, and its lookups served from the store
        _WORKER["psent"], _WORKER["phits"] = (len(photos.new), photos.hits) if photos is not None else (0, 0)
        # and the keypoints, patches and crops it took from the feature store or worked out
        _WORKER["floaded"], _WORKER["fcomputed"] = _feature_counts(guard)
    new_at, hits_at = (_WORKER["sent"], _WORKER["hits"]) if guard is not None else (0, 0)
    if common.get("face_store") is not None and "store" not in _WORKER:
        _WORKER["store"] = SharedFaceStore(common["face_store"])
    if _WORKER.get("job") != j:  # one job's caches at a time
        _WORKER["job"] = j
        _WORKER["fingerprints"] = selection._new_fingerprints(common["read_bytes"], a["by_uid"], cfg, a["hashes"],
                                                              shared=_WORKER.get("store"), stored=photos,
                                                              kept=guard.features if guard is not None else None)
    stem = f"{a['stem']}-c{i:03d}"
    sink = _RowParts(common["parts_dir"], stem)
    records = _RecordSpill(common["parts_dir"], stem, cfg, guard.features if guard is not None else None) if a["records"] else None
    try:
        samples, _, _, counts = selection._select(
            a["img_meta"], a["by_uid"], cfg, common["read_bytes"], a["override"], common["mversions"], sink=sink,
            targets=set(chunk), tally=tally, decisions=guard, records=records, prepared=a["prepared"],
            fingerprints=_WORKER["fingerprints"], previous=a.get("previous"), known_subsets=a.get("known_subsets"))
    finally:
        sink.close()
        if records is not None:
            records.close()
    decided = None
    if guard is not None:
        decided = (guard.new[new_at:], guard.hits - hits_at, [], 0)
        _WORKER["sent"], _WORKER["hits"] = len(guard.new), guard.hits
        if photos is not None:
            decided = decided[:2] + (photos.new[_WORKER["psent"]:], photos.hits - _WORKER["phits"])
            _WORKER["psent"], _WORKER["phits"] = len(photos.new), photos.hits
        loaded, computed = _feature_counts(guard)
        decided += (loaded - _WORKER["floaded"], computed - _WORKER["fcomputed"])
        _WORKER["floaded"], _WORKER["fcomputed"] = loaded, computed
    if records is not None:
        samples = [_slim_sample(s) for s in samples]
    return (samples, counts, sink.paths, (tally.by_target, tally.seen) if tally is not None else None, decided,
            records.at if records is not None else None)


def _ray_chunk(_model, task: tuple):
    """A Ray task: :func:`_run_chunk` on a worker that shares no disk with the driver. The arguments come
    from the object store (deserialised once per worker process, like a fork's inheritance); the part and
    spill files are written to a local temporary folder and come back as bytes, with the records' places."""
    import shutil
    import tempfile

    import ray

    kind, common_ref, job_ref, j, i, chunk = task
    if _WORKER.get("common_id") != common_ref.hex():  # a Ray worker process outlives a build: start afresh
        _WORKER.clear()
        _WORKER["common_id"], _WORKER["common"] = common_ref.hex(), ray.get(common_ref)
    if _WORKER.get("job_id") != job_ref.hex():
        _WORKER["job_id"], _WORKER["job_args"] = job_ref.hex(), ray.get(job_ref)
    if kind == "hash":
        common = _WORKER["common"]
        return selection.photo_hashes(chunk, _WORKER["job_args"]["by_uid"], common["cfg"], common["read_bytes"],
                                      stored=_stored(common["guard"]))
    tmp = Path(tempfile.mkdtemp(prefix="multiid-chunk-"))
    try:
        samples, counts, paths, tally, decided, at = _run_chunk({**_WORKER["common"], "parts_dir": tmp}, _WORKER["job_args"],
                                                                j, i, chunk)
        files = {name: (p.name, p.read_bytes()) for name, p in paths.items() if p is not None}
        spilled = None
        if at is not None:
            files.update({f"records:{p.name}": (p.name, p.read_bytes()) for p in {p for p, _, _ in at.values()}})
            spilled = {k: (p.name, off, n) for k, (p, off, n) in at.items()}
        return samples, counts, files, tally, decided, spilled
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _on_ray(parts_dir: Path, common: dict, jobs: list[SelectionJob], tasks: list[tuple], kind: str = "select",
            on_done=None) -> list:
    """The chunks as Ray tasks (:func:`_ray_chunk`), the arguments put into the object store once (those
    shared by all, and each job's); the files each task sends back are written to ``parts_dir``. Results in
    the order of ``tasks``, as :func:`_run_chunk` gives them (``kind="hash"``: as photo_hashes does)."""
    import ray

    from pipeline import ray_engine

    ray_engine.ensure_ray()
    common_ref = ray.put(common)
    job_refs = [ray.put(_job_args(job)) for job in jobs]
    results, _ = ray_engine.run_chunks(f"multiid-{kind}", [(kind, common_ref, job_refs[j], j, i, c) for j, i, c in tasks],
                                       decode=None, analyze=_ray_chunk, factory=None, items_of=lambda t: len(t[5]),
                                       on_done=on_done)
    if kind == "hash":
        return results
    out = []
    for samples, counts, files, tally, decided, spilled in results:
        local = {}
        for name, (fname, data) in files.items():
            (parts_dir / fname).write_bytes(data)
            local[name] = parts_dir / fname
        at = None if spilled is None else {k: (parts_dir / f, off, ln) for k, (f, off, ln) in spilled.items()}
        out.append((samples, counts, {"pairs": local.get("pairs"), "candidates": local.get("candidates")}, tally, decided, at))
    return out


def _slots(engine: str, workers: int) -> int:
    """How many chunks may run at once: the Ray cluster's CPUs, else ``workers``."""
    if engine == "ray":
        from pipeline import ray_engine

        return max(1, int(ray_engine.ensure_ray().get("CPU", 1)))
    return workers


def select_jobs(jobs: list[SelectionJob], workers: int, parts_dir: Path, cfg: MultiIDConfig, read_bytes, mversions: list[str],
                guard=None, engine: str = "inprocess", progress=None) -> list[tuple]:
    """Run every job's selection; per job (samples, counts, pairs part files, candidates part files,
    records): the rows streamed to part files (each sorted by target uid), and with ``job.records`` each
    sample's shard record made by the process that selected it (key -> its place in a spill file,
    :func:`pipeline.multiid.rows._spilled_records`; the samples then carry only the fields the plan uses,
    :func:`pipeline.multiid.rows._slim_sample`), else None.

    With ``workers`` > 1 (forked processes) or ``engine="ray"`` (Ray tasks, on a cluster whatever ``workers``
    says) and at least PARALLEL_MIN_TARGETS targets in all, the jobs are cut into chunks: a bucket with
    fewer targets is one chunk, a larger one :func:`chunks_by_shares` over :func:`guided_shares`; all chunks of all jobs run dearest first
    (:func:`target_costs`), so small buckets run beside a large one instead of one after the other in this
    process. A target's selection depends only on the collection, not on the other targets (each worker
    has its own decoding cache; its eviction counts, which no version records, are the only figures that
    differ), so the rows, samples and counts are those of one run per job. ``progress``: a
    :class:`pipeline.multiid.progress.BuildProgress`, told the targets selected as each chunk (or job) ends."""
    import shutil

    from pipeline.multiid.progress import BuildProgress, counted

    progress = progress or BuildProgress()
    on_ray = engine == "ray"
    uids = [job.uids() for job in jobs]
    total = sum(map(len, uids))
    if not total:
        return [_select_here(job, parts_dir, cfg, read_bytes, mversions, guard) for job in jobs]
    if total < PARALLEL_MIN_TARGETS or (not on_ray and (workers <= 1 or not can_fork())):
        progress(f"selecting {counted(total, 'target')} in this process")
        selected = progress.counter("targets selected", total)
        out = []
        for job, u in zip(jobs, uids):
            out.append(_select_here(job, parts_dir, cfg, read_bytes, mversions, guard))
            if u:
                selected(len(u))
        return out
    slots = _slots(engine, workers)
    tasks, costs, here = [], [], {}
    for j, (job, u) in enumerate(zip(jobs, uids)):
        if not u:  # nothing to select: its (empty) result here
            here[j] = _select_here(job, parts_dir, cfg, read_bytes, mversions, guard)
            continue
        chunks = [u] if len(u) < PARALLEL_MIN_TARGETS else chunks_by_shares(u, job.by_uid, cfg.max_candidates_per_person,
                                                                              guided_shares(slots, CHUNKS_PER_WORKER))
        cost = target_costs(u, job.by_uid, cfg.max_candidates_per_person)
        for i, chunk in enumerate(chunks):
            tasks.append((j, i, chunk))
            costs.append(sum(cost[x] for x in chunk))
        # derived once here, before the fork (inherited) or the tasks (in the object store): not once per chunk
        job.prepared = selection._prepare(job.by_uid, cfg, job.override)
    order = sorted(range(len(tasks)), key=lambda k: -costs[k])
    tasks = [tasks[k] for k in order]
    selected = {}

    def begin() -> None:  # after the pHash pass: the time left is estimated from the selection's own rate
        progress(f"selecting {total:,} targets in {len(tasks)} chunks over {slots} {'Ray CPUs' if on_ray else 'worker processes'}")
        selected["add"] = progress.counter("targets selected", total)

    common = {"cfg": cfg, "read_bytes": read_bytes, "mversions": mversions, "guard": guard}
    # forked workers: each face's keypoints and each photo's NCC patches computed by one worker for all
    # (face_store.py; the pHash pass publishes the patches it works out anyway)
    store = None if on_ray else parts_dir / "face-store"
    try:
        results = _passes(parts_dir, {**common, "face_store": store}, jobs, uids, tasks, workers, slots, on_ray,
                          begin, lambda k: selected["add"](len(tasks[k][2])), progress)
    finally:
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
    for job in jobs:
        job.prepared = job.hashes = None
    by_job: dict[int, list] = {}
    for (j, i, _), r in sorted(zip(tasks, results), key=lambda t: t[0][:2]):
        by_job.setdefault(j, []).append(r)
    return [here[j] if j in here else _merge_chunks(by_job[j], job.tally, guard) for j, job in enumerate(jobs)]


def _passes(parts_dir: Path, common: dict, jobs: list[SelectionJob], uids: list[list[str]], tasks: list[tuple], workers: int,
            slots: int, on_ray: bool, begin, on_done, progress) -> list:
    """The pHash pass (where it pays) then the selection's chunks ``tasks``; the chunks' results in their order."""
    # first every photo's pHashes, each photo decoded once by one worker: a fresh bucket's chunks otherwise
    # each decode most of its photos (the candidates of a person's targets lie in many other chunks' photos)
    # (for a job that selects most of its photos: a refresh's few targets decode only what they examine)
    hash_tasks = [(j, i, ch) for j, job in enumerate(jobs)
                  if len(uids[j]) >= PARALLEL_MIN_TARGETS and 2 * len(uids[j]) >= len(job.img_meta)
                  for i, ch in enumerate(_spread(sorted(set(job.img_meta) | set(job.by_uid)), slots * CHUNKS_PER_WORKER))]
    if hash_tasks:
        progress(f"pHashes of {sum(len(t[2]) for t in hash_tasks):,} photos, each decoded once")
        hashed = (_on_ray(parts_dir, common, jobs, hash_tasks, "hash") if on_ray
                  else _forked(parts_dir, common, jobs, hash_tasks, workers, _hash_chunk))
        photos = _stored(common["guard"])
        for (j, _, _), h in zip(hash_tasks, hashed):
            jobs[j].hashes = {**(jobs[j].hashes or {}), **h}
            if photos is not None:  # kept for the next build (those found in the store are kept already)
                for uid, value in h.items():
                    photos.record_from(uid, jobs[j].by_uid, value)
    begin()
    if on_ray:
        return _on_ray(parts_dir, common, jobs, tasks, on_done=on_done)
    return _forked(parts_dir, common, jobs, tasks, workers, on_done=on_done)


def _spread(uids: list[str], n: int) -> list[list[str]]:
    """``uids`` in at most ``n`` parts of about equal size."""
    n = max(1, min(n, len(uids)))
    return [uids[k * len(uids) // n:(k + 1) * len(uids) // n] for k in range(n)]


def can_fork() -> bool:
    import multiprocessing as mp

    return "fork" in mp.get_all_start_methods()


@contextlib.contextmanager
def _fork_pool(workers: int):
    """A pool of ``workers`` forked processes, set up for what they inherit."""
    import gc
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    import cv2

    from pipeline.engine import exit_with_parent

    # OpenCV's thread pool is stopped before the fork and restored after: a child that inherits a pool whose
    # threads did not survive the fork hangs as soon as it touches it (seen: setNumThreads in the child)
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    # the inherited objects (the collection's faces, the plan) out of the garbage collector's sight: its
    # full passes in a child walk every one of them, writing their pages (copied, CPU in every worker)
    gc.freeze()
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            yield pool
    finally:
        gc.unfreeze()
        cv2.setNumThreads(cv_threads)


_INHERITED_CALLS: list = []  # the functions fork_map and alongside run, inherited by their forked processes


def _call_inherited(item):
    """In a forked process: the function of the innermost fork_map / alongside, which it inherited (a closure
    or a bound method with all it holds is never pickled; only ``item`` and the result are)."""
    return _INHERITED_CALLS[-1](item)


@contextlib.contextmanager
def _inherited(fn):
    _INHERITED_CALLS.append(fn)
    try:
        yield
    finally:
        _INHERITED_CALLS.pop()


def fork_map(fn, items: list, workers: int, on_done=None) -> list:
    """``fn`` over ``items`` in ``workers`` forked processes; ``fn`` (any callable, a closure too) and what it
    refers to are inherited, never pickled; results in the order of ``items``. ``on_done(k)`` is called here
    as each item ``k`` finishes (progress)."""
    from concurrent.futures import as_completed

    with _inherited(fn), _fork_pool(workers) as pool:
        if on_done is None:
            return list(pool.map(_call_inherited, items))
        futures = [pool.submit(_call_inherited, item) for item in items]
        index = {f: k for k, f in enumerate(futures)}
        for f in as_completed(futures):
            f.result()  # a failed item raises now, as map would
            on_done(index[f])
        return [f.result() for f in futures]


@contextlib.contextmanager
def alongside(fn, fork: bool = True):
    """The with-block runs here while ``fn()`` runs in a forked process (what it needs inherited, never
    pickled): two independent pieces of work on two cores. The process is waited for when the block ends,
    whether or not it raised; ``fn``'s error is then raised (the block's own comes first). ``fn`` must not
    log through handlers the parent owns (a Dagster context). ``fork`` False, or no fork on this platform:
    ``fn()`` runs here, after the block."""
    if not (fork and can_fork()):
        yield
        fn()
        return
    with _inherited(lambda _: fn()), _fork_pool(1) as pool:
        done = pool.submit(_call_inherited, None)
        yield
        done.result()


def _forked(parts_dir: Path, common: dict, jobs: list[SelectionJob], tasks: list[tuple], workers: int, fn=None,
            on_done=None) -> list:
    """``fn`` (:func:`_select_chunk`) over the chunks in ``workers`` forked processes; results in the order
    of ``tasks`` (``on_done(k)`` as chunk ``k`` finishes)."""
    common = {**common, "parts_dir": parts_dir}
    args = [_job_args(job) for job in jobs]
    fn = fn or _select_chunk
    # the arguments reach the forked workers inherited with this closure, never pickled
    return fork_map(lambda item: fn(common, args, *item), tasks, workers, on_done)


def _select_here(job: SelectionJob, parts_dir: Path, cfg: MultiIDConfig, read_bytes, mversions: list[str], guard) -> tuple:
    """One job's selection in this process: (samples, counts, pairs part file, candidates part file, records)."""
    sink = _RowParts(parts_dir, job.stem)
    spill = _RecordSpill(parts_dir, job.stem, cfg, guard.features if guard is not None else None) if job.records else None
    try:
        samples, _, _, counts = selection._select(job.img_meta, job.by_uid, cfg, read_bytes, job.override, mversions, sink=sink,
                                                  targets=None if job.targets is None else set(job.targets), tally=job.tally,
                                                  decisions=guard, records=spill, previous=job.previous,
                                                  known_subsets=job.known_subsets)
    finally:
        sink.close()
        if spill is not None:
            spill.close()
    if spill is not None:
        samples = [_slim_sample(s) for s in samples]
    return samples, counts, sink.paths["pairs"], sink.paths["candidates"], spill.at if spill is not None else None


def target_costs(uids: list[str], by_uid: dict, cap: int) -> dict[str, int]:
    """A target's estimated selection cost: 1 + the candidates its labelled faces would examine (the other
    faces of their identities, at most ``cap`` each). What the chunks are balanced on."""
    n_faces: dict[str, int] = {}
    for fs in by_uid.values():
        for f in fs:
            if f.identity_id is not None:
                n_faces[f.identity_id] = n_faces.get(f.identity_id, 0) + 1
    return {u: 1 + sum(min(cap, n_faces[f.identity_id] - 1) for f in by_uid.get(u, []) if f.identity_id is not None)
            for u in uids}


def guided_shares(slots: int, per_slot: int = 4) -> list[float]:
    """The shares of a job's estimated cost its chunks get, largest first (guided self-scheduling): each chunk
    1/(2 x ``slots``) of what is left, down to a smallest share, the rest in chunks of that size; at least
    ``slots`` x ``per_slot`` chunks. Equal chunks left one worker alone with the last of them for a tenth of
    a 1% refresh's selection at 100k faces (a chunk's cost is an estimate: one took 35 s, its peers 18-27);
    the last chunks here are small, so the workers end close together."""
    smallest = 1.0 / (4 * slots * per_slot)
    shares, left = [], 1.0
    while left / (2 * slots) >= smallest:
        shares.append(left / (2 * slots))
        left -= shares[-1]
    n = max(1, round(left / smallest))
    return shares + [left / n] * n


def chunks_by_shares(uids: list[str], by_uid: dict, cap: int, shares: list[float]) -> list[list[str]]:
    """``uids`` in chunks whose estimated costs (:func:`target_costs`) follow ``shares`` (fractions of the
    whole), dearest chunk first; a chunk left empty is dropped. Targets are grouped by person (their smallest
    identity id): a person's targets share their candidates, so a worker's caches serve its chunk as they
    serve one run (chunks of consecutive uids, which are random, made every worker decode most photos: twice
    the CPU of one run, measured). Groups go dearest first to the chunk with the most room left; a group
    dearer than the largest share is cut into pieces."""
    cost = target_costs(uids, by_uid, cap)

    def person(u: str) -> str:
        ids = [f.identity_id for f in by_uid.get(u, []) if f.identity_id is not None]
        return min(ids) if ids else ""

    groups: dict[str, list[str]] = {}
    for u in sorted(uids, key=lambda u: (person(u), u)):
        groups.setdefault(person(u), []).append(u)
    whole = sum(cost.values())
    share = max(shares) * whole
    pieces = []
    for g in groups.values():
        piece, c = [], 0
        for u in g:
            if piece and c + cost[u] > share:
                pieces.append((c, piece))
                piece, c = [], 0
            piece.append(u)
            c += cost[u]
        pieces.append((c, piece))
    pieces.sort(key=lambda t: (-t[0], t[1][0]))
    room = [(-f * whole, i) for i, f in enumerate(shares)]  # a heap: the chunk with the most room left first
    heapq.heapify(room)
    chunks: list[list[str]] = [[] for _ in shares]
    for c, piece in pieces:
        left, i = heapq.heappop(room)
        chunks[i] += piece
        heapq.heappush(room, (left + c, i))
    totals = [sum(cost[u] for u in ch) for ch in chunks]
    return [ch for _, ch in sorted(zip(totals, chunks), key=lambda t: -t[0]) if ch]


def _add_counts(total: dict, part: dict) -> None:
    """Add one chunk's :func:`_select` counts to ``total`` (keys met in any chunk kept, even at 0)."""
    for k, v in part.items():
        if k == "persons":
            total[k] = total.get(k, 0) + v
        elif k == "unreadable":  # photo uid -> error: the same photo fails the same way in every chunk
            total.setdefault(k, {}).update(v)
        else:
            c = total.setdefault(k, {})
            for kk, n in v.items():
                c[kk] = c.get(kk, 0) + n



def _merge_chunks(results: list, tally, guard):
    """One job's result from its chunks' (:func:`_run_chunk`): samples by key, counts summed, part
    files listed, the per-target tallies and the guard's new decisions gathered."""
    samples, counts = [], {}
    pairs, cands, at = [], [], {}
    for s, c, paths, t, decided, spilled in results:
        if decided is not None:
            guard.new += decided[0]
            guard.hits += decided[1]
            if guard.photos is not None:
                guard.photos.add(decided[2])
                guard.photos.hits += decided[3]
            if guard.features is not None:  # what the workers took from the feature store and added to it
                guard.features.loaded += decided[4]
                guard.features.computed += decided[5]
        samples += s
        _add_counts(counts, c)
        if paths["pairs"] is not None:
            pairs.append(paths["pairs"])
        if paths["candidates"] is not None:
            cands.append(paths["candidates"])
        if t is not None:
            tally.by_target.update(t[0])
            tally.seen.update(t[1])
        if spilled is not None:
            at.update(spilled)
    samples.sort(key=lambda s: s["key"])
    for k in ("targets", "candidates_removed_by", "duplicate_flags_independent", "unreadable"):
        counts[k] = dict(sorted(counts.get(k, {}).items()))
    counts.setdefault("persons", 0)
    for k in ("similarity_all_candidates", "similarity_selected"):
        counts[k] = {kk: v for kk, v in sorted(counts.get(k, {}).items(), key=lambda kv: int(kv[0])) if v}
    return samples, counts, pairs or None, cands or None, at if results and results[0][5] is not None else None
