"""Identity index benchmark: quality on the labelled real photos, scale on synthetic mixtures.

    .venv/bin/python bench/bench_identity.py                      # quality + scale 10k,100k
    .venv/bin/python bench/bench_identity.py --sizes 10000,100000,1000000 --dim 128
    .venv/bin/python bench/bench_identity.py --skip-quality --sizes 1000000

Quality: dlib descriptors of ../shared/data/faces/identities (19 people, 125 photos), every
clustering method of pipeline.identity at the default dlib threshold, plus scikit-learn's DBSCAN
and AgglomerativeClustering (cosine, same threshold as a distance 1 - t) on the same embeddings.

Scale: synthetic mixtures from pipeline.identity.synth (fitted to the dlib photo statistics); each
size runs in a fresh subprocess so peak RSS (resource.getrusage ru_maxrss) is per size. Reports
kNN-graph time, clustering time, build_identities end-to-end time, peak RSS, BCubed/pairwise F,
and recall@k of the kNN graph against exact search on a sample of queries.

Prints markdown tables; writes JSON to bench/results/identity_<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.identity.cluster import DEFAULT_THRESHOLDS, METHODS, cluster_graph
from pipeline.identity.knn import exact_neighbours_of, knn_graph, recall_at_k
from pipeline.identity.metrics import evaluate

SHARED_FACES = REPO.parent / "shared" / "data" / "faces"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def md_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def quality(threshold: float, k: int) -> list[dict]:
    from sklearn.cluster import DBSCAN, AgglomerativeClustering

    from pipeline.identity.realfaces import embed_identity_folder

    t = time.perf_counter()
    lf = embed_identity_folder(SHARED_FACES)
    embed_s = time.perf_counter() - t
    E, y = lf.embeddings, lf.labels
    print(f"\nembedded {len(y)} photos of {len(lf.names)} people in {embed_s:.1f}s (no face: {lf.no_face})")
    g = knn_graph(E, k=k)
    rows = []
    for m in METHODS:
        try:
            t = time.perf_counter()
            c = cluster_graph(g.indices, g.similarities, method=m, threshold=threshold)
            rows.append({"method": m, "seconds": time.perf_counter() - t, **evaluate(c.labels, y)})
        except ImportError as e:
            print(f"skip {m}: {e}")
    eps = 1.0 - threshold  # cosine distance
    sk = {
        "sklearn DBSCAN(min_samples=1)": DBSCAN(eps=eps, min_samples=1, metric="cosine"),
        "sklearn DBSCAN(min_samples=2)": DBSCAN(eps=eps, min_samples=2, metric="cosine"),
        "sklearn Agglomerative(average)": AgglomerativeClustering(
            n_clusters=None, distance_threshold=eps, metric="cosine", linkage="average"
        ),
        "sklearn Agglomerative(complete)": AgglomerativeClustering(
            n_clusters=None, distance_threshold=eps, metric="cosine", linkage="complete"
        ),
    }
    for name, est in sk.items():
        t = time.perf_counter()
        lab = est.fit_predict(E).astype(np.int64)
        noise = lab < 0
        lab[noise] = lab.max() + 1 + np.arange(noise.sum())  # DBSCAN noise -> singletons
        rows.append({"method": name, "seconds": time.perf_counter() - t, **evaluate(lab, y)})
    print(f"\n### Quality on shared/data/faces (dlib 128-d, threshold {threshold}, k={k})\n")
    cols = [
        "method",
        "pairwise_precision",
        "pairwise_recall",
        "pairwise_f",
        "bcubed_precision",
        "bcubed_recall",
        "bcubed_f",
        "nmi",
        "n_pred_clusters",
        "n_true_clusters",
    ]
    print(md_table(rows, cols))
    return rows


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} cpu={time.process_time():.0f}s] {msg}", file=sys.stderr, flush=True)


def one_scale(n: int, dim: int, k: int, methods: list[str], recall_queries: int, seed: int) -> dict:
    """Runs in a fresh process: synthetic mixture -> build_identities, plus per-method clustering."""
    from pipeline.identity.build import build_identities
    from pipeline.identity.synth import make_mixture

    preset = "dlib" if dim == 128 else "arcface"
    thr = DEFAULT_THRESHOLDS[preset]
    t = time.perf_counter()
    m = make_mixture(n, preset=preset, dim=dim, seed=seed)
    gen_s = time.perf_counter() - t
    _log(f"N={n}: generated in {gen_s:.1f}s")
    uids = np.char.add("u", np.char.zfill(np.arange(n).astype("U8"), 8))
    fidx = np.zeros(n, np.int64)
    res = {
        "n": n,
        "dim": dim,
        "k": k,
        "threshold": thr,
        "n_true_identities": int(m.params["n_identities"]),
        "largest_true_identity": int(np.bincount(m.labels).max()),
        "gen_s": gen_s,
    }
    t = time.perf_counter()
    c0 = time.process_time()  # CPU seconds of all threads: comparable when the box is shared
    r = build_identities(uids, fidx, m.embeddings, backend_name=preset, k=k, seed=seed, return_graph=True)
    res["end_to_end_s"] = time.perf_counter() - t
    res["end_to_end_cpu_s"] = time.process_time() - c0
    _log(f"N={n}: build_identities {res['end_to_end_s']:.1f}s timings={r.stats['timings']}")
    res["rss_after_build_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    st = r.stats
    res.update(
        knn_backend=st["knn_backend"],
        knn_s=st["timings"]["knn_s"],
        cluster_s=st["timings"]["cluster_s"],
        tables_s=st["timings"]["tables_s"],
        knn_params={k_: v for k_, v in st["knn_params"].items()},
    )
    # quality of the default pipeline (build sorts by uid; uids are zero-padded so order is preserved)
    ids = r.assignments.column("identity_id").to_numpy(zero_copy_only=False)
    order_uid = r.assignments.column("uid").to_numpy(zero_copy_only=False)
    pos = np.array([int(u[1:]) for u in order_uid])
    res["default"] = evaluate(np.unique(ids, return_inverse=True)[1].ravel(), m.labels[pos])
    # recall of the kNN graph used, vs exact, on a sample of queries
    g = r.graph  # rows are in uid order == generation order (zero-padded uids)
    assert np.array_equal(pos, np.arange(n))
    rng = np.random.default_rng(seed + 1)
    q = np.sort(rng.choice(n, size=min(recall_queries, n), replace=False))
    t = time.perf_counter()
    exact = exact_neighbours_of(m.embeddings, q, k)
    res["recall_at_k_sample"] = recall_at_k(g.indices[q], exact)
    # recall restricted to exact neighbours above the clustering threshold (the edges that matter)
    hits = total = 0
    for row, qq in enumerate(q):
        ex = exact[row][exact[row] >= 0]
        sims = m.embeddings[ex] @ m.embeddings[qq]
        ex = ex[sims >= thr]
        total += len(ex)
        hits += len(np.intersect1d(ex, g.indices[qq]))
    res["recall_above_threshold_sample"] = hits / max(total, 1)
    res["recall_queries"] = len(q)
    res["recall_s"] = time.perf_counter() - t
    _log(f"N={n}: recall@k {res['recall_at_k_sample']:.4f}")
    res["methods"] = {}
    for meth in methods:
        t = time.perf_counter()
        try:
            c = cluster_graph(g.indices, g.similarities, method=meth, threshold=thr, seed=seed)
        except ImportError as e:
            res["methods"][meth] = {"error": str(e)}
            continue
        res["methods"][meth] = {"cluster_s": time.perf_counter() - t, **evaluate(c.labels, m.labels)}
        _log(f"N={n}: {meth} {res['methods'][meth]['cluster_s']:.1f}s")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def scale(
    sizes: list[int], dim: int, k: int, methods: list[str], recall_queries: int, timeout: int, seed: int
):
    rows = []
    for n in sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one-scale",
            str(n),
            "--dim",
            str(dim),
            "--k",
            str(k),
            "--methods",
            ",".join(methods),
            "--recall-queries",
            str(recall_queries),
            "--seed",
            str(seed),
        ]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=REPO, check=False)
        except subprocess.TimeoutExpired:
            print(f"N={n}: timed out after {timeout}s")
            rows.append({"n": n, "dim": dim, "error": f"timeout {timeout}s"})
            continue
        if p.returncode != 0:
            rows.append({"n": n, "dim": dim, "error": f"rc={p.returncode}"})
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t
        rows.append(r)
        print(f"N={n}: done in {r['wall_s']:.0f}s", flush=True)
    print(f"\n### Scale on synthetic mixtures (D={dim}, k={k}; {os.cpu_count()} CPUs)\n")
    flat = []
    for r in rows:
        if "error" in r:
            flat.append({"N": r["n"], "knn backend": r["error"]})
            continue
        flat.append(
            {
                "N": r["n"],
                "identities": r["n_true_identities"],
                "knn backend": r["knn_backend"],
                "knn s": r["knn_s"],
                "cluster s (CW)": r["cluster_s"],
                "end-to-end s": r["end_to_end_s"],
                "end-to-end CPU s": r.get("end_to_end_cpu_s", float("nan")),
                "peak RSS MB": r["peak_rss_mb"],
                "recall@k": r["recall_at_k_sample"],
                "recall>=thr": r["recall_above_threshold_sample"],
                "BCubed F": r["default"]["bcubed_f"],
                "pairwise F": r["default"]["pairwise_f"],
                "#pred": r["default"]["n_pred_clusters"],
            }
        )
    print(md_table(flat, list(flat[0].keys()) if flat else []))
    mrows = []
    for r in rows:
        for meth, e in r.get("methods", {}).items():
            if "error" in e:
                continue
            mrows.append(
                {
                    "N": r["n"],
                    "method": meth,
                    "cluster s": e["cluster_s"],
                    "bcubed_f": e["bcubed_f"],
                    "pairwise_f": e["pairwise_f"],
                    "nmi": e["nmi"],
                    "#pred": e["n_pred_clusters"],
                    "#true": e["n_true_clusters"],
                }
            )
    if mrows:
        print("\n" + md_table(mrows, list(mrows[0].keys())))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--methods", default="chinese_whispers,leiden,connected_components")
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per scale size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--one-scale", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    if a.one_scale is not None:
        print(
            json.dumps(one_scale(a.one_scale, a.dim, a.k, methods, a.recall_queries, a.seed), default=float)
        )
        return
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if not a.skip_quality:
        out["quality"] = quality(DEFAULT_THRESHOLDS["dlib"], a.k)
    if not a.skip_scale:
        sizes = [int(s) for s in a.sizes.split(",") if s]
        out["scale"] = scale(sizes, a.dim, a.k, methods, a.recall_queries, a.timeout, a.seed)
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"identity_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
