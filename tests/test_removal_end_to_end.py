"""`make forget`, then `make run` killed in the middle of applying the removal, `make run` again, then
`make run PURGE=1`: no trace of the person anywhere under the home: tables, datasets, superseded
versions, caches, pictures, the catalog and the Dagster run storage. A photo of the person that
arrives after the request is removed too. Runs the real commands as subprocesses (~2 min)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from pipeline.ids import content_uid

REPO = Path(__file__).resolve().parent.parent
PEOPLE = ("angelina_jolie", "elon_musk", "george_clooney", "jennifer_aniston")
GONE = "george_clooney"
NAME = "kit_with_rose"  # file names often name the person


def _run(home, *args, env=None, timeout=400):
    e = {**os.environ, "LINEUP_HOME": str(home), **(env or {})}
    e.pop("LINEUP_PURGE", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout, check=False)


def _traces(home: Path, needles: list[str]) -> dict[str, list[str]]:
    """needle -> files under the home whose bytes, or whose path, contain it (sqlite files included; a store
    that names its entries by photo uid, like the guard's keypoints, counts by name)."""
    found: dict[str, list[str]] = {}
    for p in home.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data, rel = p.read_bytes(), str(p.relative_to(home))
            for n in needles:
                if n.encode() in data or n in rel:
                    found.setdefault(n, []).append(rel)
    return found


@pytest.mark.parametrize("kill_at", ["sweep:face_scan"])
def test_forget_kill_rerun_purge_leaves_no_trace(tmp_path, shared_faces, kill_at):
    inp, home = tmp_path / "input", tmp_path / "home"
    inp.mkdir()
    gone_uids, later = set(), None
    for person in PEOPLE:
        photos = sorted((shared_faces / "identities" / person).iterdir())
        for i, p in enumerate(photos[:3]):
            name = f"{NAME}.jpg" if (person == GONE and i == 0) else f"{person[:3]}{i}.jpg"
            shutil.copy(p, inp / name)
            if person == GONE:
                gone_uids.add(content_uid(p.read_bytes()))
        if person == GONE:
            later = photos[3]
    r = _run(home, "assets.run", "--input", str(inp), "--no-training")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the guard's keypoint store holds the person's faces (named by photo uid): the purge must reach it too
    assert [p for p in (home / "cache" / "multiid_guard.features").iterdir() if p.name.split(".")[0] in gone_uids]

    # the request: a mirrored crop of one of the person's photos, never ingested
    with Image.open(shared_faces / "identities" / GONE / "img38.jpg") as im:
        im = ImageOps.mirror(im.convert("RGB"))
        w, h = im.size
        im.crop((int(0.05 * w), int(0.05 * h), int(0.95 * w), int(0.95 * h))).save(tmp_path / "request.jpg", quality=90)
    r = _run(home, "assets.forget", "--photo", str(tmp_path / "request.jpg"))
    assert r.returncode == 0, r.stderr
    # a photo of the person arrives after the request
    shutil.copy(later, inp / "gc_later.jpg")
    gone_uids.add(content_uid(later.read_bytes()))

    killed = _run(home, "assets.run", "--input", str(inp), "--no-training", env={"LINEUP_REMOVALS_KILL_AT": kill_at})
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert _traces(home / "tables", sorted(gone_uids)), "the kill left the removal half-applied"
    r = _run(home, "assets.run", "--input", str(inp), "--no-training")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run(home, "assets.run", "--input", str(inp), "--no-training", env={"LINEUP_PURGE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    needles = sorted(gone_uids) + [NAME]
    found = _traces(home, needles)
    # the registry of input partitions lists the input's file names as they are on disk (not lineup's to rewrite)
    found = {n: [f for f in fs if not f.startswith("partitions/")] for n, fs in found.items()}
    assert {n: fs for n, fs in found.items() if fs} == {}
    # and the others are still there
    others = {content_uid(p.read_bytes()) for p in inp.iterdir() if p.name.startswith(("ang", "elo"))}
    assert _traces(home / "tables", sorted(others))
