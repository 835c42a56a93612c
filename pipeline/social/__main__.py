"""python -m pipeline.social demo OUT [--events N] [--seed S]: simulate a community, build its
pairs and exports, and report them against the simulator's truth.
python -m pipeline.social build SOCIAL_DIR OUT: build pairs from a social input folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa

from pipeline.social import SocialConfig, build_social_pairs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.social", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo")
    d.add_argument("out", type=Path)
    d.add_argument("--events", type=int, default=200_000)
    d.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("build")
    b.add_argument("social_dir", type=Path)
    b.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from pipeline.social.evaluate import bot_detection, export_report, precision
        from pipeline.social.simulate import SimConfig, simulate

        s = simulate(
            args.out / "social",
            args.out / "social_truth",
            SimConfig(n_events=args.events, inject_bad=1, seed=args.seed),
        )
        r = build_social_pairs(args.out / "social", args.out / "pairs", SocialConfig(), baseline=True)
        naive = r.baseline.append_column("user_id", pa.nulls(r.baseline.num_rows, pa.string()))
        report = {
            "stats": r.stats,
            "precision": precision(r.pairs, s["truth_dir"]),
            "naive": precision(naive, s["truth_dir"]),
            "exports": {
                name: export_report(args.out / "pairs" / folder, args.out / "pairs", s["truth_dir"])
                for name, folder in (
                    ("pickapic_train", "pickapic"),
                    ("per_user_pickapic_train", "per_user/pickapic"),
                )
            },
            "bots": bot_detection(r.bots, s["truth_dir"]),
        }
    else:
        r = build_social_pairs(args.social_dir, args.out, SocialConfig())
        report = {"stats": r.stats}
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
