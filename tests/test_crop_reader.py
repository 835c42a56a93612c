"""CropReader keeps a bounded number of decoded photos and gives the same crops as an unbounded one."""

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.faces.crops import CROP_CACHE_IMAGES, CropReader
from pipeline.ids import content_uid


def _collection(tmp_path, n_images=6):
    rng = np.random.default_rng(0)
    images, faces = [], []
    for i in range(n_images):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(p)
        uid = content_uid(p.read_bytes())  # a uid is its photo's content hash (readers check it)
        images.append({"uid": uid, "path": str(p), "offset": 0, "length": p.stat().st_size})
        for f in range(2):
            x1, y1 = 10 + 60 * f, 20 + 5 * i
            faces.append({"uid": uid, "face_index": f, "x1": float(x1), "y1": float(y1),
                          "x2": float(x1 + 40), "y2": float(y1 + 48)})
    return pa.Table.from_pylist(images), pa.Table.from_pylist(faces)


def test_bounded_crop_cache_same_crops(tmp_path):
    images, faces = _collection(tmp_path)
    assert CROP_CACHE_IMAGES >= 1
    small = CropReader(images, faces, cache_images=2)
    full = CropReader(images, faces, cache_images=10_000)
    rng = np.random.default_rng(1)
    uids = images.column("uid").to_pylist()
    requests = [(uids[rng.integers(0, 6)], int(rng.integers(0, 2))) for _ in range(60)] + [(uids[0], 0), (uids[0], 1)]
    for uid, fi in requests:
        a, b = small.crop(uid, fi), full.crop(uid, fi)
        assert a is not None and b is not None
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert len(small._cache) <= 2
    assert small._cache.evictions > 0 and small.decoded > full.decoded == 6
    assert small.crop("missing", 0) is None and small.crop(uids[0], 7) is None
    assert len(small._cache) <= 2


def test_boxes_as_a_mapping(tmp_path):
    images, faces = _collection(tmp_path, 2)
    boxes = CropReader(images, faces).boxes
    u1 = images.column("uid")[1].as_py()
    assert len(boxes) == 4 and (u1, 1) in boxes and (u1, 2) not in boxes
    assert boxes.get((u1, 1)) == (70.0, 25.0, 110.0, 73.0) and boxes.get(("u9", 0)) is None
