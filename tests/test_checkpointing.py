"""Checkpoints: atomic writes, incomplete checkpoints skipped for the previous one, weights-only loading.

No Ray run here: the directories are laid out as Ray Train lays them out (`<run_dir>/checkpoint_<time>/`).
"""

from __future__ import annotations

import builtins
import logging
from pathlib import Path

import pytest
import torch

from raytrain_ssl import checkpointing
from raytrain_ssl.checkpointing import (
    CHECKPOINT_FILE,
    PROGRESS_FILE,
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_epoch,
    latest_checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
)
from raytrain_ssl.config import ConfigError, load_config

OLD, NEW = "checkpoint_2026-01-01_10-00-00.000001", "checkpoint_2026-01-01_10-05-00.000001"


def _state(step: int) -> dict:
    torch.manual_seed(step)
    return {"stage": "pretrain", "encoder": {"w": torch.randn(64, 64)}, "progress": {"global_step": step}}


def _run_with_two_checkpoints(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    for name, step in ((OLD, 2), (NEW, 4)):
        (run_dir / name).mkdir(parents=True)
        save_checkpoint(_state(step), run_dir / name)
    assert load_checkpoint(run_dir)["progress"]["global_step"] == 4
    return run_dir


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    run_dir = _run_with_two_checkpoints(tmp_path)
    newest = run_dir / NEW / CHECKPOINT_FILE
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # what a crash half-way through Ray's copy leaves behind

    with caplog.at_level(logging.WARNING, logger="raytrain_ssl.checkpointing"):
        state = load_checkpoint(run_dir)
    assert state["progress"]["global_step"] == 2
    assert torch.equal(state["encoder"]["w"], _state(2)["encoder"]["w"])
    assert latest_checkpoint_dir(run_dir) == run_dir / OLD
    assert any(NEW in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records), caplog.text

    # Named directly, the truncated checkpoint is an error, on one line, not a silent fallback.
    with pytest.raises(CheckpointError, match="truncated") as raised:
        load_checkpoint(run_dir / NEW)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("leftover", ["missing", "empty", "partial_only"])
def test_incomplete_checkpoint_directories_are_skipped(tmp_path, leftover):
    run_dir = _run_with_two_checkpoints(tmp_path)
    newest = run_dir / NEW / CHECKPOINT_FILE
    if leftover == "missing":
        newest.unlink()
    elif leftover == "empty":
        newest.write_bytes(b"")
    else:
        newest.rename(newest.with_name(CHECKPOINT_FILE + ".partial"))
    assert load_checkpoint(run_dir)["progress"]["global_step"] == 2


def test_corrupt_data_behind_a_whole_zip_directory_falls_back_too(tmp_path):
    """Past the quick check (the zip directory is intact) but unreadable: load_checkpoint still falls back."""
    run_dir = _run_with_two_checkpoints(tmp_path)
    newest = run_dir / NEW / CHECKPOINT_FILE
    data = bytearray(newest.read_bytes())
    start = data.find(b"global_step")  # inside the pickle
    data[start : start + 11] = b"\xff" * 11
    newest.write_bytes(bytes(data))
    assert checkpointing.checkpoint_problem(run_dir / NEW) is None
    assert load_checkpoint(run_dir)["progress"]["global_step"] == 2


def test_crash_inside_the_writer_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run_dir = _run_with_two_checkpoints(tmp_path)
    real_save = torch.save

    def save_half_then_crash(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    # Into a new directory (the next checkpoint_*) and over an existing checkpoint.pt: neither leaves a
    # truncated checkpoint.pt behind.
    third = run_dir / "checkpoint_2026-01-01_10-10-00.000001"
    third.mkdir()
    for target in (third, run_dir / NEW):
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(_state(6), target)
    monkeypatch.undo()
    assert sorted(p.name for p in third.iterdir()) == []
    assert sorted(p.name for p in (run_dir / NEW).iterdir()) == [CHECKPOINT_FILE, PROGRESS_FILE]
    state = load_checkpoint(run_dir)
    assert state["progress"]["global_step"] == 4


class _RunsCode:
    """Unpickling this would call builtins.exec: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_checkpoint_with_pickled_code_is_refused_and_nothing_runs(tmp_path):
    run_dir = _run_with_two_checkpoints(tmp_path)
    marker = tmp_path / "code_ran"
    evil = run_dir / "checkpoint_2026-01-01_10-10-00.000001"
    evil.mkdir()
    torch.save({**_state(6), "payload": _RunsCode(marker)}, evil / CHECKPOINT_FILE)  # written past the checks

    for target in (run_dir, evil):  # the newest of a run, or named directly: refused, never skipped
        with pytest.raises(UnsafeCheckpointError) as raised:
            load_checkpoint(target)
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith("checkpoint error: refusing to load") and "builtins.exec" in message, message
    assert not marker.exists(), "unpickling ran the payload"
    assert isinstance(raised.value, ConfigError)  # the command line prints it as one line, exit code 2


def test_saving_a_state_weights_only_loading_would_refuse_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\[1\] \(.*_RunsCode\)") as raised:
        save_checkpoint({**_state(1), "extra": [1, _RunsCode(tmp_path / "x")]}, tmp_path)
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_load_latest_in_worker_falls_back_when_rays_checkpoint_is_unreadable(tmp_path, monkeypatch):
    import ray.train

    run_dir = _run_with_two_checkpoints(tmp_path)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(run_dir / NEW)))
    assert checkpointing.load_latest_in_worker()["progress"]["global_step"] == 4
    (run_dir / NEW / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 cut short")
    assert checkpointing.load_latest_in_worker()["progress"]["global_step"] == 2
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert checkpointing.load_latest_in_worker() is None


# ---------------------------------------------------------------- every stage's state is weights-only safe


def _weights_only_roundtrip(state: dict, tmp_path: Path) -> dict:
    save_checkpoint(state, tmp_path)  # refuses anything weights-only loading would refuse
    return checkpointing.load_file(tmp_path / CHECKPOINT_FILE)


@pytest.mark.parametrize("optimizer_name", ["lars", "adamw"])  # sgd: in the deepercluster state below
def test_pretrain_state_loads_weights_only(tmp_path, optimizer_name):
    from raytrain_ssl.negative_queue import NegativeQueue
    from raytrain_ssl.optim import build_ema, build_optimizer, build_scheduler
    from raytrain_ssl.stages import pretrain

    cfg = load_config(None, ["model.name=r18_0.25x_sk0", "data.image_size=16", f"optim.name={optimizer_name}"])
    model = pretrain.build_model(cfg)
    optimizer = build_optimizer(optimizer_name, model, 0.1, 1e-6)
    scheduler = build_scheduler(optimizer, 2, 10)  # LambdaLR over a functools.partial: saved as {}
    model(torch.rand(4, 3, 16, 16)).sum().backward()
    optimizer.step()
    scheduler.step()
    ema = build_ema(model, 0.99)
    ema.update_parameters(model)
    queue = NegativeQueue(32, cfg.model.projection_dim)
    progress = pretrain.Progress(global_step=1, resumed_from_steps=[0], skipped_steps=1)
    state = _weights_only_roundtrip(pretrain._state(cfg, model, optimizer, scheduler, ema, queue, progress), tmp_path)

    fresh = pretrain.build_model(cfg)
    fresh_optimizer = build_optimizer(optimizer_name, fresh, 0.1, 1e-6)
    fresh_scheduler = build_scheduler(fresh_optimizer, 2, 10)
    fresh_ema, fresh_queue = build_ema(fresh, 0.99), NegativeQueue(32, cfg.model.projection_dim)
    restored = pretrain._restore(state, fresh, fresh_optimizer, fresh_scheduler, fresh_ema, fresh_queue)
    assert restored == progress
    assert fresh_scheduler.last_epoch == 1 and fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_classifier_and_deepercluster_states_load_weights_only(tmp_path):
    from raytrain_ssl.models.classifier import ClassifierSpec, HeadSpec
    from raytrain_ssl.optim import build_optimizer, build_scheduler
    from raytrain_ssl.stages import classifier_loop, deepercluster
    from raytrain_ssl.stages.cluster_round import PseudoLabels
    from raytrain_ssl.stages.pretrain import Progress

    cfg = load_config(None, ["model.name=r18_0.25x_sk0", "data.image_size=16"])
    spec = ClassifierSpec("r18_0.25x_sk0", True, 10, HeadSpec(None, 128, 3), head_layer=1)
    network = spec.build()
    optimizer = build_optimizer("lars", network, 0.1, 1e-6)
    parts = classifier_loop.StageParts("finetune", spec, network, None, {"pretrained": "/x", "label_subset": None})
    state = classifier_loop._state(cfg, parts, network, optimizer, build_scheduler(optimizer, 0, 5), Progress())
    (tmp_path / "classifier").mkdir()
    loaded = _weights_only_roundtrip(state, tmp_path / "classifier")
    assert ClassifierSpec.from_dict(loaded["spec"]) == spec

    model = deepercluster.DeeperClusterModel(pretrain_encoder(cfg), 8, 3)
    optimizer = build_optimizer("sgd", model, 0.1, 1e-6)
    rows = torch.tensor([[5, 0, 1], [2, 1, 2], [9, 1, 0]])
    pseudo = PseudoLabels.from_rows(rows, 2, 3, round_index=1, epoch=0)
    state = deepercluster._state(cfg, model, optimizer, build_scheduler(optimizer, 0, 5), pseudo, Progress())
    (tmp_path / "deepercluster").mkdir()
    loaded = _weights_only_roundtrip(state, tmp_path / "deepercluster")
    assert torch.equal(PseudoLabels.from_state_dict(loaded["assignments"]).keys, pseudo.keys)


def pretrain_encoder(cfg):
    from raytrain_ssl.models import create_encoder

    return create_encoder(cfg.model.name, small_image_stem=True)


def test_checkpoint_epoch_is_the_progress_of_the_checkpoint_a_resume_takes(tmp_path):
    """What the training streams replay from (data/train_ingest.py): read without loading the weights."""
    assert checkpoint_epoch(tmp_path / "not_started") == 0
    run_dir = tmp_path / "run"
    for name, epoch in ((OLD, 1), (NEW, 3)):
        (run_dir / name).mkdir(parents=True)
        save_checkpoint({"encoder": {"w": torch.ones(2)}, "progress": {"epoch": epoch, "step_in_epoch": 5}}, run_dir / name)
    assert checkpoint_epoch(run_dir) == 3
    (run_dir / NEW / CHECKPOINT_FILE).write_bytes(b"")  # incomplete newest: a resume falls back to OLD
    assert checkpoint_epoch(run_dir) == 1
