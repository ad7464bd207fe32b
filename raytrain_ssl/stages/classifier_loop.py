"""The Ray Train worker loop that fine-tuning and distillation share.

Both train a `Classifier` (encoder -> head layers 1..k -> linear) on a stream of single views with global
BatchNorm, DDP, LARS/SGD with warmup+cosine, checkpoints through `ray.train.report` and TensorBoard from
rank 0; they differ only in the loss. A stage hands in a `StageParts`: the network (built, weights
loaded), the loss function, and what it adds to checkpoints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from raytrain_ssl import dist
from raytrain_ssl.checkpointing import load_latest_in_worker, report
from raytrain_ssl.data.augment import to_float_images
from raytrain_ssl.evaluation.metrics import topk_accuracy
from raytrain_ssl.models.classifier import Classifier, ClassifierSpec
from raytrain_ssl.optim import build_optimizer, build_scheduler, scaled_learning_rate
from raytrain_ssl.stages.nonfinite import LossGuard, refuse_retry_after_stop
from raytrain_ssl.stages.pretrain import Progress, StepTimer
from raytrain_ssl.stages.worker_env import WorkerEnv, timed_batches, unwrap
from raytrain_ssl.tensorboard_logger import make_logger

log = logging.getLogger("raytrain_ssl.classifier")

EVAL_BATCH_SIZE = 256
# (model, float images, labels) -> (loss, {metric name: scalar tensor}) for one training batch.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StageParts:
    stage: str  # "finetune" | "distill": the checkpoint's `stage`
    spec: ClassifierSpec
    network: Classifier  # weights loaded, not yet placed on the device
    loss_fn: LossFn
    extra_state: dict = field(default_factory=dict)  # stage facts saved with every checkpoint


def train_classifier(cfg, env: WorkerEnv, parts: StageParts, loop_config: dict) -> None:
    """Train `parts.network` for the configured epochs; report metrics + checkpoints every epoch."""
    steps_per_epoch = loop_config["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    model = parts.network
    if env.world_size > 1:
        model = dist.convert_to_global_batchnorm(model, use_sync_batchnorm=env.on_gpu)
    model = env.place(model)
    lr = scaled_learning_rate(
        cfg.optim.base_learning_rate, cfg.train.global_batch_size, cfg.optim.learning_rate_scaling
    )
    optimizer = build_optimizer(
        cfg.optim.name, unwrap(model), lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.trust_coefficient
    )
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, min(warmup_steps, total_steps), total_steps)

    refuse_retry_after_stop(loop_config["run_dir"])  # a retry after train.nonfinite_loss=stop stops again
    progress = Progress()
    state = load_latest_in_worker()
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(**state["progress"])
        progress.resumed_from_steps.append(progress.global_step)
        log.info("resumed at epoch %d step %d", progress.epoch, progress.global_step)

    tb = make_logger(Path(loop_config["run_dir"]) / "tensorboard", env.is_main)
    tb.text("config", f"```\n{json.dumps(loop_config['config'], indent=2)}\n```", progress.global_step)
    checkpoint_state = lambda: _state(cfg, parts, model, optimizer, scheduler, progress)  # noqa: E731
    guard = LossGuard(cfg.train.nonfinite_loss, model, tb, loop_config["run_dir"])
    shard = env.dataset_shard("train")
    while progress.epoch < cfg.train.epochs and progress.global_step < total_steps:
        model.train()
        remaining = min(steps_per_epoch - progress.step_in_epoch, total_steps - progress.global_step)
        batches = env.epoch_batches(shard, cfg, progress.epoch, steps_per_epoch, skip=progress.step_in_epoch)
        _run_epoch(cfg, env, parts, model, optimizer, scheduler, batches, remaining, progress, tb, checkpoint_state,
                   guard)  # fmt: skip
        progress.epoch += 1
        progress.step_in_epoch = 0
        metrics = {"epoch": progress.epoch, "step": progress.global_step}
        if _eval_due(cfg, progress, total_steps):
            metrics.update(validate(model, env))
            tb.scalars(metrics, progress.global_step, prefix="eval/")
            if env.is_main:
                log.info("epoch %d: val top-1 %.2f%%  top-5 %.2f%%", progress.epoch,
                         100 * metrics["val_top1"], 100 * metrics["val_top5"])  # fmt: skip
        tb.flush()
        report(metrics, checkpoint_state() if env.is_main else None)
    tb.close()


def _eval_due(cfg, progress: Progress, total_steps: int) -> bool:
    last = progress.epoch >= cfg.train.epochs or progress.global_step >= total_steps
    every = cfg.eval.every_epochs
    return last or bool(every and progress.epoch % every == 0)


def _run_epoch(cfg, env, parts, model, optimizer, scheduler, batches, remaining, progress, tb, checkpoint_state, guard):
    timer = StepTimer()
    autocast = env.autocast()
    for done, batch, waited in timed_batches(batches, remaining):
        timer.data_seconds += waited
        images = to_float_images(batch["image"], env.channels_last)
        guard.before_forward()
        with autocast:
            loss, step_metrics = parts.loss_fn(model, images, batch["label"])
        if not guard.skip_step(loss, progress):  # same answer on every worker; raises for nonfinite_loss=stop
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()  # a skipped step still counts: the schedule and step numbers stay on course
        progress.global_step += 1
        progress.step_in_epoch += 1
        env.record_batch(progress.epoch, progress.global_step, batch["key"])
        timer.images += images.shape[0] * env.world_size
        if progress.global_step % cfg.train.log_every_steps == 0:
            _log_step(tb, env, loss, step_metrics, optimizer, timer.window(), progress, cfg)
            timer = StepTimer()
        every = cfg.checkpoint.every_n_steps
        if every and progress.global_step % every == 0 and done < remaining:
            step_metrics = {"loss": float(loss.detach()), "epoch": progress.epoch, "step": progress.global_step}
            report(step_metrics, checkpoint_state() if env.is_main else None)


def _log_step(tb, env, loss, step_metrics, optimizer, window, progress, cfg):
    # Averaged over workers only when logging: one small collective every log_every_steps steps.
    names = ["loss", *step_metrics]
    local = torch.stack([loss.detach().float(), *(v.detach().float() for v in step_metrics.values())])
    means = dist.all_gather_no_grad(local.reshape(1, -1)).mean(0)
    values = {name: float(v) for name, v in zip(names, means)}
    values.update(learning_rate=optimizer.param_groups[0]["lr"], **window)
    tb.scalars(values, progress.global_step, prefix="train/")
    if env.is_main:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in window)
        log.info("epoch %d/%d step %d  %s  %.0f img/s  data wait %.0f%%", progress.epoch + 1, cfg.train.epochs,
                 progress.global_step, shown, window["images_per_second"], 100 * window["data_wait_fraction"])  # fmt: skip


@torch.no_grad()
def validate(model: nn.Module, env: WorkerEnv) -> dict[str, float]:
    """Top-1/top-5 of the classifier on this worker's part of "val", gathered over all workers."""
    if not env.has_dataset("val"):
        return {}
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in env.dataset_shard("val").iter_torch_batches(batch_size=EVAL_BATCH_SIZE, device=env.device):
        images = to_float_images(batch["image"], env.channels_last)
        with torch.autocast(device_type=env.device.type, dtype=torch.bfloat16, enabled=env.use_bf16):
            logits.append(unwrap(model)(images).float())  # the inner module: no DDP sync in eval
        labels.append(batch["label"])
    model.train(was_training)
    num_classes = unwrap(model).fc.out_features
    local_logits = torch.cat(logits) if logits else torch.zeros(0, num_classes, device=env.device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=env.device)
    all_logits = dist.all_gather_variable(local_logits)
    all_labels = dist.all_gather_variable(local_labels)
    top1, top5 = topk_accuracy(all_logits, all_labels, ks=(1, 5))
    return {"val_top1": top1, "val_top5": top5, "val_images": int(all_labels.numel())}


def _state(cfg, parts: StageParts, model, optimizer, scheduler, progress: Progress) -> dict:
    return {
        "stage": parts.stage,
        "model_name": parts.spec.model_name,
        "spec": parts.spec.to_dict(),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": progress.__dict__.copy(),
        "config": cfg.model_dump(mode="json"),
        **parts.extra_state,
    }
