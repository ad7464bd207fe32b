"""How Ray Train hands each dataset to its workers."""

from __future__ import annotations

import logging

import ray.train

log = logging.getLogger(__name__)

# Evaluation streams: every row must be scored exactly once.
EVAL_DATASETS = frozenset({"val", "knn_bank", "knn_query"})


class StageDataConfig(ray.train.DataConfig):
    """Ray Train's DataConfig with two changes, both applied when a worker group first asks for its shards
    (Ray Train V2 configures datasets lazily, after the workers have loaded their checkpoint):

    - Evaluation streams are split with `equal=False`. The default `equal=True` gives every worker the
      same number of rows, which DDP training needs (equal step counts) but which drops up to
      world_size-1 rows: accuracy must count every validation image.
    - Training streams can be replayed. Each epoch is one execution of the training dataset, and Ray Data
      seeds its per-epoch file shuffle from the execution index, which restarts at 0 whenever a worker
      group (after a worker failure) or a driver (`--resume`) starts again. With `run_dir` given, the
      index starts at the epoch of the run's newest checkpoint instead, and with `ordered`, the rows reach
      the workers in a deterministic order (Ray Data's preserve_order; the split then ignores locality).
      Together they make the resumed epoch the same stream, row for row and worker for worker, as the
      interrupted one, so the train loop can skip exactly the batches it had already trained on.

    A single worker gets the dataset's own iterator rather than a 1-way streaming split: the split adds a
    coordinator actor per stream (a process, and one more hop for every block) that has nothing to
    coordinate. The worker then runs the stream's execution itself; what it receives is the same."""

    def __init__(self, run_dir: str | None = None, ordered: bool = True):
        super().__init__()
        self._run_dir = run_dir
        self._ordered = ordered

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        start_epoch = _resume_epoch(self._run_dir)
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            training = name not in EVAL_DATASETS
            ds = ds.copy(ds)
            options = self._resolve_execution_options(name)
            if training:
                options.preserve_order = options.preserve_order or self._ordered
                ds.context._execution_idx = start_epoch  # no public setter: the seed of this epoch's shuffle
            ds.context.execution_options = options
            for rank, split in enumerate(_split(ds, world_size, training, self._locality(worker_node_ids))):
                output[rank][name] = split
        return output

    def _locality(self, worker_node_ids):
        return worker_node_ids if self._enable_shard_locality else None


def _split(ds, world_size: int, equal: bool, hints):
    if world_size == 1:
        return [ds.iterator()]
    return ds.streaming_split(world_size, equal=equal, locality_hints=hints)


def _resume_epoch(run_dir: str | None) -> int:
    """The epoch in progress at the run's newest complete checkpoint (0 for a fresh run)."""
    from raytrain_ssl.checkpointing import checkpoint_epoch

    if run_dir is None:
        return 0
    try:
        return checkpoint_epoch(run_dir)
    except (FileNotFoundError, OSError, ValueError) as exc:
        log.warning("training streams start at epoch 0's shuffle: %s", exc)
        return 0
