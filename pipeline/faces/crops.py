"""Face thumbnails by (uid, face_index) for the UI and the expression dataset, decoding each image once."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.cache import LRU
from pipeline.decode import DecodeError
from pipeline.ingest import IngestLimits, load_image


def face_crop(rgb: np.ndarray, box, margin: float = 0.25) -> Image.Image:
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    x1, y1 = max(0, int(x1 - margin * w)), max(0, int(y1 - margin * h))
    x2, y2 = min(rgb.shape[1], int(x2 + margin * w)), min(rgb.shape[0], int(y2 + margin * h))
    return Image.fromarray(rgb[y1:y2, x1:x2])


class FaceBoxes(Mapping):
    """(uid, face_index) -> (x1, y1, x2, y2) of a faces table: one index entry per face, the boxes in an array."""

    def __init__(self, faces: pa.Table):
        self._row = {(u, int(f)): i for i, (u, f) in
                     enumerate(zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist()))}
        self._xy = np.stack([faces.column(c).to_numpy(zero_copy_only=False) for c in ("x1", "y1", "x2", "y2")], 1) \
            if faces.num_rows else np.zeros((0, 4))

    def __getitem__(self, key):
        return tuple(self._xy[self._row[key]].tolist())

    def __iter__(self):
        return iter(self._row)

    def __len__(self):
        return len(self._row)


# decoded photos a CropReader keeps (least recently used dropped first): at most CROP_CACHE_IMAGES x the largest
# decoded photo (IngestLimits.max_pixels x 3 bytes); a reader that walks pairs in pair_id order mostly misses anyway,
# one that walks the faces of a photo together (identity report, privacy) decodes each photo once
CROP_CACHE_IMAGES = 64


class CropReader:
    """Face crops by (uid, face_index), keeping the ``cache_images`` most recently decoded photos."""

    def __init__(self, images: pa.Table, faces: pa.Table, limits: IngestLimits | None = None,
                 cache_images: int = CROP_CACHE_IMAGES):
        # a photo's row is read from the table when it is decoded (no dict per photo kept)
        self._images = images
        self._image_row = {u: i for i, u in enumerate(images.column("uid").to_pylist())}
        self.boxes = FaceBoxes(faces)
        self.limits = limits
        self._cache: LRU = LRU(cache_images)
        self.decoded = 0  # photos decoded (a miss each)

    def crop(self, uid: str, face_index: int) -> Image.Image | None:
        """The face crop, or None when the photo or the face is unknown or the photo cannot be read again."""
        try:
            return self.crop_or_raise(uid, face_index)
        except (LookupError, DecodeError, OSError):
            return None

    def crop_or_raise(self, uid: str, face_index: int) -> Image.Image:
        """The face crop; raises why not: LookupError for a photo or face the tables do not hold, OSError
        (ingest.PhotoChanged when the file was edited in place since ingestion) or DecodeError."""
        if uid in self._cache:
            rgb = self._cache[uid]
        else:
            if uid not in self._image_row:
                raise LookupError(f"photo {uid} is not in the images table")
            rgb = load_image(self._images.slice(self._image_row[uid], 1).to_pylist()[0], self.limits).rgb
            self.decoded += 1
            self._cache[uid] = rgb
        box = self.boxes.get((uid, int(face_index)))
        if box is None:
            raise LookupError(f"photo {uid} has no face {face_index}")
        return face_crop(rgb, box)
