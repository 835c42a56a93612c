"""Small helpers that turn pipeline results into Dagster metadata."""

from __future__ import annotations

import dagster as dg

from pipeline.viz import md_png


def pictures(figs: dict[str, bytes]) -> dict[str, dg.MetadataValue]:
    return {name: dg.MetadataValue.md(md_png(png, name)) for name, png in figs.items()}


def table_preview(rows: list[dict], limit: int = 20) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("(empty)")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows[:limit]:
        lines.append("| " + " | ".join(str(r[c])[:40] for c in cols) + " |")
    return dg.MetadataValue.md("\n".join(lines))
