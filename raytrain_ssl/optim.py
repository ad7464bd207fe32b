"""Optimisers, parameter groups, learning-rate schedules (pure functions of the step) and the EMA model."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

OPTIMIZERS = ("lars", "sgd", "adamw")


# Hand-written: torch has no LARS, and timm's `Lars` differs from SimCLR's (google-research/simclr
# lars_optimizer.py, classic_momentum=True): timm puts the learning rate outside the momentum buffer and
# computes the trust ratio differently, so SimCLR's published learning rates would not transfer.
class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv 1708.03888) exactly as SimCLR implements it.

    Per parameter p with gradient g, unless its group has `lars_exclude=True`:
        g <- g + weight_decay * p
        trust_ratio = trust_coefficient * ||p|| / (||g|| + eps)   (1 where ||p|| or ||g|| is 0)
    Excluded groups (biases, BatchNorm) get neither weight decay nor adaptation (trust_ratio = 1). Then
        v <- momentum * v + lr * trust_ratio * g;   p <- p - v
    The learning rate sits inside the momentum buffer ("classic" momentum in SimCLR), so a schedule's lr
    change reaches the update gradually, as in SimCLR.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"trust_coefficient={trust_coefficient}, eps={eps}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                scale = torch.ones((), dtype=p.dtype, device=p.device)
                if not group["lars_exclude"]:
                    if group["weight_decay"] != 0:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    # torch.where, not `if`: no host sync on GPU.
                    scale = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                        scale,
                    )
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad * (scale * group["lr"]))
                p.sub_(buf)
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into [decayed, excluded] groups (an empty group is left out).

    Excluded: every parameter with ndim <= 1, i.e. biases and BatchNorm scales/shifts, as SimCLR excludes
    'batch_normalization' and 'bias' by name. They get weight_decay 0 and `lars_exclude=True` (no trust
    ratio). Groups carry a `name` ("decay" / "no_decay") for logging.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        dict(name="decay", params=decay, weight_decay=weight_decay, lars_exclude=False),
        dict(name="no_decay", params=no_decay, weight_decay=0.0, lars_exclude=True),
    ]
    return [g for g in groups if g["params"]]


def scaled_learning_rate(
    base_lr: float, global_batch_size: int, scaling: Literal["linear", "sqrt"]
) -> float:
    """SimCLR's learning-rate scaling: linear base_lr * B / 256, or sqrt base_lr * sqrt(B).

    SimCLRv2 recommends sqrt with base_lr 0.075 for small batches, linear with 0.3 for batches of 4096.
    """
    if scaling == "linear":
        return base_lr * global_batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    raise ValueError(f"unknown learning-rate scaling {scaling!r}; known: linear, sqrt")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimiser step `step` (0-based): linear warmup, then cosine to 0.

    Warmup goes 1/warmup_steps, 2/warmup_steps, ..., 1 over the first warmup_steps steps (SimCLR starts at
    exactly 0, which wastes the first step); cosine from 1 at warmup_steps to 0 at total_steps; 0 after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Per-step LambdaLR over `warmup_cosine`; call `scheduler.step()` after every `optimizer.step()`.

    A functools.partial (not a lambda) so that LambdaLR.state_dict() can save it.
    """
    fn = functools.partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps)
    return LambdaLR(optimizer, lr_lambda=fn)


def build_optimizer(
    name: Literal["lars", "sgd", "adamw"],
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """The optimiser `name` over `parameter_groups(model, weight_decay)`. AdamW ignores `momentum`."""
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model` (parameters and buffers): ema = decay*ema + (1-decay)*model.

    Pass the unwrapped module (not the DDP wrapper); call `ema.update_parameters(model)` after each step.
    The first call copies the model. A converted GlobalBatchNorm in the copy issues collectives only if the
    EMA model is run in train mode.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
