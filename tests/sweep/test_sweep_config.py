"""The sweep file, its trial plan and its chaining rules, checked without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytrain_ssl.config import ConfigError
from raytrain_ssl.sweep.config import grid_points, load_sweep
from raytrain_ssl.sweep.runner import next_chain, phase_axes, prepare_dir, validate_plan
from raytrain_ssl.sweep.trials import SELF, plan_trial, trial_key

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "sweeps" / "digits_tiny.yaml"


def test_every_sweep_file_in_experiments_validates(tmp_path):
    files = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
    assert files
    for path in files:
        sweep = load_sweep(str(path), [f"storage_path={tmp_path}"])
        assert validate_plan(sweep, tmp_path / "s") > 0, path


def test_base_pipeline_sections_are_extended_not_replaced(tmp_path):
    sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}"])
    assert sweep.shared["data"]["train"] == "builtin:digits"  # from the base pipeline file
    assert sweep.pretrain["train"]["epochs"] == 10  # the sweep's own value
    assert sweep.pretrain["optim"]["name"] == "lars"  # the base's value, same section
    assert sweep.model_names() == ["r18_0.125x_sk0", "r18_0.25x_sk0"]


def test_plan_counts_and_chains_every_stage(tmp_path):
    sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}", "supervised_baseline=true"])
    root = tmp_path / "s"
    # 2 pretrain + 2 models x 2 fractions x (fine-tune + supervised) + 4 teachers x 1 student
    assert validate_plan(sweep, root) == 2 + 8 + 4
    plan = plan_trial(sweep, root, "pretrain", {"model": "r18_0.25x_sk0"}, {})
    assert plan.step.config.model.name == "r18_0.25x_sk0"
    assert plan.step.config.ray.num_workers == 1  # the sweep's trial resources win over shared.ray
    assert plan.run_dir == root / "pretrain" / "r18_0.25x_sk0"
    chain = {plan.key: {"model": "r18_0.25x_sk0", "run_dir": str(plan.run_dir), "label_fraction": None}}
    ft = plan_trial(sweep, root, "finetune", {"source": plan.key, "label_fraction": 0.05}, chain)
    assert ft.step.config.finetune.pretrained == str(plan.run_dir)
    assert ft.step.config.finetune.label_subset == str(root / "subsets" / "5pct.txt")
    assert ft.info["source"] == str(plan.run_dir)  # the trial knows its checkpoint's run
    sup = plan_trial(sweep, root, "finetune", {"source": "scratch-r18_0.25x_sk0", "label_fraction": 0.05}, chain)
    assert sup.step.config.finetune.pretrained is None and sup.info["method"] == "supervised baseline"
    teachers = {ft.key: {"model": "r18_0.25x_sk0", "run_dir": str(ft.run_dir), "label_fraction": 0.05}}
    ds = plan_trial(sweep, root, "distill", {"teacher": ft.key, "student": "r18_0.125x_sk0"}, teachers)
    assert ds.step.config.distill.teacher == str(ft.run_dir)
    assert ds.step.config.model.name == "r18_0.125x_sk0"
    self_ds = plan_trial(sweep, root, "distill", {"teacher": ft.key, "student": SELF}, teachers)
    assert self_ds.step.config.model.name == "r18_0.25x_sk0"


def test_search_axes_reach_the_stage_config_and_the_key(tmp_path):
    sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}",
                                   "search={finetune: {optim.base_learning_rate: [0.05, 0.2]}}"])  # fmt: skip
    axes = phase_axes(sweep, "finetune", {"pre": {}})
    points = grid_points(axes)
    assert len(points) == 1 * 2 * 2
    chain = {"pre": {"model": "r18_0.25x_sk0", "run_dir": str(tmp_path / "pre"), "label_fraction": None}}
    plan = plan_trial(sweep, tmp_path, "finetune", {"source": "pre", "label_fraction": 0.2,
                                                    "optim.base_learning_rate": 0.2}, chain)  # fmt: skip
    assert plan.step.config.optim.base_learning_rate == 0.2
    assert plan.key == "pre-20pct-base_learning_rate0.2"
    assert plan.info["hparams"] == {"optim.base_learning_rate": 0.2}


def test_trial_keys_are_stable_and_safe():
    a = trial_key(["r18_1x_sk0", "10pct"], {"model": "x", "optim.base_learning_rate": 0.1, "augment.x": "a/b c"})
    b = trial_key(["r18_1x_sk0", "10pct"], {"augment.x": "a/b c", "optim.base_learning_rate": 0.1, "model": "x"})
    assert a == b == "r18_1x_sk0-10pct-xa_b_c-base_learning_rate0.1"
    assert trial_key(["m"], {"sample": 2}) == "m-s2"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("search={finetune: {optim.bogus: [1]}}", "unknown key 'optim.bogus'"),
        ("search={finetune: {optim.base_learning_rate: {normal: [0, 1]}}}", "give a list (a grid) or one of"),
        ("search={finetune: {optim.base_learning_rate: {uniform: [0.1]}}}", "uniform takes [low, high]"),
        ("search={finetune: {optim.base_learning_rate: []}}", "an empty list sweeps nothing"),
        ("search={eval: {x: [1]}}", "search.eval: not a stage"),
        ("models=[r19_1x_sk0]", "unknown model 'r19_1x_sk0'"),
        ("students=[resnet50]", "unknown model 'resnet50'"),
        ("models=[]", "must name at least one model"),
        ("trial.num_workers=0", "trial.num_workers"),
        ("label_fractions=[0]", "each label fraction must be in (0, 1]"),
        ("max_concurrent_trials=0", "max_concurrent_trials"),
        ("scheduler.name=hyperband", "scheduler.name"),
    ],
)
def test_bad_sweep_settings_are_one_line_errors(tmp_path, override, expected):
    with pytest.raises(ConfigError) as info:
        sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}", override])
        validate_plan(sweep, tmp_path / "s")
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_bad_base_file_is_named(tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("stage: sweep\nbase: missing.yaml\nmodels: [r18_1x_sk0]\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_sweep(str(sweep_file), [])


def test_distill_starts_from_the_best_finished_finetune_of_each_group(tmp_path):
    sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}"])

    def row(key, source, fraction, top1, status="done", method="fine-tuned"):
        return {"key": key, "source": source, "label_fraction": fraction, "top1": top1, "status": status,
                "method": method, "model": "m", "run_dir": f"/r/{key}"}  # fmt: skip

    rows = [
        row("a-lr1", "/p/a", 0.1, 0.70), row("a-lr2", "/p/a", 0.1, 0.80),
        row("a-lr3", "/p/a", 0.1, 0.95, status="stopped early"),  # not finished: never a teacher
        row("b-lr1", "/p/b", 0.1, 0.60), row("a-1pct", "/p/a", 0.01, 0.40),
        row("scratch", None, 0.1, 0.99, method="supervised baseline"),  # a baseline is never a teacher
    ]  # fmt: skip
    chain = next_chain(sweep, "finetune", rows)
    assert sorted(chain) == ["a-1pct", "a-lr2", "b-lr1"]
    assert chain["a-lr2"]["pretrained"] == "/p/a"


def test_a_fresh_sweep_refuses_an_existing_directory_and_resume_refuses_a_changed_file(tmp_path):
    sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}"])
    root = tmp_path / "s"
    prepare_dir(sweep, root, resume=False)
    with pytest.raises(ConfigError, match="pass --resume"):
        prepare_dir(sweep, root, resume=False)
    prepare_dir(sweep, root, resume=True)
    changed = load_sweep(str(TINY), [f"storage_path={tmp_path}", "label_fractions=[0.5]"])
    with pytest.raises(ConfigError, match="differs"):
        prepare_dir(changed, root, resume=True)
    with pytest.raises(ConfigError, match="no sweep.yaml"):
        prepare_dir(sweep, tmp_path / "other", resume=True)


def _finished_pretraining(run_dir: Path, model: str) -> Path:
    """The two files a finished pretraining run leaves that a sweep reads: config.yaml and result.json."""
    from raytrain_ssl.config import load_config
    from raytrain_ssl.launch import save_config

    save_config(load_config(None, [f"model.name={model}", "data.image_size=16"], stage="pretrain"), run_dir)
    (run_dir / "result.json").write_text('{"metrics": {"knn_top1": 0.9, "knn_top5": 1.0}, "wall_s": 60}')
    return run_dir


def test_a_given_pretraining_run_replaces_that_models_pretraining(tmp_path):
    given = _finished_pretraining(tmp_path / "pre", "r18_0.25x_sk0")
    sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}", f"pretrained={{r18_0.25x_sk0: {given}}}"])
    assert phase_axes(sweep, "pretrain", {})["model"] == ["r18_0.125x_sk0"]
    assert validate_plan(sweep, tmp_path / "s") == 1 + 4 + 4  # one pretraining trial fewer
    from raytrain_ssl.sweep.runner import given_pretrained

    chain, rows = given_pretrained(sweep)
    assert chain == {"r18_0.25x_sk0": {"model": "r18_0.25x_sk0", "run_dir": str(given), "label_fraction": None,
                                       "pretrained": None}}  # fmt: skip
    assert rows[0]["status"] == "given" and rows[0]["top1"] == 0.9


@pytest.mark.parametrize(
    ("model_in_run", "key", "expected"),
    [
        ("r18_0.125x_sk0", "r18_0.25x_sk0", "pretrained r18_0.125x_sk0, not r18_0.25x_sk0"),
        (None, "r18_0.25x_sk0", "is not a finished pretraining run"),
        ("r18_0.25x_sk0", "r50_1x_sk0", "not among the sweep's models"),
    ],
)
def test_a_wrong_given_pretraining_run_is_refused(tmp_path, model_in_run, key, expected):
    run_dir = tmp_path / "pre"
    run_dir.mkdir()
    if model_in_run:
        _finished_pretraining(run_dir, model_in_run)
    with pytest.raises(ConfigError, match=expected):
        sweep = load_sweep(str(TINY), [f"storage_path={tmp_path}", f"pretrained={{{key}: {run_dir}}}"])
        validate_plan(sweep, tmp_path / "s")
