"""The batched PyTorch face stage: JPEG bytes -> decode -> MTCNN -> dlib chips -> dlib descriptors.

Everything after decoding runs as batched tensor work on one device, so a GPU does it all:

- decode: nvjpeg on CUDA (``torchvision.io.decode_jpeg``, batched) for plain RGB/grey JPEGs
  without EXIF rotation; everything else (PNG, WebP, CMYK, rotated, corrupt) through
  :func:`pipeline.decode.decode_image` on CPU worker threads, with its reject reasons. The face
  stage (pipeline/faces/stage.py ``analyze_chunks``, the asset's and the Ray actors' path) reads and
  decodes the next chunk this way on a thread while this stage analyses the current one;
- detection: facenet-pytorch's MTCNN networks (weights inside the package) driven in batches:
  images letterboxed into one canvas per batch, and the R-Net / O-Net crops of every candidate
  of every image cut by one ``roi_align`` call instead of one resize per box;
- alignment: dlib's 150 px chip (pipeline/faces/dlib_chip.py: dlib's pyramid, bilinear rules)
  placed from dlib's 5-point shape predictor, run as its exact torch port
  (pipeline/faces/shape_predictor_torch.py) once per batch on the stage's device; or, with
  ``landmarks="mtcnn"``, from MTCNN's own points through :data:`MTCNN_CHIP_TEMPLATE`;
- descriptors: the ported dlib network (pipeline/faces/dlib_torch.py) in bfloat16 on CUDA.

On CPU the same code runs (tests, small jobs), but the dlib backend with HOG is faster there.
:func:`dlib_face_backend` picks: this stage when the device is CUDA and the detector MTCNN
(the default on CUDA), else :class:`pipeline.faces.dlib_backend.DlibBackend`.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE

from .base import DetectedFace, FaceBackend, check_rgb, l2_normalize
from .dlib_chip import ChipDetails, extract_face_chips_batch, similarity_transform
from .dlib_torch import CHIP_SIZE, FaceDescriptor, resolve_device

# Median position of MTCNN's 5 points (left eye, right eye, nose tip, left and right mouth
# corner, image-left first) in dlib's 150 px chip (padding 0.25), over the 223 faces of
# ../shared/data/faces found by MTCNN whose chip dlib's shape predictor placed (per-point std
# 5-7 px: the two landmark models disagree on turned faces). Recompute with
# `python bench/bench_dlib_torch.py --fit-mtcnn-template`.
MTCNN_CHIP_TEMPLATE = np.array(
    [[47.039, 44.585], [102.693, 43.936], [74.107, 76.635], [49.667, 102.2], [100.513, 101.911]],
    dtype=np.float64,
)


def chip_details_from_points(points: np.ndarray, template: np.ndarray = MTCNN_CHIP_TEMPLATE, size: int = CHIP_SIZE) -> ChipDetails:
    """dlib chip geometry (as get_face_chip_details builds it) from 5 detector points."""
    import math

    A, t = similarity_transform(template, np.asarray(points, np.float64).reshape(5, 2))
    p = A @ np.array([1.0, 0.0])
    scale = math.hypot(p[0], p[1])
    centre = A @ np.array([size / 2.0, size / 2.0]) + t
    w = size * scale - 1
    rect = np.array([centre[0] - w / 2, centre[1] - w / 2, centre[0] + w / 2, centre[1] + w / 2])
    return ChipDetails(rect, math.atan2(p[1], p[0]), size, size)


# -- batched MTCNN -------------------------------------------------------------------------------


class BatchedMTCNN:
    """facenet-pytorch's P/R/O-Nets with batched crops. ``detect`` takes a (B, 3, H, W) float
    batch of 0..255 RGB and returns, per image, (boxes (n, 4), probs (n,), points (n, 5, 2))."""

    def __init__(self, device, min_face: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709) -> None:
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = (m.to(self.device).eval() for m in (PNet(), RNet(), ONet()))
        self.min_face = int(min_face)
        self.thresholds = thresholds
        self.factor = float(factor)

    @torch.inference_mode()
    def detect(self, imgs: torch.Tensor):
        from facenet_pytorch.models.utils.detect_face import (
            batched_nms_numpy,
            bbreg,
            generateBoundingBox,
            rerec,
        )
        from torchvision.ops import batched_nms, roi_align

        B, _, h, w = imgs.shape
        m = 12.0 / self.min_face
        minl = min(h, w) * m
        scales, s = [], m
        while minl >= 12:
            scales.append(s)
            s *= self.factor
            minl *= self.factor
        boxes, inds = [], []
        for scale in scales:
            x = F.interpolate(imgs, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, probs = self.pnet((x - 127.5) * 0.0078125)
            bb, ii = generateBoundingBox(reg, probs[:, 1], scale, self.thresholds[0])
            pick = batched_nms(bb[:, :4], bb[:, 4], ii, 0.5)
            boxes.append(bb[pick])
            inds.append(ii[pick])
        empty = [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))] * B
        if not boxes:
            return empty
        boxes, inds = torch.cat(boxes), torch.cat(inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[pick], inds[pick]
        if len(boxes) == 0:
            return empty
        regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack(
            [boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
             boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]],
            dim=1,
        )
        boxes = rerec(boxes)

        def crops(bx, ii, size):
            # facenet-pytorch's pad(): integer box clipped to the image, pixels y-1 .. ey-1
            b = bx[:, :4].trunc()
            x1 = b[:, 0].clamp(min=1) - 1
            y1 = b[:, 1].clamp(min=1) - 1
            x2 = b[:, 2].clamp(max=w)
            y2 = b[:, 3].clamp(max=h)
            ok = (x2 > x1) & (y2 > y1)
            rois = torch.stack([ii.to(bx.dtype), x1, y1, x2, y2], dim=1)[ok]
            # area-like resampling: adaptive sampling grid averaged per output pixel
            out = roi_align(imgs, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            return (out - 127.5) * 0.0078125, ok

        x, ok = crops(boxes, inds, 24)
        boxes, inds = boxes[ok], inds[ok]
        if len(boxes):
            reg, prob = self.rnet(x)
            keep = prob[:, 1] > self.thresholds[1]
            boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
            inds, reg = inds[keep], reg[keep]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
            boxes, inds, reg = boxes[pick], inds[pick], reg[pick]
            boxes = rerec(bbreg(boxes, reg))
        points = torch.zeros((0, 5, 2), device=imgs.device)
        if len(boxes):
            x, ok = crops(boxes, inds, 48)
            boxes, inds = boxes[ok], inds[ok]
            reg, pts, prob = self.onet(x)
            keep = prob[:, 1] > self.thresholds[2]
            boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
            inds, reg, pts = inds[keep], reg[keep], pts[keep]
            wi = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
            hi = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
            px = wi * pts[:, :5] + boxes[:, 0:1] - 1
            py = hi * pts[:, 5:10] + boxes[:, 1:2] - 1
            points = torch.stack([px, py], dim=2)
            boxes = bbreg(boxes, reg)
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], inds, 0.7, "Min")
            boxes, inds, points = boxes[pick], inds[pick], points[pick]
        boxes, points, inds = boxes.float().cpu().numpy(), points.float().cpu().numpy(), inds.cpu().numpy()
        return [(boxes[inds == b, :4], boxes[inds == b, 4], points[inds == b]) for b in range(B)]


# -- decoding ------------------------------------------------------------------------------------


@dataclass
class Decoded:
    image: torch.Tensor | None  # (3, H, W) uint8 on the stage's device
    error: tuple[str, str] | None = None  # (reason, detail), pipeline.decode's reject reasons
    # what ingestion records of the photo (pipeline.decode.DecodedImage's fields): a fused pass takes its
    # verdict from this decode (pipeline/per_image.py)
    format: str = ""
    original_mode: str = ""
    orientation_applied: bool = False
    orientation_note: str = ""
    decoder: str = "cpu"  # "nvjpeg" for what the device decoded; "cpu": pipeline.decode on a thread

    @property
    def width(self) -> int:
        return int(self.image.shape[-1])

    @property
    def height(self) -> int:
        return int(self.image.shape[-2])


@dataclass(frozen=True)
class DecodeLimits:
    """pipeline.decode.decode_image's limits (the ingest stage's IngestLimits carries the same four)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    min_side: int = DEFAULT_MIN_SIDE
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES

    @classmethod
    def of(cls, limits) -> DecodeLimits:
        """From anything with these attributes (IngestLimits), None = the defaults."""
        if limits is None:
            return cls()
        return cls(*(getattr(limits, f) for f in ("max_pixels", "max_bytes", "min_side", "max_decoded_bytes")))


def _cpu_decode(data: bytes, limits: DecodeLimits) -> Decoded:
    from pipeline.decode import DecodeError, decode_image

    try:
        d = decode_image(data, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes, min_side=limits.min_side,
                         max_decoded_bytes=limits.max_decoded_bytes)
    except DecodeError as e:
        return Decoded(None, (e.reason, e.detail))
    return Decoded(torch.from_numpy(np.array(d.rgb, copy=True)).permute(2, 0, 1), None, d.format, d.original_mode,
                   d.orientation_applied, d.orientation_note)


JPEG_END = b"\xff\xd9"


def nvjpeg_mode(data: bytes, limits: DecodeLimits) -> str | None:
    """The Pillow mode of a photo nvjpeg may decode, None for any other: a plain baseline/progressive RGB
    or grey JPEG with no EXIF rotation that passes pipeline.decode's checks (:func:`check_bytes`,
    :func:`check_header`: the header is read, no pixel decoded) and ends with its end-of-image marker
    (a truncated file goes to the CPU decoder, which names it "truncated image", as ingestion does)."""
    from PIL import Image

    from pipeline.decode import DecodeError, check_bytes, check_header, read_orientation

    if data[:2] != b"\xff\xd8" or not data.rstrip(b"\0\r\n ").endswith(JPEG_END):
        return None
    try:
        check_bytes(data, limits.max_bytes)
        with Image.open(io.BytesIO(data)) as im:
            if check_header(im, limits.max_pixels, limits.min_side, limits.max_decoded_bytes) != "JPEG":
                return None
            if im.mode not in ("RGB", "L") or read_orientation(im) != (1, ""):  # the CPU decoder's reading
                return None
            return im.mode
    except DecodeError:
        return None
    except Exception:  # noqa: BLE001 - anything odd goes to the CPU decoder, which names the reason
        return None


def device_decode_jpeg(blobs: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """nvjpeg's batched decode onto ``device`` (RGB); raises RuntimeError when any file fails it.
    pipeline/read_counter.py counts its images."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision marks its decoders deprecated in favour of torchcodec (0.16+), which this environment
    # does not have; this is the one call site to migrate
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def decode_batch(
    blobs: list[bytes],
    device: torch.device,
    pool: ThreadPoolExecutor | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    limits: DecodeLimits | None = None,
) -> list[Decoded]:
    """Decode encoded images onto ``device``: nvjpeg for the JPEGs it handles on CUDA, the safe
    CPU decoder (pipeline.decode) on ``pool``'s threads for the rest and everywhere on CPU.
    ``limits`` (all four of pipeline.decode's) overrides ``max_pixels``/``max_bytes``."""
    limits = limits or DecodeLimits(max_pixels=max_pixels, max_bytes=max_bytes)
    out: list[Decoded | None] = [None] * len(blobs)
    modes: dict[int, str] = {}
    if device.type == "cuda":
        check = lambda b: nvjpeg_mode(b, limits)
        modes = {i: m for i, m in enumerate(pool.map(check, blobs) if pool else map(check, blobs)) if m is not None}
    if modes:
        gpu_idx = list(modes)
        try:
            for i, img in zip(gpu_idx, device_decode_jpeg([blobs[i] for i in gpu_idx], device)):
                out[i] = Decoded(img, None, "jpeg", modes[i], decoder="nvjpeg")
        except RuntimeError:
            out = [None] * len(blobs)  # a bad file fails the whole nvjpeg batch: decode them one by one on CPU
    rest = [i for i in range(len(blobs)) if out[i] is None]
    fn = lambda i: _cpu_decode(blobs[i], limits)
    for i, d in zip(rest, pool.map(fn, rest) if pool else map(fn, rest)):
        if d.image is not None:
            d.image = d.image.to(device, non_blocking=True)
        out[i] = d
    return out


# -- the stage -----------------------------------------------------------------------------------


def _letterbox(images: list[torch.Tensor], max_side: int, multiple: int = 32):
    """One zero-padded float canvas for a batch: each image scaled down (antialiased) so its
    longest side is at most ``max_side``; the canvas is the largest scaled size, rounded up."""
    scales, sizes = [], []
    for im in images:
        h, w = im.shape[-2:]
        s = min(1.0, max_side / max(h, w))
        scales.append(s)
        sizes.append((max(1, round(h * s)), max(1, round(w * s))))
    H = -(-max(s[0] for s in sizes) // multiple) * multiple
    W = -(-max(s[1] for s in sizes) // multiple) * multiple
    canvas = torch.zeros((len(images), 3, H, W), dtype=torch.float32, device=images[0].device)
    for i, (im, (h, w), s) in enumerate(zip(images, sizes, scales)):
        x = im.to(torch.float32)[None]
        if s < 1.0:
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        canvas[i, :, :h, :w] = x[0]
    return canvas, scales


def _blur_batch(images: list[torch.Tensor], points: list[list[np.ndarray]]) -> np.ndarray:
    """Blur of every face (Laplacian variance of its 112 px ArcFace-template grey crop, as the CPU
    backends compute it, pipeline.faces.align), in face order: the sampling grids of all faces copied to
    the device at once, one grid_sample per image for all its faces, one variance over every face, copied
    back at once (no synchronisation per face or image)."""
    from .align import ARCFACE_TEMPLATE

    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    grids = []
    for image, pts in zip(images, points):
        h, w = image.shape[-2:]
        for q in pts:
            A, t = similarity_transform(ARCFACE_TEMPLATE, q)  # template -> image
            px = A[0, 0] * xs + A[0, 1] * ys + t[0]
            py = A[1, 0] * xs + A[1, 1] * ys + t[1]
            grids.append(np.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], -1))
    if not grids:
        return np.zeros(0, np.float64)
    device = images[0].device
    grids = torch.as_tensor(np.stack(grids), dtype=torch.float32, device=device)  # (faces, 112, 112, 2)
    weights = torch.tensor([0.299, 0.587, 0.114], device=device)[:, None, None]
    laplacians, k = [], 0
    for image, pts in zip(images, points):
        n = len(pts)
        if not n:
            continue
        # the image's faces stacked down one (n*112, 112) grid: a single sampling pass
        grid = grids[k : k + n].reshape(1, n * 112, 112, 2)
        crops = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        grey = (crops * weights).sum(0).reshape(n, 112, 112)
        lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4 * grey[:, 1:-1, 1:-1]
        laplacians.append(lap.reshape(n, -1))
        k += n
    # one variance over the batch's faces: torch's var reads a scalar back per call on CPU
    return torch.cat(laplacians).var(dim=1, unbiased=False).double().cpu().numpy()


class TorchFaceStage(FaceBackend):
    """MTCNN -> dlib chips -> ported dlib descriptor, batched on ``device``.

    Options: ``device`` ("auto"), ``dtype`` of the descriptor ("auto": bfloat16 on CUDA),
    ``detect_max_side`` (1024: images are searched scaled down to this longest side, as the
    dlib backend does), ``min_face`` (20 px at the searched scale), ``min_prob`` (0.9, as the
    dlib backend's MTCNN), ``decode_workers`` (threads that read rows, parse JPEG headers and run the CPU
    decoder: :meth:`decode_encoded`),
    ``landmarks``: ``"dlib"`` (default: dlib's 5-point shape predictor on each MTCNN box, its
    torch port on the stage's device, so the chip is placed exactly as dlib places it) or ``"mtcnn"``
    (MTCNN's own points through :data:`MTCNN_CHIP_TEMPLATE`: no CPU work per face, but on the
    shared photos its embeddings were only median 0.993 / min 0.87 cosine to dlib's and the
    identities differed, adjusted Rand 0.92; bench/bench_dlib_torch.py stage-parity).
    """

    name = "dlib"
    embedding_dim = 128

    def __init__(
        self,
        device: str = "auto",
        dtype: str = "auto",
        detect_max_side: int = 1024,
        min_face: int = 20,
        min_prob: float = 0.9,
        decode_workers: int = 4,
        descriptor_batch: int = 256,
        threads: int | None = 1,
        landmarks: str = "dlib",
    ) -> None:
        if landmarks not in ("dlib", "mtcnn"):
            raise ValueError(f"landmarks must be 'dlib' or 'mtcnn', got {landmarks!r}")
        self.landmarks = landmarks
        self._sp = None
        if landmarks == "dlib":
            from .shape_predictor_torch import TorchShapePredictor

            # dlib's 5-point predictor ported to torch: same points as dlib, on the stage's device
            self._sp = TorchShapePredictor(device=resolve_device(device))
        self.device = resolve_device(device)
        self.descriptor = FaceDescriptor(self.device, dtype, batch_size=descriptor_batch, threads=threads)
        self.mtcnn = BatchedMTCNN(self.device, min_face=min_face)
        self.detect_max_side = int(detect_max_side)
        self.min_prob = float(min_prob)
        self.threads = threads
        self._pool = ThreadPoolExecutor(max(1, int(decode_workers)), thread_name_prefix="face-decode")
        self._decode_stream = None  # CUDA: nvjpeg's own stream (decode_encoded)
        align = "sp5" if landmarks == "dlib" else "mtcnn5"
        self.model_version = f"dlib-resnet_v1/mtcnn-facenet_pytorch-batched/align-{align}/{self.descriptor.tag}"
        # what decides the faces, not where they ran (pipeline/faces/stage_identity.py)
        self.face_stage = {"backend": self.name, "detector": "mtcnn",
                           "landmarks": "dlib-sp5" if landmarks == "dlib" else "mtcnn5", "descriptor": "dlib-resnet_v1"}
        self.timings: dict[str, float] = {"decode_s": 0.0, "detect_s": 0.0, "align_s": 0.0, "embed_s": 0.0, "quality_s": 0.0}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def analyze(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        tensors = [torch.as_tensor(np.array(check_rgb(im), copy=True)).permute(2, 0, 1).to(self.device) for im in images]
        return self.analyze_tensors(tensors)

    @property
    def decode_pool(self) -> ThreadPoolExecutor:
        """The stage's decoding threads (``decode_workers``): CPU decodes and file reads."""
        return self._pool

    def decode_encoded(self, blobs: list[bytes], limits=None) -> list[Decoded]:
        """Encoded images onto the stage's device (:func:`decode_batch`), ready to analyse when this
        returns. Safe to call on another thread while the model runs: on CUDA nvjpeg works on its own
        stream, so decoding the next batch overlaps inference on this one. Leaves ``timings`` alone
        (the caller times it: the face stage counts it as decode_s)."""
        if self.device.type != "cuda":
            return decode_batch(blobs, self.device, self._pool, limits=DecodeLimits.of(limits))
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            out = decode_batch(blobs, self.device, self._pool, limits=DecodeLimits.of(limits))
        self._decode_stream.synchronize()  # blocks the decoding thread only
        return out

    def analyze_encoded(self, blobs: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES):
        """Faces of each encoded image: a list per input, or a (reason, detail) reject tuple."""
        t0 = time.perf_counter()
        decoded = self.decode_encoded(blobs, DecodeLimits(max_pixels=max_pixels, max_bytes=max_bytes))
        self.timings["decode_s"] += time.perf_counter() - t0
        ok = [i for i, d in enumerate(decoded) if d.image is not None]
        faces = self.analyze_tensors([decoded[i].image for i in ok]) if ok else []
        out: list = [d.error for d in decoded]
        for i, f in zip(ok, faces):
            out[i] = f
        return out

    def analyze_tensors(self, images: list[torch.Tensor]) -> list[list[DetectedFace]]:
        """Faces of (3, H, W) uint8 tensors already on the device."""
        if not images:
            return []
        if self.device.type == "cuda":
            # decoded on decode_encoded's stream, used on this one: the allocator must not hand their
            # memory back to the decoder before the work queued here is done
            stream = torch.cuda.current_stream(self.device)
            for im in images:
                im.record_stream(stream)
        before = torch.get_num_threads()
        if self.device.type == "cpu" and self.threads:
            torch.set_num_threads(int(self.threads))
        try:
            return self._analyze(images)
        finally:
            if self.device.type == "cpu" and self.threads:
                torch.set_num_threads(before)

    def _detect(self, images: list[torch.Tensor]):
        """MTCNN per size bucket (one canvas per bucket, so small images are not searched in a
        large canvas): per image (boxes, probs, points) in image pixels."""
        side = [min(self.detect_max_side, max(im.shape[-2:])) for im in images]
        buckets: dict[int, list[int]] = {}
        for i, s in enumerate(side):
            buckets.setdefault(-(-s // 256), []).append(i)
        out: list = [None] * len(images)
        for idx in buckets.values():
            canvas, scales = _letterbox([images[i] for i in idx], self.detect_max_side)
            for i, s, (b, p, q) in zip(idx, scales, self.mtcnn.detect(canvas)):
                out[i] = (b / s, p, q / s)
        return out

    def _dlib_details(self, img: torch.Tensor, keep: list) -> list:
        """dlib's chip geometry from its shape predictor (torch port) run on each MTCNN box."""
        return self._dlib_details_batch([img], [keep])[0]

    def _dlib_details_batch(self, images: list[torch.Tensor], keeps: list[list]) -> list[list]:
        """:meth:`_dlib_details` for every image of a batch in one predictor call (one device sync)."""
        from .dlib_chip import face_chip_details

        # the MTCNN box as the dlib rectangle the CPU path gave dlib: rounded, right/bottom inclusive
        rects = [np.array([np.rint(box) - (0, 0, 1, 1) for box, _, _ in keep]).reshape(-1, 4) for keep in keeps]
        points = self._sp.predict(images, rects)
        return [[face_chip_details(p) for p in pts] for pts in points]

    def _analyze(self, images: list[torch.Tensor]) -> list[list[DetectedFace]]:
        t0 = time.perf_counter()
        dets = self._detect(images)
        t1 = time.perf_counter()
        found = []
        for img, (boxes, probs, pts) in zip(images, dets):
            h, w = img.shape[-2:]
            keep = []
            for b, p, q in zip(boxes, probs, pts):
                box = np.array([max(b[0], 0), max(b[1], 0), min(b[2], w), min(b[3], h)], np.float32)
                if p >= self.min_prob and box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                    keep.append((box, float(p), q.astype(np.float64)))
            found.append(keep)
        with_faces = [i for i, keep in enumerate(found) if keep]
        if self._sp is not None:  # one predictor call for the whole batch: one sync, not one per image
            batch_details = self._dlib_details_batch([images[i] for i in with_faces], [found[i] for i in with_faces])
        else:
            batch_details = [[chip_details_from_points(q) for _, _, q in found[i]] for i in with_faces]
        # every chip of the batch from one copy of its sampling maps (no copy or sync per image)
        chips = extract_face_chips_batch([images[i] for i in with_faces], batch_details)
        self._sync()
        t2 = time.perf_counter()
        desc = self.descriptor(chips) if len(chips) else np.zeros((0, 128), np.float32)
        t3 = time.perf_counter()
        from .align import estimate_pose

        blurs = _blur_batch(images, [[q for _, _, q in keep] for keep in found])
        results, k = [], 0
        for keep in found:
            faces = []
            for box, p, q in keep:
                yaw, pitch, roll = estimate_pose(q)
                faces.append(
                    DetectedFace(
                        bbox=box, landmarks=q.astype(np.float32), det_score=p, embedding=l2_normalize(desc[k]),
                        blur=float(blurs[k]), yaw=yaw, pitch=pitch, roll=roll,
                        extra={"descriptor_norm": float(np.linalg.norm(desc[k]))},
                    )
                )
                k += 1
            results.append(faces)
        self.timings["detect_s"] += t1 - t0
        self.timings["align_s"] += t2 - t1
        self.timings["embed_s"] += t3 - t2
        self.timings["quality_s"] += time.perf_counter() - t3
        return results


def dlib_face_backend(device: str = "auto", detector: str | None = None, **options) -> FaceBackend:
    """The dlib-descriptor face backend for ``device``: on CUDA with MTCNN (the default there),
    the batched :class:`TorchFaceStage`; otherwise :class:`DlibBackend` (HOG by default on CPU,
    the ported descriptor on ``device``)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and detector in (None, "", "mtcnn"):
        keep = {k: v for k, v in options.items() if k in ("dtype", "detect_max_side", "min_face", "min_prob", "decode_workers")}
        return TorchFaceStage(device=str(dev), **keep)
    from .dlib_backend import DlibBackend

    return DlibBackend(detector=detector or "hog", device=str(dev), **options)
