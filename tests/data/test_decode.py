"""decode_rgb / open_image on real files of every kind the wild holds, made here with PIL.

The builders below are also used by test_shards.py, which writes them to disk.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from raytrain_ssl.data.decode import BadImageError, decode_rgb, open_image


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def rgb_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 1 KB PNG whose header declares width x height greyscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 2)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def good_samples(seed: int = 0) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, must be re-encoded by the shard writer)."""
    rgb = rgb_image(seed=seed)
    palette = Image.new("P", (40, 30))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.paste(1, (0, 0, 20 + seed, 30))
    sixteen = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50 + seed)
    la = Image.merge("LA", [Image.new("L", (40, 30), 60 + seed), Image.new("L", (40, 30), 0)])
    return {
        "rgb.jpg": (encode(rgb, "JPEG", quality=90), False),
        "rgb.png": (encode(rgb, "PNG"), False),
        "grey.jpg": (encode(rgb.convert("L"), "JPEG"), False),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), True),
        "palette_alpha.png": (encode(palette, "PNG", transparency=0), True),
        "la.png": (encode(la, "PNG"), True),
        "rgba.png": (encode(rgb.convert("RGBA"), "PNG"), True),
        "sixteen.png": (encode(sixteen, "PNG"), True),
        "anim.gif": (encode(rgb.convert("P"), "GIF"), True),
        "photo.bmp": (encode(rgb, "BMP"), True),
    }


def bad_samples() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the reason's first words)."""
    jpeg = encode(rgb_image(64, 64, seed=1), "JPEG")
    png = encode(rgb_image(64, 64, seed=2), "PNG")
    broken_png = bytearray(png)
    broken_png[60:80] = bytes(20)  # damages the first IDAT chunk, whose checksum then fails
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "empty.jpg": (b"", "empty file"),
        "notes.jpg": (b"these are my notes, not a picture\n" * 20, "not an image"),
        "broken.png": (bytes(broken_png), "corrupt"),
        "bomb.png": (bomb_png(), "decompression bomb"),
        "tiny.png": (encode(rgb_image(4, 4), "PNG"), "too small"),  # rejected by the shard writer only
    }


@pytest.mark.parametrize("name", sorted(good_samples()))
def test_every_mode_decodes_to_rgb(name):
    data, _ = good_samples()[name]
    img = decode_rgb(data)
    assert img.mode == "RGB"
    assert img.size == (40, 30)


@pytest.mark.parametrize("name", sorted(set(bad_samples()) - {"tiny.png"}))
def test_bad_bytes_raise_with_reason(name):
    data, reason = bad_samples()[name]
    with pytest.raises(BadImageError) as info:
        decode_rgb(data)
    assert str(info.value).startswith(reason)


def test_pixel_limit_is_a_decompression_bomb():
    data = encode(rgb_image(40, 30), "PNG")
    with pytest.raises(BadImageError, match="^decompression bomb"):
        decode_rgb(data, max_pixels=40 * 30 - 1)
    assert decode_rgb(data, max_pixels=40 * 30).size == (40, 30)


def test_conversions_keep_the_picture():
    samples = good_samples()
    # Alpha is composited on white: the LA sample is fully transparent.
    assert np.asarray(decode_rgb(samples["la.png"][0])).min() == 255
    # Transparent palette index 0 -> white; index 1 is opaque red.
    palette = np.asarray(decode_rgb(samples["palette_alpha.png"][0]))
    assert tuple(palette[0, 0]) == (255, 0, 0) and tuple(palette[0, 39]) == (255, 255, 255)
    # 16-bit values are rescaled from 0..65535, not clipped at 255.
    sixteen = np.asarray(decode_rgb(samples["sixteen.png"][0]))[..., 0]
    expected = np.round(np.arange(40 * 30).reshape(30, 40) * 50 / 65535 * 255)
    assert np.abs(sixteen.astype(int) - expected).max() <= 1
    # CMYK JPEG comes back close to the RGB it was made from.
    rgb = np.asarray(rgb_image(), dtype=int)
    assert np.abs(np.asarray(decode_rgb(samples["cmyk.jpg"][0]), dtype=int) - rgb).mean() < 20


def test_truncated_stays_bad_when_another_library_allows_truncation(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data, _ = bad_samples()["truncated.jpg"]
    with pytest.raises(BadImageError, match="^truncated"):
        decode_rgb(data)


def test_draft_decodes_large_jpegs_smaller_but_reports_the_source_size():
    data = encode(rgb_image(800, 400), "JPEG")
    img = open_image(data, draft_size=100)
    assert img.info["source_size"] == (800, 400)
    assert 100 <= max(img.size) < 800
    assert open_image(data).size == (800, 400)
