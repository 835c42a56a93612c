"""The copy-paste guard's decisions, kept across builds.

The costly part of the guard (face NCC, SIFT keypoints + RANSAC; about two thirds of a target's CPU time,
measured with cProfile in bench_multiid_refresh.py) depends only on the two faces compared and on the
guard's settings. A refresh selects again the targets whose people gained or lost a face, and those
targets meet mostly the same (target face, candidate face) pairs as last time: the decisions recorded
here are taken instead of computed again.

A decision is keyed by both faces' content (the photo's uid, which is its content hash, the face index,
box and landmarks) and by the guard's settings, so a changed photo, face model or threshold never meets
an old decision. The file lives outside the dataset versions (the versions stay byte-identical to a
fresh build); it holds the two photo uids of each decision in the clear so that a removal can drop them
(:func:`purge_guard_decisions`).

Beside it, in ``<name>.phash.parquet`` (:class:`PhotoHashes`): each photo's pHashes (the image's, and the
face crop's and its mirror's for every comparable face), so that a target selected again by a refresh
decodes no photo whose hashes a build already worked out. Written with the decisions, purged with them.
And in ``<name>.features/`` (:class:`FaceFeatures`): the SIFT keypoints and NCC patches of the faces a
build compared, so that a refresh comparing a new face with an old one neither decodes the old photo nor
runs SIFT on it again. Purged with the decisions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.multiid import dedup

GUARD_VERSION = 1  # bump when dedup.compare's results change for the same inputs
SCHEMA = pa.schema([
    ("k0", pa.uint64()), ("k1", pa.uint64()),
    ("a_uid", pa.string()), ("b_uid", pa.string()),
    ("image_hamming", pa.int32()), ("face_hamming", pa.int32()), ("face_ncc", pa.float64()),
    ("is_duplicate", pa.bool_()), ("reason", pa.string()),
    ("kp_inliers", pa.int32()), ("kp_ratio", pa.float64()), ("kp_duplicate", pa.bool_()),
])


def face_key(f) -> str:
    """A face's content: its photo (uid = content hash), index, box and landmarks."""
    box = ",".join(f"{float(v):.2f}" for v in f.bbox)
    lm = ",".join(f"{float(v):.2f}" for v in np.asarray(f.landmarks, dtype=np.float64).ravel())
    return f"{f.uid}:{f.face_index}:{box}:{lm}"


class GuardDecisions:
    """Decisions read from ``path`` (if any), looked up by (face a, face b); new ones collected for :meth:`save`."""

    def __init__(self, path: Path | None, settings: dict, feature_store_bytes: int | None = None):
        self.path = Path(path) if path is not None else None
        self.salt = hashlib.sha256(json.dumps({"v": GUARD_VERSION, **settings}, sort_keys=True).encode()).digest()[:16]
        self.keys = np.zeros(0, dtype=[("k0", "<u8"), ("k1", "<u8")])
        self.table: pa.Table | None = None
        self.new: list[dict] = []
        self._new_at: dict[tuple[int, int], int] = {}  # key -> its row in ``new`` (a pair met twice in one build)
        self.hits = 0
        # the photos' pHashes, kept beside the decisions (None without a file)
        self.photos = PhotoHashes(photo_hashes_path(self.path)) if self.path is not None else None
        # the faces' keypoints and NCC patches (None without a file)
        self.features = (FaceFeatures(face_features_dir(self.path), FEATURES_MAX_BYTES if feature_store_bytes is None
                                      else feature_store_bytes) if self.path is not None else None)
        if self.path is not None and self.path.exists():
            from pipeline.storage import read_parquet

            t = read_parquet(self.path)
            order = np.lexsort((t.column("k1").to_numpy(), t.column("k0").to_numpy()))
            t = t.take(pa.array(order))
            self.table = t
            self.keys = np.empty(t.num_rows, dtype=self.keys.dtype)
            self.keys["k0"], self.keys["k1"] = t.column("k0").to_numpy(), t.column("k1").to_numpy()
            self._cols = {c: t.column(c).to_pylist() for c in SCHEMA.names[4:]}

    def __len__(self) -> int:
        return len(self.keys)

    def _key(self, a, b) -> tuple[int, int]:
        h = hashlib.blake2b(self.salt + face_key(a).encode() + b"|" + face_key(b).encode(), digest_size=16).digest()
        return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")

    def compare(self, a, b, compute) -> dedup.DupCheck:
        """The decision for faces ``a`` (target side) and ``b``: the recorded one, else ``compute()``'s, recorded."""
        k = self._key(a, b)
        at = self._new_at.get(k)
        if at is not None:
            self.hits += 1
            r = self.new[at]
            return dedup.DupCheck(r["image_hamming"], r["face_hamming"], r["face_ncc"], r["is_duplicate"], r["reason"],
                                  r["kp_inliers"], r["kp_ratio"], r["kp_duplicate"])
        if len(self.keys):
            probe = np.array([k], dtype=self.keys.dtype)
            i = int(np.searchsorted(self.keys, probe[0]))
            if i < len(self.keys) and self.keys[i] == probe[0]:
                self.hits += 1
                c = self._cols
                return dedup.DupCheck(c["image_hamming"][i], c["face_hamming"][i], c["face_ncc"][i], c["is_duplicate"][i],
                                      c["reason"][i], c["kp_inliers"][i], c["kp_ratio"][i], c["kp_duplicate"][i])
        chk = compute()
        self._new_at[k] = len(self.new)
        self.new.append({"k0": k[0], "k1": k[1], "a_uid": a.uid, "b_uid": b.uid, "image_hamming": chk.image_hamming,
                         "face_hamming": chk.face_hamming, "face_ncc": chk.face_ncc, "is_duplicate": chk.is_duplicate,
                         "reason": chk.reason, "kp_inliers": chk.kp_inliers, "kp_ratio": chk.kp_ratio,
                         "kp_duplicate": chk.kp_duplicate})
        return chk

    def save(self, more: list[dict] = ()) -> int:
        """Write the recorded decisions plus the new ones (this process's and ``more``, from workers) to the
        file, atomically; returns how many distinct decisions were added (two workers may judge one pair)."""
        from pipeline.storage import write_parquet_atomic

        rows = self.new + list(more)
        if self.path is None or not rows:
            return 0
        new = pa.Table.from_pylist(rows, schema=SCHEMA)
        t = new if self.table is None else pa.concat_tables([self.table.select(SCHEMA.names).cast(SCHEMA), new])
        # one row per key (two workers may judge the same pair): the first wins, all are equal
        _, first = np.unique(np.stack([t.column("k0").to_numpy(), t.column("k1").to_numpy()], 1), axis=0, return_index=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(t.take(pa.array(np.sort(first))), self.path)
        return len(first) - (self.table.num_rows if self.table is not None else 0)


def purge_guard_decisions(path: Path, uids) -> int:
    """Drop every decision that involves a photo in ``uids`` (a removal), and those photos' stored pHashes
    (:func:`purge_photo_hashes`), keypoints and patches (:func:`purge_face_features`); returns how many
    decisions were dropped."""
    import pyarrow.compute as pc

    from pipeline.storage import read_parquet, write_parquet_atomic

    path = Path(path)
    purge_photo_hashes(path, uids)
    purge_face_features(path, uids)
    if not path.exists():
        return 0
    t = read_parquet(path)
    gone = pa.array(sorted({str(u) for u in uids}), pa.string())
    hit = pc.or_(pc.is_in(t.column("a_uid"), gone), pc.is_in(t.column("b_uid"), gone))
    n = int(pc.sum(hit).as_py() or 0)
    if n:
        write_parquet_atomic(t.filter(pc.invert(hit)), path)
    return n


# ------------------------------------------------------------------------------------------------------
# The photos' pHashes, kept across builds
# ------------------------------------------------------------------------------------------------------

PHASH_VERSION = 1  # bump when dedup.image_phash / face_fingerprint's pHashes change for the same inputs
PHASH_SCHEMA = pa.schema([("uid", pa.string()), ("key", pa.binary(16)), ("hashes", pa.binary())])
_FACE = struct.Struct("<i8s8s")  # face index, face pHash, mirror pHash (64 bits each)
log = logging.getLogger(__name__)


def photo_hashes_path(guard_path: Path) -> Path:
    """The pHash store beside a guard-decisions file (``x.parquet`` -> ``x.phash.parquet``)."""
    guard_path = Path(guard_path)
    return guard_path.with_name(guard_path.stem + ".phash.parquet")


def _phash_salt() -> bytes:
    """What, besides the photo and its faces, decides the hashes: the hash and crop geometry, the libraries
    that decode, resize and transform."""
    import PIL
    import scipy

    from pipeline.multiid import dedup

    parts = {"v": PHASH_VERSION, "guard": GUARD_VERSION, "hash_size": dedup.HASH_SIZE, "hash_img": dedup.HASH_IMG,
             "crop": dedup.CROP_SCALE, "pillow": PIL.__version__, "scipy": scipy.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()[:16]


class PhotoHashes:
    """Photos' pHashes read from ``path`` (if any, and whole: a file that cannot be read is ignored, not
    trusted), one entry per photo uid, each under a key of what decides the hashes: the photo's content (its
    uid, the content hash of its bytes: ingestion refuses bytes that do not hash to it), the index, box and
    landmarks of each of its comparable faces, and :func:`_phash_salt`. An entry whose key differs (a face
    box moved, a face became comparable, a library changed) is not used; the next save replaces it."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.salt = _phash_salt()
        self.entries: dict[str, tuple[bytes, bytes]] = {}  # uid -> (key, packed hashes)
        self.new: list[tuple[str, bytes, bytes]] = []  # (uid, key, packed) worked out in this process
        self.hits = 0
        if self.path is not None and self.path.exists():
            from pipeline.storage import read_parquet

            try:
                t = read_parquet(self.path).select(PHASH_SCHEMA.names).cast(PHASH_SCHEMA)
            except (OSError, ValueError, KeyError, pa.ArrowException) as e:
                log.warning("ignoring the photo pHash store %s, which cannot be read: %s", self.path, e)
                return
            self.entries = dict(zip(t.column("uid").to_pylist(), zip(t.column("key").to_pylist(), t.column("hashes").to_pylist())))

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, uid: str, faces) -> bytes:
        h = hashlib.blake2b(self.salt + uid.encode(), digest_size=16)
        for f in faces:
            h.update(b"|" + face_key(f).encode())
        return h.digest()

    def get(self, uid: str, faces):
        """(image pHash, {face index: FaceFingerprint without its NCC patch}) of photo ``uid`` whose comparable
        faces are ``faces``, when stored under the same key; else None."""
        e = self.entries.get(uid)
        if e is None or e[0] != self.key(uid, faces):
            return None
        self.hits += 1
        return unpack_hashes(e[1])

    def record(self, uid: str, faces, value) -> None:
        """Keep ``value`` (image pHash, {face index: FaceFingerprint}) for the next build; ``faces``: the faces
        it covers (those of ``value``)."""
        k = self.key(uid, faces)
        if self.entries.get(uid, (None,))[0] == k:
            return  # already kept (a photo decoded again: its hashes are the same)
        packed = pack_hashes(value)
        self.entries[uid] = (k, packed)
        self.new.append((uid, k, packed))

    def add(self, rows) -> None:
        """Entries another process recorded (:attr:`new` of a worker)."""
        for uid, k, packed in rows:
            if self.entries.get(uid, (None,))[0] == k:
                continue
            self.entries[uid] = (k, packed)
            self.new.append((uid, k, packed))

    def record_from(self, uid: str, faces_by_uid: dict, value) -> None:
        """:meth:`record` of what :func:`pipeline.multiid.selection.photo_hashes` gave for ``uid`` (an error: nothing)."""
        if not isinstance(value, str):
            self.record(uid, [f for f in faces_by_uid.get(uid, []) if f.face_index in value[1]], value)

    def save(self, uids) -> int:
        """Write the entries of the photos ``uids`` (this build's collection: a photo gone is dropped), if
        any was added; atomically. Returns how many entries were added or replaced."""
        from pipeline.storage import write_parquet_atomic

        if self.path is None or not self.new:
            return 0
        keep = sorted(set(uids) & set(self.entries))
        t = pa.table({"uid": pa.array(keep, pa.string()),
                      "key": pa.array([self.entries[u][0] for u in keep], pa.binary(16)),
                      "hashes": pa.array([self.entries[u][1] for u in keep], pa.binary())}, schema=PHASH_SCHEMA)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(t, self.path)
        return len({u for u, _, _ in self.new})


def pack_hashes(value) -> bytes:
    img, fps = value
    return np.packbits(np.asarray(img, bool)).tobytes() + b"".join(
        _FACE.pack(int(i), np.packbits(np.asarray(fp.phash, bool)).tobytes(), np.packbits(np.asarray(fp.phash_mirror, bool)).tobytes())
        for i, fp in sorted(fps.items()))


def unpack_hashes(packed: bytes):
    from pipeline.multiid import dedup

    def bits(b: bytes) -> np.ndarray:
        return np.unpackbits(np.frombuffer(b, np.uint8)).astype(bool)

    fps = {}
    for at in range(8, len(packed), _FACE.size):
        i, ph, phm = _FACE.unpack_from(packed, at)
        fps[i] = dedup.FaceFingerprint(bits(ph), bits(phm), None, None)
    return bits(packed[:8]), fps


def purge_photo_hashes(path: Path, uids) -> int:
    """Drop the stored pHashes of the photos ``uids`` from the store beside guard file ``path``; how many."""
    import pyarrow.compute as pc

    from pipeline.storage import read_parquet, write_parquet_atomic

    store = photo_hashes_path(path)
    if not store.exists():
        return 0
    try:
        t = read_parquet(store)
    except (OSError, ValueError, pa.ArrowException):
        store.unlink()  # unreadable, so never used: nothing in it may outlive a removal
        return 0
    hit = pc.is_in(t.column("uid"), pa.array(sorted({str(u) for u in uids}), pa.string()))
    n = int(pc.sum(hit).as_py() or 0)
    if n:
        write_parquet_atomic(t.filter(pc.invert(hit)), store)
    return n


def kept_photo_uids(path: Path) -> set[str]:
    """Every photo uid that the guard's decisions file ``path``, its pHash store and its feature store hold
    (removals look there)."""
    from pipeline.storage import read_parquet

    path, store = Path(path), photo_hashes_path(path)
    out: set[str] = set()
    if path.exists():
        t = read_parquet(path, columns=["a_uid", "b_uid"])
        out |= set(t.column("a_uid").to_pylist()) | set(t.column("b_uid").to_pylist())
    if store.exists():
        try:
            out |= set(read_parquet(store, columns=["uid"]).column("uid").to_pylist())
        except (OSError, ValueError, pa.ArrowException):
            store.unlink()
    return out | kept_feature_uids(path)


# ------------------------------------------------------------------------------------------------------
# The faces' keypoints and NCC patches, kept across builds
# ------------------------------------------------------------------------------------------------------

FEATURES_VERSION = 1  # bump when dedup.face_keypoints / face_fingerprint give other values for the same inputs
FEATURES_SUFFIX = ".feat"
FEATURES_MAX_BYTES = 16 << 30  # past this the store takes no more entries (~44 KB a face of the collection: ~380k faces)


def face_features_dir(guard_path: Path) -> Path:
    """The keypoint and NCC-patch store beside a guard-decisions file (``x.parquet`` -> ``x.features/``)."""
    guard_path = Path(guard_path)
    return guard_path.with_name(guard_path.stem + ".features")


def _features_salt() -> bytes:
    """What, besides the faces, decides their keypoints and patches: the region and SIFT settings, the
    crop geometry, and the libraries that decode, resize and detect."""
    import cv2
    import PIL

    from pipeline.multiid import dedup

    parts = {"v": FEATURES_VERSION, "phash": _phash_salt().hex(), "cv2": cv2.__version__, "pillow": PIL.__version__,
             "numpy": np.__version__, **{k: getattr(dedup, k) for k in (
                 "NCC_SIZE", "NCC_PAD", "KP_GROW", "KP_FACE_PX", "KP_MAX_SIDE", "KP_MAX_UPSCALE", "KP_NFEATURES")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()[:16]


_SAFE_UID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _uid_name(uid: str) -> str:
    """A photo uid as the start of a file name: itself (ingestion's uids are hex), else its UTF-8 in hex after
    a "~" (reversible, so that a removal can still find it)."""
    return uid if _SAFE_UID.fullmatch(uid) else "~" + uid.encode().hex()


def _name_uid(name: str) -> str:
    head = name.lstrip(".").split(".", 1)[0]  # a half-written ".<name>.<random>.tmp" names its photo too
    return bytes.fromhex(head[1:]).decode(errors="replace") if head.startswith("~") else head


_FEATURES_MAGIC = b"LUFF1"
_DTYPES = {"float32", "float64", "uint8", "int64", "bool"}


def _pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one blob: magic, a JSON header (name, dtype, shape of each, in order), their raw bytes.
    Plain data (no pickles: a store on disk must not be able to run code when read), and read back with
    no archive to parse (``np.load`` of an .npz took 0.65 ms an entry, a third of what a refresh spent
    looking entries up)."""
    head = json.dumps([[k, str(v.dtype), list(v.shape)] for k, v in arrays.items()]).encode()
    return b"".join([_FEATURES_MAGIC, struct.pack("<I", len(head)), head,
                     *(np.ascontiguousarray(v).tobytes() for v in arrays.values())])


def _unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    """:func:`_pack_arrays` back; ValueError for anything else (a torn or foreign file)."""
    if not data.startswith(_FEATURES_MAGIC) or len(data) < len(_FEATURES_MAGIC) + 4:
        raise ValueError("not a face feature entry")
    at = len(_FEATURES_MAGIC) + 4
    (n,) = struct.unpack_from("<I", data, len(_FEATURES_MAGIC))
    head = json.loads(data[at:at + n])
    at += n
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape in head:
        if dtype not in _DTYPES:
            raise ValueError(f"unexpected dtype {dtype!r}")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if at + size > len(data):
            raise ValueError("entry cut short")
        out[name] = np.frombuffer(data, dtype, int(np.prod(shape, dtype=np.int64)), at).reshape(shape).copy()
        at += size
    if at != len(data):
        raise ValueError("entry longer than its header says")
    return out


def _save_features(kind: str, value) -> bytes:
    """``value`` as plain arrays (:func:`_pack_arrays`)."""
    arrays: dict[str, np.ndarray] = {}
    if kind == "kp":
        arrays["size"] = np.asarray(value.size, np.int64)
        for name, a in (("pts", value.pts), ("desc", value.stored_desc()), ("pts_m", value.pts_m),
                        ("desc_m", value.stored_desc(mirrored=True))):
            if a is not None:
                arrays[name] = a
    elif kind == "crop":  # (JPEG bytes, crop box, face box in the crop)
        data, box, in_crop = value
        arrays.update(jpeg=np.frombuffer(data, np.uint8), box=np.asarray(box, np.float64), in_crop=np.asarray(in_crop, np.float64))
    else:  # "fp": (image pHash, {face index: FaceFingerprint})
        img, fps = value
        arrays["image"] = np.asarray(img)
        for i, fp in fps.items():
            for name in ("phash", "phash_mirror", "patch", "mask"):
                if getattr(fp, name) is not None:
                    arrays[f"{int(i)}.{name}"] = np.asarray(getattr(fp, name))
    return _pack_arrays(arrays)


def _load_features(kind: str, path: Path):
    from pipeline.multiid import dedup
    a = _unpack_arrays(path.read_bytes())
    if kind == "crop":
        return a["jpeg"].tobytes(), [float(v) for v in a["box"]], [float(v) for v in a["in_crop"]]
    if kind == "kp":
        return dedup.KeypointSet(a.get("pts"), a.get("desc"), a.get("pts_m"), a.get("desc_m"),
                                 tuple(int(v) for v in a["size"]))
    fps: dict[int, dict] = {}
    for k, v in a.items():
        if k != "image":
            i, name = k.split(".", 1)
            fps.setdefault(int(i), {})[name] = v
    return a["image"], {i: dedup.FaceFingerprint(d.get("phash"), d.get("phash_mirror"), d.get("patch"), d.get("mask"))
                        for i, d in sorted(fps.items())}


class FaceFeatures:
    """What the costly part of the copy-paste guard derives from a face or a photo, kept across builds in a
    folder beside the guard's decisions: each compared face's SIFT keypoints ("kp", ~58 KB) and each
    compared photo's NCC patches ("fp", ~23 KB a face); and, for the shards, each chosen reference's JPEG
    crop ("crop", its bytes as written to the tar: a re-selected target's sample is written again, and
    its references no longer decoded, cropped and encoded for it). A refresh's new faces are compared with old faces
    whose keypoints and patches an earlier build worked out: without this store it decoded those photos
    and ran SIFT on them again (about half of a 1% refresh's CPU, measured in bench_multiid_refresh.py).

    One file per entry, ``<photo uid>.<kind>.<tag>.<key>.feat`` (plain arrays, :func:`_pack_arrays`), the
    key a digest of the faces it covers (index, box, landmarks: :func:`face_key`) and of
    :func:`_features_salt`, the tag the salt's first bytes (entries of another version of the feature code
    or of its libraries are never found, and :meth:`prune` drops them); written aside and renamed into place,
    so a killed build leaves a whole entry or none, and the build's forked workers share the folder. The
    photo's uid leads the name so that a removal finds every entry of a photo without reading any
    (:func:`purge_face_features`). A file that cannot be read is computed again and replaced. Only the
    host that made the store uses it (a Ray task on another node shares no disk with it: it computes).
    Past ``max_bytes`` nothing more is added (each forked worker counts the folder once and then its own
    writes, so n workers can pass the budget by what they add at the same time); :meth:`prune` drops the
    entries of photos no longer in the collection."""

    def __init__(self, folder: Path, max_bytes: int = FEATURES_MAX_BYTES):
        import socket

        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.host = socket.gethostname()
        self.salt = _features_salt()
        self.tag = self.salt[:4].hex()  # in the file names: prune drops the entries of another code's salt
        self.loaded = self.computed = 0
        self._bytes: int | None = None  # the folder's size, counted when first needed

    def __getstate__(self):
        return {**self.__dict__, "loaded": 0, "computed": 0}

    def _here(self) -> bool:
        import socket

        return socket.gethostname() == self.host

    def path(self, kind: str, uid: str, faces, extra: str = "") -> Path:
        h = hashlib.blake2b(self.salt + kind.encode() + extra.encode(), digest_size=16)
        for f in faces:
            h.update(b"|" + face_key(f).encode())
        return self.folder / f"{_uid_name(uid)}.{kind}.{self.tag}.{h.hexdigest()}{FEATURES_SUFFIX}"

    def get(self, kind: str, uid: str, faces, compute, extra: str = ""):
        """The entry of ``kind`` for photo ``uid``'s ``faces`` (and ``extra``, what else decides it) from the
        store, else ``compute()``'s, kept."""
        if not self._here():
            return compute()
        p = self.path(kind, uid, faces, extra)
        try:
            value = _load_features(kind, p)
        except FileNotFoundError:
            value = None
        except (OSError, ValueError, KeyError) as e:  # torn or foreign: computed again, replaced
            log.warning("face feature entry %s cannot be read (%s): computing it again", p.name, e)
            value = None
        if value is not None:
            self.loaded += 1
            return value
        value = compute()
        self.computed += 1
        self._put(p, _save_features(kind, value))
        return value

    def put(self, kind: str, uid: str, faces, value) -> None:
        """Keep ``value`` (worked out anyway) unless an entry is there already."""
        if self._here():
            p = self.path(kind, uid, faces)
            if not p.exists():
                self.computed += 1
                self._put(p, _save_features(kind, value))

    def _put(self, path: Path, data: bytes) -> None:

        if self._bytes is None:
            self._bytes = self.size()[1]
        if self._bytes + len(data) > self.max_bytes:
            return
        from pipeline.storage import write_bytes_atomic

        try:
            write_bytes_atomic(data, path)  # ".<name>.<random>.tmp" aside, then renamed
        except OSError as e:  # a full disk: the build goes on without keeping more
            log.warning("the face feature store %s takes no more entries: %s", self.folder, e)
            self.max_bytes = 0
            return
        self._bytes += len(data)

    def size(self) -> tuple[int, int]:
        """(entries, bytes) in the store."""
        import os

        n = b = 0
        if self.folder.is_dir():
            for e in os.scandir(self.folder):
                if e.name.endswith(FEATURES_SUFFIX):
                    n += 1
                    b += e.stat().st_size
        return n, b

    def prune(self, uids) -> int:
        """Drop the entries of photos not in ``uids`` (this build's collection), those of another version of
        the feature code (another tag), and any half-written file a killed build left; how many files."""
        import os

        if not self.folder.is_dir() or not self._here():
            return 0
        keep, n = set(uids), 0
        for e in os.scandir(self.folder):
            parts = e.name.split(".")
            if ".tmp" in e.name or len(parts) != 5 or parts[2] != self.tag or _name_uid(e.name) not in keep:
                Path(e.path).unlink(missing_ok=True)
                n += 1
        self._bytes = None
        return n


def purge_face_features(guard_path: Path, uids) -> int:
    """Drop every stored keypoint and patch entry (and half-written file) of the photos ``uids``; how many files."""
    import os

    folder, gone, n = face_features_dir(guard_path), {str(u) for u in uids}, 0
    if folder.is_dir():
        for e in os.scandir(folder):
            if _name_uid(e.name) in gone:
                Path(e.path).unlink(missing_ok=True)
                n += 1
    return n


def kept_feature_uids(guard_path: Path) -> set[str]:
    """The photo uids that have an entry (or a half-written one) in the store beside ``guard_path``."""
    import os

    folder = face_features_dir(guard_path)
    return {_name_uid(e.name) for e in os.scandir(folder)} if folder.is_dir() else set()
