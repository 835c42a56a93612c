"""Safe image decoding (and the one JPEG encoder): every decoding failure becomes a DecodeError with a short reason and a readable detail.

Rules: only JPEG, PNG and WebP are accepted; the byte size is checked before anything is parsed
and the declared pixel count before any pixel is decoded (decompression-bomb limit); EXIF
orientation is applied from the orientation tag alone, so a corrupt EXIF block never costs the
image (an unreadable or invalid tag leaves the pixels unrotated, with a note saying so); CMYK,
grayscale, palette, 16-bit and alpha images become 8-bit RGB (alpha composited on white); the
first frame of an animation is used. Nothing here ever unpickles or executes input.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey band

ACCEPTED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "MPO": "jpeg"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
DEFAULT_MAX_PIXELS = 40_000_000  # about 7300 x 5500; larger declared sizes are refused unread
DEFAULT_MAX_BYTES = 50_000_000
DEFAULT_MIN_SIDE = 16
# The memory a decode takes, not only its pixel count: a 77 KB 16-bit PNG of 6300 x 6300 is under the
# pixel limit but took 1 GB. 8 bytes a pixel is what an 8-bit grayscale or RGB photo at the pixel limit
# costs (see decode_bytes), so those keep passing; 16-bit, 32-bit and alpha images get fewer pixels.
DEFAULT_MAX_DECODED_BYTES = 8 * DEFAULT_MAX_PIXELS


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    rgb: np.ndarray  # H x W x 3 uint8
    format: str  # jpeg / png / webp
    original_mode: str
    orientation_applied: bool
    # what went wrong reading the EXIF orientation and what was done instead; "" when nothing did
    orientation_note: str = ""

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (the table ImageOps.exif_transpose uses)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation_from_raw_exif(raw: bytes) -> tuple[int | None, bool]:
    """(the orientation tag read straight from IFD0 of a raw EXIF block, whether IFD0 could be walked
    to its end), ignoring everything else in the block. The value is None when there is no
    well-formed tag (SHORT, count 1)."""
    if raw.startswith(b"Exif\0\0"):
        raw = raw[6:]
    if raw[:4] == b"II*\0":
        endian = "<"
    elif raw[:4] == b"MM\0*":
        endian = ">"
    else:
        return None, False
    value = None
    try:
        (ifd,) = struct.unpack_from(endian + "I", raw, 4)
        (count,) = struct.unpack_from(endian + "H", raw, ifd)
        for i in range(count):
            tag, kind, n = struct.unpack_from(endian + "HHI", raw, ifd + 2 + 12 * i)
            if tag == ORIENTATION_TAG and kind == 3 and n == 1 and value is None:
                value = struct.unpack_from(endian + "H", raw, ifd + 2 + 12 * i + 8)[0]
    except struct.error:
        return value, False
    return value, True


def read_orientation(im: Image.Image) -> tuple[int, str]:
    """The EXIF orientation (1-8, 1 = as stored) and a note when the EXIF block or the tag was broken.

    Pillow's reader comes first (it also knows XMP and PNG text profiles). When it raises, or drops
    the whole block over one bad entry (it returns nothing for an IFD0 with a truncated SHORT array),
    the orientation tag is read alone from the raw block, so a malformed entry elsewhere never costs
    the rotation. Never raises."""
    raw = im.info.get("exif")
    raw_value, raw_ok = _orientation_from_raw_exif(raw) if isinstance(raw, bytes) else (None, True)
    problem = ""
    try:
        value = im.getexif().get(ORIENTATION_TAG)
    except Exception as e:  # noqa: BLE001 - Pillow's EXIF parser raises many types on bad blocks
        value, problem = None, f"EXIF unreadable ({type(e).__name__}: {e})"
    if value is None and raw_value is not None:
        value = raw_value
        problem = problem or "EXIF partly unreadable"
        if 1 <= value <= 8:
            return value, f"{problem}; orientation {value} read from the tag alone"
    if value is None:
        if problem or not raw_ok:
            return 1, f"{problem or 'EXIF partly unreadable'}; orientation unknown, kept unrotated"
        return 1, ""
    if isinstance(value, tuple) and len(value) >= 1:  # a count > 1: the first value is the tag's
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        return 1, f"EXIF orientation {value!r} is not 1-8; kept unrotated"
    return value, ""


def upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says: a drop-in for ImageOps.exif_transpose that
    never raises on a corrupt EXIF block (it does not rewrite the block, it only reads the tag)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata: only the tag is used
        orientation, _ = read_orientation(im)
    return im.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else im


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_bytes(mode: str, width: int, height: int, rotated: bool = False) -> int:
    """An estimate of the bytes decoding an image of this Pillow mode and size allocates, known before
    any pixel is decoded: Pillow's own buffer (1 byte a pixel for 1/L/P, 2 for 16-bit, else 4), what
    :func:`_to_rgb` makes on the way, and the 3-byte RGB array; a second buffer when EXIF turns it
    (the orientation of a PNG is only known once it is loaded, so the limit is checked without it)."""
    stored = 1 if mode in ("1", "L", "P") else 2 if mode in _SIXTEEN_BIT else 4
    if mode in _SIXTEEN_BIT:
        steps = 2 + 2 + 1 + 1 + 4  # array copy, the division's result, uint8, an L image, its RGB
    elif mode in ("I", "F"):
        steps = 4 + 8 + 8 + 1 + 1 + 4  # array copy, float64 and its product, uint8, L, RGB
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        steps = 4 + 4 + 4 + 4  # RGBA, the white background, the composite, its RGB (P may carry alpha)
    elif mode == "RGB":
        steps = 0
    else:  # L, 1, CMYK, YCbCr, ...: one conversion to RGB
        steps = 4
    return width * height * (stored * (2 if rotated else 1) + steps + 3)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(im)
        if arr.max(initial=0) > 255:  # 16-bit data is scaled, not clipped: floor(v * 255 / 65535) == v // 257
            arr = arr // 257
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if mode == "CMYK":
        return im.convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def check_bytes(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """The checks on a photo's bytes before anything is parsed (DecodeError when one fails)."""
    if not data:
        raise DecodeError("empty file", "0 bytes")
    if len(data) > max_bytes:
        raise DecodeError("file too large", f"{len(data)} bytes > limit {max_bytes}")


def check_header(im: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> str:
    """The checks on an opened photo's header before any pixel is decoded (format, declared size, the
    memory its decode would take), raising DecodeError; the Pillow format name when all passed. The one
    home of these rules: :func:`decode_image` and a device decoder's choice of what it may decode
    (pipeline/faces/torch_stage.py) both call it. Seeks an animation to its first frame."""
    fmt = im.format
    if fmt not in ACCEPTED_FORMATS:
        raise DecodeError("unsupported format", f"{fmt} is not one of JPEG, PNG, WebP")
    w, h = im.size
    if w * h > max_pixels:
        raise DecodeError("decompression bomb", f"declared size {w}x{h} = {w * h} pixels > limit {max_pixels}")
    if min(w, h) < min_side:
        raise DecodeError("image too small", f"{w}x{h}, minimum side {min_side}")
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    cost = decode_bytes(im.mode, w, h)  # from the header: no pixel decoded yet
    if cost > max_decoded_bytes:
        raise DecodeError(
            "decompression bomb", f"{w}x{h} {im.mode} would take about {cost} bytes to decode > limit {max_decoded_bytes}"
        )
    return fmt


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_side: int = DEFAULT_MIN_SIDE,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> DecodedImage:
    check_bytes(data, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata: only the tag is used
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = check_header(im, max_pixels, min_side, max_decoded_bytes)
            im.load()
            original_mode = im.mode
            orientation, orientation_note = read_orientation(im)
            transposed = im.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else im
            rgb = np.asarray(_to_rgb(transposed), dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError as e:
        # PIL names the BytesIO object by its memory address: drop it, so a rerun writes the same reject row
        raise DecodeError("not an image", re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(e))) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression bomb", str(e)) from None
    except OSError as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg.lower() else "corrupt image"
        raise DecodeError(reason, msg) from None
    except MemoryError as e:
        raise DecodeError("corrupt image", f"MemoryError: {e}") from None
    except Exception as e:  # noqa: BLE001 - Pillow's parsers raise struct.error, IndexError, TypeError, ... on bad bytes
        raise DecodeError("corrupt image", f"{type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError("corrupt image", f"unexpected decoded shape {rgb.shape}")
    return DecodedImage(rgb, ACCEPTED_FORMATS[fmt], original_mode, orientation in _UPRIGHT, orientation_note)


JPEG_MAGIC = b"\xff\xd8\xff"


def encode_jpeg(image, quality: int = 95) -> bytes:
    """JPEG bytes of an RGB uint8 array or a PIL image (converted to RGB), baseline, no optimisation
    pass, so the same pixels always give the same bytes."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def as_jpeg(data: bytes, quality: int = 95) -> bytes:
    """JPEG bytes as they are; other formats decoded (EXIF orientation applied) and re-encoded."""
    if data[:3] == JPEG_MAGIC:
        return data
    with Image.open(io.BytesIO(data)) as im:
        return encode_jpeg(upright(im), quality)
