"""Fine-tuning (SimCLRv2 step 2): a pretrained encoder + head layers 1..k + a new linear classifier,
the whole network trained on a class-balanced label fraction, on Ray Train workers with global BatchNorm.

Without `finetune.pretrained` the same network trains from scratch: the supervised baseline that the
benefit of pretraining is measured against, on exactly the same labels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn.functional as F

from raytrain_ssl.checkpointing import latest_checkpoint_dir, load_checkpoint
from raytrain_ssl.config import ConfigError, FinetuneConfig
from raytrain_ssl.models.classifier import ClassifierSpec, load_pretrained, pretrained_head_spec
from raytrain_ssl.stages.classifier_loop import StageParts, train_classifier
from raytrain_ssl.stages.worker_env import setup_worker

log = logging.getLogger("raytrain_ssl.finetune")

SUBSET_FILE = "label_subset.txt"


def cross_entropy_loss(model, images, labels):
    logits = model(images).float()
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels), {"accuracy": accuracy}


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    env = setup_worker(cfg.train, loop_config["datasets"], loop_config["run_dir"])
    spec = ClassifierSpec.from_dict(loop_config["spec"])
    network = spec.build()
    if loop_config["pretrained"]:  # overwritten by the run's own checkpoint when Ray Train restarts it
        load_pretrained(network, load_checkpoint(loop_config["pretrained"]), spec.head_layer)
    extra = {"pretrained": loop_config["pretrained"], "label_subset": loop_config["label_subset"]}
    train_classifier(cfg, env, StageParts("finetune", spec, network, cross_entropy_loss, extra), loop_config)


# ---------------------------------------------------------------------------------------------- driver


def encoder_facts(state: dict) -> tuple[str, bool]:
    """(model name, small-image stem) of a checkpoint of any stage."""
    if "spec" in state:
        spec = state["spec"]
        return spec["model_name"], spec["small_image_stem"]
    config = state["config"]
    stem = config["model"].get("small_image_stem")
    return state["model_name"], config["data"]["image_size"] <= 64 if stem is None else stem


def _pretrained(cfg: FinetuneConfig) -> tuple[str, dict] | tuple[None, None]:
    if not cfg.finetune.pretrained:
        return None, None
    try:
        directory = latest_checkpoint_dir(cfg.finetune.pretrained)
    except FileNotFoundError as exc:
        raise ConfigError(f"config error: finetune.pretrained: {exc}") from None
    state = load_checkpoint(directory)
    if state.get("stage") not in ("pretrain", None) or "encoder" not in state:
        raise ConfigError(
            f"config error: finetune.pretrained: {directory} is a '{state.get('stage')}' checkpoint; "
            "give a pretrain run directory"
        )
    return str(directory), state


def build_spec(cfg: FinetuneConfig, state: dict | None, num_classes: int) -> ClassifierSpec:
    if state is None:  # supervised baseline: the configured model, no head layer
        return ClassifierSpec(cfg.model.name, cfg.use_small_image_stem, num_classes)
    name, stem = encoder_facts(state)
    head = pretrained_head_spec(state["config"]) if state.get("head") else None
    available = head.num_layers if head else 0
    if cfg.finetune.head_layer > available:
        raise ConfigError(
            f"config error: finetune.head_layer={cfg.finetune.head_layer}: the pretrained head has "
            f"{available} layers; allowed 0..{available}"
        )
    return ClassifierSpec(name, stem, num_classes, head, cfg.finetune.head_layer)


def fit_batch_to_subset(cfg, num_images: int):
    """A labeled subset smaller than the global batch lowers the batch (to a multiple of the workers)."""
    workers = cfg.ray.num_workers
    largest = (num_images // workers) * workers
    if largest == 0:
        raise ConfigError(f"config error: {num_images} labeled images cannot feed {workers} workers")
    if cfg.train.global_batch_size <= largest:
        return cfg
    log.warning("train.global_batch_size %d > %d labeled images: using %d", cfg.train.global_batch_size,
                num_images, largest)  # fmt: skip
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"global_batch_size": largest})})


def run(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Fine-tune (or train the supervised baseline) on Ray; returns the summary written to result.json."""
    from raytrain_ssl import launch
    from raytrain_ssl.data.paths import resolve_data_paths
    from raytrain_ssl.data.subsets import SubsetError, resolve_subset
    from raytrain_ssl.export import export_run

    paths = launch.resolve_run_paths(cfg.ray, "finetune")
    cfg = launch.with_run_paths(cfg, paths)
    run_dir = paths.run_dir
    data = resolve_data_paths(cfg.data, paths.storage_path)
    launch.refuse_existing_run(run_dir, resume)
    pretrained_dir, state = _pretrained(cfg)
    subset_file = run_dir / SUBSET_FILE
    # On resume the saved subset is authoritative: the run continues on exactly the labels it started with.
    given_subset = str(subset_file) if resume and subset_file.is_file() else cfg.finetune.label_subset
    try:
        ids, counts = resolve_subset(
            data.train, cfg.finetune.label_fraction, given_subset, cfg.finetune.subset_seed, subset_file
        )
    except SubsetError as exc:
        raise ConfigError(f"config error: finetune: {exc}") from None
    spec = build_spec(cfg, state, num_classes=max(counts) + 1)
    num_images = sum(counts.values())
    cfg = fit_batch_to_subset(cfg, num_images)
    per_epoch = (num_images // cfg.ray.num_workers) // cfg.batch_size_per_worker

    launch.connect(cfg.ray)
    launch.check_resources(cfg.ray)
    launch.save_config(cfg, run_dir)
    datasets = build_datasets(cfg, data, frozenset(ids) if ids is not None else None)
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "steps_per_epoch": per_epoch,
        "datasets": sorted(datasets),
        "spec": spec.to_dict(),
        "pretrained": pretrained_dir,
        "label_subset": str(subset_file) if ids is not None else None,
    }
    what = f"from {pretrained_dir} (head layer {spec.head_layer})" if pretrained_dir else "from scratch"
    log.info("fine-tuning %s %s on %d labeled images (%d classes), %d steps per epoch, run directory %s",
             spec.model_name, what, num_images, spec.num_classes, per_epoch, run_dir)  # fmt: skip
    trainer = launch.build_trainer(train_loop_per_worker, loop_config, cfg, datasets, cfg.checkpoint.num_to_keep)
    facts = {
        "stage": "finetune",
        "pretrained": pretrained_dir,
        "label_fraction": cfg.finetune.label_fraction,
        "label_subset": loop_config["label_subset"],
        "labeled_images": num_images,
        "images_per_class": {str(k): v for k, v in counts.items()},
        "spec": spec.to_dict(),
    }
    summary = launch.fit_and_record(trainer, run_dir, facts)
    return export_run(summary, program=cfg.export.program)


def build_datasets(cfg: FinetuneConfig, data, keep_ids: frozenset[str] | None) -> dict:
    from raytrain_ssl.data.stream import labeled_dataset

    spec = view_spec(cfg)
    common = dict(batch_size=cfg.data.decode_batch_size, concurrency=cfg.data.decode_concurrency)
    datasets = {
        "train": labeled_dataset(
            data.train, spec, train=True, shuffle_seed=cfg.data.shuffle_seed, keep_ids=keep_ids, **common
        )
    }
    if data.val:
        datasets["val"] = labeled_dataset(data.val, spec, train=False, **common)
    else:
        log.warning("no data.val: the run reports no validation accuracy")
    return datasets


def view_spec(cfg):
    from raytrain_ssl.data.stream import ViewSpec

    return ViewSpec(image_size=cfg.data.image_size, min_crop_scale=cfg.augment.min_crop_scale, max_pixels=cfg.data.max_pixels)


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run or checkpoint path."""
    path = Path(path)
    return path.parent if path.name.startswith("checkpoint_") else path
