"""Photos read and decoded, counted apart from any stage's own counters (tests/test_per_image.py and
bench/bench_decode_once.py check that the fused pass reads and decodes each photo once).

Every stage reads a photo through ``pipeline.sources.read_bytes`` and decodes it with the decoder that
ingestion and every re-reading stage call (``pipeline.ingest.decode_image``): the counter wraps both."""

from __future__ import annotations

from collections.abc import Callable


class ReadDecodeCounter:
    """``reads`` and ``bytes`` (calls of sources.read_bytes and the bytes they returned) and ``decodes``
    (calls of ingest.decode_image) from the moment it is made.

    ``set_attribute`` puts the counting functions in place: the builtin setattr for good (a benchmark
    process), or pytest's ``monkeypatch.setattr``, which puts the real ones back after the test."""

    def __init__(self, set_attribute: Callable[[object, str, object], None] = setattr):
        import pipeline.ingest as ingest_module
        import pipeline.sources as sources_module

        self.reads = self.bytes = self.decodes = 0
        real_read, real_decode = sources_module.read_bytes, ingest_module.decode_image

        def read_bytes(*a, **k):
            data = real_read(*a, **k)
            self.reads += 1
            self.bytes += len(data)
            return data

        def decode_image(*a, **k):
            self.decodes += 1
            return real_decode(*a, **k)

        set_attribute(sources_module, "read_bytes", read_bytes)
        set_attribute(ingest_module, "decode_image", decode_image)
