"""Safe image decoding (and the one JPEG encoder): every decoding failure becomes a DecodeError with a short reason and a readable detail.

Rules: only JPEG, PNG and WebP are accepted; the declared size is checked before any pixel is
decoded (decompression-bomb limit); EXIF orientation is applied; CMYK, grayscale, palette,
16-bit and alpha images become 8-bit RGB (alpha composited on white); the first frame of an
animation is used. Nothing here ever unpickles or executes input.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey band

ACCEPTED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "MPO": "jpeg"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
DEFAULT_MAX_PIXELS = 40_000_000  # about 7300 x 5500; larger declared sizes are refused unread
DEFAULT_MAX_BYTES = 50_000_000
DEFAULT_MIN_SIDE = 16


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

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0  # 16-bit data is scaled, not clipped
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


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_side: int = DEFAULT_MIN_SIDE,
) -> DecodedImage:
    if not data:
        raise DecodeError("empty file", "0 bytes")
    if len(data) > max_bytes:
        raise DecodeError("file too large", f"{len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            if fmt not in ACCEPTED_FORMATS:
                raise DecodeError("unsupported format", f"{fmt} is not one of JPEG, PNG, WebP")
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(
                    "decompression bomb", f"declared size {w}x{h} = {w * h} pixels > limit {max_pixels}"
                )
            if min(w, h) < min_side:
                raise DecodeError("image too small", f"{w}x{h}, minimum side {min_side}")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            original_mode = im.mode
            orientation_applied = im.getexif().get(0x0112, 1) not in (1, None)
            transposed = ImageOps.exif_transpose(im)
            rgb = np.asarray(_to_rgb(transposed), dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError as e:
        raise DecodeError("not an image", str(e)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression bomb", str(e)) from None
    except OSError as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg.lower() else "corrupt image"
        raise DecodeError(reason, msg) from None
    except (SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        raise DecodeError("corrupt image", f"{type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError("corrupt image", f"unexpected decoded shape {rgb.shape}")
    return DecodedImage(rgb, ACCEPTED_FORMATS[fmt], original_mode, bool(orientation_applied))


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
        return encode_jpeg(ImageOps.exif_transpose(im), quality)
