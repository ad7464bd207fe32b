"""Checkpoints: written through `ray.train.report` from the workers, read back for resume and downstream.

A checkpoint directory holds one `checkpoint.pt` (a dict of state dicts, counters and the config). Ray Train
copies it to `<storage_path>/<run name>/checkpoint_<timestamp>/` and keeps the newest `num_to_keep`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FILE = "checkpoint.pt"


def report(metrics: dict, state: dict | None) -> None:
    """Report metrics from every worker; `state` (rank 0's) is saved as a checkpoint when given.

    Every worker must call this the same number of times: it is a barrier in Ray Train."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="raytrain_ssl_ckpt_"))
    try:
        # Write then rename, so a crash mid-write never leaves a truncated checkpoint.pt behind.
        torch.save(state, tmp / (CHECKPOINT_FILE + ".partial"))
        (tmp / (CHECKPOINT_FILE + ".partial")).rename(tmp / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_latest_in_worker() -> dict | None:
    """The checkpoint Ray Train hands a (re)started worker group, or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def latest_checkpoint_dir(run_dir: str | Path) -> Path:
    """The newest `checkpoint_*` directory of a run (or `run_dir` itself if it is a checkpoint)."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_FILE).is_file():
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    candidates = sorted(d for d in run_dir.glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file())
    if not candidates:
        raise FileNotFoundError(f"no checkpoint_*/{CHECKPOINT_FILE} under {run_dir}")
    return candidates[-1]


def load_checkpoint(run_or_checkpoint_dir: str | Path) -> dict:
    return torch.load(
        latest_checkpoint_dir(run_or_checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=False
    )
