"""What a stage's train loop needs to know about the worker it runs on, gathered in one place."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn



@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    use_bf16: bool
    channels_last: bool
    datasets: tuple[str, ...]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def place(self, model: nn.Module) -> nn.Module:
        """Move to the device (channels_last on GPU) and wrap in DDP through Ray Train."""
        import ray.train.torch

        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return ray.train.torch.prepare_model(model)

    def has_dataset(self, name: str) -> bool:
        return name in self.datasets

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, if wrapped."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def setup_logging() -> None:
    """Log lines from workers reach the driver through the worker's stdout (Ray streams it)."""
    logger = logging.getLogger("raytrain_ssl")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def setup_worker(train_cfg, datasets: list[str]) -> WorkerEnv:
    """Seed, pick the device and precision; the same call in every stage."""
    import ray.train
    import ray.train.torch

    setup_logging()
    # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(train_cfg.seed)
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    use_bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and on_gpu)
    channels_last = on_gpu if train_cfg.channels_last is None else train_cfg.channels_last
    return WorkerEnv(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=device,
        use_bf16=use_bf16,
        channels_last=channels_last,
        datasets=tuple(datasets),
    )
