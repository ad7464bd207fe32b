"""The command line: help, --print-config, one-line errors with exit code 2 (no Ray started)."""

import subprocess
import sys

import pytest

from raytrain_ssl.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "raytrain_ssl.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_commands_and_every_pretrain_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "pretrain" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for key in ["optim.trust_coefficient", "contrastive.queue_size", "ray.num_workers", "--resume"]:
        assert key in out


def test_print_config_resolves_file_and_overrides(capsys):
    assert main(["pretrain", "experiments/quickstart_digits.yaml", "train.epochs=2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "name: r18_0.25x_sk0" in out


def test_overrides_may_follow_a_flag(capsys):
    assert main(["pretrain", "experiments/quickstart_digits.yaml", "--print-config", "train.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
    assert main(["sweep", "experiments/sweeps/digits_tiny.yaml", "--print-config", "label_fractions=[0.5]"]) == 0
    assert "label_fractions:\n- 0.5\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "experiments/quickstart_digits.yaml", "--print-config", "--bogus"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["pretrain", "experiments/quickstart_digits.yaml", "optim.lr=0.1"], "unknown key 'optim.lr'"),
        (["pretrain", "missing.yaml"], "config file not found: missing.yaml"),
        (["pretrain", "--resume", "/nonexistent/run"], "no config.yaml in /nonexistent/run"),
        (["pretrain", "data.train=/nonexistent/shards", "--print-config"], None),
        (["export", "/nonexistent/run"], "export: /nonexistent/run is not a finished run (no result.json)"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(args, expected):
    result = run_cli(*args)
    if expected is None:  # paths are checked when the run starts, not when printing the config
        assert result.returncode == 0
        return
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_missing_shard_directory_is_a_one_line_error(tmp_path, capsys):
    code = main(["pretrain", f"data.train={tmp_path}/none", f"ray.storage_path={tmp_path}"])
    assert code == 2
    assert f"data.train: shard directory not found: {tmp_path}/none" in capsys.readouterr().err


def test_impossible_resource_request_is_refused(ray_local):
    from raytrain_ssl.config import RaySection
    from raytrain_ssl.launch import ResourceError, check_resources

    with pytest.raises(ResourceError, match="needs 2 GPUs but the cluster has 0"):
        check_resources(RaySection(num_workers=2, gpus_per_worker=1))
    with pytest.raises(ResourceError, match="leaves none for Ray Data"):
        check_resources(RaySection(num_workers=4, cpus_per_worker=1))
    check_resources(RaySection(num_workers=2, cpus_per_worker=1))  # fits: no error
