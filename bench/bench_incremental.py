"""An incremental identity refresh against a full rebuild, on a synthetic collection.

    python bench/bench_incremental.py --n 1000000 --new 0.01

Builds identities for (1 - new) of a synthetic mixture (pipeline/identity/synth.py), then adds the
rest and measures, in one run: the incremental refresh (the default identity_mode: only the new faces
are searched) and the full recluster (the nightly mode), each with wall and CPU seconds and peak RSS
of a fresh process (each step runs in its own subprocess so that peaks do not mix). The incremental
refresh reclusters the identities its new faces touch (pipeline/identity/local_recluster.py);
"incremental-vote" is the same refresh without that step (the vote alone), "incremental-exact" the
vote with every new face searched exactly (the refresh before the kept IVF cells). Reports the
partition agreement between them (BCubed F of incremental against full), each against the truth,
and what the local recluster took, merged and left to the nightly recluster.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def step(args) -> None:
    import pyarrow.parquet as pq

    from pipeline.identity.build import build_identities
    from pipeline.identity.synth import make_mixture

    m = make_mixture(args.n, seed=args.seed)
    n_old = round(args.n * (1 - args.new))
    uids = np.array([f"f{i:08d}" for i in range(args.n)])
    fidx = np.zeros(args.n, np.int64)
    work = Path(args.work)
    t, c = time.perf_counter(), time.process_time()
    if args.step == "first":
        r = build_identities(uids[:n_old], fidx[:n_old], m.embeddings[:n_old])
        pq.write_table(r.assignments, work / "first.parquet")
        (work / "first.ivf.npz").write_bytes(r.index.to_bytes() if r.index is not None else b"")
    else:
        from pipeline.identity.knn import IvfIndex

        t, c = time.perf_counter(), time.process_time()  # the refresh alone, not the data generation
        prev = pq.read_table(work / "first.parquet")
        raw = (work / "first.ivf.npz").read_bytes()
        index = IvfIndex.from_bytes(raw) if raw and args.step in ("incremental", "incremental-vote") else None
        mode = "recluster" if args.step == "recluster" else "incremental"
        # incremental-exact: the refresh before the kept IVF cells (every new face searched exactly)
        r = build_identities(uids, fidx, m.embeddings, previous=prev, mode=mode, index=index,
                             exact_max=10**12 if args.step == "incremental-exact" else 50_000,
                             local_recluster=args.step == "incremental")
        pq.write_table(r.assignments, work / f"{args.step}.parquet")
    out = {"step": args.step, "wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - c, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
           "timings": {k: round(float(v), 1) for k, v in r.stats["timings"].items()}}
    if args.step != "first":
        out["churn"] = r.stats["churn"]
    if "local_recluster" in r.stats and args.step == "incremental":
        out["local_recluster"] = r.stats["local_recluster"]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--new", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "incremental"))
    ap.add_argument("--step", choices=["first", "incremental", "incremental-vote", "incremental-exact", "recluster"])
    ap.add_argument("--skip-first", action="store_true", help="reuse the first build in --work")
    args = ap.parse_args()
    if args.step:
        step(args)
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = {}
    for s in ("first", "incremental", "incremental-vote", "incremental-exact", "recluster"):
        if s == "first" and args.skip_first:
            continue
        cmd = [sys.executable, __file__, "--step", s, "--n", str(args.n), "--new", str(args.new), "--seed", str(args.seed),
               "--work", args.work]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[s] = json.loads(line)
        print(line, flush=True)
    import pyarrow.parquet as pq

    from pipeline.identity.metrics import evaluate

    def codes(step):
        t = pq.read_table(Path(args.work) / f"{step}.parquet").sort_by("uid")
        return np.unique(t.column("identity_id").to_pylist(), return_inverse=True)[1].ravel()

    full, inc, exact = codes("recluster"), codes("incremental"), codes("incremental-exact")
    vote = codes("incremental-vote")
    truth = make_truth(args.n, args.seed)
    summary = {"n": args.n, "new_fraction": args.new}
    for s in ("incremental", "incremental-vote", "incremental-exact"):
        summary[f"speedup_wall_{s}"] = round(results["recluster"]["wall_s"] / max(results[s]["wall_s"], 1e-9), 1)
        summary[f"speedup_cpu_{s}"] = round(results["recluster"]["cpu_s"] / max(results[s]["cpu_s"], 1e-9), 1)
    summary["bcubed_f_incremental_vs_full"] = round(evaluate(inc, full)["bcubed_f"], 4)
    summary["bcubed_f_incremental_vote_vs_full"] = round(evaluate(vote, full)["bcubed_f"], 4)
    summary["bcubed_f_incremental_vs_exact_refresh"] = round(evaluate(inc, exact)["bcubed_f"], 4)
    for name, c in (("incremental", inc), ("incremental-vote", vote), ("incremental-exact", exact), ("recluster", full)):
        q = evaluate(c, truth)
        summary[f"vs_truth_{name}"] = {"bcubed_f": round(q["bcubed_f"], 4), "pairwise_f": round(q["pairwise_f"], 4)}
    print(json.dumps(summary))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / f"incremental-{stamp}.json").write_text(json.dumps({"steps": results, "summary": summary}, indent=1))


def make_truth(n, seed):
    from pipeline.identity.synth import make_mixture

    return make_mixture(n, seed=seed).labels


if __name__ == "__main__":
    main()
