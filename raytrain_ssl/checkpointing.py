"""Checkpoints: written through `ray.train.report` from the workers, read back for resume and downstream.

A checkpoint directory holds one `checkpoint.pt` (a dict of state dicts, counters and the config). Ray Train
copies it to `<storage_path>/<run name>/checkpoint_<timestamp>/` and keeps the newest `num_to_keep`.

Safety, in both directions:
- Saving: the file is written under a temporary name and renamed, and its pickle is checked to hold only
  what weights-only loading accepts (tensors, dicts, lists, tuples, str, int, float, bool, None), so a
  checkpoint that could not be loaded back is refused when it is made, not when a resume needs it.
- Copying: Ray Train registers a checkpoint (the one a restarted worker group gets) only once its upload to
  `<run_dir>/checkpoint_*` has finished, but a crash mid-copy can leave a partial directory on disk. Readers
  that scan a run directory (`latest_checkpoint_dir`, `load_checkpoint`) skip a directory whose
  `checkpoint.pt` is missing, empty or truncated, with a warning naming it, and take the previous one.
- Loading: always `torch.load(..., weights_only=True)`. A file holding any other pickled object (which could
  run code when unpickled) is refused with a one-line `CheckpointError`; nothing in it is executed.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

from raytrain_ssl.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_FILE = "progress.json"  # the counters of `state["progress"]`, readable without loading the weights


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded (truncated, corrupt) or must not be (it holds pickled code).

    A `ConfigError`, so the command line prints it as one line: the checkpoint is an input of the run."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holding pickled objects weights-only loading refuses (they could run code)."""


# ------------------------------------------------------------------------------------------------- save


def save_checkpoint(state: dict, directory: str | Path) -> Path:
    """Write `state` to `<directory>/checkpoint.pt` atomically: under a temporary name, then renamed.

    An exception while writing removes the temporary file; a killed process may leave it, but no reader
    looks at it. Either way an existing `checkpoint.pt` is untouched and no truncated one appears.
    Refuses (CheckpointError) a state that weights-only loading could not read back."""
    import torch  # torch only where a file is written or read: the Ray Train controller's data config reads
    # checkpoint_epoch without loading torch (see data/augment.py for why that matters)

    directory = Path(directory)
    final, partial = directory / CHECKPOINT_FILE, directory / (CHECKPOINT_FILE + ".partial")
    try:
        torch.save(state, partial)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(partial)
        if unsafe:
            raise CheckpointError(
                f"checkpoint error: the state to save holds {', '.join(sorted(unsafe))} at "
                f"{', '.join(_unsafe_paths(state)) or 'an unknown key'}; checkpoints may hold only tensors, dicts, "
                "lists, tuples, str, int, float, bool and None (they are loaded with weights_only=True)"
            )
        if isinstance(state.get("progress"), dict):
            progress = directory / (PROGRESS_FILE + ".partial")
            progress.write_text(json.dumps(state["progress"]))
            progress.replace(directory / PROGRESS_FILE)
        partial.replace(final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def _unsafe_paths(value, path: str = "state", limit: int = 3) -> list[str]:
    """Where in `value` the first `limit` objects other than safe leaves and containers are."""
    import torch

    safe_leaves = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
    if isinstance(value, safe_leaves):
        return []
    if isinstance(value, dict):
        children = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return [f"{path} ({type(value).__module__}.{type(value).__qualname__})"]
    found: list[str] = []
    for child_path, child in children:
        found += _unsafe_paths(child, child_path, limit - len(found))
        if len(found) >= limit:
            break
    return found


def report(metrics: dict, state: dict | None) -> None:
    """Report metrics from every worker; `state` (rank 0's) is saved as a checkpoint when given.

    Every worker must call this the same number of times: it is a barrier in Ray Train."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="raytrain_ssl_ckpt_"))
    try:
        save_checkpoint(state, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- load


def checkpoint_problem(checkpoint_dir: str | Path) -> str | None:
    """Why `<checkpoint_dir>/checkpoint.pt` cannot be a complete checkpoint, or None if it looks whole.

    Cheap (reads the zip directory at the end of the file, not the tensors): a file cut short by a crash
    mid-write or mid-copy has lost that directory."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return f"no {CHECKPOINT_FILE}"
    size = path.stat().st_size
    if size == 0:
        return f"{CHECKPOINT_FILE} is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            end = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{CHECKPOINT_FILE} is truncated or not a torch checkpoint ({exc}, {size} bytes)"
    if not any(name.endswith("data.pkl") for name in names) or end > size:
        return f"{CHECKPOINT_FILE} is truncated or not a torch checkpoint ({size} bytes)"
    return None


def _candidates(run_dir: Path, before: str | None = None) -> list[Path]:
    """The run's `checkpoint_*` directories, newest first (Ray Train names them by timestamp)."""
    dirs = sorted((d for d in run_dir.glob("checkpoint_*") if d.is_dir()), reverse=True)
    return [d for d in dirs if before is None or d.name < before]


def latest_checkpoint_dir(run_dir: str | Path, before: str | None = None) -> Path:
    """The newest complete `checkpoint_*` directory of a run (or `run_dir` itself if it is a checkpoint).

    Incomplete ones (missing, empty or truncated `checkpoint.pt`) are skipped with a warning naming them.
    `before`: only directories whose name sorts before it (older checkpoints)."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_FILE).exists():
        problem = checkpoint_problem(run_dir)
        if problem:
            raise CheckpointError(f"checkpoint error: {run_dir}: {problem}")
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    skipped = []
    for directory in _candidates(run_dir, before):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        log.warning("skipping incomplete checkpoint %s: %s", directory, problem)
        skipped.append(directory.name)
    detail = f" (skipped incomplete: {', '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(f"no checkpoint_*/{CHECKPOINT_FILE} under {run_dir}{detail}")


def checkpoint_epoch(run_dir: str | Path) -> int:
    """The epoch in progress (`progress.epoch`) at the run's newest complete checkpoint; 0 without one.

    Read from the small progress file, not the weights: the Ray Train controller asks this when a worker
    group starts (see data/train_ingest.py)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not _candidates(run_dir):
        return 0
    progress = json.loads((latest_checkpoint_dir(run_dir) / PROGRESS_FILE).read_text())
    return int(progress["epoch"])


def load_file(path: str | Path) -> dict:
    """`torch.load(path, weights_only=True)` on the CPU, with one-line errors.

    Raises `UnsafeCheckpointError` ("refusing to load") when the file holds pickled objects other than
    tensors and plain containers (nothing of it is run); `CheckpointError` ("cannot read") when it is
    truncated or corrupt."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads the pickle, runs nothing
        except Exception:  # noqa: BLE001 - an unreadable file: reported as such below
            unsafe = []
        if unsafe:
            raise UnsafeCheckpointError(
                f"checkpoint error: refusing to load {path}: it holds pickled Python objects "
                f"({', '.join(sorted(unsafe))}), not only tensors and plain values; checkpoints are loaded "
                "weights-only and nothing in this file was run"
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint error: cannot read {path}: {first_line}") from exc


def load_checkpoint(run_or_checkpoint_dir: str | Path) -> dict:
    """The state of a checkpoint directory, or of the newest readable checkpoint of a run directory.

    In a run directory, a checkpoint that passes the quick check but still cannot be read (corrupt data) is
    skipped with a warning for the one before it; a file holding pickled code stops everything."""
    given = Path(run_or_checkpoint_dir)
    directory = latest_checkpoint_dir(given)
    while True:
        try:
            return load_file(directory / CHECKPOINT_FILE)
        except CheckpointError as exc:
            if directory == given or isinstance(exc, UnsafeCheckpointError):
                raise
            log.warning("skipping unreadable checkpoint %s: %s", directory, exc)
            directory = latest_checkpoint_dir(given, before=directory.name)


def load_latest_in_worker() -> dict | None:
    """The checkpoint Ray Train hands a (re)started worker group, or None on a fresh start.

    Should that file be unreadable, the newest readable older checkpoint of the same run directory is used
    instead (with a warning); a file holding pickled code is refused."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        try:
            return load_file(directory / CHECKPOINT_FILE)
        except CheckpointError as exc:
            if isinstance(exc, UnsafeCheckpointError):
                raise
            try:
                older = latest_checkpoint_dir(directory.parent, before=directory.name)
            except (FileNotFoundError, CheckpointError):
                raise exc from None
            log.warning("checkpoint %s is unreadable (%s); resuming from %s instead", directory, exc, older)
            return load_file(older / CHECKPOINT_FILE)
