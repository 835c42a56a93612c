"""Partitions materialized concurrently, in reverse order, while a reader holds the catalog open."""

import os
import shutil
import subprocess
import sys
import textwrap

import duckdb

from pipeline.catalog import query, refresh_catalog
from pipeline.collection import load_collection
from pipeline.config import REPO_ROOT, Layout
from pipeline.sources import register_new_inputs

RUN_ONE = textwrap.dedent("""
    import sys
    import dagster as dg
    from assets.faces import faces
    from assets.ingest import images
    from assets.partitions import input_partitions
    from assets.resources import LineupSettings

    home, inp, key = sys.argv[1:4]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(input_partitions.name, [key])
    r = dg.materialize([images, faces], partition_key=key, instance=instance,
                       resources={"lineup": LineupSettings(home=home, input_dir=inp)})
    sys.exit(0 if r.success else 1)
""")


def test_concurrent_out_of_order_partitions(tmp_path, shared_faces):
    layout = Layout(tmp_path / "home")
    inp = tmp_path / "input"
    people = sorted((shared_faces / "identities").iterdir())[:3]
    photos = [min(p.iterdir()) for p in people]
    keys = []
    for batch in range(3):  # every batch holds two distinct photos and one photo of the batch before
        d = inp / f"batch{batch}"
        d.mkdir(parents=True)
        shutil.copy(photos[batch], d / f"own_{photos[batch].name}")
        shutil.copy(photos[(batch + 1) % 3], d / f"shared_{photos[(batch + 1) % 3].name}")
        keys += [s.key for s in register_new_inputs(inp, layout.partitions, batch_size=100)]
    assert len(keys) == 3
    layout.home.mkdir(parents=True, exist_ok=True)
    duckdb.connect(str(layout.catalog)).close()
    reader = duckdb.connect(str(layout.catalog), read_only=True)  # a notebook left open
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        procs = [subprocess.Popen([sys.executable, "-c", RUN_ONE, str(layout.home), str(inp), k], cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for k in reversed(keys)]
        outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    finally:
        reader.close()
    coll = load_collection(layout)
    uids = coll.images.column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 3  # three distinct photos, each once
    face_keys = list(zip(coll.faces.column("uid").to_pylist(), coll.faces.column("face_index").to_pylist()))
    assert len(face_keys) == len(set(face_keys)) >= 3
    refresh_catalog(layout)
    assert query(layout, "SELECT count(*) AS n, count(DISTINCT uid) AS d FROM images").to_pylist() == [{"n": 3, "d": 3}]
    dup = query(layout, "SELECT count(*) AS n FROM rejects WHERE reason = 'duplicate image'").column("n")[0].as_py()
    assert dup == 3  # the shared copies, whichever partition finished first
    n_faces = query(layout, "SELECT count(*) AS n FROM faces").column("n")[0].as_py()
    assert n_faces == len(face_keys)
