"""The whole recipe on real images (digits) with 2 CPU workers: pipeline, fine-tune resume, distillation.

One tiny pipeline (a few steps per stage) serves the module; the other tests start from its pretrained
model. Figures are not judged here (a few steps learn little): chaining, files and resume are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytrain_ssl.checkpointing import load_checkpoint
from raytrain_ssl.config import ConfigError, load_config
from raytrain_ssl.data.stream import count_rows
from raytrain_ssl.data.subsets import read_subset
from raytrain_ssl.stages import distill, finetune
from raytrain_ssl.stages.pipeline import load_pipeline, run_pipeline

from test_pretrain_run import _scalars  # tests/stages is on sys.path under pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
TINY_PIPELINE = [
    "name=tiny",
    "pretrain.train.max_steps=2",
    "pretrain.eval.knn_every_epochs=1",
    "finetune.train.max_steps=3",
    "finetune.train.global_batch_size=32",
    "finetune.eval.every_epochs=null",
    "distill.train.max_steps=2",
    "finetune.train.log_every_steps=1",
    "supervised.train.log_every_steps=1",
    "distill.train.log_every_steps=1",
    "distill.eval.every_epochs=null",
    "shared.data.decode_batch_size=32",
]
FINETUNE = ["train.global_batch_size=32", "train.log_every_steps=1", "data.image_size=16", "data.decode_batch_size=32",
            "ray.num_workers=2", "eval.every_epochs=null"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pipeline(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    pipe = load_pipeline(REPO / "experiments" / "quickstart_pipeline.yaml", [f"storage_path={root}", *TINY_PIPELINE])
    return pipe, run_pipeline(pipe)


def test_pipeline_chains_stages_and_writes_the_table(tiny_pipeline):
    pipe, summary = tiny_pipeline
    root = Path(summary["pipeline_dir"])
    methods = [row["method"] for row in summary["table"]]
    assert methods == ["supervised baseline", "linear probe", "fine-tuned", "distilled -> r18_0.25x_sk0"]
    assert all(0.0 <= row["top1"] <= row["top5"] <= 1.0 for row in summary["table"])
    for suffix in ("md", "csv", "json", "png"):
        assert (root / f"results.{suffix}").stat().st_size > 0
    assert (root / "curves.png").read_bytes()[:4] == b"\x89PNG"

    results = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/result.json")}
    assert set(results) == {"pretrain", "10pct-supervised", "10pct-finetune", "10pct-distill-r18_0.25x_sk0"}
    assert Path(results["10pct-finetune"]["pretrained"]).parent == root / "pretrain"
    assert results["10pct-supervised"]["pretrained"] is None
    assert Path(results["10pct-distill-r18_0.25x_sk0"]["teacher"]).parent == root / "10pct-finetune"
    # One subset file, the same labels for the baseline and the fine-tuned model.
    shared = read_subset(root / "subsets" / "10pct.txt")
    for step in ("10pct-supervised", "10pct-finetune"):
        assert read_subset(root / step / "label_subset.txt") == shared
        assert results[step]["labeled_images"] == len(shared)
        assert (root / step / "export" / "model.pt2").is_file()
    held_out = count_rows(str(root / "datasets" / "digits" / "test"))
    assert results["10pct-finetune"]["metrics"]["val_images"] == held_out  # every held-out digit, once

    scalars = _scalars(root / "10pct-finetune" / "tensorboard")
    assert "eval/val_top1" in scalars and "train/loss" in scalars


def test_rerunning_a_finished_pipeline_reuses_every_step(tiny_pipeline):
    pipe, summary = tiny_pipeline
    root = Path(summary["pipeline_dir"])
    checkpoints = sorted(root.glob("*/checkpoint_*"))
    again = run_pipeline(pipe)
    assert again["table"] == summary["table"]
    assert sorted(root.glob("*/checkpoint_*")) == checkpoints


def test_finetune_resumes_from_its_checkpoint_on_the_same_labels(tiny_pipeline, tmp_path):
    _, summary = tiny_pipeline
    pretrained = Path(summary["pipeline_dir"]) / "pretrain"
    common = FINETUNE + [f"ray.storage_path={tmp_path}", "ray.name=ft", "train.epochs=4"]
    overrides = [f"pretrained={pretrained}", "label_fraction=0.2", "head_layer=2"]
    first = finetune.run(load_config(None, common + overrides + ["train.max_steps=2"], stage="finetune"))
    run_dir = Path(first["run_dir"])
    subset = read_subset(run_dir / "label_subset.txt")
    state = load_checkpoint(run_dir)
    assert state["progress"]["global_step"] == 2 and state["spec"]["head_layer"] == 2

    cfg = load_config(run_dir / "config.yaml", ["train.max_steps=4"], stage="finetune")
    second = finetune.run(cfg, resume=True)
    state = load_checkpoint(second["run_dir"])
    assert state["progress"]["global_step"] == 4
    assert state["progress"]["resumed_from_steps"] == [2]
    assert read_subset(run_dir / "label_subset.txt") == subset
    assert "val_top1" in second["metrics"]


def test_distill_into_a_smaller_student_with_labeled_loss(tiny_pipeline, tmp_path):
    _, summary = tiny_pipeline
    teacher = Path(summary["pipeline_dir"]) / "10pct-finetune"
    overrides = FINETUNE + [f"ray.storage_path={tmp_path}", "ray.name=small", "train.max_steps=2",
                            f"teacher={teacher}", "student=r18_0.125x_sk0", "distill.labeled_weight=0.5"]  # fmt: skip
    result = distill.run(load_config(None, overrides, stage="distill"))
    state = load_checkpoint(result["run_dir"])
    assert state["spec"]["model_name"] == "r18_0.125x_sk0" and state["stage"] == "distill"
    assert state["progress"]["global_step"] == 2
    assert Path(result["teacher"]).parent == teacher
    assert "train/teacher_agreement" in _scalars(Path(result["run_dir"]) / "tensorboard")


def test_bad_stage_inputs_fail_before_any_worker_starts(tiny_pipeline, tmp_path):
    _, summary = tiny_pipeline
    root = Path(summary["pipeline_dir"])
    base = FINETUNE + [f"ray.storage_path={tmp_path}"]
    cases = [
        ("finetune", [f"pretrained={root / 'pretrain'}", "head_layer=4"], "head_layer=4: the pretrained head has 3 layers"),
        ("finetune", [f"pretrained={root / '10pct-finetune'}"], "is a 'finetune' checkpoint"),
        ("finetune", [f"pretrained={tmp_path / 'nope'}"], "run directory not found"),
        ("finetune", ["label_fraction=0.001"], "with no example"),
        ("distill", [f"teacher={root / 'pretrain'}"], "without a classifier"),
    ]
    for stage, overrides, message in cases:
        module = finetune if stage == "finetune" else distill
        with pytest.raises(ConfigError, match=message):
            module.run(load_config(None, base + overrides + [f"ray.name=bad-{stage}"], stage=stage))
