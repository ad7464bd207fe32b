"""Losses: pure functions of tensors. Cross-rank gathering goes through `raytrain_ssl.dist` only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raytrain_ssl import dist

# SimCLR masks an anchor's similarity with itself by subtracting this (objective.py LARGE_NUM); the logits
# are float32 here, so exp(-1e9) is exactly 0 and the column drops out of the softmax.
_LARGE_NUM = 1e9


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    k1: Tensor | None = None,
    k2: Tensor | None = None,
    queue: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """NT-Xent, the contrastive loss of SimCLR / SimCLRv2 (Chen et al. 2020, arXiv 2002.05709, 2006.10029).

    Follows google-research/simclr `add_contrastive_loss`: an anchor of view 1 is scored against the keys of
    view 2 (its positive and the other images) and the keys of view 1 with its own column masked; the
    negatives are the *global* batch of all ranks. Symmetric for view 2. The result is the mean of the two
    directions (SimCLR sums them, which only doubles the gradient).

    Args:
        z1, z2: (n, d) this rank's projections of the two views; normalised here. n must be equal on all
            ranks (drop the last incomplete batch).
        temperature: softmax temperature (SimCLR: 0.1 for large batches, 0.5 for CIFAR).
        k1, k2: optional (n, d) keys from a momentum/EMA encoder, used in place of z1, z2 as keys. Detached
            and gathered without gradient.
        queue: optional (K, d) extra negatives (MoCo-style memory), normalised and detached, appended to
            both directions.

    Returns:
        (loss, accuracy): scalar loss (mean over this rank's 2n anchors) and the fraction of this rank's
        anchors whose highest logit is their positive, in [0, 1], detached.

    Gradient note: the keys of all ranks are gathered with `all_gather_with_grad`, so with DDP averaging
    parameter gradients the update is that of the loss over the global batch.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (n, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if (k1 is None) != (k2 is None):
        raise ValueError("pass both k1 and k2 or neither")
    # float32 logits, autocast or not: at T=0.1 half precision loses the logits' resolution and cannot hold
    # the -1e9 mask.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _nt_xent_fp32(z1, z2, temperature, k1, k2, queue)


def _nt_xent_fp32(
    z1: Tensor, z2: Tensor, temperature: float, k1: Tensor | None, k2: Tensor | None, queue: Tensor | None
) -> tuple[Tensor, Tensor]:
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    if k1 is None:
        keys1, keys2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)
    else:
        keys1 = dist.all_gather_no_grad(F.normalize(k1.detach().float(), dim=1))
        keys2 = dist.all_gather_no_grad(F.normalize(k2.detach().float(), dim=1))
    extra = None if queue is None else F.normalize(queue.detach().float(), dim=1)

    n = z1.shape[0]
    labels = dist.get_rank() * n + torch.arange(n, device=z1.device)
    loss_a, correct_a = _one_direction(z1, keys2, keys1, extra, labels, temperature)
    loss_b, correct_b = _one_direction(z2, keys1, keys2, extra, labels, temperature)
    accuracy = (correct_a + correct_b) / (2 * n)
    return (loss_a + loss_b) / 2, accuracy


def _one_direction(
    anchors: Tensor, other_keys: Tensor, same_keys: Tensor, extra: Tensor | None, labels: Tensor, t: float
) -> tuple[Tensor, Tensor]:
    """CE over [anchor . other view's keys | anchor . same view's keys (self masked) | anchor . queue]."""
    logits_ab = anchors @ other_keys.T / t
    self_mask = F.one_hot(labels, same_keys.shape[0]).to(anchors.dtype) * _LARGE_NUM
    logits_aa = anchors @ same_keys.T / t - self_mask
    blocks = [logits_ab, logits_aa] if extra is None else [logits_ab, logits_aa, anchors @ extra.T / t]
    logits = torch.cat(blocks, dim=1)
    correct = (logits.argmax(dim=1) == labels).sum().detach().float()
    return F.cross_entropy(logits, labels), correct


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """SimCLRv2 distillation (Chen et al. 2020, arXiv 2006.10029, eq. 3) with Hinton's T^2 scaling.

    The paper writes T^2 * mean_i CE(softmax(teacher_i / T), log_softmax(student_i / T)). This returns
    T^2 * mean_i KL(teacher_i || student_i), which is that cross-entropy minus the teacher's entropy: a
    constant for the student, so the gradients are identical, and the value reads as a distance (0 when the
    student equals the teacher). Logits are (N, num_classes); the teacher is detached.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2
