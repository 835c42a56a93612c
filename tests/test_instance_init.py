"""Issue 21: two `make run` starting at the same instant on a new home both created the instance's SQLite
tables and one died with `table run_tags already exists`. assets.instance initialises the instance
under a file lock; both processes must come up and share one instance."""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# import everything first, then wait for the same wall-clock instant, so both create the instance together
PROBE = r"""
import sys, time
import dagster as dg
from assets.instance import ensure_dagster_home
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
ensure_dagster_home()
with dg.DagsterInstance.get() as instance:
    print("runs", len(instance.get_runs()))
"""


def test_two_processes_initialise_one_new_home(tmp_path):
    pairs = 3  # the race is timing-dependent: several fresh homes, every pair must come up
    env_base = {**os.environ, "DAGSTER_TELEMETRY_DISABLED": "1"}
    env_base.pop("DAGSTER_HOME", None)
    for i in range(pairs):
        home = tmp_path / f"home{i}"
        env = {**env_base, "LINEUP_HOME": str(home)}
        start = time.time() + 12
        procs = [subprocess.Popen([sys.executable, "-c", PROBE, str(start)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
            assert out.strip().endswith("runs 0")
        assert (home / "dagster" / "dagster.yaml").exists()
