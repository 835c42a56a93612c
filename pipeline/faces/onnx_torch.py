"""Run ONNX face models through PyTorch (onnx2torch), behind onnxruntime's session interface.

The insightface backend talks to an ``onnxruntime.InferenceSession`` (``get_inputs``,
``get_outputs``, ``run``). :class:`TorchOnnxSession` offers the same four calls over the same
ONNX file converted with onnx2torch, so SCRFD and ArcFace run unchanged wherever torch has a GPU
(onnxruntime-gpu is often missing or built for another CUDA than torch's). Batching follows the
model's declared input shape exactly as with onnxruntime.

:func:`choose_runtime` decides between the two: ``auto`` takes onnxruntime when it has a CUDA
provider, else torch when torch sees a GPU, else onnxruntime on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RUNTIMES = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class TensorInfo:
    """onnxruntime's NodeArg: name, shape (ints, or strings/None for dynamic axes), type."""

    name: str
    shape: list
    type: str = "tensor(float)"


def _shape(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


class TorchOnnxSession:
    """An ONNX file converted by onnx2torch, run on ``device`` ("cpu", "cuda", "cuda:1", ...)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        import onnx
        import torch
        from onnx2torch import convert

        self.path = Path(path)
        model = onnx.load(str(self.path))
        graph = model.graph
        initializers = {i.name for i in graph.initializer}
        self._inputs = [TensorInfo(v.name, _shape(v)) for v in graph.input if v.name not in initializers]
        self._outputs = [TensorInfo(v.name, _shape(v)) for v in graph.output]
        self.device = torch.device(device)
        self.threads = threads
        self.module = convert(model).to(self.device).eval()

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"torch:{self.device}"]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        missing = [i.name for i in self._inputs if i.name not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing}")
        args = [torch.as_tensor(np.ascontiguousarray(feeds[i.name])).to(self.device) for i in self._inputs]
        before = torch.get_num_threads()
        if self.device.type == "cpu" and self.threads:
            torch.set_num_threads(int(self.threads))
        try:
            with torch.inference_mode():
                out = self.module(*args)
        finally:
            if self.device.type == "cpu" and self.threads:
                torch.set_num_threads(before)
        if isinstance(out, torch.Tensor):
            out = (out,)
        by_name = dict(zip((o.name for o in self._outputs), out))
        names = output_names or [o.name for o in self._outputs]
        return [by_name[n].detach().float().cpu().numpy() for n in names]


def onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_runtime(runtime: str = "auto", device: str = "auto") -> tuple[str, str]:
    """(runtime, device) to run the face models with.

    ``device``: "auto" (a GPU when one is usable), "cpu" or "cuda[:n]". ``runtime``: "auto",
    "onnxruntime" or "torch". auto: onnxruntime on CUDA if its CUDA provider is there and a GPU
    is wanted; else torch on CUDA if torch sees a GPU; else onnxruntime on CPU.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    import torch

    want_gpu = device not in ("cpu",)
    torch_gpu = want_gpu and torch.cuda.is_available()
    torch_device = (device if device not in ("auto", "", None) else "cuda") if torch_gpu else "cpu"
    if runtime == "torch":
        return "torch", torch_device if want_gpu else "cpu"
    if runtime == "onnxruntime":
        return "onnxruntime", "cuda" if (want_gpu and onnxruntime_has_cuda()) else "cpu"
    if want_gpu and onnxruntime_has_cuda():
        return "onnxruntime", "cuda"
    if torch_gpu:
        return "torch", torch_device
    return "onnxruntime", "cpu"
