"""train.nonfinite_loss: a NaN loss on one rank makes every rank skip the step, or every rank raise.

The 2-rank case runs on real gloo processes with a DDP model holding BatchNorm: a rank that decided alone
would leave the other waiting in a collective, and a skipped step must leave no trace (weights, BatchNorm
statistics), and DDP must keep working on the next step after a forward without backward. The DeeperCluster
train loop (`deepercluster._run_epoch`, its own loop) is run the same way, on its real model and optimiser.
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

    def image_grid(self, *args, **kwargs):
        pass


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


# ------------------------------------------------------------------------------- DeeperCluster's train loop

DEEPERCLUSTER = ["method=deepercluster", "model.name=r18_0.125x_sk0", "data.image_size=8", "train.global_batch_size=8",
                 "deepercluster.num_super_clusters=2", "deepercluster.num_sub_clusters=3", "optim.name=sgd",
                 "optim.warmup_epochs=0", "train.log_every_steps=1", "eval.view_grid_pairs=0"]  # fmt: skip


def _deepercluster_parts(rank: int, world_size: int, mode: str):
    """The pieces `deepercluster._run_epoch` gets from its train loop, built the same way, without Ray."""
    from raytrain_ssl import dist
    from raytrain_ssl.optim import build_optimizer, build_scheduler
    from raytrain_ssl.stages import deepercluster
    from raytrain_ssl.stages.cluster_round import PseudoLabels
    from raytrain_ssl.stages.worker_env import WorkerEnv

    cfg = load_config(None, DEEPERCLUSTER + [f"train.nonfinite_loss={mode}"])
    torch.manual_seed(cfg.train.seed)
    model = deepercluster.build_model(cfg)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(dist.convert_to_global_batchnorm(model, use_sync_batchnorm=False))
    optimizer = build_optimizer("sgd", model.module if world_size > 1 else model, 0.1, 0.0, 0.9, 0.001)
    scheduler = build_scheduler(optimizer, 0, 10)
    env = WorkerEnv(rank, world_size, torch.device("cpu"), use_bf16=False, channels_last=False, datasets=())
    keys = torch.arange(32)
    pseudo = PseudoLabels.from_rows(torch.stack([keys, keys % 2, keys % 3], 1), 2, 3, round_index=0, epoch=0)
    generator = torch.Generator().manual_seed(rank)
    batches = [
        {"image": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=generator),
         "key": torch.randint(0, 32, (4,), generator=generator), "rotation": torch.randint(0, 4, (4,), generator=generator)}
        for _ in range(3)
    ]  # fmt: skip
    return cfg, env, model, optimizer, scheduler, pseudo, batches


def _nan_on_rank_1_at_first_call(monkeypatch_target, rank: int) -> None:
    """DeeperCluster's loss turns NaN on rank 1 at its first step (as a diverging batch would); rank 0 is fine."""
    original = monkeypatch_target.deepercluster_loss
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        value = original(*args, **kwargs)
        return value * float("nan") if rank == 1 and len(calls) == 1 else value

    monkeypatch_target.deepercluster_loss = loss


def _deepercluster_two_ranks(rank: int, run_dir: str) -> None:
    from raytrain_ssl.stages import deepercluster

    _nan_on_rank_1_at_first_call(deepercluster, rank)
    cfg, env, model, optimizer, scheduler, pseudo, batches = _deepercluster_parts(rank, 2, "skip")
    tb, progress = RecordingTB(), Progress()
    guard = LossGuard("skip", model, tb)
    before = _snapshot(model.module)

    # Step 1: NaN on rank 1 only; both ranks skip it (neither hangs in DDP's all-reduce), nothing changes.
    model.train()
    deepercluster._run_epoch(cfg, env, model, optimizer, scheduler, pseudo, batches[:1], 1, progress, tb, guard)
    after = _snapshot(model.module)
    for key in before:  # weights, heads and global BatchNorm statistics alike
        assert torch.equal(before[key], after[key]), f"rank {rank}: {key} changed by a skipped step"
    assert (progress.global_step, progress.skipped_steps, scheduler.last_epoch) == (1, 1, 1)
    assert ("train/", {"skipped_steps": 1}, 1) in tb.calls

    # Steps 2-3 train on both ranks, and the weights stay finite and identical across ranks.
    deepercluster._run_epoch(cfg, env, model, optimizer, scheduler, pseudo, batches[1:], 2, progress, tb, guard)
    assert (progress.global_step, progress.skipped_steps) == (3, 1)
    for key, value in model.module.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"rank {rank}: {key} not finite"
            gathered = [torch.empty_like(value) for _ in range(2)]
            torch.distributed.all_gather(gathered, value.contiguous())
            assert torch.equal(gathered[0], gathered[1]), f"{key} differs across ranks"
    weight = model.module.super_head.weight
    assert not torch.equal(weight, before["super_head.weight"])

    # "stop": the same NaN raises on both ranks before any update, naming the step and each rank's loss.
    _nan_on_rank_1_at_first_call(deepercluster, rank)
    cfg, env, model, optimizer, scheduler, pseudo, batches = _deepercluster_parts(rank, 2, "stop")
    progress = Progress(global_step=6, epoch=2)
    before = _snapshot(model.module)
    with pytest.raises(NonFiniteLossError) as raised:
        deepercluster._run_epoch(cfg, env, model, optimizer, scheduler, pseudo, batches, 3, progress,
                                 RecordingTB(), LossGuard("stop", model, RecordingTB(), run_dir))  # fmt: skip
    after = _snapshot(model.module)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert progress.global_step == 6
    with open(os.path.join(run_dir, f"deepercluster_rank{rank}.txt"), "w") as f:
        f.write(str(raised.value))


def test_deepercluster_nan_on_one_rank_both_skip_then_both_stop(tmp_path):
    (tmp_path / "config.yaml").write_text("stage: pretrain\n")
    run_on_two_ranks(_deepercluster_two_ranks, str(tmp_path))
    for rank in (0, 1):
        message = (tmp_path / f"deepercluster_rank{rank}.txt").read_text()
        assert message.startswith("non-finite loss at step 7 (epoch 3; rank 0: "), message
        assert "rank 1: nan): train.nonfinite_loss=stop" in message, message
    assert json.loads((tmp_path / MARKER_FILE).read_text())["step"] == 7


def test_deepercluster_loop_refuses_a_retry_after_a_stop(tmp_path, monkeypatch):
    """A retry of the same fit() (Ray Train's, after the stop above) stops at once instead of training."""
    from raytrain_ssl.stages import deepercluster

    (tmp_path / "config.yaml").write_text("stage: pretrain\n")
    guard = LossGuard("stop", _model(), RecordingTB(), tmp_path)
    with pytest.raises(NonFiniteLossError):
        guard.skip_step(torch.tensor(float("nan")), Progress(global_step=4))
    cfg, env, *_ = _deepercluster_parts(0, 1, "stop")

    class LocalEnv(type(env)):
        def place(self, model):
            return model

    monkeypatch.setattr(deepercluster, "setup_worker", lambda *args: LocalEnv(**env.__dict__))
    monkeypatch.setattr(deepercluster, "load_latest_in_worker", lambda: pytest.fail("trained after a stop"))
    loop_config = {"config": cfg.model_dump(mode="json"), "run_dir": str(tmp_path), "steps_per_epoch": 3, "datasets": []}
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(rank 0: nan\) in an earlier attempt of this run"):
        deepercluster.train_loop_per_worker(loop_config)
