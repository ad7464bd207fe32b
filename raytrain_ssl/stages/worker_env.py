"""What a stage's train loop needs to know about the worker it runs on, gathered in one place."""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    use_bf16: bool
    channels_last: bool
    datasets: tuple[str, ...]
    batch_log: Path | None = None  # train.record_batch_ids: this worker's JSON lines of trained image keys

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

    def autocast(self):
        """bf16 autocast when the run uses it, else a no-op context."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def record_batch(self, epoch: int, step: int, keys: torch.Tensor) -> None:
        """With `train.record_batch_ids`, append the keys (`data.stream.image_keys`) of the images this worker
        trained on at `step`: an audit of what each step saw. A step run again after a restart gets a
        second line; the later one is what the model kept."""
        if self.batch_log is None:
            return
        self.batch_log.parent.mkdir(parents=True, exist_ok=True)
        with self.batch_log.open("a") as out:
            out.write(json.dumps({"epoch": epoch, "step": step, "keys": keys.tolist()}) + "\n")

    def epoch_batches(self, shard, cfg, epoch: int, steps_per_epoch: int, skip: int = 0, views=None):
        """One epoch of training batches of this worker: full batches only (DDP steps must match), the
        local shuffle buffer seeded from (seed, epoch, rank) so a resumed epoch shuffles the same way.

        `skip`: batches of this epoch already trained on before a restart. With `data.ordered` the stream
        replays the interrupted epoch row for row (see data/train_ingest.py), so dropping them resumes
        at the same position; the skipped images are decoded again but not trained on.

        `views`: for a stream of encoded images (`data.decode_on: worker`), the callable that turns a numpy
        batch into tensors on this worker's device (data/worker_decode.py); skipped batches are not decoded."""
        rows = shuffle_buffer_rows(cfg.data.shuffle_buffer_rows, cfg.batch_size_per_worker, steps_per_epoch)
        options = dict(
            batch_size=cfg.batch_size_per_worker,
            drop_last=True,
            local_shuffle_buffer_size=rows or None,
            local_shuffle_seed=self.epoch_seed(cfg.data.shuffle_seed, epoch) if rows else None,
        )
        if views is None:
            batches = shard.iter_torch_batches(device=self.device, **options)
        else:  # encoded bytes cannot become tensors: numpy batches, decoded on the device by `views`
            batches = shard.iter_batches(batch_format="numpy", **options)
        if skip and self.is_main:
            how = "same order as before" if cfg.data.ordered else "a new order: data.ordered is off"
            log.info("resuming epoch %d after step %d of it: skipping %d batches (%s)", epoch + 1, skip, skip, how)
        batches = itertools.islice(batches, skip, None)
        return batches if views is None else map(views, batches)

    def epoch_seed(self, seed: int, epoch: int) -> int:
        """A seed of its own for every (seed, epoch, worker): the shuffle buffer, worker-side augmentation."""
        return seed + 7919 * epoch + self.rank


def shuffle_buffer_rows(configured: int, batch_size: int, steps_per_epoch: int) -> int:
    """The local shuffle buffer of a worker (0: off): the configured size, capped at a quarter of the
    worker's epoch, and never under two batches.

    The cap: Ray Data yields an epoch's first batch only once the buffer holds this many rows, so a buffer
    as large as the epoch (2,048 rows against digits' 718 per worker) decoded the whole epoch before the
    first step of every epoch. The floor: with a buffer under two batches, Ray 2.60's ShufflingBatcher
    can hand out a short batch in the middle of a stream (it yields once half the buffer is shuffled,
    then takes a whole batch from it), and workers whose batches differ in size abort in the collectives
    (seen with the buffer equal to the batch: gloo's `op.preamble.length <= op.nbytes`). At two batches or
    more, the shuffled part always holds a whole batch when it yields."""
    if configured == 0:
        return 0
    quarter_epoch = steps_per_epoch * batch_size // 4
    return max(min(configured, quarter_epoch), 2 * batch_size)


def timed_batches(batches, limit: int):
    """Yield (step number from 1, batch, seconds spent waiting for it) for at most `limit` batches; stops
    early when the stream runs out (fewer batches than planned because bad images were skipped)."""
    iterator = iter(batches)
    for done in range(1, limit + 1):
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield done, batch, time.perf_counter() - start


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


def setup_worker(train_cfg, datasets: list[str], run_dir: str | None = None) -> WorkerEnv:
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
    rank = context.get_world_rank()
    record = train_cfg.record_batch_ids and run_dir is not None
    return WorkerEnv(
        rank=rank,
        world_size=context.get_world_size(),
        device=device,
        use_bf16=use_bf16,
        channels_last=channels_last,
        datasets=tuple(datasets),
        batch_log=Path(run_dir) / "batch_ids" / f"rank{rank}.jsonl" if record else None,
    )
