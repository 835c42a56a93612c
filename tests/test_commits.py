"""Publishing and partition commits: LATEST only moves forward, staging is judged by a lease (host, pid,
heartbeat), the catalog shows the published version, and a partition unit is visible only once whole
and checked."""

import json
import os
import socket
import time

import pyarrow as pa

from pipeline.commits import FAILED, MISSING, PASSED, STALE, commit_unit, marker_path, unit_state
from pipeline.config import Layout
from pipeline.datasets import (
    begin_build,
    clean_stale_staging,
    latest_version,
    release,
    set_latest,
    sync_catalog_table,
)
from pipeline.storage import read_parquet, write_parquet_atomic


def _writer(rows):
    def build(folder):
        write_parquet_atomic(pa.table({"x": rows}), folder / "pairs.parquet")
        return rows

    return build


def _ok(folder, result):
    return {"c": []}


def test_latest_never_moves_back_to_an_older_build(tmp_path):
    layout = Layout(tmp_path / "home")
    older = begin_build(layout, "toy")  # started first ...
    newer = begin_build(layout, "toy")
    assert newer > older
    for v in ("v-old", "v-new"):
        (layout.datasets / "toy" / v).mkdir(parents=True)
    assert set_latest(layout, "toy", "v-new", newer)
    # ... finished last: it may not take LATEST back to its (older) content
    assert not set_latest(layout, "toy", "v-old", older)
    assert latest_version(layout, "toy") == "v-new"


def test_out_of_order_releases_leave_latest_on_the_newer_build(tmp_path, monkeypatch):
    """Two releases that finish out of order: the one that started later keeps LATEST."""
    import pipeline.datasets as ds

    layout = Layout(tmp_path / "home")
    inner = {}

    def slow_build(folder):  # the first build is overtaken by a whole second release while it runs
        inner["rel"] = release(layout, "toy", "v-2", _writer([2]), _ok)
        return _writer([1])(folder)

    first = release(layout, "toy", "v-1", slow_build, _ok)
    assert inner["rel"].published and inner["rel"].latest
    assert first.published and not first.latest
    assert latest_version(layout, "toy") == "v-2"
    assert ds.latest_record(layout, "toy")["version"] == "v-2"


def test_catalog_table_shows_the_published_version_not_a_failed_one(tmp_path):
    layout = Layout(tmp_path / "home")
    release(layout, "toy", "v-1", _writer([1, 2]), _ok)
    assert sync_catalog_table(layout, "toy", "pairs.parquet", "toy_pairs")
    bad = release(layout, "toy", "v-2", _writer([9]), lambda f, r: {"c": ["broken"]})
    assert not bad.published
    sync_catalog_table(layout, "toy", "pairs.parquet", "toy_pairs")
    assert read_parquet(layout.table_file("toy_pairs")).column("x").to_pylist() == [1, 2]


def test_staging_of_a_live_build_on_another_host_is_kept(tmp_path):
    layout = Layout(tmp_path / "home")
    root = layout.datasets / "toy"
    root.mkdir(parents=True)
    # another machine's build: its pid means nothing here (999999999 is not alive on this host)
    live = {"host": "elsewhere-" + socket.gethostname(), "pid": 999999999, "token": "aaaa", "heartbeat": time.time()}
    dead = dict(live, token="bbbb", heartbeat=time.time() - 3600)  # stopped beating an hour ago
    for lease in (live, dead):
        (root / f".staging-v-9-{lease['token']}").mkdir()
        (root / f".lease-{lease['token']}.json").write_text(json.dumps(lease))
    removed = clean_stale_staging(layout, "toy")
    assert removed == [".staging-v-9-bbbb"]
    assert (root / ".staging-v-9-aaaa").is_dir()


def test_a_unit_is_visible_only_when_whole_and_checked(tmp_path):
    layout = Layout(tmp_path / "home")
    t = pa.table({"uid": ["a", "b"]})
    ok = commit_unit(layout, "faces", "k1", {"faces": t, "face_scan": t}, {"rows": lambda p: (True, "fine")}, {"in": 1})
    assert ok.passed and unit_state(layout, "faces", "k1", {"in": 1}) == PASSED
    assert unit_state(layout, "faces", "k1", {"in": 2}) == STALE
    assert layout.partition_file("face_scan", "k1").exists()
    # a failing check: the marker says failed, the partition's files leave the tables, staging keeps them
    bad = commit_unit(layout, "faces", "k1", {"faces": t, "face_scan": t}, {"rows": lambda p: (False, "lost a row")})
    assert not bad.passed and unit_state(layout, "faces", "k1") == FAILED
    assert not layout.partition_file("faces", "k1").exists() and (bad.staging / "faces.parquet").exists()
    assert json.loads(marker_path(layout, "faces", "k1").read_text())["checks"]["rows"]["detail"] == "lost a row"
    # a check that raises fails rather than crashing the stage
    boom = commit_unit(layout, "faces", "k2", {"faces": t}, {"read": lambda p: 1 / 0})
    assert not boom.passed and "ZeroDivisionError" in boom.reasons[0]


def test_a_kill_between_two_files_leaves_no_marker(tmp_path, monkeypatch):
    from pipeline import commits

    layout = Layout(tmp_path / "home")
    t = pa.table({"uid": ["a"]})
    commit_unit(layout, "faces", "k", {"faces": t, "face_scan": t})
    real = commits._install
    calls = []

    def dies_after_first(src, dest):
        if calls:
            raise KeyboardInterrupt("killed between two files")
        calls.append(dest)
        real(src, dest)

    monkeypatch.setattr(commits, "_install", dies_after_first)
    try:
        commit_unit(layout, "faces", "k", {"faces": pa.table({"uid": ["a", "b"]}), "face_scan": t})
    except KeyboardInterrupt:
        pass
    assert unit_state(layout, "faces", "k") == MISSING  # not trusted: the runner redoes it
    assert os.path.exists(layout.partition_file("faces", "k"))


def test_a_social_version_that_fails_its_checks_leaves_the_catalog_on_latest(tmp_path, monkeypatch):
    """Before, the asset copied the failed version's tables into the catalog while LATEST stayed put."""
    import shutil

    import dagster as dg

    import pipeline.social.checks as social_checks
    from assets.resources import LineupSettings
    from assets.social import social_dataset
    from pipeline.catalog import query
    from pipeline.social.simulate import SimConfig, simulate

    log = tmp_path / "input" / "social"
    settings = LineupSettings(home=str(tmp_path / "home"), input_dir=str(tmp_path / "input"))
    layout = Layout(tmp_path / "home")
    instance = dg.DagsterInstance.ephemeral()
    simulate(log, config=SimConfig(n_events=60_000))  # enough events for population pairs under the calibrated test
    assert dg.materialize([social_dataset], instance=instance, resources={"lineup": settings}).success
    first = latest_version(layout, "social")
    before = query(layout, "SELECT pair_id FROM social_pairs ORDER BY pair_id").column("pair_id").to_pylist()
    assert before
    shutil.rmtree(log)
    simulate(log, config=SimConfig(n_events=60_000, seed=1))  # another log: another version, other pairs
    monkeypatch.setattr(social_checks, "no_self_pairs",
                        lambda folder: social_checks.CheckOutcome(False, {"forced": "by the test"}))
    r = dg.materialize([social_dataset], instance=instance, resources={"lineup": settings}, raise_on_error=False)
    assert not r.success and latest_version(layout, "social") == first
    after = query(layout, "SELECT pair_id FROM social_pairs ORDER BY pair_id").column("pair_id").to_pylist()
    assert after == before
