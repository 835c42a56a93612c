"""Dataset versions: immutable folders datasets/<name>/<version>/, and a LATEST pointer.

A version id is a hash of the builder's config and of its inputs, so rebuilding from the same
inputs and config lands in the same folder (and can be skipped), while any change makes a new
version and leaves the old shards untouched. Training reads LATEST (or a pinned version).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import Layout
from pipeline.storage import write_bytes_atomic


def fingerprint_rows(rows: Iterable[Iterable]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update("\x1f".join(str(v) for v in row).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def dataset_version(config: dict, *input_fingerprints: str) -> str:
    payload = json.dumps({"config": config, "inputs": list(input_fingerprints)}, sort_keys=True, default=str)
    return "v-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def dataset_dir(layout: Layout, name: str, version: str) -> Path:
    return layout.datasets / name / version


def publish(layout: Layout, name: str, version: str) -> None:
    write_bytes_atomic(version.encode(), layout.datasets / name / "LATEST")


def latest_version(layout: Layout, name: str) -> str | None:
    p = layout.datasets / name / "LATEST"
    return p.read_text().strip() if p.exists() else None


def is_complete(path: Path) -> bool:
    """A version is complete when every split folder has its manifest (written last)."""
    manifests = list(Path(path).glob("**/manifest.json"))
    return bool(manifests)
