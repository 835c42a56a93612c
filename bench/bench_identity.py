"""Identity index benchmark: quality on the labelled real photos, scale on synthetic mixtures.

    .venv/bin/python bench/bench_identity.py                      # quality + scale 10k,100k
    .venv/bin/python bench/bench_identity.py --sizes 10000,100000,1000000 --dim 128
    .venv/bin/python bench/bench_identity.py --skip-quality --sizes 1000000
    # ivf-blas variants side by side (module defaults set in each run's process, see IVF_VARIANT_KEYS):
    .venv/bin/python bench/bench_identity.py --skip-quality --sizes 1000000 --methods "" --exact-graph-max 0 \
        --knn-backends "ivf-blas:spill=0:nprobe=6,ivf-blas,ivf-blas:coarse=16:cells=8"

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
import pyarrow as pa
import pyarrow.compute  # makes pa.compute available

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

    from pipeline.faces import get_backend
    from pipeline.faces.folders import labelled_embeddings

    t = time.perf_counter()
    lf = labelled_embeddings(SHARED_FACES, get_backend("dlib"))
    embed_s = time.perf_counter() - t
    E, y = lf.embeddings, lf.labels
    print(f"\nembedded {len(y)} photos of {len(lf.names)} people in {embed_s:.1f}s (no face: {lf.no_face})")
    g = knn_graph(E, k=k)
    rows = []
    for m in METHODS:
        try:
            t = time.perf_counter()
            c = cluster_graph(g.indices, g.similarities, method=m, threshold=threshold, embeddings=E)
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


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(n: int, dim: int, seed: int, out: Path) -> dict:
    """Runs in its own process, so the generator's memory does not count against the build."""
    from pipeline.identity.synth import make_mixture

    preset = "dlib" if dim == 128 else "arcface"
    t = time.perf_counter()
    # written straight into a memory-mapped .npy: no N x D copy in this process (5.1 GB at 10M)
    E = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    m = make_mixture(n, preset=preset, dim=dim, seed=seed, out=E)
    E.flush()
    del E, m.embeddings
    np.save(out / "labels.npy", m.labels)
    info = {k: v for k, v in m.params.items() if k.startswith("n") or k == "largest_identity"}
    info["gen_s"] = time.perf_counter() - t
    info["gen_peak_rss_mb"] = _rss_mb()
    return info


IVF_VARIANT_KEYS = {  # --knn-backends "ivf-blas:spill=0.1:reverse=1:nprobe=2": module defaults set in the run
    "spill": ("IVF_BLAS_SPILL", float),
    "reverse": ("IVF_BLAS_REVERSE", lambda v: bool(int(v))),
    "nprobe": ("IVF_BLAS_NPROBE", int),
    "cells": ("IVF_BLAS_CELLS_PER_SQRT_N", float),
    "coarse": ("IVF_BLAS_COARSE_PROBES", int),
    "adaptive": ("IVF_BLAS_ADAPTIVE", lambda v: bool(int(v))),
    "patience": ("IVF_BLAS_PATIENCE", int),
}


def apply_knn_variant(backend: str) -> str:
    """'name:key=value:...' -> name, with the ivf-blas defaults of this process set from the keys."""
    import pipeline.identity.knn as knn_mod

    name, *opts = backend.split(":")
    for o in opts:
        key, _, value = o.partition("=")
        if key not in IVF_VARIANT_KEYS:
            raise ValueError(f"unknown ivf-blas variant key {key!r} in {backend!r}: use {sorted(IVF_VARIANT_KEYS)}")
        attr, conv = IVF_VARIANT_KEYS[key]
        setattr(knn_mod, attr, conv(value))
    return name


def one_scale(
    data: Path,
    k: int,
    methods: list[str],
    recall_queries: int,
    seed: int,
    knn_backend: str,
    exact_graph: bool,
) -> dict:
    """Runs in a fresh process: build_identities on memory-mapped synthetic embeddings."""
    import threading

    from pipeline.identity.build import build_identities
    from pipeline.identity.knn import _floor_exact

    def progress():  # a long run (10M: an hour or more on a busy box) shows its memory as it goes
        while True:
            time.sleep(60)
            with open("/proc/self/statm") as f:
                cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            _log(f"rss {cur:.0f} MB, peak {_rss_mb():.0f} MB, load {os.getloadavg()[0]:.1f}")

    threading.Thread(target=progress, daemon=True).start()
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(name)s: %(message)s")

    variant, knn_backend = knn_backend, apply_knn_variant(knn_backend)
    E = np.load(data / "embeddings.npy", mmap_mode="r")
    labels = np.load(data / "labels.npy")
    n, dim = E.shape
    preset = "dlib" if dim == 128 else "arcface"
    thr = DEFAULT_THRESHOLDS[preset]
    uids = np.char.add("u", np.char.zfill(np.arange(n).astype("U8"), 8))
    fidx = np.zeros(n, np.int64)
    res = {
        "n": n,
        "dim": dim,
        "k": k,
        "threshold": thr,
        "knn_backend_asked": variant,
        "rss_before_build_mb": _rss_mb(),
        "load_average_before": os.getloadavg(),
    }
    t = time.perf_counter()
    c0 = time.process_time()  # CPU seconds of all threads: comparable when the box is shared
    r = build_identities(
        uids, fidx, E, backend_name=preset, k=k, seed=seed, return_graph=True, knn_backend=knn_backend
    )
    res["end_to_end_s"] = time.perf_counter() - t
    res["end_to_end_cpu_s"] = time.process_time() - c0
    res["peak_rss_build_mb"] = _rss_mb()
    res["load_average_after_build"] = os.getloadavg()
    _log(f"N={n}: build_identities {res['end_to_end_s']:.1f}s timings={r.stats['timings']}")
    st = r.stats
    res.update(
        knn_backend=st["knn_backend"],
        knn_s=st["timings"]["knn_s"],
        knn_cpu_s=st["timings"].get("knn_cpu_s"),
        cluster_s=st["timings"]["cluster_s"],
        cluster_cpu_s=st["timings"].get("cluster_cpu_s"),
        tables_s=st["timings"]["tables_s"],
        knn_params={k_: v for k_, v in st["knn_params"].items() if k_ != "rounds"},
        knn_rounds=st["knn_params"].get("rounds"),
    )
    # uids are zero-padded, so (uid, face_index) order == generation order; ids as Arrow
    # dictionary codes (np.unique over 10M Python strings takes minutes and ~0.7 GB)
    codes = pa.compute.dictionary_encode(r.assignments.column("identity_id").combine_chunks()).indices
    res["default"] = evaluate(codes.to_numpy(zero_copy_only=False).astype(np.int64), labels)
    del codes
    g = r.graph
    rng = np.random.default_rng(seed + 1)
    q = np.sort(rng.choice(n, size=min(recall_queries, n), replace=False))
    t = time.perf_counter()
    exact = exact_neighbours_of(E, q, k)
    res["recall_at_k_sample"] = recall_at_k(g.indices[q], exact)
    # recall of the exact neighbours above the clustering threshold (the edges the clustering keeps)
    res["recall_above_threshold_sample"] = recall_at_k(g.indices[q], _floor_exact(E, q, exact, thr))
    res["recall_queries"] = len(q)
    res["recall_s"] = time.perf_counter() - t
    _log(f"N={n}: recall>=thr {res['recall_above_threshold_sample']:.4f}")
    if exact_graph:  # clustering quality on the exact graph, for comparison (N^2 work)
        t = time.perf_counter()
        ge = knn_graph(np.ascontiguousarray(E), k=k, backend="faiss-flat")
        c = cluster_graph(ge.indices, ge.similarities, threshold=thr, seed=seed, embeddings=E)
        strong = ge.similarities >= thr
        found = np.zeros_like(strong)
        for s in range(0, n, 65_536):
            found[s : s + 65_536] = (
                ge.indices[s : s + 65_536, :, None] == g.indices[s : s + 65_536, None, :]
            ).any(2)
        res["exact_graph"] = {
            "knn_s": time.perf_counter() - t,
            "recall_above_threshold_full": float((found & strong).sum() / max(strong.sum(), 1)),
            **evaluate(c.labels, labels),
        }
    res["methods"] = {}
    for meth in methods:
        t = time.perf_counter()
        try:
            # with the split of incoherent clusters, as build_identities clusters
            c = cluster_graph(g.indices, g.similarities, method=meth, threshold=thr, seed=seed, embeddings=E)
        except ImportError as e:
            res["methods"][meth] = {"error": str(e)}
            continue
        res["methods"][meth] = {"cluster_s": time.perf_counter() - t, **evaluate(c.labels, labels)}
        _log(f"N={n}: {meth} {res['methods'][meth]['cluster_s']:.1f}s")
    res["peak_rss_mb"] = _rss_mb()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["process_cpu_s"] = ru.ru_utime + ru.ru_stime  # the whole subprocess, recall checks included
    return res


def _run(cmd: list[str], timeout: int) -> dict | None:
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if p.returncode != 0:
        return {"error": f"rc={p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def scale(
    sizes: list[int],
    dim: int,
    k: int,
    methods: list[str],
    recall_queries: int,
    timeout: int,
    seed: int,
    repeats: int,
    knn_backends: list[str],
    exact_graph_max: int,
    data_dir: str | None = None,
):
    import contextlib
    import statistics
    import tempfile

    rows = []
    for n in sizes:
        if data_dir is not None:  # kept between runs: generated once per (n, dim, seed)
            where = contextlib.nullcontext(str(Path(data_dir) / f"n{n}_d{dim}_s{seed}"))
        else:
            where = tempfile.TemporaryDirectory(prefix="bench_identity_")
        with where as tmp:
            done = Path(tmp) / "generation.json"
            if done.exists():
                gen = json.loads(done.read_text())
            else:
                Path(tmp).mkdir(parents=True, exist_ok=True)
                gen = _run(
                    [
                        sys.executable,
                        __file__,
                        "--generate",
                        str(n),
                        "--dim",
                        str(dim),
                        "--seed",
                        str(seed),
                        "--data",
                        tmp,
                    ],
                    timeout,
                )
                if "error" not in gen:
                    done.write_text(json.dumps(gen))
            for backend in knn_backends:
                runs = []
                for rep in range(repeats):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--one-scale",
                        "--data",
                        tmp,
                        "--k",
                        str(k),
                        "--methods",
                        ",".join(methods if rep == 0 else []),
                        "--recall-queries",
                        str(recall_queries),
                        "--seed",
                        str(seed),
                        "--knn-backend",
                        backend,
                    ]
                    if rep == 0 and n <= exact_graph_max:
                        cmd.append("--exact-graph")
                    r = _run(cmd, timeout)
                    runs.append(r)
                    took = r.get("error") or "{:.0f}s, {:.0f} CPU-s".format(
                        r["end_to_end_s"], r["end_to_end_cpu_s"]
                    )
                    print(f"N={n} {backend} run {rep + 1}/{repeats}: {took}", flush=True)
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    rows.append({"n": n, "dim": dim, "knn_backend": backend, "error": runs[0]["error"]})
                    continue
                row = dict(ok[0], generation=gen, repeats=len(ok))
                for key in (
                    "end_to_end_s",
                    "end_to_end_cpu_s",
                    "knn_s",
                    "knn_cpu_s",
                    "cluster_s",
                    "cluster_cpu_s",
                    "peak_rss_build_mb",
                ):
                    vals = [r[key] for r in ok if r.get(key) is not None]
                    row[key] = statistics.median(vals) if vals else None
                    row[key + "_all"] = vals
                rows.append(row)
    print(
        f"\n### Scale on synthetic mixtures (D={dim}, k={k}; {os.cpu_count()} CPUs, shared; medians of "
        f"{repeats} run(s))\n"
    )
    flat = []
    for r in rows:
        if "error" in r:
            flat.append({"N": r["n"], "knn backend": f"{r['knn_backend']}: {r['error']}"})
            continue
        flat.append(
            {
                "N": r["n"],
                "identities": r["generation"].get("n_identities"),
                "knn backend": r["knn_backend_asked"] if ":" in r["knn_backend_asked"] else r["knn_backend"],
                "probes": r["knn_params"].get("nprobe"),
                "knn s": r["knn_s"],
                "knn CPU s": r["knn_cpu_s"],
                "cluster s": r["cluster_s"],
                "end-to-end s": r["end_to_end_s"],
                "end-to-end CPU s": r["end_to_end_cpu_s"],
                "peak RSS MB": r["peak_rss_build_mb"],
                "recall@k": r["recall_at_k_sample"],
                "recall>=thr": r["recall_above_threshold_sample"],
                "BCubed F": r["default"]["bcubed_f"],
                "pairwise F": r["default"]["pairwise_f"],
                "pairwise P": r["default"]["pairwise_precision"],
                "#pred": r["default"]["n_pred_clusters"],
                # a giant merge (many people in one identity) is visible here even when BCubed is not
                "largest pred": r["default"].get("largest_pred_cluster"),
                "true ids in it": r["default"].get("largest_pred_true_ids"),
            }
        )
    print(md_table(flat, list(flat[0].keys()) if flat else []))
    ex = [r for r in rows if "exact_graph" in r]
    if ex:
        print("\nExact graph (faiss-flat) on the same data, Chinese whispers:\n")
        print(
            md_table(
                [
                    {
                        "N": r["n"],
                        "graph of": r["knn_backend"],
                        "full recall>=thr": r["exact_graph"]["recall_above_threshold_full"],
                        "exact BCubed F": r["exact_graph"]["bcubed_f"],
                        "exact pairwise F": r["exact_graph"]["pairwise_f"],
                        "exact pairwise P": r["exact_graph"]["pairwise_precision"],
                    }
                    for r in ex
                ],
                [
                    "N",
                    "graph of",
                    "full recall>=thr",
                    "exact BCubed F",
                    "exact pairwise F",
                    "exact pairwise P",
                ],
            )
        )
    mrows = []
    for r in rows:
        for meth, e in r.get("methods", {}).items():
            if "error" in e:
                continue
            mrows.append(
                {
                    "N": r["n"],
                    "graph": r["knn_backend"],
                    "method": meth,
                    "cluster s": e["cluster_s"],
                    "bcubed_f": e["bcubed_f"],
                    "pairwise_f": e["pairwise_f"],
                    "nmi": e["nmi"],
                    "#pred": e["n_pred_clusters"],
                    "#true": e["n_true_clusters"],
                    "largest pred": e.get("largest_pred_cluster"),
                    "true ids in it": e.get("largest_pred_true_ids"),
                }
            )
    if mrows:
        print("\n" + md_table(mrows, list(mrows[0].keys())))
    return rows


def gpu_knn(
    n: int,
    dim: int,
    k: int,
    repeats: int,
    check_queries: int,
    seed: int,
    device: str = "cuda",
    variants: list[dict] | None = None,
) -> dict:
    """Exact kNN of n x dim unit vectors on CUDA (issue 15 target: 1M x 512, k=64 in <= 4 s on an
    H200): pipeline.identity.knn_torch vs plain bf16 matmul + full-width torch.topk, side by side.
    ``device="cpu"`` (--gpu-smoke-cpu) runs the same script on a small problem, to check it works."""
    import statistics

    import torch

    from pipeline.identity.knn_torch import knn_torch_exact

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu-knn needs CUDA (torch.cuda.is_available() is False)")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    # clustered unit vectors (a mixture, like faces): 20 per centre, cosine ~0.6 within
    centres = torch.randn(n // 20 + 1, dim, device=dev, generator=g)
    X = centres.repeat_interleave(20, 0)[:n] + 0.8 * torch.randn(n, dim, device=dev, generator=g)
    X = torch.nn.functional.normalize(X, dim=1).float()
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    out = {"n": n, "dim": dim, "k": k, "device": name, "torch": torch.__version__}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        return time.perf_counter() - t, r

    def baseline():  # what issue 15 measured: bf16 matmul + torch.topk over all N columns
        Xb = X.bfloat16()
        I = torch.empty((n, k + 1), dtype=torch.int64, device=dev)
        for s in range(0, n, 16_384):
            I[s : s + 16_384] = torch.topk(Xb[s : s + 16_384] @ Xb.T, k + 1, dim=1).indices
        return I

    timed(lambda: knn_torch_exact(X[: min(n, 50_000)], k, device=device))  # warm-up (cuBLAS, allocator)
    ours, last = [], None
    for _ in range(repeats):
        s, last = timed(lambda: knn_torch_exact(X, k, device=device))
        ours.append(s)
        _log(f"gpu knn {s:.2f}s {last[2]}")
    out["ours_s"] = statistics.median(ours)
    out["ours_all_s"] = ours
    out["ours_info"] = last[2]
    Xh = X.cpu().numpy()
    s, _ = timed(lambda: knn_torch_exact(Xh, k, device=device))
    out["ours_from_numpy_s"] = s  # upload + search + results back to numpy
    s, Ib = timed(baseline)
    out["baseline_bf16_topk_s"] = s
    out["speedup_vs_baseline"] = out["baseline_bf16_topk_s"] / out["ours_s"]
    # recall against exact float64 search on sampled queries
    q = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:check_queries].to(dev)
    S = X[q].double() @ X.double().T
    ref = torch.topk(S, k + 1, dim=1).indices.cpu().numpy()
    I = last[0][q.cpu().numpy()]
    hit = (I[:, :, None] == ref[:, None, :]).any(2).mean()
    hit_base = (Ib[q].cpu().numpy()[:, :, None] == ref[:, None, :]).any(2).mean()
    out["recall_vs_float64_exact"] = float(hit)
    out["baseline_recall_vs_float64_exact"] = float(hit_base)
    out["max_abs_similarity_error"] = float(
        np.abs(last[1][q.cpu().numpy()] - np.take_along_axis(S.cpu().numpy(), I, 1)).max()
    )
    out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    out["variants"] = []
    for v in variants or []:  # other block / chunk / group sizes, one timed run each (for tuning)
        try:
            s, r = timed(lambda v=v: knn_torch_exact(X, k, device=device, **v))
            rec = float((r[0][q.cpu().numpy()][:, :, None] == ref[:, None, :]).any(2).mean())
            out["variants"].append({**v, "s": s, "recall": rec})
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report and go on
            out["variants"].append({**v, "error": repr(e)[:200]})
        _log(f"variant {out['variants'][-1]}")
    print(f"\n### GPU exact kNN ({n:,} x {dim}, k={k}, {out['device']})\n")
    print(
        md_table(
            [
                {
                    "method": f"pipeline.identity.knn_torch (median of {repeats})",
                    "s": out["ours_s"],
                    "recall": out["recall_vs_float64_exact"],
                },
                {
                    "method": "same, from numpy incl. upload/download",
                    "s": out["ours_from_numpy_s"],
                    "recall": "",
                },
                {
                    "method": "bf16 matmul + full-width topk",
                    "s": out["baseline_bf16_topk_s"],
                    "recall": out["baseline_recall_vs_float64_exact"],
                },
            ],
            ["method", "s", "recall"],
        )
    )
    if out["variants"]:
        print("\n" + md_table(out["variants"], sorted({c for v in out["variants"] for c in v})))
    print(
        f"\nspeedup {out['speedup_vs_baseline']:.2f}x, max |similarity error| {out['max_abs_similarity_error']:.1e}, "
        f"peak GPU memory {out['peak_gpu_mem_gb']:.1f} GB"
    )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--methods", default="chinese_whispers,leiden,connected_components")
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1, help="build runs per size and backend (medians)")
    ap.add_argument("--knn-backends", default="auto", help="comma list, e.g. auto,faiss-ivf (side by side)")
    ap.add_argument(
        "--exact-graph-max",
        type=int,
        default=100_000,
        help="also cluster the exact graph (faiss-flat) up to this N",
    )
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data-dir",
        default=None,
        help="keep the synthetic data here (DIR/n<N>_d<D>_s<seed>, reused when present) instead of a temp dir",
    )
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument(
        "--gpu-knn",
        action="store_true",
        help="CUDA only: exact kNN of 1M x 512, k=64 (use --gpu-n/--gpu-dim/--gpu-k to change)",
    )
    ap.add_argument("--gpu-n", type=int, default=1_000_000)
    ap.add_argument("--gpu-dim", type=int, default=512)
    ap.add_argument("--gpu-k", type=int, default=64)
    ap.add_argument("--gpu-check-queries", type=int, default=1000)
    ap.add_argument("--gpu-smoke-cpu", action="store_true", help="run the --gpu-knn script on CPU (small n)")
    ap.add_argument(
        "--gpu-variants",
        default="16384:65536:64,32768:65536:32,8192:131072:32",
        help="extra query_block:db_chunk:group settings timed once each ('' for none)",
    )
    ap.add_argument("--generate", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one-scale", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--knn-backend", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--exact-graph", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    if a.generate is not None:
        print(json.dumps(generate(a.generate, a.dim, a.seed, Path(a.data)), default=float))
        return
    if a.one_scale:
        r = one_scale(Path(a.data), a.k, methods, a.recall_queries, a.seed, a.knn_backend, a.exact_graph)
        print(json.dumps(r, default=float))
        return
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if a.gpu_knn or a.gpu_smoke_cpu:
        out["gpu_knn"] = gpu_knn(
            a.gpu_n,
            a.gpu_dim,
            a.gpu_k,
            max(1, a.repeats),
            a.gpu_check_queries,
            a.seed,
            device="cpu" if a.gpu_smoke_cpu else "cuda",
            variants=[
                dict(zip(("query_block", "db_chunk", "group"), map(int, v.split(":"))))
                for v in a.gpu_variants.split(",")
                if v
            ],
        )
    else:
        if not a.skip_quality:
            out["quality"] = quality(DEFAULT_THRESHOLDS["dlib"], a.k)
        if not a.skip_scale:
            sizes = [int(s) for s in a.sizes.split(",") if s]
            backends = [b for b in a.knn_backends.split(",") if b]
            out["scale"] = scale(
                sizes,
                a.dim,
                a.k,
                methods,
                a.recall_queries,
                a.timeout,
                a.seed,
                a.repeats,
                backends,
                a.exact_graph_max,
                a.data_dir,
            )
        out["load_average_at_end"] = os.getloadavg()
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"identity_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
