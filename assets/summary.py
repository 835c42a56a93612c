"""The closing summary of `make run` / `make demo`: what was built, skipped (and why) and failed, and
what the catalog and the published datasets now hold."""

from __future__ import annotations

import json

from pipeline.catalog import query, refresh_catalog
from pipeline.config import Layout
from pipeline.datasets import latest_version


def print_summary(layout: Layout, seconds: float, outcome=None) -> None:
    views = refresh_catalog(layout)
    print(f"\nlineup finished in {seconds:.1f} s; catalog {layout.catalog}")
    if outcome is not None:
        print(f"  built ({len(outcome.built)}):")
        for key, note in sorted(outcome.built.items()):
            print(f"    {key}{'  ' + note if note else ''}")
        print(f"  skipped ({len(outcome.skipped)}):")
        for key, why in sorted(outcome.skipped.items()):
            print(f"    {key}: {why}")
        print(f"  failed ({len(outcome.failed)}):" + ("" if outcome.failed else " none"))
        for key, why in sorted(outcome.failed.items()):
            print(f"    {key}: {why}")
    print("  tables:")
    for v in views:
        n = query(layout, f'SELECT count(*) AS n FROM "{v}"').column("n")[0].as_py()
        print(f"    {v:<28} {n:>8} rows")
    if "rejects" in views:
        rows = query(layout, "SELECT stage, reason, count(*) AS n FROM rejects GROUP BY ALL ORDER BY n DESC, reason").to_pylist()
        if rows:
            print("  rejects by reason:")
            for r in rows:
                print(f"    {r['stage']:<8} {r['reason']:<32} {r['n']}")
    if layout.datasets.exists():
        print("  datasets (latest published versions):")
        for folder in sorted(p for p in layout.datasets.iterdir() if p.is_dir()):
            version = latest_version(layout, folder.name)
            if version is None:
                print(f"    {folder.name}: no published version")
                continue
            for m in sorted((folder / version).glob("**/manifest.json")):
                info = json.loads(m.read_text())
                print(f"    {m.parent.relative_to(layout.root)}: {info.get('num_samples', '?')} samples")
