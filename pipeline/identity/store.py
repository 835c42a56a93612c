"""The IVF cells kept next to the identities table (``tables/identities.ivf.npz``).

An incremental refresh searches its new faces through these cells (identity/knn.py
``knn_ivf_search``); each face's cell is the ``ivf_cell`` column of the identities table. The cells
are written before the table, so a table never names cells that are not on disk; a table whose
cells are missing or do not match gets new cells at the next refresh (``build_identities``).
"""

from __future__ import annotations

from .knn import IvfIndex

INDEX_FILE = "identities.ivf.npz"


def ivf_index_path(layout):
    return layout.tables / INDEX_FILE


def read_ivf_index(layout) -> IvfIndex | None:
    """The kept cells, or None when there are none or the file cannot be read (they are retrained)."""
    path = ivf_index_path(layout)
    try:
        if not path.exists():
            return None
        with path.open("rb") as f:
            return IvfIndex.from_bytes(f.read())
    except Exception:  # noqa: BLE001  unreadable, truncated (zipfile.BadZipFile) or foreign: retrained, which is only slower
        return None


def write_ivf_index(layout, index: IvfIndex | None) -> None:
    """Keep ``index``; with None (a small collection, an exact search) remove stale cells."""
    from pipeline.storage import is_remote, write_bytes_atomic

    path = ivf_index_path(layout)
    if index is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(index.to_bytes(), path)
    elif path.exists():
        if is_remote(path):
            path.fs.rm(path.path)
        else:
            path.unlink()
