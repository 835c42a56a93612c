"""What a removal costs every run once requests are on record: the sweep of every table against the
applied log when nothing is left to remove (the steady state), and when one photo in the middle is.

    python bench/bench_removals.py --rows 200000
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import removals as rm
from pipeline.config import Layout

TABLES = ("images", "faces", "face_scan", "face_expressions", "image_scores")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="rows in each of the 5 per-partition tables")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-removals-"))
    try:
        uids = [uuid.uuid4().hex for _ in range(args.rows)]
        layout = Layout(home)
        for t in TABLES:
            cols = {"uid": uids}
            if t == "faces":  # the embeddings are what a full read would cost
                cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(args.rows * 128, np.float32)), 128)
            p = layout.partition_file(t, "p0")
            p.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(cols), p)
        print("| case | rows per table | wall s | CPU s |\n|---|---|---|---|")
        for case, removed in (("nothing left to remove", {rm.uid_hash(uuid.uuid4().hex)}),
                              ("one photo to remove", {rm.uid_hash(uids[len(uids) // 2])})):
            t0, c0 = time.perf_counter(), time.process_time()
            rm.sweep_tables(layout, removed, lambda _step: None)
            print(f"| {case} | {args.rows} | {time.perf_counter() - t0:.2f} | {time.process_time() - c0:.2f} |")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
