"""DeeperCluster pretraining (Caron et al. 2019, "Unsupervised Pre-training of Image Features on Non-Curated
Data", arXiv 1905.01278): the train loop each Ray Train worker runs, and its driver. `method: deepercluster`.

Every `deepercluster.recluster_every_epochs` epochs, a clustering round (cluster_round.py) embeds the whole
training set on all workers, clusters it on rank 0 (PCA-whitening, m super-clusters, n sub-clusters inside
each) and gives every image a (super, sub) pseudo-label, identical on all ranks; the prediction heads are then
re-initialised, since cluster indices mean nothing from one round to the next. Per step, on every worker:
rotated crops with their rotation index and image key from Ray Data -> pseudo-labels looked up by key ->
encoder -> super-class head (m clusters x R rotations) and the sub-class head of the sample's super-class ->
`clustering.deepercluster_loss` -> non-finite check on all workers (`train.nonfinite_loss`, nonfinite.py) ->
optimiser step -> warmup+cosine schedule.

Special cases by config, same code: DeepCluster is num_rotations=1, num_super_clusters=1 (k =
num_sub_clusters); RotNet is num_super_clusters=1, num_sub_clusters=1 (no clustering round at all).

The checkpoint has the keys of contrastive pretraining's (`stage`, `model_name`, `encoder`, `optimizer`,
`scheduler`, `progress`, `config`) with `head: None` (no projection head), plus `cluster_heads` and
`assignments`, so fine-tuning reads it like any pretraining checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from raytrain_ssl import dist
from raytrain_ssl.checkpointing import load_latest_in_worker, report
from raytrain_ssl.clustering import deepercluster_loss, deepercluster_targets, use_faiss_gpu
from raytrain_ssl.config import ConfigError, PretrainConfig
from raytrain_ssl.data.augment import to_float_images
from raytrain_ssl.models import create_encoder
from raytrain_ssl.optim import build_optimizer, build_scheduler, scaled_learning_rate
from raytrain_ssl.stages.cluster_round import PseudoLabels, assign_pseudo_labels, embed_keyed_shard
from raytrain_ssl.stages.knn_monitor import knn_eval
from raytrain_ssl.stages.nonfinite import LossGuard, refuse_retry_after_stop
from raytrain_ssl.stages.pretrain import Progress, StepTimer, steps_per_epoch
from raytrain_ssl.stages.worker_env import WorkerEnv, setup_worker, timed_batches, unwrap
from raytrain_ssl.tensorboard_logger import make_logger

log = logging.getLogger("raytrain_ssl.deepercluster")

HEAD_INIT_STD = 0.01  # DeepCluster's top layer: weights N(0, 0.01), bias 0


class DeeperClusterModel(nn.Module):
    """Encoder + the two prediction levels of DeeperCluster.

    `super_head` scores the m*R super-classes (cluster x rotation). `sub_heads` stacks one n-way linear head
    per super-class (as the reference keeps one per (cluster, rotation) group) in a single Linear, so every
    parameter takes part in each forward (DDP needs that) at the cost of computing all m*R*n logits.
    """

    def __init__(self, encoder: nn.Module, num_super_classes: int, num_sub_clusters: int):
        super().__init__()
        self.encoder = encoder
        self.num_super_classes = num_super_classes
        self.num_sub_clusters = num_sub_clusters
        self.super_head = nn.Linear(encoder.num_features, num_super_classes)
        self.sub_heads = nn.Linear(encoder.num_features, num_super_classes * num_sub_clusters)

    def forward(self, images: torch.Tensor, super_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(super_logits (N, m*R), sub_logits (N, n) of each sample's own super-class head)."""
        features = self.encoder(images)
        all_sub = self.sub_heads(features).view(len(features), self.num_super_classes, self.num_sub_clusters)
        return self.super_head(features), all_sub[torch.arange(len(features)), super_target]

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.super_head.parameters(), *self.sub_heads.parameters()]

    @torch.no_grad()
    def reset_heads(self, seed: int) -> None:
        """Fresh prediction layers, drawn from a generator seeded alike on every rank: DDP only broadcasts
        rank 0's weights when it wraps the model, so a reset must give identical weights everywhere."""
        generator = torch.Generator().manual_seed(seed)
        for layer in (self.super_head, self.sub_heads):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * HEAD_INIT_STD)
            layer.bias.zero_()


def build_model(cfg: PretrainConfig) -> DeeperClusterModel:
    encoder = create_encoder(cfg.model.name, small_image_stem=cfg.use_small_image_stem)
    dc = cfg.deepercluster
    return DeeperClusterModel(encoder, dc.num_super_clusters * dc.num_rotations, dc.num_sub_clusters)


def clustering_enabled(cfg: PretrainConfig) -> bool:
    """False for RotNet (one super-cluster of one sub-cluster): every image has pseudo-label (0, 0)."""
    return cfg.deepercluster.num_super_clusters * cfg.deepercluster.num_sub_clusters > 1


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs. `loop_config`: config (dict), run_dir, steps_per_epoch, datasets."""
    cfg = PretrainConfig.model_validate(loop_config["config"])
    env = setup_worker(cfg.train, loop_config["datasets"], loop_config["run_dir"])
    per_epoch = loop_config["steps_per_epoch"]
    total_steps = per_epoch * cfg.train.epochs
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
    warmup_steps = round(cfg.optim.warmup_epochs * per_epoch)
    scheduler = build_scheduler(optimizer, min(warmup_steps, total_steps), total_steps)

    refuse_retry_after_stop(loop_config["run_dir"])  # a retry after train.nonfinite_loss=stop stops again
    progress, pseudo = Progress(), None
    state = load_latest_in_worker()
    if state is not None:
        progress, pseudo = _restore(state, model, optimizer, scheduler, env.device)
        progress.resumed_from_steps.append(progress.global_step)
        log.info("resumed at epoch %d step %d", progress.epoch, progress.global_step)

    tb = make_logger(Path(loop_config["run_dir"]) / "tensorboard", env.is_main)
    tb.text("config", f"```\n{json.dumps(loop_config['config'], indent=2)}\n```", progress.global_step)
    guard = LossGuard(cfg.train.nonfinite_loss, model, tb, loop_config["run_dir"])  # model: the buffers to put back
    train_shard = env.dataset_shard("train")
    if state is None and cfg.eval.knn_at_start:
        _knn(cfg, env, model, progress, tb)  # the random-init baseline the curve starts from
    cluster_metrics: dict = {}
    while progress.epoch < cfg.train.epochs and progress.global_step < total_steps:
        if clustering_enabled(cfg) and _recluster_due(cfg, progress, pseudo):
            pseudo, cluster_metrics = _recluster(cfg, env, model, optimizer, pseudo, progress, tb)
        model.train()
        remaining = min(per_epoch - progress.step_in_epoch, total_steps - progress.global_step)
        batches = env.epoch_batches(train_shard, cfg, progress.epoch, per_epoch, skip=progress.step_in_epoch)
        _run_epoch(cfg, env, model, optimizer, scheduler, pseudo, batches, remaining, progress, tb, guard)
        progress.epoch += 1  # the pass ended: planned steps done, data exhausted, or max_steps reached
        progress.step_in_epoch = 0
        metrics = {**_epoch_metrics(cfg, env, model, progress, tb), **cluster_metrics}
        report(metrics, _state(cfg, model, optimizer, scheduler, pseudo, progress) if env.is_main else None)
    tb.close()


def _recluster_due(cfg: PretrainConfig, progress: Progress, pseudo: PseudoLabels | None) -> bool:
    """At the start of every R-th epoch, unless this epoch's round already ran (a resumed run)."""
    if pseudo is None:
        return True
    every = cfg.deepercluster.recluster_every_epochs
    return progress.epoch % every == 0 and pseudo.epoch != progress.epoch


def _recluster(cfg, env: WorkerEnv, model, optimizer, previous, progress, tb) -> tuple[PseudoLabels, dict]:
    """A clustering round, then fresh prediction heads (and no stale momentum for them)."""
    round_index = 0 if previous is None else previous.round_index + 1
    seed = cfg.train.seed + 7919 * round_index
    features, keys, labels = embed_keyed_shard(unwrap(model).encoder, env.dataset_shard("cluster_features"), env)
    on_gpu = use_faiss_gpu(env.on_gpu)
    pseudo, stats, sizes = assign_pseudo_labels(
        features, keys, labels, cfg.deepercluster, round_index, progress.epoch, seed, previous, on_gpu
    )
    core = unwrap(model)
    core.reset_heads(seed)
    for param in core.head_parameters():
        optimizer.state.pop(param, None)
    tb.scalars(stats, progress.global_step, prefix="clusters/")
    if sizes is not None:
        tb.histogram("clusters/sub_cluster_sizes", sizes, progress.global_step)
        super_sizes = sizes.reshape(-1, cfg.deepercluster.num_sub_clusters).sum(1)
        tb.histogram("clusters/super_cluster_sizes", super_sizes, progress.global_step)
    if env.is_main:
        log.info(
            "epoch %d: clustering round %d on %s: %d images, sub-cluster sizes %d..%d, NMI to labels %s, "
            "changed %s, %.1f s", progress.epoch, round_index, "GPU" if on_gpu else "CPU", stats["num_images"],
            stats["sub_cluster_size_min"], stats["sub_cluster_size_max"],
            _fmt(stats.get("sub_nmi_labels")), _fmt(stats.get("sub_fraction_changed")), stats["seconds"],
        )  # fmt: skip
    summary = {f"cluster_{k}": v for k, v in stats.items() if k in ("sub_nmi_labels", "super_nmi_labels")}
    return pseudo.to(env.device), summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _run_epoch(cfg, env: WorkerEnv, model, optimizer, scheduler, pseudo, batches, remaining, progress, tb, guard):
    timer = StepTimer()
    autocast = env.autocast()
    for done, batch, waited in timed_batches(batches, remaining):
        timer.data_seconds += waited
        images = to_float_images(batch["image"], env.channels_last)
        super_target, sub_target, weights = _targets(cfg, pseudo, batch["key"], batch["rotation"])
        guard.before_forward()
        with autocast:
            super_logits, sub_logits = model(images, super_target)
        loss = deepercluster_loss(super_logits, sub_logits, super_target, sub_target, weights)
        if not guard.skip_step(loss, progress):  # same answer on every worker; raises for nonfinite_loss=stop
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()  # a skipped step still counts: the schedule and step numbers stay on course
        progress.global_step += 1
        progress.step_in_epoch += 1
        env.record_batch(progress.epoch, progress.global_step, batch["key"])
        timer.images += images.shape[0] * env.world_size
        if progress.step_in_epoch == 1 and cfg.eval.view_grid_pairs:
            tb.image_grid("views/rotated_inputs", images[: 2 * cfg.eval.view_grid_pairs], progress.global_step)
        if progress.global_step % cfg.train.log_every_steps == 0:
            accuracies = _accuracies(cfg, super_logits, sub_logits, super_target, sub_target, weights)
            _log_step(tb, env, loss, accuracies, optimizer, timer.window(), progress, cfg)
            timer = StepTimer()
        every = cfg.checkpoint.every_n_steps
        if every and progress.global_step % every == 0 and done < remaining:  # epoch end reports anyway
            step_metrics = {"loss": float(loss.detach()), "epoch": progress.epoch, "step": progress.global_step}
            report(step_metrics, _state(cfg, model, optimizer, scheduler, pseudo, progress) if env.is_main else None)


def _targets(cfg, pseudo: PseudoLabels | None, keys, rotation):
    """(super_target, sub_target, weights) of a batch: the pseudo-labels of its keys combined with the
    rotations. Weight 0 drops an image that was not clustered; 1 everywhere without balancing."""
    if pseudo is None:  # RotNet: no clustering, every image in super-cluster 0, sub-cluster 0
        zeros = torch.zeros_like(keys)
        super_labels, sub_labels, weights, found = zeros, zeros, torch.ones(len(keys), device=keys.device), None
    else:
        super_labels, sub_labels, weights, found = pseudo.lookup(keys)
    if not cfg.deepercluster.balance_clusters and found is not None:
        weights = found.float()
    super_target, sub_target = deepercluster_targets(
        super_labels, sub_labels, rotation, num_rotations=cfg.deepercluster.num_rotations
    )
    return super_target, sub_target, weights


@torch.no_grad()
def _accuracies(cfg, super_logits, sub_logits, super_target, sub_target, weights) -> dict[str, torch.Tensor]:
    """Top-1 of the super-class, the sub-class (own head) and the rotation, over the clustered images."""
    counted = (weights > 0).float()
    total = counted.sum().clamp_min(1.0)
    super_pred = super_logits.argmax(1)
    rotations = cfg.deepercluster.num_rotations
    return {
        "super_accuracy": ((super_pred == super_target).float() * counted).sum() / total,
        "sub_accuracy": ((sub_logits.argmax(1) == sub_target).float() * counted).sum() / total,
        "rotation_accuracy": ((super_pred % rotations == super_target % rotations).float() * counted).sum() / total,
    }


def _log_step(tb, env, loss, accuracies, optimizer, window, progress, cfg):
    # Averaged over workers only when logging: one small collective every log_every_steps steps.
    values = torch.stack([loss.detach().float(), *accuracies.values()]).reshape(1, -1)
    means = dist.all_gather_no_grad(values).mean(0).tolist()
    names = ["loss", *accuracies]
    scalars = {**dict(zip(names, means)), "learning_rate": optimizer.param_groups[0]["lr"], **window}
    tb.scalars(scalars, progress.global_step, prefix="train/")
    if env.is_main:
        log.info(
            "epoch %d/%d step %d  loss %.4f  super acc %.3f  sub acc %.3f  rotation acc %.3f  lr %.4g  %.0f img/s",
            progress.epoch + 1, cfg.train.epochs, progress.global_step, scalars["loss"], scalars["super_accuracy"],
            scalars["sub_accuracy"], scalars["rotation_accuracy"], scalars["learning_rate"],
            window["images_per_second"],
        )  # fmt: skip


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
        log.info(
            "epoch %d: kNN top-1 %.2f%%  top-5 %.2f%%", progress.epoch, 100 * knn["knn_top1"], 100 * knn["knn_top5"]
        )
    return knn


def _state(cfg, model, optimizer, scheduler, pseudo: PseudoLabels | None, progress: Progress) -> dict:
    core = unwrap(model)
    return {
        "stage": "pretrain",
        "method": "deepercluster",
        "model_name": cfg.model.name,
        "encoder": core.encoder.state_dict(),
        "head": None,  # no projection head: fine-tuning starts from the encoder alone
        "cluster_heads": {"super_head": core.super_head.state_dict(), "sub_heads": core.sub_heads.state_dict()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "assignments": pseudo.state_dict() if pseudo is not None else None,
        "progress": progress.__dict__.copy(),
        "config": cfg.model_dump(mode="json"),
    }


def _restore(state, model, optimizer, scheduler, device) -> tuple[Progress, PseudoLabels | None]:
    core = unwrap(model)
    core.encoder.load_state_dict(state["encoder"])
    core.super_head.load_state_dict(state["cluster_heads"]["super_head"])
    core.sub_heads.load_state_dict(state["cluster_heads"]["sub_heads"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assignments = state.get("assignments")
    pseudo = PseudoLabels.from_state_dict(assignments).to(device) if assignments is not None else None
    return Progress(**state["progress"]), pseudo


# ---------------------------------------------------------------------------------------------- driver


def build_datasets(cfg: PretrainConfig, paths) -> dict:
    """The Ray Data streams the workers read: rotated training crops, the clustering pass over the same
    images (centre crops, with keys and labels), and the kNN bank and queries."""
    from raytrain_ssl.data.stream import ViewSpec, keyed_eval_dataset, labeled_dataset, rotation_dataset

    spec = ViewSpec(
        image_size=cfg.data.image_size, min_crop_scale=cfg.augment.min_crop_scale, max_pixels=cfg.data.max_pixels
    )
    common = dict(batch_size=cfg.data.decode_batch_size, concurrency=cfg.data.decode_concurrency)
    rotations = cfg.deepercluster.num_rotations
    datasets = {"train": rotation_dataset(paths.train, spec, rotations, cfg.data.shuffle_seed, **common)}
    if clustering_enabled(cfg):
        datasets["cluster_features"] = keyed_eval_dataset(paths.train, spec, **common)
    if cfg.eval.knn_every_epochs and paths.val and paths.knn_bank:
        bank = labeled_dataset(paths.knn_bank, spec, train=False, limit=cfg.eval.knn_bank_max_images, **common)
        datasets["knn_bank"] = bank
        datasets["knn_query"] = labeled_dataset(paths.val, spec, train=False, **common)
    return datasets


def check_cluster_count(cfg: PretrainConfig, num_rows: int) -> None:
    """k-means needs at least as many images as clusters: refuse before any worker starts."""
    dc = cfg.deepercluster
    if clustering_enabled(cfg) and dc.num_super_clusters * dc.num_sub_clusters > num_rows:
        raise ConfigError(
            f"config error: deepercluster.num_super_clusters={dc.num_super_clusters} x "
            f"deepercluster.num_sub_clusters={dc.num_sub_clusters} clusters need at least as many training "
            f"images, but there are {num_rows}; lower them"
        )


def run(cfg: PretrainConfig, resume: bool = False) -> dict:
    """DeeperCluster pretraining on the configured Ray cluster; returns the final metrics and checkpoint."""
    from raytrain_ssl import launch
    from raytrain_ssl.data.paths import resolve_data_paths
    from raytrain_ssl.data.stream import count_rows

    paths = launch.resolve_run_paths(cfg.ray, "deepercluster")
    cfg = launch.with_run_paths(cfg, paths)
    data = resolve_data_paths(cfg.data, paths.storage_path)
    num_rows = count_rows(data.train)
    per_epoch = steps_per_epoch(cfg, num_rows)
    check_cluster_count(cfg, num_rows)
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
