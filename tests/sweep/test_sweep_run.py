"""Real sweeps on the test run's local Ray: Tune trials that are Ray Train runs, chained stage by stage.

Tiny on purpose (digits at 16 px, 1-worker trials of half a CPU, 4 at a time, a few steps per stage). The
sweep pretrains the smaller model and is given the larger one (the sweep file's `pretrained:`, as a user
reuses a pretraining run): a checkpoint of the pretraining model at initialisation, written here, which
saves a phase's worth of Ray Train start-ups. Under test is the sweep (trials, chaining, interrupt and
resume, table, plot, TensorBoard), not what pretraining learns."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from raytrain_ssl.sweep.config import load_sweep
from raytrain_ssl.sweep.runner import SweepInterrupted, run_sweep

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments" / "sweeps" / "digits_tiny.yaml")
MODELS = ("r18_0.125x_sk0", "r18_0.25x_sk0")
GIVEN = "r18_0.25x_sk0"
FEW_STEPS = [
    "max_concurrent_trials=4", "trial.cpus_per_worker=0.5",
    "pretrain.train.epochs=1", "pretrain.train.max_steps=2", "pretrain.train.global_batch_size=128",
    "pretrain.eval.knn_every_epochs=1", "pretrain.eval.knn_k=10", "pretrain.train.log_every_steps=1",
    "finetune.train.epochs=2", "finetune.train.global_batch_size=32", "finetune.eval.every_epochs=2",
    "finetune.train.log_every_steps=2",
    "distill.train.epochs=1", "distill.train.max_steps=3", "distill.train.global_batch_size=64",
    "distill.eval.every_epochs=1", "distill.train.log_every_steps=1",
]  # fmt: skip

pytestmark = pytest.mark.timeout(1200)


def _trial_files(root: Path, phase: str) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in (root / phase).glob(f"*/{'trial.json'}")}


@pytest.fixture(scope="module")
def tiny_sweep(ray_local, tmp_path_factory):
    """2 model widths x 2 label fractions, through fine-tune and distillation into the smaller width;
    interrupted (SIGUSR1: Tune's graceful stop, as Ctrl+C) once the first fine-tuning trial has finished,
    then resumed with --resume. One sweep serves every test here (each trial is a real Ray Train run)."""
    storage = tmp_path_factory.mktemp("sweep")
    given = {GIVEN: str(_untrained_pretraining_run(storage / "given" / GIVEN, GIVEN))}
    sweep = load_sweep(TINY, [f"storage_path={storage}", "name=tiny", f"pretrained={json.dumps(given)}", *FEW_STEPS])
    root = storage / "tiny"
    groups_before = set(ray_local.util.placement_group_table())
    start = time.monotonic()
    with _interrupt_when(lambda: _trial_files(root, "finetune")):
        with pytest.raises(SweepInterrupted, match="--resume"):
            run_sweep(sweep)
    cut = {phase: _trial_files(root, phase) for phase in ("pretrain", "finetune", "distill")}
    checkpoints = {key: _checkpoints(root / "finetune" / key) for key in cut["finetune"]}
    summary = run_sweep(sweep, resume=True)
    print(f"tiny sweep, interrupted and resumed: {time.monotonic() - start:.1f} s")
    held = _groups_still_held(ray_local, groups_before)
    return sweep, Path(summary["sweep_dir"]), summary["rows"], cut, checkpoints, held


def _groups_still_held(ray, before: set, wait_s: float = 30.0) -> list[str]:
    """Placement groups made during the sweep that still hold resources once it is over (after giving
    Ray Train's cleaner time to remove those of stopped trials)."""
    deadline = time.monotonic() + wait_s
    while True:
        table = ray.util.placement_group_table()
        held = [pg for pg, info in table.items() if pg not in before and info["state"] != "REMOVED"]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(1)


def _untrained_pretraining_run(run_dir: Path, model: str) -> Path:
    """A finished pretraining run directory as `raytrain-ssl pretrain` leaves it (config.yaml, result.json,
    a checkpoint in the pretrain stage's format) whose weights are the model's initialisation."""
    from raytrain_ssl.checkpointing import save_checkpoint
    from raytrain_ssl.launch import RESULT_FILE, save_config
    from raytrain_ssl.stages.pipeline import stage_config
    from raytrain_ssl.stages.pretrain import Progress, build_model

    base = load_sweep(TINY, [])
    cfg = stage_config(base, "pretrain", base.pretrain, run_dir.name, [f"model.name={model}"], run_dir.parent)
    net = build_model(cfg)
    state = {"stage": "pretrain", "model_name": model, "encoder": net.encoder.state_dict(),
             "head": net.head.state_dict(), "progress": Progress().__dict__, "config": cfg.model_dump(mode="json")}  # fmt: skip
    save_config(cfg, run_dir)
    (checkpoint := run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    save_checkpoint(state, checkpoint)
    (run_dir / RESULT_FILE).write_text(json.dumps({"run_dir": str(run_dir), "metrics": {}}))
    return run_dir


@contextlib.contextmanager
def _interrupt_when(condition):
    """Send this process SIGUSR1 (Tune stops the experiment gracefully) once `condition()` is true."""
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if condition():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.2)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a signal outside Tune's run must not end pytest
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*"))


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tiny_sweep):
    _, root, rows, cut, checkpoints, held = tiny_sweep
    # 4 fine-tuning trials run at once and end within seconds of each other: by the time Tune acts on the
    # signal, 1 to 4 of them have finished; the rest (if any) are run again from their checkpoints.
    assert len(cut["pretrain"]) == 1 and 1 <= len(cut["finetune"]) <= 4 and not cut["distill"]
    for key, mtime in cut["finetune"].items():  # finished before the cut: never run again
        assert _trial_files(root, "finetune")[key] == mtime
        assert _checkpoints(root / "finetune" / key) == checkpoints[key]
    assert _trial_files(root, "pretrain") == cut["pretrain"]
    assert len(_trial_files(root, "finetune")) == 4 and len(_trial_files(root, "distill")) == 4
    assert not held, f"placement groups of stopped trials still hold resources: {held}"


def test_every_trial_ran_and_chained_to_its_source(tiny_sweep):
    sweep, root, rows, *_ = tiny_sweep
    by_phase = {phase: [r for r in rows if r["phase"] == phase] for phase in ("pretrain", "finetune", "distill")}
    assert [len(by_phase[p]) for p in ("pretrain", "finetune", "distill")] == [2, 4, 4]
    assert all(r["status"] == "done" for r in rows if r["phase"] != "pretrain"), [r["status"] for r in rows]
    pretrained = {r["run_dir"]: r["model"] for r in by_phase["pretrain"]}
    assert sorted(pretrained.values()) == list(MODELS)
    assert {r["model"]: r["status"] for r in by_phase["pretrain"]} == {GIVEN: "given", "r18_0.125x_sk0": "done"}
    for r in by_phase["finetune"]:
        saved = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert saved["finetune"]["pretrained"] == r["source"]  # the trial started from that checkpoint
        assert pretrained[r["source"]] == r["model"]
        assert 0 <= r["top1"] <= 1 and r["labeled_images"] == len(_ids(Path(r["run_dir"]) / "label_subset.txt"))
    finetuned = {r["run_dir"]: r for r in by_phase["finetune"]}
    assert {r["source"] for r in by_phase["distill"]} == set(finetuned)  # every teacher distilled
    for r in by_phase["distill"]:
        saved = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert saved["distill"]["teacher"] == r["source"] and saved["model"]["name"] == "r18_0.125x_sk0"
        assert r["teacher_model"] == finetuned[r["source"]]["model"]
        assert r["label_fraction"] == finetuned[r["source"]]["label_fraction"]
    # One subset file per fraction, shared by every trial of that fraction.
    for fraction, tag in ((0.05, "5pct"), (0.2, "20pct")):
        shared = _ids(root / "subsets" / f"{tag}.txt")
        assert len(shared) == round(fraction * 1437, -1) or abs(len(shared) - fraction * 1437) < 10
        for r in (r for r in by_phase["finetune"] if r["label_fraction"] == fraction):
            assert _ids(Path(r["run_dir"]) / "label_subset.txt") == shared


def _ids(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_table_plot_and_tensorboard(tiny_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, root, rows, *_ = tiny_sweep
    table = (root / "results.csv").read_text().splitlines()
    assert len(table) == 1 + 10 and table[0].startswith("phase,method,model,params_m,label_fraction")
    assert "| distilled | r18_0.125x_sk0 |" in (root / "results.md").read_text()
    assert (root / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((root / "results.json").read_text()) == rows or len(rows) == 10
    params = {r["model"]: r["params_m"] for r in rows}
    assert params["r18_0.125x_sk0"] < params["r18_0.25x_sk0"]
    for r in (r for r in rows if r["status"] != "given"):  # the given pretraining run has none
        acc = EventAccumulator(str(Path(r["run_dir"]) / "tensorboard"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert "hparams/top1" in tags, r["key"]
        assert any(t.startswith("train/") for t in tags), (r["key"], tags)
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert sorted(p.name for p in (root / "tune").iterdir()) == ["distill", "finetune", "pretrain"]


def test_only_the_best_student_and_teacher_get_a_program_and_export_writes_any_other(tiny_sweep, capsys):
    """Every trial leaves model.pt + model.json; the torch.export program (the costly part) is written for
    the best distilled and the best fine-tuned trial; `raytrain-ssl export RUN_DIR` writes it for another."""
    import torch

    from raytrain_ssl.cli import main
    from raytrain_ssl.sweep.runner import best_row

    _, _, rows, *_ = tiny_sweep
    best = {best_row(rows, m, "max")["run_dir"] for m in ("distilled", "fine-tuned")}
    for r in (r for r in rows if r["phase"] != "pretrain"):
        export = Path(r["run_dir"]) / "export"
        assert (export / "model.pt").is_file() and (export / "model.json").is_file(), r["key"]
        assert (export / "model.pt2").is_file() == (r["run_dir"] in best), r["key"]
    other = next(r for r in rows if r["phase"] == "distill" and r["run_dir"] not in best)
    assert main(["export", other["run_dir"]]) == 0
    program = json.loads(capsys.readouterr().out)["program"]
    images = torch.rand(3, 3, 16, 16)
    logits = torch.export.load(program).module()(images)
    assert logits.shape == (3, 10)
    assert json.loads((Path(other["run_dir"]) / "result.json").read_text())["export"]["program"] == program


def test_more_concurrent_trials_than_fit_queue_instead_of_failing(ray_local, caplog):
    """The test Ray has 4 logical CPUs, one kept for Ray Data: 2-worker trials fit one at a time."""
    from raytrain_ssl.launch import ResourceError
    from raytrain_ssl.sweep.runner import concurrency, connect

    sweep = load_sweep(TINY, ["trial.num_workers=2", "max_concurrent_trials=5"])
    with caplog.at_level("WARNING", logger="raytrain_ssl.sweep"):
        connect(sweep)  # attaches to the running Ray; one trial fits
        assert "State API" not in caplog.text  # the dashboard is up: stopped trials give their CPUs back
        assert concurrency(sweep) == 1
    assert "running 1 at a time, the rest queue" in caplog.text
    assert concurrency(load_sweep(TINY, ["trial.num_workers=1", "max_concurrent_trials=2"])) == 2
    with pytest.raises(ResourceError, match="can never be met"):
        connect(load_sweep(TINY, ["trial.num_workers=4"]))  # one trial alone can never fit: refused
