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

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
            self.evictions += 1
