import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, decode_bytes, decode_image


def _jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _gradient(h=64, w=96):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], -1).astype(np.uint8)


def test_plain_jpeg_decodes():
    img = decode_image(_jpeg(_gradient()))
    assert img.rgb.shape == (64, 96, 3) and img.rgb.dtype == np.uint8 and img.format == "jpeg"


def test_zero_bytes():
    with pytest.raises(DecodeError) as e:
        decode_image(b"")
    assert e.value.reason == "empty file"


def test_text_named_jpg():
    with pytest.raises(DecodeError) as e:
        decode_image(b"this is not an image at all, just text\n" * 10)
    assert e.value.reason == "not an image"


def test_truncated_jpeg():
    data = _jpeg(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason in ("truncated image", "corrupt image")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_png_bomb_header_is_refused_before_decoding():
    # a valid PNG header that declares 100000 x 100000 pixels, with a tiny body
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b"")
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert e.value.reason == "decompression bomb"


def _png16_gray(w: int, h: int) -> bytes:
    """An all-black 16-bit grayscale PNG, compressed row by row so the test never holds the raw pixels."""
    z = zlib.compressobj(9)
    body = b"".join(z.compress(b"\0" * (1 + 2 * w)) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def test_a_small_16bit_png_that_decodes_into_too_much_memory_is_refused_unread():
    """77 KB declaring 6300 x 6300 at 16 bits: under the pixel limit, but it took 1 GB to decode."""
    data = _png16_gray(6300, 6300)
    assert len(data) < 100_000
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert e.value.reason == "decompression bomb" and "bytes to decode" in e.value.detail


def test_the_decoded_bytes_limit_counts_depth_not_only_pixels():
    eight = io.BytesIO()
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(eight, "PNG")
    sixteen = _png16_gray(400, 300)
    limit = decode_bytes("L", 400, 300)  # what the 8-bit image of the same size takes
    assert decode_bytes("I;16", 400, 300) > limit
    assert decode_image(eight.getvalue(), max_decoded_bytes=limit).rgb.shape == (300, 400, 3)
    with pytest.raises(DecodeError) as e:
        decode_image(sixteen, max_decoded_bytes=limit)
    assert e.value.reason == "decompression bomb"
    assert decode_image(sixteen, max_decoded_bytes=10 * limit).rgb.shape == (300, 400, 3)


def test_16bit_values_scale_exactly_as_before():
    """Every 16-bit value v becomes floor(v * 255 / 65535), as the float64 conversion gave, in integers."""
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, "PNG")
    img = decode_image(buf.getvalue())
    expected = np.clip(v.astype(np.float64) * (255.0 / 65535.0), 0, 255).astype(np.uint8)
    assert np.array_equal(img.rgb[..., 0], expected) and np.array_equal(img.rgb[..., 2], expected)


def test_cmyk_jpeg_becomes_rgb():
    im = Image.fromarray(_gradient()).convert("CMYK")
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    img = decode_image(buf.getvalue())
    assert img.original_mode == "CMYK" and img.rgb.shape == (64, 96, 3)
    ref = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(img.rgb.astype(np.int16) - ref).mean() < 8


def test_16bit_png_is_scaled_not_clipped():
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    img = decode_image(buf.getvalue())
    assert img.rgb.shape == (64, 64, 3)
    assert img.rgb[0, 0, 0] == 0 and img.rgb[-1, -1, 0] >= 250
    assert 100 < img.rgb[32, 0, 0] < 160  # mid-grey stays mid-grey


def test_grayscale_and_alpha():
    gray = np.full((40, 40), 77, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    assert decode_image(buf.getvalue()).rgb[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent black -> white background
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert decode_image(buf.getvalue()).rgb[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    img = decode_image(buf.getvalue())
    assert img.rgb.shape[:2] == (80, 40)  # portrait after applying orientation
    assert img.orientation_applied
    assert img.rgb[:40].mean() > 200 and img.rgb[40:].mean() < 50  # white half is now on top


def test_unsupported_format():
    buf = io.BytesIO()
    Image.fromarray(_gradient()).save(buf, "BMP")
    with pytest.raises(DecodeError) as e:
        decode_image(buf.getvalue())
    assert e.value.reason == "unsupported format"


def test_too_small():
    with pytest.raises(DecodeError) as e:
        decode_image(_jpeg(_gradient(8, 8)))
    assert e.value.reason == "image too small"


# ---------------------------------------------------------------- malformed EXIF: hand-built blocks

ORIENTATION = 0x0112
SHORT, ASCII, RATIONAL = 3, 2, 5


def _tiff(entries, endian="<") -> bytes:
    """A little TIFF/EXIF block: IFD0 at offset 8 with (tag, type, count, 4 value bytes) entries."""
    out = (b"II" if endian == "<" else b"MM") + struct.pack(endian + "HI", 42, 8)
    out += struct.pack(endian + "H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack(endian + "HHI", tag, kind, count) + value.ljust(4, b"\0")
    return out + struct.pack(endian + "I", 0)


def _with_exif(jpeg: bytes, tiff: bytes) -> bytes:
    """The JPEG with an APP1 EXIF segment holding exactly these bytes, right after SOI."""
    payload = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _short(v: int) -> bytes:
    return struct.pack("<H", v)


@pytest.fixture(scope="module")
def landscape():
    """A 40x80 JPEG, left half white, and its clean decode."""
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255
    data = _jpeg(arr, quality=95)
    return data, decode_image(data).rgb


def _turned(rgb, transpose):
    return np.asarray(Image.fromarray(rgb).transpose(transpose))


def test_short_tag_stored_as_ascii_keeps_image_and_rotation(landscape):
    # the bug: ResolutionUnit (a SHORT) stored as ASCII made ImageOps.exif_transpose raise struct.error
    # while rewriting the block, which aborted the whole partition
    data, clean = landscape
    bad = _with_exif(data, _tiff([(ORIENTATION, SHORT, 1, _short(6)), (0x0128, ASCII, 4, b"abc\0")]))
    img = decode_image(bad)
    assert img.orientation_applied and img.orientation_note == ""
    assert np.array_equal(img.rgb, _turned(clean, Image.Transpose.ROTATE_270))


def test_rational_tag_stored_as_bytes_keeps_image_and_rotation(landscape):
    data, clean = landscape  # XResolution (RATIONAL) as UNDEFINED bytes: TypeError in exif_transpose before
    bad = _with_exif(data, _tiff([(ORIENTATION, SHORT, 1, _short(3)), (0x011A, 7, 3, b"xyz")]))
    assert np.array_equal(decode_image(bad).rgb, _turned(clean, Image.Transpose.ROTATE_180))


def test_orientation_read_alone_when_pillow_drops_the_block(landscape):
    # a SHORT array whose data would lie 16 MB past the block: Pillow returns an empty EXIF, silently
    # losing the orientation that is there, well-formed, in the same IFD (found by the fuzzer)
    data, clean = landscape
    bad = _with_exif(data, _tiff([(0x0100, SHORT, 3, struct.pack("<I", 1 << 24)), (ORIENTATION, SHORT, 1, _short(8))]))
    img = decode_image(bad)
    assert np.array_equal(img.rgb, _turned(clean, Image.Transpose.ROTATE_90))
    assert "read from the tag alone" in img.orientation_note


def test_orientation_as_ascii_keeps_pixels_unrotated_with_a_note(landscape):
    data, clean = landscape
    img = decode_image(_with_exif(data, _tiff([(ORIENTATION, ASCII, 2, b"6\0")])))
    assert not img.orientation_applied and np.array_equal(img.rgb, clean)
    assert "kept unrotated" in img.orientation_note


def test_out_of_range_orientation_is_noted(landscape):
    data, clean = landscape
    img = decode_image(_with_exif(data, _tiff([(ORIENTATION, SHORT, 1, _short(9))])))
    assert np.array_equal(img.rgb, clean) and "9" in img.orientation_note


@pytest.mark.parametrize("cut", [4, 9, 12, 17])  # 17: the orientation entry stops inside its count
def test_truncated_ifd_keeps_pixels(landscape, cut):
    data, clean = landscape
    block = _tiff([(ORIENTATION, SHORT, 1, _short(6)), (0x010F, ASCII, 100, struct.pack("<I", 5000))])[:cut]
    img = decode_image(_with_exif(data, block))  # no exception, no reject
    assert np.array_equal(img.rgb, clean) and img.orientation_note  # the tag is cut off: unrotated, said so


def test_png_with_an_exif_chunk_that_is_not_tiff_still_decodes():
    # a 1-byte eXIf chunk made Pillow raise SyntaxError("not a TIFF file"): the image was rejected
    png = io.BytesIO()
    Image.fromarray(_gradient()).save(png, "PNG")
    raw = png.getvalue()
    data = raw[:33] + _png_chunk(b"eXIf", b"I") + raw[33:]
    img = decode_image(data)
    assert img.rgb.shape == (64, 96, 3) and img.orientation_note


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("endian", ["<", ">"])
def test_well_formed_orientations_match_pillow(orientation, endian):
    from PIL import ImageOps

    from pipeline.decode import upright

    data = _with_exif(_jpeg(_gradient(40, 56)), _tiff([(ORIENTATION, SHORT, 1, struct.pack(endian + "H", orientation))], endian))
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(upright(im).convert("RGB")), reference)
    img = decode_image(data)
    assert np.array_equal(img.rgb, reference) and img.orientation_applied == (orientation != 1)


def test_as_jpeg_survives_a_png_with_a_malformed_exif_block():
    from pipeline.decode import as_jpeg

    png = io.BytesIO()
    Image.fromarray(_gradient()).save(png, "PNG", exif=_tiff([(ORIENTATION, SHORT, 1, _short(6)), (0x0128, ASCII, 4, b"abc\0")]))
    out = as_jpeg(png.getvalue())
    assert Image.open(io.BytesIO(out)).size == (64, 96)  # turned upright: 96 wide x 64 high becomes 64 x 96


def test_a_bad_exif_photo_does_not_stop_its_partition(tmp_path, landscape):
    from pipeline.ingest import ingest_partition
    from pipeline.sources import register_new_inputs

    data, _ = landscape
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a_good.jpg").write_bytes(_jpeg(_gradient()))
    (inp / "b_bad_exif.jpg").write_bytes(_with_exif(data, _tiff([(ORIENTATION, SHORT, 1, _short(6)), (0x0128, ASCII, 4, b"abc\0")])))
    (inp / "c_ascii_orientation.jpg").write_bytes(_with_exif(data, _tiff([(ORIENTATION, ASCII, 4, b"abc\0")])))
    (spec,) = register_new_inputs(inp, tmp_path / "reg")
    res = ingest_partition(spec)
    assert res.accepted == 3 and len(res.rejects) == 0
    rows = {r["source"]: r for r in res.images.to_pylist()}
    assert rows["b_bad_exif.jpg"]["exif_rotated"] and (rows["b_bad_exif.jpg"]["width"], rows["b_bad_exif.jpg"]["height"]) == (40, 80)
    assert not rows["c_ascii_orientation.jpg"]["exif_rotated"]
    assert res.stats["orientation_fallbacks"] == 1 and "c_ascii_orientation.jpg" in res.stats["orientation_notes"]


def test_the_device_decoders_choice_uses_the_cpu_decoders_header_rules():
    """nvjpeg (pipeline/faces/torch_stage.py nvjpeg_mode) takes only what it decodes as pipeline.decode does
    and what passes pipeline.decode's header checks (check_bytes / check_header, the one home of those rules):
    the rest, truncated files included (nvjpeg may decode them; Pillow names them "truncated image", the
    reject ingestion gives), goes to the CPU decoder, whose verdict a device-fused ingestion then takes."""
    pytest.importorskip("torchvision")
    from pipeline.faces.torch_stage import DecodeLimits, nvjpeg_mode

    plain = _jpeg(_gradient())
    grey = _jpeg(_gradient()[..., 0])
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_gradient()).save(rotated, "JPEG", exif=exif)
    png = io.BytesIO()
    Image.fromarray(_gradient()).save(png, "PNG")
    limits = DecodeLimits()
    assert nvjpeg_mode(plain, limits) == "RGB" and nvjpeg_mode(grey, limits) == "L"
    truncated = plain[: len(plain) // 2]
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(truncated)
    for refused in (truncated, rotated.getvalue(), png.getvalue(), b"not an image", b""):
        assert nvjpeg_mode(refused, limits) is None
    # each limit decode_image applies refuses it for the device too, from the same header check
    for tight in (DecodeLimits(max_pixels=64 * 96 - 1), DecodeLimits(min_side=65), DecodeLimits(max_bytes=len(plain) - 1),
                  DecodeLimits(max_decoded_bytes=decode_bytes("RGB", 96, 64) - 1)):
        with pytest.raises(DecodeError):
            decode_image(plain, tight.max_pixels, tight.max_bytes, tight.min_side, tight.max_decoded_bytes)
        assert nvjpeg_mode(plain, tight) is None
