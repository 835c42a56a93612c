"""Progress of a multi-identity build, as lines for a log: a 100k-face build takes 15-20 min on 2 cores, a
refresh a few, and the Dagster UI should show where it is (``build_multiid_dataset(progress=...)``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def counted(count: int, noun: str, plural: str = "s") -> str:
    """"1 target", "2,000 targets"."""
    return f"{count:,} {noun}{'' if count == 1 else plural}"


class BuildProgress:
    """``report(line)`` with the seconds since the build began; ``None``: silent."""

    def __init__(self, report: Callable[[str], None] | None = None):
        self.report = report
        self.t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        if self.report is not None:
            self.report(f"{line} [{time.perf_counter() - self.t0:.0f} s]")

    def counter(self, what: str, total: int, every_s: float = 10.0) -> Callable[[int], None]:
        """A callable adding ``n`` done to ``total`` and reporting the count, the share and an estimate of the
        time left (from the rate since the counter began): at most once every ``every_s`` seconds, and at the end."""
        start, done, last = time.perf_counter(), [0], [float("-inf")]

        def add(n: int) -> None:
            done[0] += n
            now = time.perf_counter()
            if self.report is None or total <= 0 or (done[0] < total and now - last[0] < every_s):
                return
            last[0] = now
            spent = now - start
            # an estimate once a tenth is done (before that, the first items' rate says little)
            left = spent * (total - done[0]) / done[0] if done[0] else float("nan")
            tail = f", about {left:.0f} s left" if total * 0.1 <= done[0] < total and left >= 1 else ""
            self(f"{what}: {done[0]:,}/{total:,} ({100 * done[0] / total:.0f}%){tail}")

        return add
