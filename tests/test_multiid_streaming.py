"""Multi-identity builder at scale: rows streamed to Parquet (not held per target), written tables equal to
the in-memory selection."""

import pyarrow as pa
import pyarrow.parquet as pq
from test_multiid_units import _synthetic_tables

from pipeline.multiid import MultiIDConfig, build_multiid_dataset, select_references
from pipeline.multiid import rows as R
from pipeline.multiid import selection as S

CFG = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False)


def test_rows_streamed_in_small_batches_equal_the_in_memory_selection(tmp_path, monkeypatch):
    images, faces, ids = _synthetic_tables(tmp_path)
    # the reference: select_references keeps every row dict and orders them with a plain stable sort
    _, pair_rows, cand_rows, stats = select_references(images, faces, ids, CFG)
    # the build, with tiny batches: rows must leave for the part files a few at a time, and the merge read
    # them back a few at a time
    monkeypatch.setattr(S, "CANDIDATE_BATCH", 7)  # the pairs' batches (selection) and the candidates' (rows._TakenRows)
    monkeypatch.setattr(R, "CANDIDATE_BATCH", 7)
    monkeypatch.setattr(R, "MERGE_BATCH", 5)
    written = []
    real_write = R._RowParts.write

    def spy(self, name, table):
        written.append((name, table.num_rows))
        return real_write(self, name, table)

    monkeypatch.setattr(R._RowParts, "write", spy)
    out = tmp_path / "out"
    res = build_multiid_dataset(images, faces, ids, out, CFG)
    cand_batches = [n for name, n in written if name == "candidates"]
    assert len(cand_batches) > 10 and max(cand_batches) < len(cand_rows) / 10
    # one target's rows are written together, so a batch may pass 7 by one target's rows (< 3 people x 70)
    assert max(cand_batches) <= 7 + 3 * images.num_rows
    for name, rows, schema in (("candidates", cand_rows, R.CANDIDATE_SCHEMA), ("pairs", pair_rows, R.PAIRS_SCHEMA)):
        got = pq.read_table(out / f"{name}.parquet")
        assert got.num_rows == len(rows) > 0
        assert got.to_pylist() == pa.Table.from_pylist(rows, schema=schema).to_pylist(), name
    assert res.stats["similarity_hist_all_candidates"] == stats["similarity_hist_all_candidates"]
    assert res.stats["similarity_hist_selected"] == stats["similarity_hist_selected"]
    assert res.stats["data_quality"]["pairs"] == len(pair_rows)
    # the part files are gone once merged
    assert not [p for p in out.iterdir() if p.name.startswith(".rows-")]


def test_merge_in_target_order_matches_a_stable_sort():
    """Several sorted sources (a target's rows all in one source, split across batches) merge into the order
    of one stable sort by target uid."""
    import random

    rng = random.Random(4)
    uids = sorted({f"u{rng.randrange(10_000):05d}" for _ in range(300)})
    sources = [[] for _ in range(5)]
    for u in uids:
        src = sources[rng.randrange(5)]
        src += [{"target_uid": u, "k": len(src) * 10 + j} for j in range(rng.randrange(1, 6))]
    schema = pa.schema([("target_uid", pa.string()), ("k", pa.int64())])

    def batches(rows, size):
        for i in range(0, len(rows), size):
            yield pa.Table.from_pylist(rows[i:i + size], schema=schema)

    got = pa.concat_tables(list(R._merge_in_target_order([batches(s, 4) for s in sources], schema))).to_pylist()
    want = sorted((r for s in sources for r in s), key=lambda r: r["target_uid"])
    assert got == want


def test_card_counts_candidates_not_examined(tmp_path):
    from pipeline.multiid.release import multiid_card

    images, faces, ids = _synthetic_tables(tmp_path)
    out = tmp_path / "out"
    res = build_multiid_dataset(images, faces, ids, out, CFG)
    statuses = pq.read_table(out / "candidates.parquet", columns=["status"]).column("status").to_pylist()
    n = statuses.count("not_examined_enough_chosen")
    assert n > 0 and "ranked_out" not in statuses
    card = multiid_card("v-x", out, res.stats, CFG, {}, [], "test", "nobody@example.org")
    rows = [f for f in card.filters if f["filter"].startswith("reference: not examined by face NCC")]
    assert len(rows) == 1 and rows[0]["removed"] == n


def test_face_records_from_columns_equal_the_rows(tmp_path):
    """_faces_from_table builds FaceRecs column by column (landmarks as matrix rows when the column allows it):
    the same values as the table's rows, read one by one; a list column with a null falls back to lists."""
    import numpy as np
    import pyarrow.compute as pc

    _, faces, ids = _synthetic_tables(tmp_path, n_images=12)
    assert pa.types.is_fixed_size_list(faces.schema.field("landmarks").type)
    loose = faces.set_column(faces.schema.get_field_index("landmarks"), "landmarks",
                             pa.array([None, *faces.column("landmarks").to_pylist()[1:]], pa.list_(pa.float32())))
    for table in (faces, loose):
        by_uid = S._faces_from_table(table, ids)
        rows = table.to_pylist()
        assert sum(len(v) for v in by_uid.values()) == len(rows)
        recs = {(f.uid, f.face_index): f for v in by_uid.values() for f in v}
        for r in rows:
            f = recs[(r["uid"], r["face_index"])]
            assert [float(v) for v in f.landmarks] == (r["landmarks"] or [])
            assert (f.bbox, f.det_score, f.yaw, f.source) == ((r["x1"], r["y1"], r["x2"], r["y2"]), r["det_score"], r["yaw"], r["source"])
            e = np.asarray(r["embedding"], np.float32)
            assert np.array_equal(f.emb, e / np.maximum(np.linalg.norm(e[None], axis=1, keepdims=True)[0], 1e-12))
    ident = dict(zip(zip(ids.column("uid").to_pylist(), ids.column("face_index").to_pylist()), ids.column("identity_id").to_pylist()))
    assert all(f.identity_id == ident[(f.uid, f.face_index)] for v in by_uid.values() for f in v)
    assert pc.count(faces.column("uid")).as_py() == len(recs)


def test_first_samples_read_without_the_others(tmp_path):
    """The asset's contact sheet reads 4 samples: the first by key from the shards (samples_in), the first in
    tar order from a folder (load_samples); both equal the head of the full read."""
    from pipeline.multiid.metrics import load_samples

    images, faces, ids = _synthetic_tables(tmp_path)
    out = tmp_path / "out"
    res = build_multiid_dataset(images, faces, ids, out, CFG)
    everything = res.samples_in(out)
    assert len(everything) > 4
    assert res.samples_in(out, first=4) == everything[:4]
    assert load_samples(out, first=3) == load_samples(out)[:3]


def test_fingerprint_in_blocks_and_of_rows_equal_the_whole(tmp_path, monkeypatch):
    """fingerprint_table hashes a column at a time in blocks of rows, and of ``rows`` without a copy of the
    table: the same fingerprint as one block over ``table.take(rows)`` (lists with nulls included)."""
    import numpy as np

    from pipeline import datasets
    from pipeline.multiid.release import FACE_COLUMNS

    _, faces, _ = _synthetic_tables(tmp_path, n_images=20)
    loose = faces.set_column(faces.schema.get_field_index("landmarks"), "landmarks",
                             pa.array([None, [], *faces.column("landmarks").to_pylist()[2:]], pa.list_(pa.float32())))
    rows = np.random.default_rng(0).permutation(faces.num_rows)[: faces.num_rows // 2]
    for t in (faces, loose):
        whole = datasets.fingerprint_table(t.take(pa.array(rows)), FACE_COLUMNS, ["uid", "face_index"])
        monkeypatch.setattr(datasets, "FINGERPRINT_BLOCK", 3)
        assert datasets.fingerprint_table(t, FACE_COLUMNS, ["uid", "face_index"], rows=rows) == whole
        assert datasets.fingerprint_table(t, FACE_COLUMNS, ["uid", "face_index"]) != whole
        monkeypatch.undo()


def test_part_files_of_a_killed_build_are_removed_by_the_next(tmp_path):
    """A build killed with SIGKILL cannot remove its part folder (rows and sample records, up to the size of
    its shards) from out_dir: the next build into that folder does, and only folders whose owner is gone."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys

    from pipeline.multiid import plan as P

    images, faces, ids = _synthetic_tables(tmp_path)
    out = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # the build, killed once its rows are written and before its shards are
        try:
            P._Plan.emit = lambda self: os.kill(os.getpid(), signal.SIGKILL)
            build_multiid_dataset(images, faces, ids, out, CFG)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = [p for p in out.iterdir() if p.name.startswith(P.PARTS_PREFIX)]
    assert len(left) == 1 and any(left[0].rglob("*.parquet")), "the killed build left no part files to clean"
    # two part folders that must be kept: a live process's on this host, and one from another host
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name, lease in ((".rows-live", {"host": socket.gethostname(), "pid": sleeper.pid}),
                            (".rows-elsewhere", {"host": "another-host", "pid": pid})):
            (out / name).mkdir()
            (out / name / P.PARTS_OWNER).write_text(json.dumps(lease))
        res = build_multiid_dataset(images, faces, ids, out, CFG)
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(P.PARTS_PREFIX)) == [".rows-elsewhere", ".rows-live"]
    finally:
        sleeper.kill()
        sleeper.wait()
    fresh = build_multiid_dataset(images, faces, ids, tmp_path / "fresh", CFG)
    assert res.stats["per_split"] == fresh.stats["per_split"]
    assert pq.read_table(out / "pairs.parquet").equals(pq.read_table(tmp_path / "fresh" / "pairs.parquet"))
