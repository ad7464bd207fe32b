"""Decoding of untrusted image bytes into RGB images.

Every reader in the package (shard writer, training stream, evaluation stream) goes through
`decode_rgb` (or `open_image` + `to_rgb`), so one bad file is handled the same way everywhere: a
`BadImageError` whose message is a short reason, which callers turn into a counted, logged skip.

Reasons start with a fixed phrase so that manifests can be grouped and tests can match them:
"empty file", "not an image", "truncated", "corrupt", "decompression bomb", "unsupported mode".
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

# A decompression bomb is refused rather than decoded: 8k x 8k is far above any training resolution.
# PIL's own guard (Image.MAX_IMAGE_PIXELS, about 89M) also applies, so limits above it have no effect.
DEFAULT_MAX_PIXELS = 64_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class BadImageError(ValueError):
    """Raised for bytes that are not a decodable image; the message is the reason."""


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB PIL image, converting greyscale/CMYK/palette/alpha/16-bit modes."""
    return to_rgb(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Fully decode `data` into a PIL image in its own mode; raise `BadImageError` for anything else.

    The returned image keeps `format` (e.g. "JPEG") and carries `info["source_size"]`, the size
    declared by the file. `draft_size` lets JPEG decode at a reduced scale whose longer side is still
    at least `draft_size` (much faster for large photos that will be shrunk anyway); every byte is
    still read, so truncation is detected either way.
    """
    if not data:
        raise BadImageError("empty file")
    # Some libraries set this global to True; a truncated file must fail here, not decode half grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            source_size = img.size
            if img.width * img.height > max_pixels:
                raise BadImageError(f"decompression bomb ({img.width}x{img.height} > {max_pixels:,} pixels)")
            if draft_size is not None and img.format == "JPEG":
                scale = max(img.size) / draft_size
                if scale >= 2:
                    img.draft(img.mode, (int(img.width / scale), int(img.height / scale)))
            img.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError("not an image (unknown format)") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad data
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise BadImageError(f"{kind} ({type(exc).__name__}: {exc})") from None
    img.info["source_size"] = source_size
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white, 16-bit is rescaled."""
    if img.mode == "RGB":
        return img
    try:
        return _to_rgb(img)
    except Exception as exc:  # e.g. LAB or multi-channel TIFF modes PIL cannot convert
        raise BadImageError(f"unsupported mode {img.mode} ({type(exc).__name__}: {exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode in _SIXTEEN_BIT_MODES:
            top = 65535.0
        elif img.mode == "F" and arr.size and arr.max() <= 1.0:
            top = 1.0
        else:  # 32-bit ints usually hold 16-bit data (PIL's older PNG reader); small values are 8-bit
            top = 65535.0 if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255.0).round().clip(0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
