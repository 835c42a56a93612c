"""Build the multi-identity paired dataset (MultiID-2M style, after WithAnyone).

Inputs are the pipeline's tables (images, faces, identities); output is, per split, WebDataset
shards + manifest, plus a pairs table (one row per target person x selected reference), a candidates
table (every reference candidate with the filter that removed it) and statistics.

The builder, by concern: per-target reference selection (the recipe) in :mod:`pipeline.multiid.selection`,
over worker processes in :mod:`pipeline.multiid.parallel`; buckets of co-occurrence components and what a
build reuses from the previous version in :mod:`pipeline.multiid.plan`; the rows' part files and the
shards' records in :mod:`pipeline.multiid.rows`. This module runs them and writes the version's files.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.multiid import parallel
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.plan import PreviousShardsDamaged, _Plan
from pipeline.multiid.reuse import TARGETS_FILE, TARGETS_SCHEMA
from pipeline.multiid.rows import CANDIDATE_SCHEMA, PAIRS_SCHEMA, QUALITY_COLUMNS, _merge_in_target_order
from pipeline.shards import BUCKETS_FILE, ShardInfo, config_fingerprint, shard_record, write_manifest
from pipeline.storage import is_remote, read_parquet, write_parquet_stream_atomic


def reader_from_images(images: pa.Table) -> Callable[[str], bytes]:
    """read_bytes(uid) over the images table: bytes at path[offset:offset+length]."""
    loc = {r["uid"]: (r["path"], r["offset"], r["length"]) for r in images.select(["uid", "path", "offset", "length"]).to_pylist()}

    from pipeline.ingest import read_accepted_bytes  # local files and object-store URLs alike
    from pipeline.sources import open_input

    def read_bytes(uid: str) -> bytes:
        path, off, n = loc[uid]
        if n is not None and n >= 0:  # checked against the uid: a photo edited in place is skipped, not used
            return read_accepted_bytes({"uid": uid, "path": path, "offset": int(off or 0), "length": int(n)})
        with open_input(path) as f:
            f.seek(int(off or 0))
            return f.read()

    return read_bytes


@dataclass
class MultiIDResult:
    """``samples``: the sample JSONs by key. A build that writes keeps none in memory (a bucket's samples are
    dropped once its shards are written): they are read back from the shards of ``out_dir`` on first use
    (pass the folder to :meth:`samples_in` when the version has moved since, e.g. once published). The
    same for ``pairs`` and ``candidates``: a build that writes streams them to ``out_dir`` and reads them
    back from there on first use."""

    _pairs: pa.Table | None
    _candidates: pa.Table | None
    _samples: list[dict] | None
    stats: dict
    shards: dict[str, list[ShardInfo]]
    out_dir: Path | None
    config: MultiIDConfig
    read_bytes: Callable[[str], bytes] | None = field(default=None, repr=False)

    @property
    def pairs(self) -> pa.Table:
        if self._pairs is None:
            from pipeline.storage import read_parquet

            self._pairs = read_parquet(self.out_dir / "pairs.parquet")
        return self._pairs

    @property
    def candidates(self) -> pa.Table:
        if self._candidates is None:
            from pipeline.storage import read_parquet

            self._candidates = read_parquet(self.out_dir / "candidates.parquet")
        return self._candidates

    @property
    def samples(self) -> list[dict]:
        if self._samples is None:
            self._samples = self.samples_in(self.out_dir)
        return self._samples

    def samples_in(self, folder: Path, first: int | None = None) -> list[dict]:
        """The samples of this build, read from its shards in ``folder`` (sorted by key); ``first``: only the
        first that many by key (their members found from the tar headers: the others are not read)."""
        if self._samples is not None:
            return self._samples[:first] if first is not None else self._samples
        import heapq
        import tarfile

        from pipeline.storage import as_dir  # a local folder or an object-store one

        shards = [as_dir(folder) / split / sh.name for split in ("train", "eval") for sh in self.shards.get(split, [])]
        if first is not None:
            names = []
            for i, path in enumerate(shards):
                with path.open("rb") as f, tarfile.open(fileobj=f) as tf:
                    names += [(m.name[:-5], i) for m in tf if m.isfile() and m.name.endswith(".json")]  # (key, shard)
            wanted: dict[int, set[str]] = defaultdict(set)
            for key, i in heapq.nsmallest(first, names):
                wanted[i].add(key + ".json")
        out = []
        for i, path in enumerate(shards):
            if first is not None and i not in wanted:
                continue
            with path.open("rb") as f, tarfile.open(fileobj=f) as tf:
                out += [json.loads(tf.extractfile(m).read()) for m in tf if m.isfile() and m.name.endswith(".json")
                        and (first is None or m.name in wanted[i])]
        return sorted(out, key=lambda s: s["key"])

    def contact_sheet(self, n: int = 4, keys: list[str] | None = None) -> bytes:
        from pipeline.multiid.report import contact_sheet

        chosen = [s for s in self.samples if keys is None or s["key"] in keys][:n]
        return contact_sheet(chosen, self.read_bytes)


def select_references(images: pa.Table, faces: pa.Table, identities: pa.Table, config: MultiIDConfig,
                      read_bytes: Callable[[str], bytes] | None = None) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Reference selection without writing anything: (samples JSON, pair rows, candidate rows, stats).

    Splits are by identity (hash of the identity id) and by photo: a photo feeds one split only.
    When the hash leaves eval without a sample but the collection has at least two, a group of people
    who appear together moves to eval: the co-occurrence component (people linked by sharing a photo)
    of a sample, lowest identity hash first, so that its photos and references move with it (small
    collections; recorded in the stats as ``eval_fallback``). Selection runs per bucket of components
    (:class:`_Plan`), which gives the same samples as one run over the whole collection."""
    plan = _Plan(images, faces, identities, config, read_bytes or reader_from_images(images), keep_rows=True)
    plan.select()
    pair_rows = _in_target_order(b.pair_rows for b in plan.active())
    cand_rows = _in_target_order(b.cand_rows for b in plan.active())
    return plan.samples(), pair_rows, cand_rows, plan.stats()


def _in_target_order(parts) -> list[dict]:
    """Rows of several buckets in the order of one run over the collection: by target uid (stable)."""
    rows = [r for part in parts for r in part]
    return sorted(rows, key=lambda r: r["target_uid"])


def build_multiid_dataset(images: pa.Table, faces: pa.Table, identities: pa.Table, out_dir: Path | None,
                          config: MultiIDConfig | None = None, read_bytes: Callable[[str], bytes] | None = None,
                          version: str | None = None, reuse_from: Path | None = None, workers: int = 1,
                          guard_cache: Path | None = None, engine: str | None = None,
                          feature_store_bytes: int | None = None, progress: Callable[[str], None] | None = None) -> MultiIDResult:
    """Select references, write ``out_dir/{train,eval}/`` shards + manifests (``version`` is the dataset
    version id they record), ``out_dir/pairs.parquet``, ``out_dir/candidates.parquet`` and
    ``out_dir/buckets.json``; return everything. ``out_dir=None``: select only, write nothing. Whether the
    splits leak is decided by :func:`pipeline.multiid.splits.split_leaks` on what was written, not here.

    Shards are written per bucket of co-occurrence components (``<name>-<split>-b<bucket>-<n>.tar``).
    ``reuse_from``: a previous version's local folder; each bucket whose fingerprint equals one recorded
    there, and whose shard files still match their recorded sha256, is not selected again: its shards are
    hard-linked, its rows and counts taken from that version (``stats["buckets_reused"]``). In the other
    buckets, each target whose fingerprint (``out_dir/targets.parquet``, :mod:`pipeline.multiid.reuse`) equals
    the previous version's, and whose previous shard matches its sha256, is not selected again either: its
    tar members are copied from that shard, its rows taken from that version (``stats["targets_reused"]``,
    ``"targets_reselected"``, ``"reselect_reasons"``, ``"bytes_copied"``). The files written are the same,
    byte for byte, as without ``reuse_from``.

    ``workers`` > 1: the selections of all buckets run together in forked worker processes, a large
    bucket's targets cut into chunks of about equal estimated cost, and each sample's shard record made by
    the worker that selected it (:func:`pipeline.multiid.parallel.select_jobs`); the files written are the
    same, byte for byte, as with one worker (tests/test_multiid_parallel.py). ``engine`` (default
    ``$LINEUP_ENGINE``): ``"ray"`` runs those chunks as Ray tasks instead, on a local or remote cluster whose
    workers share no disk with this process (same bytes: tests/test_multiid_ray.py).

    ``guard_cache``: a file of the copy-paste guard's decisions (:mod:`pipeline.multiid.guard_cache`), read
    before and written after the build: a pair of faces already judged under the same settings is not
    judged again (``stats["guard_decisions_reused"]`` / ``"guard_decisions_computed"``); beside it the photos'
    pHashes and the faces' keypoints and NCC patches are kept too, the latter up to ``feature_store_bytes``
    (default ``guard_cache.FEATURES_MAX_BYTES``).

    ``progress(line)``: where the build is, a line at a time (the plan, the targets selected so far with an
    estimate of the time left, the buckets written, the tables), for a log."""
    import shutil

    from pipeline.multiid.progress import BuildProgress

    config = config if config is not None else MultiIDConfig()
    read_bytes = read_bytes or reader_from_images(images)
    out_dir = Path(out_dir) if out_dir is not None else None
    # with out_dir, each bucket is written as soon as it is selected (its samples then dropped); its rows are
    # streamed to part files as they are produced, merged into pairs.parquet / candidates.parquet at the end:
    # what stays in memory per target is a summary tuple, not its rows nor its sample dicts
    def new_plan() -> _Plan:
        return _Plan(images, faces, identities, config, read_bytes, reuse_from if out_dir is not None else None, out_dir=out_dir,
                     workers=workers, guard_cache=guard_cache, engine=engine, feature_store_bytes=feature_store_bytes,
                     progress=BuildProgress(progress))

    plan = new_plan()
    try:
        try:
            return _build(plan, out_dir, version, read_bytes)
        except PreviousShardsDamaged as e:
            # rare (a previous tar changed on disk): selected again, the damaged shards known from the start; the
            # guard's decisions made so far are kept (they depend on the faces, not on the shards)
            plan.progress(f"{e}: selecting again without them")
            shutil.rmtree(plan.parts_dir, ignore_errors=True)
            guard, plan = plan.guard, new_plan()
            plan.guard = guard
            plan.prev_targets.adopt_shard_checks(e.checks)
            result = _build(plan, out_dir, version, read_bytes)
            result.stats["selections_voided_by_damaged_shards"] = 1
            return result
    finally:
        shutil.rmtree(plan.parts_dir, ignore_errors=True)


def _build(plan: _Plan, out_dir: Path | None, version: str | None, read_bytes) -> MultiIDResult:
    """build_multiid_dataset once its plan is made (the caller removes the plan's part files)."""
    from pipeline.multiid.metrics import dataset_quality_stats

    cfg = plan.cfg
    plan.select()
    stats = plan.stats()
    stats["selections_voided_by_damaged_shards"] = 0  # see build_multiid_dataset
    buckets = plan.active()
    shards: dict[str, list[ShardInfo]] = {"train": [], "eval": []}
    # the two tables, streamed in target order (to out_dir, else to the temporary folder and read back)
    dest = out_dir if out_dir is not None else plan.parts_dir

    def write_tables() -> None:
        write_parquet_stream_atomic(plan.rows_in_target_order("pairs", PAIRS_SCHEMA), PAIRS_SCHEMA, dest / "pairs.parquet")
        write_parquet_stream_atomic(plan.rows_in_target_order("candidates", CANDIDATE_SCHEMA), CANDIDATE_SCHEMA,
                                    dest / "candidates.parquet")

    # the tables need no shard and the shards no table: with worker processes, the tables are written by a
    # forked process while this one writes the shards (one after the other, they were a fifth of a 1% refresh's
    # wall time at 100k faces, one core idle)
    beside = out_dir is not None and plan.workers > 1 and plan.engine == "inprocess" and not is_remote(dest)
    plan.progress("writing the shards, and pairs.parquet and candidates.parquet " + ("beside them" if beside else "after them"))
    with parallel.alongside(write_tables, fork=beside):
        plan.emit()
    for b in buckets:
        b.pairs = b.cands = None
    stats["data_quality"] = dataset_quality_stats(read_parquet(dest / "pairs.parquet", columns=QUALITY_COLUMNS))
    pairs = cands = None
    if out_dir is None:
        pairs, cands = read_parquet(dest / "pairs.parquet"), read_parquet(dest / "candidates.parquet")
    samples = None if out_dir is not None else plan.samples()
    reused_bytes = sum(sh.bytes for b in buckets if b.previous is not None for v in b.infos.values() for sh in v)
    if out_dir is not None:
        conf = cfg.to_dict()
        records = {}
        for b in buckets:
            rec = {"fingerprint": b.fingerprint, "photos": len(b.uids), "eval_override": b.override, "shards": {}, "counts": b.counts}
            for split in ("train", "eval"):
                infos = b.infos.get(split, [])
                shards[split] += infos
                if infos:
                    rec["shards"][split] = [shard_record(i) for i in infos]
            records[b.name] = rec
        for split in ("train", "eval"):
            summ = [t for b in buckets for t in b.summary if t[1] == split]
            write_manifest(out_dir / split, cfg.dataset_name, shards[split], conf, version=version, split=split, extra={
                "num_persons": sum(len(t[2]) for t in summ),
                "num_refs": sum(sum(t[3]) for t in summ), "ref_mode": cfg.ref_mode,
                "counts": {k: stats[k] for k in ("images", "targets", "candidates_removed_by", "duplicate_flags_independent")},
            })
        # targets.parquet: each bucket's targets are sorted by uid, and a target is in one bucket
        write_parquet_stream_atomic(_merge_in_target_order([[b.targets] for b in buckets if b.targets is not None and b.targets.num_rows],
                                                           TARGETS_SCHEMA), TARGETS_SCHEMA, out_dir / TARGETS_FILE)
        from pipeline.storage import write_bytes_atomic

        write_bytes_atomic(json.dumps({"bucket_count": cfg.reuse_buckets, "buckets": records}, sort_keys=True, indent=1).encode(),
                           out_dir / BUCKETS_FILE)
        stats["config_fingerprint"] = config_fingerprint(conf)
    # how the build went (not written into the version: a reused build writes the same files as a fresh one)
    stats["buckets_reused"] = sum(b.previous is not None for b in buckets)
    stats["buckets_rebuilt"] = sum(b.previous is None for b in buckets)
    stats["bytes_reused"] = reused_bytes
    stats["selections_run"] = plan.selections
    stats["buckets_not_reused_corrupt"] = plan.corrupt
    # per-target reuse (a build that writes): targets taken from the previous version (those of reused buckets
    # included) vs selected again, and why; member bytes copied from its tars vs written from the photos
    stats["targets_reused"] = sum(b.n_reused for b in buckets)
    stats["targets_reused_over_cap_updated"] = sum(b.n_over_cap for b in buckets)
    stats["targets_reselected"] = sum(sum(b.reasons.values()) for b in buckets)
    # of the targets whose candidates changed, those derived from their previous rows without a selection
    stats["targets_derived"] = sum(len(b.derived) for b in buckets)
    stats["not_derived_because"] = dict(sorted(sum((b.not_derived for b in buckets), Counter()).items()))
    stats["reselect_reasons"] = dict(sorted(sum((b.reasons for b in buckets), Counter()).items()))
    # of the candidates of targets selected again, those screened from their previous rows (photos unchanged),
    # and of those the rows the walk changed (the others taken from the previous table as they were)
    stats["candidates_screened_from_previous"] = sum(b.previous_rows.get("screened", 0) for b in buckets)
    stats["candidate_rows_changed_by_walk"] = sum(b.previous_rows.get("rows_changed", 0) for b in buckets)
    stats["bytes_copied"] = sum(b.bytes_copied for b in buckets)
    stats["bytes_written"] = sum(b.bytes_written for b in buckets)
    if plan.guard is not None:
        stats["guard_decisions_reused"] = plan.guard.hits
        stats["guard_decisions_computed"] = plan.guard.save()
        if plan.guard.photos is not None:
            # photos whose pHashes came from the store (not decoded for them), and those decoded and kept now
            stats["photo_hashes_reused"] = plan.guard.photos.hits
            stats["photo_hashes_computed"] = plan.guard.photos.save(set(plan.img_meta) | set(plan.by_uid))
        if plan.guard.features is not None:
            # keypoints and patches taken from the store / worked out and kept (this process's; forked workers
            # keep theirs in the same folder), and the store once photos gone from the collection are dropped
            stats["face_features_reused"] = plan.guard.features.loaded
            stats["face_features_computed"] = plan.guard.features.computed
            stats["face_features_pruned"] = plan.guard.features.prune(set(plan.img_meta) | set(plan.by_uid))
            stats["face_features_entries"], stats["face_features_bytes"] = plan.guard.features.size()
    plan.progress(f"built: {sum(stats['per_split'].values()):,} samples ({stats['targets_reselected']:,} targets selected, "
                  f"{stats['targets_reused']:,} reused, {stats['targets_derived']:,} derived)")
    return MultiIDResult(pairs, cands, samples, stats, shards, out_dir, cfg, read_bytes)
