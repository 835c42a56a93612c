"""The multi-identity builder over several worker processes writes the same files, byte for byte, as one
process: fresh builds and refreshes that select only some targets again."""

import hashlib
from pathlib import Path

import pytest

from pipeline.multiid import MultiIDConfig, build_multiid_dataset
from pipeline.multiid import build as mbuild
from test_shard_reuse import _collection, _groups

CFG = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=False, reuse_buckets=4)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _comparable(stats: dict) -> dict:
    # how the build went, not what it built: the decoding caches' evictions depend on how targets are split
    return {k: v for k, v in stats.items() if k not in ("cache_evictions",)}


@pytest.fixture
def small_parallel(monkeypatch):
    """Selections of a few targets already go to the workers, and each call's part files are recorded."""
    monkeypatch.setattr(mbuild, "PARALLEL_MIN_TARGETS", 4)
    parts = []
    real = mbuild._select_parallel

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        parts.append(out[2])
        return out

    monkeypatch.setattr(mbuild, "_select_parallel", spy)
    return parts


@pytest.mark.parametrize("keypoints", [False, True])
def test_parallel_build_is_byte_identical(tmp_path, small_parallel, keypoints):
    import cv2
    import numpy as np

    # OpenCV's thread pool running in the parent before the fork (a child that inherited it used to hang)
    cv2.resize(np.zeros((2000, 2000), np.uint8), (3000, 3000))
    cfg = MultiIDConfig(eval_fraction=0.3, refs_per_person=2, keypoints=keypoints, reuse_buckets=4)
    world = _collection(tmp_path, _groups(3), photos_per_group=14)
    one = build_multiid_dataset(*world, tmp_path / "one", cfg, version="v1", workers=1)
    two = build_multiid_dataset(*world, tmp_path / "two", cfg, version="v1", workers=2)
    assert one.stats["targets"].get("kept", 0) > 10  # enough samples for the comparison to mean something
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert a == b
    assert _comparable(one.stats) == _comparable(two.stats)
    # the parallel path ran: some selections came back as several part files (one per chunk of targets)
    assert any(isinstance(p, list) and len(p) > 1 for p in small_parallel), small_parallel


def test_parallel_refresh_is_byte_identical(tmp_path, small_parallel):
    groups = _groups(2)
    base = _collection(tmp_path, groups, photos_per_group=14)
    first = build_multiid_dataset(*base, tmp_path / "v1", CFG, version="v1")
    # a refresh: one new photo of two people of the first group selects that group's targets again
    grown = _collection(tmp_path, groups, photos_per_group=14, extra=[("zz-new", [f"{groups[0]}-a", f"{groups[0]}-b"])])
    one = build_multiid_dataset(*grown, tmp_path / "r1", CFG, version="v2", reuse_from=first.out_dir, workers=1)
    two = build_multiid_dataset(*grown, tmp_path / "r2", CFG, version="v2", reuse_from=first.out_dir, workers=2)
    fresh = build_multiid_dataset(*grown, tmp_path / "f", CFG, version="v2", workers=2)
    assert one.stats["targets_reselected"] > 0 and one.stats["targets_reused"] > 0
    assert any(isinstance(p, list) and len(p) > 1 for p in small_parallel), small_parallel
    assert _files(tmp_path / "r1") == _files(tmp_path / "r2") == _files(tmp_path / "f")
    assert _comparable(one.stats)["reselect_reasons"] == _comparable(two.stats)["reselect_reasons"]
