"""The whole-collection assets on real photos: identities stay stable when a partition is added."""

import shutil

import dagster as dg
import pytest

from assets.faces import faces
from assets.identity import identities
from assets.ingest import images
from assets.multiid import multiid_dataset
from assets.partitions import input_partitions
from assets.resources import LineupSettings
from pipeline.catalog import query
from pipeline.config import Layout
from pipeline.datasets import latest_version
from pipeline.sources import register_new_inputs

PEOPLE = ("angelina_jolie", "george_clooney", "jennifer_aniston")


def _copy(shared, person, files, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy(p, dest / p.name)


@pytest.fixture()
def env(tmp_path, shared_faces):
    inp = tmp_path / "input"
    home = tmp_path / "home"
    settings = LineupSettings(home=str(home), input_dir=str(inp))
    return inp, Layout(home), settings, dg.DagsterInstance.ephemeral(), shared_faces


def _ingest(inp, layout, settings, instance):
    new = register_new_inputs(inp, layout.partitions, batch_size=1000)
    instance.add_dynamic_partitions(input_partitions.name, [s.key for s in new])
    for s in new:
        r = dg.materialize([images, faces], partition_key=s.key, instance=instance, resources={"lineup": settings})
        assert r.success
    return new


@pytest.mark.parametrize("mode", ["recluster", "incremental"])
def test_identities_are_stable_when_a_partition_arrives(env, mode):
    inp, layout, settings, instance, shared = env
    settings = LineupSettings(home=settings.home, input_dir=settings.input_dir, identity_mode=mode)
    for person in PEOPLE:
        files = sorted((shared / "identities" / person).iterdir())
        _copy(shared, person, files[:3], inp / "batch1" / person)
    _ingest(inp, layout, settings, instance)
    r = dg.materialize([identities, multiid_dataset], instance=instance, resources={"lineup": settings}, selection=[identities.key, multiid_dataset.key])
    assert r.success
    first = {(x["uid"], x["face_index"]): x["identity_id"] for x in query(layout, "SELECT * FROM identities").to_pylist()}
    by_person = query(
        layout,
        "SELECT regexp_extract(f.source, '([a-z_]+)/[^/]+$', 1) AS person, count(DISTINCT i.identity_id) AS n "
        "FROM identities i JOIN faces f USING (uid, face_index) GROUP BY 1 ORDER BY 1",
    ).to_pylist()
    assert [row["n"] for row in by_person] == [1, 1, 1], by_person  # one identity per person
    assert latest_version(layout, "multiid") is not None
    # the guard's stores: what the metadata says is kept is what the cache folder holds
    from pipeline.multiid.guard_cache import face_features_dir

    md = next(iter(r.asset_materializations_for_node("multiid_dataset"))).metadata
    stores = md["guard_stores"].data
    # a first version has no previous shards to find damaged
    assert md["previous_shards_damaged"].data == [] and md["selections_voided_by_damaged_shards"].value == 0
    kept = list(face_features_dir(layout.multiid_guard_cache).glob("*.feat"))
    assert kept and stores["face_features_entries"] == len(kept) and stores["face_features_bytes"] == sum(p.stat().st_size for p in kept)

    # a new partition: more photos of the same people and a new person
    for person in PEOPLE:
        files = sorted((shared / "identities" / person).iterdir())
        _copy(shared, person, files[3:5], inp / "batch2" / person)
    _copy(shared, "elon_musk", sorted((shared / "identities" / "elon_musk").iterdir())[:2], inp / "batch2" / "elon_musk")
    new = _ingest(inp, layout, settings, instance)
    assert len(new) == 1
    r = dg.materialize([identities], instance=instance, resources={"lineup": settings})
    assert r.success
    second = {(x["uid"], x["face_index"]): x["identity_id"] for x in query(layout, "SELECT * FROM identities").to_pylist()}
    assert all(second[k] == v for k, v in first.items())  # no churn for faces seen before
    rows = query(
        layout,
        "SELECT regexp_extract(f.source, '([a-z_]+)/[^/]+$', 1) AS person, list(DISTINCT i.identity_id) AS ids "
        "FROM identities i JOIN faces f USING (uid, face_index) GROUP BY 1 ORDER BY 1",
    ).to_pylist()
    ids = {row["person"]: row["ids"] for row in rows}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert ids["elon_musk"][0] not in {ids[p][0] for p in PEOPLE}
    meta = next(iter(r.asset_materializations_for_node("identities"))).metadata
    assert "picture: cluster_sizes" in meta and "picture: most_doubtful_merges" in meta  # links to files
    if mode == "incremental":  # the people the new photos joined were clustered again with them
        assert meta["local_recluster"].data["status"] == "done", meta["local_recluster"].data
        assert meta["local_recluster"].data["identities_reclustered"] == 3
    checks = {e.check_name: e for e in r.get_asset_check_evaluations()}
    assert checks["clustering_vs_folder_labels"].passed
