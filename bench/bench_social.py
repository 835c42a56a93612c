"""Benchmark of the social preference-pair builder on simulated logs: this code against the naive
rule and against an earlier commit of itself, in the same run.

    .venv/bin/python bench/bench_social.py --events 2000000 --repeats 1 --exports --held-out
    .venv/bin/python bench/bench_social.py                      # 10 M events, 3 repeats, exports

A log is simulated (pipeline/social/simulate.py, with bots of four kinds), then built `repeats`
times by this code and, with --before-commit (default b7335c2, the code before issue 11), by that
commit's code (git archive into a temp folder, run in a subprocess on the same log; the two
alternate within each repeat). Reported, as medians over repeats:
- the default Pick-a-Pic export's train split, read back from disk: rows, distinct image pairs,
  pairs that appear with both winners (and their rows), and precision against the simulator's
  latent quality (the share of rows whose preferred image is truly better: what a trainer that
  reads every row learns);
- population pairs: precision and yield (pairs / the naive rule's pairs), the naive rule's own;
- per-user pairs: precision against the user's own utility;
- bot accounts caught and slipped, per kind (this code; the old code only reports a count);
- wall and CPU seconds of each build (CPU counts all DuckDB threads; both sides use the same
  thread count).
--held-out also builds logs with other seeds and parameters that no test or default was chosen
on (one run each, both codes). --weights compares engagement weightings by precision at 0.6x
the naive yield. Prints markdown and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.evaluate import bot_detection, export_report, group_fdr, load_truth, precision
from pipeline.social.simulate import SimConfig, simulate

# logs with other seeds and parameters than the tests and the defaults were chosen on
HELD_OUT = {
    "seed 202, groups of 3-12 images, half the prompt pages": {
        "seed": 202,
        "gallery_frac": 0.15,
        "images_per_prompt": (3, 12),
    },
    "seed 303, 5,000 users, 80% self-engagement": {"seed": 303, "n_users": 5000, "self_engage_frac": 0.8},
    "seed 404, featured boost 25, 10 days": {"seed": 404, "featured_boost": 25.0, "n_days": 10},
    "seed 101, stronger taste (sd 0.8): stress": {"seed": 101, "taste_sd": 0.8, "featured_boost": 25.0},
}

# --sweep: simulator settings other than the defaults the rules were tuned on (seed 0 and 1);
# (name, SimConfig overrides); the log size comes from --sweep-events unless given here
SWEEP = [
    ("defaults, seed 0", {"seed": 0}),
    ("taste spread sd 0.3", {"seed": 21, "taste_sd": 0.3}),
    (
        "taste spread sd 0.8 (stress: featured boost 25)",
        {"seed": 101, "taste_sd": 0.8, "featured_boost": 25.0},
    ),
    ("popularity skew: featured 10% at boost 40", {"seed": 22, "featured_frac": 0.1, "featured_boost": 40.0}),
    ("exposure confounding x2 (surface logits)", {"seed": 23, "surface_bias": 2.0}),
    ("exposure confounding off", {"seed": 24, "surface_bias": 0.0}),
    ("bot share x3 (farms, rings, boosters)", {"seed": 25, "n_bots": 6, "n_rings": 3, "n_boosted": 3}),
    ("boosters of popular creators", {"seed": 26, "boost_popular": True, "n_boosted": 3}),
]


def sweep_row(name: str, social: Path, truth: Path, events: int) -> dict:
    """One sweep log: the log-only estimate of precision (split halves, no truth) next to the
    precision against the simulator's truth, and the yield against the naive rule."""
    cfg = SocialConfig(export_webdataset=False, export_pickapic=False)
    t, c = time.perf_counter(), time.process_time()
    r = build_social_pairs(social, None, cfg)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    true = precision(r.pairs, truth)
    s = r.stats
    bots = bot_detection(r.bots, truth)
    fdr = group_fdr(r.pairs, truth)
    return {
        "log": name,
        "events": events,
        "pairs": s["population_pairs"],
        "true_precision": true["population_precision"],
        "estimated_precision": s["estimated_precision"],
        "estimated_interval": s["estimated_precision_interval"],
        "yield_vs_naive": s["yield_vs_naive"],
        "group_fdr_observed": fdr["observed"],
        "group_fdr_expected": fdr["expected"],
        "phi": (s["calibration"] or {}).get("phi"),
        "half_agreement": (s["calibration"] or {}).get("half_agreement"),
        "user_pairs": true["user_pairs"],
        "user_true_precision": true["user_precision"],
        "user_estimated_precision": s.get("user_estimated_precision"),
        "user_estimated_interval": s.get("user_estimated_precision_interval"),
        "boosters": f"{bots['by_kind'].get('booster', {}).get('caught', 0)}/{bots['by_kind'].get('booster', {}).get('total', 0)}",
        "people_flagged": sum(bots["false_flags_by_rule"].values()),
        "wall_s": wall,
        "cpu_s": cpu,
        **oracle_yield(social, truth),
    }


def sweep_table(rows: list[dict]) -> str:
    def iv(x):
        return "-" if not x else f"{x[0]:.3f}-{x[1]:.3f}"

    lines = [
        "| log | events | pairs | true precision | estimated (95%) | yield vs naive | oracle yield at 0.95 | one-group FDR: yield (true) | per-group FDR: observed (expected) | phi | per-user pairs | per-user true | per-user estimated (95%) | boosters caught | people flagged | build CPU s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['log']} | {r['events']:,} | {r['pairs']:,} | {_fmt(r['true_precision'])} | "
            f"{_fmt(r['estimated_precision'])} ({iv(r['estimated_interval'])}) | {_fmt(r['yield_vs_naive'])} | "
            f"{_fmt(r['oracle_yield'])} | {_fmt(r['one_group_fdr_yield'])} ({_fmt(r['one_group_fdr_true_precision'])}) | "
            f"{_fmt(r['group_fdr_observed'])} ({_fmt(r['group_fdr_expected'])}) | "
            f"{_fmt(r['phi'], 2)} | {r['user_pairs']:,} | {_fmt(r['user_true_precision'])} | "
            f"{_fmt(r['user_estimated_precision'])} ({iv(r['user_estimated_interval'])}) | {r['boosters']} | {r['people_flagged']} | {r['cpu_s']:.1f} |"
        )
    return "\n".join(lines)


OLD_BUILD = r"""
import json, sys, time
from pathlib import Path
from pipeline.social import SocialConfig, build_social_pairs
social, out, exports = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
cfg = SocialConfig(export_webdataset=exports, export_pickapic=exports)
t, c = time.perf_counter(), time.process_time()
r = build_social_pairs(social, out, cfg, baseline=True)
import pyarrow.parquet as pq
pq.write_table(r.baseline, out / "baseline_pairs.parquet")
print(json.dumps({"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                  "bots_flagged": r.stats["bots_flagged"], "events_in": r.stats["events_in"]}))
"""


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _with_user(t: pa.Table) -> pa.Table:
    return t if "user_id" in t.column_names else t.append_column("user_id", pa.nulls(t.num_rows, pa.string()))


def _pairs_report(pairs: pa.Table, naive: pa.Table, truth: Path) -> dict:
    ours = precision(pairs, truth)
    base = precision(_with_user(naive), truth)
    return {
        "population_pairs": ours["population_pairs"],
        "population_precision": ours["population_precision"],
        "naive_pairs": base["population_pairs"],
        "naive_precision": base["population_precision"],
        "yield_vs_naive": ours["population_pairs"] / max(base["population_pairs"], 1),
        "user_pairs": ours["user_pairs"],
        "user_precision": float(ours["user_precision"]),
    }


def run_after(social: Path, truth: Path, out: Path | None, exports: bool) -> dict:
    cfg = SocialConfig(export_webdataset=exports, export_pickapic=exports)
    t, c = time.perf_counter(), time.process_time()
    r = build_social_pairs(social, out, cfg, baseline=True)
    res = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
    res |= _pairs_report(r.pairs, r.baseline, truth)
    res["bots"] = bot_detection(r.bots, truth)
    res["bots_flagged"] = r.stats["bots_flagged"]
    res["expected_fdr"] = r.stats["expected_fdr"]
    res["prior"] = r.stats["prior"]
    if exports and out is not None:
        res["export"] = export_report(out / "pickapic", out, truth)
        res["per_user_export"] = export_report(out / "per_user" / "pickapic", out, truth)
    return res


def run_before(code: Path, social: Path, truth: Path, out: Path, exports: bool) -> dict:
    """The old commit's builder in a subprocess (its own package first on sys.path), then the same
    measurements on what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", OLD_BUILD, str(social), str(out), "1" if exports else "0"],
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    pairs = pq.read_table(out / "social_pairs.parquet")
    res |= _pairs_report(pairs, pq.read_table(out / "baseline_pairs.parquet"), truth)
    if exports:
        res["export"] = export_report(out / "pickapic", out, truth)
    return res


def checkout(commit: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _ranked_candidates(
    social: Path, truth: Path, weights: dict | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Every candidate pair the build tests (all kept: fdr_level 0.49, min_prob 0.5), ranked by its
    posterior P(winner >= min_ratio x loser), most certain first: whether each is truly the right
    way round (simulator truth), that posterior, and the naive rule's pair count."""
    kw = {} if weights is None else {"weights": weights}
    cfg = SocialConfig(
        export_webdataset=False, export_pickapic=False, user_pairs=False, fdr_level=0.49, min_prob=0.5, **kw
    )
    r = build_social_pairs(social, None, cfg, baseline=True)
    pop = r.pairs.filter(pc.equal(r.pairs.column("kind"), "population")).to_pydict()
    quality = {i: q for i, (q, _) in load_truth(truth)[0].items()}
    ok = np.array([quality[w] > quality[l_] for w, l_ in zip(pop["winner_image_id"], pop["loser_image_id"])])
    p = np.array(pop["prob_margin"], dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    return ok[order], p[order], r.baseline.num_rows


def precision_at_yield(social: Path, truth: Path, weights: dict | None, target: float = 0.6) -> dict:
    """The top target x naive candidate pairs by posterior: their precision. Compares weightings
    at an equal yield."""
    ok, _, naive = _ranked_candidates(social, truth, weights)
    k = int(target * naive)
    return {"pairs": k, "precision": float(ok[:k].mean()) if 0 < k <= ok.size else None}


def oracle_yield(social: Path, truth: Path, level: float = 0.95) -> dict:
    """Two references for the per-group FDR rule's yield, both over the same ranked candidates:
    - oracle: the most pairs the posterior's ranking gives at a true precision >= level, the cut
      set with the simulator's truth (the longest such prefix, all prompt groups at once): the
      ceiling of any cut on this posterior;
    - one_group: the FDR rule from the log alone, but over all groups at once and without the
      min_prob guard (the longest prefix whose mean posterior error is <= 1 - level), with its true
      precision: what the per-group requirement and the guard cost."""
    ok, p, naive = _ranked_candidates(social, truth)
    n = np.arange(1, ok.size + 1)
    hit = np.flatnonzero(np.cumsum(ok) / n >= level)
    k = int(hit[-1] + 1) if hit.size else 0
    fdr_ok = np.flatnonzero(np.cumsum(1.0 - p) / n <= 1.0 - level)
    g = int(fdr_ok[-1] + 1) if fdr_ok.size else 0
    return {
        "oracle_pairs": k,
        "oracle_yield": k / naive if naive else None,
        "one_group_fdr_yield": g / naive if naive else None,
        "one_group_fdr_true_precision": float(ok[:g].mean()) if g else None,
        "candidates": int(ok.size),
        "candidates_precision": float(ok.mean()) if ok.size else None,
    }


def _median_runs(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def _export_rows(label: str, e: dict | None) -> str:
    if not e:
        return f"| {label} | - | - | - | - |"
    return (
        f"| {label} | {e['rows']:,} | {e['distinct_pairs']:,} | {e['contradicting_pairs']:,} pairs, "
        f"{e['rows_in_contradicting_pairs']:,} rows | {_fmt(e['precision'])} |"
    )


def _bots_line(b: dict) -> str:
    kinds = ", ".join(f"{k} {v['caught']}/{v['total']}" for k, v in b["by_kind"].items())
    false = sum(b["false_flags_by_rule"].values())
    return f"caught {kinds}; {false} of {b['people']:,} people flagged ({b['false_flags_by_rule'] or 'none'})"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exports", action="store_true", help="write and measure the exports (timed)")
    ap.add_argument("--before-commit", default="b7335c2", help="earlier code to compare with ('' to skip)")
    ap.add_argument("--held-out", action="store_true", help="also the held-out logs (one run each)")
    ap.add_argument("--held-out-events", type=int, default=1_000_000)
    ap.add_argument("--weights", action="store_true", help="compare engagement weightings")
    ap.add_argument(
        "--sweep", action="store_true", help="only the simulator sweep: estimated vs true precision"
    )
    ap.add_argument("--sweep-events", type=int, default=300_000, help="log size of the sweep's settings")
    ap.add_argument(
        "--sweep-sizes", default="30000,200000,1000000", help="default-setting logs of these sizes too"
    )
    ap.add_argument("--sweep-only", default="", help="';'-separated substrings: run only matching settings")
    ap.add_argument("--workdir", type=Path, default=None, help="where logs and outputs go (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the simulated logs and outputs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_social_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        return run_sweep(args, work)
    old_code = checkout(args.before_commit, work / "before_code") if args.before_commit else None

    def simulated(name: str, cfg: SimConfig) -> tuple[Path, Path, dict, float]:
        social, truth = work / name / "social", work / name / "truth"
        if social.exists():
            shutil.rmtree(work / name)
        t = time.perf_counter()
        s = simulate(social, truth, cfg)
        return social, truth, s, time.perf_counter() - t

    social, truth, summary, sim_s = simulated("main", SimConfig(n_events=args.events, seed=args.seed))
    print(
        f"simulated {summary['events']:,} events, {summary['images']:,} images, {summary['users']:,} users, "
        f"{summary['bots']} bots {summary['bots_by_kind']} in {sim_s:.1f}s",
        flush=True,
    )
    after_runs, before_runs = [], []
    for rep in range(args.repeats):
        out = work / "main" / f"after_{rep}"
        a = run_after(social, truth, out if args.exports else None, args.exports)
        after_runs.append(a)
        msg = f"run {rep + 1}/{args.repeats}: after {a['wall_s']:.1f}s wall {a['cpu_s']:.1f}s CPU"
        if old_code is not None:
            b = run_before(old_code, social, truth, work / "main" / f"before_{rep}", args.exports)
            before_runs.append(b)
            msg += f"; before {b['wall_s']:.1f}s wall {b['cpu_s']:.1f}s CPU"
        print(msg, flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "main" / f"before_{rep}", ignore_errors=True)

    held_out = {}
    if args.held_out:
        for name, params in HELD_OUT.items():
            s_dir, t_dir, s_sum, _ = simulated(
                f"held_{params['seed']}", SimConfig(n_events=args.held_out_events, **params)
            )
            entry = {"params": params, "events": s_sum["events"]}
            entry["after"] = run_after(s_dir, t_dir, work / f"held_{params['seed']}" / "after", True)
            if old_code is not None:
                entry["before"] = run_before(
                    old_code, s_dir, t_dir, work / f"held_{params['seed']}" / "before", True
                )
            held_out[name] = entry
            print(f"held-out {name}: done", flush=True)
            if not args.keep:
                shutil.rmtree(work / f"held_{params['seed']}", ignore_errors=True)

    weights = {}
    if args.weights:
        for name, w in (
            ("breadth first (default)", None),
            ("remix first (before)", {"click": 0.25, "like": 0.5, "save": 0.6, "share": 0.7, "remix": 1.0}),
            ("equal", {"click": 1.0, "like": 1.0, "save": 1.0, "share": 1.0, "remix": 1.0}),
        ):
            weights[name] = precision_at_yield(social, truth, w)

    after_m = _median_runs(after_runs)
    before_m = _median_runs(before_runs) if before_runs else None
    result = {
        "benchmark": "social_pairs",
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "duckdb_threads": "default (= cores) on both sides",
        "events": summary["events"],
        "images": summary["images"],
        "users": summary["users"],
        "bots": summary["bots_by_kind"],
        "simulate_s": sim_s,
        "repeats": args.repeats,
        "exports": args.exports,
        "before_commit": args.before_commit or None,
        "config": SocialConfig().to_dict(),
        "after": {"median": after_m, "runs": after_runs},
        "before": {"median": before_m, "runs": before_runs} if before_runs else None,
        "held_out": held_out,
        "weights_at_0.6x_naive": weights,
    }

    a0, b0 = after_runs[0], before_runs[0] if before_runs else None
    lines = [
        (
            f"Social pairs on {summary['events']:,} simulated events ({summary['images']:,} images, "
            f"{summary['users']:,} users, bots {summary['bots_by_kind']}); {os.cpu_count()}-core {_cpu()}; "
            f"median of {args.repeats}; exports {'on' if args.exports else 'off'}"
        ),
        "",
        "| code | population pairs | precision | yield vs naive | per-user pairs | per-user precision | wall s | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        (
            f"| this code | {after_m['population_pairs']:,.0f} | {after_m['population_precision']:.3f} | "
            f"{after_m['yield_vs_naive']:.3f} | {after_m['user_pairs']:,.0f} | {after_m['user_precision']:.3f} | "
            f"{after_m['wall_s']:.1f} | {after_m['cpu_s']:.1f} |"
        ),
    ]
    if before_m:
        lines.append(
            f"| {args.before_commit} | {before_m['population_pairs']:,.0f} | {before_m['population_precision']:.3f} | "
            f"{before_m['yield_vs_naive']:.3f} | {before_m['user_pairs']:,.0f} | {before_m['user_precision']:.3f} | "
            f"{before_m['wall_s']:.1f} | {before_m['cpu_s']:.1f} |"
        )
    lines.append(
        f"| naive (raw remix, then likes) | {after_m['naive_pairs']:,.0f} | {after_m['naive_precision']:.3f} | 1.000 | - | - | - | - |"
    )
    if args.exports:
        lines += [
            "",
            "| default Pick-a-Pic export, train split | rows | distinct image pairs | with both winners | precision |",
            "|---|---:|---:|---:|---:|",
            _export_rows("this code", a0.get("export")),
        ]
        if b0:
            lines.append(_export_rows(args.before_commit, b0.get("export")))
        lines.append(_export_rows("this code, per_user/ export (users pooled)", a0.get("per_user_export")))
    lines += ["", "bots, this code: " + _bots_line(a0["bots"])]
    if b0:
        lines.append(f"bots, {args.before_commit}: {b0['bots_flagged']} accounts flagged")
    if held_out:
        lines += [
            "",
            (
                "| held-out log | code | export rows | distinct pairs | with both winners | export precision | "
                "population precision | yield vs naive | per-user precision | bots caught |"
            ),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, e in held_out.items():
            for code, r in (("this code", e["after"]), (args.before_commit, e.get("before"))):
                if r is None:
                    continue
                ex = r.get("export") or {}
                bots = (
                    ", ".join(f"{k} {v['caught']}/{v['total']}" for k, v in r["bots"]["by_kind"].items())
                    if "bots" in r
                    else f"{r['bots_flagged']} flagged"
                )
                lines.append(
                    f"| {name} ({e['events']:,} events) | {code} | {_fmt(ex.get('rows'))} | {_fmt(ex.get('distinct_pairs'))} | "
                    f"{_fmt(ex.get('contradicting_pairs'))} | {_fmt(ex.get('precision'))} | "
                    f"{r['population_precision']:.3f} | {r['yield_vs_naive']:.3f} | {r['user_precision']:.3f} | {bots} |"
                )
    if weights:
        lines += ["", "| engagement weights | precision at 0.6x the naive yield |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v['precision'])} |" for k, v in weights.items()]
    table = "\n".join(lines)
    print(table)
    result["markdown"] = table
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_social_{summary['events']}{'_exports' if args.exports else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def run_sweep(args, work: Path) -> dict:
    settings = [(n, {"n_events": args.sweep_events, **kw}) for n, kw in SWEEP]
    # below 100k events the default bot farm (>= 2 fast bots of ~28k events each) would be the
    # whole log: those sizes run without farm bots (rings and boosters stay)
    settings += [
        (
            f"defaults, seed 0, {n:,} events" + (", no farm bots" if n < 100_000 else ""),
            {"seed": 0, "n_events": n, **({"n_bots": 0} if n < 100_000 else {})},
        )
        for n in (int(x) for x in args.sweep_sizes.split(",") if x)
    ]
    if args.sweep_only:
        keys = args.sweep_only.split(";")
        settings = [(n, kw) for n, kw in settings if any(k in n for k in keys)]
    rows = []
    for name, kw in settings:
        d = work / f"sweep_{len(rows)}"
        simulate(d / "social", d / "truth", SimConfig(**kw))
        rows.append(sweep_row(name, d / "social", d / "truth", kw["n_events"]))
        print(json.dumps(rows[-1], default=str), flush=True)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    table = sweep_table(rows)
    print(table)
    result = {
        "benchmark": "social_sweep",
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "load_1min": os.getloadavg()[0]},
        "config": SocialConfig().to_dict(),
        "rows": rows,
        "markdown": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_social_sweep.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
