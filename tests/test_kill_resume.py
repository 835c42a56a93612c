"""Runs killed with SIGKILL during ingestion, the face stage, clustering and shard writing, each resumed
by the next run: the end result equals an uninterrupted run's, and nothing partial is left."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT, Layout
from pipeline.datasets import latest_version

# (where to kill: a line the run prints as that stage starts, then seconds to wait into the stage)
KILL_POINTS = [
    ("ingestion", "- images - ", 0.0),  # inside the images step (a delay after the run started raced the faces step)
    ("faces", "- faces - ", 0.3),
    ("clustering", "- identities - clustering", 0.0),
    ("shard writing", "- multiid_dataset - multiid version", 0.2),
]


def _run(inp, home, kill_on=None, delay=0.0, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LINEUP_HOME": str(home), "LINEUP_INPUT": str(inp)}
    env.pop("LINEUP_SOCIAL", None)
    p = subprocess.Popen([sys.executable, "-m", "assets.run", "--no-training"], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    out, killed, t0 = [], False, time.time()
    for line in p.stdout:
        out.append(line)
        if kill_on and not killed and kill_on in line:
            time.sleep(delay)
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
        if time.time() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("run took too long:\n" + "".join(out[-30:]))
    p.wait()
    return p.returncode, killed, "".join(out)


def _tables(home):
    layout = Layout(home)
    out = {}
    for name, key in (("images", ["uid"]), ("faces", ["uid", "face_index"]), ("face_scan", ["uid"]),
                      ("face_expressions", ["uid", "face_index"])):
        files = sorted(layout.table_dir(name).glob("*.parquet"))
        t = pq.read_table(files[0]).sort_by([(k, "ascending") for k in key])
        out[name] = t.drop_columns([c for c in ("path",) if c in t.column_names]).to_pylist()
    for name in ("identities", "multiid_pairs", "expression_pairs", "scores"):
        t = pq.read_table(layout.table_file(name))
        out[name] = sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())
    for ds in ("multiid", "expression"):
        v = latest_version(layout, ds)
        out[f"{ds}_version"] = v
        out[f"{ds}_shards"] = sorted(
            (m.parent.name, s["name"], s["sha256"]) for m in (layout.datasets / ds / v).glob("**/manifest.json")
            for s in json.loads(m.read_text())["shards"])
    return out


def _leftovers(home):
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if p.name.endswith((".tmp", ".partial")) or p.name.startswith((".staging-",)))


@pytest.mark.timeout(1200)
def test_killed_runs_resume_to_the_same_result(tmp_path, shared_faces):
    inp = tmp_path / "input"
    inp.mkdir()
    for person in ("angelina_jolie", "elon_musk", "jennifer_aniston"):
        for p in sorted((shared_faces / "identities" / person).iterdir())[:2]:
            shutil.copy(p, inp / f"{person}_{p.name}")
    rc, _, log = _run(inp, tmp_path / "reference")
    assert rc == 0, log[-3000:]
    want = _tables(tmp_path / "reference")
    assert want["multiid_pairs"], "the reference run built pairs"

    home = tmp_path / "killed"
    hit = []
    for stage, marker, delay in KILL_POINTS:
        rc, killed, log = _run(inp, home, marker, delay)
        assert killed, f"the run never reached {stage}:\n{log[-2000:]}"
        assert rc == -signal.SIGKILL
        hit.append(stage)
    rc, _, log = _run(inp, home)
    assert rc == 0, log[-3000:]
    assert hit == [s for s, _, _ in KILL_POINTS]
    got = _tables(home)
    for key in want:
        assert got[key] == want[key], key
    assert _leftovers(home) == []


# SIGKILL at the exact gap between two writes of one stage's unit: before a path containing the marker
# is installed or written (pipeline/commits.py), so the kill lands between a stage's files.
KILL_BEFORE = textwrap.dedent("""
    import os, signal, sys
    import pipeline.commits as c
    where = sys.argv[1]
    def guard(real):
        def f(data_or_src, dest):
            if where in str(dest):
                print(f"killed before {dest}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(data_or_src, dest)
        return f
    c._install = guard(c._install)
    c.write_bytes_atomic = guard(c.write_bytes_atomic)
    from assets.run import main
    sys.exit(main(["--no-training"]))
""")

GAPS = [
    ("images written, rejects_ingest not", "/rejects_ingest/"),
    ("faces written, face_scan not", "/face_scan/"),
    ("every face file written, no marker", "/_commits/faces/"),
    ("face_expressions written, no marker", "/_commits/face_expressions/"),
]


@pytest.mark.timeout(1200)
def test_a_kill_between_a_stages_files_is_redone(tmp_path, shared_faces):
    """Before, a kill after the faces file left face_scan/face_expressions missing or old for good: the
    runner only looked for the faces file. Now the unit has no marker and the next run redoes it."""
    inp = tmp_path / "input"
    inp.mkdir()
    for person in ("angelina_jolie", "elon_musk"):
        for p in sorted((shared_faces / "identities" / person).iterdir())[:2]:
            shutil.copy(p, inp / f"{person}_{p.name}")
    rc, _, log = _run(inp, tmp_path / "reference")
    assert rc == 0, log[-3000:]
    want = _tables(tmp_path / "reference")
    home = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LINEUP_HOME": str(home), "LINEUP_INPUT": str(inp)}
    env.pop("LINEUP_SOCIAL", None)
    for gap, where in GAPS:
        p = subprocess.run([sys.executable, "-c", KILL_BEFORE, where], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=600, check=False)
        assert p.returncode == -signal.SIGKILL and "killed before" in p.stdout, f"{gap}: {p.stdout[-2000:]}"
    rc, _, log = _run(inp, home)
    assert rc == 0, log[-3000:]
    assert "partition " in log and "(face_expressions missing)" in log, log[-3000:]
    got = _tables(home)
    for key in want:
        assert got[key] == want[key], key
    assert _leftovers(home) == []
