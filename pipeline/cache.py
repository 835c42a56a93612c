"""A bounded cache: what a builder keeps in memory stays below a fixed number of entries."""

from __future__ import annotations

from collections import OrderedDict


class LRU(OrderedDict):
    """A dict that keeps only its ``capacity`` most recently used entries (counts its evictions). With
    ``weight`` (value -> a number, e.g. ``len`` of bytes), ``capacity`` bounds the entries' total weight
    instead of their number (the newest entry is kept even when it alone weighs more)."""

    def __init__(self, capacity: int, weight=None):
        super().__init__()
        self.capacity = max(1, int(capacity))
        self.evictions = 0
        self.weight = weight
        self.total = 0  # the entries' total weight (with ``weight``)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        if self.weight is not None:
            if key in self:
                self.total -= self.weight(super().__getitem__(key))
            self.total += self.weight(value)
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > 1 and (self.total if self.weight is not None else len(self)) > self.capacity:
            _, old = self.popitem(last=False)
            if self.weight is not None:
                self.total -= self.weight(old)
            self.evictions += 1
