"""A refresh derives, without selecting it again, a target whose people only gained candidates that the
selection never examines (reuse.derive_added_candidates); a candidate that would be examined selects it again.
Either way the version is a fresh build's, byte for byte."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet
from test_shard_reuse import CFG, _collection, _compare, _groups, _release_multiid, _spy_select

from pipeline.config import Layout

# one group of three people, eight photos; person "a" is in photos 0, 3, 5, 6 (with b or c)
CFG_D = replace(CFG, refs_per_person=1)


def _with_new_face(tmp, groups, who: str, toward: str | None):
    """The collection plus one new one-face photo of ``who``, its embedding moved ``toward`` the person's mean
    (a high-similarity candidate, ranked first) or away from it (None: a low-similarity one)."""
    images, faces, ids = _collection(tmp, groups, photos_per_group=8, extra=[("zz-new", [who])])
    rows = faces.to_pylist()
    idents = ids.to_pylist()
    mine = [np.asarray(r["embedding"], np.float64) for r, i in zip(rows, idents) if i["identity_id"] == who and r["uid"] != "zz-new"]
    mean = np.mean(mine, axis=0)
    mean /= np.linalg.norm(mean)
    for r in rows:
        if r["uid"] == "zz-new":
            if toward == "mean":  # near the person's mean face, mid-band similarity, turned: the best score
                rnd = np.random.default_rng(5).normal(size=mean.size)
                e = mean + 0.12 * rnd / np.linalg.norm(rnd)
                e /= np.linalg.norm(e)
                r["yaw"] = 40.0
            else:  # orthogonal-ish to the person: below sim_low, never examined
                rnd = np.random.default_rng(5).normal(size=mean.size)
                e = rnd - (rnd @ mean) * mean
                e /= np.linalg.norm(e)
            r["embedding"] = e.astype(np.float32).tolist()
    return images, pa.Table.from_pylist(rows, schema=faces.schema), ids


def _refresh_and_fresh(tmp_path, monkeypatch, toward, cfg, person="a"):
    groups = _groups(1)
    who = f"{groups[0]}-{person}"
    layout = Layout(tmp_path / "home")
    _release_multiid(layout, *_collection(tmp_path, groups, photos_per_group=8), cfg=cfg)
    b_tables = _with_new_face(tmp_path, groups, who, toward)
    calls = _spy_select(monkeypatch)
    b = _release_multiid(layout, *b_tables, cfg=cfg)
    monkeypatch.undo()
    fresh = _release_multiid(Layout(tmp_path / "fresh"), *b_tables, cfg=cfg)
    return b, fresh, calls, who


def _targets_of(tables, who):
    _, _, ids = tables
    return {u for u, i in zip(ids.column("uid").to_pylist(), ids.column("identity_id").to_pylist()) if i == who}


def test_a_new_face_never_examined_derives_the_targets_and_the_bytes_equal_a_fresh_build(tmp_path, monkeypatch):
    # person "b": in kept targets (of one split), whose sample JSON then counts the new candidate
    b, fresh, calls, _ = _refresh_and_fresh(tmp_path, monkeypatch, None, CFG_D, person="b")
    st = b.result.stats
    cands = pa.parquet.read_table(fresh.folder / "candidates.parquet").to_pylist()
    new_rows = [r for r in cands if r["ref_uid"] == "zz-new"]
    assert new_rows and all(r["status"] == "sim_below_low" for r in new_rows)
    # every target that reached its candidates and has the person gains the row, and is derived, not selected
    derived = {r["target_uid"] for r in new_rows}
    assert st["targets_derived"] == len(derived) > 0
    assert all(not (c & derived) for c in calls) and calls == [{"zz-new"}]
    assert st["reselect_reasons"] == {"new_photo": 1}
    outcome = {r["target_uid"]: r["outcome"] for r in pa.parquet.read_table(fresh.folder / "targets.parquet").to_pylist()}
    assert any(outcome[u] == "kept" for u in derived) and any(outcome[u] != "kept" for u in derived | {"zz-new"})
    assert _compare(b.folder, fresh.folder) == []


def test_a_new_face_ranked_first_selects_the_targets_again(tmp_path, monkeypatch):
    b, fresh, calls, _ = _refresh_and_fresh(tmp_path, monkeypatch, "mean", CFG_D)
    st = b.result.stats
    cands = pa.parquet.read_table(fresh.folder / "candidates.parquet").to_pylist()
    new_rows = [r for r in cands if r["ref_uid"] == "zz-new"]
    examined = {r["target_uid"] for r in new_rows if r["status"] not in ("not_examined_enough_chosen", "sim_below_low",
                                                                          "sim_above_high", "ref_quality")}
    assert examined  # the new face is walked (selected, or judged a duplicate) in some targets
    assert examined <= set().union(*calls)
    assert st["reselect_reasons"].get("candidates_changed", 0) >= len(examined)
    # those targets' other candidates were screened from their previous rows, not again
    assert st["candidates_screened_from_previous"] > 0
    assert _compare(b.folder, fresh.folder) == []


def test_a_changed_candidate_photo_selects_its_targets_again(tmp_path, monkeypatch):
    """A new face never examined would derive the person's targets, but one of the person's other photos also
    changed (a face row of it: its screening may differ): the targets that had it as a candidate are selected
    again, the others derived, and the version is still a fresh build's."""
    groups = _groups(1)
    who = f"{groups[0]}-b"
    layout = Layout(tmp_path / "home")
    _release_multiid(layout, *_collection(tmp_path, groups, photos_per_group=8), cfg=CFG_D)
    images, faces, ids = _with_new_face(tmp_path, groups, who, None)
    rows, idents = faces.to_pylist(), ids.to_pylist()
    of_who = sorted({r["uid"] for r, i in zip(rows, idents) if i["identity_id"] == who and r["uid"] != "zz-new"})
    changed = of_who[-1]
    for r, i in zip(rows, idents):
        if r["uid"] == changed and i["identity_id"] == who:
            r["blur"] = float(r["blur"]) + 0.5  # still sharp enough: the face stays a candidate
    b_tables = (images, pa.Table.from_pylist(rows, schema=faces.schema), ids)
    calls = _spy_select(monkeypatch)
    b = _release_multiid(layout, *b_tables, cfg=CFG_D)
    monkeypatch.undo()
    st = b.result.stats
    cands = pa.parquet.read_table(b.folder / "candidates.parquet").to_pylist()
    had_changed = {r["target_uid"] for r in cands if r["ref_uid"] == changed}
    assert st["not_derived_because"].get("candidate_photo_changed", 0) >= 1
    assert (had_changed - {"zz-new"}) & set().union(*calls)  # selected again, not derived
    fresh = _release_multiid(Layout(tmp_path / "fresh"), *b_tables, cfg=CFG_D)
    assert _compare(b.folder, fresh.folder) == []


def test_a_derived_samples_json_is_patched_to_the_bytes_a_fresh_encoding_gives():
    """reuse._patched_json rewrites the faces' two counts in place: the bytes of encoding the raised sample, also
    when a caption holds the field's name and a reference holds a face index; another writer's JSON is re-encoded."""
    import json

    from pipeline.multiid.reuse import _patched_json
    from pipeline.shards import encode_member

    s = {"caption": 'he said "n_candidates":3, "n_survivors":1', "other_faces": [{"face_index": 2, "reason": "small"}],
         "faces": [{"face_index": 1, "n_candidates": 5, "n_survivors": 2, "refs": [{"face_index": 0, "score": 0.5}]},
                   {"face_index": 0, "n_candidates": 7, "n_survivors": 0, "refs": []}]}
    data = encode_member("json", s)
    for added in ({0: (2, 1)}, {1: (1, 0), 0: (3, 3)}, {5: (1, 1)}):
        want = json.loads(data)
        for fj in want["faces"]:
            n, sv = added.get(fj["face_index"], (0, 0))
            fj["n_candidates"] += n
            fj["n_survivors"] += sv
        got = _patched_json(data, added)
        assert isinstance(got, bytes) and got == encode_member("json", want)
    spaced = json.dumps(s, sort_keys=True).encode()  # not this builder's encoding: re-encoded whole
    got = _patched_json(spaced, {1: (1, 0)})
    assert isinstance(got, dict) and encode_member("json", got) != spaced and got["faces"][0]["n_candidates"] == 6


def test_previous_candidates_are_grouped_by_target_across_batches():
    """The previous candidate rows reach the derivation in batches that cut targets anywhere: each target's rows
    come back whole, in their order, with the columns the derivation reads; rows out of target order stop it."""
    import pytest

    from pipeline.multiid.reuse import previous_candidates_by_target
    from pipeline.multiid.rows import CANDIDATE_SCHEMA

    rng = np.random.default_rng(7)
    rows = []
    for t in range(60):
        for k in range(int(rng.integers(1, 30))):
            rows.append({"target_uid": f"t{t:03d}", "target_face_index": int(rng.integers(0, 3)), "identity_id": f"p{k % 4}",
                         "ref_uid": f"r{k:03d}", "ref_face_index": k % 2, "similarity": float(rng.random()),
                         "image_hamming": None if k % 5 == 0 else k, "face_hamming": k + 1,
                         "score": None if k % 3 == 0 else 0.5, "status": ["selected", "redundant", None][k % 3]})
    table = pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
    cuts = sorted(set(rng.integers(1, len(rows), size=12).tolist()))
    pieces = [table.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, len(rows)])]
    got = {}
    for u, old in previous_candidates_by_target(iter(pieces)):
        b = old.batch
        got[u] = [(b.face[i], b.identity[i], b.ref_uid[i], b.ref_face[i], b.status[i], b.image_hamming[i], b.face_hamming[i],
                   b.scored[i]) for i in old.indices()]
        assert [b.table.column("ref_uid")[i].as_py() for i in old.indices()] == [x[2] for x in got[u]]
    want: dict[str, list] = {}
    for r in rows:
        want.setdefault(r["target_uid"], []).append((r["target_face_index"], r["identity_id"], r["ref_uid"], r["ref_face_index"],
                                                     r["status"], r["image_hamming"], r["face_hamming"], r["score"] is not None))
    assert list(got) == sorted(want) and got == want
    shuffled = [pieces[1], pieces[0], *pieces[2:]]
    with pytest.raises(RuntimeError, match="not in target order"):
        list(previous_candidates_by_target(iter(shuffled)))


def test_previous_rows_written_by_target_read_back_whole_here_and_pickled(tmp_path):
    """reuse.PreviousRowsWriter / PreviousRows: each target's rows come back as written, in its order, from the
    memory-mapped file and from a pickled copy (what a Ray task on another node gets); a target not written has none."""
    import pickle

    from pipeline.multiid.reuse import PreviousRows, PreviousRowsWriter, previous_candidates_by_target
    from pipeline.multiid.rows import CANDIDATE_SCHEMA

    rng = np.random.default_rng(3)
    rows = []
    for t in range(40):
        for j in range(int(rng.integers(1, 30))):
            rows.append({"target_uid": f"t{t:03d}", "target_face_index": int(j % 2), "identity_id": f"p{t % 5}",
                         "ref_uid": f"r{j:03d}", "ref_face_index": 0, "similarity": float(rng.random()),
                         "image_hamming": int(j), "face_hamming": None, "face_ncc": None, "kp_inliers": None, "kp_ratio": None,
                         "ref_quality": 0.5, "pose_diff": 1.0, "score": None if j % 3 else 0.25, "status": f"s{j % 4}"})
    table = pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
    w = PreviousRowsWriter(tmp_path / "prev.arrow", CANDIDATE_SCHEMA)
    w.BATCH = 50  # several record batches
    kept = set()
    for u, got in previous_candidates_by_target([table.slice(0, 170), table.slice(170)]):
        if int(u[1:]) % 3:
            w.add(u, got)
            kept.add(u)
    path, index = w.close()
    prev = PreviousRows([path], {u: (0, *at) for u, at in index.items()}, frozenset())
    for reader in (prev, pickle.loads(pickle.dumps(prev))):
        for t in range(40):
            u = f"t{t:03d}"
            got = reader.of(u)
            if u not in kept:
                assert got is None
                continue
            want = [r for r in rows if r["target_uid"] == u]
            assert got.batch.table.slice(got.start, len(got)).to_pylist() == pa.Table.from_pylist(want, schema=CANDIDATE_SCHEMA).to_pylist()
            assert [got.batch.status[i] for i in got.indices()] == [r["status"] for r in want]
            assert [got.batch.scored[i] for i in got.indices()] == [r["score"] is not None for r in want]
    assert PreviousRowsWriter(tmp_path / "none.arrow", CANDIDATE_SCHEMA).close() is None
