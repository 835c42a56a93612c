"""Run every benchmark with the settings whose numbers docs/benchmarks.md reports (CPU; about 30 minutes
on a 2-core machine). Each script prints a markdown table and writes JSON to bench/results/.
Pass names to run a subset: `python bench/run_all.py faces social`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {
    "faces": ["bench_faces.py", "--repeats", "3"],
    "scale": ["bench_scale.py", "--repeats", "3"],
    "stage_costs": ["bench_stage_costs.py", "--repeats", "3"],
    "decode_once": ["bench_decode_once.py", "--copies", "4"],
    "identity": ["bench_identity.py", "--sizes", "10000,100000"],
    "multiid": ["bench_multiid.py"],
    "keypoint_matcher": ["bench_multiid.py", "--matcher", "--repeats", "3"],
    "social": ["bench_social.py", "--events", "10000000", "--repeats", "3", "--exports"],
    "scoring": ["bench_scoring.py"],
    "training": ["bench_training.py", "--tiny"],
    # every collection asset on a synthetic 100k-face collection (~15 min; multi-identity on sampled targets)
    "collection": ["bench_collection.py", "--sizes", "100000", "--targets", "30,120"],
}


def main() -> int:
    names = sys.argv[1:] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(RUNS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        script, *args = RUNS[name]
        print(f"\n=== {name}: {script} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script), *args], cwd=HERE.parent)
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
