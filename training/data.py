"""WebDataset readers for lineup's dataset families.

Contract (the only thing shared with ``pipeline/``): a dataset version folder holds numbered tars
``<prefix>-000000.tar`` and ``manifest.json`` = {"dataset", "version", "config_fingerprint",
"num_samples", "shards": [{"name", "samples", "bytes", "sha256"}], ...}. Samples:

- preference: ``<key>.0.jpg``, ``<key>.1.jpg``, ``<key>.json`` = {"caption", "label_0", "label_1",
  "user_id", ...}. ``label_i == 1`` marks the preferred image; ties (equal labels) are skipped.
- multi-identity: ``<key>.target.jpg``, ``<key>.ref_<i>.jpg``, ``<key>.json`` = {"split", "faces":
  [{"bbox", "landmarks", "identity_id", "embedding", "refs": [{"member", "uid", "similarity"}]}],
  "caption"}.

Pipeline per worker: shard list (resampled with a deterministic per-rank/worker seed, or a seeded
shard shuffle followed by ``split_by_node`` + ``split_by_worker``) -> tar samples -> seeded sample
shuffle -> JSON parse and checks (cheap) -> skip (resume) -> image decode (resize shorter side +
center crop, [-1, 1]) -> batch. Samples that fail to parse or decode are counted and logged, never
fatal. ``BatchStream`` turns that into an endless iterator with a position (epoch, batch) that a
checkpoint stores: resuming rebuilds the epoch's pipeline with the same seed and skips the consumed
samples before decoding, which replays the stream exactly when every sample decodes.
``BatchStream.counter`` counts skipped ties and bad samples; with ``num_workers > 0`` those counts
stay in the worker processes (read them with 0 workers).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from training.config import Options

log = logging.getLogger("lineup.training.data")

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard for untrusted shards
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def dataset_path(location: str | Path):
    """A dataset folder: a local ``Path``, or for an object-store URL (``s3://bucket/.../train``) a
    ``upath.UPath`` read through fsspec (s3fs: endpoint and credentials from the standard AWS variables)."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        from upath import UPath

        _register_fsspec_gopen(text.split("://", 1)[0])
        return UPath(text)
    return Path(text.removeprefix("file://"))


def _fsspec_gopen(url, mode="rb", bufsize=8192, **kw):
    import fsspec

    return fsspec.open(url, mode).open()


def _register_fsspec_gopen(scheme: str) -> None:
    """Let webdataset open shard URLs of ``scheme`` through fsspec (it knows http, gs, pipe:, ... only)."""
    import importlib

    # the module, not webdataset.gopen (the package re-exports the function under the same name)
    importlib.import_module("webdataset.gopen").gopen_schemes.setdefault(scheme, _fsspec_gopen)


def read_manifest(dataset_dir: str | Path) -> dict:
    p = dataset_path(dataset_dir) / "manifest.json"
    if not p.exists():
        raise FileNotFoundError(f"no manifest.json in {dataset_dir}: not a dataset version folder")
    m = json.loads(p.read_text())
    for k in ("shards", "num_samples"):
        if k not in m:
            raise ValueError(f"{p}: manifest lacks {k!r}")
    return m



def shard_paths(dataset_dir: str | Path, manifest: Mapping | None = None, verify: bool = False) -> list[str]:
    """Paths of the manifest's shards (in manifest order); ``verify`` checks size and sha256."""
    dataset_dir = dataset_path(dataset_dir)
    manifest = manifest or read_manifest(dataset_dir)
    out = []
    for s in manifest["shards"]:
        name = s["name"]
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"manifest shard name {name!r} is not a plain file name")
        p = dataset_dir / name
        if not p.exists():
            raise FileNotFoundError(f"shard {p} listed in the manifest is missing")
        if verify:
            data = p.read_bytes()
            if len(data) != s.get("bytes", len(data)) or hashlib.sha256(data).hexdigest() != s.get("sha256"):
                raise ValueError(f"shard {p} does not match its manifest entry (size/sha256)")
        out.append(str(p))
    if not out:
        raise ValueError(f"{dataset_dir}: manifest lists no shards")
    return out


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop:
    """x_out = x_in * scale - left (same for y with top): resize shorter side, then center crop."""

    scale: float
    left: float
    top: float

    def points(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float32).reshape(-1, 2)
        return pts * self.scale - np.array([self.left, self.top], dtype=np.float32)


def decode_image(data: bytes, resolution: int, focus=None) -> tuple[torch.Tensor, Crop]:
    """JPEG/PNG/WebP bytes -> float tensor [3, R, R] in [-1, 1] (RGB), and the geometric transform.

    Resize the shorter side to R, then crop R x R: centred, or (``focus`` = (cx, cy) in source
    pixels, e.g. the centre of the faces) centred on the focus point as far as the image allows."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {w}x{h} pixels exceeds the {MAX_IMAGE_PIXELS} pixel limit")
        im = im.convert("RGB")
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        if focus is not None:
            fx, fy = focus[0] * nw / w, focus[1] * nh / h
            left = int(min(max(round(fx - resolution / 2), 0), nw - resolution))
            top = int(min(max(round(fy - resolution / 2), 0), nh - resolution))
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0
    return t, Crop(scale=nw / w, left=float(left), top=float(top))


def decode_face_region(data: bytes, bbox, landmarks, size: int, margin: float = 0.3):
    """A square region around ``bbox`` (grown by ``margin`` per side; outside the image is black),
    resized to ``size``: ([3, size, size] in [-1, 1], landmarks in the output pixels or None)."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {w}x{h} pixels exceeds the {MAX_IMAGE_PIXELS} pixel limit")
        x1, y1, x2, y2 = (float(v) for v in bbox)
        side = max(x2 - x1, y2 - y1, 1.0) * (1 + 2 * margin)
        left, top = (x1 + x2) / 2 - side / 2, (y1 + y2) / 2 - side / 2
        im = im.convert("RGB").resize(
            (size, size), Image.BICUBIC, box=(left, top, left + side, top + side)
        ) if left >= 0 and top >= 0 and left + side <= w and top + side <= h else \
            im.convert("RGB").crop((round(left), round(top), round(left + side), round(top + side))).resize(
                (size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0
    lm = None
    if landmarks is not None and np.asarray(landmarks).size == 10:
        lm = (np.asarray(landmarks, dtype=np.float32).reshape(5, 2) - np.array([left, top], np.float32)) * (size / side)
    return t, lm


def ref_geometry(r: Mapping) -> tuple[list | None, list | None]:
    """(bbox, landmarks) of a reference face in its member's pixel coordinates. The multi-identity
    shards store them in the source photo's coordinates; for ``kind == "face_crop"`` members the crop
    box and the bbox inside the crop give the transform."""
    bbox, lm = r.get("bbox"), r.get("landmarks")
    if r.get("kind") == "face_crop" and r.get("crop_box") is not None and r.get("bbox_in_crop") is not None:
        cb, bic = r["crop_box"], r["bbox_in_crop"]
        s = (bic[2] - bic[0]) / max(float(bbox[2]) - float(bbox[0]), 1e-6) if bbox is not None else 1.0
        if lm is not None and np.asarray(lm).size == 10:
            lm = ((np.asarray(lm, dtype=np.float32).reshape(5, 2) - np.array(cb[:2], np.float32)) * s).tolist()
        bbox = bic
    return bbox, lm


def _find(sample: Mapping, stem: str) -> bytes | None:
    for ext in IMAGE_EXTS:
        v = sample.get(f"{stem}.{ext}")
        if v is not None:
            return v
    return None


def _json(sample: Mapping) -> dict:
    raw = sample.get("json")
    if raw is None:
        raise ValueError("sample has no .json member")
    meta = json.loads(raw if isinstance(raw, str) else raw.decode("utf-8"))
    if not isinstance(meta, dict):
        raise TypeError(".json member is not an object")
    return meta


# preference ------------------------------------------------------------------------------------


def parse_preference(sample: Mapping) -> dict | None:
    """Cheap checks; None for a tie or a sample without a clear winner."""
    meta = _json(sample)
    l0, l1 = int(meta.get("label_0", 0)), int(meta.get("label_1", 0))
    if l0 == l1:
        return None
    i0, i1 = _find(sample, "0"), _find(sample, "1")
    if i0 is None or i1 is None:
        raise ValueError("preference sample lacks the 0.jpg / 1.jpg images")
    win, lose = (i0, i1) if l0 > l1 else (i1, i0)
    return {
        "__key__": sample["__key__"], "win": win, "lose": lose,
        "caption": meta.get("caption") or "", "user_id": meta.get("user_id"),
    }


def decode_preference(p: Mapping, resolution: int) -> dict:
    w, _ = decode_image(p["win"], resolution)
    l_, _ = decode_image(p["lose"], resolution)
    return {"key": p["__key__"], "pixels_w": w, "pixels_l": l_, "caption": p["caption"], "user_id": p["user_id"]}


def collate_preference(samples: list[dict]) -> dict:
    return {
        "key": [s["key"] for s in samples],
        "pixels_w": torch.stack([s["pixels_w"] for s in samples]),
        "pixels_l": torch.stack([s["pixels_l"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "user_id": [s["user_id"] for s in samples],
    }


# multi-identity ------------------------------------------------------------------------------


def parse_identity(sample: Mapping) -> dict | None:
    meta = _json(sample)
    target = _find(sample, "target")
    if target is None:
        raise ValueError("identity sample lacks target.jpg")
    faces = [f for f in (meta.get("faces") or []) if f.get("bbox") is not None]
    if not faces:
        return None
    refs = {k: v for k, v in sample.items() if k.startswith("ref_")}
    return {"__key__": sample["__key__"], "target": target, "faces": faces, "refs": refs,
            "caption": meta.get("caption") or "", "split": meta.get("split")}


def _emb(v) -> np.ndarray | None:
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(a))
    return a / n if n > 0 else None


def decode_identity(p: Mapping, resolution: int, ref_resolution: int = 112, max_faces: int = 4,
                    min_in_view: float = 0.8) -> dict:
    """Target cropped around the faces (see decode_image ``focus``); a face less than ``min_in_view``
    of whose box lies inside the crop stays a conditioning input but is left out of the identity
    loss (``in_view`` False)."""
    boxes = np.asarray([f["bbox"] for f in p["faces"][:max_faces]], dtype=np.float32).reshape(-1, 4)
    focus = ((boxes[:, 0].min() + boxes[:, 2].max()) / 2, (boxes[:, 1].min() + boxes[:, 3].max()) / 2)
    target, crop = decode_image(p["target"], resolution, focus=focus)
    faces = []
    for f in p["faces"][:max_faces]:
        x1, y1, x2, y2 = crop.points(np.asarray(f["bbox"], dtype=np.float32).reshape(2, 2)).reshape(-1)
        area = max((x2 - x1) * (y2 - y1), 1e-6)
        inter = max(0.0, min(x2, resolution) - max(x1, 0)) * max(0.0, min(y2, resolution) - max(y1, 0))
        lm = f.get("landmarks")
        lm = crop.points(lm) if lm is not None and np.asarray(lm).size == 10 else None
        ref_img, ref_lm, ref_emb = None, None, None
        for r in f.get("refs") or []:
            data = p["refs"].get(r.get("member", ""))
            if data is None:
                continue
            rbox, rlm = ref_geometry(r)
            if rbox is not None:  # a face region around the reference face (photo or crop)
                ref_img, ref_lm = decode_face_region(data, rbox, rlm, ref_resolution)
            else:  # no geometry: the member is taken to be a face crop already
                ref_img, rc = decode_image(data, ref_resolution)
                ref_lm = rc.points(rlm) if rlm is not None and np.asarray(rlm).size == 10 else None
            ref_emb = _emb(r.get("embedding"))
            break
        faces.append({
            "bbox": np.array([x1, y1, x2, y2], dtype=np.float32), "landmarks": lm,
            "in_view": inter / area >= min_in_view,
            "identity_id": str(f.get("identity_id")), "gt_emb": _emb(f.get("embedding")),
            "ref": ref_img, "ref_landmarks": ref_lm, "ref_emb": ref_emb,
        })
    return {"key": p["__key__"], "target": target, "faces": faces, "caption": p["caption"],
            "ref_resolution": ref_resolution}


def collate_identity(samples: list[dict]) -> dict:
    B = len(samples)
    F = max(1, max(len(s["faces"]) for s in samples))
    r = samples[0]["ref_resolution"]
    dims = [len(f[k]) for s in samples for f in s["faces"] for k in ("gt_emb", "ref_emb") if f[k] is not None]
    D = max(dims) if dims else 1
    out = {
        "key": [s["key"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "target": torch.stack([s["target"] for s in samples]),
        "face_mask": torch.zeros(B, F, dtype=torch.bool),  # face present and inside the crop
        "bbox": torch.zeros(B, F, 4),
        "landmarks": torch.zeros(B, F, 5, 2),
        "has_landmarks": torch.zeros(B, F, dtype=torch.bool),
        "refs": torch.zeros(B, F, 3, r, r),
        "ref_mask": torch.zeros(B, F, dtype=torch.bool),
        "ref_landmarks": torch.zeros(B, F, 5, 2),
        "ref_has_landmarks": torch.zeros(B, F, dtype=torch.bool),
        "ref_emb": torch.zeros(B, F, D),
        "ref_emb_mask": torch.zeros(B, F, dtype=torch.bool),
        "gt_emb": torch.zeros(B, F, D),
        "gt_emb_mask": torch.zeros(B, F, dtype=torch.bool),
        "identity_ids": [[""] * F for _ in range(B)],
    }
    for b, s in enumerate(samples):
        for i, f in enumerate(s["faces"]):
            out["face_mask"][b, i] = bool(f["in_view"])  # faces the identity loss can see
            out["bbox"][b, i] = torch.from_numpy(f["bbox"])
            out["identity_ids"][b][i] = f["identity_id"]
            if f["landmarks"] is not None:
                out["landmarks"][b, i] = torch.from_numpy(f["landmarks"])
                out["has_landmarks"][b, i] = True
            if f["ref"] is not None:
                out["refs"][b, i] = f["ref"]
                out["ref_mask"][b, i] = True
                if f["ref_landmarks"] is not None:
                    out["ref_landmarks"][b, i] = torch.from_numpy(f["ref_landmarks"])
                    out["ref_has_landmarks"][b, i] = True
            for k in ("gt_emb", "ref_emb"):
                if f[k] is not None and len(f[k]) == D:
                    out[k][b, i] = torch.from_numpy(f[k])
                    out[f"{k}_mask"][b, i] = True
    return out


FAMILIES = {
    "preference": (parse_preference, decode_preference, collate_preference),
    "identity": (parse_identity, decode_identity, collate_identity),
}


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------


@dataclass
class LoaderConfig(Options):
    options_name: ClassVar[str] = "loader"

    family: str = "preference"  # "preference" | "identity"
    resolution: int = 512
    ref_resolution: int = 112  # identity refs (ArcFace input size)
    max_faces: int = 4
    batch_size: int = 4
    num_workers: int = 0
    seed: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False  # True for multi-worker / multi-node training: endless, use epoch_batches
    epoch_batches: int | None = None  # batches per (pseudo-)epoch per rank; required when resampled
    verify_shards: bool = False


class _Counter:
    def __init__(self):
        self.skipped = 0
        self.errors = 0


def _make_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def build_pipeline(urls: list[str], cfg: LoaderConfig, epoch: int = 0, skip_batches: int = 0,
                   counter: _Counter | None = None) -> wds.DataPipeline:
    """The per-epoch WebDataset pipeline (see module docstring). ``skip_batches`` is the number of
    batches of this epoch already consumed across all workers of this rank."""
    parse, decode, collate = FAMILIES[cfg.family]
    counter = counter or _Counter()
    seed = _make_seed(cfg.seed, epoch)

    if cfg.resampled:
        if not cfg.epoch_batches:
            raise ValueError("resampled=True needs epoch_batches (the stream is endless)")
        # worker_seed default mixes rank and worker id, so every rank/worker draws its own shards
        stages: list = [wds.ResampledShards(urls, seed=seed % (2**31), deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls, seed=seed % (2**31)), wds.split_by_node, wds.split_by_worker]

    def shuffle_parse_skip(src: Iterator[dict]) -> Iterator[dict]:
        rank, _world, worker, nworkers = wds.utils.pytorch_worker_info()
        rng = random.Random(_make_seed(cfg.seed, epoch, rank, worker))
        parsed = _parsed(src)
        stream = wds.filters._shuffle(parsed, cfg.shuffle_buffer, min(100, cfg.shuffle_buffer), rng) \
            if cfg.shuffle_buffer > 1 else parsed
        # batches are dealt round-robin over workers: worker w made batches w, w+n, w+2n, ...
        mine = skip_batches // nworkers + (1 if worker < skip_batches % nworkers else 0)
        to_skip = mine * cfg.batch_size
        for s in stream:
            if to_skip > 0:
                to_skip -= 1
                continue
            yield s

    def _parsed(src):
        for s in src:
            try:
                p = parse(s)
            except Exception as e:  # noqa: BLE001  # bad sample: counted and logged, never fatal
                counter.errors += 1
                log.warning("skipping sample %s: %s", s.get("__key__"), e)
                continue
            if p is None:
                counter.skipped += 1
                continue
            yield p

    def decoded(src):
        for p in src:
            try:
                if cfg.family == "identity":
                    yield decode(p, cfg.resolution, cfg.ref_resolution, cfg.max_faces)
                else:
                    yield decode(p, cfg.resolution)
            except Exception as e:  # noqa: BLE001  # undecodable: counted and logged, never fatal
                counter.errors += 1
                log.warning("skipping undecodable sample %s: %s", p.get("__key__"), e)

    stages += [
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        shuffle_parse_skip,
        decoded,
        wds.batched(cfg.batch_size, collation_fn=collate, partial=not cfg.resampled),
    ]
    pipe = wds.DataPipeline(*stages)
    if cfg.resampled:
        nworkers = max(1, cfg.num_workers)
        per_worker = math.ceil(cfg.epoch_batches / nworkers)
        pipe = pipe.with_epoch(max(0, per_worker - (skip_batches // nworkers)))
    return pipe


class BatchStream:
    """An endless iterator of batches with a resumable position ``{"epoch", "batch"}``.

    Each epoch builds a fresh pipeline seeded by (seed, epoch); ``restore(position)`` rebuilds the
    epoch and skips the consumed batches (before image decoding)."""

    def __init__(self, dataset_dir: str | Path, cfg: LoaderConfig):
        self.dataset_dir = dataset_path(dataset_dir)
        self.cfg = cfg
        self.manifest = read_manifest(dataset_dir)
        self.urls = shard_paths(dataset_dir, self.manifest, verify=cfg.verify_shards)
        self.epoch = 0
        self.batch = 0
        self.counter = _Counter()
        self._it: Iterator | None = None

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def restore(self, position: Mapping[str, int]) -> None:
        self.epoch, self.batch = int(position["epoch"]), int(position["batch"])
        self._it = None

    def _open(self) -> Iterator:
        pipe = build_pipeline(self.urls, self.cfg, self.epoch, self.batch, self.counter)
        if self.cfg.num_workers > 0:
            loader = wds.WebLoader(pipe, batch_size=None, num_workers=self.cfg.num_workers,
                                   persistent_workers=False)
            return iter(loader)
        return iter(pipe)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(3):  # an empty epoch (e.g. all ties) twice in a row means no data
            if self._it is None:
                self._it = self._open()
            try:
                b = next(self._it)
                self.batch += 1
                return b
            except StopIteration:
                empty = self.batch == 0
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
                if not empty:
                    continue
        raise RuntimeError(f"{self.dataset_dir}: the loader yields no batches (all samples skipped?)")
