"""A dataset version's viewer: one static, self-contained HTML page beside its card.

``write_viewer(folder)`` reads what a version folder holds, after its card is written and before it is
published, and writes ``viewer.html``: the filters with their counts (the card's Filters section), a
sample grid read back from the WebDataset tars themselves (a multi-identity target photo with its
reference crops, a preference pair with its posterior and which image won, an expression pair with
its label), histograms of the numeric columns of the version's pairs table, and the whole card.
Pictures are inlined as small JPEG/PNG data URIs, so the page opens from disk or from any server,
and it is part of the version: removed and purged with it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import tarfile
from pathlib import Path

VIEWER_PAGE = "viewer.html"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
PAIRS_TABLES = ("pairs.parquet", "social_pairs.parquet")  # the version's one-row-per-sample table
# per sample, the fields a person wants to see first (label, posterior, identities); others follow
FIRST_FIELDS = ("expression", "winner", "posterior", "kind", "caption", "identity_a", "identity_b", "identity_cosine",
                "expression_similarity", "people", "similarity")
SKIP_FIELDS = ("embedding", "landmarks", "uids", "bbox", "crop_box", "bbox_in_crop")


def _strip_front_matter(text: str) -> str:
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            return text[end + 4:].lstrip("\n")
    return text


def render_markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    # html=False: a card's text (captions, sources) never becomes markup
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(_strip_front_matter(text))


def card_section(card: str, title: str) -> str | None:
    """The body of the card's `## <title>` section, or None."""
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", card, flags=re.MULTILINE | re.DOTALL)
    return m.group(1).strip() if m else None


def _thumb_uri(data: bytes, max_side: int) -> str | None:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):  # an unreadable member is shown as missing
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def read_samples(folder: Path, limit: int) -> list[dict]:
    """The first ``limit`` samples of the version's tars (sorted by path): key, tar, images, json."""
    out: list[dict] = []
    for tar_path in sorted(Path(folder).rglob("*.tar")):
        try:
            # closed by the `with tf:` below; opened apart from it so that only the open's error skips the shard
            tf = tarfile.open(tar_path)  # noqa: SIM115
        except (tarfile.TarError, OSError):  # a damaged shard: the version's checks report it, the page skips it
            continue
        with tf:
            by_key: dict[str, dict] = {}
            order: list[str] = []
            for m in tf.getmembers():
                if not m.isfile() or "." not in m.name:
                    continue
                key, ext = m.name.split(".", 1)
                if key not in by_key:
                    if len(order) >= limit - len(out):
                        break
                    by_key[key] = {"key": key, "tar": tar_path.relative_to(folder).as_posix(), "images": {}, "json": {}}
                    order.append(key)
                data = tf.extractfile(m).read()
                if ext == "json":
                    try:
                        by_key[key]["json"] = json.loads(data)
                    except ValueError:
                        by_key[key]["json"] = {"(unreadable json)": True}
                elif ext.lower().endswith(IMAGE_EXTS):
                    by_key[key]["images"][ext] = data
        out.extend(by_key[k] for k in order)
        if len(out) >= limit:
            break
    return out[:limit]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def sample_fields(meta: dict) -> dict[str, str]:
    """What a sample's json says, flattened for a caption: the label and evidence first."""
    flat: dict[str, str] = {}
    if "label_0" in meta and "label_1" in meta:  # a preference pair: which image won
        flat["winner"] = "image 1" if meta.get("label_1") else "image 0"
    evidence = meta.get("evidence") if isinstance(meta.get("evidence"), dict) else {}
    if evidence.get("prob") is not None:
        flat["posterior"] = _fmt(evidence["prob"])
    faces = meta.get("faces") if isinstance(meta.get("faces"), list) else []
    if faces:  # a multi-identity target: each person and their references' similarity
        flat["people"] = str(len(faces))
        sims = [r.get("similarity") for f in faces if isinstance(f, dict) for r in f.get("refs", []) if isinstance(r, dict)]
        if sims := [s for s in sims if isinstance(s, (int, float))]:
            flat["similarity"] = ", ".join(f"{s:.3f}" for s in sims)
    for k, v in meta.items():
        if k in SKIP_FIELDS or isinstance(v, (dict, list)) or v is None:
            continue
        flat.setdefault(k, _fmt(v))
    first = [k for k in FIRST_FIELDS if k in flat]
    return {k: flat[k] for k in first + [k for k in flat if k not in first]}


def _image_order(ext: str) -> tuple:
    name = ext.rsplit(".", 1)[0]
    return (0 if name in ("target", "a", "0") else 1, name)


def numeric_histograms(folder: Path, max_columns: int = 6) -> dict[str, bytes]:
    """A histogram per floating-point column of the version's pairs table (the first that exists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.viz import histogram_png

    for name in PAIRS_TABLES:
        path = Path(folder) / name
        if path.exists():
            table = pq.read_table(path)
            import numpy as np

            values = {f.name: table.column(f.name).to_numpy(zero_copy_only=False).astype(float)
                      for f in table.schema if pa.types.is_floating(f.type)}
            shown = [c for c, v in values.items() if np.isfinite(v).any()][:max_columns]  # an all-null column says nothing
            return {c: histogram_png({name: values[c]}, c, c, size=(4.0, 2.6)) for c in shown}
    return {}


_CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:12px}.sample{border:1px solid #ccc;border-radius:6px;padding:8px;width:360px}
.sample img{max-height:160px;max-width:170px;margin:2px;border:1px solid #eee}.sample dl{font-size:12px;margin:4px 0}
.sample dt{font-weight:600;display:inline}.sample dd{display:inline;margin:0 8px 0 4px;overflow-wrap:anywhere}.sample{overflow:hidden}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
.hist img{margin:4px}.muted{color:#777}"""


def render_viewer(folder: Path, title: str, n_samples: int = 12) -> str:
    folder = Path(folder)
    card_path = folder / "README.md"
    card = card_path.read_text(encoding="utf-8") if card_path.exists() else ""
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")]
    filters = card_section(card, "Filters")
    parts.append("<h2>Filters</h2>" + (render_markdown(filters) if filters else "<p class=muted>The card lists no filters.</p>"))
    samples = read_samples(folder, n_samples)
    parts.append(f"<h2 id=samples>Samples</h2><p class=muted>The first {len(samples)} samples of the tars, read back from disk.</p>")
    if not samples:
        parts.append("<p class=muted>This version holds no samples.</p>")
    parts.append("<div class=grid>")
    for s in samples:
        imgs = []
        for ext in sorted(s["images"], key=_image_order):
            uri = _thumb_uri(s["images"][ext], 320)
            label = html.escape(ext.rsplit(".", 1)[0])
            imgs.append(f"<figure style='display:inline-block;margin:2px'><img class=sample-image alt='{label}' src='{uri}'>"
                        f"<figcaption>{label}</figcaption></figure>" if uri else f"<span class=muted>{label}: unreadable</span>")
        fields = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v[:120])}</dd>" for k, v in sample_fields(s["json"]).items())
        parts.append(f"<div class=sample><div>{''.join(imgs)}</div><dl>{fields}</dl>"
                     f"<div class=muted>{html.escape(s['tar'])} / {html.escape(s['key'])}</div></div>")
    parts.append("</div>")
    hists = numeric_histograms(folder)
    parts.append("<h2>Histograms</h2>" + ("<div class=hist>" + "".join(
        f"<img alt='{html.escape(n)}' src='data:image/png;base64,{base64.b64encode(p).decode()}'>" for n, p in hists.items())
        + "</div>" if hists else "<p class=muted>No numeric columns to show.</p>"))
    parts.append("<h2>Dataset card</h2>" + (render_markdown(card) if card else "<p class=muted>No card.</p>"))
    parts.append("</body></html>")
    return "".join(parts)


def write_viewer(folder: Path, title: str, n_samples: int = 12) -> Path:
    """Write ``viewer.html`` into a (staging) version folder, e.g. title "multiid v-1234"; returns its path."""
    from pipeline.storage import write_bytes_atomic

    path = Path(folder) / VIEWER_PAGE
    write_bytes_atomic(render_viewer(folder, title, n_samples).encode("utf-8"), path)
    return path


def index_page(datasets_root: Path) -> str:
    """An HTML list of every published dataset version that has a viewer page (links relative to it)."""
    rows = []
    root = Path(datasets_root)
    for page in sorted(root.glob(f"*/*/{VIEWER_PAGE}")) if root.is_dir() else []:
        version = page.parent
        if version.name.startswith("."):
            continue  # staging or unpublished
        rel = page.relative_to(root).as_posix()
        rows.append(f'<li><a href="datasets/{html.escape(rel)}">{html.escape(version.parent.name)} '
                    f'{html.escape(version.name)}</a></li>')
    body = "<ul>" + "".join(rows) + "</ul>" if rows else "<p>No published dataset version yet.</p>"
    return f"<!doctype html><meta charset=utf-8><title>lineup datasets</title><h1>Dataset versions</h1>{body}"
