"""Benchmark of the social preference-pair builder against the naive rule, on a simulated log.

    .venv/bin/python bench/bench_social.py                      # 10 M events, 3 repeats
    .venv/bin/python bench/bench_social.py --events 1000000 --repeats 1 --exports

Simulates a community (pipeline/social/simulate.py), then runs build_social_pairs `repeats`
times on it (baseline=True computes the naive rule on the same accepted events in the same run)
and reports medians: wall time, precision against the known latent quality (per-user pairs:
the user's utility), yield (pairs per 1000 input events), and the naive rule's precision and
yield. Prints a markdown table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa

from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.evaluate import precision
from pipeline.social.simulate import SimConfig, simulate


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--exports", action="store_true", help="also write WebDataset + Pick-a-Pic exports (timed)"
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the simulated log goes (default: a temp dir)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the simulated log and outputs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument(
        "--ablations",
        action="store_true",
        help="one extra run each without audience strata, without bot exclusion, without self exclusion",
    )
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_social_"))
    social, truth = work / "social", work / "social_truth"
    sim_cfg = SimConfig(n_events=args.events, seed=args.seed)
    t0 = time.perf_counter()
    summary = simulate(social, truth, sim_cfg)
    sim_s = time.perf_counter() - t0
    print(
        f"simulated {summary['events']:,} events, {summary['images']:,} images, {summary['users']:,} users, "
        f"{summary['bots']} bots in {sim_s:.1f}s",
        flush=True,
    )

    cfg = SocialConfig(export_webdataset=args.exports, export_pickapic=args.exports)
    runs = []
    for rep in range(args.repeats):
        out = work / f"out_{rep}" if args.exports else None
        t = time.perf_counter()
        r = build_social_pairs(social, out, cfg, baseline=True)
        wall = time.perf_counter() - t
        ours = precision(r.pairs, truth)
        naive = precision(
            r.baseline.append_column("user_id", pa.nulls(r.baseline.num_rows, pa.string())), truth
        )
        n_ev = r.stats["events_in"]
        run = {
            "wall_s": wall,
            "pairs_s": wall
            - sum(v for k, v in r.stats["timings_s"].items() if k.startswith(("export", "write"))),
            "timings_s": r.stats["timings_s"],
            "events_in": n_ev,
            "population_pairs": ours["population_pairs"],
            "population_precision": ours["population_precision"],
            "population_yield_per_1k": 1000 * ours["population_pairs"] / n_ev,
            "user_pairs": ours["user_pairs"],
            "user_precision": float(ours["user_precision"]),
            "user_yield_per_1k": 1000 * ours["user_pairs"] / n_ev,
            "naive_pairs": naive["population_pairs"],
            "naive_precision": naive["population_precision"],
            "naive_yield_per_1k": 1000 * naive["population_pairs"] / n_ev,
            "bots_flagged": r.stats["bots_flagged"],
            "ties_dropped": r.stats["pairs_dropped_tie"],
            "weak_dropped": r.stats["pairs_dropped_weak"],
            "low_exposure_dropped": r.stats["pairs_dropped_low_exposure"],
        }
        runs.append(run)
        print(
            f"run {rep + 1}/{args.repeats}: {wall:.1f}s, population precision {run['population_precision']:.4f} "
            f"({run['population_pairs']:,} pairs), naive {run['naive_precision']:.4f} ({run['naive_pairs']:,})",
            flush=True,
        )
        if out is not None and not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    ablations = {}
    if args.ablations:
        import dataclasses

        variants = {
            "no_strata": {"stratum_column": None},
            "no_bot_exclusion": {"bot_max_events_per_day": 1e12, "bot_max_positive_ratio": 1e12},
            "no_self_exclusion": {"exclude_self": False},
            "level_0.99": {"level": 0.99},
        }
        for name, change in variants.items():
            c = dataclasses.replace(cfg, export_webdataset=False, export_pickapic=False, **change)
            r = build_social_pairs(social, None, c)
            p = precision(r.pairs, truth)
            ablations[name] = {
                "change": change,
                "population_pairs": p["population_pairs"],
                "population_precision": p["population_precision"],
                "user_pairs": p["user_pairs"],
                "user_precision": float(p["user_precision"]),
            }
            print(
                f"ablation {name}: {p['population_pairs']:,} pairs, precision {p['population_precision']:.4f}; "
                f"user {p['user_pairs']:,} at {float(p['user_precision']):.4f}",
                flush=True,
            )

    def med(key):
        return statistics.median(r[key] for r in runs)

    result = {
        "benchmark": "social_pairs",
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "events": summary["events"],
        "images": summary["images"],
        "users": summary["users"],
        "bots": summary["bots"],
        "simulate_s": sim_s,
        "repeats": args.repeats,
        "exports": args.exports,
        "config": cfg.to_dict(),
        "median": {k: med(k) for k in runs[0] if k != "timings_s"},
        "median_timings_s": {
            k: statistics.median(r["timings_s"][k] for r in runs) for k in runs[0]["timings_s"]
        },
        "runs": runs,
        "ablations": ablations,
    }
    m = result["median"]
    m["yield_vs_naive"] = m["population_pairs"] / max(m["naive_pairs"], 1)
    m["meets_target"] = bool(
        m["population_precision"] >= 0.95 and m["yield_vs_naive"] >= 0.5 and m["wall_s"] < 120
    )

    lines = [
        (
            f"Social pairs on {summary['events']:,} simulated events ({summary['images']:,} images, "
            f"{summary['users']:,} users, {summary['bots']} bots); {result['machine']['cores']}-core "
            f"{result['machine']['cpu']}; median of {args.repeats}; exports {'on' if args.exports else 'off'}"
        ),
        "",
        "| rule | pairs | precision | pairs / 1k events | wall s |",
        "|---|---:|---:|---:|---:|",
        (
            f"| Bayesian, population | {m['population_pairs']:,.0f} | {m['population_precision']:.4f} | "
            f"{m['population_yield_per_1k']:.2f} | {m['wall_s']:.1f} |"
        ),
        f"| Bayesian, per-user | {m['user_pairs']:,.0f} | {m['user_precision']:.4f} | {m['user_yield_per_1k']:.2f} | (same run) |",
        (
            f"| naive (raw remix, then likes) | {m['naive_pairs']:,.0f} | {m['naive_precision']:.4f} | "
            f"{m['naive_yield_per_1k']:.2f} | (same run) |"
        ),
        "",
        (
            f"yield vs naive: {m['yield_vs_naive']:.3f}; target (precision >= 0.95, yield >= 0.5 x naive, < 120 s): "
            f"{'met' if m['meets_target'] else 'NOT met'}"
        ),
        "stage medians (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["median_timings_s"].items()),
    ]
    if ablations:
        lines += [
            "",
            "| ablation (one run) | population pairs | precision | user pairs | user precision |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {v['population_pairs']:,} | {v['population_precision']:.4f} | {v['user_pairs']:,} | "
            f"{v['user_precision']:.4f} |"
            for k, v in ablations.items()
        ]
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


if __name__ == "__main__":
    main()
