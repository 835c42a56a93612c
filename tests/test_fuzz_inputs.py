"""Fuzzing the readers with bad input: mutated JPEG/PNG/WebP bytes, hand-built EXIF blocks, tar shards
(mutated headers, odd and duplicate members, links, huge sizes), Parquet manifests (bad paths, bad
types, missing columns, flipped or truncated bytes) and loose files (sidecars, CSV files, names that
are not UTF-8), fed through pipeline.sources and pipeline.ingest.ingest_partition.

The property: nothing raises, every input ends as an image row or a reject row with a reason, and the
count agrees with pipeline.sources.count_partition_inputs (which lists the source again on its own).
CSV files are not an image-manifest kind: in the input folder they are loose files to reject.

Budget: the @_budget numbers, about 40 s for the file on 2 shared cores, with derandomize=True so CI
runs the same inputs every time. FUZZ_EXAMPLES=<n> sets every test to n examples and FUZZ_RANDOM=1
draws new inputs each run: `make fuzz` is that soak; a failure prints its @reproduce_failure blob.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from pipeline.decode import ORIENTATION_TAG, DecodedImage, DecodeError, decode_image, upright
from pipeline.ingest import IngestLimits, ingest_partition, load_image
from pipeline.sources import count_partition_inputs, register_new_inputs
from pipeline.storage import read_parquet, write_parquet_atomic

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on the broken metadata we feed it

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(
    max_examples=EXAMPLES or 100,
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def _budget(default: int) -> settings:
    return settings(FUZZ, max_examples=EXAMPLES or default)


class Blob(bytes):
    """Bytes that print short in a failure report (length, hash, head); .hex() has them all."""

    def __repr__(self) -> str:
        import hashlib

        return f"Blob({len(self)} bytes, sha256 {hashlib.sha256(self).hexdigest()[:12]}, head {bytes(self[:24])!r})"


# ---------------------------------------------------------------- well-formed seeds


def _pixels(h=40, w=56) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 40, (h, w), dtype=np.int64)
    return np.stack([x * 255 // w, y * 255 // h, (x * y + noise) % 256], -1).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _seed_images() -> dict[str, bytes]:
    rgb = Image.fromarray(_pixels())
    exif = rgb.getexif()
    exif[0x0112] = 6
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "jpeg": _save(rgb, "JPEG", quality=80),
        "jpeg-exif6": _save(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg-progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "jpeg-gray": _save(rgb.convert("L"), "JPEG"),
        "png": _save(rgb, "PNG"),
        "png-exif6": _save(rgb, "PNG", exif=exif.tobytes()),
        "png-palette": _save(pal, "PNG"),
        "png-16bit": _save(Image.fromarray(_pixels()[..., 0].astype(np.uint16) * 257), "PNG"),
        "png-rgba": _save(rgba, "PNG"),
        "webp": _save(rgb, "WEBP", quality=80),
        "webp-lossless-alpha": _save(rgba, "WEBP", lossless=True),
        "webp-animated": _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50),
        "webp-exif6": _save(rgb, "WEBP", exif=exif.tobytes()),
    }


SEEDS = _seed_images()


@st.composite
def mutated_image(draw) -> tuple[str, bytes]:
    """A seed image with a few bit flips, byte overwrites, truncations, deletions, insertions and
    splices from another seed; positions lean towards the first 600 bytes, where the headers are."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        if n == 0:
            break
        pos = draw(st.one_of(st.integers(0, min(n - 1, 600)), st.integers(0, n - 1)))
        op = draw(st.sampled_from(["flip", "byte", "truncate", "delete", "insert", "splice", "int"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, 0xD8, 0xD9, 0xE1]))
        elif op == "truncate":
            del data[pos:]
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            a = draw(st.integers(0, len(other) - 1))
            data[pos : pos + draw(st.integers(0, 64))] = other[a : a + draw(st.integers(1, 256))]
        else:  # a size or count field set to an extreme
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[pos : pos + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
    return name, Blob(data)


def _decodes_or_rejects(data: bytes) -> DecodedImage | None:
    try:
        img = decode_image(data)
    except DecodeError as e:
        assert e.reason and isinstance(e.detail, str)
        event(f"reject: {e.reason}")
        return None
    event("decoded" + (" with an orientation note" if img.orientation_note else ""))
    assert img.rgb.ndim == 3 and img.rgb.shape[2] == 3 and img.rgb.dtype == np.uint8
    return img


@_budget(1000)
@given(mutated_image())
def test_mutated_images_decode_or_reject(named):
    _, data = named
    _decodes_or_rejects(data)


# ---------------------------------------------------------------- EXIF blocks built by hand

EXIF_TAGS = [0x0112, 0x0100, 0x0101, 0x0102, 0x010F, 0x011A, 0x011B, 0x0128, 0x0131, 0x0132, 0x0213, 0x8769, 0x8825, 0xA001, 0xA002]
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}


@st.composite
def exif_block(draw) -> tuple[bytes, int | None]:
    """A TIFF/EXIF block with random entries (known tags, any type, odd counts, wild offsets), and the
    orientation a careful reader should find: the value of a well-formed orientation entry (SHORT,
    count 1, 1-8) in an IFD0 that is complete, else None (anything may happen to the rotation)."""
    endian = draw(st.sampled_from(["<", ">"]))
    entries = []
    for _ in range(draw(st.integers(0, 6))):
        tag = draw(st.sampled_from(EXIF_TAGS))
        kind = draw(st.sampled_from([*TIFF_TYPE_SIZES, 0, 13, 99]))
        count = draw(st.sampled_from([0, 1, 2, 3, 4, 100, 0xFFFF, 0x7FFFFFFF]))
        value = draw(st.binary(min_size=4, max_size=4))
        entries.append((tag, kind, count, value))
    orientation = draw(st.one_of(st.none(), st.integers(0, 10)))
    if orientation is not None:
        entries.insert(draw(st.integers(0, len(entries))), (0x0112, 3, 1, struct.pack(endian + "H", orientation) + b"\0\0"))
    ifd = struct.pack(endian + "H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack(endian + "HHI", tag, kind, count) + value
    ifd += struct.pack(endian + "I", draw(st.sampled_from([0, 8, 0xFFFF, 0x7FFFFFFF])))  # next IFD
    body = (b"II" if endian == "<" else b"MM") + struct.pack(endian + "HI", 42, 8) + ifd
    tail = draw(st.binary(max_size=64))
    cut = draw(st.one_of(st.none(), st.integers(0, len(body))))
    block = body[:cut] + tail if cut is not None else body + tail
    n_orientation = sum(1 for e in entries if e[0] == 0x0112)
    expected = None
    if cut is None and orientation is not None and 1 <= orientation <= 8 and n_orientation == 1:
        expected = orientation
    if cut is None and n_orientation == 0:
        expected = 1
    return Blob(block), expected


def _jpeg_with_exif(tiff: bytes) -> bytes:
    base = SEEDS["jpeg"]
    payload = b"Exif\0\0" + tiff
    return base[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + base[2:]


def _png_with_exif(tiff: bytes) -> bytes:
    base = SEEDS["png"]
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff) & 0xFFFFFFFF)
    return base[:33] + chunk + base[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


@_budget(600)
@given(exif_block(), st.sampled_from(["jpeg", "png"]))
def test_bad_exif_never_costs_the_pixels(block_expected, container):
    block, expected = block_expected
    data = _jpeg_with_exif(block) if container == "jpeg" else _png_with_exif(block)
    clean = decode_image(SEEDS[container]).rgb
    img = decode_image(data)  # the pixels are intact, so this must never be a reject
    event(f"expected orientation {expected}, note: {bool(img.orientation_note)}")
    # the result is always the clean pixels turned by one of the 8 orientations
    candidates = {o: _turned_by_pillow(clean, o) for o in range(1, 9)}
    same = [o for o, c in candidates.items() if c.shape == img.rgb.shape and np.array_equal(c, img.rgb)]
    assert same, "decoded pixels are not an orientation of the clean image"
    if expected is not None:
        assert expected in same, f"orientation {expected} not applied (got one of {same})"
    if not img.orientation_applied:
        assert np.array_equal(img.rgb, clean)
    with Image.open(io.BytesIO(data)) as im:
        assert upright(im).size in (im.size, im.size[::-1])


def _turned_by_pillow(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """``rgb`` turned as Pillow's own ImageOps.exif_transpose reads ``orientation``: the oracle, independent of
    pipeline/decode.py's table."""
    im = Image.fromarray(rgb)
    im.getexif()[ORIENTATION_TAG] = orientation
    return np.asarray(ImageOps.exif_transpose(im))


# ---------------------------------------------------------------- whole partitions


def _limits(draw) -> IngestLimits:
    # 1500 bytes: smaller than some seeds, so "file too large" is reached too
    return IngestLimits(max_bytes=draw(st.sampled_from([50_000_000, 1_500])), min_side=16)


def _check_partitions(inp: Path, work: Path, limits: IngestLimits, batch_size: int = 3, kinds=("files", "tar", "parquet")):
    """Register and ingest everything under inp (partitions of the given kinds); every partition must
    reconcile with the independent count and write its tables, and every accepted image must decode
    again from its locator. Returns [(spec, result)]."""
    specs = register_new_inputs(inp, work / "registry", batch_size=batch_size)
    done = []
    for spec in (s for s in specs if s.kind in kinds):
        res = ingest_partition(spec, limits)
        listed = count_partition_inputs(spec)
        assert listed == res.accepted + len(res.rejects), (spec.kind, listed, res.accepted, res.rejects.rows)
        assert res.inputs == listed
        assert all(r["reason"] for r in res.rejects.rows)
        for r in res.rejects.rows:
            event(f"{spec.kind} reject: {r['reason']}")
        event(f"{spec.kind}: {'some' if res.accepted else 'none'} accepted")
        images = write_parquet_atomic(res.images, work / "tables" / "images" / f"{spec.key}.parquet")
        rejects = write_parquet_atomic(res.rejects.to_table(), work / "tables" / "rejects" / f"{spec.key}.parquet")
        assert read_parquet(images).num_rows == res.accepted and read_parquet(rejects).num_rows == len(res.rejects)
        for row in res.images.to_pylist():
            assert row["length"] <= limits.max_bytes
            load_image(row, limits)
        done.append((spec, res))
    return done


def _tar_member(tf: tarfile.TarFile, name: str, kind: bytes, data: bytes, size: int | None = None, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mtime = 0
    regular = kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
    info.size = len(data) if regular else 0
    tf.addfile(info, io.BytesIO(data) if regular else None)


SIDECARS = [
    b'{"caption": "two people", "url": "http://x/y.jpg"}',
    b'{"caption": 5, "url": ["a"], "key": {"k": 1}}',
    b'{"TEXT": null, "caption": "\\ud800 lone surrogate"}',
    b"[" * 5000 + b"]" * 5000,
    b"not json {",
    b"[1, 2]",
    b"\xff\xfe\x00caption",
    b"",
]
MEMBER_NAMES = ["000001", "000002", "dir/000003", "000001", "../up", "/abs", "noext", "a.b.c", "x\udcff", "sp ace"]


@st.composite
def tar_shard(draw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))) as tf:
        for _ in range(draw(st.integers(0, 7))):
            stem = draw(st.sampled_from(MEMBER_NAMES))
            ext = draw(st.sampled_from(["jpg", "JPG", "png", "webp", "json", "txt", "pickle", "cls", ""]))
            name = f"{stem}.{ext}" if ext else stem
            kind = draw(st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE]))
            if ext in ("json", "txt"):
                data = draw(st.sampled_from(SIDECARS))
            elif draw(st.booleans()):
                data = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            else:
                data = draw(mutated_image())[1]
            _tar_member(tf, name, kind, data, link=draw(st.sampled_from(["", "/etc/passwd", "000001.jpg"])))
    data = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "size", "truncate", "garbage", "zero-block"]))
        block = draw(st.integers(0, max(0, len(data) // 512 - 1))) * 512
        if op == "flip":
            pos = min(len(data) - 1, block + draw(st.integers(0, 511)))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "size":  # a header claiming a huge size: octal, or GNU base-256
            field = draw(st.sampled_from([b"77777777777\0", b"\x80" + b"\0" * 3 + b"\x10" + b"\0" * 7, b"00000000100\0"]))
            data[block + 124 : block + 136] = field
            checksum = sum(data[block : block + 148]) + 8 * 32 + sum(data[block + 156 : block + 512])
            data[block + 148 : block + 156] = b"%06o\0 " % checksum
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "garbage":
            data += draw(st.binary(min_size=1, max_size=700))
        else:
            data[block : block + 512] = b"\0" * 512
    return Blob(data)


@_budget(200)
@given(st.lists(tar_shard(), min_size=1, max_size=2), st.data())
def test_fuzzed_tar_shards_end_processed_or_rejected(shards, data):
    limits = _limits(data.draw)
    with tempfile.TemporaryDirectory() as d:
        inp, work = Path(d) / "in", Path(d) / "work"
        inp.mkdir()
        for i, shard in enumerate(shards):
            (inp / f"shard-{i:04d}.tar").write_bytes(shard)
        _check_partitions(inp, work, limits)


@st.composite
def manifest_table(draw, folder: str):
    """Rows whose paths are good, missing, absolute elsewhere, '..' escapes, links out, odd types."""
    path_kind = draw(st.sampled_from(["string"] * 6 + ["int", "binary", "list", "null", "none"]))
    n = draw(st.integers(0, 8))
    choices = [
        "imgs/a.jpg", "imgs/b.png", "imgs/bad.jpg", "imgs/missing.jpg", "imgs/../imgs/a.jpg", "../outside/o.jpg",
        f"{folder}/outside/o.jpg", "/etc/passwd", "imgs/link-out.jpg", "imgs/dir.jpg", "imgs/a.txt", "imgs/\0nul.jpg",
        "imgs/" + "x" * 300 + ".jpg", "", "imgs/big.jpg", "imgs/fifo.jpg",
    ]
    if path_kind == "string":
        col = pa.array([draw(st.sampled_from([*choices, None])) for _ in range(n)], pa.string())
    elif path_kind == "int":
        col = pa.array(draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n)), pa.int64())
    elif path_kind == "binary":
        col = pa.array([draw(st.sampled_from([b"imgs/a.jpg", b"\xff\xfe.jpg"])) for _ in range(n)], pa.binary())
    elif path_kind == "list":
        col = pa.array([["imgs/a.jpg"]] * n, pa.list_(pa.string()))
    else:
        col = pa.nulls(n, pa.string())
    columns = {} if path_kind == "none" else {"path": col}
    caption_kind = draw(st.sampled_from(["none", "string", "int", "binary", "struct"]))
    if caption_kind == "string":
        columns["caption"] = pa.array(["a caption"] * n)
    elif caption_kind == "int":
        columns["caption"] = pa.array(list(range(n)), pa.int32())
    elif caption_kind == "binary":
        columns["caption"] = pa.array([b"\xff\x00"] * n, pa.binary())
    elif caption_kind == "struct":
        columns["caption"] = pa.array([{"a": 1}] * n)
    columns.setdefault("other", pa.array(list(range(n)), pa.int64()))
    return pa.table(columns)


def _populate_manifest_folder(root: Path) -> Path:
    """imgs/ with good, bad, oversized (sparse), linked-out images and a FIFO; a folder outside."""
    inp = root / "in"
    (inp / "imgs").mkdir(parents=True)
    (root / "outside").mkdir()
    (root / "outside" / "o.jpg").write_bytes(SEEDS["jpeg"])
    (inp / "imgs" / "a.jpg").write_bytes(SEEDS["jpeg-exif6"])
    (inp / "imgs" / "b.png").write_bytes(SEEDS["png"])
    (inp / "imgs" / "bad.jpg").write_bytes(SEEDS["jpeg"][:300])
    (inp / "imgs" / "dir.jpg").mkdir()
    with open(inp / "imgs" / "big.jpg", "wb") as f:  # sparse: far over any limit, never to be read
        f.truncate(60_000_000)
    os.symlink(root / "outside" / "o.jpg", inp / "imgs" / "link-out.jpg")
    os.mkfifo(inp / "imgs" / "fifo.jpg")
    return inp


@_budget(160)
@given(st.data())
def test_fuzzed_parquet_manifests_end_processed_or_rejected(data):
    limits = _limits(data.draw)
    with tempfile.TemporaryDirectory() as d:
        inp = _populate_manifest_folder(Path(d))
        table = data.draw(manifest_table(str(Path(d))))
        pq.write_table(table, inp / "m.parquet", row_group_size=data.draw(st.sampled_from([2, 1000])))
        raw = bytearray((inp / "m.parquet").read_bytes())
        # positions as fractions of the length: the file's size varies with the temporary folder's name
        edit = st.tuples(st.sampled_from(["flip", "truncate"]), st.floats(0, 1), st.integers(0, 7))
        edits = data.draw(st.one_of(st.just([]), st.lists(edit, min_size=1, max_size=2)))  # half stay readable
        for op, where, bit in edits:
            if raw:
                pos = min(len(raw) - 1, int(where * len(raw)))
                if op == "flip":
                    raw[pos] ^= 1 << bit
                else:
                    del raw[pos:]
        (inp / "m.parquet").write_bytes(bytes(raw))
        # registering must not trip over the FIFO and the links; the loose files are not ingested here
        outside = (Path(d) / "outside").resolve()
        for _, res in _check_partitions(inp, Path(d) / "work", limits, kinds=("parquet",)):
            for row in res.images.to_pylist():
                assert not Path(os.path.realpath(row["path"])).is_relative_to(outside), row


@st.composite
def loose_file(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["image", "image", "csv", "sidecar-json", "sidecar-txt", "other"]))
    stem = draw(st.sampled_from(["p0", "p1", "p2", "sub/p3", "weird\udcff", "p0"]))
    if kind == "image":
        ext = draw(st.sampled_from([".jpg", ".jpeg", ".png", ".webp", ".JPG"]))
        body = draw(st.one_of(mutated_image(), st.sampled_from(sorted(SEEDS.items()))))[1]
        return stem + ext, Blob(body)
    if kind == "csv":
        rows = draw(st.sampled_from([b"path,caption\nimgs/a.jpg,x\n", b"path\n/etc/passwd\n", b"\xff,\x00\n\"", b""]))
        return stem + ".csv", Blob(rows)
    if kind == "sidecar-json":
        return stem + ".json", draw(st.sampled_from(SIDECARS))
    if kind == "sidecar-txt":
        return stem + ".txt", draw(st.sampled_from([b"a caption", b"\xff\xfe bad utf8", b""]))
    return stem + draw(st.sampled_from([".gif", "", ".tar.gz", ".md"])), draw(st.binary(max_size=64))


@_budget(120)
@given(st.lists(loose_file(), min_size=1, max_size=8), st.integers(1, 4), st.data())
def test_fuzzed_loose_files_end_processed_or_rejected(files, batch_size, data):
    limits = _limits(data.draw)
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "in"
        inp.mkdir()
        for name, body in files:
            target = inp / name  # a name with a lone surrogate is a file name that is not UTF-8
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        listed = sum(res.inputs for _, res in _check_partitions(inp, Path(d) / "work", limits, batch_size))
        on_disk = [p for p in inp.rglob("*") if p.is_file()]
        sidecars = {p for p in on_disk if p.suffix in (".json", ".txt") and any(
            q.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and q.with_suffix("") == p.with_suffix("") for q in on_disk)}
        assert listed == len(on_disk) - len(sidecars)
