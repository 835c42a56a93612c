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


def _hostile_input(root, shared_faces):
    """Two real photos among every hostile entry issue 21 found; returns (input folder, deepest folder)."""
    import os
    import struct
    import zlib

    inp, outside = root / "input", root / "outside"
    inp.mkdir()
    outside.mkdir()
    for p in sorted((shared_faces / "identities" / "elon_musk").iterdir())[:2]:
        shutil.copy(p, inp / p.name)  # temporary copies outside the repo
    shutil.copy(p, outside / "secret.jpg")
    (inp / os.fsdecode(b"caf\xe9.jpg")).write_bytes((inp / p.name).read_bytes()[:-1])  # a name that is not UTF-8
    deep = str(inp)
    for _ in range(1000):  # one level at a time: os.makedirs recurses once per level
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    shutil.copy(p, os.path.join(deep, "deep.jpg"))  # the same bytes again: a duplicate, 1000 levels down
    os.symlink(outside / "secret.jpg", inp / "link-out.jpg")
    os.mkfifo(inp / "fifo.jpg")
    (inp / "x.jpg").mkdir()
    os.symlink("/dev/zero", inp / "zero.jpg")
    os.symlink("loop.jpg", inp / "loop.jpg")

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    body = b"".join(z.compress(b"\0" * (1 + 2 * 6300)) for _ in range(6300)) + z.flush()
    (inp / "bomb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 6300, 6300, 16, 0, 0, 0, 0))
                                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return inp, deep


def _listed_independently(inp) -> set[str]:
    """Every entry `find` lists that is not a folder, and folders named like images, as the labels sources get."""
    import os
    import subprocess

    out = subprocess.run(["find", str(inp), "-mindepth", "1", "(", "!", "-type", "d", "-o", "-iname", "*.jpg", ")",
                          "-printf", "%P\\0"], capture_output=True, check=True).stdout
    return {os.fsdecode(p).encode("utf-8", "backslashreplace").decode() if p else "" for p in out.split(b"\0") if p}


@pytest.mark.timeout(300)
def test_hostile_input_folder_every_entry_ends_accepted_or_rejected(tmp_path, shared_faces):
    """The folder is listed again with `find` and compared with the image and reject rows read back
    through the catalog (which reads the partition registry: a non-UTF-8 name once broke it for good)."""
    import os

    inp, deep = _hostile_input(tmp_path, shared_faces)
    try:
        home = tmp_path / "home"
        layout = Layout(home)
        settings = LineupSettings(home=str(home), input_dir=str(inp))
        specs = register_new_inputs(inp, layout.partitions, batch_size=4)
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(input_partitions.name, [s.key for s in specs])
        for spec in specs:
            result = dg.materialize([images], partition_key=spec.key, instance=instance, resources={"lineup": settings})
            assert result.success
            assert all(e.passed for e in result.get_asset_check_evaluations())  # counts_reconcile
        accepted = query(layout, "SELECT source FROM images").column("source").to_pylist()
        rejected = query(layout, "SELECT source, reason, detail FROM rejects").to_pylist()
        listed = _listed_independently(inp)
        assert len(listed) == 10
        assert sorted(accepted + [r["source"] for r in rejected]) == sorted(listed)
        assert all(r["reason"] and r["detail"] for r in rejected)
        reasons = {r["source"]: r["reason"] for r in rejected}
        deep_source = "/".join(["d"] * 1000) + "/deep.jpg"
        assert len(accepted) == 2 and deep_source in accepted + [k for k, v in reasons.items() if v == "duplicate image"]
        assert {k: v for k, v in reasons.items() if v != "duplicate image"} == {
            "caf\\udce9.jpg": "file name not UTF-8", "link-out.jpg": "link outside the input folder",
            "fifo.jpg": "not a regular file", "x.jpg": "not a regular file", "zero.jpg": "link outside the input folder",
            "loop.jpg": "broken link", "bomb16.png": "decompression bomb"}
        assert register_new_inputs(inp, layout.partitions) == []  # a second run finds nothing new and does not fail
    finally:  # pytest's clean-up (shutil.rmtree) recurses once per level: empty the deep folder bottom-up
        os.unlink(os.path.join(deep, "deep.jpg"))
        while deep != str(inp):
            os.rmdir(deep)
            deep = os.path.dirname(deep)
