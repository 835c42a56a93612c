"""Pictures for the Dagster UI: histograms and contact sheets as PNG bytes, embedded as markdown."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def md_png(png: bytes, alt: str = "figure") -> str:
    """Markdown that shows a PNG inline (Dagster renders data-URI images in markdown metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def histogram_png(
    series: dict[str, Sequence[float]],
    title: str,
    xlabel: str,
    bins: int = 30,
    size: tuple[float, float] = (5.0, 3.0),
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=80)
    values = [np.asarray(v, dtype=float) for v in series.values()]
    finite = [v[np.isfinite(v)] for v in values]
    allv = np.concatenate(finite) if finite and sum(len(v) for v in finite) else np.zeros(1)
    edges = np.histogram_bin_edges(allv, bins=bins)
    for (label, _), v in zip(series.items(), finite):
        ax.hist(v, bins=edges, alpha=0.6, label=f"{label} (n={len(v)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if len(series) > 1 or any(series):
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def draw_boxes(rgb: np.ndarray, boxes: Sequence[Sequence[float]], labels: Sequence[str] = (), color=(0, 255, 0)) -> Image.Image:
    im = Image.fromarray(rgb).convert("RGB")
    d = ImageDraw.Draw(im)
    width = max(2, round(max(im.size) / 300))
    for i, b in enumerate(boxes):
        d.rectangle([float(b[0]), float(b[1]), float(b[2]), float(b[3])], outline=color, width=width)
        if i < len(labels) and labels[i]:
            d.text((float(b[0]) + 2, float(b[1]) + 2), str(labels[i]), fill=color, font=_font(max(11, width * 6)))
    return im


def contact_sheet(
    tiles: Sequence[tuple[Image.Image, str]],
    cols: int = 6,
    tile: int = 128,
    caption_height: int = 28,
    background=(24, 24, 24),
) -> bytes:
    """A grid of thumbnails with a caption under each; returns PNG bytes."""
    if not tiles:
        im = Image.new("RGB", (tile * 2, caption_height), background)
        ImageDraw.Draw(im).text((4, 4), "(nothing to show)", fill=(220, 220, 220), font=_font())
    else:
        cols = max(1, min(cols, len(tiles)))
        rows = (len(tiles) + cols - 1) // cols
        im = Image.new("RGB", (cols * tile, rows * (tile + caption_height)), background)
        d = ImageDraw.Draw(im)
        font = _font(10)
        for i, (thumb, caption) in enumerate(tiles):
            t = thumb.convert("RGB").copy()
            t.thumbnail((tile, tile))
            x, y = (i % cols) * tile, (i // cols) * (tile + caption_height)
            im.paste(t, (x + (tile - t.width) // 2, y + (tile - t.height) // 2))
            for j, line in enumerate(str(caption).split("\n")[:2]):
                d.text((x + 3, y + tile + 2 + 12 * j), line[: tile // 6], fill=(230, 230, 230), font=font)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()
