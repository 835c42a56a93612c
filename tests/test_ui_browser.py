"""The Dagster UI of a home built by `python -m assets.run`, driven in a real browser (headless Chromium
through Playwright): the graph shows every asset, the Overview timeline lists the run, a faces
materialization shows its pictures and row count, a dataset version links to its viewer page, and
social_dataset launched from the UI succeeds with the settings that the run saved.

Needs the `playwright` package and the Debian `chromium` package (.ci/run installs it); screenshots
go to tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
PEOPLE = ("angelina_jolie", "bbt_penny", "elon_musk")
ASSETS = ("images", "faces", "face_expressions", "removals", "identities", "multiid_dataset", "expression_dataset",
          "scores", "social_dataset", "dpo_lora", "identity_adapter", "social_reward_model")

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINEUP_", "DAGSTER_"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def ui(tmp_path_factory, shared_faces):
    """A home built from a few real photos and a simulated log, then `make ui` on it (no LINEUP_INPUT
    in its environment: it must come from the run's saved settings)."""
    from pipeline.social.simulate import SimConfig, simulate

    root = tmp_path_factory.mktemp("ui")
    inp, home = root / "input", root / "home"
    for person in PEOPLE:
        (inp / "people" / person).mkdir(parents=True)
        for p in sorted((shared_faces / "identities" / person).iterdir())[:3]:
            shutil.copy(p, inp / "people" / person / p.name)
    (inp / "groups").mkdir()
    shutil.copy(shared_faces / "groups" / "deepface__couple.jpg", inp / "groups")
    simulate(root / "social", truth_dir=root / "truth", config=SimConfig(n_events=40_000, inject_bad=1))
    run = subprocess.run([sys.executable, "-m", "assets.run", "--no-training"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600, check=False, env=_env(
                             LINEUP_HOME=str(home), LINEUP_INPUT=str(inp), LINEUP_SOCIAL=str(root / "social")))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with open(root / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "assets.serve", "--home", str(home)], cwd=REPO_ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, env=_env(LINEUP_UI_PORT=str(port)))
        try:
            for _ in range(180):
                try:
                    urllib.request.urlopen(base + "/server_info", timeout=2)
                    break
                except OSError:
                    assert server.poll() is None, (root / "serve.log").read_text()[-3000:]
                    time.sleep(1)
            else:
                raise AssertionError("the UI did not start: " + (root / "serve.log").read_text()[-3000:])
            yield base, home, root
        finally:
            server.terminate()
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture(scope="module")
def page(ui):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def _dismiss_dialog(page):
    skip = page.get_by_role("button", name="Skip")  # the first visit's newsletter dialog
    if skip.count() and skip.first.is_visible():
        skip.first.click()


def _open(page, url: str, shot: str):
    page.goto(url)
    page.wait_for_load_state("networkidle")
    _dismiss_dialog(page)
    return page


def test_the_graph_shows_every_asset(ui, page):
    base, _, _ = ui
    _open(page, base + "/asset-groups", "graph")
    page.get_by_text("Materialize all").wait_for(timeout=180_000)  # the code location has loaded
    # Dagster opens the lineage with its groups folded: unfold them in the page's asset tree (bottom
    # up: unfolding one moves those below it), which lists the graph's assets by group
    members = {"ingest": "images", "identity": "identities", "datasets": "scores", "training": "dpo_lora"}
    for _ in range(10):
        page.wait_for_timeout(1000)
        _dismiss_dialog(page)  # it can come late, over the page
        folded = [g for g, a in members.items() if not page.locator(f"[title='{a}']").count()]
        if not folded:
            break
        boxes = sorted(((page.locator(f"[title='{g}']").first.bounding_box(), g) for g in folded), key=lambda bg: -bg[0]["y"])
        for box, _ in boxes:
            page.mouse.click(box["x"] - 40, box["y"] + box["height"] / 2)  # the row's fold arrow
            page.wait_for_timeout(300)
    for name in ASSETS:
        page.locator(f"[title='{name}']").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "graph.png"))
    shown = {name for name in ASSETS if page.locator(f"[title='{name}']").count()}
    assert shown == set(ASSETS)


def test_the_overview_timeline_lists_the_runs(ui, page):
    base, _, _ = ui
    _open(page, base + "/overview/activity/timeline", "overview")
    for job in ("ingest_job", "collection_job", "social_job"):
        page.get_by_role("link", name=job).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "overview.png"))
    assert "No runs" not in page.inner_text("body")


def test_a_faces_materialization_shows_pictures_and_row_count(ui, page):
    base, home, _ = ui
    _open(page, base + "/assets/faces?view=events", "faces")
    page.get_by_text("dagster/row_count").wait_for()
    links = [a.get_attribute("href") for a in page.locator("a[href*='/lineup/pictures/faces/']").all()]
    assert any(h.endswith("/face_sizes.png") for h in links) and any(h.endswith("/contact_sheet.png") for h in links)
    page.screenshot(path=str(ARTIFACTS / "faces.png"), full_page=True)
    # the link is served, and it is the PNG written under the home
    link = next(h for h in links if h.endswith("/contact_sheet.png"))
    got = page.request.get(base + link)
    assert got.ok and got.headers["content-type"] == "image/png"
    assert got.body() == (home / "pictures" / link.removeprefix("/lineup/pictures/")).read_bytes()
    rows = page.locator("tr", has_text="dagster/row_count").first.inner_text()
    faces_rows = sum(1 for _ in _faces_rows(home))
    assert str(faces_rows) in rows and faces_rows > 0


def _faces_rows(home: Path):
    import pyarrow.parquet as pq

    for f in sorted((home / "tables" / "faces").glob("*.parquet")):
        yield from range(pq.read_metadata(f).num_rows)


def test_a_dataset_version_links_to_its_viewer_page(ui, page):
    base, home, _ = ui
    _open(page, base + "/assets/multiid_dataset", "multiid")
    link = page.locator("a[href*='/lineup/datasets/multiid/']").first
    link.wait_for()
    href = link.get_attribute("href")
    version = (home / "datasets" / "multiid" / "LATEST").read_text().strip()
    assert href == f"/lineup/datasets/multiid/{version}/viewer.html"
    _open(page, base + href, "viewer")
    page.get_by_role("heading", name="Samples").wait_for()
    images = page.locator("img.sample-image")
    assert images.count() > 0 and page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))


def test_social_dataset_launched_from_the_ui_succeeds(ui, page):
    import dagster as dg

    base, home, _ = ui
    _open(page, base + "/assets/social_dataset", "social")
    materialize = page.locator("button").filter(has_text=re.compile(r"^\s*Materialize\s*$")).first
    materialize.wait_for(timeout=120_000)
    _dismiss_dialog(page)
    materialize.click()
    from dagster._core.instance import InstanceRef

    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home / "dagster")))
    deadline = time.time() + 300
    run = None
    while time.time() < deadline:
        runs = [r for r in instance.get_runs(limit=5) if r.asset_selection and dg.AssetKey("social_dataset") in r.asset_selection
                and r.remote_job_origin is not None and r.job_name == "__ASSET_JOB"]
        run = runs[0] if runs else None
        if run is not None and run.is_finished:
            break
        time.sleep(2)
    assert run is not None, "no run was launched"
    page.goto(f"{base}/runs/{run.run_id}")
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(ARTIFACTS / "social_run.png"))
    assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
    skipped = [k for k in run.tags if k.startswith("lineup/skipped/")]
    assert not skipped, run.tags  # it built: the saved settings gave it the interaction log
