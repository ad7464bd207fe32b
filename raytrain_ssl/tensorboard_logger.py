"""TensorBoard writing from rank 0 only; every other rank gets a logger that does nothing.

The stage receives a logger object instead of checking its rank at every call site.
"""

from __future__ import annotations

from pathlib import Path

import torch


class NullLogger:
    """Same interface as TensorBoardLogger; used on ranks other than 0."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        pass

    def image_grid(self, tag: str, images: torch.Tensor, step: int, nrow: int = 8) -> None:
        pass

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def histogram(self, tag: str, values, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Thin wrapper over torch.utils.tensorboard.SummaryWriter (event files TensorBoard reads)."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for name, value in values.items():
            self.scalar(f"{prefix}{name}", value, step)

    def image_grid(self, tag: str, images: torch.Tensor, step: int, nrow: int = 8) -> None:
        """`images`: float (N,3,H,W) in [0,1]."""
        from torchvision.utils import make_grid

        grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=1)
        self.writer.add_image(tag, grid, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def histogram(self, tag: str, values, step: int) -> None:
        """`values`: a numpy array or tensor of numbers (e.g. cluster sizes)."""
        self.writer.add_histogram(tag, values, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(log_dir: str | Path, is_main_process: bool) -> NullLogger:
    return TensorBoardLogger(log_dir) if is_main_process else NullLogger()
