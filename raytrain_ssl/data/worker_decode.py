"""Decode and augment inside the Train worker, on its device: the `data.decode_on: worker` path.

With the default (`ray_data`), CPU tasks of Ray Data decode every image and cut its two SimCLR views, and
the workers receive uint8 views. On GPU workers the CPUs of a node can become the bottleneck (an 8-GPU
node with 2x224 px views per image needs thousands of JPEG decodes a second). With `worker`, Ray Data
only reads the shards and ships the encoded bytes (a JPEG is several times smaller than its two decoded
views, so the object store and the network carry less), and each worker:

- decodes JPEGs on its GPU with nvJPEG, batched, through TorchCodec's `decode_jpeg(device="cuda")`
  (torchvision's image decoders, deprecated since torchvision 0.29, moved there with the same API);
  other formats (and everything on a CPU worker) with TorchCodec's `decode_image` on the CPU, and what
  it cannot read (BMP, TIFF, ...) with PIL, as the Ray Data path does;
- cuts the two views with the very same torchvision v2 transforms as the Ray Data path
  (`data/augment.simclr_view_transform`), which run on tensors of any device.

A bad image never ends the run, and it must not change a worker's batch size either: DDP steps and the
gathered negatives need every worker to bring the same number of images, and the rows were split between
workers before anyone decoded them. So a bad image is a logged skip (id and reason) whose place in the
batch goes to another image of the same batch, with views of its own. Shards written by `raytrain-ssl
shards` hold only images that decoded at ingestion, so this is a guard for foreign shards, not a
common case.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from raytrain_ssl.data.decode import BadImageError, decode_rgb

if TYPE_CHECKING:
    import torch

    from raytrain_ssl.data.stream import ViewSpec

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return bytes(data[:3]) == _JPEG_MAGIC


def decode_on_device(encoded, ids, device: torch.device) -> list[torch.Tensor | None]:
    """uint8 RGB CHW tensors on `device`, one per encoded image; None (and a logged skip) for a bad one."""
    import torch

    images: list[torch.Tensor | None] = [None] * len(encoded)
    on_gpu = device.type == "cuda"
    jpegs = [i for i, data in enumerate(encoded) if on_gpu and is_jpeg(data)]
    for i, image in zip(jpegs, _decode_jpegs_on_gpu([encoded[i] for i in jpegs], [ids[i] for i in jpegs], device)):
        images[i] = image
    for i in sorted(set(range(len(encoded))) - set(jpegs)):
        try:
            images[i] = _decode_on_cpu(encoded[i]).to(device, non_blocking=True)
        except BadImageError as exc:
            log.warning("skipping image %s: %s", ids[i], exc)
    return images


def _decode_jpegs_on_gpu(encoded, ids, device) -> list[torch.Tensor | None]:
    """nvJPEG decodes the whole list in one batched call; when it refuses (one corrupt file fails the
    call), each image is decoded alone so that only the bad ones are skipped."""
    import torch
    from torchcodec.decoders import decode_jpeg

    if not encoded:
        return []
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    try:
        return list(decode_jpeg(tensors, mode="RGB", device=device))
    except (RuntimeError, ValueError):
        pass
    images = []
    for data, tensor, image_id in zip(encoded, tensors, ids):
        try:
            images.append(decode_jpeg(tensor, mode="RGB", device=device))
        except (RuntimeError, ValueError):  # nvJPEG refuses some files libjpeg reads: the CPU decoders try
            try:
                images.append(_decode_on_cpu(data).to(device, non_blocking=True))
            except BadImageError as exc:
                log.warning("skipping image %s: %s", image_id, exc)
                images.append(None)
    return images


def _decode_on_cpu(data: bytes) -> torch.Tensor:
    """TorchCodec's decoders (libjpeg-turbo, libpng, libwebp, ...), PIL for the formats they lack."""
    import torch
    from torchcodec.decoders import decode_image

    if not data:
        raise BadImageError("empty file")
    try:
        image = decode_image(bytes(data), mode="RGB", output_dtype=torch.uint8)  # 16-bit PNGs rescaled
        if image.ndim == 3:  # an animated GIF/WebP decodes as (frames, C, H, W): PIL takes its first frame
            return image
    except (RuntimeError, ValueError):
        pass
    # PIL (data/decode.py) converts every mode the Ray Data path converts, or says why it cannot.
    return torch.from_numpy(np.asarray(decode_rgb(data)).copy()).permute(2, 0, 1)


class TwoViewMaker:
    """Encoded batch (numpy columns `image`, `id`, `key` from `data.stream.encoded_dataset`) -> two uint8
    SimCLR views per image and their keys, as torch tensors on the worker's device.

    The random crops, flips and colour changes come from a CPU generator of its own: the same seed draws the
    same views, and torch's global generator is left as it was (the caller seeds per epoch and worker)."""

    def __init__(self, spec: ViewSpec, device: torch.device, seed: int):
        import torch

        from raytrain_ssl.data.augment import simclr_view_transform

        self.device = device
        self.transform = simclr_view_transform(
            spec.image_size, spec.color_jitter_strength, spec.min_crop_scale, spec.gaussian_blur,
            spec.grayscale_probability,
        )  # fmt: skip
        self._rng_state = torch.Generator().manual_seed(seed).get_state()

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        import torch

        images = decode_on_device(batch["image"], batch["id"], self.device)
        sources = _substitutes(images, batch["id"])
        # torchvision's v2 transforms draw from torch's global CPU generator: borrow it with our own state.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            view1 = torch.stack([self.transform(images[s]) for s in sources])
            view2 = torch.stack([self.transform(images[s]) for s in sources])
            self._rng_state = torch.get_rng_state()
        keys = torch.as_tensor(np.asarray(batch["key"])[sources], device=self.device)
        return {"view1": view1, "view2": view2, "key": keys}


def _substitutes(images: list, ids) -> list[int]:
    """For each position of the batch, the index of the image that fills it: itself when it decoded,
    else the next image that did (cyclically), so the batch keeps its size."""
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise BadImageError(f"no image of a batch of {len(images)} decoded (first ids: {list(ids[:3])})")
    return [i if images[i] is not None else next((g for g in good if g > i), good[0]) for i in range(len(images))]
