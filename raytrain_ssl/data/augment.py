"""SimCLR augmentations (Chen et al. 2020, appendix A) built from torchvision.transforms.v2.

Views leave as uint8 CHW tensors: 4x less to move through the object store than floats; the training
worker converts to float in [0, 1] on its device (SimCLR feeds [0, 1] images without mean/std).

torch and torchvision are imported inside the functions: the Ray Data map functions that use these are
unpickled by every process that holds the dataset (Train controller, dataset manager, one split coordinator
per stream), which then need not load torchvision (about 5 s of CPU and 600 MB each) to pass it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2


def simclr_view_transform(
    image_size: int,
    color_jitter_strength: float = 1.0,
    min_crop_scale: float = 0.08,
    gaussian_blur: bool = True,
    grayscale_probability: float = 0.2,
) -> v2.Compose:
    """One random SimCLR view of a PIL image: crop+resize, flip, colour jitter, greyscale, blur."""
    from torchvision.transforms import v2

    s = color_jitter_strength
    ops = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        # torchvision's ColorJitter already applies its four changes in random order, as SimCLR does.
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=grayscale_probability),
    ]
    if gaussian_blur:
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # 10% of the side, odd (SimCLR)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(ops)


def eval_transform(image_size: int) -> v2.Compose:
    """Deterministic evaluation view: shorter side to `image_size`, centre crop."""
    from torchvision.transforms import v2

    return v2.Compose(
        [v2.PILToTensor(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    )


def finetune_transform(image_size: int, min_crop_scale: float = 0.08) -> v2.Compose:
    """SimCLRv2 fine-tuning augmentation: random crop and flip only."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


def to_float_images(batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float32 in [0,1], on whatever device `batch` is on."""
    import torch

    images = batch.float().div_(255.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
