"""StageDataConfig, the way Ray Train hands each stream to its workers, on the test run's real Ray (no
Train run: `configure` is called as Train calls it, and the iterators are consumed here)."""

from __future__ import annotations

import threading

import pytest
import torch

from raytrain_ssl.checkpointing import save_checkpoint
from raytrain_ssl.data.builtin import materialize_builtin
from raytrain_ssl.data.stream import count_rows, read_shards
from raytrain_ssl.data.train_ingest import StageDataConfig

pytestmark = pytest.mark.ray


def _ids(iterator) -> list[str]:
    return [i for batch in iterator.iter_batches(batch_size=64, batch_format="numpy") for i in batch["id"].tolist()]


def _shards(tmp_path):
    """The digits shards (4 files): a per-epoch file shuffle has orders to tell apart."""
    return str(materialize_builtin("builtin:digits", tmp_path / "data")["train"])


def test_one_worker_gets_the_dataset_itself_and_every_row_each_epoch(ray_local, tmp_path):
    from ray.data.iterator import DataIterator

    path = _shards(tmp_path)
    splits = StageDataConfig().configure({"train": read_shards(path, ["id"], 0), "val": read_shards(path, ["id"], None)},
                                         1, None, None)  # fmt: skip
    train, val = splits[0]["train"], splits[0]["val"]
    assert isinstance(train, DataIterator) and "StreamSplit" not in type(train).__name__  # no coordinator actor
    first, second = _ids(train), _ids(train)
    assert sorted(first) == sorted(second) and len(set(first)) == len(first) == count_rows(path)
    assert first != second  # the files are shuffled again for the next epoch
    assert len(_ids(val)) == count_rows(path)


def test_one_worker_resumed_at_epoch_e_replays_the_order_of_epoch_e(ray_local, tmp_path):
    path = _shards(tmp_path)
    fresh = StageDataConfig(str(tmp_path / "fresh")).configure({"train": read_shards(path, ["id"], 7)}, 1, None, None)
    orders = [_ids(fresh[0]["train"]) for _ in range(3)]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    save_checkpoint({"w": torch.ones(1), "progress": {"epoch": 2, "step_in_epoch": 3}},
                    run_dir / "checkpoint_2026-01-01_00-00-00.000000")  # fmt: skip
    resumed = StageDataConfig(str(run_dir)).configure({"train": read_shards(path, ["id"], 7)}, 1, None, None)
    assert _ids(resumed[0]["train"]) == orders[2] != orders[0]


def test_two_workers_split_training_equally_and_evaluation_whole(ray_local):
    import ray

    rows = [{"id": str(i)} for i in range(101)]  # no function of this module: Ray workers cannot import it
    datasets = {"train": ray.data.from_items(rows), "val": ray.data.from_items(rows)}
    splits = StageDataConfig(ordered=False).configure(datasets, 2, None, None)
    seen = {}

    def consume(rank, name):
        seen[rank, name] = _ids(splits[rank][name])

    for name in ("train", "val"):  # the two halves of a split are consumed together, as two workers would
        threads = [threading.Thread(target=consume, args=(rank, name)) for rank in (0, 1)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
    assert len(seen[0, "train"]) == len(seen[1, "train"]) == 50  # equal steps for DDP (one row dropped)
    assert sorted(seen[0, "val"] + seen[1, "val"]) == sorted(str(i) for i in range(101))  # every row once
