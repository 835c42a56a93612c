"""A person removed through a photo that is not in the collection: gone from every table and from the
latest version of every dataset, while everybody else stays."""

import json
import shutil

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from assets.expression import expression_dataset, face_expressions
from assets.faces import faces
from assets.forget import main as forget
from assets.identity import identities
from assets.ingest import images
from assets.multiid import multiid_dataset
from assets.partitions import input_partitions
from assets.privacy import removals
from assets.resources import LineupSettings
from pipeline.catalog import query
from pipeline.config import Layout
from pipeline.datasets import latest_version
from pipeline.ids import content_uid
from pipeline.sources import register_new_inputs

PEOPLE = ("angelina_jolie", "george_clooney", "jennifer_aniston", "elon_musk")
GONE = "george_clooney"
COLLECTION = [removals, identities, multiid_dataset, expression_dataset]


def _uids_in_version(layout, name):
    version = latest_version(layout, name)
    assert version is not None, name
    folder = layout.datasets / name / version
    pairs = pq.read_table(folder / "pairs.parquet")
    cols = [c for c in ("target_uid", "ref_uid", "uid_a", "uid_b") if c in pairs.column_names]
    uids = {u for c in cols for u in pairs.column(c).to_pylist()}
    for tar_json in folder.rglob("*.tar"):
        import tarfile

        with tarfile.open(tar_json) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    s = json.loads(tf.extractfile(m).read())
                    uids |= {s.get("uid_a"), s.get("uid_b"), (s.get("target") or {}).get("uid")}
                    uids |= {r["uid"] for f in s.get("faces", []) for r in f["refs"]}
    return version, uids - {None}


def test_removal_by_photo_reaches_every_table_and_dataset(tmp_path, shared_faces, monkeypatch):
    inp, home = tmp_path / "input", tmp_path / "home"
    layout = Layout(home)
    uids = {}
    for person in PEOPLE:
        (inp / person).mkdir(parents=True)
        for p in sorted((shared_faces / "identities" / person).iterdir())[:3]:
            shutil.copy(p, inp / person / p.name)
            uids.setdefault(person, set()).add(content_uid(p.read_bytes()))
    settings = LineupSettings(home=str(home), input_dir=str(inp))
    instance = dg.DagsterInstance.ephemeral()
    (spec,) = register_new_inputs(inp, layout.partitions, batch_size=1000)
    instance.add_dynamic_partitions(input_partitions.name, [spec.key])
    res = {"lineup": settings}
    assert dg.materialize([images, faces, face_expressions], partition_key=spec.key, instance=instance, resources=res).success
    assert dg.materialize(COLLECTION, instance=instance, resources=res).success
    before, before_uids = _uids_in_version(layout, "multiid")
    assert before_uids & uids[GONE], "the person is in the dataset before the request"

    # the request: a mirrored, cropped copy of one of the person's photos, never ingested
    src = min((shared_faces / "identities" / GONE).iterdir())
    with Image.open(src) as im:
        im = ImageOps.mirror(im.convert("RGB"))
        w, h = im.size
        im.crop((int(0.05 * w), int(0.05 * h), int(0.95 * w), int(0.95 * h))).save(tmp_path / "request.jpg", quality=90)
    monkeypatch.setenv("LINEUP_HOME", str(home))
    assert forget(["--photo", str(tmp_path / "request.jpg")]) == 0
    r = dg.materialize(COLLECTION, instance=instance, resources=res)
    assert r.success
    meta = next(iter(r.asset_materializations_for_node("removals"))).metadata
    assert meta["photos_removed_now"].value == 3

    gone = uids[GONE]
    for view in ("images", "faces", "face_scan", "face_expressions", "identities"):
        present = {x["uid"] for x in query(layout, f"SELECT DISTINCT uid FROM {view}").to_pylist()}
        assert not present & gone, view
        assert present & uids["elon_musk"], view  # the others remain
    for name in ("multiid", "expression"):
        version, in_version = _uids_in_version(layout, name)
        assert not in_version & gone, name
        card = (layout.datasets / name / version / "README.md").read_text()
        assert "## Removals applied" in card and "| photo |" in card
    after, after_uids = _uids_in_version(layout, "multiid")
    assert after != before and after_uids  # a new version, still holding the other people
    superseded = json.loads((layout.datasets / "multiid" / "SUPERSEDED.json").read_text())
    assert before in superseded
    # the photos come back on a re-ingest only as rejects
    again = dg.materialize([images], partition_key=spec.key, instance=instance, resources=res)
    assert again.success
    rejected = query(layout, "SELECT count(*) AS n FROM rejects WHERE reason = 'removed on request'").column("n")[0].as_py()
    assert rejected == 3
    assert not {x["uid"] for x in query(layout, "SELECT uid FROM images").to_pylist()} & gone


def test_matches_below_the_automatic_threshold_wait_for_review():
    import pyarrow as pa

    from pipeline.removals import RemovalRequest, plan_removals

    rng = np.random.default_rng(0)
    person = rng.normal(size=8)
    person /= np.linalg.norm(person)

    def near(cos):
        other = rng.normal(size=8)
        other -= other @ person * person
        other /= np.linalg.norm(other)
        return (cos * person + np.sqrt(1 - cos**2) * other).astype(np.float32)

    emb = [near(0.99), near(0.93), near(0.5)]
    faces = pa.table({"uid": ["a", "b", "c"], "face_index": [0, 0, 0], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate(emb)), 8)})
    images = pa.table({"uid": ["a", "b", "c"], "source": ["a.jpg", "b.jpg", "c.jpg"]})
    req = RemovalRequest("rm-1", "photo", "2026-12-01T00:00:00Z", "h", embeddings=[person.tolist()])
    plan = plan_removals([req], images, faces, None, auto_min=0.95, review_min=0.91)
    assert plan.uids == {"a"} and [r["uid"] for r in plan.review] == ["b"]
    # the same person's other face is removed through its identity, without review
    ids = pa.table({"uid": ["a", "b", "c"], "face_index": [0, 0, 0], "identity_id": ["p", "p", "q"]})
    plan = plan_removals([req], images, faces, ids, auto_min=0.95, review_min=0.91)
    assert plan.uids == {"a", "b"} and plan.review == []
    with pytest.raises(ValueError, match="file the request again"):
        bad = RemovalRequest("rm-2", "photo", "2026-12-01T00:00:00Z", "h", embeddings=[[1.0, 0.0]])
        plan_removals([bad], images, faces, None, auto_min=0.95, review_min=0.91)


def test_removing_a_social_user(tmp_path, monkeypatch):
    """A user removed on request: none of their events count and none of their images is released."""
    from assets.social import social_dataset
    from pipeline.social.simulate import SimConfig, simulate

    simulate(tmp_path / "input" / "social", truth_dir=tmp_path / "truth", config=SimConfig(n_events=40_000, n_bots=0))
    home = tmp_path / "home"
    settings = LineupSettings(home=str(home), input_dir=str(tmp_path / "input"))
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([social_dataset], instance=instance, resources={"lineup": settings}).success
    layout = Layout(home)
    before = latest_version(layout, "social")
    pairs = pq.read_table(layout.datasets / "social" / before / "social_pairs.parquet")
    creators = pq.read_table(layout.datasets / "social" / before / "social_images.parquet", columns=["image_id", "creator_id"])
    # the creator of the most winning images
    winners = pairs.column("winner_image_id").to_pylist()
    creator_of = dict(zip(creators.column("image_id").to_pylist(), creators.column("creator_id").to_pylist()))
    user = max({creator_of[w] for w in winners}, key=lambda c: sum(creator_of[w] == c for w in winners))
    monkeypatch.setenv("LINEUP_HOME", str(home))
    monkeypatch.setenv("LINEUP_INPUT", str(tmp_path / "input"))  # the log the request is checked against
    assert forget(["--user", user]) == 0
    assert dg.materialize([social_dataset], instance=instance, resources={"lineup": settings}).success
    after = latest_version(layout, "social")
    assert after != before
    folder = layout.datasets / "social" / after
    images = pq.read_table(folder / "social_images.parquet")
    assert user not in set(images.column("creator_id").to_pylist())
    users = set(pq.read_table(folder / "social_pairs.parquet").column("user_id").to_pylist())
    assert user not in users
    rejects = pq.read_table(folder / "social_rejects.parquet")
    assert "removed on request" in set(rejects.column("reason").to_pylist())
    assert before in json.loads((layout.datasets / "social" / "SUPERSEDED.json").read_text())
    card = (folder / "README.md").read_text()
    assert "| user |" in card and user not in card
