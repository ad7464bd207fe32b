"""Non-finite losses (NaN, inf): found at every step, handled alike on every worker (`train.nonfinite_loss`).

The train loops (pretrain.py, deepercluster.py, classifier_loop.py) call, per step:

    guard.before_forward()                       # "skip" only: keep the BatchNorm statistics of now
    loss = ...
    if not guard.skip_step(loss, progress):      # one all-gather of the workers' losses
        backward, optimizer step, EMA, queue
    scheduler.step(); progress.global_step += 1  # the step counts either way

Every worker must decide the same thing: the backward pass holds collectives (DDP's gradient all-reduce,
global BatchNorm, gathered negatives), so a rank that skipped it alone would leave the others waiting
forever. The per-worker losses are therefore all-gathered (one float each) and every rank sees all of them.

- "stop": every worker raises `NonFiniteLossError` naming the step and each rank's loss, before any update
  or checkpoint, so the last checkpoint stays the last good one. Ray Train counts the error as a worker
  failure and retries up to `ray.max_failures` times (Ray 2.60's Train V2 retries every worker-group error:
  `FailureConfig` has no "not retryable" marker and the failure policy is not pluggable). A retry would
  resume from that checkpoint and usually meet the same loss again, so rank 0 first writes
  `<run_dir>/nonfinite_stop.json`; a retry of the same `fit()` (same `config.yaml` modification time: every
  driver start rewrites it) finds that file at the start and stops at once, without training. A later
  `--resume` (a new driver, maybe with a lower learning rate) is not affected.
- "skip": the batch is dropped on every worker: no backward, no optimizer step, no EMA or queue update,
  and the BatchNorm running statistics the forward changed are put back. The step still counts: the
  learning-rate schedule advances and `progress.global_step` moves on, so step numbers, checkpoints and
  epoch lengths stay where they would have been. Skipped steps are counted in the checkpoint
  (`progress.skipped_steps`) and in TensorBoard (`train/skipped_steps`, at each skipped step).

Not caught: a finite loss whose gradients overflow (there is no gradient scaler with bf16 autocast).
The check costs one small all-gather per step, and on GPUs a host synchronisation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from raytrain_ssl import dist

log = logging.getLogger("raytrain_ssl.nonfinite")

MARKER_FILE = "nonfinite_stop.json"
CONFIG_FILE = "config.yaml"  # launch.CONFIG_FILE: rewritten by every driver start, before fit()
MODES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite on at least one worker and `train.nonfinite_loss` is "stop"."""


class LossGuard:
    """Per-step check of the loss on all workers; see the module docstring."""

    def __init__(self, mode: str, models: nn.Module | list[nn.Module], tb, run_dir: str | Path | None = None):
        """`models`: every module a forward changes (the model, an EMA key encoder run in train mode)."""
        if mode not in MODES:
            raise ValueError(f"train.nonfinite_loss={mode!r}; allowed: {', '.join(MODES)}")
        self.mode = mode
        self.tb = tb
        self.run_dir = Path(run_dir) if run_dir is not None else None
        models = [models] if isinstance(models, nn.Module) else list(models)
        self._buffers = [b for m in models for b in m.buffers()] if mode == "skip" else []
        self._saved: list[torch.Tensor] = []

    def before_forward(self) -> None:
        """In "skip" mode, keep the buffers (BatchNorm running statistics) a skipped step must put back."""
        if self._buffers:
            self._saved = [b.detach().clone() for b in self._buffers]

    def skip_step(self, loss: torch.Tensor, progress) -> bool:
        """False when the loss is finite on every worker. Otherwise "skip" restores the buffers, counts the
        step and returns True (on every worker alike); "stop" raises `NonFiniteLossError` on every worker."""
        losses = dist.all_gather_no_grad(loss.detach().float().reshape(1)).cpu()
        if bool(torch.isfinite(losses).all()):
            return False
        step = progress.global_step + 1
        shown = ", ".join(f"rank {r}: {v:.6g}" for r, v in enumerate(losses.tolist()))
        if self.mode == "stop":
            if dist.is_main_process() and self.run_dir is not None:
                record_stop(self.run_dir, step, losses.tolist())
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {progress.epoch + 1}; {shown}): train.nonfinite_loss=stop "
                "ends the run before any update, so its last checkpoint is the last good one. Lower "
                "optim.base_learning_rate, check the data, or set train.nonfinite_loss=skip, then --resume"
            )
        with torch.no_grad():
            for buffer, saved in zip(self._buffers, self._saved):
                buffer.copy_(saved)
        progress.skipped_steps += 1
        if dist.is_main_process():
            log.warning(
                "non-finite loss at step %d (epoch %d; %s): step skipped on every worker (%d skipped so far)",
                step, progress.epoch + 1, shown, progress.skipped_steps,
            )  # fmt: skip
        self.tb.scalars({"skipped_steps": progress.skipped_steps}, step, prefix="train/")
        return True


def record_stop(run_dir: str | Path, step: int, losses: list[float]) -> None:
    """Rank 0, on "stop": what a retry of the same fit() reads to stop at once (`refuse_retry_after_stop`)."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_FILE
    marker = {
        "step": step,
        "losses": [repr(v) for v in losses],  # NaN/inf are not JSON
        "config_mtime_ns": config.stat().st_mtime_ns if config.is_file() else None,
    }
    try:
        (run_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    except OSError as exc:  # the error itself still ends the run
        log.warning("could not write %s: %s", run_dir / MARKER_FILE, exc)


def refuse_retry_after_stop(run_dir: str | Path) -> None:
    """Called by every worker at the start of the train loop: raise if an earlier attempt of this same
    fit() stopped on a non-finite loss. Ray Train's retry would resume from the same checkpoint and meet the
    same loss again; a new driver start (`--resume`) rewrites config.yaml and is let through."""
    run_dir = Path(run_dir)
    marker_path, config = run_dir / MARKER_FILE, run_dir / CONFIG_FILE
    if not marker_path.is_file() or not config.is_file():
        return
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError):
        return
    if marker.get("config_mtime_ns") != config.stat().st_mtime_ns:
        return  # from an earlier driver start: this is a resume, try again
    losses = ", ".join(f"rank {r}: {float(v):.6g}" for r, v in enumerate(marker.get("losses", [])))
    raise NonFiniteLossError(
        f"non-finite loss at step {marker.get('step')} ({losses}) in an earlier attempt of this run: not "
        "retried, a retry resumes from the same checkpoint and meets it again. Lower "
        "optim.base_learning_rate, check the data, or set train.nonfinite_loss=skip, then --resume"
    )
