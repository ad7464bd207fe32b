"""`data.decode_on: worker`: encoded bytes through Ray Data, decode + two views in the worker on its device.

The decoders are compared with the Ray Data path's PIL decoder on real files of every mode; the GPU test
(nvJPEG through TorchCodec) runs only where CUDA is present."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain_ssl.data.decode import BadImageError, decode_rgb
from raytrain_ssl.data.stream import ViewSpec, encoded_batch_fn, encoded_dataset, image_keys
from raytrain_ssl.data.worker_decode import TwoViewMaker, decode_on_device

CPU = torch.device("cpu")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _photo(seed: int = 0, size=(30, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _files() -> dict[str, bytes]:
    rgb = _photo()
    sixteen = Image.fromarray(np.asarray(rgb)[..., 0].astype(np.uint16) * 257)
    return {
        "rgb.jpg": _encode(rgb, "JPEG", quality=95),
        "rgb.png": _encode(rgb, "PNG"),
        "grey.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "sixteen.png": _encode(sixteen, "PNG"),
        "lossless.webp": _encode(rgb, "WEBP", lossless=True),
        "rgb.bmp": _encode(rgb, "BMP"),  # torchvision has no BMP decoder: PIL takes over
        "rgb.tiff": _encode(rgb, "TIFF"),
    }


def _bad_files() -> dict[str, bytes]:
    jpeg = _encode(_photo(), "JPEG")
    return {"truncated.jpg": jpeg[: len(jpeg) // 2], "text.jpg": b"not an image at all", "empty.png": b""}


def test_worker_decode_matches_the_ray_data_decoder_on_every_mode():
    files = _files()
    images = decode_on_device(list(files.values()), list(files), CPU)
    for (name, data), image in zip(files.items(), images):
        reference = torch.from_numpy(np.asarray(decode_rgb(data)).copy()).permute(2, 0, 1)
        assert image is not None and image.dtype == torch.uint8 and image.shape == (3, 20, 30), name
        assert torch.equal(image, reference), name  # the same libjpeg/libpng output, pixel for pixel


def test_bad_files_are_logged_skips_with_their_id_and_reason(caplog):
    bad = _bad_files()
    with caplog.at_level(logging.WARNING, logger="raytrain_ssl"):
        images = decode_on_device([_files()["rgb.png"], *bad.values()], ["good.png", *bad], CPU)
    assert images[0] is not None and images[1:] == [None, None, None]
    lines = [r.getMessage() for r in caplog.records]
    for name, reason in [("truncated.jpg", "truncated"), ("text.jpg", "not an image"), ("empty.png", "empty file")]:
        assert any(name in line and reason in line for line in lines), (name, lines)
    assert not any("good.png" in line for line in lines)


def _batch(files: dict[str, bytes]) -> dict:
    ids = np.array(list(files), dtype=object)
    return {"image": np.array(list(files.values()), dtype=object), "id": ids, "key": image_keys(ids)}


def test_two_views_keep_the_batch_size_when_images_are_bad(caplog):
    good = {f"{i}.png": _encode(_photo(i), "PNG") for i in range(3)}
    files = {"0.png": good["0.png"], "bad.jpg": b"corrupt", "1.png": good["1.png"], "2.png": good["2.png"]}
    maker = TwoViewMaker(ViewSpec(image_size=16, min_crop_scale=0.3), CPU, seed=0)
    with caplog.at_level(logging.WARNING, logger="raytrain_ssl"):
        out = maker(_batch(files))
    assert out["view1"].shape == out["view2"].shape == (4, 3, 16, 16) and out["view1"].dtype == torch.uint8
    # The bad image's place went to the next good one (1.png), whose key the batch now carries twice.
    assert out["key"].tolist() == image_keys(["0.png", "1.png", "1.png", "2.png"]).tolist()
    assert not torch.equal(out["view1"][1], out["view1"][2])  # views of its own, not a copy
    assert any("bad.jpg" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadImageError, match="no image of a batch of 2 decoded"):
        maker(_batch({"a.jpg": b"x", "b.jpg": b""}))


def test_worker_views_are_reproducible_from_their_seed_and_differ_between_seeds():
    batch = _batch({f"{i}.png": _encode(_photo(i, (40, 40)), "PNG") for i in range(4)})
    spec = ViewSpec(image_size=16, min_crop_scale=0.2)
    first, again, other = (TwoViewMaker(spec, CPU, seed)(batch) for seed in (1, 1, 2))
    assert torch.equal(first["view1"], again["view1"]) and torch.equal(first["view2"], again["view2"])
    assert not torch.equal(first["view1"], other["view1"])
    assert not torch.equal(first["view1"], first["view2"])  # two different views of each image
    state = torch.get_rng_state()
    TwoViewMaker(spec, CPU, 3)(batch)
    assert torch.equal(state, torch.get_rng_state())  # torch's global generator is left as it was


def test_encoded_rows_over_the_pixel_limit_are_dropped_before_any_decode(caplog):
    batch = {
        "image": np.array([b"a", b"b"], dtype=object),
        "id": np.array(["small.jpg", "bomb.png"], dtype=object),
        "width": np.array([10, 9000], dtype=np.int32),
        "height": np.array([10, 9000], dtype=np.int32),
    }
    with caplog.at_level(logging.WARNING, logger="raytrain_ssl"):
        out = encoded_batch_fn(max_pixels=1_000_000)(batch)
    assert out["id"].tolist() == ["small.jpg"] and out["key"].tolist() == image_keys(["small.jpg"]).tolist()
    assert any("bomb.png" in r.getMessage() and "decompression bomb" in r.getMessage() for r in caplog.records)


@pytest.mark.ray
def test_a_real_encoded_stream_gives_every_image_once_as_two_views(ray_local, tmp_path):
    """Ray Data reads and ships the bytes of the builtin digits shards; the worker side decodes them."""
    from raytrain_ssl.data.builtin import materialize_builtin
    from raytrain_ssl.data.stream import count_rows

    train = str(materialize_builtin("builtin:digits", tmp_path)["train"])
    ds = encoded_dataset(train, ViewSpec(image_size=16), shuffle_seed=0, batch_size=128, concurrency=1)
    maker = TwoViewMaker(ViewSpec(image_size=16), CPU, seed=0)
    keys = []
    for batch in ds.iter_batches(batch_size=100, batch_format="numpy"):
        views = maker(batch)
        assert views["view1"].shape == (len(batch["id"]), 3, 16, 16)
        keys += views["key"].tolist()
    assert len(keys) == len(set(keys)) == count_rows(train)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_decode_and_views_on_the_gpu(caplog):
    cuda = torch.device("cuda")
    files = {**_files(), **_bad_files()}
    images = decode_on_device(list(files.values()), list(files), cuda)
    for (name, data), image in zip(files.items(), images):
        if name in _bad_files():
            assert image is None, name
            continue
        assert image.device.type == "cuda" and image.shape == (3, 20, 30), name
        reference = torch.from_numpy(np.asarray(decode_rgb(data)).copy()).permute(2, 0, 1)
        # nvJPEG's IDCT and colour conversion differ from libjpeg's by a few levels; lossless formats match.
        assert (image.cpu().int() - reference.int()).abs().float().mean() < 3, name
    out = TwoViewMaker(ViewSpec(image_size=16), cuda, seed=0)(_batch(_files()))
    assert out["view1"].device.type == "cuda" and out["view1"].shape == (len(_files()), 3, 16, 16)
