"""The UI's plumbing without a browser: saved run settings, the run origin, pictures as files, Dagster
table metadata, dataset viewer pages, the person-folder rule of the identity check."""

from __future__ import annotations

import io
import json
import tarfile

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image


def test_run_settings_round_trip_and_the_shell_wins(tmp_path):
    from pipeline.run_settings import apply_run_settings, load_run_settings, save_run_settings, settings_file

    env = {"LINEUP_INPUT": "/in", "LINEUP_SMOKE_TRAINING": "1", "LINEUP_HOME": str(tmp_path), "LINEUP_PURGE": "1",
           "LINEUP_UI_PORT": "4000", "PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "x"}
    save_run_settings(tmp_path, env)
    saved = json.loads(settings_file(tmp_path).read_text())
    # only the run's LINEUP_* settings: not its home, a one-off purge, the UI port, or anything else
    assert saved == {"LINEUP_INPUT": "/in", "LINEUP_SMOKE_TRAINING": "1"}
    target = {"LINEUP_INPUT": "/from-shell"}
    applied = apply_run_settings(tmp_path, target)
    assert applied == {"LINEUP_SMOKE_TRAINING": "1"} and target["LINEUP_INPUT"] == "/from-shell"
    assert load_run_settings(tmp_path / "nowhere") == {}
    settings_file(tmp_path).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run_settings(tmp_path)


def test_missing_input_is_a_skip_with_its_reason(tmp_path, monkeypatch):
    from assets.ingest import new_inputs_sensor
    from assets.resources import LineupSettings
    from assets.social import social_dataset

    monkeypatch.delenv("LINEUP_INPUT", raising=False)
    monkeypatch.delenv("LINEUP_SOCIAL", raising=False)
    settings = LineupSettings(home=str(tmp_path / "home"))
    instance = dg.DagsterInstance.ephemeral()
    with dg.build_sensor_context(instance=instance, resources={"lineup": settings}) as ctx:
        out = new_inputs_sensor(ctx)
    assert isinstance(out, dg.SkipReason) and "LINEUP_INPUT" in out.skip_message
    result = dg.materialize([social_dataset], instance=instance, resources={"lineup": settings})
    assert result.success
    (obs,) = [e.event_specific_data.asset_observation for e in result.get_asset_observation_events()]
    assert "no interaction log configured" in obs.metadata["skipped_because"].value
    # the run itself says why, not only its Events tab
    tags = instance.get_run_by_id(result.run_id).tags
    assert "no interaction log" in tags["lineup/skipped/social_dataset"]


def test_an_in_process_run_gets_the_workspace_origin(tmp_path):
    from assets.run import give_workspace_origin

    @dg.asset
    def one():
        return 1

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([one], instance=instance)
    assert instance.get_run_by_id(result.run_id).remote_job_origin is None  # what the timeline left out
    give_workspace_origin(instance, result.run_id, "__ASSET_JOB")
    run = instance.get_run_by_id(result.run_id)
    origin = run.remote_job_origin
    assert origin.location_name == "lineup" and origin.repository_origin.repository_name == "__repository__"
    assert run.tags[".dagster/repository"] == "__repository__@lineup"
    assert origin.job_name == "__ASSET_JOB"


def _png(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_pictures_are_files_linked_from_metadata_never_inline(tmp_path):
    from assets.ui import PICTURE_KEY, UI_PREFIX, pictures
    from pipeline.pictures import purge_pictures

    meta = pictures(tmp_path, "faces/p0001", {"face_sizes": _png(), "contact_sheet": _png()}, shows_uids=["u1", "u2"])
    assert set(meta) == {PICTURE_KEY.format("face_sizes"), PICTURE_KEY.format("contact_sheet")}
    for value in meta.values():
        assert isinstance(value, dg.UrlMetadataValue) and value.url.startswith(f"{UI_PREFIX}/pictures/faces/p0001/")
        assert "base64" not in value.url
        served = tmp_path / "pictures" / value.url.removeprefix(f"{UI_PREFIX}/pictures/")
        assert served.read_bytes() == _png()  # the link names the file that was written
    assert len(purge_pictures(tmp_path, ["u2"])) == 2  # a removal finds them by the uids they show


def test_table_metadata_uses_dagster_types():
    from assets.ui import table_metadata, table_preview

    t = pa.table({"uid": ["a", "b", "c"], "score": pa.array([0.1, 0.2, None], pa.float32()),
                  "embedding": pa.array([[0.0, 1.0]] * 3, pa.list_(pa.float32(), 2))})
    meta = table_metadata(t, "/x/faces.parquet")
    assert meta["dagster/row_count"].value == 3
    cols = meta["dagster/column_schema"].schema.columns
    assert [(c.name, c.type) for c in cols] == [("uid", "string"), ("score", "float"),
                                                 ("embedding", "fixed_size_list<item: float>[2]")]
    prev = table_preview([{"source": "a.jpg", "reason": "bad"}, {"source": "b.jpg", "reason": "x" * 200}])
    assert isinstance(prev, dg.TableMetadataValue) and len(prev.records) == 2
    assert len(prev.records[1].data["reason"]) == 80
    assert table_preview([]).records == []  # empty is shown as empty, not as an error


def _tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_viewer_page_shows_card_filters_samples_and_histograms(tmp_path):
    from pipeline.viewer import VIEWER_PAGE, read_samples, write_viewer

    folder = tmp_path / "social" / "v-1"
    (folder / "webdataset" / "train").mkdir(parents=True)
    card = ("---\nlicense: other\n---\n# social\n\n## Filters\n\n| filter | removed |\n|---|---:|\n| tie | 7 |\n\n"
            "## Known limitations\n\n<script>alert(1)</script> captions are user text\n")
    (folder / "README.md").write_text(card)
    pair = lambda i, won: (f"k{i}", {"0.jpg": _jpeg(), "1.jpg": _jpeg(),
                                     "json": json.dumps({"label_0": 1 - won, "label_1": won, "caption": f"cat {i}",
                                                         "evidence": {"prob": 0.97}}).encode()})
    _tar(folder / "webdataset" / "train" / "social-000000.tar", [pair(0, 1), pair(1, 0), pair(2, 1)])
    pq.write_table(pa.table({"prob": [0.9, 0.95, 0.99], "empty": pa.array([None] * 3, pa.float64())}),
                   folder / "social_pairs.parquet")
    page = write_viewer(folder, "social v-1", n_samples=2)
    assert page == folder / VIEWER_PAGE
    text = page.read_text()
    assert "<h1>social v-1</h1>" in text and "<td>tie</td>" in text  # filters with counts, as a table
    assert text.count("class=sample-image") == 4  # 2 samples of 2 images each, inlined
    assert "winner</dt><dd>image 1" in text and "posterior</dt><dd>0.970" in text and "cat 0" in text
    assert "alt='prob'" in text and "alt='empty'" not in text  # a histogram per column with values
    assert "<script>" not in text  # card text is escaped, never markup
    assert "license: other" not in text  # the card's YAML header is not shown as text
    assert len(read_samples(folder, 10)) == 3


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_release_writes_the_viewer_before_publishing(tmp_path):
    from pipeline.config import Layout
    from pipeline.datasets import release

    layout = Layout(tmp_path)

    def build(folder):
        _tar(folder / "d-000000.tar", [("k0", {"a.jpg": _jpeg(), "json": b'{"expression": "happy"}'})])

    rel = release(layout, "expression", "v-1", build, lambda folder, res: {}, lambda folder, res: _card())
    assert rel.published
    text = (rel.folder / "viewer.html").read_text()
    assert "happy" in text and text.count("class=sample-image") == 1


def _card():
    class Card:
        def write(self, folder):
            (folder / "README.md").write_text("# expression\n\n## Filters\n\nnone\n")

    return Card()


def test_person_folders_need_siblings():
    from pipeline.identity.report import folder_labels

    def tables(sources, faces_per_image):
        uids = [f"u{i}" for i in range(len(sources))]
        images = pa.table({"uid": uids, "source": sources})
        fu, fi = [], []
        for u, n in zip(uids, faces_per_image):
            fu += [u] * n
            fi += list(range(n))
        return pa.table({"uid": fu, "face_index": fi}), images

    # the demo: one folder holding two people, next to a group photo: no labels
    f, i = tables(["portraits/obama.jpg", "portraits/biden.jpg", "portraits/obama2.jpg", "group.jpg"], [1, 1, 1, 3])
    assert folder_labels(f, i) == {}
    # people/<name>/photo.jpg: labels, single-face photos only
    f, i = tables(["people/ann/1.jpg", "people/ann/2.jpg", "people/bob/1.jpg", "people/bob/team.jpg"], [1, 1, 1, 2])
    assert folder_labels(f, i) == {("u0", 0): "ann", ("u1", 0): "ann", ("u2", 0): "bob"}


def test_removal_requests_sensor_starts_one_run_per_new_set(tmp_path):
    from assets.resources import LineupSettings
    from assets.sensors import removal_requests_sensor
    from pipeline.config import Layout
    from pipeline.removals import record_request

    settings = LineupSettings(home=str(tmp_path))
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"lineup": settings}) as ctx:
            return removal_requests_sensor(ctx)

    assert isinstance(tick(None), dg.SkipReason)  # no request folder yet
    first = record_request(Layout(tmp_path), "user", "u0000311", user_hash="h")
    out = tick(None)
    (req,) = out.run_requests
    assert first.id in req.tags["lineup/removal_requests"]
    assert isinstance(tick(out.cursor), dg.SkipReason)  # the same request is not asked for twice
    second = record_request(Layout(tmp_path), "image", "x.jpg", source="x.jpg")
    again = tick(out.cursor)
    (req2,) = again.run_requests
    assert req2.tags["lineup/removal_requests"] == second.id and req2.run_key != req.run_key
    assert tick(None).run_requests[0].run_key != req2.run_key  # a lost cursor asks for both, under a new key


def test_index_page_lists_published_viewer_pages_only(tmp_path):
    from pipeline.viewer import index_page

    for folder in ("multiid/v-1", "multiid/.unpublished-v-2", "social/v-3"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "viewer.html").write_text("x")
    (tmp_path / "expression" / "v-4").mkdir(parents=True)  # published before viewer pages existed
    page = index_page(tmp_path)
    assert 'href="datasets/multiid/v-1/viewer.html"' in page and 'href="datasets/social/v-3/viewer.html"' in page
    assert "unpublished" not in page and "v-4" not in page
    assert "No published dataset version yet" in index_page(tmp_path / "nothing")
