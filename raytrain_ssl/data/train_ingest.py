"""How Ray Train hands each dataset to its workers."""

from __future__ import annotations

import ray.train

# Evaluation streams: every row must be scored exactly once.
EVAL_DATASETS = frozenset({"val", "knn_bank", "knn_query"})


class ExactEvalDataConfig(ray.train.DataConfig):
    """Ray Train's DataConfig splits every dataset with `equal=True`: the same number of rows per worker,
    which DDP training needs (equal step counts) but which drops up to world_size-1 rows. Evaluation
    streams are split with `equal=False` instead, so accuracy counts every validation image."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        training = {name: ds for name, ds in datasets.items() if name not in EVAL_DATASETS}
        output = super().configure(training, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in datasets.items():
            if name not in EVAL_DATASETS:
                continue
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output
