"""Losses against naive references on tiny tensors, and NT-Xent on 2 gloo processes vs 1 process.

The last test runs the stage's real chain (GlobalBatchNorm + DDP + NT-Xent) on 2 ranks and compares
parameter gradients with one process on the whole batch, with no correction factor anywhere.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytrain_ssl import dist
from raytrain_ssl.dist import convert_to_global_batchnorm
from raytrain_ssl.losses import distillation_loss, nt_xent

from gloo_ranks import run_on_two_ranks  # tests/ is on sys.path under pytest


# -- naive reference -------------------------------------------------------------------------------
def naive_nt_xent(z1, z2, t, k1=None, k2=None, queue=None) -> float:
    """Loop over anchors: -log(exp(pos/t) / sum over positive and all negatives), mean of both directions."""
    z1, z2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    k1 = z1 if k1 is None else F.normalize(k1.double(), dim=1)
    k2 = z2 if k2 is None else F.normalize(k2.double(), dim=1)
    extra = [] if queue is None else list(F.normalize(queue.double(), dim=1))
    n, total = z1.shape[0], 0.0
    for anchors, other, same in ((z1, k2, k1), (z2, k1, k2)):
        for i in range(n):
            a = anchors[i]
            candidates = list(other) + [same[j] for j in range(n) if j != i] + extra
            denom = sum(math.exp(float(a @ c) / t) for c in candidates)
            total += -(float(a @ other[i]) / t - math.log(denom))
    return total / (2 * n)


# -- single process --------------------------------------------------------------------------------
@pytest.mark.parametrize("use_keys", [False, True])
@pytest.mark.parametrize("use_queue", [False, True])
def test_nt_xent_matches_naive_loop(use_keys, use_queue):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    k1, k2 = (torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)) if use_keys else (None, None)
    queue = torch.randn(7, 4, generator=g) if use_queue else None
    loss, acc = nt_xent(z1, z2, 0.5, k1=k1, k2=k2, queue=queue)
    assert loss.item() == pytest.approx(naive_nt_xent(z1, z2, 0.5, k1, k2, queue), rel=1e-5)
    assert 0.0 <= acc.item() <= 1.0 and not acc.requires_grad


def test_nt_xent_keys_are_detached():
    z1, z2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    k1, k2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss, _ = nt_xent(z1, z2, 0.2, k1=k1, k2=k2, queue=torch.randn(3, 3, requires_grad=True))
    loss.backward()
    assert z1.grad is not None and k1.grad is None and k2.grad is None


def test_nt_xent_computes_in_float32_under_autocast():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.1)[0])


def test_nt_xent_accuracy_on_known_cases():
    eye = torch.eye(4)
    # Views identical and orthogonal: every positive has similarity 1, every negative 0.
    assert nt_xent(eye, eye.clone(), 0.1)[1].item() == 1.0
    # View 2 shifted by one: anchor i's positive is orthogonal to it, a negative equals it.
    assert nt_xent(eye, eye.roll(1, dims=0), 0.1)[1].item() == 0.0
    # Half the pairs shifted (rows 2 and 3 swapped in view 2): 4 of 8 anchors right.
    assert nt_xent(eye, eye[[0, 1, 3, 2]], 0.1)[1].item() == 0.5


def naive_distillation(student, teacher, t) -> float:
    """The paper's eq. 3 as a loop: T^2 * mean_i sum_c p_t log(p_t / p_s), written out element by element."""
    total = 0.0
    for s_row, t_row in zip(student.double(), teacher.double()):
        p_t = torch.exp(t_row / t) / torch.exp(t_row / t).sum()
        p_s = torch.exp(s_row / t) / torch.exp(s_row / t).sum()
        total += float((p_t * (p_t.log() - p_s.log())).sum())
    return total / student.shape[0] * t * t


def test_distillation_loss_matches_reference_and_is_zero_at_teacher():
    g = torch.Generator().manual_seed(1)
    student, teacher, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), 2.0
    assert float(distillation_loss(student, teacher, t)) == pytest.approx(naive_distillation(student, teacher, t), rel=1e-5)

    at_teacher = teacher.clone().requires_grad_(True)
    loss = distillation_loss(at_teacher, teacher, t)
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(at_teacher.grad, torch.zeros_like(teacher), atol=1e-7, rtol=0)


def test_distillation_gradient_equals_the_papers_cross_entropy_form():
    g = torch.Generator().manual_seed(2)
    teacher, t = torch.randn(5, 7, generator=g), 3.0
    a = torch.randn(5, 7, generator=g).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    distillation_loss(a, teacher, t).backward()
    (-(F.softmax(teacher / t, 1) * F.log_softmax(b / t, 1)).sum(1).mean() * t * t).backward()
    torch.testing.assert_close(a.grad, b.grad)


# -- two processes ---------------------------------------------------------------------------------
def _case(seed: int, n_global: int = 6, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n_global, d, generator=g) for _ in range(5)]  # z1, z2, k1, k2, queue


def _single_process_reference(seed: int, use_keys: bool, use_queue: bool, t: float):
    z1, z2, k1, k2, queue = _case(seed)
    z1.requires_grad_(True), z2.requires_grad_(True)
    loss, _ = nt_xent(z1, z2, t, *((k1, k2) if use_keys else (None, None)), queue if use_queue else None)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


def _nt_xent_worker(rank: int, references: dict, t: float) -> None:
    world = dist.get_world_size()
    for (seed, use_keys, use_queue), (ref_loss, ref_g1, ref_g2) in references.items():
        z1, z2, k1, k2, queue = _case(seed)
        rows = slice(rank * 3, rank * 3 + 3)
        z1, z2 = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
        keys = (k1[rows], k2[rows]) if use_keys else (None, None)
        # The queue is the same on every rank (NegativeQueue gathers before writing).
        loss, _ = nt_xent(z1, z2, t, *keys, queue if use_queue else None)
        loss.backward()

        mean_loss = loss.detach().clone()
        torch_dist.all_reduce(mean_loss)
        what = f"seed={seed} keys={use_keys} queue={use_queue}"
        torch.testing.assert_close(mean_loss / world, ref_loss, msg=lambda m: f"{what} loss: {m}")
        # Rank r's loss is a mean over its n anchors and the global loss is (1/W) sum_r loss_r. The gathered
        # keys send every rank's gradient back, so rank r holds d(sum_s loss_s)/dz_r = W * d(global)/dz_r.
        # DDP's 1/W averaging of parameter gradients turns that into exactly the global gradient.
        for grad, ref in ((z1.grad, ref_g1), (z2.grad, ref_g2)):
            torch.testing.assert_close(grad / world, ref[rows], msg=lambda m: f"{what} grad: {m}")


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _ddp_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)


def _ddp_reference(t: float) -> dict[str, torch.Tensor]:
    """Single process, whole batch: BN statistics over both views of all 6 images, as the stage does."""
    model = _tiny_model()
    x1, x2 = _ddp_views()
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)
    nt_xent(z1, z2, t)[0].backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _ddp_worker(rank: int, reference: dict[str, torch.Tensor], t: float) -> None:
    """The whole chain the training stage uses: GlobalBatchNorm + DDP + gathered NT-Xent, no manual factor."""
    model = convert_to_global_batchnorm(_tiny_model(), use_sync_batchnorm=False)
    ddp = DistributedDataParallel(model)
    x1, x2 = (x[rank * 3 : rank * 3 + 3] for x in _ddp_views())
    z1, z2 = ddp(torch.cat([x1, x2])).chunk(2)
    nt_xent(z1, z2, t)[0].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], msg=lambda m: f"DDP grad of {name}: {m}")


def _two_rank_suite(rank: int, references: dict, ddp_reference: dict, t: float) -> None:
    # One spawn for both checks: starting processes dominates the cost on 2 cores.
    _nt_xent_worker(rank, references, t)
    _ddp_worker(rank, ddp_reference, t)


@pytest.mark.timeout(120)
def test_nt_xent_two_ranks_equal_one_rank_on_concatenated_batch():
    t = 0.3
    cases = [(0, False, False), (1, True, False), (2, False, True)]
    references = {case: _single_process_reference(*case, t) for case in cases}
    run_on_two_ranks(_two_rank_suite, references, _ddp_reference(t), t)
