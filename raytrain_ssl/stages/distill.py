"""Distillation (SimCLRv2 step 3): a fine-tuned teacher, frozen in eval mode, labels the unlabeled images
and a student (the same model for self-distillation, a smaller one for big-to-small) learns to match its
softened predictions: T^2 * KL(teacher || student) at temperature T, optionally mixed with the labeled
cross-entropy on the teacher's own label subset by `distill.labeled_weight`.

The student is encoder -> linear classifier (no projection head), trained from scratch unless
`distill.init` names a pretrain run (its encoder) or a fine-tune/distill run of the same architecture.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from raytrain_ssl.checkpointing import latest_checkpoint_dir, load_checkpoint
from raytrain_ssl.config import ConfigError, DistillConfig
from raytrain_ssl.export import classifier_from_state
from raytrain_ssl.losses import distillation_loss
from raytrain_ssl.models.classifier import ClassifierSpec
from raytrain_ssl.stages.classifier_loop import StageParts, train_classifier
from raytrain_ssl.stages.worker_env import setup_worker

log = logging.getLogger("raytrain_ssl.distill")


def make_loss(teacher: torch.nn.Module, temperature: float, labeled_weight: float):
    """The distillation loss of one batch; rows with label -1 are unlabeled (teacher only)."""

    def loss_fn(model, images, labels):
        with torch.no_grad():
            teacher_logits = teacher(images).float()
        logits = model(images).float()
        loss = distillation_loss(logits, teacher_logits, temperature)
        if labeled_weight > 0:
            labeled = labels >= 0
            # A batch without labeled rows still contributes 0 through the graph (DDP needs every rank's
            # backward to touch the same parameters).
            ce = F.cross_entropy(logits[labeled], labels[labeled]) if labeled.any() else logits.sum() * 0
            loss = (1 - labeled_weight) * loss + labeled_weight * ce
        agreement = (logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()
        return loss, {"teacher_agreement": agreement}

    return loss_fn


def load_teacher(path: str, env) -> torch.nn.Module:
    teacher = classifier_from_state(load_checkpoint(path))  # eval mode: BN uses running statistics
    teacher.requires_grad_(False)
    teacher = teacher.to(env.device)
    return teacher.to(memory_format=torch.channels_last) if env.channels_last else teacher


def init_student(student, path: str) -> None:
    state = load_checkpoint(path)
    if "spec" in state:  # a classifier of the same architecture: every weight
        student.load_state_dict(state["model"])
    else:  # a pretrain checkpoint: the encoder
        student.encoder.load_state_dict(state["encoder"])


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = DistillConfig.model_validate(loop_config["config"])
    env = setup_worker(cfg.train, loop_config["datasets"], loop_config["run_dir"])
    spec = ClassifierSpec.from_dict(loop_config["spec"])
    student = spec.build()
    if loop_config["init"]:
        init_student(student, loop_config["init"])
    teacher = load_teacher(loop_config["teacher"], env)
    loss_fn = make_loss(teacher, cfg.distill.temperature, cfg.distill.labeled_weight)
    extra = {"teacher": loop_config["teacher"], "init": loop_config["init"]}
    train_classifier(cfg, env, StageParts("distill", spec, student, loss_fn, extra), loop_config)


# ---------------------------------------------------------------------------------------------- driver


def _checkpoint_or_error(key: str, path: str) -> str:
    try:
        return str(latest_checkpoint_dir(path))
    except FileNotFoundError as exc:
        raise ConfigError(f"config error: {key}: {exc}") from None


def _teacher(cfg: DistillConfig) -> tuple[str, dict]:
    directory = _checkpoint_or_error("distill.teacher", cfg.distill.teacher)
    state = load_checkpoint(directory)
    if "spec" not in state:
        raise ConfigError(
            f"config error: distill.teacher: {directory} is a '{state.get('stage')}' checkpoint without a "
            "classifier; give a fine-tune run directory"
        )
    return directory, state


def _labeled_ids(cfg: DistillConfig, teacher_state: dict) -> frozenset[str]:
    from raytrain_ssl.data.subsets import read_subset

    if cfg.distill.labeled_weight == 0:
        return frozenset()
    subset = teacher_state.get("label_subset")
    if not subset:
        raise ConfigError(
            "config error: distill.labeled_weight > 0 but the teacher was fine-tuned on all labels "
            "(no label subset recorded); set distill.labeled_weight=0"
        )
    return frozenset(read_subset(subset))


def run(cfg: DistillConfig, resume: bool = False) -> dict:
    """Distil the teacher into the student on Ray; returns the summary written to result.json."""
    from raytrain_ssl import launch
    from raytrain_ssl.data.paths import resolve_data_paths
    from raytrain_ssl.data.stream import count_rows
    from raytrain_ssl.export import export_run
    from raytrain_ssl.stages.pretrain import steps_per_epoch

    paths = launch.resolve_run_paths(cfg.ray, "distill")
    cfg = launch.with_run_paths(cfg, paths)
    run_dir = paths.run_dir
    data = resolve_data_paths(cfg.data, paths.storage_path)
    launch.refuse_existing_run(run_dir, resume)
    teacher_dir, teacher_state = _teacher(cfg)
    teacher_spec = ClassifierSpec.from_dict(teacher_state["spec"])
    spec = ClassifierSpec(cfg.model.name, cfg.use_small_image_stem, teacher_spec.num_classes)
    init = _checkpoint_or_error("distill.init", cfg.distill.init) if cfg.distill.init else None
    labeled_ids = _labeled_ids(cfg, teacher_state)
    per_epoch = steps_per_epoch(cfg, count_rows(data.train))

    launch.connect(cfg.ray)
    launch.check_resources(cfg.ray)
    launch.save_config(cfg, run_dir)
    datasets = build_datasets(cfg, data, labeled_ids)
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "steps_per_epoch": per_epoch,
        "datasets": sorted(datasets),
        "spec": spec.to_dict(),
        "teacher": teacher_dir,
        "init": init,
    }
    log.info("distilling %s (teacher %s) into %s, %d steps per epoch, run directory %s",
             teacher_spec.model_name, teacher_dir, spec.model_name, per_epoch, run_dir)  # fmt: skip
    trainer = launch.build_trainer(train_loop_per_worker, loop_config, cfg, datasets, cfg.checkpoint.num_to_keep)
    facts = {"stage": "distill", "teacher": teacher_dir, "init": init, "spec": spec.to_dict()}
    return export_run(launch.fit_and_record(trainer, run_dir, facts), program=cfg.export.program)


def build_datasets(cfg: DistillConfig, data, labeled_ids: frozenset[str]) -> dict:
    from raytrain_ssl.data.stream import distill_dataset, labeled_dataset
    from raytrain_ssl.stages.finetune import view_spec

    spec = view_spec(cfg)
    common = dict(batch_size=cfg.data.decode_batch_size, concurrency=cfg.data.decode_concurrency)
    datasets = {"train": distill_dataset(data.train, spec, labeled_ids, cfg.data.shuffle_seed, **common)}
    if data.val:
        datasets["val"] = labeled_dataset(data.val, spec, train=False, **common)
    return datasets
