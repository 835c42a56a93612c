"""A short summary of what the catalog holds, printed after `make run` / `make demo`."""

from __future__ import annotations

import json

from pipeline.catalog import query, refresh_catalog
from pipeline.config import Layout


def print_summary(layout: Layout, seconds: float) -> None:
    views = refresh_catalog(layout)
    print(f"\nlineup built in {seconds:.1f} s; catalog {layout.catalog}")
    for v in views:
        n = query(layout, f'SELECT count(*) AS n FROM "{v}"').column("n")[0].as_py()
        print(f"  {v:<28} {n:>8} rows")
    if "rejects" in views:
        rows = query(layout, "SELECT stage, reason, count(*) AS n FROM rejects GROUP BY ALL ORDER BY n DESC").to_pylist()
        if rows:
            print("  rejects by reason:")
            for r in rows:
                print(f"    {r['stage']:<8} {r['reason']:<32} {r['n']}")
    if layout.datasets.exists():
        print("  datasets (latest versions):")
        for latest in sorted(layout.datasets.glob("*/LATEST")):
            folder = latest.parent / latest.read_text().strip()
            for m in sorted(folder.glob("**/manifest.json")):
                info = json.loads(m.read_text())
                print(f"    {m.parent.relative_to(layout.home)}: {info.get('num_samples', '?')} samples")
