"""Pictures of the multi-identity dataset for the UI: a contact sheet of samples (target with numbered
boxes, references beside it, scores under them) and similarity histograms."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from pipeline.decode import upright

ROW_H = 256
REF_W = 160
COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return upright(im).convert("RGB")


def contact_sheet(samples: list[dict], read_bytes) -> bytes:
    """PNG bytes: one row per sample. Needs ``read_bytes(uid)`` for the original images."""
    font = ImageFont.load_default()
    rows = []
    for s in samples:
        tgt = _open(read_bytes(s["target"]["uid"]))
        scale = ROW_H / tgt.height
        tw = max(1, round(tgt.width * scale))
        timg = tgt.resize((tw, ROW_H), Image.BILINEAR)
        d = ImageDraw.Draw(timg)
        tiles = []
        for pi, f in enumerate(s["faces"]):
            col = COLORS[pi % len(COLORS)]
            x1, y1, x2, y2 = (v * scale for v in f["bbox"])
            d.rectangle([x1, y1, x2, y2], outline=col, width=3)
            d.text((x1 + 2, max(0, y1 - 12)), f"P{pi} {f['identity_id'][:14]}", fill=col, font=font)
            for r in f["refs"]:
                rimg = _open(read_bytes(r["uid"]))
                x1, y1, x2, y2 = r["bbox"]
                m = 0.4 * max(x2 - x1, y2 - y1)
                crop = rimg.crop((round(x1 - m), round(y1 - m), round(x2 + m), round(y2 + m))).resize((REF_W, REF_W), Image.BILINEAR)
                tile = Image.new("RGB", (REF_W, ROW_H), (255, 255, 255))
                tile.paste(crop, (0, 0))
                td = ImageDraw.Draw(tile)
                td.rectangle([0, 0, REF_W - 1, REF_W - 1], outline=col, width=3)
                lines = [f"P{pi} {r['member']}", f"sim {r['similarity']:.3f}", f"imgH {r['image_hamming']} faceH {r['face_hamming']}",
                         f"ncc {r['face_ncc']:.3f} q {r['quality']:.2f}", f"pose {r['pose_diff']:.1f} deg", r["uid"][:16]]
                for li, t in enumerate(lines):
                    td.text((3, REF_W + 3 + 15 * li), t, fill=(0, 0, 0), font=font)
                tiles.append(tile)
        w = tw + REF_W * len(tiles) + 4 * len(tiles)
        row = Image.new("RGB", (w, ROW_H + 16), (255, 255, 255))
        row.paste(timg, (0, 16))
        ImageDraw.Draw(row).text((2, 2), f"{s['key'][:16]} [{s['split']}] target {s['target']['uid'][:16]}", fill=(0, 0, 0), font=font)
        x = tw + 4
        for t in tiles:
            row.paste(t, (x, 16))
            x += REF_W + 4
        rows.append(row)
    if not rows:
        rows = [Image.new("RGB", (320, 40), (255, 255, 255))]
        ImageDraw.Draw(rows[0]).text((4, 12), "no samples", fill=(0, 0, 0), font=font)
    W = max(r.width for r in rows)
    sheet = Image.new("RGB", (W, sum(r.height + 6 for r in rows)), (235, 235, 235))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 6
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


def similarity_histograms(pairs, candidates) -> dict[str, bytes]:
    """Selected target-reference cosines, and every candidate's cosine by the filter outcome."""
    from pipeline.viz import histogram_png

    sims = pairs.column("similarity").to_pylist() if "similarity" in pairs.column_names else []
    figs = {}
    if sims:
        figs["target_reference_similarity"] = histogram_png({"selected": sims}, "Target-reference cosine", "cosine")
    if candidates.num_rows:
        import pyarrow.compute as pc

        # one array per outcome (in order of first appearance), not a Python float per candidate: ~58 a photo
        sim, status = candidates.column("similarity"), candidates.column("status")
        by_status = {st: pc.filter(sim, pc.equal(status, st)).to_numpy() for st in pc.unique(status).to_pylist()}
        figs["candidate_similarity"] = histogram_png(by_status, "Candidate cosine by outcome", "cosine")
    return figs
