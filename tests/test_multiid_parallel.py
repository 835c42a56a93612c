"""The multi-identity builder over several worker processes writes the same files, byte for byte, as one
process: fresh builds and refreshes that select only some targets again."""

import hashlib
from pathlib import Path

import pytest
from test_shard_reuse import _collection, _groups

from pipeline.multiid import MultiIDConfig, build_multiid_dataset
from pipeline.multiid import parallel as mparallel

CFG = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False, reuse_buckets=4)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _comparable(stats: dict) -> dict:
    # how the build went, not what it built: the decoding caches' evictions depend on how targets are split
    return {k: v for k, v in stats.items() if k not in ("cache_evictions",)}


@pytest.fixture
def small_parallel(monkeypatch):
    """Selections of a few targets already go to the workers, and each call's part files are recorded."""
    monkeypatch.setattr(mparallel, "PARALLEL_MIN_TARGETS", 4)
    parts = []
    real = mparallel.select_jobs

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        parts.extend(r[2] for r in out)  # each job's pairs part files
        return out

    monkeypatch.setattr(mparallel, "select_jobs", spy)
    real_forked = mparallel._forked

    def forked(*args, **kwargs):  # which passes ran in the workers: the photos' pHashes, the selection
        parts.append(getattr(args[5] if len(args) > 5 else kwargs.get("fn"), "__name__", "_select_chunk"))
        return real_forked(*args, **kwargs)

    monkeypatch.setattr(mparallel, "_forked", forked)
    return parts


@pytest.mark.parametrize("keypoints", [False, True])
def test_parallel_build_is_byte_identical(tmp_path, small_parallel, keypoints):
    import cv2
    import numpy as np

    # OpenCV's thread pool running in the parent before the fork (a child that inherited it used to hang)
    cv2.resize(np.zeros((2000, 2000), np.uint8), (3000, 3000))
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=keypoints, reuse_buckets=4)
    world = _collection(tmp_path, _groups(3), photos_per_group=14)
    one = build_multiid_dataset(*world, tmp_path / "one", cfg, version="v1", workers=1)
    two = build_multiid_dataset(*world, tmp_path / "two", cfg, version="v1", workers=2)
    assert one.stats["targets"].get("kept", 0) > 10  # enough samples for the comparison to mean something
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert a == b
    assert _comparable(one.stats) == _comparable(two.stats)
    # the parallel path ran: some selections came back as several part files (one per chunk of targets),
    # after a pass over the photos' pHashes
    assert any(isinstance(p, list) and len(p) > 1 for p in small_parallel), small_parallel
    assert "_hash_chunk" in small_parallel and "_select_chunk" in small_parallel


def test_parallel_refresh_is_byte_identical(tmp_path, small_parallel):
    groups = _groups(2)
    base = _collection(tmp_path, groups, photos_per_group=14)
    first = build_multiid_dataset(*base, tmp_path / "v1", CFG, version="v1")
    # a refresh: one new photo of two people of the first group selects that group's targets again
    grown = _collection(tmp_path, groups, photos_per_group=14, extra=[("zz-new", [f"{groups[0]}-a", f"{groups[0]}-b"])])
    one = build_multiid_dataset(*grown, tmp_path / "r1", CFG, version="v2", reuse_from=first.out_dir, workers=1)
    two = build_multiid_dataset(*grown, tmp_path / "r2", CFG, version="v2", reuse_from=first.out_dir, workers=2)
    build_multiid_dataset(*grown, tmp_path / "f", CFG, version="v2", workers=2)
    assert one.stats["targets_reselected"] > 0 and one.stats["targets_reused"] > 0
    assert any(isinstance(p, list) and len(p) > 1 for p in small_parallel), small_parallel
    assert _files(tmp_path / "r1") == _files(tmp_path / "r2") == _files(tmp_path / "f")
    assert _comparable(one.stats)["reselect_reasons"] == _comparable(two.stats)["reselect_reasons"]


# ------------------------------------------------------------------------- the guard's decisions kept


@pytest.fixture
def compare_calls(monkeypatch):
    """Counts dedup.compare in this process (the guard's costly part: NCC, keypoints, RANSAC)."""
    from pipeline.multiid import dedup

    calls = []
    real = dedup.compare

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(dedup, "compare", counted)
    return calls


KP = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=True, reuse_buckets=4)


def test_guard_decisions_are_reused_and_change_nothing(tmp_path, compare_calls):
    from pipeline.storage import read_parquet

    world = _collection(tmp_path, _groups(2), photos_per_group=10)
    cache = tmp_path / "guard.parquet"
    build_multiid_dataset(*world, tmp_path / "plain", KP, version="v1")
    n_plain = len(compare_calls)
    compare_calls.clear()
    first = build_multiid_dataset(*world, tmp_path / "first", KP, version="v1", guard_cache=cache)
    # a pair met twice in one build (two targets of one person comparing the same two references) is judged once
    assert first.stats["guard_decisions_computed"] == read_parquet(cache).num_rows == len(compare_calls) > 0
    assert first.stats["guard_decisions_computed"] + first.stats["guard_decisions_reused"] == n_plain
    compare_calls.clear()
    again = build_multiid_dataset(*world, tmp_path / "again", KP, version="v1", guard_cache=cache)
    assert compare_calls == []  # every pair judged already: no NCC, no SIFT, no RANSAC
    assert again.stats["guard_decisions_reused"] == n_plain and again.stats["guard_decisions_computed"] == 0
    assert _files(tmp_path / "plain") == _files(tmp_path / "first") == _files(tmp_path / "again")


def test_guard_decisions_follow_the_settings_and_the_faces(tmp_path, compare_calls):
    groups = _groups(2)
    world = _collection(tmp_path, groups, photos_per_group=10)
    cache = tmp_path / "guard.parquet"
    from pipeline.storage import read_parquet

    build_multiid_dataset(*world, tmp_path / "a", KP, version="v1", guard_cache=cache)
    n_first = read_parquet(cache).num_rows
    compare_calls.clear()
    build_multiid_dataset(*world, tmp_path / "a2", KP, version="v1", guard_cache=cache)
    assert compare_calls == []
    # another NCC threshold: no old decision applies, every pair is judged again (once)
    stricter = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=True, reuse_buckets=4, face_ncc_min=KP.face_ncc_min - 0.05)
    compare_calls.clear()
    res = build_multiid_dataset(*world, tmp_path / "b", stricter, version="v1", guard_cache=cache)
    assert res.stats["guard_decisions_computed"] == len(compare_calls) == n_first
    assert read_parquet(cache).num_rows == 2 * n_first
    # a refresh with a new photo of two people: only pairs with the new faces are judged, output as fresh
    grown = _collection(tmp_path, groups, photos_per_group=10, extra=[("zz-new", [f"{groups[0]}-a", f"{groups[0]}-b"])])
    compare_calls.clear()
    fresh = build_multiid_dataset(*grown, tmp_path / "fresh", KP, version="v2")
    n_fresh = len(compare_calls)
    compare_calls.clear()
    cached = build_multiid_dataset(*grown, tmp_path / "cached", KP, version="v2", guard_cache=cache)
    assert len(compare_calls) < n_fresh and cached.stats["guard_decisions_reused"] > 0
    assert cached.stats["guard_decisions_computed"] == len(compare_calls)
    assert _files(tmp_path / "fresh") == _files(tmp_path / "cached")
    assert fresh.stats["targets"] == cached.stats["targets"]


def test_guard_decisions_in_parallel_and_purged(tmp_path, small_parallel):
    from pipeline.multiid.guard_cache import purge_guard_decisions
    from pipeline.storage import read_parquet

    world = _collection(tmp_path, _groups(2), photos_per_group=14)
    one, two = tmp_path / "g1.parquet", tmp_path / "g2.parquet"
    r1 = build_multiid_dataset(*world, tmp_path / "one", KP, version="v1", guard_cache=one, workers=1)
    r2 = build_multiid_dataset(*world, tmp_path / "two", KP, version="v1", guard_cache=two, workers=2)
    assert any(isinstance(p, list) and len(p) > 1 for p in small_parallel)
    t1, t2 = read_parquet(one), read_parquet(two)
    key = lambda t: sorted(zip(t.column("k0").to_pylist(), t.column("k1").to_pylist()))
    assert key(t1) == key(t2) and t1.num_rows == r1.stats["guard_decisions_computed"] == r2.stats["guard_decisions_computed"]
    again = build_multiid_dataset(*world, tmp_path / "three", KP, version="v1", guard_cache=two, workers=2)
    assert again.stats["guard_decisions_computed"] == 0 and again.stats["guard_decisions_reused"] > 0
    assert _files(tmp_path / "one") == _files(tmp_path / "two") == _files(tmp_path / "three")
    # a removal drops every decision that involves the photo
    victim = t1.column("a_uid")[0].as_py()
    involved = sum(victim in (a, b) for a, b in zip(t1.column("a_uid").to_pylist(), t1.column("b_uid").to_pylist()))
    assert purge_guard_decisions(one, [victim]) == involved > 0
    left = read_parquet(one)
    assert left.num_rows == t1.num_rows - involved and victim not in set(left.column("a_uid").to_pylist() + left.column("b_uid").to_pylist())


# ------------------------------------------------------------------------- chunks of equal cost


def test_equal_shares_keep_people_together_and_balance_cost():
    """A person's targets stay in one chunk unless that person alone is dearer than a chunk's share; the
    chunks' estimated costs are close (equal numbers of targets were not: one person's many photos each
    examine many candidates), and the dearest chunk comes first."""
    from types import SimpleNamespace

    by_uid = {}
    for k in range(40):  # "big": 40 one-face photos (39 candidates each); 40 people with two photos (1 candidate)
        by_uid[f"big-{k:02d}"] = [SimpleNamespace(identity_id="big")]
    for p in range(40):
        for k in range(2):
            by_uid[f"p{p:02d}-{k}"] = [SimpleNamespace(identity_id=f"p{p:02d}")]
    uids = sorted(by_uid)
    cost = mparallel.target_costs(uids, by_uid, cap=200)
    assert cost["big-00"] == 40 and cost["p00-0"] == 2
    chunks = mparallel.chunks_by_shares(uids, by_uid, 200, [1 / 4] * 4)  # four equal shares
    assert sorted(u for c in chunks for u in c) == uids  # every target once
    totals = [sum(cost[u] for u in c) for c in chunks]
    assert totals == sorted(totals, reverse=True)
    assert max(totals) - min(totals) <= max(cost.values())  # within one target's cost
    # people below a chunk's share are never split
    for p in range(40):
        assert sum(any(u.startswith(f"p{p:02d}-") for u in c) for c in chunks) == 1
    # what equal numbers of targets in person order gave: one chunk most of the cost
    order = sorted(uids)
    equal = [order[i * len(order) // 4:(i + 1) * len(order) // 4] for i in range(4)]
    assert max(sum(cost[u] for u in c) for c in equal) > 1.5 * max(totals)


def test_guided_chunks_shrink_toward_the_end_and_keep_people_together():
    """The chunks a large job is cut into: shares of its estimated cost that shrink (each 1/(2 x slots) of
    what is left), so the workers end close together; at least slots x 4 of them; every target once, people
    below the largest share never split, dearest first, and the cheapest chunks a small part of the whole."""
    from types import SimpleNamespace

    for slots in (1, 2, 3, 8, 64):
        shares = mparallel.guided_shares(slots)
        assert abs(sum(shares) - 1) < 1e-9 and shares == sorted(shares, reverse=True)
        assert len(shares) >= 4 * slots and shares[0] == 1 / (2 * slots)
        assert shares[-1] <= 1 / (4 * slots * 4) * 1.5
    by_uid = {}
    for p in range(300):  # 300 people of 1-6 two-face photos: a few candidates each
        for k in range(1 + p % 6):
            by_uid[f"p{p:03d}-{k}"] = [SimpleNamespace(identity_id=f"p{p:03d}"), SimpleNamespace(identity_id=f"q{p % 7}")]
    uids = sorted(by_uid)
    cost = mparallel.target_costs(uids, by_uid, cap=200)
    shares = mparallel.guided_shares(2)
    chunks = mparallel.chunks_by_shares(uids, by_uid, 200, shares)
    assert sorted(u for c in chunks for u in c) == uids
    totals = [sum(cost[u] for u in c) for c in chunks]
    whole = sum(totals)
    assert totals == sorted(totals, reverse=True) and len(chunks) == len(shares)
    for got, want in zip(totals, shares):  # each chunk near its share (within one person's targets)
        assert abs(got - want * whole) <= 6 * max(cost.values())
    assert totals[-1] < 0.05 * whole < 0.2 * whole < totals[0]
    for p in range(300):
        assert sum(any(u.startswith(f"p{p:03d}-") for u in c) for c in chunks) == 1


# ------------------------------------------------------------------------- work shared by the workers


@pytest.fixture
def computed_log(tmp_path, monkeypatch):
    """Every face's keypoints and every photo's NCC patches computed, in any process (a line each, appended
    to a file the forked workers inherit the path of)."""
    from pipeline.multiid import selection

    log = tmp_path / "computed.log"
    real_kp, real_fp = selection._Fingerprints._compute_keypoints, selection._Fingerprints._full_fingerprints

    def kp(self, uid, face_index):
        with open(log, "a") as fh:
            fh.write(f"kp {uid} {face_index}\n")
        return real_kp(self, uid, face_index)

    def fp(self, uid, got):
        with open(log, "a") as fh:
            fh.write(f"fp {uid}\n")
        return real_fp(self, uid, got)

    monkeypatch.setattr(selection._Fingerprints, "_compute_keypoints", kp)
    monkeypatch.setattr(selection._Fingerprints, "_full_fingerprints", fp)

    def lines() -> list[str]:
        out = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return out

    return lines


def test_workers_compute_each_face_once(tmp_path, small_parallel, computed_log, monkeypatch):
    """With 2 workers each face's keypoints (and each photo's NCC patches) are computed once in all, by one
    worker, as in one process; without the shared store the same build computes some twice (a reference
    compared by targets of both workers), which is what this test would catch coming back."""
    from collections import Counter

    from pipeline.multiid import face_store

    world = _collection(tmp_path, _groups(3), photos_per_group=14)
    build_multiid_dataset(*world, tmp_path / "one", KP, version="v1", workers=1)
    serial = Counter(computed_log())
    build_multiid_dataset(*world, tmp_path / "two", KP, version="v1", workers=2)
    shared = Counter(computed_log())
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert "_select_chunk" in small_parallel
    assert sum(k.startswith("kp ") for k in serial) > 20  # enough faces compared to mean something
    assert max(serial.values()) == 1 and max(shared.values()) == 1
    # the same faces' keypoints (one process decodes a photo's NCC patches with its pHashes; the workers
    # have their pHashes from a first pass, and work out the patches of the photos they compare)
    assert {k for k in shared if k.startswith("kp ")} == {k for k in serial if k.startswith("kp ")}
    # the control: each worker on its own computes some faces twice in all
    monkeypatch.setattr(face_store.SharedFaceStore, "get", lambda self, kind, uid, fi, compute: compute())
    build_multiid_dataset(*world, tmp_path / "alone", KP, version="v1", workers=2)
    alone = Counter(computed_log())
    assert _files(tmp_path / "one") == _files(tmp_path / "alone")
    assert max(alone.values()) > 1, alone


def test_face_store_gives_back_what_was_computed_and_survives_a_failed_write(tmp_path, monkeypatch):
    """Keypoints come back from the store as the same float32 arrays (descriptors kept as uint8 on disk); a
    write that fails (a full disk) leaves the value computed here and makes another process compute it too,
    at once, instead of waiting for a file that will never come."""
    import numpy as np

    from pipeline.multiid import dedup, face_store

    rng = np.random.default_rng(0)
    kps = dedup.KeypointSet(rng.random((5, 2), dtype=np.float32), rng.integers(0, 256, (5, 128)).astype(np.float32),
                            rng.random((4, 2), dtype=np.float32), None, (30, 40))
    a, b = face_store.SharedFaceStore(tmp_path / "s"), face_store.SharedFaceStore(tmp_path / "s")
    assert a.get("kp", "u1", 0, lambda: kps) is kps
    got = b.get("kp", "u1", 0, lambda: pytest.fail("computed twice"))
    assert got.desc.dtype == np.float32 and np.array_equal(got.desc, kps.desc) and np.array_equal(got.pts, kps.pts)
    assert got.desc_m is None and got.size == (30, 40)
    assert any(p.name.endswith(".done") for p in (tmp_path / "s").iterdir())

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(face_store.Path, "write_bytes", full_disk)
    monkeypatch.setattr(face_store, "WAIT_S", 5.0)
    assert a.get("kp", "u2", 0, lambda: kps) is kps and a.max_bytes == 0  # publishes nothing more
    import time

    t0 = time.monotonic()
    assert b.get("kp", "u2", 0, lambda: "computed by b") == "computed by b"
    assert time.monotonic() - t0 < 1.0  # told by the .failed mark, not by the timeout


def test_parallel_derivation_is_byte_identical(tmp_path, small_parallel, monkeypatch):
    """A refresh's derivation split over forked workers (plan._Plan._derive_range) gives what one process gives: the
    same files, the same statistics, the same pHash store, and the examined subsets over the cap the workers
    chose reach the selection jobs."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.multiid import plan as mplan

    monkeypatch.setattr(mplan, "DERIVE_PARALLEL_MIN", 1)
    ranges = []  # per forked derivation run: the targets it decided
    hashed = []  # the photos hashed before the derivation forked
    real_map = mparallel.fork_map

    def spy_map(fn, items, workers, on_done=None):
        out = real_map(fn, items, workers, on_done)
        where = fn.__qualname__  # closures of the plan's methods (fork_map's function is inherited, not pickled)
        if where.startswith("_Plan._derive.<locals>"):
            ranges.extend(len(p["out"]) + len(p["same_examined"]) + sum(p["not_derived"].values()) for p in out)
        if where.startswith("_Plan._hash_changed_photos.<locals>"):
            hashed.extend(u for p in out for u in p)
        return out

    monkeypatch.setattr(mparallel, "fork_map", spy_map)
    subsets = [{}]  # per build: the examined subsets its selection jobs were given
    real_jobs = mparallel.select_jobs

    def spy_jobs(jobs, *args, **kwargs):
        subsets[-1].update((k, frozenset(v)) for job in jobs for k, v in (job.known_subsets or {}).items())
        return real_jobs(jobs, *args, **kwargs)

    monkeypatch.setattr(mparallel, "select_jobs", spy_jobs)
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=1, keypoints=False, reuse_buckets=4, max_candidates_per_person=3)
    groups = _groups(2)
    base = _collection(tmp_path, groups, photos_per_group=16)
    g1 = tmp_path / "g1" / "guard.parquet"
    first = build_multiid_dataset(*base, tmp_path / "v1", cfg, version="v1", guard_cache=g1)
    shutil.copytree(tmp_path / "g1", tmp_path / "g2")
    g2 = tmp_path / "g2" / "guard.parquet"
    # new photos of people over the cap, in both groups: some targets derived, some selected again
    grown = _collection(tmp_path, groups, photos_per_group=16, extra=[
        ("zz-new1", [f"{groups[0]}-a"]), ("zz-new2", [f"{groups[0]}-b", f"{groups[0]}-c"]), ("zz-new3", [f"{groups[1]}-a"])])
    subsets.append({})
    one = build_multiid_dataset(*grown, tmp_path / "r1", cfg, version="v2", reuse_from=first.out_dir, workers=1, guard_cache=g1)
    assert not ranges  # one process derives alone
    subsets.append({})
    two = build_multiid_dataset(*grown, tmp_path / "r2", cfg, version="v2", reuse_from=first.out_dir, workers=2, guard_cache=g2)
    build_multiid_dataset(*grown, tmp_path / "f", cfg, version="v2", workers=2)
    # the forked derivation ran, with targets in more than one worker's run
    assert len([n for n in ranges if n]) >= 2, ranges
    # the new photos were hashed once each, in the workers, before it forked
    assert sorted(hashed) == ["zz-new1", "zz-new2", "zz-new3"]
    assert one.stats["targets_derived"] > 0 and one.stats["targets_reselected"] > 0
    # (not photo_hashes_reused: the store's lookups, which two workers that need one photo both make)
    keys = ("targets_derived", "not_derived_because", "reselect_reasons", "targets_reused", "targets_reselected",
            "photo_hashes_computed")
    assert {k: one.stats[k] for k in keys} == {k: two.stats[k] for k in keys}
    assert _files(tmp_path / "r1") == _files(tmp_path / "r2") == _files(tmp_path / "f")
    # the subsets over the cap the workers chose reached the selection, as one process's do
    assert subsets[1] and subsets[1] == subsets[2]
    # the pHashes the workers worked out were kept for the next build, as one process keeps them
    phash = "guard.phash.parquet"
    assert pq.read_table(tmp_path / "g1" / phash).sort_by("uid").equals(pq.read_table(tmp_path / "g2" / phash).sort_by("uid"))


# ------------------------------------------------------------------------- progress for the log


def test_progress_lines_follow_the_build(tmp_path, small_parallel):
    """A build told to report progress writes the same bytes; its lines come in the build's order, and the
    targets they count as selected (chunk by chunk, in the workers) add up to what the stats count."""
    import re

    groups = _groups(2)
    base = _collection(tmp_path, groups, photos_per_group=14)
    lines: list[str] = []
    first = build_multiid_dataset(*base, tmp_path / "v1", CFG, version="v1", workers=2, progress=lines.append)
    build_multiid_dataset(*base, tmp_path / "quiet", CFG, version="v1", workers=2)
    assert _files(tmp_path / "v1") == _files(tmp_path / "quiet")
    assert lines[0].startswith("planned ") and lines[-1].startswith("built: ")
    selected = [tuple(int(x.replace(",", "")) for x in m.groups())
                for m in (re.match(r"targets selected: ([\d,]+)/([\d,]+)", line) for line in lines) if m]
    assert selected and selected == sorted(selected)
    assert selected[-1] == (first.stats["targets_reselected"],) * 2 and selected[-1][0] > 0
    order = [next(k for k, line in enumerate(lines) if line.startswith(p))
             for p in ("planned", "selecting", "targets selected", "writing the shards", "buckets written", "built")]
    assert order == sorted(order), lines
    assert all(re.search(r"\[\d+ s\]$", line) for line in lines)
    # a refresh says what it takes from the previous version, as its stats count it
    grown = _collection(tmp_path, groups, photos_per_group=14, extra=[("zz-new", [f"{groups[0]}-a", f"{groups[0]}-b"])])
    lines.clear()
    again = build_multiid_dataset(*grown, tmp_path / "v2", CFG, version="v2", reuse_from=first.out_dir, workers=2,
                                  progress=lines.append)
    (plan_line,) = [line for line in lines if "buckets unchanged" in line]
    st = again.stats
    assert (f"{st['buckets_reused']} of {st['buckets_reused'] + st['buckets_rebuilt']} buckets unchanged" in plan_line
            and f"{st['targets_reused']:,} targets reused" in plan_line
            and f"{st['targets_derived']:,} derived" in plan_line and f"{st['targets_reselected']:,} to select again" in plan_line)


def test_work_alongside_runs_in_another_process_and_is_waited_for(tmp_path):
    """parallel.alongside: the function runs in a forked process while the block runs here; its error is
    raised once the block is done, the block's own error first; the process is waited for either way."""
    import os
    import time

    from pipeline.multiid.parallel import alongside

    def note(name, fail=False, wait=0.0):
        def fn():
            time.sleep(wait)
            (tmp_path / name).write_text(str(os.getpid()))
            if fail:
                raise ValueError(f"{name} failed")
        return fn

    with alongside(note("a", wait=0.3)):
        here = os.getpid()
        assert not (tmp_path / "a").exists()  # not run before the block
    assert int((tmp_path / "a").read_text()) != here
    with pytest.raises(ValueError, match="b failed"), alongside(note("b", fail=True)):
        pass
    with pytest.raises(KeyError), alongside(note("c", fail=True, wait=0.3)):  # the block's error, not fn's
        raise KeyError("block")
    assert (tmp_path / "c").exists()  # waited for, though the block failed at once
    order = []
    with alongside(lambda: order.append("fn"), fork=False):
        order.append("block")
    assert order == ["block", "fn"]  # no fork: here, after the block


def test_fork_map_runs_closures_it_never_pickles():
    """parallel.fork_map maps any callable: a closure over an object that cannot be pickled (a lock) runs in
    the forked workers, which inherit it; a fork_map inside an alongside block runs its own function, and
    the alongside's still runs its own."""
    import os
    import threading

    from pipeline.multiid.parallel import alongside, fork_map

    lock = threading.Lock()  # not picklable: only inheriting it works
    here = os.getpid()

    def square(x):
        with lock:
            return x * x, os.getpid()

    got = fork_map(square, [1, 2, 3, 4], 2)
    assert [v for v, _ in got] == [1, 4, 9, 16] and here not in {pid for _, pid in got}
    seen = []
    with alongside(lambda: seen.append(lock.locked())):  # appends in the child: nothing comes back here
        inner = fork_map(lambda x: (x + 1, os.getpid()), [10, 20], 2)
    assert [v for v, _ in inner] == [11, 21] and not seen
    with pytest.raises(ZeroDivisionError):
        fork_map(lambda x: 1 / x, [1, 0], 2)
