"""LARS against a hand-computed numpy step, parameter groups, schedules, optimiser factory and EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raytrain_ssl.optim import (
    LARS,
    build_ema,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    scaled_learning_rate,
    warmup_cosine,
)


def numpy_lars_step(w, g, v, lr, momentum, wd, eta, exclude):
    """SimCLR lars_optimizer.py, classic momentum, written out in numpy."""
    if not exclude:
        g = g + wd * w
    trust = 1.0
    if not exclude and np.linalg.norm(w) > 0 and np.linalg.norm(g) > 0:
        trust = eta * np.linalg.norm(w) / np.linalg.norm(g)
    v = momentum * v + lr * trust * g
    return w - v, v


def test_lars_two_steps_match_numpy_with_momentum_wd_and_exclusion():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=3)
    grads = [(rng.normal(size=(3, 4)), rng.normal(size=3)) for _ in range(2)]
    lr, momentum, wd, eta = 0.5, 0.9, 0.01, 0.02  # wd and eta large enough to matter at 1e-6 tolerance

    weight = nn.Parameter(torch.tensor(w0))
    bias = nn.Parameter(torch.tensor(b0))
    opt = LARS(
        [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
        lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=eta,
    )
    w, b, vw, vb = w0, b0, np.zeros_like(w0), np.zeros_like(b0)
    for gw, gb in grads:
        weight.grad, bias.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
        w, vw = numpy_lars_step(w, gw, vw, lr, momentum, wd, eta, exclude=False)
        b, vb = numpy_lars_step(b, gb, vb, lr, momentum, wd, eta, exclude=True)
        np.testing.assert_allclose(weight.detach().numpy(), w, rtol=1e-12)
        np.testing.assert_allclose(bias.detach().numpy(), b, rtol=1e-12)
    # Exclusion really means plain momentum SGD for the bias: b0 - lr*g1 - (0.9*lr*g1 + lr*g2).
    np.testing.assert_allclose(b, b0 - lr * grads[0][1] - (momentum * lr * grads[0][1] + lr * grads[1][1]))


def test_lars_trust_ratio_is_one_for_zero_weights():
    weight = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([weight], lr=0.1, momentum=0.0, weight_decay=0.0)
    weight.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), -0.1))


def test_parameter_groups_exclude_bn_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2, bias=False))
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = parameter_groups(model, weight_decay=1e-4)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert (decay["weight_decay"], decay["lars_exclude"]) == (1e-4, False)
    assert (no_decay["weight_decay"], no_decay["lars_exclude"]) == (0.0, True)
    assert len(parameter_groups(nn.Linear(2, 2, bias=False), 0.1)) == 1  # empty groups left out


def test_scaled_learning_rate():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_learning_rate(0.075, 256, "sqrt") == pytest.approx(1.2)
    with pytest.raises(ValueError, match="known: linear, sqrt"):
        scaled_learning_rate(0.1, 256, "cubic")


def test_warmup_cosine_endpoints_and_midpoint():
    warmup, total = 10, 110
    assert warmup_cosine(0, warmup, total) == pytest.approx(0.1)
    assert warmup_cosine(4, warmup, total) == pytest.approx(0.5)
    assert warmup_cosine(9, warmup, total) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup, total) == pytest.approx(1.0)
    assert warmup_cosine(60, warmup, total) == pytest.approx(0.5)  # cosine midpoint
    assert warmup_cosine(35, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(110, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(500, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 0, total) == pytest.approx(1.0)


def test_scheduler_state_round_trips():
    def make():
        opt = build_optimizer("lars", nn.Linear(3, 2), lr=2.0, weight_decay=1e-6)
        return opt, build_scheduler(opt, warmup_steps=4, total_steps=20)

    opt, sched = make()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.25)  # LambdaLR applies step 0 at once
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 7
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    sched.step(), sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * warmup_cosine(8, 4, 20))


@pytest.mark.parametrize(
    "name, cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)]
)
def test_build_optimizer(name, cls):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(name, model, lr=0.1, weight_decay=1e-4)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    model(torch.randn(5, 3)).sum().backward()
    opt.step()


def test_build_optimizer_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="known: lars, sgd, adamw"):
        build_optimizer("adam", nn.Linear(2, 2), lr=0.1, weight_decay=0.0)


def test_ema_averages_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = build_ema(model, decay=0.9)
    ema.update_parameters(model)  # first update copies
    before_w, before_rm = ema.module[0].weight.detach().clone(), ema.module[1].running_mean.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight.detach(), 0.9 * before_w + 0.1 * model[0].weight.detach())
    torch.testing.assert_close(ema.module[1].running_mean, 0.9 * before_rm + 0.1 * torch.full((2,), 2.0))
