"""The multi-identity builder's buckets and reuse planning: photos grouped by co-occurrence component into
fixed buckets, each bucket's fingerprint, a bucket or target reused from the previous version or selected again
(:mod:`pipeline.multiid.parallel`), its shards written (:mod:`pipeline.multiid.rows`), and the build's statistics."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.datasets import fingerprint_table, new_lease, owner_gone, read_lease
from pipeline.multiid import parallel, selection
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.progress import counted
from pipeline.multiid.reuse import (
    NO_PREVIOUS_CANDIDATES,
    TARGETS_FILE,
    TARGETS_SCHEMA,
    PreviousRows,
    PreviousRowsWriter,
    PreviousTargets,
    TargetFingerprints,
    TargetTally,
    common_digest,
    derive_added_candidates,
    patch_over_cap,
    patched_records,
    photo_digests,
    previous_candidates_by_target,
    reselect_reason,
    reused_records,
    target_counts,
)
from pipeline.multiid.rows import (
    CANDIDATE_SCHEMA,
    PAIRS_SCHEMA,
    SIM_BINS,
    _hist_from_counts,
    _merge_in_target_order,
    _part_batches,
    _RowParts,
    _shard_samples,
    _spilled_records,
    _TakenRows,
)
from pipeline.multiid.selection import FaceRec, _faces_from_table, unusable_reason
from pipeline.multiid.splits import identity_split
from pipeline.shards import (
    ShardInfo,
    link_or_copy,
    previous_buckets,
    shards_intact,
    write_shards,
)
from pipeline.splits import hash_fraction
from pipeline.storage import write_bytes_atomic

IMAGE_COLUMNS = ["uid", "source", "caption", "width", "height"]  # what a sample takes from the images table
# a bucket's derivation (_Plan._derive) is split over the forked workers when each gets this many targets
DERIVE_PARALLEL_MIN = 512


class PreviousShardsDamaged(Exception):
    """Previous shards checked beside a selection (reuse.PreviousTargets.check_beside) failed their check after the
    selection took them for intact: it is made again, knowing ``checks`` (shard -> problems)."""

    def __init__(self, damaged: list[str], checks: dict[str, list[str]]):
        super().__init__(f"previous shards damaged: {', '.join(damaged)}")
        self.damaged, self.checks = damaged, checks


# the builder's part files (rows and sample records, up to the size of the shards) go to a folder in out_dir
# named so, with its owner's lease in it: a build killed with -9 cannot remove it, the next build does
PARTS_PREFIX, PARTS_OWNER = ".rows-", "owner.json"


def remove_dead_parts(out_dir: Path) -> list[str]:
    """Remove the part folders in ``out_dir`` left by builds that were killed (their owner gone, on this host)."""
    import shutil

    removed = []
    for p in Path(out_dir).glob(PARTS_PREFIX + "*"):
        if p.is_dir() and owner_gone(read_lease(p / PARTS_OWNER)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def bucket_of(group: str, n: int) -> int:
    """The bucket of a co-occurrence component (named by its smallest identity id, or ``photo:<uid>`` for
    a photo without a labelled face): a hash modulo the fixed ``reuse_buckets``."""
    return int.from_bytes(hashlib.sha256(f"multiid-bucket\x1f{group}".encode()).digest()[:8], "big") % n


@dataclass
class _Bucket:
    """The photos of some co-occurrence components, selected and sharded together."""

    index: int
    uids: list[str]
    identities: set[str]
    base_fingerprint: str = ""
    override: list[str] = field(default_factory=list)  # identities of this bucket moved to eval by the fallback
    samples: list[dict] = field(default_factory=list)
    pair_rows: list[dict] = field(default_factory=list)
    cand_rows: list[dict] = field(default_factory=list)
    pairs: Path | None = None  # the rows as Parquet part files (a build that writes keeps no row in memory)
    cands: Path | None = None
    summary: list[tuple] = field(default_factory=list)  # per sample: (key, split, faces' identity ids, refs per face)
    infos: dict = field(default_factory=dict)  # split -> the ShardInfos written for this bucket
    counts: dict = field(default_factory=dict)
    previous: dict | None = None  # the record of an identical bucket in the previous version (reused)
    # per-target reuse (a build that writes): targets.parquet rows of this bucket; the samples copied from
    # the previous version's tars (split -> previous shard -> keys); why targets were selected again
    targets: pa.Table | None = None
    copied: dict = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    n_reused: int = 0
    reused: list[str] = field(default_factory=list)  # in a bucket selected again, its targets reused (rows: previous version)
    n_over_cap: int = 0  # of them, targets whose people gained or lost faces only outside their examined candidates
    # targets derived from their previous rows (reuse.derive_added_candidates): their rows' part files
    # (name -> path), and per sample key the counts its JSON raises
    derived: list[str] = field(default_factory=list)
    derived_parts: dict = field(default_factory=dict)  # table name -> its part files
    derived_faces: dict = field(default_factory=dict)
    not_derived: Counter = field(default_factory=Counter)  # why targets whose candidates changed were not derived
    evictions: dict = field(default_factory=dict)  # the cache evictions of this run's selection (not recorded)
    # of its targets selected again, the candidates screened from their previous rows, and the rows the walk changed
    previous_rows: dict = field(default_factory=dict)
    records: dict | None = None  # key -> the place of its shard record in a spill file (made by the selecting process)
    bytes_copied: int = 0
    bytes_written: int = 0

    @property
    def name(self) -> str:
        return f"b{self.index:04d}"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.base_fingerprint, self.override]).encode()).hexdigest()[:32]

    def per_split(self) -> Counter:
        return Counter(t[1] for t in self.summary)

    def state(self) -> tuple:
        return (self.override, self.samples, self.pair_rows, self.cand_rows, self.pairs, self.cands, self.summary, self.counts,
                self.previous, self.targets, self.copied, self.reasons, self.n_reused, self.reused, self.n_over_cap, self.evictions,
                self.records, self.derived, self.derived_parts, self.derived_faces, self.not_derived, self.previous_rows)

    def restore(self, state: tuple) -> None:
        (self.override, self.samples, self.pair_rows, self.cand_rows, self.pairs, self.cands, self.summary, self.counts,
         self.previous, self.targets, self.copied, self.reasons, self.n_reused, self.reused, self.n_over_cap, self.evictions,
         self.records, self.derived, self.derived_parts, self.derived_faces, self.not_derived, self.previous_rows) = state


def _summary(samples: list[dict]) -> list[tuple]:
    return [(s["key"], s["split"], tuple(fj["identity_id"] for fj in s["faces"]), tuple(len(fj["refs"]) for fj in s["faces"]))
            for s in samples]


def _summary_of_targets(t: pa.Table) -> list[tuple]:
    """The summary of the kept targets of targets.parquet rows (what :func:`_summary` gives from their samples)."""
    cols = [t.column(c).to_pylist() for c in ("outcome", "key", "split", "persons", "refs")]
    return sorted((k, sp, tuple(p), tuple(r)) for o, k, sp, p, r in zip(*cols) if o == "kept")


class _Plan:
    """Reference selection bucket by bucket, reusing the buckets of a previous version that have the same
    fingerprint. A sample depends only on the photos of its co-occurrence component (a target's
    references are faces of its people in other photos, so in photos of the same component), on the
    config, the builder and the face models: a bucket's fingerprint covers exactly these, plus which of
    its identities the eval fallback moved. Inside a bucket that changed, a target's own fingerprint
    (:class:`pipeline.multiid.reuse.TargetFingerprints`) decides whether it is selected again."""

    def __init__(self, images: pa.Table, faces: pa.Table, identities: pa.Table, config: MultiIDConfig, read_bytes,
                 previous: Path | None = None, out_dir: Path | None = None, keep_rows: bool = False, workers: int = 1,
                 guard_cache: Path | None = None, engine: str | None = None, feature_store_bytes: int | None = None,
                 progress=None):
        from pipeline import __version__
        from pipeline.multiid.progress import BuildProgress
        from pipeline.multiid.release import BUILDER_VERSION, FACE_COLUMNS

        config.validate()
        self.progress = progress if progress is not None else BuildProgress()
        self.cfg = cfg = config.resolved()
        self.read_bytes = read_bytes
        self.by_uid = _faces_from_table(faces, identities)
        backends = sorted(set(faces.column("backend").to_pylist())) if "backend" in faces.column_names and faces.num_rows else [cfg.backend]
        self.mversions = sorted(set(faces.column("model_version").to_pylist())) if "model_version" in faces.column_names and faces.num_rows else [""]
        if any(b != cfg.backend for b in backends):
            raise ValueError(f"faces table comes from backend(s) {backends}, config says {cfg.backend!r}: thresholds would not apply")
        # the few image columns a sample uses, not every column of every row
        self.img_meta = {r["uid"]: r for r in images.select([c for c in IMAGE_COLUMNS if c in images.column_names]).to_pylist()}
        self.component = _cooccurrence_components(self.by_uid)
        groups: dict[int, list[str]] = defaultdict(list)
        # a component's smallest identity, once per component: min() per photo over a component that holds
        # most identities (co-occurrence chains people together at scale) was quadratic, ~20 min at 1M faces
        smallest: dict[int, str] = {}  # id() of the component's set (shared by its identities) -> its min
        for uid in sorted(set(self.img_meta) | set(self.by_uid)):
            ids = [f.identity_id for f in self.by_uid.get(uid, []) if f.identity_id is not None]
            if ids:
                comp = self.component[ids[0]]
                group = smallest.get(id(comp))
                if group is None:
                    group = smallest[id(comp)] = min(comp)
            else:
                group = f"photo:{uid}"
            groups[bucket_of(group, cfg.reuse_buckets)].append(uid)
        self.buckets = {b: _Bucket(b, uids, {f.identity_id for u in uids for f in self.by_uid.get(u, []) if f.identity_id is not None})
                        for b, uids in sorted(groups.items())}
        # fingerprints: what decides a bucket's samples, its shards and its rows
        common_parts = {"builder": BUILDER_VERSION, "library": __version__, "config": cfg.to_dict(),
                        "backends": backends, "model_versions": self.mversions}
        common = json.dumps(common_parts, sort_keys=True, default=str)
        face_cols = FACE_COLUMNS + ["source"]
        tables = [(images, IMAGE_COLUMNS, ["uid"]), (faces, face_cols, ["uid", "face_index"]),
                  (identities, ["uid", "face_index", "identity_id"], ["uid", "face_index"])]
        # each table's rows by bucket (ascending), as index arrays: no Python object per row of the tables
        import pyarrow.compute as pc

        all_uids = pa.array([u for b in self.buckets.values() for u in b.uids], pa.string())
        bucket_no = np.array([b.index for b in self.buckets.values() for _ in b.uids], np.int64)
        rows_of = []
        for t, _, _ in tables:
            pos = pc.fill_null(pc.index_in(t.column("uid"), value_set=all_uids), -1).to_numpy()
            of_row = np.where(pos >= 0, bucket_no[np.maximum(pos, 0)], -1) if len(pos) else np.zeros(0, np.int64)
            order = np.argsort(of_row, kind="stable")
            rows_of.append((order, of_row[order]))
        for b in self.buckets.values():
            h = hashlib.sha256(common.encode())
            for (t, cols, sort_by), (order, sorted_b) in zip(tables, rows_of):
                rows = order[np.searchsorted(sorted_b, b.index, "left"):np.searchsorted(sorted_b, b.index, "right")]
                h.update(fingerprint_table(t, cols, sort_by, rows=rows).encode())
            b.base_fingerprint = h.hexdigest()[:32]
        self.previous = Path(previous) if previous is not None else None
        # out_dir: each bucket's shards are written as soon as it is selected, and its samples dropped;
        # keep_rows: keep the row dicts (select_references), else the rows are streamed to Parquet part
        # files in ``parts_dir`` (in out_dir, else a temporary folder; the caller removes it)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.keep_rows = keep_rows
        self.parts_dir: Path | None = None
        if not keep_rows:
            import tempfile

            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                remove_dead_parts(self.out_dir)
            self.parts_dir = Path(tempfile.mkdtemp(prefix=PARTS_PREFIX, dir=self.out_dir))
            write_bytes_atomic(json.dumps(new_lease()).encode(), self.parts_dir / PARTS_OWNER)
        self.previous_records = previous_buckets(self.previous, ("pairs.parquet", "candidates.parquet", TARGETS_FILE))
        # per-target reuse when writing: each photo's digest, and the previous version's targets
        self.per_target = self.out_dir is not None
        self.digests = photo_digests(tables) if self.per_target else {}
        self.common_digest = common_digest(common_parts)
        self.prev_targets = PreviousTargets(self.previous if self.per_target else None, self.previous_records)
        self.selections = 0
        self.workers = max(1, int(workers)) if not keep_rows else 1
        from pipeline.engine import engine_name

        self.engine = engine_name(engine) if not keep_rows else "inprocess"
        # Ray tasks read the photos themselves: their locators are checked once, before the first selection
        self.photos_for_workers = images.column("path").to_pylist() if self.engine == "ray" and "path" in images.column_names else None
        from pipeline.multiid.guard_cache import GuardDecisions

        self.guard = GuardDecisions(guard_cache, {k: getattr(cfg, k) for k in (
            "image_hamming_max", "face_hamming_max", "face_ncc_min", "keypoints", "kp_min_inliers", "kp_min_ratio",
            "kp_strong_inliers")}, feature_store_bytes) if guard_cache is not None else None
        self.corrupt: list[str] = []
        self.eval_fallback: list[str] = []
        self.progress(f"planned {counted(len(self.img_meta), 'photo')}, {counted(faces.num_rows, 'face')}, in {counted(len(self.buckets), 'bucket')}"
                      + (f"; previous version {self.previous.name}" if self.previous is not None else ""))

    def split_of(self, identity_id: str) -> str:
        if identity_id in self.eval_fallback:
            return "eval"
        return identity_split(identity_id, self.cfg.eval_fraction, self.cfg.split_salt)

    def active(self) -> list[_Bucket]:
        return list(self.buckets.values())

    def _run(self, b: _Bucket, override: set) -> None:
        """Fill bucket ``b`` with the eval override ``override`` now (:meth:`_start_run`, its selection run)."""
        pending = self._start_run(b, override)
        if pending is not None:
            job, finish = pending
            (result,) = self._select_jobs([job])
            finish(result)

    def _select_jobs(self, jobs: list) -> list:
        if self.photos_for_workers is not None:
            from pipeline import ray_engine

            ray_engine.ensure_ray()
            ray_engine.require_readable(self.photos_for_workers)
            self.photos_for_workers = None
        return parallel.select_jobs(jobs, self.workers, self.parts_dir, self.cfg, self.read_bytes, self.mversions,
                                    guard=self.guard, engine=self.engine, progress=self.progress)

    def _start_run(self, b: _Bucket, override: set):
        """Fill bucket ``b`` with the eval override ``override``: from the previous version when it holds
        an intact bucket with the same fingerprint, else by selecting references over its photos; a build
        that writes selects only the targets whose fingerprint changed (:mod:`pipeline.multiid.reuse`).
        Returns None when the bucket is filled, else (the selection job to run, what to do with its result):
        the plan runs the jobs of all buckets together (:func:`pipeline.multiid.parallel.select_jobs`)."""
        b.override = sorted(override & b.identities)
        b.previous = None
        b.copied, b.reasons, b.n_reused, b.n_over_cap, b.evictions = {}, Counter(), 0, 0, {"images": 0, "keypoints": 0}
        b.reused, b.records = [], None
        b.derived, b.derived_parts, b.derived_faces, b.not_derived = [], {}, {}, Counter()
        rec = self.previous_records.get(b.name)
        targets = [u for u in b.uids if u in self.img_meta]
        if rec is not None and rec.get("fingerprint") == b.fingerprint and self.prev_targets:
            problems = [f"{split}/{p}" for split, shards in sorted(rec.get("shards", {}).items())
                        for p in shards_intact(self.previous / split, shards)]
            if not problems and all(u in self.prev_targets.row for u in targets):
                b.previous = rec
                b.counts = rec["counts"]
                b.targets = self.prev_targets.take(targets)
                b.summary = _summary_of_targets(b.targets)
                b.n_reused = len(targets)
                b.samples = []
                b.pair_rows = b.cand_rows = []  # taken from the previous version's tables when written
                b.pairs = b.cands = None
                return None
            self.corrupt += [f"{b.name}: {p}" for p in problems]
        img_meta = {u: self.img_meta[u] for u in b.uids if u in self.img_meta}
        by_uid = {u: self.by_uid[u] for u in b.uids if u in self.by_uid}
        # each run its own part files: a trial of the eval fallback that is undone keeps the earlier run's
        if not self.per_target:
            if self.keep_rows:
                b.samples, pair_rows, cand_rows, b.counts = selection._select(img_meta, by_uid, self.cfg, self.read_bytes, override,
                                                                     self.mversions)
                b.pair_rows, b.cand_rows, b.pairs, b.cands = pair_rows, cand_rows, None, None
                b.evictions = b.counts.pop("cache_evictions")
                b.summary = _summary(b.samples)
                self.selections += 1
                return None
            job = parallel.SelectionJob(f"{b.name}-{self.selections}", img_meta, by_uid, override,
                                        records=self.out_dir is not None)
            self.selections += 1

            def finish(result) -> None:
                b.samples, b.counts, b.pairs, b.cands, b.records = result
                b.pair_rows, b.cand_rows = [], []
                b.evictions = b.counts.pop("cache_evictions")
                b.summary = _summary(b.samples)

            return job, finish
        return self._start_per_target(b, override, targets, img_meta, by_uid)

    def _start_per_target(self, b: _Bucket, override: set, targets: list[str], img_meta: dict, by_uid: dict):
        """Select only the targets of ``b`` whose fingerprint differs from the previous version's (or whose
        previous shard fails its sha256); take the others' rows from that version and copy their members."""
        cfg = self.cfg

        def split_of(i: str) -> str:
            return "eval" if i in override else identity_split(i, cfg.eval_fraction, cfg.split_salt)

        def usable(f) -> bool:
            return unusable_reason(f, cfg.min_face_px, cfg.det_score_min, cfg.blur_min) is None

        tf = TargetFingerprints(b.uids, by_uid, self.digests, split_of, usable, self.common_digest, cfg.max_candidates_per_person)
        fps = {u: tf.whole(u) for u in targets}
        over_cap: dict[str, int] = {}  # reused targets whose examined candidates are the same, their over-cap count not
        prev = self.prev_targets
        reuse, run, why = [], [], {}
        # targets with a person over the cap: their examined subsets are chosen from their previous rows, which
        # _derive reads anyway (TargetFingerprints.seed_examined), and compared there
        deferred: set[str] = set()
        can_defer = not cfg.examine_all_candidates and self.parts_dir is not None
        reasons = {}
        for u in targets:
            was = prev.get(u) if prev else None
            reason = reselect_reason(was, fps[u]) if prev else "no_previous_version"
            if reason == "candidates_changed":
                if was["examined"] == tf.early(u):  # dropped before its candidates, and still will be
                    reason = None
                elif can_defer and tf.over_cap_people(u):
                    deferred.add(u)
                elif was["examined"] == tf.examined(u):
                    reason, over_cap[u] = None, tf.over_cap(u)
            reasons[u] = reason
        for u, reason in reasons.items():
            if reason is None and self._previous_shard_damaged(b, u):
                reason = "previous_shard_damaged"
            if reason is None:
                reuse.append(u)
            else:
                why[u] = reason
        derived, written, derived_hist, same_examined = self._derive(
            b, tf, [u for u, r in why.items() if r == "candidates_changed"], img_meta, by_uid, split_of, deferred)
        for u in sorted(same_examined):  # a deferred target whose examined candidates are the previous ones
            if self._previous_shard_damaged(b, u):
                why[u] = "previous_shard_damaged"
            else:
                del why[u]
                reuse.append(u)
                over_cap[u] = tf.over_cap(u)
        reuse.sort()
        for u, reason in why.items():
            if u not in derived:
                run.append(u)
                b.reasons[reason] += 1
        b.n_reused, b.n_over_cap = len(reuse), len(over_cap)
        b.reused = reuse
        b.pair_rows, b.cand_rows, b.pairs, b.cands = [], [], None, None
        tally, job = None, None
        if run:
            # the selected targets' rows are streamed to part files like a whole bucket's (:meth:`_run`); what
            # targets.parquet needs of them (the examined fingerprint, the unreadable references) is taken
            # as each target's candidate rows are final, not read back
            def on_candidates(u: str, rows: list[tuple]) -> tuple[bytes, list[str]]:
                return (tf.examined_from_rows(u, [r[:3] for r in rows]), [r[1] for r in rows if r[3] == "unreadable_reference"])

            tally = TargetTally(on_candidates)
            job = parallel.SelectionJob(f"{b.name}-{self.selections}", img_meta, by_uid, override, targets=run, tally=tally,
                                        records=self.out_dir is not None,
                                        previous=self._previous_rows(written, tf, by_uid, run),
                                        known_subsets=tf.subsets_of(run) or None)
            self.selections += 1
        if job is None:
            self._finish_per_target(b, tf, fps, run, reuse, over_cap, tally, [], {}, derived, derived_hist)
            return None

        def finish(result) -> None:
            samples, counts, b.pairs, b.cands, b.records = result
            b.evictions = counts["cache_evictions"]
            b.previous_rows = counts.pop("previous_rows", {})
            self._finish_per_target(b, tf, fps, run, reuse, over_cap, tally, samples, counts, derived, derived_hist)

        return job, finish

    def _previous_rows(self, written: list, tf, by_uid: dict, run: list[str]):
        """The previous candidate rows the derivation wrote for targets it could not keep (``written``: (path,
        target -> rows) per file) as a reuse.PreviousRows for the selection of ``run``; None without any."""
        index = {u: (k, *at) for k, (_, of) in enumerate(written) for u, at in of.items()}
        if not index.keys() & set(run):
            return None
        prev = self.prev_targets
        return PreviousRows([p for p, _ in written], index, frozenset(p for p in by_uid if not tf.unchanged(p, prev)))

    def _previous_shard_damaged(self, b: _Bucket, u: str) -> bool:
        """Whether the previous shard holding target ``u``'s sample fails its check (its problems recorded once)."""
        shard = self.prev_targets.shard[u]
        problems = self.prev_targets.shard_problems(shard) if shard is not None else []
        self.corrupt += [f"{b.name}: {p}" for p in problems if f"{b.name}: {p}" not in self.corrupt]
        return bool(problems)

    def _derive(self, b: _Bucket, tf, uids: list[str], img_meta: dict, by_uid: dict, split_of,
                deferred: set[str] = frozenset()) -> tuple[dict[str, dict], dict, dict, set[str]]:
        """Of ``uids`` (targets whose people's candidates changed), those whose rows derive from the previous
        version's (:func:`pipeline.multiid.reuse.derive_added_candidates`): uid -> what it gives (its counts, its
        faces' new counts, its examined fingerprint). Their rows go to part files, written a batch at a time as
        the previous rows stream past (one target's previous rows in memory at a time, not those of every
        changed target); their samples are copied from the previous tars, the JSON's counts raised.
        And for the others, selected again, their previous candidate rows, written to Arrow files in the parts
        folder ((path, target -> (first row, end row)) per file; reuse.PreviousRows): their candidates whose photos
        did not change are not screened again.
        Third: the similarity histograms of the derived rows, by table. Fourth: the targets of ``deferred`` (people
        over the cap, their examined fingerprint not compared yet) whose examined candidates are the previous
        version's: the caller reuses them (their subsets are chosen here from their previous rows,
        TargetFingerprints.seed_examined, before anything else is done with them).

        With forked workers and at least DERIVE_PARALLEL_MIN targets a worker, the targets are cut into one run of
        consecutive uids per worker, derived side by side (:meth:`_derive_targets`; before, this serial pass was
        a quarter of a 1% refresh's wall time at 100k faces); what a worker works out that the plan keeps (the
        examined subsets it chose, the previous shards it checked, the pHashes it computed) comes back with it."""
        cfg = self.cfg
        hist = {"candidates": np.zeros(len(SIM_BINS) - 1, np.int64), "pairs": np.zeros(len(SIM_BINS) - 1, np.int64)}
        if not uids or cfg.examine_all_candidates or self.parts_dir is None:
            return {}, [], hist, set()
        want = sorted(uids)
        ctx = {"cfg": cfg, "prepared": selection._prepare(by_uid, cfg, set(b.override)), "img_meta": img_meta, "split_of": split_of,
               "fingerprints": selection._new_fingerprints(self.read_bytes, by_uid, cfg,
                                                           stored=self.guard.photos if self.guard is not None else None)}
        counts_of = dict(zip(want, self.prev_targets.take(want).column("counts").to_pylist()))
        stem = f"{b.name}-derived-{self.selections}"
        args = (b, tf, ctx, counts_of, by_uid, deferred)
        n = min(self.workers, len(want) // DERIVE_PARALLEL_MIN) if self.engine == "inprocess" else 1
        self.progress(f"bucket {b.name}: {counted(len(want), 'target')} whose candidates changed checked against their previous rows "
                      f"(kept where the choice cannot change) in {counted(max(1, n), 'process', 'es')}")
        if n > 1 and parallel.can_fork():
            self._hash_changed_photos(tf, by_uid, n)
            ranges = [want[k * len(want) // n:(k + 1) * len(want) // n] for k in range(n)]
            parts = parallel.fork_map(lambda k: self._derive_range(args, ranges[k], f"{stem}-p{k}"), list(range(n)), n)
            for part in parts:  # what the worker worked out that this process keeps
                tf.adopt_subsets(part["subsets"])
                self.prev_targets.adopt_shard_checks(part["intact"], part["assumed"])
                if self.guard is not None and self.guard.photos is not None:
                    self.guard.photos.add(part["photos"][0])
                    self.guard.photos.hits += part["photos"][1]
        else:
            parts = [self._derive_targets(*args, want, stem)]
        out, written, same_examined, paths = {}, [], set(), {"candidates": [], "pairs": []}
        for part in parts:
            out.update(part["out"])
            if part["previous"] is not None:
                written.append(part["previous"])
            same_examined |= part["same_examined"]
            b.not_derived.update(part["not_derived"])
            for name in hist:
                hist[name] += part["hist"][name]
                if part["paths"].get(name) is not None:
                    paths[name].append(part["paths"][name])
        if any(paths.values()):
            self.selections += 1
        if out:
            b.derived = sorted(out)
            b.derived_parts = paths
        return out, written, hist, same_examined

    def _hash_changed_photos(self, tf, by_uid: dict, n: int) -> None:
        """The pHashes of the bucket's photos new or changed since the previous version (not in the pHash store),
        worked out in ``n`` forked processes and kept in the store before the derivation forks: its processes
        screen those photos' faces as new candidates, each decoding those its targets meet (most of them, in
        every process)."""
        photos = self.guard.photos if self.guard is not None else None
        if photos is None:
            return
        fresh = [p for p in sorted(by_uid) if by_uid[p] and p not in photos.entries and not tf.unchanged(p, self.prev_targets)]
        if len(fresh) < n:
            return
        parts = parallel.fork_map(lambda k: selection.photo_hashes(fresh[k::n], by_uid, self.cfg, self.read_bytes, stored=photos),
                                  list(range(n)), n)
        for part in parts:
            for uid, value in part.items():
                photos.record_from(uid, by_uid, value)

    def _derive_range(self, args: tuple, want: list[str], stem: str) -> dict:
        """In a forked worker: :meth:`_derive_targets` over the run of targets ``want``, and what the plan keeps
        of the worker's work: the examined subsets chosen for the targets to select ((target, person) ->
        refs), the previous shards checked, the pHashes worked out (and the lookups served from the store)."""
        tf = args[1]
        photos = self.guard.photos if self.guard is not None else None
        photos_at, hits_at = (len(photos.new), photos.hits) if photos is not None else (0, 0)
        part = self._derive_targets(*args, want, stem)
        # the subsets of the targets to select (the derived and the reused need none)
        part["subsets"] = tf.chosen_subsets(set(want) - part["out"].keys() - part["same_examined"])
        part["intact"] = self.prev_targets.shard_checks()
        part["assumed"] = self.prev_targets.assumed
        part["photos"] = (photos.new[photos_at:], photos.hits - hits_at) if photos is not None else ([], 0)
        return part

    def _derive_targets(self, b: _Bucket, tf, ctx: dict, counts_of: dict, by_uid: dict, deferred: set[str], want: list[str],
                        stem: str) -> dict:
        """:meth:`_derive` over the targets ``want`` (sorted): {"out", "previous", "hist", "same_examined",
        "not_derived", "paths"} (the part file of each table, None when no row was written; "previous": the
        previous rows of the targets to select again, :class:`reuse.PreviousRowsWriter`'s, or None)."""
        from pipeline.multiid.rows import _rows_by_target

        hist = {"candidates": np.zeros(len(SIM_BINS) - 1, np.int64), "pairs": np.zeros(len(SIM_BINS) - 1, np.int64)}
        sink = None

        def write(name: str, table: pa.Table) -> None:
            nonlocal sink
            if sink is None:
                sink = _RowParts(self.parts_dir, stem)
            sim = np.asarray(table.column("similarity").to_numpy(zero_copy_only=False), np.float64)
            hist[name] += np.histogram(sim, bins=SIM_BINS)[0]
            sink.write(name, table)

        pending = {"candidates": _TakenRows(CANDIDATE_SCHEMA, lambda t: write("candidates", t)),
                   "pairs": _TakenRows(PAIRS_SCHEMA, lambda t: write("pairs", t))}
        out, same_examined, not_derived = {}, set(), Counter()
        previous = PreviousRowsWriter(self.parts_dir / f"{stem}-previous.arrow", CANDIDATE_SCHEMA)
        wanted = pa.array(want, pa.string())
        old_candidates = previous_candidates_by_target(
            _part_batches(self.previous / "candidates.parquet", CANDIDATE_SCHEMA, wanted))
        old_pair_rows = _rows_by_target(_part_batches(self.previous / "pairs.parquet", PAIRS_SCHEMA, wanted))
        try:
            for u, old_cands, old_pairs in _zip_by_target(want, old_candidates, old_pair_rows):
                old_cands = old_cands or NO_PREVIOUS_CANDIDATES
                examined = None
                if u in deferred:
                    tf.seed_examined(u, old_cands.refs(), self.prev_targets)
                    examined = tf.examined(u)
                    if self.prev_targets.get(u)["examined"] == examined:
                        same_examined.add(u)
                        continue
                shard = self.prev_targets.shard[u]
                d = "previous_shard_damaged" if shard is not None and self.prev_targets.shard_problems(shard) else None
                if d is None:
                    d = derive_added_candidates(u, old_cands, old_pairs, counts_of[u], tf, self.prev_targets, by_uid, ctx)
                ob = old_cands.batch
                if not isinstance(d, str):
                    # its rows in target order, each target's in its order; only what the plan needs is kept
                    pending["candidates"].add(ob.table, d["candidates"])
                    pending["pairs"].add(None, d["pairs"])
                    # a derived target's rows are its examined candidates, in examined order
                    out[u] = {"counts": d["counts"], "faces": d["faces"], "examined": examined or tf.examined_from_rows(
                        u, [(ob.identity[x], ob.ref_uid[x], ob.ref_face[x]) if isinstance(x, int)
                            else (x["identity_id"], x["ref_uid"], x["ref_face_index"]) for x in d["candidates"]])}
                    continue
                if d != "previous_shard_damaged":  # its sample cannot be copied: selected again, not counted
                    not_derived[d] += 1
                previous.add(u, old_cands)
            for rows in pending.values():
                rows.flush()
        finally:
            if sink is not None:
                sink.close()
            written = previous.close()
        paths = dict(sink.paths) if sink is not None else {}
        return {"out": out, "previous": written, "hist": hist, "same_examined": same_examined, "not_derived": not_derived,
                "paths": paths}

    def _finish_per_target(self, b: _Bucket, tf, fps: dict, run: list[str], reuse: list[str], over_cap: dict, tally,
                           samples: list[dict], counts: dict, derived: dict | None = None, derived_hist: dict | None = None) -> None:
        """Bucket ``b``'s targets.parquet rows, summary and counts, once its selected targets are selected."""
        prev = self.prev_targets
        # targets.parquet rows of the selected targets
        sample_of = {s["target"]["uid"]: s for s in samples}
        errors = counts.get("unreadable", {})
        rows = []
        for u in run:
            reasons, removed, flags = tally.shares(u)
            (outcome,) = reasons
            # candidates_total is counted for every person of a target that reached its candidates
            examined, unreadable_refs = tally.seen[u] if "candidates_total" in removed else (tf.early(u), [])
            seen = [*unreadable_refs, *([u] if outcome == "unreadable_target" else [])]
            s = sample_of.get(u)
            fp, own, splits, people = fps[u]
            rows.append({
                "target_uid": u, "fingerprint": fp, "photo_digest": own, "splits": splits, "people_digest": people,
                "examined": examined,
                "outcome": outcome, "key": s and s["key"], "split": s and s["split"], "shard": None,
                "persons": s and [fj["identity_id"] for fj in s["faces"]], "refs": s and [len(fj["refs"]) for fj in s["faces"]],
                "counts": target_counts(dict(sorted(removed.items())), dict(sorted(flags.items())),
                                        {x: errors[x] for x in sorted(set(seen))}),
            })
        derived = derived or {}
        if derived:
            # the previous row, this version's fingerprints and counts (outcome, key, persons, refs stay)
            for r in self.prev_targets.take(sorted(derived)).to_pylist():
                u = r["target_uid"]
                r["fingerprint"], r["photo_digest"], r["splits"], r["people_digest"] = fps[u]
                # the examined fingerprint from its rows (as a selected target's): no second hash sort of the subset
                r["examined"] = derived[u]["examined"]
                r["counts"] = derived[u]["counts"]
                rows.append(r)
                if r["outcome"] == "kept":
                    b.copied.setdefault(r["split"], {}).setdefault(r["shard"], set()).add(r["key"])
                    b.derived_faces[r["key"]] = derived[u]["faces"]
        parts = [pa.Table.from_pylist(rows, schema=TARGETS_SCHEMA)]
        if reuse:
            kept = prev.take(reuse)
            # the fingerprint columns are this version's (a target reused under the cap has a new whole one)
            for c, vals in zip(("fingerprint", "photo_digest", "splits", "people_digest"), zip(*(fps[u] for u in reuse))):
                kept = kept.set_column(kept.schema.get_field_index(c), c, pa.array(list(vals), TARGETS_SCHEMA.field(c).type))
            if over_cap:
                counts_col = [patch_over_cap(c, over_cap[u]) if u in over_cap else c
                              for u, c in zip(reuse, kept.column("counts").to_pylist())]
                kept = kept.set_column(kept.schema.get_field_index("counts"), "counts", pa.array(counts_col, pa.string()))
            parts.append(kept)
            for o, k, sp, sh in zip(*(kept.column(c).to_pylist() for c in ("outcome", "key", "split", "shard"))):
                if o == "kept":
                    b.copied.setdefault(sp, {}).setdefault(sh, set()).add(k)
        t = pa.concat_tables(parts)
        b.targets = t.take(pa.array(sorted(range(t.num_rows), key=t.column("target_uid").to_pylist().__getitem__), pa.int64()))
        b.samples = samples
        b.summary = _summary_of_targets(b.targets)
        # the similarity histograms: those of the selected targets' rows now; the reused targets' rows stay in
        # the previous version's tables, counted in one pass for all buckets once selection is over
        # (:meth:`_count_reused_rows`)
        sims = {k: Counter(counts.get(k, {})) for k in ("similarity_all_candidates", "similarity_selected")}
        for k, name in (("similarity_all_candidates", "candidates"), ("similarity_selected", "pairs")):
            if derived_hist is not None:  # the derived targets' rows, counted as they were written
                sims[k].update({str(int(i)): int(derived_hist[name][i]) for i in np.nonzero(derived_hist[name])[0]})
        b.counts = _bucket_counts(b.targets, *({i: n for i, n in sorted(sims[k].items(), key=lambda t: int(t[0])) if n}
                                               for k in ("similarity_all_candidates", "similarity_selected")))

    def _emit(self, b: _Bucket) -> None:
        """Write bucket ``b``'s shards (hard links for a reused bucket; replacing what an earlier run of the
        same bucket wrote) and drop its samples. Nothing without ``out_dir``. The samples of reused targets
        are copied member by member from the previous version's tars (checked against their sha256 in
        :meth:`_run`), merged in key order with the new ones: the tars are those of a fresh build."""
        if self.out_dir is None:
            return
        cfg = self.cfg
        shard_of: dict[str, str] = {}
        b.bytes_copied = b.bytes_written = 0
        for split in ("train", "eval"):
            d = self.out_dir / split
            d.mkdir(parents=True, exist_ok=True)
            for old in b.infos.get(split, []):
                (d / old.name).unlink(missing_ok=True)
            if b.previous is not None:
                infos = [ShardInfo(**sh) for sh in b.previous["shards"].get(split, [])]
                for sh in infos:
                    link_or_copy(self.previous / split / sh.name, d / sh.name)
            else:
                split_samples = [s for s in b.samples if s["split"] == split]
                # the new samples' records were made by the process that selected them (else made here)
                new = (_spilled_records(split_samples, b.records) if b.records is not None
                       else _shard_samples(split_samples, cfg, self.read_bytes,
                                           self.guard.features if self.guard is not None else None))
                streams = [self._counted(new, "bytes_written", b)]
                for src, keys in sorted(b.copied.get(split, {}).items()):
                    streams.append(self._counted(patched_records(reused_records(self.previous / src, keys), b.derived_faces),
                                                 "bytes_copied", b))
                order: list[str] = []
                merged = heapq.merge(*streams, key=lambda r: r["__key__"])
                infos = write_shards((order.append(r["__key__"]) or r for r in merged), d,
                                     f"{cfg.dataset_name}-{split}-{b.name}", cfg.shard_max_count, cfg.shard_max_bytes)
                at = 0
                for sh in infos:
                    shard_of.update((k, f"{split}/{sh.name}") for k in order[at:at + sh.samples])
                    at += sh.samples
                if at != len(order) or len(order) != len(split_samples) + sum(len(k) for k in b.copied.get(split, {}).values()):
                    raise RuntimeError(f"{b.name}/{split}: {len(order)} samples written, {at} in shards: a previous tar "
                                       "lacks a sample its record lists")
            b.infos[split] = infos
        if b.previous is None and b.targets is not None:
            keys = b.targets.column("key").to_pylist()
            b.targets = b.targets.set_column(b.targets.schema.get_field_index("shard"), "shard",
                                             pa.array([shard_of.get(k) if k else None for k in keys], pa.string()))
        b.samples = []
        if b.records is not None:
            for path in {at[0] for at in b.records.values()}:
                path.unlink(missing_ok=True)
            b.records = None

    @staticmethod
    def _counted(records, attr: str, b: _Bucket):
        """``records`` passed through, the bytes of their image members (the photo, the crops; not the JSON)
        added to ``b.<attr>``."""
        for r in records:
            setattr(b, attr, getattr(b, attr) + sum(len(v) for k, v in r.items() if not k.startswith("__") and k != "json"))
            yield r

    def select(self) -> None:
        """Every bucket's selection (the eval fallback's included); their shards are written by :meth:`emit`.
        The previous shards that targets may be copied from are checked meanwhile, on a thread (taken for
        intact until then): PreviousShardsDamaged when one is not, and this selection is void."""
        if self.per_target and self.prev_targets:
            self.prev_targets.check_beside(self._previous_shards_of_changed_buckets())
        try:
            self._select_buckets()
        except BaseException:
            self.prev_targets.settle(raise_error=False)
            raise
        damaged = self.prev_targets.settle()
        if damaged:
            raise PreviousShardsDamaged(damaged, self.prev_targets.shard_checks())
        if self.previous is not None:
            self._count_reused_rows()

    def _previous_shards_of_changed_buckets(self) -> list[str]:
        """The previous version's shards ("<split>/<tar>") of the buckets whose fingerprint changed: those their
        reused and derived targets' samples are copied from (an unchanged bucket's are checked as it is linked)."""
        out = []
        for b in self.buckets.values():
            rec = self.previous_records.get(b.name)
            if rec is not None and rec.get("fingerprint") != b.fingerprint:
                out += [f"{split}/{sh['name']}" for split, shards in sorted(rec.get("shards", {}).items()) for sh in shards]
        return out

    def emit(self) -> None:
        """Write every bucket's shards, in bucket order (nothing without ``out_dir``)."""
        if self.out_dir is None:
            return
        written = self.progress.counter("buckets written", sum(b.previous is None for b in self.buckets.values()))
        for b in self.buckets.values():
            self._emit(b)
            if b.previous is None:
                written(1)

    def _select_buckets(self) -> None:
        cfg = self.cfg
        # every bucket's selection at once (small buckets beside large ones, over the workers)
        pending = [(b, self._start_run(b, set())) for b in self.buckets.values()]
        whole = sum(b.previous is not None for b in self.buckets.values())
        if self.previous is not None:
            self.progress(f"{whole} of {len(self.buckets)} buckets unchanged (their shards linked); "
                          f"{sum(b.n_reused for b in self.buckets.values()):,} targets reused, "
                          f"{sum(len(b.derived) for b in self.buckets.values()):,} derived from their previous rows, "
                          f"{sum(sum(b.reasons.values()) for b in self.buckets.values()):,} to select again")
        results = iter(self._select_jobs([p[0] for _, p in pending if p is not None]))
        for b, p in pending:
            if p is not None:
                p[1](next(results))
        n = sum(len(b.summary) for b in self.buckets.values())
        if not (cfg.eval_fraction > 0 and n >= 2 and not any(b.per_split()["eval"] for b in self.buckets.values())):
            return
        # the eval fallback: other buckets do not change when one component moves to eval, so only the
        # bucket of the component tried is selected again (with its identities overridden)

        def lowest_hash(t):  # t: a sample's summary (key, split, identity ids, refs)
            return min(hash_fraction(i, cfg.split_salt) for i in t[2]), t[0]

        bucket_of_id = {i: b for b in self.buckets.values() for i in b.identities}
        tried: set[frozenset] = set()
        for t in sorted((t for b in self.buckets.values() for t in b.summary), key=lowest_hash):
            override = frozenset(self.component[t[2][0]])
            if override in tried:
                continue
            tried.add(override)
            if len(tried) > 10:
                break
            b = bucket_of_id[t[2][0]]
            kept = b.state()
            self._run(b, set(override))
            per_split = Counter()
            for x in self.buckets.values():
                per_split.update(x.per_split())
            if per_split["eval"] and per_split["train"]:
                self.eval_fallback = sorted(override)
                return
            b.restore(kept)

    def samples(self) -> list[dict]:
        """The samples in memory (all of them without ``out_dir``; none once written)."""
        return sorted((s for b in self.buckets.values() for s in b.samples), key=lambda s: s["key"])

    def rows_in_target_order(self, name: str, schema: pa.Schema):
        """The ``name`` table ("pairs" or "candidates") of this build, in pieces, in the order of one run over
        the collection: the part files of the buckets selected (of their targets selected again), and the
        rows of the reused buckets and of the reused targets of the others from the previous version's table
        (in their order there: one pass over it), merged by target uid."""
        attr = {"pairs": "pairs", "candidates": "cands"}[name]
        # a selection run in parallel left one part file per chunk of targets, each sorted by target uid
        sources = [_part_batches(p, schema) for b in self.active() if b.previous is None
                   for p in (getattr(b, attr) if isinstance(getattr(b, attr), list) else [getattr(b, attr)])]
        sources += [_part_batches(p, schema) for b in self.active() if b.previous is None and b.derived
                    for p in b.derived_parts.get(name, [])]
        reused = self._reused_uids()
        if reused:
            sources.append(_part_batches(self.previous / f"{name}.parquet", schema, pa.array(reused, pa.string())))
        return _merge_in_target_order(sources, schema)

    def _reused_uids(self) -> list[str]:
        """The targets whose rows are the previous version's: those of reused buckets, and the reused targets of
        the buckets selected again."""
        return sorted(u for b in self.active() for u in (b.uids if b.previous is not None else b.reused))

    def _count_reused_rows(self) -> None:
        """Add to each bucket selected again the similarity histograms of its reused targets' rows, from the
        previous version's tables: one streamed pass over two columns for all buckets (the rows are not held)."""
        import pyarrow.compute as pc

        owners = [b for b in self.active() if b.previous is None and b.reused]
        if not owners:
            return
        uids = pa.array(sorted(u for b in owners for u in b.reused), pa.string())
        owner = np.empty(len(uids), np.int64)  # position in ``uids`` -> index in ``owners``
        at = {u: i for i, u in enumerate(uids.to_pylist())}
        for i, b in enumerate(owners):
            owner[[at[u] for u in b.reused]] = i
        schema = pa.schema([("target_uid", pa.string()), ("similarity", pa.float32())])
        for name, key in (("pairs", "similarity_selected"), ("candidates", "similarity_all_candidates")):
            hist = np.zeros((len(owners), len(SIM_BINS) - 1), np.int64)
            for t in _part_batches(self.previous / f"{name}.parquet", schema, uids):
                who = owner[pc.index_in(t.column("target_uid"), value_set=uids).to_numpy(zero_copy_only=False)]
                sim = np.asarray(t.column("similarity").to_numpy(zero_copy_only=False), dtype=np.float64)
                for i in np.unique(who):
                    hist[i] += np.histogram(sim[who == i], bins=SIM_BINS)[0]
            for i, b in enumerate(owners):
                total = hist[i].copy()
                for k, n in b.counts[key].items():
                    total[int(k)] += int(n)
                b.counts[key] = {str(int(j)): int(total[j]) for j in np.nonzero(total)[0]}

    def stats(self) -> dict:
        cfg = self.cfg
        summ = [t for b in self.buckets.values() for t in b.summary]
        merged = _merge_counts([b.counts for b in self.buckets.values()])
        by_identity = sorted({f.identity_id for fs in self.by_uid.values() for f in fs if f.identity_id is not None})
        mixed = 0
        for fs in self.by_uid.values():
            mixed += len({self.split_of(f.identity_id) for f in fs if f.identity_id is not None}) > 1
        stats = {
            "images": len(self.img_meta),
            "targets": merged["targets"],
            "persons": merged["persons"],
            "candidates_removed_by": merged["candidates_removed_by"],
            "duplicate_flags_independent": merged["duplicate_flags_independent"],
            "unreadable": merged["unreadable"],
            # this run's selections only (a reused bucket or target ran none): not recorded in the version
            "cache_evictions": {k: sum(b.evictions.get(k, 0) for b in self.buckets.values()) for k in ("images", "keypoints")},
            "per_split": dict(sorted(Counter(t[1] for t in summ).items())),
            "identities": {"total": len(by_identity), "eval": sum(self.split_of(i) == "eval" for i in by_identity)},
            "photos_in_both_splits_by_faces": mixed,
            "refs_per_person_hist": dict(sorted(Counter(r for t in summ for r in t[3]).items())),
            "persons_per_target_hist": dict(sorted(Counter(len(t[2]) for t in summ).items())),
            "similarity_hist_all_candidates": _hist_from_counts(merged["similarity_all_candidates"]),
            "similarity_hist_selected": _hist_from_counts(merged["similarity_selected"]),
            "thresholds": {"sim_low": cfg.sim_low, "sim_high": cfg.sim_high},
        }
        if self.eval_fallback:
            stats["eval_fallback"] = self.eval_fallback
        return stats

def _merge_counts(parts: list[dict]) -> dict:
    """Sum the additive statistics of several buckets (a key met in any bucket is kept, even at 0)."""
    out = {k: Counter() for k in ("targets", "candidates_removed_by", "duplicate_flags_independent", "cache_evictions")}
    persons = 0
    unreadable: dict[str, str] = {}
    sims = {k: np.zeros(len(SIM_BINS) - 1, np.int64) for k in ("similarity_all_candidates", "similarity_selected")}
    for c in parts:
        for k, counter in out.items():
            counter.update(c.get(k, {}))
        persons += int(c.get("persons", 0))
        unreadable.update(c.get("unreadable", {}))
        for k, arr in sims.items():
            for i, n in c.get(k, {}).items():
                arr[int(i)] += int(n)
    merged = {k: dict(sorted(v.items())) for k, v in out.items()}
    merged["cache_evictions"] = {"images": merged["cache_evictions"].get("images", 0),
                                 "keypoints": merged["cache_evictions"].get("keypoints", 0)}
    merged.update(persons=persons, unreadable=dict(sorted(unreadable.items())), **sims)
    return merged


def _bucket_counts(targets: pa.Table, sim_all: dict, sim_selected: dict) -> dict:
    """A bucket's additive counts from its targets' shares (targets.parquet) and the similarity histograms
    of its rows: what :func:`_select` over all its targets counts (less the cache evictions, which depend on
    the run)."""
    reasons, removed, flags = Counter(), Counter(), Counter()
    unreadable: dict[str, str] = {}
    persons = 0
    for o, p, c in zip(*(targets.column(k).to_pylist() for k in ("outcome", "persons", "counts"))):
        reasons[o] += 1
        persons += len(p) if o == "kept" else 0
        c = json.loads(c)
        removed.update(c["candidates_removed_by"])  # Counter.update keeps keys counted 0 (as _select has them)
        flags.update(c["duplicate_flags_independent"])
        unreadable.update(c["unreadable"])
    return {
        "targets": dict(sorted(reasons.items())), "persons": persons,
        "candidates_removed_by": dict(sorted(removed.items())), "duplicate_flags_independent": dict(sorted(flags.items())),
        "unreadable": dict(sorted(unreadable.items())),
        "similarity_all_candidates": dict(sim_all), "similarity_selected": dict(sim_selected),
    }


def _zip_by_target(uids: list[str], *streams):
    """(uid, rows of each stream) for each of ``uids`` (sorted), from streams of (target uid, rows) in target
    order that hold only some of them (a target absent from one: no rows there)."""
    heads = [next(s, None) for s in streams]
    for u in uids:
        got = []
        for i, s in enumerate(streams):
            if heads[i] is not None and heads[i][0] == u:
                got.append(heads[i][1])
                heads[i] = next(s, None)
            else:
                got.append([])
        yield (u, *got)
    if any(h is not None for h in heads):
        raise RuntimeError(f"previous rows of target {next(h[0] for h in heads if h is not None)!r} left over: "
                           "a previous table not in target order")


def _cooccurrence_components(by_uid: dict[str, list[FaceRec]]) -> dict[str, set[str]]:
    """identity -> the set of identities linked to it by sharing photos (transitively)."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for fs in by_uid.values():
        ids = [f.identity_id for f in fs if f.identity_id is not None]
        for i in ids:
            find(i)
        for a, b in itertools.pairwise(ids):
            parent[find(a)] = find(b)
    groups: dict[str, set[str]] = {}
    for i in parent:
        groups.setdefault(find(i), set()).add(i)
    return {i: groups[find(i)] for i in parent}
