"""Pictures as files under the home, not inside the Dagster event log.

Every picture an asset shows (histograms, contact sheets, review tiles) is written here as a PNG,
and the asset's metadata only links to it. Each picture records the face/image uids whose pixels
it shows in an index beside it, so a removal can delete every picture of a removed person
(`purge_pictures`) and the event log never holds the person's pixels or uids.

Layout, always local (pictures are for people looking at the UI, not data):
    $LINEUP_HOME/pictures/<owner>/<name>.png     owner: asset key, plus partition or version
    $LINEUP_HOME/pictures/index.jsonl            one line per picture written: path, uids shown
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def pictures_dir(home: Path) -> Path:
    return Path(home) / "pictures"


def _index(home: Path) -> Path:
    return pictures_dir(home) / "index.jsonl"


def _safe(part: str) -> str:
    return _SAFE.sub("_", str(part)).strip("._") or "_"


def save_pictures(home: Path, owner: str, figs: dict[str, bytes], shows_uids: Iterable[str] = ()) -> dict[str, Path]:
    """Write each PNG as `pictures/<owner>/<name>.png` (atomically) and record which uids it shows.

    `owner` names who made them (e.g. "faces/p0001" or "multiid_dataset/v-abc"); writing the same
    owner and name again replaces the file. Returns name -> path.
    """
    uids = sorted({str(u) for u in shows_uids})
    folder = pictures_dir(home).joinpath(*[_safe(p) for p in str(owner).split("/")])
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    lines = []
    for name, png in figs.items():
        path = folder / f"{_safe(name)}.png"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)
        out[name] = path
        lines.append(json.dumps({"path": str(path.relative_to(pictures_dir(home))), "uids": uids}))
    if lines:
        with open(_index(home), "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return out


def _read_index(home: Path) -> list[dict]:
    p = _index(home)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a kill: the picture it named is still on disk and purged by path
    return rows


def purge_pictures(home: Path, uids: Iterable[str]) -> list[Path]:
    """Delete every picture that shows any of `uids`, and rewrite the index without them.

    Idempotent: a second call (after a kill, say) deletes what is left and returns what it deleted.
    Pictures the index does not know (written by an older version of this code) are left alone;
    callers that need certainty delete the owner's folder.
    """
    gone = {str(u) for u in uids}
    if not gone:
        return []
    root = pictures_dir(home)
    keep, deleted = [], []
    for row in _read_index(home):
        if gone.intersection(row.get("uids", ())):
            p = root / row["path"]
            if p.exists():
                p.unlink()
            deleted.append(p)
        else:
            keep.append(row)
    if deleted:
        idx = _index(home)
        tmp = idx.with_name(idx.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, idx)
    return deleted
