"""raytrain_ssl.dist: fallbacks without a process group, and real 2-process gloo runs against references.

Gradient bookkeeping used below. With a per-rank loss L_r that is a *mean* over the rank's share of the
global batch, the global loss is L = (1/W) * sum_r L_r. The differentiable collectives give rank r the
gradient d(sum_s L_s)/dx_r = W * dL/dx_r for its inputs, so inputs compare as `rank_grad / W`. Parameters
applied locally (BN weight/bias) get dL_r/dθ on rank r; DDP averages them, (1/W) * sum_r dL_r/dθ = dL/dθ.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from raytrain_ssl import dist
from raytrain_ssl.dist import GlobalBatchNorm, convert_to_global_batchnorm

from gloo_ranks import run_on_two_ranks  # tests/ is on sys.path under pytest


def _close(a, b, atol=1e-5, rtol=1e-4, what=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# -- single process --------------------------------------------------------------------------------
def test_fallbacks_without_process_group():
    assert (dist.get_rank(), dist.get_world_size(), dist.is_main_process()) == (0, 1, True)
    dist.barrier()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x
    assert dist.all_reduce_with_grad(x) is x
    assert torch.equal(dist.all_gather_no_grad(x), x) and not dist.all_gather_no_grad(x).requires_grad
    assert torch.equal(dist.all_gather_variable(x), x)


def test_global_batchnorm_world_size_one_equals_batchnorm2d_exactly():
    torch.manual_seed(0)
    ref, gbn = nn.BatchNorm2d(3), GlobalBatchNorm(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    gbn.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(gbn(x), ref(x))
    assert torch.equal(gbn.running_var, ref.running_var)
    gbn.eval(), ref.eval()
    assert torch.equal(gbn(x), ref(x))
    with pytest.raises(ValueError, match="expects"):
        gbn(torch.randn(2, 3, 4, 4, 4))


def test_convert_to_global_batchnorm_replaces_every_bn_and_shares_state():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3, eps=1e-3),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8, affine=False)),
    )
    model[1].running_mean.fill_(0.7)
    model[1].num_batches_tracked.fill_(5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_global_batchnorm(model, use_sync_batchnorm=False)

    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2 and all(type(m) is GlobalBatchNorm for m in bns)
    assert (bns[0].momentum, bns[0].eps, bns[0].affine) == (0.3, 1e-3, True)
    assert (bns[1].affine, bns[1].track_running_stats, bns[1].training) == (False, True, False)
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

    synced = convert_to_global_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), use_sync_batchnorm=True)
    assert isinstance(synced[0], nn.SyncBatchNorm)


# -- two processes ---------------------------------------------------------------------------------
def _collectives_worker(rank: int) -> None:
    world = dist.get_world_size()
    assert (dist.get_rank(), world, dist.is_main_process()) == (rank, 2, rank == 0)
    dist.barrier()

    # all_gather_with_grad: values in rank order; rank r's grad = sum over ranks of their grads for its rows.
    x = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = dist.all_gather_with_grad(x)
    _close(gathered, torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2), what="gather values")
    weights = torch.arange(12.0).view(4, 3) * (rank + 1)  # rank-specific loss weights
    (gathered * weights).sum().backward()
    base = torch.arange(12.0).view(4, 3)
    _close(x.grad, (base * 1 + base * 2)[2 * rank : 2 * rank + 2], what="gather grad")

    # all_reduce_with_grad: forward sum, backward sum of the ranks' upstream grads.
    y = torch.tensor([1.0, 2.0]) * (rank + 1)
    y.requires_grad_(True)
    total = dist.all_reduce_with_grad(y)
    _close(total, torch.tensor([3.0, 6.0]), what="reduce values")
    (total * (rank + 1)).sum().backward()
    _close(y.grad, torch.tensor([3.0, 3.0]), what="reduce grad")

    no_grad = dist.all_gather_no_grad(torch.full((1, 2), float(rank), requires_grad=True))
    assert not no_grad.requires_grad and no_grad[:, 0].tolist() == [0.0, 1.0]

    variable = dist.all_gather_variable(torch.full((3 + 2 * rank, 2), float(rank)))  # 3 rows and 5 rows
    assert variable.shape == (8, 2) and variable[:, 0].tolist() == [0.0] * 3 + [1.0] * 5


def _bn_case(shape: tuple[int, ...], seed: int):
    """Inputs, loss weights, and BN init for one case; the same on every process (seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    loss_weights = torch.randn(shape, generator=g)
    weight = torch.rand(shape[1], generator=g) + 0.5
    bias = torch.randn(shape[1], generator=g)
    return x, loss_weights, weight, bias


def _batchnorm_worker(rank: int) -> None:
    world = dist.get_world_size()
    # (shape, reference class, momentum): 4-D, 2-D and 3-D input; momentum=None is a cumulative average.
    cases = [
        ((8, 3, 4, 4), nn.BatchNorm2d, 0.1),
        ((6, 5), nn.BatchNorm1d, None),
        ((4, 2, 7), nn.BatchNorm1d, 0.2),
    ]
    for seed, (shape, ref_cls, momentum) in enumerate(cases):
        x, loss_weights, weight, bias = _bn_case(shape, seed)
        ref, gbn = ref_cls(shape[1], momentum=momentum), GlobalBatchNorm(shape[1], momentum=momentum)
        for bn in (ref, gbn):
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)

        # Reference: one process, the whole batch, two training steps (momentum applied twice).
        x_ref = x.clone().requires_grad_(True)
        for _ in range(2):
            out_ref = ref(x_ref)
        (out_ref * loss_weights).mean().backward()

        # This rank: its half of the batch.
        rows = slice(rank * shape[0] // world, (rank + 1) * shape[0] // world)
        x_local = x[rows].clone().requires_grad_(True)
        for _ in range(2):
            out = gbn(x_local)
        (out * loss_weights[rows]).mean().backward()

        what = f"{shape}"
        _close(out, out_ref[rows].detach(), atol=1e-5, what=f"{what} output")
        _close(gbn.running_mean, ref.running_mean, what=f"{what} running_mean")
        _close(gbn.running_var, ref.running_var, what=f"{what} running_var")
        assert int(gbn.num_batches_tracked) == 2
        _close(x_local.grad / world, x_ref.grad[rows], atol=1e-6, what=f"{what} input grad")  # see module doc
        for name in ("weight", "bias"):
            grad = getattr(gbn, name).grad.clone()
            torch_dist.all_reduce(grad)  # what DDP does: average over ranks
            _close(grad / world, getattr(ref, name).grad, atol=1e-6, what=f"{what} {name} grad")

        gbn.eval(), ref.eval()  # eval: running statistics, no collective
        _close(gbn(x[rows]), ref(x)[rows], what=f"{what} eval output")


@pytest.mark.timeout(120)
def test_collectives_and_global_batchnorm_on_two_ranks():
    run_on_two_ranks(_two_rank_suite)


def _two_rank_suite(rank: int) -> None:
    # One spawn for both checks: starting processes dominates the cost on 2 cores.
    _collectives_worker(rank)
    _batchnorm_worker(rank)
