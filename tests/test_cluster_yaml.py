"""`cluster.yaml` is a valid cluster-launcher config for the pinned Ray, checked offline (no AWS call)."""

from __future__ import annotations

import copy
import shlex
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def raw_text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def cluster(raw_text) -> dict:
    return yaml.safe_load(raw_text)


def _setup_commands(cluster: dict) -> str:
    return "\n".join(cluster["setup_commands"])


def test_validates_against_the_launchers_own_schema(cluster):
    # What `ray up` does first (prepare_config merges the AWS defaults); both are private: Ray is pinned.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_the_schema_check_catches_a_misspelt_key(cluster):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 2  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(bad))


def test_cpu_head_and_autoscaled_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing but drivers on the head
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])  # a CPU instance
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in workers)
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"]
    assert any(t["min_workers"] < t["max_workers"] for t in workers)  # room to autoscale


def test_pinned_versions_equal_the_installed_ones(cluster):
    from importlib.metadata import version  # the installed distributions, without importing torch (slow)

    import ray

    commands = _setup_commands(cluster)
    pins = dict(re.findall(r'"(ray|torch|torchvision)(?:\[[^\]]*\])?==([^"\s]+)"', commands))
    assert pins == {
        "ray": ray.__version__,
        "torch": version("torch").split("+")[0],  # local builds may carry +cpu / +cuXYZ
        "torchvision": version("torchvision").split("+")[0],
    }
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(ray.__version__)}"', pyproject), "pyproject pins another Ray"


def test_commands_are_whole_shell_lines(cluster):
    # A " #" inside a plain YAML scalar starts a comment and silently cuts the command short.

    lists = [key for key in cluster if key.endswith("_commands")]
    assert {"setup_commands", "head_start_ray_commands", "worker_start_ray_commands"} <= set(lists)
    for key in lists:
        for command in cluster[key]:
            shlex.split(command)  # raises on an unclosed quote


def test_installs_this_project_with_the_gpu_extra_from_the_synced_copy(cluster):
    remote = next(r for r, local in cluster["file_mounts"].items() if local == ".")
    assert remote.startswith("~/")
    commands = _setup_commands(cluster)
    assert f'pip install "$HOME/{remote[2:]}[gpu]"' in commands
    assert "gpu = [" in (REPO / "pyproject.toml").read_text()  # the extra exists


def test_shared_storage_is_mounted_on_every_node(cluster):
    # setup_commands run on head and workers alike; the docs' ray.storage_path lives on this mount.
    commands = _setup_commands(cluster)
    assert "mount -t nfs4" in commands and "/mnt/efs" in commands
    assert "/mnt/efs/raytrain-ssl/runs" in (REPO / "docs" / "cluster.md").read_text()


def _key_lines(text: str) -> list[tuple[int, str, int]]:
    """(line index, key, indent) of every mapping key, skipping comments and block-scalar contents."""
    lines = text.splitlines()
    keys, block_indent = [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r'^(\s*)(?:-\s+)?("[^"]+"|[\w.\-~/]+)\s*:(\s|$)', line)
        if match:
            keys.append((i, match.group(2).strip('"'), indent))
            if re.search(r":\s*[|>][-+]?\s*(#.*)?$", line):
                block_indent = indent
    return keys


def _has_comment(lines: list[str], i: int) -> bool:
    line = lines[i]
    inline = re.search(r"\s#(\s|$)", line)
    above = i > 0 and lines[i - 1].strip().startswith("#")
    return bool(inline or above)


def test_every_top_level_key_has_a_comment(raw_text, cluster):
    lines = raw_text.splitlines()
    top = [(i, key) for i, key, indent in _key_lines(raw_text) if indent == 0]
    assert {key for _, key in top} == set(cluster)  # the parser saw every top-level key
    missing = [key for i, key in top if not _has_comment(lines, i)]
    assert not missing, f"top-level keys without a comment right above or inline: {missing}"


def test_every_nested_key_has_a_comment(raw_text):
    lines = raw_text.splitlines()
    missing = [f"line {i + 1}: {key}" for i, key, indent in _key_lines(raw_text) if not _has_comment(lines, i)]
    assert not missing, f"keys without a comment: {missing}"


def test_uri_storage_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    # pathlib would turn s3://bucket/runs into a local "s3:/bucket/runs": the run must stop instead.
    from raytrain_ssl.config import ConfigError, RaySection
    from raytrain_ssl.launch import resolve_run_paths

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^config error: ray.storage_path=s3://bucket/runs: URIs are not"):
        resolve_run_paths(RaySection(storage_path="s3://bucket/runs", name="x"), "pretrain")
    assert not list(tmp_path.iterdir())
    assert resolve_run_paths(RaySection(storage_path="runs", name="x"), "pretrain").run_dir == tmp_path / "runs/x"
