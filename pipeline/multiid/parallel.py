"""The multi-identity selection over several processes: a bucket's targets in chunks, each selected by
:func:`pipeline.multiid.selection._select` in a forked worker, with rows, samples and counts those of one run."""

from __future__ import annotations

from pathlib import Path

from pipeline.multiid import selection
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.reuse import TargetTally
from pipeline.multiid.rows import _RowParts

PARALLEL_MIN_TARGETS = 64  # a selection over fewer targets runs in the calling process (a fork costs more)
CHUNKS_PER_WORKER = 2  # chunks of targets per worker: balances targets of unequal cost
_FORKED: dict = {}  # the selection's arguments, inherited by the forked workers (never pickled)
_WORKER: dict = {}  # a worker's own bookkeeping (empty in the parent, so empty in every fresh fork)


def _select_chunk(i: int, chunk: list[str]):
    """In a forked worker: :func:`_select` over the targets ``chunk``, its rows to its own part files."""
    a = _FORKED
    tally = TargetTally(a["tally"].on_candidates) if a["tally"] is not None else None
    guard = a["guard"]
    # the decisions this worker adds and has not sent yet (it inherited the parent's, already kept there;
    # it keeps its own for its next chunks)
    if guard is not None and "sent" not in _WORKER:
        _WORKER["sent"], _WORKER["hits"] = len(guard.new), guard.hits
    new_at, hits_at = (_WORKER["sent"], _WORKER["hits"]) if guard is not None else (0, 0)
    sink = _RowParts(a["parts_dir"], f"{a['stem']}-c{i:03d}")
    try:
        samples, _, _, counts = selection._select(a["img_meta"], a["by_uid"], a["cfg"], a["read_bytes"], a["override"], a["mversions"],
                                        sink=sink, targets=set(chunk), tally=tally, decisions=guard)
    finally:
        sink.close()
    decided = None
    if guard is not None:
        decided = (guard.new[new_at:], guard.hits - hits_at)
        _WORKER["sent"], _WORKER["hits"] = len(guard.new), guard.hits
    return samples, counts, sink.paths, (tally.by_target, tally.seen) if tally is not None else None, decided


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


def _select_parallel(workers: int, parts_dir: Path, stem: str, img_meta: dict, by_uid: dict, cfg: MultiIDConfig, read_bytes,
                     override: set, mversions: list[str], targets=None, tally=None, guard=None):
    """:func:`_select` with its rows streamed to part files, over ``workers`` forked processes when there are
    enough targets. Returns (samples, counts, pairs part files, candidates part files): one file (or None)
    from one process, a list of files (one per chunk, each sorted by target uid) from several. A target's selection depends only on
    the collection, not on the other targets (each run has its own decoding cache; its eviction counts,
    which no version records, are the only figures that differ), so the rows, samples and counts are
    those of one run over all targets."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    uids = sorted(img_meta) if targets is None else sorted(set(img_meta) & set(targets))
    if workers <= 1 or len(uids) < PARALLEL_MIN_TARGETS or "fork" not in mp.get_all_start_methods():
        sink = _RowParts(parts_dir, stem)
        try:
            samples, _, _, counts = selection._select(img_meta, by_uid, cfg, read_bytes, override, mversions, sink=sink,
                                            targets=None if targets is None else set(targets), tally=tally, decisions=guard)
        finally:
            sink.close()
        return samples, counts, sink.paths["pairs"], sink.paths["candidates"]
    n = min(len(uids), workers * CHUNKS_PER_WORKER)
    # targets grouped by person (their smallest identity id): a person's targets share their candidates, so
    # each worker's decoding and keypoint caches serve its chunk as they serve one run (contiguous runs of
    # uids, which are random, made every worker decode most photos: twice the CPU of one run, measured)
    def person(u: str) -> str:
        ids = [f.identity_id for f in by_uid.get(u, []) if f.identity_id is not None]
        return min(ids) if ids else ""
    order = sorted(uids, key=lambda u: (person(u), u))
    bounds = [round(i * len(order) / n) for i in range(n + 1)]
    chunks = [order[bounds[i]:bounds[i + 1]] for i in range(n)]
    _FORKED.update(parts_dir=parts_dir, stem=stem, img_meta=img_meta, by_uid=by_uid, cfg=cfg, read_bytes=read_bytes,
                   override=override, mversions=mversions, tally=tally, guard=guard)
    import cv2

    # OpenCV's thread pool is stopped before the fork and restored after: a child that inherits a pool whose
    # threads did not survive the fork hangs as soon as it touches it (seen: setNumThreads in the child)
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_select_chunk, range(n), chunks))
    finally:
        _FORKED.clear()
        cv2.setNumThreads(cv_threads)
    samples, counts = [], {}
    pairs, cands = [], []
    for s, c, paths, t, decided in results:
        if decided is not None:
            guard.new += decided[0]
            guard.hits += decided[1]
        samples += s
        _add_counts(counts, c)
        if paths["pairs"] is not None:
            pairs.append(paths["pairs"])
        if paths["candidates"] is not None:
            cands.append(paths["candidates"])
        if t is not None:
            tally.by_target.update(t[0])
            tally.seen.update(t[1])
    samples.sort(key=lambda s: s["key"])
    for k in ("targets", "candidates_removed_by", "duplicate_flags_independent", "unreadable"):
        counts[k] = dict(sorted(counts.get(k, {}).items()))
    counts.setdefault("persons", 0)
    for k in ("similarity_all_candidates", "similarity_selected"):
        counts[k] = {kk: v for kk, v in sorted(counts.get(k, {}).items(), key=lambda kv: int(kv[0])) if v}
    return samples, counts, pairs or None, cands or None
