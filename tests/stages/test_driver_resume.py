"""SIGKILL the driver of `raytrain-ssl pretrain` mid-run, then `raytrain-ssl pretrain --resume RUN_DIR`.

Both commands run as subprocesses with their own embedded local Ray, each in its own session (so that
everything it starts, Ray's GCS, raylet, dashboard, workers and actors, shares the driver's session id and
can be found and killed without touching any other Ray on this machine: never a blanket `ray stop`) and
its own Ray temp dir (`RAY_TMPDIR`: /tmp/ray/session_latest, which other Rays use, is left alone).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raytrain_ssl.checkpointing import checkpoint_problem, load_checkpoint

pytestmark = pytest.mark.ray

CLI = str(Path(sys.executable).parent / "raytrain-ssl")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's registered checkpoints
MAX_STEPS = 30
OVERRIDES = [
    "model.name=r18_0.25x_sk0",
    "data.train=builtin:digits",
    "data.image_size=16",
    "data.decode_batch_size=32",
    "train.global_batch_size=64",
    "train.epochs=3",
    f"train.max_steps={MAX_STEPS}",
    "train.log_every_steps=5",
    "optim.warmup_epochs=0.5",
    "checkpoint.every_n_steps=2",
    "eval.knn_every_epochs=null",
    "eval.view_grid_pairs=0",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
    "ray.max_failures=0",
    "ray.local_num_cpus=4",
    "ray.object_store_memory_mb=300",
]


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid`: a driver started with start_new_session=True and all it started
    (zombies, dead but not yet reaped by their parent, are left out)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == sid and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(proc.name))
            except (OSError, IndexError):
                continue
    return pids


def _kill_session(sid: int, timeout: float = 20.0) -> None:
    """SIGKILL every process of the session until none is left (Ray may start one while we kill)."""
    deadline = time.time() + timeout
    while (pids := _session_pids(sid)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not _session_pids(sid), f"processes of session {sid} survived SIGKILL: {_session_pids(sid)}"


def _start(args: list[str], log: Path, ray_tmp: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never ours
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_TRAIN_ENABLE_PRINT_PATCH="0", RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="60")
    with log.open("wb") as out:
        return subprocess.Popen([CLI, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _registered_checkpoint(run_dir: Path) -> dict | None:
    """The latest checkpoint Ray Train registered for the run, once its checkpoint.pt is complete."""
    try:
        latest = json.loads((run_dir / SNAPSHOT).read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    if latest and checkpoint_problem(run_dir / latest["checkpoint_dir_name"]) is None:
        return latest
    return None


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def test_killed_driver_resumes_from_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "driver-kill"
    overrides = OVERRIDES + [f"ray.storage_path={tmp_path / 'runs'}", "ray.name=driver-kill"]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    started: list[subprocess.Popen] = []
    try:
        first_log = tmp_path / "first.log"
        first = _start(["pretrain", *overrides], first_log, ray_tmp / "a")
        started.append(first)
        deadline, registered = time.time() + 300, None  # about 40 s on an idle 2-core machine
        while time.time() < deadline and first.poll() is None:
            if registered := _registered_checkpoint(run_dir):
                break
            time.sleep(0.2)
        assert first.poll() is None, f"the driver ended before it could be killed:\n{_tail(first_log)}"
        assert registered, f"no checkpoint registered in time:\n{_tail(first_log)}"
        killed_at = registered["metrics"]["step"]
        assert killed_at < MAX_STEPS

        os.killpg(first.pid, signal.SIGKILL)  # the driver, as a crash or an OOM kill would
        _kill_session(first.pid)  # and what the dead driver's Ray left behind: GCS, raylet, workers, actors
        first.wait(timeout=10)
        assert not (run_dir / "result.json").exists()

        second_log = tmp_path / "second.log"
        second = _start(["pretrain", "--resume", str(run_dir)], second_log, ray_tmp / "b")
        started.append(second)
        try:
            rc = second.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the resumed run did not finish in time:\n{_tail(second_log)}")
        assert rc == 0, _tail(second_log)
    finally:
        try:
            for proc in started:
                proc.poll()  # reap a driver that ended
                _kill_session(proc.pid)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)

    state = load_checkpoint(run_dir)
    progress = state["progress"]
    assert progress["global_step"] == MAX_STEPS
    assert progress["resumed_from_steps"], "the second run started from scratch"
    assert progress["resumed_from_steps"][0] >= killed_at > 0, (progress, killed_at)
    assert state["scheduler"]["last_epoch"] == MAX_STEPS
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["step"] == MAX_STEPS
