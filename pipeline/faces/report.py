"""Pictures of a faces partition for the UI: face-size and detector-score histograms, boxes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.decode import DecodeError
from pipeline.ingest import IngestLimits, load_image
from pipeline.viz import contact_sheet, draw_boxes, histogram_png


def face_figures(faces: pa.Table, images: pa.Table, limits: IngestLimits | None = None, max_images: int = 8) -> dict[str, bytes]:
    """PNG figures for the UI: face-size and detector-score histograms, a contact sheet with boxes."""
    figs: dict[str, bytes] = {}
    if faces.num_rows:
        sizes = np.minimum(np.asarray(faces.column("face_width").to_pylist()), np.asarray(faces.column("face_height").to_pylist()))
        figs["face_sizes"] = histogram_png({"faces": sizes}, "Face size (shorter box side)", "pixels")
        figs["det_scores"] = histogram_png({"faces": faces.column("det_score").to_pylist()}, "Detector score", "score")
    by_uid: dict[str, list[dict]] = {}
    for r in faces.select(["uid", "face_index", "x1", "y1", "x2", "y2", "det_score"]).to_pylist():
        by_uid.setdefault(r["uid"], []).append(r)
    rows = {r["uid"]: r for r in images.to_pylist()}
    tiles = []
    for uid in sorted(by_uid, key=lambda u: (-len(by_uid[u]), u))[:max_images]:
        try:
            rgb = load_image(rows[uid], limits).rgb
        except (DecodeError, OSError, KeyError):
            continue
        fs = by_uid[uid]
        im = draw_boxes(rgb, [(f["x1"], f["y1"], f["x2"], f["y2"]) for f in fs], [str(f["face_index"]) for f in fs])
        tiles.append((im, f"{len(fs)} face(s)\n{rows[uid]['source'][-22:]}"))
    figs["contact_sheet"] = contact_sheet(tiles, cols=4, tile=200)
    return figs
