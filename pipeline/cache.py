"""A bounded cache: what a builder keeps in memory stays below a fixed number of entries."""

from __future__ import annotations

from collections import OrderedDict


class LRU(OrderedDict):
    """A dict that keeps only its ``capacity`` most recently used entries (counts its evictions)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(1, int(capacity))
        self.evictions = 0

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def get(self, key, default=None):
        # OrderedDict.get bypasses __getitem__: without this a hit through .get never counts as a use
        if key in self:
            return self[key]
        return default

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
            self.evictions += 1


class BytesLRU:
    """Byte strings by key, the most recently used kept while their total length stays within
    ``max_bytes`` (at least one is always kept). ``load(key)`` gives the bytes of a key not held."""

    def __init__(self, load, max_bytes: int):
        self._load = load
        self.max_bytes = max(1, int(max_bytes))
        self._held: OrderedDict = OrderedDict()
        self.bytes = 0
        self.loads = 0
        self.evictions = 0

    def peek(self, key) -> bytes | None:
        """The bytes of ``key`` when held (not loaded, not made recent)."""
        return self._held.get(key)

    def get(self, key) -> bytes:
        b = self._held.get(key)
        if b is not None:
            self._held.move_to_end(key)
            return b
        b = self._load(key)
        self.loads += 1
        self._held[key] = b
        self.bytes += len(b)
        while self.bytes > self.max_bytes and len(self._held) > 1:
            _, old = self._held.popitem(last=False)
            self.bytes -= len(old)
            self.evictions += 1
        return b
