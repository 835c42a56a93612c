import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, decode_image


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
