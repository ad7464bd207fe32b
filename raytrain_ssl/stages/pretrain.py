"""Contrastive pretraining (SimCLRv2): the train loop each Ray Train worker runs, and its driver.

Per step, on every worker: two uint8 views from Ray Data -> one forward of both views concatenated (so
BatchNorm statistics cover both, as in SimCLR) -> NT-Xent with negatives gathered from all workers ->
LARS step -> warmup+cosine schedule -> optional EMA update and memory-queue push.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raytrain_ssl import dist
from raytrain_ssl.checkpointing import load_latest_in_worker, report
from raytrain_ssl.config import PretrainConfig
from raytrain_ssl.data.augment import to_float_images
from raytrain_ssl.losses import nt_xent
from raytrain_ssl.models import ProjectionHead, create_encoder
from raytrain_ssl.negative_queue import NegativeQueue
from raytrain_ssl.optim import build_ema, build_optimizer, build_scheduler, scaled_learning_rate
from raytrain_ssl.stages.knn_monitor import knn_eval
from raytrain_ssl.stages.nonfinite import LossGuard, refuse_retry_after_stop
from raytrain_ssl.stages.worker_env import WorkerEnv, setup_worker, timed_batches, unwrap
from raytrain_ssl.tensorboard_logger import make_logger

log = logging.getLogger("raytrain_ssl.pretrain")


class ContrastiveModel(nn.Module):
    """Encoder + projection head; `forward` returns the projection z used by the loss."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def build_model(cfg: PretrainConfig) -> ContrastiveModel:
    encoder = create_encoder(cfg.model.name, small_image_stem=cfg.use_small_image_stem)
    head = ProjectionHead(
        encoder.num_features,
        hidden_dim=cfg.model.head_hidden_dim,
        out_dim=cfg.model.projection_dim,
        num_layers=cfg.model.head_layers,
    )
    return ContrastiveModel(encoder, head)


@dataclass
class Progress:
    """Counters saved in every checkpoint, so a resumed run continues where it stopped."""

    epoch: int = 0  # the epoch in progress (or the next one, after an epoch-end checkpoint)
    step_in_epoch: int = 0
    global_step: int = 0
    resumed_from_steps: list = field(default_factory=list)  # one entry per restart from a checkpoint
    skipped_steps: int = 0  # steps dropped for a non-finite loss (train.nonfinite_loss=skip)


@dataclass
class StepTimer:
    """Images/s and the share of time spent waiting for Ray Data, over a logging window."""

    images: int = 0
    data_seconds: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def window(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"images_per_second": self.images / elapsed, "data_wait_fraction": self.data_seconds / elapsed}


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs. `loop_config`: config (dict), run_dir, steps_per_epoch."""
    cfg = PretrainConfig.model_validate(loop_config["config"])
    env = setup_worker(cfg.train, loop_config["datasets"], loop_config["run_dir"])
    steps_per_epoch = loop_config["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # The one place that decides about global BatchNorm and DDP: the model itself never knows.
    model = build_model(cfg)
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
    ema = build_ema(unwrap(model), cfg.contrastive.ema_decay) if cfg.contrastive.ema_decay else None
    queue = (
        NegativeQueue(cfg.contrastive.queue_size, cfg.model.projection_dim).to(env.device)
        if cfg.contrastive.queue_size
        else None
    )

    refuse_retry_after_stop(loop_config["run_dir"])  # a retry after train.nonfinite_loss=stop stops again
    progress = Progress()
    state = load_latest_in_worker()
    if state is not None:
        progress = _restore(state, model, optimizer, scheduler, ema, queue)
        progress.resumed_from_steps.append(progress.global_step)
        log.info("resumed at epoch %d step %d", progress.epoch, progress.global_step)

    tb = make_logger(Path(loop_config["run_dir"]) / "tensorboard", env.is_main)
    tb.text("config", f"```\n{json.dumps(loop_config['config'], indent=2)}\n```", progress.global_step)
    forward_modules = [model, ema] if ema is not None else [model]  # buffers a skipped step puts back
    guard = LossGuard(cfg.train.nonfinite_loss, forward_modules, tb, loop_config["run_dir"])
    train_shard = env.dataset_shard("train")
    if state is None and cfg.eval.knn_at_start:
        _knn(cfg, env, model, progress, tb)  # the random-init baseline the curve starts from
    while progress.epoch < cfg.train.epochs and progress.global_step < total_steps:
        model.train()
        remaining = min(steps_per_epoch - progress.step_in_epoch, total_steps - progress.global_step)
        views = _worker_views(cfg, env, progress.epoch, progress.step_in_epoch)
        batches = env.epoch_batches(
            train_shard, cfg, progress.epoch, steps_per_epoch, skip=progress.step_in_epoch, views=views
        )
        _run_epoch(cfg, env, model, optimizer, scheduler, ema, queue, batches, remaining, progress, tb, guard)
        progress.epoch += 1  # the pass ended: planned steps done, data exhausted, or max_steps reached
        progress.step_in_epoch = 0
        metrics = _epoch_metrics(cfg, env, model, progress, tb)
        report(metrics, _state(cfg, model, optimizer, scheduler, ema, queue, progress) if env.is_main else None)
    tb.close()


def _worker_views(cfg: PretrainConfig, env: WorkerEnv, epoch: int, skip: int):
    """With `data.decode_on: worker`, what decodes and augments the encoded stream on this worker's
    device; seeded from (seed, epoch, rank, batches skipped), so a resumed epoch draws fresh crops for
    the batches it trains on. None: the stream already holds the views (Ray Data decoded them)."""
    if cfg.data.decode_on != "worker":
        return None
    from raytrain_ssl.data.worker_decode import TwoViewMaker

    return TwoViewMaker(view_spec(cfg), env.device, seed=env.epoch_seed(cfg.train.seed, epoch) * 100_003 + skip)


def _run_epoch(cfg, env: WorkerEnv, model, optimizer, scheduler, ema, queue, batches, remaining, progress, tb, guard):
    timer = StepTimer()
    autocast = env.autocast()
    for done, batch, waited in timed_batches(batches, remaining):
        timer.data_seconds += waited
        view1 = to_float_images(batch["view1"], env.channels_last)
        view2 = to_float_images(batch["view2"], env.channels_last)
        guard.before_forward()
        with autocast:
            z = model(torch.cat([view1, view2]))
            keys = _ema_keys(ema, view1, view2) if ema is not None else (None, None)
        z1, z2 = z.float().chunk(2)
        loss, accuracy = nt_xent(
            z1, z2, cfg.contrastive.temperature, *keys, queue=queue.negatives() if queue is not None else None
        )
        if not guard.skip_step(loss, progress):  # same answer on every worker; raises for nonfinite_loss=stop
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(unwrap(model))
            if queue is not None:
                queue.enqueue((keys[1] if keys[1] is not None else z2).detach())
        scheduler.step()  # a skipped step still counts: the schedule and step numbers stay on course
        progress.global_step += 1
        progress.step_in_epoch += 1
        env.record_batch(progress.epoch, progress.global_step, batch["key"])
        timer.images += view1.shape[0] * env.world_size
        if progress.step_in_epoch == 1 and cfg.eval.view_grid_pairs:
            _log_view_pairs(tb, view1, view2, cfg.eval.view_grid_pairs, progress.global_step)
        if progress.global_step % cfg.train.log_every_steps == 0:
            _log_step(tb, env, loss, accuracy, optimizer, timer.window(), progress, cfg)
            timer = StepTimer()
        every = cfg.checkpoint.every_n_steps
        if every and progress.global_step % every == 0 and done < remaining:  # epoch end reports anyway
            step_metrics = {"loss": float(loss.detach()), "epoch": progress.epoch, "step": progress.global_step}
            report(step_metrics, _state(cfg, model, optimizer, scheduler, ema, queue, progress) if env.is_main else None)


@torch.no_grad()
def _ema_keys(ema, view1, view2):
    k = ema(torch.cat([view1, view2])).float()
    return k.chunk(2)


def _log_step(tb, env, loss, accuracy, optimizer, window, progress, cfg):
    # Averaged over workers only when logging: one small collective every log_every_steps steps.
    mean_loss = float(dist.all_gather_no_grad(loss.detach().reshape(1)).mean())
    mean_acc = float(dist.all_gather_no_grad(accuracy.detach().float().reshape(1)).mean())
    lr = optimizer.param_groups[0]["lr"]
    values = {"loss": mean_loss, "contrastive_accuracy": mean_acc, "learning_rate": lr, **window}
    tb.scalars(values, progress.global_step, prefix="train/")
    if env.is_main:
        log.info(
            "epoch %d/%d step %d  loss %.4f  contrastive acc %.3f  lr %.4g  %.0f img/s  data wait %.0f%%",
            progress.epoch + 1, cfg.train.epochs, progress.global_step, mean_loss, mean_acc, lr,
            window["images_per_second"], 100 * window["data_wait_fraction"],
        )  # fmt: skip


def _log_view_pairs(tb, view1, view2, pairs, step):
    n = min(pairs, view1.shape[0])
    interleaved = torch.stack([view1[:n], view2[:n]], dim=1).flatten(0, 1)
    tb.image_grid("views/augmented_pairs", interleaved, step, nrow=2 * min(n, 4))


def _epoch_metrics(cfg, env, model, progress, tb) -> dict:
    metrics = {"epoch": progress.epoch, "step": progress.global_step}
    due = cfg.eval.knn_every_epochs and progress.epoch % cfg.eval.knn_every_epochs == 0
    last = progress.epoch >= cfg.train.epochs or (
        cfg.train.max_steps is not None and progress.global_step >= cfg.train.max_steps
    )
    if due or last:
        metrics.update(_knn(cfg, env, model, progress, tb))
    tb.flush()
    return metrics


def _knn(cfg, env, model, progress, tb) -> dict:
    if not (env.has_dataset("knn_bank") and env.has_dataset("knn_query")):
        return {}
    knn = knn_eval(unwrap(model).encoder, env, cfg.eval.knn_k, cfg.eval.knn_temperature)
    tb.scalars(knn, progress.global_step, prefix="eval/")
    if env.is_main:
        log.info("epoch %d: kNN top-1 %.2f%%  top-5 %.2f%%", progress.epoch, 100 * knn["knn_top1"], 100 * knn["knn_top5"])
    return knn


def _state(cfg, model, optimizer, scheduler, ema, queue, progress: Progress) -> dict:
    core = unwrap(model)
    return {
        "stage": "pretrain",
        "model_name": cfg.model.name,
        "encoder": core.encoder.state_dict(),
        "head": core.head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "queue": queue.state_dict() if queue is not None else None,
        "progress": progress.__dict__.copy(),
        "config": cfg.model_dump(mode="json"),
    }


def _restore(state, model, optimizer, scheduler, ema, queue) -> Progress:
    core = unwrap(model)
    core.encoder.load_state_dict(state["encoder"])
    core.head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if queue is not None and state.get("queue") is not None:
        queue.load_state_dict(state["queue"])
    return Progress(**state["progress"])


# ---------------------------------------------------------------------------------------------- driver


def view_spec(cfg: PretrainConfig):
    """The augmentation settings of a run, wherever its views are cut (Ray Data tasks or the workers)."""
    from raytrain_ssl.data.stream import ViewSpec

    return ViewSpec(
        image_size=cfg.data.image_size,
        color_jitter_strength=cfg.augment.color_jitter_strength,
        min_crop_scale=cfg.augment.min_crop_scale,
        gaussian_blur=cfg.use_gaussian_blur,
        grayscale_probability=cfg.augment.grayscale_probability,
        max_pixels=cfg.data.max_pixels,
    )


def build_datasets(cfg: PretrainConfig, paths) -> dict:
    """The Ray Data streams the workers read: two-view training images, plus the kNN bank and queries."""
    from raytrain_ssl.data.stream import encoded_dataset, labeled_dataset, pretrain_dataset

    spec = view_spec(cfg)
    common = dict(batch_size=cfg.data.decode_batch_size, concurrency=cfg.data.decode_concurrency)
    train = encoded_dataset if cfg.data.decode_on == "worker" else pretrain_dataset
    datasets = {"train": train(paths.train, spec, cfg.data.shuffle_seed, **common)}
    if cfg.eval.knn_every_epochs and paths.val and paths.knn_bank:
        bank = labeled_dataset(paths.knn_bank, spec, train=False, limit=cfg.eval.knn_bank_max_images, **common)
        datasets["knn_bank"] = bank
        datasets["knn_query"] = labeled_dataset(paths.val, spec, train=False, **common)
    return datasets


def steps_per_epoch(cfg: PretrainConfig, num_rows: int) -> int:
    """Batches each worker takes per epoch: rows are split equally, the last partial batch dropped."""
    steps = (num_rows // cfg.ray.num_workers) // cfg.batch_size_per_worker
    if steps == 0:
        from raytrain_ssl.config import ConfigError

        raise ConfigError(
            f"config error: train.global_batch_size={cfg.train.global_batch_size} is larger than the "
            f"{num_rows} training images; lower it"
        )
    return steps


def run(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Pretrain on the configured Ray cluster; returns the final metrics and the checkpoint path."""
    if cfg.method == "deepercluster":
        from raytrain_ssl.stages import deepercluster  # its own train loop; it imports this module

        return deepercluster.run(cfg, resume)
    from raytrain_ssl import launch
    from raytrain_ssl.data.paths import resolve_data_paths
    from raytrain_ssl.data.stream import count_rows

    paths = launch.resolve_run_paths(cfg.ray, "pretrain")
    cfg = launch.with_run_paths(cfg, paths)
    data = resolve_data_paths(cfg.data, paths.storage_path)
    per_epoch = steps_per_epoch(cfg, count_rows(data.train))
    launch.connect(cfg.ray)
    launch.check_resources(cfg.ray)
    launch.refuse_existing_run(paths.run_dir, resume)
    launch.save_config(cfg, paths.run_dir)
    datasets = build_datasets(cfg, data)
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "run_dir": str(paths.run_dir),
        "steps_per_epoch": per_epoch,
        "datasets": sorted(datasets),
    }
    log.info("run directory %s (%d steps per epoch, %d epochs)", paths.run_dir, per_epoch, cfg.train.epochs)
    trainer = launch.build_trainer(train_loop_per_worker, loop_config, cfg, datasets, cfg.checkpoint.num_to_keep)
    return launch.fit_and_record(trainer, paths.run_dir)
