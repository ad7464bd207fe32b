"""Driver-side plumbing shared by every stage: Ray connection, resource checks, run directories, trainer.

Every Ray integration point of a stage's driver is here and visible: `ray.init`, `TorchTrainer`,
`ScalingConfig`, `RunConfig` (storage path + name = the run directory, which is also what makes resume
implicit in Ray Train V2), `FailureConfig` and `CheckpointConfig`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raytrain_ssl.config import ConfigError, RaySection, Section, config_to_yaml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
# Logical CPUs an embedded Ray keeps free for Ray Data decode tasks beside the Train workers; without
# them 2 workers at 1 CPU each on a 2-core machine starve the data pipeline and hang (RAY.md).
DATA_CPUS = 2


class ResourceError(RuntimeError):
    """A resource request this cluster can never satisfy."""


@dataclass(frozen=True)
class RunPaths:
    storage_path: str
    name: str

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path) / self.name


def ray_address(ray_cfg: RaySection) -> str | None:
    return ray_cfg.address or os.environ.get("RAY_ADDRESS") or None


def embedded_ray_environment() -> None:
    """Settings for a Ray this process starts on its own machine, set before `ray.init` so that every Ray
    process inherits them. Ray Train's PreemptionWatcher (one more actor process per run, polling for
    nodes being drained) has nothing to watch on one machine that no autoscaler drains; on a cluster
    it stays on."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def connect(ray_cfg: RaySection) -> None:
    """Attach to the configured cluster, or start an embedded local Ray sized for workers + data."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(ray_cfg)
    if address:
        ray.init(address=address, configure_logging=False)  # attaching: the cluster owns its resources
        return
    needed = math.ceil(ray_cfg.num_workers * ray_cfg.cpus_per_worker) + DATA_CPUS
    num_cpus = ray_cfg.local_num_cpus or max(os.cpu_count() or 1, needed)
    object_store = ray_cfg.object_store_memory_mb * 1024 * 1024 if ray_cfg.object_store_memory_mb else None
    embedded_ray_environment()
    ray.init(num_cpus=num_cpus, object_store_memory=object_store, configure_logging=False)


def check_resources(ray_cfg: RaySection) -> None:
    """Refuse requests that can never be met, instead of letting the worker group wait forever."""
    import ray

    total = ray.cluster_resources()
    local = ray_address(ray_cfg) is None
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpus = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    need_gpus = ray_cfg.num_workers * ray_cfg.gpus_per_worker
    problems = []
    if need_gpus > gpus:
        problems.append(
            f"ray.gpus_per_worker={ray_cfg.gpus_per_worker} x ray.num_workers={ray_cfg.num_workers} needs "
            f"{need_gpus:g} GPUs but the cluster has {gpus:g}"
        )
    if need_cpus > cpus - (1 if local else 0):
        problems.append(
            f"ray.cpus_per_worker={ray_cfg.cpus_per_worker} x ray.num_workers={ray_cfg.num_workers} needs "
            f"{need_cpus:g} CPUs and leaves none for Ray Data, but the cluster has {cpus:g}"
        )
    if not problems:
        return
    message = "; ".join(problems)
    if local:
        raise ResourceError(f"resource request can never be met on this machine: {message}")
    # A cluster with an autoscaler may still grow to fit: say so loudly rather than refuse.
    log.warning("resource request exceeds the cluster's current size (%s); waiting for the autoscaler", message)


def resolve_run_paths(ray_cfg: RaySection, stage: str) -> RunPaths:
    storage = ray_cfg.storage_path
    if "://" in storage:
        # Ray Train would put checkpoints on the URI, but config.yaml, result.json, TensorBoard and builtin
        # datasets go through pathlib, which turns s3://b/x into a local directory "s3:/b/x": refuse, loudly.
        raise ConfigError(
            f"config error: ray.storage_path={storage}: URIs are not supported yet; use a directory every "
            "node mounts (e.g. EFS at /mnt/efs, see docs/cluster.md)"
        )
    storage = str(Path(storage).expanduser().resolve())
    name = ray_cfg.name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunPaths(storage_path=storage, name=name)


def with_run_paths(cfg: Section, paths: RunPaths) -> Section:
    """The resolved config (absolute storage path, concrete name): a new object, the input is frozen."""
    ray_cfg = cfg.ray.model_copy(update={"storage_path": paths.storage_path, "name": paths.name})
    return cfg.model_copy(update={"ray": ray_cfg})


def save_config(cfg: Section, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))


def load_run_config(run_dir: str | Path, stage: str) -> Section:
    from raytrain_ssl.config import load_config

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: no {CONFIG_FILE} in {run_dir} (is it a run directory?)")
    return load_config(path, stage=stage)


def build_trainer(
    train_loop: Callable[[dict], None],
    loop_config: dict,
    cfg: Section,
    datasets: dict,
    num_to_keep: int,
):
    """A TorchTrainer whose run directory is `<storage_path>/<name>`: a second fit() with the same
    pair resumes from its latest checkpoint (Ray Train V2's implicit resume)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytrain_ssl.data.train_ingest import StageDataConfig

    ray_cfg = cfg.ray
    resources = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.gpus_per_worker:
        resources["GPU"] = ray_cfg.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=ray_cfg.name,
            storage_path=ray_cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=tune_callbacks(),
        ),
        datasets=datasets,
        # Training streams equal per worker and replayable after a restart; evaluation streams exact.
        dataset_config=StageDataConfig(str(Path(ray_cfg.storage_path) / ray_cfg.name), ordered=cfg.data.ordered),
    )


def tune_callbacks() -> list:
    """Inside a Tune trial (a sweep), forward every worker report and checkpoint path to Tune, so its
    scheduler (ASHA) and progress see them; a plain stage run has no Tune session and needs nothing."""
    # _in_tune_session is the check TuneReportCallback itself makes (private: Ray is pinned to 2.60.0).
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if not _in_tune_session():
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def refuse_existing_run(run_dir: Path, resume: bool) -> None:
    """A fresh run must not silently continue (Ray Train V2 resumes any run dir that has checkpoints)."""
    if not resume and run_dir.exists() and any(run_dir.glob("checkpoint_*")):
        raise ConfigError(
            f"run directory {run_dir} already has checkpoints: pass --resume {run_dir} "
            "to continue it, or choose another ray.name"
        )


def fit_and_record(trainer, run_dir: Path, extra: dict | None = None) -> dict:
    """Run the trainer; write `result.json` (final metrics, checkpoint path, stage facts) and return it."""
    import json

    start = time.monotonic()
    result = trainer.fit()
    summary = {
        "run_dir": str(run_dir),
        "wall_s": round(time.monotonic() - start, 1),  # of this fit (a resumed run: since the resume)
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))},
        **(extra or {}),
    }
    (run_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2))
    return summary
