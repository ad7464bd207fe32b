"""train.nonfinite_loss: a NaN loss on one rank makes every rank skip the step, or every rank raise.

The 2-rank case runs on real gloo processes with a DDP model holding BatchNorm: a rank that decided alone
would leave the other waiting in a collective, and a skipped step must leave no trace (weights, BatchNorm
statistics), and DDP must keep working on the next step after a forward without backward.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from torch import nn

from raytrain_ssl.config import load_config
from raytrain_ssl.stages.nonfinite import (
    MARKER_FILE,
    LossGuard,
    NonFiniteLossError,
    refuse_retry_after_stop,
)
from raytrain_ssl.stages.pretrain import Progress

from gloo_ranks import run_on_two_ranks  # tests/ is on sys.path under pytest


class RecordingTB:
    def __init__(self):
        self.calls = []

    def scalars(self, values, step, prefix=""):
        self.calls.append((prefix, dict(values), step))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _two_rank_scenarios(rank: int, run_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tb, progress = RecordingTB(), Progress(global_step=6)
    guard = LossGuard("skip", model, tb)
    before = _snapshot(model.module)

    # Step 7: rank 1's batch holds a NaN (its BatchNorm running stats turn NaN in the forward).
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x[0, 0] = float("nan")
    guard.before_forward()
    loss = model(x).pow(2).mean()
    assert math.isfinite(loss.item()) == (rank == 0)
    assert guard.skip_step(loss, progress) is True, f"rank {rank} did not skip"
    after = _snapshot(model.module)
    for key in before:  # no weight and no BatchNorm statistic changed, on either rank
        assert torch.equal(before[key], after[key]), f"rank {rank}: {key} changed by a skipped step"
    assert progress.skipped_steps == 1
    assert tb.calls == [("train/", {"skipped_steps": 1}, 7)]

    # The next step is normal: both ranks update, DDP's gradient all-reduce still works after a forward
    # that had no backward, and the weights stay equal across ranks.
    progress.global_step += 1
    guard.before_forward()
    loss = model(torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + rank))).pow(2).mean()
    assert guard.skip_step(loss, progress) is False
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    weight = model.module[0].weight.detach()
    assert not torch.equal(weight, before["0.weight"])
    gathered = [torch.empty_like(weight) for _ in range(2)]
    torch.distributed.all_gather(gathered, weight.contiguous())
    assert torch.equal(gathered[0], gathered[1])

    # "stop": only rank 0 sees inf, both ranks raise, naming the step and the losses.
    stop = LossGuard("stop", model, RecordingTB(), run_dir)
    progress.global_step = 41
    loss = torch.tensor(float("inf") if rank == 0 else 0.5)
    with pytest.raises(NonFiniteLossError) as raised:
        stop.skip_step(loss, progress)
    message = str(raised.value)
    assert "step 42" in message and "rank 0: inf" in message and "rank 1: 0.5" in message, message
    with open(os.path.join(run_dir, f"raised_rank{rank}.txt"), "w") as f:
        f.write(message)


def test_nonfinite_on_one_rank_both_skip_then_both_stop(tmp_path):
    (tmp_path / "config.yaml").write_text("stage: pretrain\n")
    run_on_two_ranks(_two_rank_scenarios, str(tmp_path))
    for rank in (0, 1):
        assert "non-finite loss at step 42" in (tmp_path / f"raised_rank{rank}.txt").read_text()
    marker = json.loads((tmp_path / MARKER_FILE).read_text())
    assert marker["step"] == 42 and marker["losses"] == ["inf", "0.5"]


def test_finite_loss_is_left_alone_and_single_process_works():
    model = _model()
    tb, progress = RecordingTB(), Progress()
    guard = LossGuard("skip", model, tb)
    guard.before_forward()
    loss = model(torch.randn(4, 4)).pow(2).mean()
    assert guard.skip_step(loss, progress) is False
    assert progress.skipped_steps == 0 and tb.calls == []
    with pytest.raises(NonFiniteLossError, match=r"step 1 \(epoch 1; rank 0: nan\)"):
        LossGuard("stop", model, tb).skip_step(torch.tensor(float("nan")), progress)
    with pytest.raises(ValueError, match="allowed: stop, skip"):
        LossGuard("ignore", model, tb)


def test_retry_of_the_same_fit_stops_at_once_but_a_new_driver_start_does_not(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("stage: pretrain\n")
    refuse_retry_after_stop(tmp_path)  # no marker: nothing to refuse
    guard = LossGuard("stop", _model(), RecordingTB(), tmp_path)
    with pytest.raises(NonFiniteLossError):
        guard.skip_step(torch.tensor(float("nan")), Progress(global_step=9))
    # Ray Train retries the worker group within the same fit(): config.yaml is unchanged.
    with pytest.raises(NonFiniteLossError, match=r"step 10 \(rank 0: nan\) in an earlier attempt of this run"):
        refuse_retry_after_stop(tmp_path)
    # `--resume` starts a new driver, which rewrites config.yaml before fit(): training is tried again.
    time.sleep(0.01)
    config.write_text("stage: pretrain\n")
    refuse_retry_after_stop(tmp_path)


def test_config_key():
    assert load_config(None, []).train.nonfinite_loss == "stop"
    assert load_config(None, ["train.nonfinite_loss=skip"]).train.nonfinite_loss == "skip"
    with pytest.raises(Exception, match="train.nonfinite_loss"):
        load_config(None, ["train.nonfinite_loss=ignore"])
