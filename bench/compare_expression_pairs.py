"""Identity check for the expression-pair builder: build pairs on bench collections (and perturbed slices of
them: unknown identities, missing pose, missing descriptors, tied similarities, other configs) and save or
compare the tables.

    PYTHONPATH=. .venv/bin/python bench/compare_expression_pairs.py save /tmp/exprmem/base /tmp/collbench/n100000
    PYTHONPATH=. .venv/bin/python bench/compare_expression_pairs.py compare /tmp/exprmem/base /tmp/collbench/n100000
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def cases(data: Path):
    from pipeline.expression.pairs import PairConfig
    from pipeline.identity.build import with_identity_ids

    faces = with_identity_ids(pq.read_table(data / "faces.parquet"), pq.read_table(data / "identities.parquet"))
    desc = pq.read_table(data / "descriptors.parquet")
    base = PairConfig(max_identity_cos=0.9)
    yield "full", faces, desc, base
    rng = np.random.default_rng(7)
    n = min(30000, faces.num_rows)
    f, d = faces.slice(0, n), desc.slice(0, n)
    ident = f["identity_id"].to_pylist()
    ident = [None if rng.random() < 0.2 else v for v in ident]
    yaw = f["yaw"].to_numpy(zero_copy_only=False).copy()
    yaw_l = [None if rng.random() < 0.1 else float(v) for v in yaw]
    f = f.set_column(f.column_names.index("identity_id"), "identity_id", pa.array(ident, f["identity_id"].type))
    f = f.set_column(f.column_names.index("yaw"), "yaw", pa.array(yaw_l, pa.float32()))
    keep = rng.random(n) > 0.05
    d2 = d.filter(pa.array(keep))
    yield "perturbed", f, d2, replace(base, neighbours=16, max_pairs_per_face=2)
    # ties: descriptors rounded hard, so many pairs share a similarity; same image allowed; three classes
    probs = d["probs"].combine_chunks()
    pv = np.round(probs.flatten().to_numpy().reshape(-1, 7), 1).astype(np.float32)
    geo = d["geometry"].combine_chunks()
    gd = geo.type.list_size
    gv = np.round(geo.flatten().to_numpy().reshape(-1, gd), 1).astype(np.float32)
    gv[rng.random(n) < 0.1] = np.nan
    d3 = d.set_column(d.column_names.index("probs"), "probs", pa.FixedSizeListArray.from_arrays(pa.array(pv.reshape(-1)), 7))
    d3 = d3.set_column(d3.column_names.index("geometry"), "geometry", pa.FixedSizeListArray.from_arrays(pa.array(gv.reshape(-1)), gd))
    yield "ties", f, d3.cast(d.schema), replace(base, allow_same_image=True, classes=("happy", "neutral", "sad"),
                                                 neighbours=100, max_yaw_diff=None)
    yield "small", faces.slice(0, 300), desc.slice(0, 300), replace(base, neighbours=400, max_pairs_per_face=1)


def main():
    from pipeline.expression.pairs import build_expression_pairs

    mode, out, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    for name, f, d, cfg in cases(data):
        t, c = time.perf_counter(), time.process_time()
        res = build_expression_pairs(f, d, cfg)
        print(f"{name}: {res.pairs.num_rows} pairs, {time.perf_counter() - t:.1f} s, {time.process_time() - c:.1f} CPU s", flush=True)
        stats = json.dumps(res.stats, sort_keys=True)
        if mode == "save":
            pq.write_table(res.pairs, out / f"{name}-pairs.parquet")
            pq.write_table(res.face_rejects, out / f"{name}-rejects.parquet")
            (out / f"{name}-stats.json").write_text(stats)
        else:
            p0, r0 = pq.read_table(out / f"{name}-pairs.parquet"), pq.read_table(out / f"{name}-rejects.parquet")
            s0 = (out / f"{name}-stats.json").read_text()
            eq = (res.pairs.equals(p0), res.face_rejects.equals(r0), stats == s0)
            print(f"  pairs equal {eq[0]}, rejects equal {eq[1]}, stats equal {eq[2]}")
            if not eq[2]:
                a, b = json.loads(stats), json.loads(s0)
                print("  stats diff:", {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})
            ok &= all(eq)
    print("ALL EQUAL" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
