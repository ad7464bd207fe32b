"""`ray job submit` against a real Ray head: the documented cluster workflow, on 127.0.0.1.

One head (`ray start --head --block`, in its own session and temp dir, with its own auth token) serves the
module; the tests talk to it only through the Jobs SDK over HTTP, like `ray job submit` from a laptop. The
job's driver attaches to this head through the RAY_ADDRESS the Jobs API gives it. Nothing here calls
`ray.init` or changes os.environ, so the in-process Ray of other tests (conftest `ray_local`) is untouched.
Teardown stops this head only: the `ray start` process, then every process that inherited this head's
private token (workers, drivers), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
# The venv's console script (the command a cluster node has on PATH), else the module behind it.
_SCRIPT = Path(sys.executable).with_name("raytrain-ssl")
CLI = shlex.quote(str(_SCRIPT)) if _SCRIPT.exists() else f"{shlex.quote(sys.executable)} -m raytrain_ssl.cli"
# The job the good-path test submits: the whole recipe in one command, as docs/cluster.md submits it.
# {cli}, {storage} and {name} are filled in; the rest makes it tiny: pretrain -> fine-tune at 10% labels
# -> self-distillation, 2 steps each on 2 workers, no kNN or mid-run evaluation (fine-tuning and distillation
# still score the held-out split once at the end), no supervised baseline or linear probe.
JOB_ENTRYPOINT = (
    "{cli} pipeline experiments/quickstart_pipeline.yaml storage_path={storage} name={name} "
    "supervised_baseline=false linear_probe=false shared.ray.num_workers=2 shared.data.decode_batch_size=32 "
    "pretrain.train.epochs=1 pretrain.train.max_steps=2 pretrain.train.global_batch_size=64 "
    "pretrain.eval.knn_every_epochs=null pretrain.eval.knn_at_start=false "
    "finetune.train.epochs=1 finetune.train.max_steps=2 finetune.train.global_batch_size=32 "
    "finetune.train.log_every_steps=1 finetune.eval.every_epochs=null "
    "distill.train.epochs=1 distill.train.max_steps=2 distill.train.global_batch_size=64 "
    "distill.train.log_every_steps=1 distill.eval.every_epochs=null"
)
PIPELINE_STEPS = ("pretrain", "10pct-finetune", "10pct-distill-r18_0.25x_sk0")
# Configs that must fail before Ray starts: (command and config, override, what the one-line error names).
BAD_OVERRIDES = [
    ("pretrain experiments/quickstart_digits.yaml", "train.epochs=-1", "train.epochs"),
    ("pretrain experiments/quickstart_digits.yaml", "train.epoch=3", "unknown key 'train.epoch'"),
    ("pipeline experiments/quickstart_pipeline.yaml", "label_fractions=[0]", "label_fractions"),
]
RUNTIME_ENV = {
    "working_dir": str(REPO),  # ships experiments/ (and the code, which shadows the installed copy)
    "env_vars": {"RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"},  # a data deadlock fails fast
}
HEAD_START_TIMEOUT_S = 120
GOOD_JOB_TIMEOUT_S = 480  # three stage runs; about 2 minutes on an idle 2-core machine
BAD_JOB_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _head_env(token: str) -> dict:
    """The test's environment without any Ray address or auth setting of the pytest process (or of another
    Ray it may have started), plus this head's own token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_TRAIN_ENABLE_PRINT_PATCH"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,  # read before ~/.ray/auth_token: this head never touches the shared file
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: shut down now, not after a 30 s drain
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the pytest process dies (a timeout, Ctrl-C) so the head never
    outlives the test run; `ray start` then shuts down what it started."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _processes_with(marker: bytes) -> list[int]:
    """Pids of this user's processes whose environment holds `marker` (the head's private token)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours
            pass
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Head:
    """A Ray head started by this module; `client()` is a Jobs SDK client that sends its token."""

    def __init__(self, tmp_root: Path):
        self.token = secrets.token_hex(32)
        # Short: Ray's unix sockets live under <temp dir>/session_*/sockets/ (path limit ~107 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        self.dashboard_port = _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = tmp_root / "ray-head.log"
        command = [
            str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            "--num-cpus=4", f"--object-store-memory={300 * 1024 * 1024}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]  # fmt: skip
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, env=_head_env(self.token), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.temp_dir,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.client().list_jobs()
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Jobs API not up after {timeout:.0f} s ({exc}):\n{self.log_tail()}") from exc
                time.sleep(0.5)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        """This head only: stop its jobs, SIGTERM `ray start` (which stops the processes it started), then
        TERM/KILL whatever still carries this head's token (workers, job drivers)."""
        try:
            client = self.client()
            for job in client.list_jobs():
                if not job.status.is_terminal() and job.submission_id:
                    client.stop_job(job.submission_id)
        except Exception:  # noqa: BLE001 - best effort, the signals below do the work
            pass
        marker = f"RAY_AUTH_TOKEN={self.token}".encode()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        _signal_all(_processes_with(marker), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (left := _processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_all(left, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    address_before = os.environ.get("RAY_ADDRESS")
    head = Head(tmp_path_factory.mktemp("ray-head"))
    try:
        head.wait_ready(HEAD_START_TIMEOUT_S)
        yield head
    finally:
        head.stop()
    assert os.environ.get("RAY_ADDRESS") == address_before  # nothing leaks into the other tests


def _wait_terminal(client, job_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(1)


def test_submitted_pipeline_succeeds_and_writes_every_step(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    client = ray_head.client()
    storage = tmp_path / "storage"
    entrypoint = JOB_ENTRYPOINT.format(cli=CLI, storage=shlex.quote(str(storage)), name="jobtest")
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=RUNTIME_ENV)
    status = _wait_terminal(client, job_id, GOOD_JOB_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    (tmp_path / "job.log").write_text(logs)  # the whole log, for a look after a failure
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-6000:]}"

    # The driver attached to this head (the Jobs API's RAY_ADDRESS) instead of starting a Ray of its own.
    assert client.get_job_info(job_id).driver_info is not None, "the driver never connected to this head"
    assert "Started a local Ray instance" not in logs
    root = storage / "jobtest"
    assert f"pipeline directory: {root}" in logs

    # The table: written in four forms, and printed in the job's logs exactly as in results.md.
    for suffix in ("md", "csv", "json", "png"):
        assert (root / f"results.{suffix}").stat().st_size > 0, suffix
    table = (root / "results.md").read_text().strip()
    assert table in logs, f"results table not in the job's logs:\n{table}\n---\n{logs[-4000:]}"
    rows = json.loads((root / "results.json").read_text())
    assert [row["method"] for row in rows] == ["fine-tuned", "distilled -> r18_0.25x_sk0"]
    assert all(0.0 <= row["top1"] <= row["top5"] <= 1.0 for row in rows), rows

    from raytrain_ssl.config import load_config

    assert sorted(p.parent.name for p in root.glob("*/result.json")) == sorted(PIPELINE_STEPS)
    for step in PIPELINE_STEPS:
        run_dir = root / step
        saved = load_config(run_dir / "config.yaml")
        assert (saved.ray.name, saved.ray.storage_path, saved.train.max_steps) == (step, str(root), 2), step
        result = json.loads((run_dir / "result.json").read_text())
        checkpoints = sorted(d for d in run_dir.glob("checkpoint_*") if d.is_dir())  # not checkpoint_manager_*.json
        assert checkpoints and result["checkpoint"] == str(checkpoints[-1]), step
        assert any(checkpoints[-1].iterdir()), step
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), step
    assert json.loads((root / "pretrain" / "result.json").read_text())["metrics"]["step"] == 2


def test_a_bad_config_fails_fast_with_one_line(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    client = ray_head.client()
    started = time.monotonic()
    where = {"pretrain": f"ray.storage_path={shlex.quote(str(tmp_path))} ray.name=bad",
             "pipeline": f"storage_path={shlex.quote(str(tmp_path))} name=bad"}  # fmt: skip
    jobs = {
        override: client.submit_job(
            entrypoint=f"{CLI} {command} {shlex.quote(override)} {where[command.split()[0]]}",
            runtime_env=RUNTIME_ENV,
        )
        for command, override, _ in BAD_OVERRIDES
    }
    for _, override, names in BAD_OVERRIDES:
        job_id = jobs[override]
        status = _wait_terminal(client, job_id, BAD_JOB_TIMEOUT_S - (time.monotonic() - started))
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.FAILED, f"{override}: job {status}:\n{logs[-4000:]}"
        errors = [line for line in logs.splitlines() if line.startswith("raytrain-ssl: error: ")]
        assert len(errors) == 1, f"{override}: expected one error line:\n{logs[-4000:]}"
        assert errors[0].startswith("raytrain-ssl: error: config error: ") and names in errors[0], errors[0]
        assert "Traceback" not in logs, logs[-4000:]
        assert "Started a local Ray instance" not in logs  # stopped before Ray was touched
    assert time.monotonic() - started < BAD_JOB_TIMEOUT_S
    assert not (tmp_path / "bad").exists()
