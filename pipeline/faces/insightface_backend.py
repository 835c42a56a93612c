"""insightface backend: SCRFD detector + ArcFace recognizer, ONNX, from a local model pack.

The model folder uses insightface's model-pack layout, e.g. ``buffalo_l/`` (det_10g.onnx,
w600k_r50.onnx, plus 1k3d68.onnx, 2d106det.onnx, genderage.onnx that are ignored) or
``antelopev2/`` (scrfd_10g_bnkps.onnx, glintr100.onnx, ...). Which file is the detector and
which the recognizer is decided from the input/output signatures, as insightface's
model_zoo does: a detector has >= 5 outputs (6/9 for SCRFD with 2 anchors and 3 strides,
10/15 for 5 strides), a recognizer takes Nx3x112x112 (square, >= 112, multiple of 16) and
returns an NxD embedding. Nothing is downloaded.

Pre- and post-processing follow insightface 0.7 (model_zoo/scrfd.py, arcface_onnx.py,
utils/face_align.py): insightface feeds BGR images to cv2.dnn.blobFromImage(swapRB=True),
so both networks receive RGB; our inputs are RGB already, so no channel swap is done.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .align import estimate_pose, laplacian_variance, norm_crop
from .base import DetectedFace, FaceBackend, check_rgb, l2_normalize

log = logging.getLogger(__name__)

KNOWN_PACKS = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
}


def _expected_files_message(model_dir: Path) -> str:
    packs = "; ".join(
        f"{k}: {d} (SCRFD detector) + {r} (ArcFace recognizer)" for k, (d, r) in KNOWN_PACKS.items()
    )
    return (
        f"expected an insightface model pack in {model_dir}: one SCRFD detector .onnx (1x3xHxW input, "
        f"6/9/10/15 outputs) and one ArcFace recognizer .onnx (Nx3x112x112 input, NxD output), e.g. {packs}. "
        "Copy the unpacked pack there (insightface keeps them in ~/.insightface/models/<pack>/); "
        "nothing is downloaded at run time"
    )


def _dim(v) -> int | None:
    return v if isinstance(v, int) and v > 0 else None


def _providers(prefer_gpu: bool = True) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if prefer_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path, providers: list[str], threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def classify_onnx(session) -> str:
    """'detector', 'recognizer' or 'other' from an onnxruntime session's signature."""
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    shape = list(inputs[0].shape)
    if len(outputs) >= 5:
        return "detector"
    # 192x192 inputs are insightface's landmark models (2d106det, 1k3d68), 96x96 genderage
    if len(shape) == 4 and len(inputs) == 1 and len(outputs) == 1:
        h, w = _dim(shape[2]), _dim(shape[3])
        out_shape = list(outputs[0].shape)
        if h is not None and h == w and h >= 112 and h % 16 == 0 and h != 192 and len(out_shape) == 2:
            return "recognizer"
    return "other"


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS as in insightface (areas with the +1 pixel convention)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, distance.shape[1], 2):
        out.append(points[:, i % 2] + distance[:, i])
        out.append(points[:, i % 2 + 1] + distance[:, i + 1])
    return np.stack(out, axis=-1)


class SCRFD:
    """SCRFD face detector (insightface model_zoo/scrfd.py semantics, numpy post-processing)."""

    def __init__(
        self,
        session,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
    ) -> None:
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in session.get_outputs()]
        h, w = _dim(inp.shape[2]), _dim(inp.shape[3])
        self.input_size = (w, h) if (h and w) else (int(det_size[0]), int(det_size[1]))  # (width, height)
        self.batched = len(session.get_outputs()[0].shape) == 3
        self.dynamic_batch = _dim(inp.shape[0]) is None
        n = len(self.output_names)
        self.use_kps = n in (9, 15)
        self.fmc, self.strides, self.num_anchors = {
            6: (3, [8, 16, 32], 2),
            9: (3, [8, 16, 32], 2),
            10: (5, [8, 16, 32, 64, 128], 1),
            15: (5, [8, 16, 32, 64, 128], 1),
        }.get(n, (None, None, None))
        if self.fmc is None:
            raise ValueError(f"unsupported SCRFD output count {n} (expected 6, 9, 10 or 15)")
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        self.input_mean = 127.5
        self.input_std = 128.0
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Letterbox (top-left, zero pad) an RGB image into the input size: (1x3xHxW float32 blob, scale)."""
        W, H = self.input_size
        ih, iw = image.shape[:2]
        im_ratio = ih / iw
        model_ratio = H / W
        if im_ratio > model_ratio:
            new_h = H
            new_w = int(new_h / im_ratio)
        else:
            new_w = W
            new_h = int(new_w * im_ratio)
        new_w, new_h = max(1, new_w), max(1, new_h)
        det_scale = new_h / ih
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
        canvas = np.zeros((H, W, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = resized
        blob = (canvas.astype(np.float32) - self.input_mean) / self.input_std
        return blob.transpose(2, 0, 1)[None], det_scale

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        c = self._centers.get(key)
        if c is None:
            c = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
            c = (c * stride).reshape(-1, 2)
            if self.num_anchors > 1:
                c = np.stack([c] * self.num_anchors, axis=1).reshape(-1, 2)
            if len(self._centers) < 100:
                self._centers[key] = c
        return c

    def decode(self, outs: list[np.ndarray], input_hw: tuple[int, int], b: int = 0):
        """(boxes (N,4), scores (N,), kps (N,5,2) or None) in letterboxed input pixels, before NMS."""
        H, W = input_hw
        scores_l, boxes_l, kps_l = [], [], []
        fmc = self.fmc
        for idx, stride in enumerate(self.strides):
            if self.batched:
                scores = outs[idx][b]
                bbox_preds = outs[idx + fmc][b] * stride
                kps_preds = outs[idx + fmc * 2][b] * stride if self.use_kps else None
            else:
                scores = outs[idx]
                bbox_preds = outs[idx + fmc] * stride
                kps_preds = outs[idx + fmc * 2] * stride if self.use_kps else None
            centers = self._anchor_centers(H // stride, W // stride, stride)
            scores = scores.reshape(-1)
            pos = np.where(scores >= self.det_thresh)[0]
            if pos.size == 0:
                continue
            boxes = distance2bbox(centers, bbox_preds.reshape(-1, 4))
            scores_l.append(scores[pos])
            boxes_l.append(boxes[pos])
            if self.use_kps:
                kps = distance2kps(centers, kps_preds.reshape(len(centers), -1)).reshape(len(centers), -1, 2)
                kps_l.append(kps[pos])
        if not scores_l:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros((0,), np.float32),
                (np.zeros((0, 5, 2), np.float32) if self.use_kps else None),
            )
        return np.vstack(boxes_l), np.concatenate(scores_l), (np.vstack(kps_l) if self.use_kps else None)

    def postprocess(self, outs, input_hw, det_scale, b: int = 0, max_num: int = 0):
        boxes, scores, kps = self.decode(outs, input_hw, b)
        boxes = boxes / det_scale
        if kps is not None:
            kps = kps / det_scale
        order = np.argsort(-scores, kind="stable")
        boxes, scores = boxes[order], scores[order]
        kps = kps[order] if kps is not None else None
        keep = nms(boxes, scores, self.nms_thresh)
        boxes, scores = boxes[keep], scores[keep]
        kps = kps[keep] if kps is not None else None
        if max_num and len(boxes) > max_num:
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            sel = np.argsort(-area, kind="stable")[:max_num]
            boxes, scores = boxes[sel], scores[sel]
            kps = kps[sel] if kps is not None else None
        return (
            boxes.astype(np.float32),
            scores.astype(np.float32),
            (kps.astype(np.float32) if kps is not None else None),
        )

    def detect(self, images: list[np.ndarray], max_num: int = 0):
        """Per image: (boxes (N,4), scores (N,), kps (N,5,2) or None) in image pixels."""
        results = []
        blobs, scales = zip(*(self.preprocess(im) for im in images)) if images else ((), ())
        H, W = self.input_size[1], self.input_size[0]
        if self.batched and self.dynamic_batch and len(images) > 1:
            outs = self.session.run(self.output_names, {self.input_name: np.concatenate(blobs)})
            return [self.postprocess(outs, (H, W), s, b, max_num) for b, s in enumerate(scales)]
        for blob, s in zip(blobs, scales):
            outs = self.session.run(self.output_names, {self.input_name: blob})
            results.append(self.postprocess(outs, (H, W), s, 0, max_num))
        return results


class ArcFace:
    """ArcFace recognizer (insightface model_zoo/arcface_onnx.py semantics)."""

    def __init__(self, session, model_path: Path | None = None) -> None:
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = session.get_outputs()[0].name
        self.input_size = int(inp.shape[2])
        self.dynamic_batch = _dim(inp.shape[0]) is None
        self.embedding_dim = _dim(session.get_outputs()[0].shape[1]) or 0
        self.input_mean, self.input_std = 127.5, 127.5
        if model_path is not None:
            # insightface: models converted from mxnet start with Sub/Mul nodes that normalise
            # themselves; feed them raw pixels
            try:
                import onnx

                graph = onnx.load(str(model_path), load_external_data=False).graph
                ops = [n.op_type for n in graph.node[:8]]
                if "Sub" in ops and "Mul" in ops:
                    self.input_mean, self.input_std = 0.0, 1.0
            except Exception as exc:  # noqa: BLE001 - a heuristic; the session already loaded the file
                log.warning(
                    "could not inspect %s for built-in normalisation (%s); assuming (x-127.5)/127.5",
                    model_path,
                    exc,
                )

    def embed_crops(self, crops: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.embedding_dim), np.float32)
        x = (np.stack(crops).astype(np.float32) - self.input_mean) / self.input_std
        x = x.transpose(0, 3, 1, 2)
        outs = []
        step = batch_size if self.dynamic_batch else 1
        for i in range(0, len(x), step):
            outs.append(
                self.session.run(
                    [self.output_name], {self.input_name: np.ascontiguousarray(x[i : i + step])}
                )[0]
            )
        emb = np.vstack(outs).astype(np.float32)
        if not self.embedding_dim:
            self.embedding_dim = emb.shape[1]
        return emb


class InsightFaceBackend(FaceBackend):
    """SCRFD + ArcFace from ``model_dir`` (an insightface model pack).

    Options: ``det_size`` (640, 640) used when the detector input is dynamic; ``det_thresh``
    0.5; ``nms_thresh`` 0.4; ``max_faces`` 0 (= all); ``prefer_gpu`` True
    (CUDAExecutionProvider when onnxruntime offers it); ``threads`` (intra-op threads);
    ``rec_batch_size`` 32; ``detector_file`` / ``recognizer_file`` to force a choice.
    ``runtime`` ("auto", "onnxruntime" or "torch": the same ONNX files converted by onnx2torch,
    see pipeline/faces/onnx_torch.py) and ``device`` ("auto", "cpu", "cuda"): auto runs
    onnxruntime on CUDA when its CUDA provider exists, else torch on CUDA when torch sees a GPU,
    else onnxruntime on CPU. ``prefer_gpu=False`` is ``device="cpu"``.
    """

    name = "insightface"

    def __init__(
        self,
        model_dir: str | Path,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
        max_faces: int = 0,
        prefer_gpu: bool = True,
        threads: int | None = None,
        rec_batch_size: int = 32,
        detector_file: str | None = None,
        recognizer_file: str | None = None,
        runtime: str = "auto",
        device: str = "auto",
    ) -> None:
        from .onnx_torch import choose_runtime

        model_dir = Path(model_dir).expanduser()
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"insightface model directory {model_dir} does not exist; "
                + _expected_files_message(model_dir)
            )
        files = sorted(model_dir.glob("*.onnx"))
        if not files:
            raise FileNotFoundError(f"no .onnx files in {model_dir}; " + _expected_files_message(model_dir))
        self.runtime, self.device = choose_runtime(runtime, device if prefer_gpu else "cpu")
        self.providers = (
            _providers(self.device != "cpu") if self.runtime == "onnxruntime" else [f"torch:{self.device}"]
        )
        det_path = rec_path = None
        det_sess = rec_sess = None
        load_errors: list[str] = []
        for f in files:
            forced = None
            if detector_file and f.name == detector_file:
                forced = "detector"
            elif recognizer_file and f.name == recognizer_file:
                forced = "recognizer"
            try:
                sess = self._open(f, threads)
            except Exception as exc:
                if forced:
                    raise ValueError(f"cannot load {f}: {exc}") from exc
                load_errors.append(f"{f.name} could not be loaded ({str(exc).splitlines()[0][:200]})")
                continue  # unreadable extra files are ignored unless the detector/recognizer is then missing
            kind = forced or classify_onnx(sess)
            if kind == "detector" and det_sess is None and (not detector_file or f.name == detector_file):
                det_path, det_sess = f, sess
            elif (
                kind == "recognizer"
                and rec_sess is None
                and (not recognizer_file or f.name == recognizer_file)
            ):
                rec_path, rec_sess = f, sess
        missing = [
            k for k, s in (("SCRFD detector", det_sess), ("ArcFace recognizer", rec_sess)) if s is None
        ]
        if missing:
            raise FileNotFoundError(
                f"{model_dir} holds {', '.join(f.name for f in files)} but no {' and no '.join(missing)} "
                "(identified by input/output signature); "
                + "".join(e + "; " for e in load_errors)
                + _expected_files_message(model_dir)
            )
        self.model_dir = model_dir
        self.detector = SCRFD(det_sess, det_size=det_size, det_thresh=det_thresh, nms_thresh=nms_thresh)
        if not self.detector.use_kps:
            raise ValueError(
                f"{det_path} is an SCRFD model without keypoints ({len(self.detector.output_names)} outputs): "
                "faces cannot be aligned for ArcFace; use a *_bnkps / det_10g model (9 or 15 outputs)"
            )
        self.recognizer = ArcFace(rec_sess, rec_path)
        self.detector_path, self.recognizer_path = det_path, rec_path
        self.max_faces = int(max_faces)
        self.rec_batch_size = int(rec_batch_size)
        self.embedding_dim = self.recognizer.embedding_dim
        self.model_version = f"insightface/{model_dir.name}/{det_path.stem}+{rec_path.stem}"
        self.face_stage = {"backend": self.name, "detector": det_path.stem, "landmarks": f"{det_path.stem}-kps5",
                           "descriptor": rec_path.stem}
        if not self.embedding_dim:
            self.embedding_dim = int(
                self.recognizer.embed_crops([np.zeros((112, 112, 3), np.uint8)]).shape[1]
            )
        self.timings: dict[str, float] = {"detect_s": 0.0, "align_s": 0.0, "embed_s": 0.0, "quality_s": 0.0}

    def _open(self, path: Path, threads: int | None):
        if self.runtime == "torch":
            from .onnx_torch import TorchOnnxSession

            return TorchOnnxSession(path, self.device, threads)
        return _session(path, self.providers, threads)

    def analyze(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        images = [check_rgb(im) for im in images]
        t0 = time.perf_counter()
        dets = self.detector.detect(images, self.max_faces)
        t1 = time.perf_counter()
        crops, owners = [], []
        per_image = []
        for i, (im, (boxes, scores, kps)) in enumerate(zip(images, dets)):
            h, w = im.shape[:2]
            faces = []
            for j in range(len(boxes)):
                box = boxes[j].copy()
                box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
                box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    continue
                lmk = kps[j]
                crop = norm_crop(im, lmk, self.recognizer.input_size)
                crops.append(crop)
                owners.append((i, len(faces)))
                faces.append([box, lmk, float(scores[j]), crop])
            per_image.append(faces)
        t2 = time.perf_counter()
        emb = (
            l2_normalize(self.recognizer.embed_crops(crops, self.rec_batch_size))
            if crops
            else np.zeros((0, self.embedding_dim), np.float32)
        )
        t3 = time.perf_counter()
        results: list[list[DetectedFace]] = [[] for _ in images]
        for k, (i, j) in enumerate(owners):
            box, lmk, score, crop = per_image[i][j]
            yaw, pitch, roll = estimate_pose(lmk)
            results[i].append(
                DetectedFace(
                    bbox=box,
                    landmarks=lmk,
                    det_score=score,
                    embedding=emb[k],
                    blur=laplacian_variance(crop),
                    yaw=yaw,
                    pitch=pitch,
                    roll=roll,
                )
            )
        self.timings["detect_s"] += t1 - t0
        self.timings["align_s"] += t2 - t1
        self.timings["embed_s"] += t3 - t2
        self.timings["quality_s"] += time.perf_counter() - t3
        return results
