from pathlib import Path

import pytest

from raytrain_ssl.config import ConfigError, PretrainConfig, apply_overrides, config_to_yaml, load_config

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_shipped_config_loads(path):
    if "sweeps" in path.parts:
        pytest.skip("sweep files have their own schema")
    import yaml

    if yaml.safe_load(path.read_text()).get("stage") == "pipeline":
        from raytrain_ssl.stages.pipeline import load_pipeline, plan

        steps = plan(load_pipeline(path, []))  # builds and validates every step's stage config
        assert steps[0].stage == "pretrain" and len(steps) > 1
        return
    cfg = load_config(path)
    assert cfg.stage


def test_stage_aliases_and_stage_mismatch():
    cfg = load_config(None, ["pretrained=/runs/p", "label_fraction=0.1", "head_layer=2"], stage="finetune")
    assert (cfg.finetune.pretrained, cfg.finetune.label_fraction, cfg.finetune.head_layer) == ("/runs/p", 0.1, 2)
    assert cfg.optim.learning_rate_scaling == "sqrt" and cfg.optim.weight_decay == 0.0  # fine-tune defaults
    partial = load_config(None, ["optim.name=sgd"], stage="finetune")
    assert partial.optim.warmup_epochs == 0  # a partial section keeps the stage's defaults
    cfg = load_config(None, ["teacher=/runs/f", "student=r18_1x_sk0"], stage="distill")
    assert cfg.distill.teacher == "/runs/f" and cfg.model.name == "r18_1x_sk0"
    quickstart = Path(__file__).parents[1] / "experiments" / "quickstart_digits.yaml"
    with pytest.raises(ConfigError, match="this command runs 'finetune' but .* is a 'pretrain' config"):
        load_config(quickstart, stage="finetune")
    with pytest.raises(ConfigError, match="distill.teacher is required"):
        load_config(None, [], stage="distill")
    with pytest.raises(ConfigError, match="label_fraction or finetune.label_subset, not both"):
        load_config(None, ["label_fraction=0.1", "label_subset=ids.txt"], stage="finetune")
    with pytest.raises(ConfigError, match=r"finetune.label_fraction: Input should be less than or equal to 1"):
        load_config(None, ["label_fraction=1.5"], stage="finetune")


def test_there_is_a_quickstart():
    assert any(p.name.startswith("quickstart") for p in EXPERIMENTS)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.epochs=3", "contrastive.queue_size=512", "optim.name=sgd", "ray.name=null"])
    assert cfg.train.epochs == 3 and cfg.contrastive.queue_size == 512 and cfg.optim.name == "sgd"
    assert cfg.ray.name is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.nmae=lars", "unknown key 'optim.nmae'; allowed here: name, base_learning_rate"),
        ("trian.epochs=1", "unknown key 'trian'; allowed here: stage, method, model"),
        ("optim.name=adam", "optim.name: Input should be 'lars', 'sgd' or 'adamw' (got 'adam')"),
        ("train.epochs=0", "train.epochs: Input should be greater than 0 (got 0)"),
        ("model.name=r51_1x_sk0", "model.name: unknown model 'r51_1x_sk0'; known: r18_1x_sk0"),
        ("train.global_batch_size=7", "must be a multiple of ray.num_workers=2"),
        ("train.epochs", "is not key=value"),
    ],
)
def test_bad_settings_give_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=4"])
    with pytest.raises(Exception):
        cfg.train.epochs = 5
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    assert load_config(saved) == cfg


def test_derived_values_do_not_touch_the_config():
    cfg = load_config(None, ["data.image_size=32", "train.global_batch_size=64", "ray.num_workers=4"])
    assert cfg.batch_size_per_worker == 16 and cfg.use_small_image_stem and not cfg.use_gaussian_blur
    assert cfg.model.small_image_stem is None and cfg.augment.gaussian_blur is None


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"epochs": 1}}
    assert apply_overrides(raw, ["train.epochs=2"])["train"]["epochs"] == 2
    assert raw["train"]["epochs"] == 1


def test_defaults_are_simclr_v2():
    cfg = PretrainConfig()
    assert cfg.model.head_layers == 3 and cfg.contrastive.temperature == 0.1 and cfg.optim.name == "lars"


def test_worker_side_decoding_is_refused_where_it_is_not_implemented():
    assert load_config(None, ["data.decode_on=worker"]).data.decode_on == "worker"  # contrastive pretraining
    with pytest.raises(ConfigError, match="data.decode_on=worker is implemented for method=simclr only"):
        load_config(None, ["data.decode_on=worker", "method=deepercluster"])
    with pytest.raises(ConfigError, match="fine-tuning and distillation decode in Ray Data"):
        load_config(None, ["data.decode_on=worker"], stage="finetune")
    with pytest.raises(ConfigError, match=r"data.decode_on: Input should be 'ray_data' or 'worker' \(got 'gpu'\)"):
        load_config(None, ["data.decode_on=gpu"])
