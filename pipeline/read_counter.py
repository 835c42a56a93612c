"""Photos read and decoded, counted apart from any stage's own counters (tests/test_per_image.py and
bench/bench_decode_once.py check that the fused pass reads and decodes each photo once).

Every stage reads a photo through ``pipeline.sources.read_bytes`` and decodes it with the decoder that
ingestion and every re-reading stage call (``pipeline.ingest.decode_image``), or, for a face backend that
decodes on its device (the torch stage), with that decoder from ``pipeline.decode`` on its CPU threads or
with nvjpeg (``pipeline.faces.torch_stage.device_decode_jpeg``): the counter wraps all of them."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable


class ReadDecodeCounter:
    """``reads`` and ``bytes`` (calls of sources.read_bytes and the bytes they returned) and ``decodes``
    (photos decoded: calls of ingest.decode_image and of decode.decode_image, each call counted once
    whichever name it went through, and images nvjpeg decoded) from the moment it is made.

    ``set_attribute`` puts the counting functions in place: the builtin setattr for good (a benchmark
    process), or pytest's ``monkeypatch.setattr``, which puts the real ones back after the test."""

    def __init__(self, set_attribute: Callable[[object, str, object], None] = setattr):
        import pipeline.decode as decode_module
        import pipeline.ingest as ingest_module
        import pipeline.sources as sources_module

        self.reads = self.bytes = self.decodes = 0
        real_read = sources_module.read_bytes

        def read_bytes(*a, **k):
            data = real_read(*a, **k)
            self.reads += 1
            self.bytes += len(data)
            return data

        def counting(real):
            def decode_image(*a, **k):
                self.decodes += 1
                return real(*a, **k)

            return decode_image

        set_attribute(sources_module, "read_bytes", read_bytes)
        # the same function under two names: a call goes through one of them, each wrapper calls the real one
        set_attribute(ingest_module, "decode_image", counting(ingest_module.decode_image))
        set_attribute(decode_module, "decode_image", counting(decode_module.decode_image))
        if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("torchvision") is not None:
            from pipeline.faces import torch_stage

            real_device = torch_stage.device_decode_jpeg

            def device_decode_jpeg(blobs, device):
                out = real_device(blobs, device)
                self.decodes += len(blobs)
                return out

            set_attribute(torch_stage, "device_decode_jpeg", device_decode_jpeg)
