"""2 Ray Train workers with B/2 each == 1 process with B: global BatchNorm and gathered NT-Xent.

This is the property the whole project leans on (ARCHITECTURE.md): statistics and negatives over the
global batch mean the same thing whatever the number of workers. Checked in real DDP workers (gloo),
through the same calls the pretraining stage makes: convert_to_global_batchnorm, prepare_model, nt_xent.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raytrain_ssl.losses import nt_xent

pytestmark = pytest.mark.ray

BATCH, TEMPERATURE = 16, 0.2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8),
    )  # fmt: skip


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 6, 6, generator=g), torch.randn(BATCH, 3, 6, 6, generator=g)


def _step(model: nn.Module, view1: torch.Tensor, view2: torch.Tensor):
    z = model(torch.cat([view1, view2]))
    z1, z2 = z.chunk(2)
    loss, _ = nt_xent(z1, z2, TEMPERATURE)
    loss.backward()
    return loss


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from raytrain_ssl import dist

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    model = ray.train.torch.prepare_model(dist.convert_to_global_batchnorm(_model(), use_sync_batchnorm=False))
    view1, view2 = (v.chunk(world)[rank] for v in _views())
    loss = _step(model, view1, view2)
    core = model.module
    torch.save(
        {
            "loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in core.named_parameters()},  # after DDP's averaging
            "buffers": {n: b.clone() for n, b in core.named_buffers()},
        },
        f"{config['out']}/rank{rank}.pt",
    )


def test_two_workers_match_one_process_on_the_full_batch(ray_local, tmp_path):
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    # Test modules are not importable in Ray workers: ship this module's functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        _worker,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="equivalence", storage_path=str(tmp_path / "runs")),
    ).fit()

    reference = _model()
    loss = _step(reference, *_views())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # Each rank's loss is the mean over its own anchors; their average is the full-batch loss.
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), atol=1e-5)
    for name, param in reference.named_parameters():
        for r in ranks:  # DDP averaged the per-rank gradients: every rank holds the full-batch gradient
            torch.testing.assert_close(r["grads"][name], param.grad, atol=2e-5, rtol=1e-4, msg=name)
    for name, buffer in reference.named_buffers():  # running statistics from the global batch
        for r in ranks:
            torch.testing.assert_close(r["buffers"][name], buffer, atol=1e-5, rtol=1e-4, msg=name)


def test_reference_differs_from_per_worker_statistics():
    """The check above can fail: plain BatchNorm on B/2 does not give the full-batch gradient."""
    reference = _model()
    _step(reference, *_views())
    local = _model()
    view1, view2 = (v.chunk(2)[0] for v in _views())
    _step(local, view1, view2)
    diffs = [(a.grad - b.grad).abs().max() for a, b in zip(reference.parameters(), local.parameters())]
    assert max(diffs) > 1e-3
