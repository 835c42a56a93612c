"""Pictures of a social build for the UI: evidence histograms and a sheet of example pairs."""

from __future__ import annotations

import io

from PIL import Image

from pipeline.viz import contact_sheet, histogram_png


def pair_figures(result, n_pairs: int = 8) -> dict[str, bytes]:
    pairs = result.pairs
    figs: dict[str, bytes] = {}
    pop = [
        p
        for p, k in zip(pairs.column("prob").to_pylist(), pairs.column("kind").to_pylist())
        if k == "population" and p is not None
    ]
    figs["posterior_probability"] = histogram_png(
        {"population pairs": pop},
        "P(engagement of winner > loser, relative to audience)",
        "posterior probability",
    )
    exp = pairs.column("winner_exposure").to_pylist() + pairs.column("loser_exposure").to_pylist()
    figs["exposure"] = histogram_png(
        {"paired images": [e for e in exp if e is not None]},
        "Exposures of paired images (distinct users shown)",
        "exposures",
    )
    paths = {}
    if "path" in result.images.column_names:
        paths = dict(
            zip(result.images.column("image_id").to_pylist(), result.images.column("path").to_pylist())
        )
    tiles = []
    for r in pairs.to_pylist()[:n_pairs]:
        for side, label in (("winner", "preferred"), ("loser", "other")):
            p = paths.get(r[f"{side}_image_id"])
            try:
                im = Image.open(p) if p else None
                im = im.convert("RGB") if im else Image.new("RGB", (64, 64), (60, 60, 60))
            except OSError:
                im = Image.new("RGB", (64, 64), (60, 60, 60))
            prob = "" if r["prob"] is None else f" p={r['prob']:.3f}"
            tiles.append((im, f"{label}{prob}\n{(r['prompt'] or '')[:20]}"))
    figs["example_pairs"] = contact_sheet(tiles, cols=4, tile=110)
    return figs


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
