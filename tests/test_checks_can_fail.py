"""Every blocking check compares two independent measurements, so each can fail: here each one does."""

import shutil

import dagster as dg
import pyarrow as pa
import pytest

import pipeline.commits as commits_mod
import pipeline.faces.stage as stage_mod
import pipeline.ingest as ingest_mod
from assets.faces import faces
from assets.ingest import images
from assets.partitions import input_partitions
from assets.resources import LineupSettings
from pipeline.config import Layout
from pipeline.expression.release import release_checks as expression_checks
from pipeline.faces.stage import embeddings_of
from pipeline.shards import write_manifest, write_shards
from pipeline.sources import register_new_inputs


@pytest.fixture()
def partition(tmp_path, shared_faces):
    inp = tmp_path / "input"
    inp.mkdir()
    for person in ("angelina_jolie", "elon_musk"):
        p = min((shared_faces / "identities" / person).iterdir())
        shutil.copy(p, inp / f"{person}_{p.name}")
    (inp / "broken.jpg").write_bytes(b"not a jpeg")
    home = tmp_path / "home"
    (spec,) = register_new_inputs(inp, Layout(home).partitions, batch_size=100)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(input_partitions.name, [spec.key])
    return spec, instance, LineupSettings(home=str(home), input_dir=str(inp))


def _checks(result):
    return {(e.asset_key.path[-1], e.check_name): e.passed for e in result.get_asset_check_evaluations()}


def test_ingest_and_face_checks_pass_on_honest_runs(partition):
    spec, instance, settings = partition
    r = dg.materialize([images, faces], partition_key=spec.key, instance=instance, resources={"lineup": settings})
    checks = _checks(r)
    assert checks[("images", "counts_reconcile")] and checks[("faces", "counts_reconcile")]


def test_images_check_fails_when_an_input_vanishes(partition, monkeypatch):
    spec, instance, settings = partition
    real = ingest_mod.ingest_partition

    def lossy(*a, **k):
        res = real(*a, **k)
        res.images = res.images.slice(1)  # one accepted image silently lost
        return res

    monkeypatch.setattr(ingest_mod, "ingest_partition", lossy)
    r = dg.materialize([images], partition_key=spec.key, instance=instance, resources={"lineup": settings}, raise_on_error=False)
    assert _checks(r)[("images", "counts_reconcile")] is False
    # kept out: no images file, and the face stage refuses to run on it
    assert not settings.layout.partition_file("images", spec.key).exists()
    r = dg.materialize([faces], partition_key=spec.key, instance=instance, resources={"lineup": settings}, raise_on_error=False)
    assert not r.success and not settings.layout.partition_file("faces", spec.key).exists()


def _faces_run(spec, instance, settings):
    assert dg.materialize([images], partition_key=spec.key, instance=instance, resources={"lineup": settings}).success
    return dg.materialize([faces], partition_key=spec.key, instance=instance, resources={"lineup": settings},
                          raise_on_error=False)


def _kept_out(settings, key):
    """A failed face unit: nothing in the tables, the collection leaves the partition out and says why."""
    from pipeline.collection import load_collection

    layout = settings.layout
    coll = load_collection(layout)
    assert not layout.partition_file("faces", key).exists() and not layout.partition_file("face_scan", key).exists()
    assert coll.built == [] and key in coll.failed
    return coll


def test_faces_counts_fail_when_a_face_row_vanishes(partition, monkeypatch):
    """The backend found a face that the faces table lost: face_scan (what the backend returned) disagrees
    with the faces file read back. Before, the scan was counted from the faces table and agreed."""
    spec, instance, settings = partition
    real = stage_mod.faces_table

    def lossy(records, backend):
        t = real(records, backend)
        assert t.num_rows >= 2
        return t.slice(1)

    monkeypatch.setattr(stage_mod, "faces_table", lossy)
    r = _faces_run(spec, instance, settings)
    assert _checks(r)[("faces", "counts_reconcile")] is False
    assert not r.success  # a failed blocking check fails the step
    _kept_out(settings, spec.key)


@pytest.mark.parametrize("fused", [True, False])
def test_faces_counts_fail_when_an_image_is_never_analysed(partition, monkeypatch, fused):
    """An engine that drops a chunk's image: image rows != scanned + rejected. Before, the scan was the
    image rows minus the rejects, so this held by construction. Both ways: the faces computed by the
    fused pass of ingestion (pipeline/per_image.py) and by the face stage itself."""
    spec, instance, settings = partition
    settings = settings.model_copy(update={"fused_per_image": fused})
    real = stage_mod.analyze_decoded  # the model half every engine and the fused pass run

    def drops_one(backend, chunk):
        records, rejects, timings = real(backend, chunk)
        return records[1:], rejects, timings

    monkeypatch.setattr(stage_mod, "analyze_decoded", drops_one)
    r = _faces_run(spec, instance, settings)
    assert _checks(r)[("faces", "counts_reconcile")] is False


def _corrupt_on_disk(monkeypatch, change):
    """The faces file as written differs from the table in memory (a bad writer, a flipped bit)."""
    real = commits_mod.write_parquet_atomic

    def write(table, path):
        if path.name == "faces.parquet" and table.num_rows:
            table = change(table)
        return real(table, path)

    monkeypatch.setattr(commits_mod, "write_parquet_atomic", write)


def test_faces_unit_norm_is_checked_on_the_file_written(partition, monkeypatch):
    spec, instance, settings = partition

    def halve(t):
        emb = embeddings_of(t) * 0.5
        i = t.column_names.index("embedding")
        flat = pa.array(emb.reshape(-1), pa.float32())
        return t.set_column(i, "embedding", pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))

    _corrupt_on_disk(monkeypatch, halve)
    r = _faces_run(spec, instance, settings)
    checks = _checks(r)
    assert checks[("faces", "embeddings_unit_norm")] is False and checks[("faces", "counts_reconcile")] is True
    _kept_out(settings, spec.key)


def test_faces_boxes_are_checked_on_the_file_written(partition, monkeypatch):
    spec, instance, settings = partition

    def shift(t):
        i = t.column_names.index("x2")
        return t.set_column(i, "x2", pa.array([v + 10_000 for v in t.column("x2").to_pylist()], pa.float32()))

    _corrupt_on_disk(monkeypatch, shift)
    r = _faces_run(spec, instance, settings)
    checks = _checks(r)
    assert checks[("faces", "bbox_inside_image")] is False and checks[("faces", "embeddings_unit_norm")] is True


def _expression_folder(tmp_path, pairs):
    samples = [{"__key__": r["pair_id"], "json": r} for r in pairs]
    shards = write_shards(samples, tmp_path, "expression-pairs")
    write_manifest(tmp_path, "expression_pairs", shards, {}, version="v-x")
    return pa.Table.from_pylist(pairs)


def test_expression_checks_read_identities_from_the_catalog(tmp_path):
    pairs = [{"pair_id": "p0", "uid_a": "a", "face_index_a": 0, "uid_b": "b", "face_index_b": 0, "identity_a": "x", "identity_b": "y"}]
    table = _expression_folder(tmp_path, pairs)
    ids = pa.table({"uid": ["a", "b"], "face_index": [0, 0], "identity_id": ["id1", "id2"]})
    assert expression_checks(tmp_path, ids, table) == {"no_same_identity_pairs": [], "shards_match_manifest": []}
    # the sample's json says x / y, but the catalog now puts both faces in one identity: the check fails
    merged = pa.table({"uid": ["a", "b"], "face_index": [0, 0], "identity_id": ["id1", "id1"]})
    assert expression_checks(tmp_path, merged, table)["no_same_identity_pairs"]
    # a pair row without its sample in the tars
    more = pa.Table.from_pylist([*pairs, dict(pairs[0], pair_id="p1")])
    assert expression_checks(tmp_path, ids, more)["shards_match_manifest"]
    # a tar in the folder that the manifest does not list
    write_shards([{"__key__": "zz", "json": pairs[0]}], tmp_path, "stray")
    assert any("not in the manifest" in p for p in expression_checks(tmp_path, ids, table)["shards_match_manifest"])


@pytest.mark.parametrize("fail", [True, False])
def test_collection_automation_waits_for_the_faces_blocking_checks(partition, monkeypatch, fail):
    """The eager condition of the collection assets requests identities after a faces partition lands
    only when that partition's blocking checks passed."""
    from assets.definitions import defs

    spec, instance, settings = partition
    if fail:
        real = stage_mod.face_checks

        def failing(faces_t, images_t):
            return {**real(faces_t, images_t), "embeddings_unit_norm": (False, "forced")}

        monkeypatch.setattr(stage_mod, "face_checks", failing)
    selection = dg.AssetSelection.assets("identities")
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
    _faces_run(spec, instance, settings)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                              cursor=before.cursor)
    assert after.total_requested == (0 if fail else 1)
