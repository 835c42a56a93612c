"""A removal is never half-applied: the request log is the source of truth, a kill at any step of
applying it is finished by the next run, and the result equals an uninterrupted run. On a small
synthetic collection (8-d embeddings), so that every fault point can be tried."""

import io
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import removals as rm
from pipeline.config import Layout
from pipeline.faces.stage import FACE_SCAN_SCHEMA, faces_schema
from pipeline.ingest import IMAGES_SCHEMA
from pipeline.pictures import save_pictures
from pipeline.rejects import REJECT_SCHEMA

DIM = 8
KEY = "files-000000"


class Killed(BaseException):
    """What the injected fault raises: like a kill, nothing below catches it."""


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _near(rng, base, cos):
    other = rng.normal(size=DIM)
    other -= other @ base * base
    other = _unit(other)
    return _unit(cos * base + np.sqrt(1 - cos**2) * other)


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PERSON = _unit(np.arange(1, DIM + 1))
rng = np.random.default_rng(7)
# a: the person (0.99 to the request photo); b: the person (0.93, same identity as a);
# c, d: other people. File names name the person, as they often do.
FACES = {
    "a": ("kit_with_rose.jpg", _near(rng, PERSON, 0.99), "id-kit"),
    "b": ("kit_at_the_beach.jpg", _near(rng, PERSON, 0.93), "id-kit"),
    "c": ("sam.jpg", _near(rng, _unit(rng.normal(size=DIM)), 1.0), "id-sam"),
    "d": ("lee.jpg", _near(rng, _unit(rng.normal(size=DIM)), 1.0), "id-lee"),
}
UID = {k: ("%x" % (10 + i)) * 32 for i, k in enumerate(FACES)}
UID = {k: u[:32] for k, u in UID.items()}


def _write(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def build_collection(home, names=("a", "b", "c", "d"), key=KEY):
    layout = Layout(home)
    inp = home.parent / f"input-{home.name}"  # the photos' files, outside the home
    inp.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, n in enumerate(names):
        f = inp / FACES[n][0]
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(f, format="JPEG")
        rows.append({"uid": UID[n], "source": FACES[n][0], "partition": key, "path": str(f), "offset": 0,
                     "length": f.stat().st_size, "width": 64, "height": 64, "format": "JPEG"})
    images = pa.Table.from_pylist([{f.name: r.get(f.name) for f in IMAGES_SCHEMA} for r in rows], schema=IMAGES_SCHEMA)
    fs = faces_schema(DIM)
    frows = [{f.name: None for f in fs} | {"uid": UID[n], "source": FACES[n][0], "face_index": 0,
                                           "embedding": FACES[n][1].astype(np.float32).tolist(), "backend": "dlib",
                                           "x1": 8.0, "y1": 8.0, "x2": 56.0, "y2": 56.0} for n in names]
    faces = pa.Table.from_pylist(frows, schema=fs)
    _write(layout.partition_file("images", key), images)
    _write(layout.partition_file("faces", key), faces)
    _write(layout.partition_file("face_scan", key), pa.Table.from_pylist(
        [{f.name: None for f in FACE_SCAN_SCHEMA} | {"uid": UID[n], "source": FACES[n][0], "partition": key} for n in names],
        schema=FACE_SCAN_SCHEMA))
    for t in ("face_expressions", "image_scores"):
        _write(layout.partition_file(t, key), pa.table({"uid": [UID[n] for n in names], "x": list(range(len(names)))}))
    # a second copy of a's bytes was rejected as a duplicate, under its own (telling) name
    _write(layout.partition_file("rejects_ingest", key), pa.Table.from_pylist(
        [{"source": "kit_with_rose (1).jpg", "stage": "ingest", "reason": "duplicate image",
          "detail": "same bytes as kit_with_rose.jpg", "partition": key, "uid": UID["a"]}], schema=REJECT_SCHEMA))
    ids = pa.table({"uid": [UID[n] for n in names], "face_index": pa.array([0] * len(names), pa.int32()),
                    "identity_id": [FACES[n][2] for n in names]})
    _write(layout.table_file("identities"), ids)
    _write(layout.table_file("scores"), pa.table({"uid": [UID[n] for n in names]}))
    # a published version holding the person, and the pictures that show them
    v = layout.datasets / "multiid" / "v-old"
    _write(v / "pairs.parquet", pa.table({"target_uid": [UID["a"], UID["c"]], "ref_uid": [UID["b"], UID["d"]]}))
    (v / "shard-000000.tar").write_bytes(b"the person's jpeg bytes")
    (layout.datasets / "multiid" / "LATEST").write_text("v-old")
    # a version kept unpublished after a failed check, and what a killed build left in staging
    _write(layout.datasets / "multiid" / ".unpublished-v-bad" / "pairs.parquet", pa.table({"target_uid": [UID["b"]]}))
    (layout.datasets / "multiid" / ".staging-v-new-999999").mkdir()
    (layout.datasets / "multiid" / ".staging-v-new-999999" / "x.json").write_text('{"source": "kit_with_rose.jpg"}')
    # killed long ago: no lease, older than a lease's lifetime (a fresh folder without one is a build starting)
    old = time.time() - 3600
    os.utime(layout.datasets / "multiid" / ".staging-v-new-999999", (old, old))
    # the multi-identity guard's kept decisions: pairs of faces, two of them with the person
    from pipeline.multiid.guard_cache import SCHEMA as GUARD_SCHEMA

    _write(layout.multiid_guard_cache, pa.Table.from_pylist(
        [{f.name: None for f in GUARD_SCHEMA} | {"k0": i, "k1": i, "a_uid": UID[x], "b_uid": UID[y]}
         for i, (x, y) in enumerate([("a", "c"), ("c", "d"), ("d", "b")])], schema=GUARD_SCHEMA))
    save_pictures(home, f"faces/{key}", {"contact_sheet": _png()}, [UID["a"], f"{UID['b']}#0"])
    save_pictures(home, "identities", {"others": _png()}, [UID["c"]])
    return layout, images, faces, ids


def photo_request(layout, emb=PERSON):
    return rm.record_request(layout, "photo", "request-photo-bytes", face_model="dlib:test",
                             embeddings=[np.asarray(emb, float).tolist()])


def apply(layout, images, faces, ids, purge=True, checkpoint=None):
    kw = {} if checkpoint is None else {"checkpoint": checkpoint}
    return rm.apply_requests(layout, rm.load_requests(layout), images, faces, ids, auto_min=0.95, review_min=0.91,
                             purge=purge, **kw)


def snapshot(home):
    """Everything a removal decides, independent of timestamps."""
    layout = Layout(home)
    out = {}
    for p in sorted((home / "tables").rglob("*.parquet")):
        if not p.name.startswith("."):
            out[str(p.relative_to(home))] = sorted(json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(p).to_pylist())
    out["removed"] = sorted(rm.load_journal(layout).removed)
    out["datasets"] = sorted(str(p.relative_to(home)) for p in (home / "datasets").rglob("*") if p.is_file()
                             and p.name != "SUPERSEDED.json")
    sup = home / "datasets" / "multiid" / "SUPERSEDED.json"
    out["superseded"] = {k: v["deleted"] for k, v in json.loads(sup.read_text()).items()} if sup.exists() else None
    out["pictures"] = sorted(str(p.relative_to(home)) for p in (home / "pictures").rglob("*.png"))
    return out


def _traces(home, needles):
    found = []
    for p in home.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            found += [(str(p.relative_to(home)), n) for n in needles if n.encode() in data]
    return found


def test_uninterrupted_removal_leaves_no_trace(tmp_path):
    layout, images, faces, ids = build_collection(tmp_path)
    photo_request(layout)
    out = apply(layout, images, faces, ids)
    assert out.photos_removed_now == 2 and out.photos_removed_total == 2
    for t in ("images", "faces", "face_scan", "face_expressions", "image_scores"):
        left = set(pq.read_table(layout.partition_file(t, KEY)).column("uid").to_pylist())
        assert left == {UID["c"], UID["d"]}, t
    rej = pq.read_table(layout.partition_file("rejects_ingest", KEY)).to_pylist()
    # 1 duplicate copy + 2 image rows: counts reconcile, by content hash only
    assert len(rej) == 3 and all(r["reason"] == rm.REMOVED_REASON and r["uid"] is None for r in rej)
    assert {r["source"] for r in rej} == {rm.removed_source(UID["a"]), rm.removed_source(UID["b"])}
    assert not (layout.datasets / "multiid" / "v-old").exists()
    assert json.loads((layout.datasets / "multiid" / "SUPERSEDED.json").read_text())["v-old"]["deleted"] is True
    assert not (tmp_path / "pictures" / "faces" / KEY / "contact_sheet.png").exists()
    assert (tmp_path / "pictures" / "identities" / "others.png").exists()
    guard = pq.read_table(layout.multiid_guard_cache)
    assert list(zip(guard.column("a_uid").to_pylist(), guard.column("b_uid").to_pylist())) == [(UID["c"], UID["d"])]
    needles = [UID["a"], UID["b"], "kit_with_rose", "kit_at_the_beach"]
    assert _traces(tmp_path, needles) == []
    # the same bytes arriving again are recognised without the uid being stored
    assert UID["a"] in rm.removed_uids(layout) and UID["c"] not in rm.removed_uids(layout)
    # idempotent: a second run changes nothing
    before = snapshot(tmp_path)
    again = apply(layout, images, faces, ids)
    assert again.photos_removed_now == 0 and again.rows_removed == {} and snapshot(tmp_path) == before


def _steps(tmp_path):
    seen = []
    layout, images, faces, ids = build_collection(tmp_path / "steps")
    photo_request(layout)
    apply(layout, images, faces, ids, checkpoint=seen.append)
    return seen


def test_a_kill_at_every_step_is_finished_by_the_rerun(tmp_path):
    ref_home = tmp_path / "ref"
    layout, images, faces, ids = build_collection(ref_home)
    photo_request(layout)
    shutil.copytree(ref_home, tmp_path / "pristine")
    apply(layout, images, faces, ids)
    expected = snapshot(ref_home)
    steps = _steps(tmp_path)
    assert {"planned", "journaled", "pictures", "superseded", "review"} <= set(steps)
    assert sum(s.startswith("sweep:") for s in steps) >= 7  # rejects, images, faces, scans, expressions, scores, ids...
    for i, step in enumerate(steps):
        home = tmp_path / f"kill-{i}"
        shutil.copytree(tmp_path / "pristine", home)

        def fault(s, _at=step):
            if s == _at:
                raise Killed(s)

        lay = Layout(home)
        with pytest.raises(Killed):
            apply(lay, images, faces, ids, checkpoint=fault)
        # the rerun sees the collection as the killed run left it (tables partly swept)
        from pipeline.storage import read_parquet

        im = read_parquet(lay.partition_file("images", KEY))
        fc = read_parquet(lay.partition_file("faces", KEY))
        idp = lay.table_file("identities")
        apply(lay, im, fc, read_parquet(idp) if idp.exists() else None)
        got = snapshot(home)
        assert got == expected, f"kill after {step}"


def test_purge_after_the_removal_was_applied_deletes_old_versions(tmp_path):
    layout, images, faces, ids = build_collection(tmp_path)
    photo_request(layout)
    apply(layout, images, faces, ids, purge=False)
    assert (layout.datasets / "multiid" / "v-old").exists()
    assert json.loads((layout.datasets / "multiid" / "SUPERSEDED.json").read_text())["v-old"]["deleted"] is False
    from pipeline.storage import read_parquet

    im, fc = read_parquet(layout.partition_file("images", KEY)), read_parquet(layout.partition_file("faces", KEY))
    apply(layout, im, fc, read_parquet(layout.table_file("identities")), purge=True)
    assert not (layout.datasets / "multiid" / "v-old").exists()
    assert json.loads((layout.datasets / "multiid" / "SUPERSEDED.json").read_text())["v-old"]["deleted"] is True


def test_a_later_photo_is_matched_against_every_face_removed_with_the_request(tmp_path):
    """The issue's case: a later photo at 0.926 to the request photo but >= 0.95 to the person's other
    removed photo is removed too, under whatever new identity it was given."""
    layout, images, faces, ids = build_collection(tmp_path)
    photo_request(layout)
    apply(layout, images, faces, ids)
    # a new photo close to b (removed through the identity) and only 0.926 to the request photo
    b = FACES["b"][1]
    later = None
    for seed in range(2000):
        cand = _near(np.random.default_rng(seed), b, 0.97)
        if 0.915 < cand @ PERSON < 0.935:
            later = cand
            break
    assert later is not None
    assert float(later @ PERSON) < 0.95 <= float(later @ b)
    FACES["e"] = ("kit_later.jpg", later, "id-new")
    UID["e"] = "e" * 32
    try:
        from pipeline.storage import read_parquet

        build_collection(tmp_path / "later", names=("e",), key="files-000001")
        for t in ("images", "faces", "face_scan", "face_expressions", "image_scores"):
            shutil.copy(tmp_path / "later" / "tables" / t / "files-000001.parquet", layout.partition_file(t, "files-000001"))
        im = pa.concat_tables([read_parquet(p) for p in sorted((layout.tables / "images").glob("*.parquet"))])
        fc = pa.concat_tables([read_parquet(p) for p in sorted((layout.tables / "faces").glob("*.parquet"))])
        ids2 = pa.concat_tables([read_parquet(layout.table_file("identities")),
                                 pa.table({"uid": [UID["e"]], "face_index": pa.array([0], pa.int32()), "identity_id": ["id-new"]})])
        out = apply(layout, im, fc, ids2)
        assert out.photos_removed_now == 1
        assert UID["e"] not in set(read_parquet(layout.partition_file("images", "files-000001")).column("uid").to_pylist())
    finally:
        FACES.pop("e")
        UID.pop("e")


def test_borderline_matches_are_listed_with_a_command_that_works(tmp_path, capsys, monkeypatch):
    layout, images, faces, _ = build_collection(tmp_path)
    # a request photo that reaches only b's band: 0.91 <= cos < 0.95, and the identities unknown yet
    target = FACES["b"][1]
    emb = None
    for seed in range(5000):
        cand = _near(np.random.default_rng(seed), target, 0.93)
        if all(float(cand @ FACES[n][1]) < 0.91 for n in ("a", "c", "d")):
            emb = cand
            break
    assert emb is not None
    photo_request(layout, emb)
    out = apply(layout, images, faces, None)
    assert out.photos_removed_now == 0 and out.awaiting_review == 1
    review = json.loads(rm.review_file(layout).read_text())
    assert [r["confirm"] for r in review] == [f"make forget IMAGE={UID['b']}"]  # not IDENTITY=None
    # the request removed nothing: no dataset version may change because of it
    assert rm.card_entries(layout) == []
    from assets.forget import main as forget

    monkeypatch.setenv("LINEUP_HOME", str(tmp_path))
    assert forget(["--review"]) == 0
    assert f"make forget IMAGE={UID['b']}" in capsys.readouterr().out
    assert forget(["--image", UID["b"]]) == 0  # the printed command is accepted ...
    out = apply(layout, images, faces, None)
    assert out.photos_removed_now == 1  # ... and removes the photo
    assert len(rm.card_entries(layout)) == 1


def test_bad_requests_are_refused_and_record_nothing(tmp_path, monkeypatch, capsys):
    from assets.forget import main as forget

    build_collection(tmp_path)
    monkeypatch.setenv("LINEUP_HOME", str(tmp_path))
    (tmp_path / "not_an_image.jpg").write_text("hello")
    (tmp_path / "a_folder").mkdir()
    bad = [["--photo", ""], ["--user", ""], ["--user", "  "], ["--image", ""], ["--identity", ""],
           ["--image", str(tmp_path / "nope.jpg")], ["--image", "f" * 32], ["--identity", "id-nobody"],
           ["--identity", "None"], ["--photo", str(tmp_path / "missing.jpg")], ["--photo", str(tmp_path / "a_folder")],
           ["--photo", str(tmp_path / "not_an_image.jpg")], ["--image", str(tmp_path / "a_folder")]]
    for argv in bad:
        assert forget(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, argv
    assert rm.load_requests(Layout(tmp_path)) == []
    assert forget(["--identity", "id-sam"]) == 0 and forget(["--image", "sam.jpg"]) == 0
    assert len(rm.load_requests(Layout(tmp_path))) == 2
    # a user: checked against the interaction log this home builds from (none known yet: refused)
    monkeypatch.delenv("LINEUP_SOCIAL", raising=False)
    monkeypatch.delenv("LINEUP_INPUT", raising=False)
    assert forget(["--user", "u1"]) == 2 and "no interaction log" in capsys.readouterr().err
    log = tmp_path / "log"
    log.mkdir()
    pq.write_table(pa.table({"image_id": ["i1"], "creator_id": ["maker"], "path": ["x.jpg"], "prompt": ["p"]}),
                   log / "images.parquet")
    (log / "events.csv").write_text("ts,user_id,image_id,event,event_id\n2026-01-01T00:00:00,fan,i1,like,e1\n")
    monkeypatch.setenv("LINEUP_SOCIAL", str(log))
    assert forget(["--user", "somebody-else"]) == 2 and "appears nowhere" in capsys.readouterr().err
    assert len(rm.load_requests(Layout(tmp_path))) == 2
    assert forget(["--user", "fan"]) == 0 and forget(["--user", "maker"]) == 0
    assert len(rm.load_requests(Layout(tmp_path))) == 4


def test_an_applied_log_with_uids_in_clear_is_rewritten_hashed(tmp_path):
    """Logs written before hashing named the uids; the next run keeps their effect and drops the names."""
    layout, images, faces, ids = build_collection(tmp_path)
    req = rm.record_request(layout, "image", UID["c"], uid=UID["c"])
    rm.applied_log(layout).parent.mkdir(parents=True, exist_ok=True)
    rm.applied_log(layout).write_text(json.dumps({"requests": [req.id], "uids": [UID["c"]], "faces": 1}) + "\n")
    apply(layout, images, faces, ids)
    assert UID["c"] not in rm.applied_log(layout).read_text()
    assert UID["c"] in rm.removed_uids(layout)
    assert UID["c"] not in set(pq.read_table(layout.partition_file("images", KEY)).column("uid").to_pylist())
    assert [e["kind"] for e in rm.card_entries(layout)] == ["image"]


def test_purge_deletes_earlier_runs_whose_event_log_names_a_removed_photo(tmp_path):
    """Runs of older code wrote uids (and thumbnails) into metadata; PURGE leaves none in the run storage."""
    import dagster as dg

    from assets.privacy import scrub_event_log

    layout, images, faces, ids = build_collection(tmp_path)

    @dg.asset
    def old_style_removals():
        return dg.MaterializeResult(metadata={"awaiting_review": dg.MetadataValue.json([{"uid": UID["a"], "face_index": 0}])})

    @dg.asset
    def unrelated():
        return dg.MaterializeResult(metadata={"uid_of_someone_else": UID["c"]})

    instance = dg.DagsterInstance.ephemeral()
    named = dg.materialize([old_style_removals], instance=instance).run_id
    other = dg.materialize([unrelated], instance=instance).run_id
    assert scrub_event_log(instance, layout, keep="") == 0  # nothing removed yet: nothing deleted
    photo_request(layout)
    apply(layout, images, faces, ids)
    assert scrub_event_log(instance, layout, keep="") == 1
    assert instance.get_run_by_id(named) is None and instance.get_run_by_id(other) is not None
    assert scrub_event_log(instance, layout, keep="") == 0  # idempotent


def test_a_user_request_changes_no_photo_dataset_version(tmp_path):
    """A social user's removal is applied by the social builder: the photo datasets' cards (and so their
    version ids) do not list it, the social card does."""
    layout, *_tables = build_collection(tmp_path)
    before = rm.card_entries(layout)
    rm.record_request(layout, "user", "someone-123")
    assert rm.card_entries(layout) == before
    assert [e["kind"] for e in rm.card_entries(layout, users=True)] == ["user"]
