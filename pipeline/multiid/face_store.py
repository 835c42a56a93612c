"""What the copy-paste guard derives from one face or one photo (a face's SIFT keypoints, a photo's face
fingerprints with their NCC patches, the photo's bytes as read), worked out once for all the forked
selection workers of a build.

Without it each worker computed the keypoints of every face it compared (SIFT: ~60% of the selection's
CPU) and decoded every photo it compared: a popular reference, compared by targets in both workers, was
worked out twice (2 workers took 1.35-1.40x the CPU-s of one process). Here the first worker to need an
entry claims it (a file created with O_EXCL in a folder the workers share), computes it and publishes it
(written, then renamed into place); a worker that needs an entry claimed by another waits for it (a
computation takes ~50 ms and never waits on another entry, so no worker waits on a waiting one). What is
published is what the worker would have computed itself, exactly (SIFT descriptors are whole numbers in
0..255, kept as uint8 when they are), so the selections, and the files written, do not change.

The store is on local disk: Ray tasks, which share no disk with the driver, keep computing their own.
Past ``max_bytes`` (per worker) a worker stops publishing and computes what nobody has published yet.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from pathlib import Path

from pipeline.multiid import dedup

STORE_BYTES_PER_WORKER = 2 << 30  # what one worker may publish (a face's keypoints ~165 KB, a photo's fingerprints ~25 KB a face)
WAIT_S = 600.0  # a claim not published by then (its worker died): computed here


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:
        pass  # the waiters compute it themselves after WAIT_S


def _pack(kind: str, value):
    if kind == "kp" and value is not None:
        return (value.pts, value.stored_desc(), value.pts_m, value.stored_desc(mirrored=True), value.size)
    return value


def _unpack(kind: str, value):
    if kind == "kp" and value is not None:
        pts, desc, pts_m, desc_m, size = value
        return dedup.KeypointSet(pts, desc, pts_m, desc_m, tuple(size))
    return value


class SharedFaceStore:
    """Entries by (kind, photo uid, face index) in ``folder``, each computed by one process of those sharing it."""

    def __init__(self, folder: Path, max_bytes: int = STORE_BYTES_PER_WORKER):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.written = 0
        self.computed = 0  # entries this process computed (published or not)
        self.loaded = 0  # entries this process took from the store

    def _path(self, kind: str, uid: str, face_index: int | None, suffix: str) -> Path:
        name = hashlib.blake2b(f"{kind}|{uid}|{face_index}".encode(), digest_size=12).hexdigest()
        return self.folder / f"{kind}-{name}{suffix}"

    def get(self, kind: str, uid: str, face_index: int | None, compute):
        """The entry, from the store when published, else ``compute()``'s (published when this process claims it)."""
        done = self._path(kind, uid, face_index, ".done")
        if not done.exists():
            if self.written >= self.max_bytes:
                self.computed += 1
                return compute()
            failed = self._path(kind, uid, face_index, ".failed")
            try:
                os.close(os.open(self._path(kind, uid, face_index, ".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return self._wait(kind, done, failed, compute)
            except OSError:  # the store cannot take more (a full disk): compute here, publish nothing more
                self.max_bytes = 0
                self.computed += 1
                return compute()
            self.computed += 1
            try:
                value = compute()
            except BaseException:
                _touch(failed)  # the waiters compute it themselves (and fail the same way)
                raise
            if not self._publish(self._path(kind, uid, face_index, ""), pickle.dumps(_pack(kind, value), protocol=pickle.HIGHEST_PROTOCOL)):
                _touch(failed)
            return value
        self.loaded += 1
        return _unpack(kind, pickle.loads(done.read_bytes()))

    def put(self, kind: str, uid: str, face_index: int | None, value) -> None:
        """Publish an entry this process alone works out (the pHash pass: each photo in one chunk), within the budget."""
        if self.written < self.max_bytes:
            self._publish(self._path(kind, uid, face_index, ""), pickle.dumps(_pack(kind, value), protocol=pickle.HIGHEST_PROTOCOL))

    def put_bytes(self, uid: str, data: bytes) -> None:
        """Publish a photo's bytes as read (a read can be a download, or in the benchmark a synthesis), within
        the budget (two workers reading one photo at once both publish it: the same bytes)."""
        if self.written < self.max_bytes:
            self._publish(self._path("raw", uid, None, ""), data)

    def _publish(self, base: Path, data: bytes) -> bool:
        """Write ``data`` as ``base.done`` (written aside, then renamed into place). A failed write (a full
        disk) stops this process publishing; the build goes on, computing what it does not find."""
        tmp = Path(f"{base}.tmp{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, Path(f"{base}.done"))
        except OSError:
            tmp.unlink(missing_ok=True)
            self.max_bytes = 0
            return False
        self.written += len(data)
        return True

    def reader(self, read_bytes, publish: bool = True):
        """``read_bytes`` that takes a photo's published bytes when there are, and publishes those it reads
        (unless ``publish`` is False: a read no other worker will repeat)."""
        def read(uid: str) -> bytes:
            try:
                data = self._path("raw", uid, None, ".done").read_bytes()
            except FileNotFoundError:
                data = read_bytes(uid)
                if publish:
                    self.put_bytes(uid, data)
                return data
            self.loaded += 1
            return data

        return read

    def _wait(self, kind: str, done: Path, failed: Path, compute):
        t0, pause = time.monotonic(), 0.001
        while not done.exists():
            if failed.exists() or time.monotonic() - t0 > WAIT_S:
                self.computed += 1
                return compute()
            time.sleep(pause)
            pause = min(0.02, pause * 2)
        self.loaded += 1
        return _unpack(kind, pickle.loads(done.read_bytes()))
