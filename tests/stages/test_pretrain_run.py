"""A real 2-worker CPU pretraining run on Ray Train: checkpoints, resume, TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raytrain_ssl.checkpointing import load_checkpoint
from raytrain_ssl.config import load_config
from raytrain_ssl.stages import pretrain

pytestmark = pytest.mark.ray

TINY = [
    "model.name=r18_0.25x_sk0",
    "data.train=builtin:digits",
    "data.image_size=16",
    "data.decode_batch_size=32",
    "train.global_batch_size=64",
    "train.log_every_steps=1",
    "optim.warmup_epochs=0.5",
    "checkpoint.every_n_steps=2",
    "eval.knn_every_epochs=1",
    "eval.knn_k=10",
    "eval.view_grid_pairs=4",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
    "ray.max_failures=0",
]


def _scalars(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    out["__images__"] = tags["images"]
    return out


def test_two_worker_run_checkpoints_resumes_and_writes_tensorboard(ray_local, tmp_path):
    common = TINY + [f"ray.storage_path={tmp_path}", "ray.name=tiny", "train.epochs=3"]
    first = pretrain.run(load_config(None, common + ["train.max_steps=5"]))
    run_dir = Path(first["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "result.json").is_file()
    state = load_checkpoint(run_dir)
    assert state["progress"]["global_step"] == 5
    assert state["progress"]["resumed_from_steps"] == []
    assert set(state) >= {"encoder", "head", "optimizer", "scheduler", "progress", "config"}
    assert "knn_top1" in first["metrics"]

    # A second fit() of the same run directory continues from the step-5 checkpoint (Ray Train V2
    # resumes implicitly); a fresh run would restart at 0 and count 8 steps of its own. It also switches
    # to the other data path: Ray Data ships encoded bytes, the workers decode and cut the views.
    resumed = load_config(run_dir / "config.yaml", ["train.max_steps=8", "data.decode_on=worker"])
    second = pretrain.run(resumed, resume=True)
    state = load_checkpoint(second["run_dir"])
    assert state["progress"]["resumed_from_steps"] == [5]
    assert state["progress"]["global_step"] == 8
    assert state["scheduler"]["last_epoch"] == 8  # the schedule position survived the restart
    assert state["config"]["data"]["decode_on"] == "worker"

    scalars = _scalars(run_dir / "tensorboard")
    for tag in ["train/loss", "train/learning_rate", "train/contrastive_accuracy",
                "train/images_per_second", "train/data_wait_fraction", "eval/knn_top1"]:  # fmt: skip
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    loss_steps = [step for step, _ in scalars["train/loss"]]
    assert loss_steps == list(range(1, 9)), loss_steps  # each step logged once: no step redone
    assert all(torch.isfinite(torch.tensor(v)) for _, v in scalars["train/loss"])
    assert "views/augmented_pairs" in scalars["__images__"]
    assert 0.0 <= scalars["eval/knn_top1"][-1][1] <= 1.0
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["step"] == 8


def test_existing_run_is_not_silently_overwritten(ray_local, tmp_path):
    from raytrain_ssl.config import ConfigError

    (tmp_path / "taken" / "checkpoint_2026").mkdir(parents=True)
    cfg = load_config(None, TINY + [f"ray.storage_path={tmp_path}", "ray.name=taken"])
    with pytest.raises(ConfigError, match="--resume"):
        pretrain.run(cfg)


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_killed_worker_is_restarted_from_the_last_checkpoint(ray_local, tmp_path):
    """SIGKILL one worker process in the middle of an epoch: Ray Train restarts the group, which resumes from
    the latest checkpoint (FailureConfig(max_failures)), finishes the planned steps, and picks the data up
    where that checkpoint left it: the rest of the interrupted epoch sees no image twice, and steps run
    again after the restart trained on the same images as the first time."""
    import os
    import signal
    import threading
    import time

    overrides = TINY + [f"ray.storage_path={tmp_path}", "ray.name=crash", "train.epochs=20",
                        "train.max_steps=70", "train.global_batch_size=32", "ray.max_failures=1", "checkpoint.every_n_steps=4",
                        "eval.knn_every_epochs=null", "train.record_batch_ids=true"]  # fmt: skip
    run_dir = tmp_path / "crash"
    killed = []

    def kill_early_in_the_second_epoch():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            newest = sorted(run_dir.glob("checkpoint_*/progress.json"))
            progress = json.loads(newest[-1].read_text()) if newest else {"epoch": 0, "step_in_epoch": 0}
            if progress["epoch"] >= 1 and progress["step_in_epoch"] and (pids := _train_worker_pids()):
                # Ray Train's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S):
                # give it time to register a checkpoint of this epoch, then kill.
                time.sleep(3)
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_early_in_the_second_epoch, daemon=True)
    watcher.start()
    summary = pretrain.run(load_config(None, overrides))
    watcher.join(timeout=1)
    assert killed, "the run finished before a worker could be killed"
    state = load_checkpoint(summary["run_dir"])
    assert state["progress"]["global_step"] == 70
    assert len(state["progress"]["resumed_from_steps"]) == 1
    resumed = state["progress"]["resumed_from_steps"][0]
    trained, rerun = _batch_records(run_dir / "batch_ids")
    epoch = trained[0, resumed + 1][0]
    assert trained[0, resumed][0] == epoch >= 1, f"not resumed in the middle of a later epoch: step {resumed}"
    steps = sorted(step for (rank, step), (e, _) in trained.items() if rank == 0 and e == epoch)
    keys = [key for rank in (0, 1) for step in steps for key in trained[rank, step][1]]
    assert len(keys) == len(steps) * 32 and len(set(keys)) == len(keys), "an image seen twice in an epoch"
    for (rank, step), first in rerun.items():
        assert step > resumed and trained[rank, step] == first, f"step {step} of rank {rank} saw other images"


def _batch_records(directory: Path) -> tuple[dict, dict]:
    """train.record_batch_ids logs: {(rank, step): (epoch, keys)} of what the model kept (the last line of a
    step), and {(rank, step): (epoch, keys) of the first time} for steps run twice (after the restart)."""
    trained, rerun = {}, {}
    for rank in (0, 1):
        for line in (directory / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if (rank, record["step"]) in trained:
                rerun.setdefault((rank, record["step"]), trained[rank, record["step"]])
            trained[rank, record["step"]] = (record["epoch"], record["keys"])
    return trained, rerun
