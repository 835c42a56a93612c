"""Partition commit units: everything one stage writes for one partition becomes visible as one unit.

A stage (faces, face_expressions) hands :func:`commit_unit` the tables it computed for a partition. They
are written to a staging folder first (``$LINEUP_HOME/staging/units/<stage>/<key>/``), the stage's
blocking checks read them back from there, and only when every check passed are they moved to
``tables/<table>/<key>.parquet`` and the marker ``tables/_commits/<stage>/<key>.json`` written, last.
The marker names each file with its rows, bytes and sha256, the checks' verdicts and what the unit was
computed from (``inputs``). A unit whose checks failed gets a marker with status ``failed`` and its
reasons; its files stay in staging for inspection, and the partition's previous files of that stage are
removed, so nothing downstream reads data its checks rejected.

Readers (the collection) and the runner trust only markers: a partition whose marker is missing (never
run, or killed between two files), ``failed``, or ``stale`` (computed from other inputs) is left out of
the collection and run again. The old marker is removed before the first file of a new unit is moved
in, so a kill at any point leaves either the old unit whole or no marker at all.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.config import Layout
from pipeline.storage import is_remote, write_bytes_atomic, write_parquet_atomic

COMMITS_DIR = "_commits"
PASSED, FAILED, MISSING, STALE = "passed", "failed", "missing", "stale"

# A check reads the staged files back: {table: path} -> (passed, explanation)
Check = Callable[[Mapping[str, Path]], tuple[bool, str]]


def marker_path(layout: Layout, stage: str, key: str):
    return layout.tables / COMMITS_DIR / stage / f"{key}.json"


def unit_staging(layout: Layout, stage: str, key: str) -> Path:
    """Always local: the checks read the staged files back before anything reaches the store."""
    return layout.home / "staging" / "units" / stage / key


def read_marker(layout: Layout, stage: str, key: str) -> dict | None:
    p = marker_path(layout, stage, key)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (ValueError, OSError):
        return None  # a torn or unreadable marker is no commit: the unit is redone


def unit_state(layout: Layout, stage: str, key: str, inputs: Mapping | None = None) -> str:
    """``passed``, ``failed``, ``missing`` or ``stale`` (passed, but computed from other ``inputs``)."""
    m = read_marker(layout, stage, key)
    if m is None:
        return MISSING
    if m.get("status") != PASSED:
        return FAILED
    if inputs is not None and m.get("inputs") != json.loads(json.dumps(dict(inputs), sort_keys=True, default=str)):
        return STALE
    return PASSED


def committed_keys(layout: Layout, stage: str, keys: list[str]) -> list[str]:
    """The keys whose ``stage`` unit is committed and passed its checks."""
    return [k for k in keys if unit_state(layout, stage, k) == PASSED]


def failed_units(layout: Layout, stage: str, keys: list[str]) -> dict[str, list[str]]:
    """key -> the reasons its last ``stage`` unit failed, for the keys whose marker says failed."""
    out = {}
    for k in keys:
        m = read_marker(layout, stage, k)
        if m is not None and m.get("status") == FAILED:
            out[k] = [f"{n}: {c['detail']}" for n, c in sorted(m.get("checks", {}).items()) if not c["passed"]]
    return out


def file_digest(path) -> dict:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": os.path.getsize(path)}


def _install(src: Path, dest) -> None:
    """Move a staged file to its place in the store (one rename locally; one upload to an object store)."""
    if is_remote(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.fs.put_file(str(src), dest.path)
        return
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError:  # another file system (LINEUP_STORE elsewhere): copy beside it, then rename
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)


def _remove(path) -> None:
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path)
        return
    Path(path).unlink(missing_ok=True)


@dataclass
class UnitResult:
    stage: str
    key: str
    passed: bool
    checks: dict[str, tuple[bool, str]]  # check -> (passed, explanation)
    files: dict[str, dict] = field(default_factory=dict)  # table -> rows, bytes, sha256
    staging: Path | None = None  # where a failed unit's files were kept

    @property
    def reasons(self) -> list[str]:
        return [f"{n}: {why}" for n, (ok, why) in self.checks.items() if not ok]


def commit_unit(layout: Layout, stage: str, key: str, tables: Mapping[str, pa.Table],
                checks: Mapping[str, Check] | None = None, inputs: Mapping | None = None,
                extra: Mapping | None = None) -> UnitResult:
    """Stage ``tables`` ({table name: rows of partition ``key``}), run ``checks`` on the staged files,
    then publish them as one unit (see the module docstring). Returns the verdicts; a failed unit is not
    an exception: the caller reports it (the asset's blocking checks fail)."""
    staging = unit_staging(layout, stage, key)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    staged = {name: staging / f"{name}.parquet" for name in tables}
    for name, t in tables.items():
        write_parquet_atomic(t, staged[name])
    verdicts: dict[str, tuple[bool, str]] = {}
    for name, check in (checks or {}).items():
        try:
            ok, why = check(staged)
        except Exception as e:  # noqa: BLE001 -- a check that cannot read what was written has found a problem
            ok, why = False, f"{type(e).__name__}: {e}"
        verdicts[name] = (bool(ok), str(why))
    passed = all(ok for ok, _ in verdicts.values())
    files = {name: {"rows": t.num_rows, **file_digest(staged[name])} for name, t in tables.items()}
    marker = {
        "stage": stage, "partition": key, "status": PASSED if passed else FAILED,
        "files": {name: {**meta, "path": f"{name}/{key}.parquet"} for name, meta in files.items()},
        "checks": {n: {"passed": ok, "detail": why} for n, (ok, why) in verdicts.items()},
        "inputs": json.loads(json.dumps(dict(inputs or {}), sort_keys=True, default=str)),
        "committed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "pid": os.getpid(), **dict(extra or {}),
    }
    mpath = marker_path(layout, stage, key)
    _remove(mpath)  # from here on the old unit is no longer trusted: a kill leaves no marker, and a rerun
    for name in tables:
        if passed:
            _install(staged[name], layout.partition_file(name, key))
        else:  # rejected data leaves the tables; the staged copy stays for inspection
            _remove(layout.partition_file(name, key))
    write_bytes_atomic(json.dumps(marker, indent=1, sort_keys=True).encode(), mpath)
    if passed:
        shutil.rmtree(staging, ignore_errors=True)
    return UnitResult(stage, key, passed, verdicts, files, None if passed else staging)

