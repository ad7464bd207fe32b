"""The one module that touches `torch.distributed`.

Every function works without a process group (a plain `python` run, a unit test, the driver) and then
behaves as rank 0 of a world of size 1. Ray Train initialises the group inside each worker; nothing here
initialises or destroys it.

Collectives issued from autograd backward passes (`all_gather_with_grad`, `all_reduce_with_grad`,
`GlobalBatchNorm`) require every rank to call `backward()` on a graph with the same collectives in the
same order, exactly like DDP's own gradient all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _initialised() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialised() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if _initialised():
        dist.barrier()


# Hand-written rather than `torch.distributed.nn.functional.all_gather`: that module is deprecated (it warns
# on use), and the functional-collectives replacement is private API. Ten lines we can read are safer.
# The backward all-reduces instead of reduce-scattering because gloo (the CPU backend) has no reduce_scatter.
class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        # Every rank's loss depends on every rank's rows, so the gradient of this rank's rows is the sum of
        # the gradients all ranks computed for them: d(sum_s loss_s)/dx_r.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        # y = sum_r x_r on every rank, so d(sum_s loss_s)/dx_r = sum_s dloss_s/dy_s.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (equal first dims on all ranks) over ranks along dim 0; gradients flow back.

    The gradient that reaches rank r's `x` is the sum over ranks of the gradients of their losses, i.e.
    d(sum_s loss_s)/dx_r. Under DDP (which averages parameter gradients over ranks) this yields the gradient
    of the mean of the per-rank losses, which is the loss on the global batch.
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum of `x` over ranks; the backward all-reduces (sums) the incoming gradient."""
    if get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (equal first dims on all ranks) over ranks along dim 0, detached."""
    if get_world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_variable(x: Tensor) -> Tensor:
    """Like `all_gather_no_grad`, but first dims may differ across ranks (the last batch of an epoch).

    all_gather needs equal shapes, so sizes are exchanged first, rows padded to the largest, then trimmed.
    """
    world_size = get_world_size()
    if world_size == 1:
        return x.detach()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are computed over the global batch of all ranks.

    For CPU / gloo, where `nn.SyncBatchNorm` refuses to run. One collective per training forward: a
    differentiable all-reduce of [sum, sum of squares, count] per channel, so the backward is exact too.
    Accepts (N, C), (N, C, L) and (N, C, H, W). Without a process group, in eval mode, or with world size 1
    it runs the ordinary `_BatchNorm.forward`, so it is bit-identical to `nn.BatchNorm1d/2d` there.

    Variance is E[x^2] - E[x]^2 in float32 (one collective instead of two); that loses precision only when
    |mean| >> std, which post-convolution activations do not show.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"GlobalBatchNorm expects (N,C), (N,C,L) or (N,C,H,W) input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        reduce_dims = [0, *range(2, x.dim())]
        xf = x.float()  # statistics in float32 even under autocast
        count = torch.full((1,), xf.numel() / channels, dtype=torch.float32, device=x.device)
        stats = all_reduce_with_grad(torch.cat([xf.sum(reduce_dims), (xf * xf).sum(reduce_dims), count]))
        total_sum, total_sq, total_count = stats.split([channels, channels, 1])
        mean = total_sum / total_count
        var = (total_sq / total_count - mean * mean).clamp_min(0.0)  # biased: what normalisation uses

        shape = (1, channels) + (1,) * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        # The projection head's last BN has a scale but no bias (SimCLR's center=False): allow None.
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # Same rule as nn.BatchNorm: momentum=None means a cumulative moving average.
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = total_count
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module, use_sync_batchnorm: bool) -> nn.Module:
    """Return `module` with every BatchNorm computing global-batch statistics.

    use_sync_batchnorm=True (GPU / NCCL): `nn.SyncBatchNorm.convert_sync_batchnorm`. Otherwise every
    `nn.BatchNorm1d/2d` becomes a `GlobalBatchNorm` sharing its weight, bias and running statistics, the same
    way convert_sync_batchnorm does. Call it before wrapping in DDP and before building the optimizer.
    """
    if use_sync_batchnorm:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global(module)


def _to_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _to_global(child))
    return out
