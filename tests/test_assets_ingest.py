"""materialize() the per-partition assets on a small real input, with bad files mixed in."""

import shutil

import dagster as dg
import pytest

from assets.faces import faces
from assets.ingest import images, new_inputs_sensor
from assets.partitions import input_partitions
from assets.resources import LineupSettings
from pipeline.catalog import query
from pipeline.config import Layout
from pipeline.sources import register_new_inputs


@pytest.fixture()
def small_input(tmp_path, shared_faces):
    inp = tmp_path / "input"
    inp.mkdir()
    for person in ("angelina_jolie", "elon_musk"):
        for p in sorted((shared_faces / "identities" / person).iterdir())[:2]:
            shutil.copy(p, inp / f"{person}_{p.name}")  # a temporary copy outside the repo
    shutil.copy(shared_faces / "groups" / "face-api.js__bbt1.jpg", inp / "group.jpg")
    (inp / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (inp / "empty.png").write_bytes(b"")
    return inp


def test_materialize_images_and_faces(tmp_path, small_input):
    home = tmp_path / "home"
    layout = Layout(home)
    settings = LineupSettings(home=str(home), input_dir=str(small_input))
    (spec,) = register_new_inputs(small_input, layout.partitions, batch_size=100)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(input_partitions.name, [spec.key])
    result = dg.materialize([images, faces], partition_key=spec.key, instance=instance, resources={"lineup": settings})
    assert result.success
    checks = {(e.asset_key.path[-1], e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert checks and all(checks.values()), checks
    mats = {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("images")}
    meta = mats["images"]
    assert meta["inputs"].value == 7 and meta["accepted"].value == 5 and meta["rejected"].value == 2
    n_faces = query(layout, "SELECT count(*) AS n FROM faces").column("n")[0].as_py()
    assert n_faces >= 4 + 3  # four portraits and several faces in the group still
    rej = query(layout, "SELECT source, stage, reason FROM rejects ORDER BY source").to_pylist()
    assert [(r["source"], r["reason"]) for r in rej] == [("broken.jpg", "not an image"), ("empty.png", "empty file")]
    cols = set(query(layout, "SELECT * FROM faces LIMIT 1").column_names)
    assert {"uid", "source", "face_index", "det_score", "embedding", "x1", "landmarks", "backend", "model_version"} <= cols
    face_meta = next(iter(result.asset_materializations_for_node("faces"))).metadata
    assert "picture: contact_sheet" in face_meta and face_meta["faces"].value == n_faces  # a link to a file

    # re-running the partition is idempotent
    again = dg.materialize([images, faces], partition_key=spec.key, instance=instance, resources={"lineup": settings})
    assert again.success
    assert query(layout, "SELECT count(*) AS n FROM faces").column("n")[0].as_py() == n_faces


def test_sensor_registers_new_inputs_once(tmp_path, small_input):
    home = tmp_path / "home"
    instance = dg.DagsterInstance.ephemeral()
    settings = LineupSettings(home=str(home), input_dir=str(small_input), batch_size=3)
    ctx = dg.build_sensor_context(instance=instance, resources={"lineup": settings})
    result = new_inputs_sensor(ctx)
    assert len(result.run_requests) == 3  # 7 files in batches of 3
    assert result.dynamic_partitions_requests[0].partition_keys == ["files-000000", "files-000001", "files-000002"]
    instance.add_dynamic_partitions(input_partitions.name, result.dynamic_partitions_requests[0].partition_keys)  # the daemon's part
    again = new_inputs_sensor(dg.build_sensor_context(instance=instance, resources={"lineup": settings}))
    assert isinstance(again, dg.SkipReason)


def test_a_failed_sensor_tick_loses_nothing(tmp_path, small_input):
    """The registry is written, then the tick dies before Dagster adds the partitions: the next tick
    adds and requests them."""
    home = tmp_path / "home"
    instance = dg.DagsterInstance.ephemeral()
    settings = LineupSettings(home=str(home), input_dir=str(small_input), batch_size=3)
    register_new_inputs(small_input, Layout(home).partitions, batch_size=3)  # what the dead tick got done
    result = new_inputs_sensor(dg.build_sensor_context(instance=instance, resources={"lineup": settings}))
    assert [r.partition_key for r in result.run_requests] == ["files-000000", "files-000001", "files-000002"]
    instance.add_dynamic_partitions(input_partitions.name, result.dynamic_partitions_requests[0].partition_keys)
    again = new_inputs_sensor(dg.build_sensor_context(instance=instance, resources={"lineup": settings}))
    assert isinstance(again, dg.SkipReason)
