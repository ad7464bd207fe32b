"""The local shuffle buffer: capped at a quarter of a worker's epoch, never under two batches."""

import numpy as np
import pytest

from raytrain_ssl.stages.worker_env import shuffle_buffer_rows


def test_shuffle_buffer_is_capped_at_a_quarter_epoch_and_floored_at_two_batches():
    assert shuffle_buffer_rows(2048, 128, steps_per_epoch=5) == 256  # digits at 128 per worker: 2 batches
    assert shuffle_buffer_rows(2048, 32, steps_per_epoch=22) == 176  # a quarter of 704 rows
    assert shuffle_buffer_rows(2048, 256, steps_per_epoch=5000) == 2048  # a big epoch: as configured
    assert shuffle_buffer_rows(1024, 1024, steps_per_epoch=5000) == 2048  # never under two batches
    assert shuffle_buffer_rows(0, 64, steps_per_epoch=100) == 0  # off stays off


@pytest.mark.parametrize("batch_size", [32, 100])
def test_every_batch_through_the_shuffle_buffer_is_whole(ray_local, batch_size):
    """Ray's local shuffle with the buffer sizes chosen here gives whole batches only, at any block size."""
    import ray.data

    rows = 3000
    buffer = shuffle_buffer_rows(2048, batch_size, steps_per_epoch=rows // batch_size)
    ds = ray.data.range(rows, override_num_blocks=37).map_batches(lambda b: b, batch_size=17)
    sizes = [len(b["id"]) for b in ds.iter_batches(batch_size=batch_size, local_shuffle_buffer_size=buffer,
                                                     local_shuffle_seed=0, drop_last=True)]  # fmt: skip
    assert set(sizes) == {batch_size} and len(sizes) == rows // batch_size
    # and with a buffer of a single batch, Ray 2.60 does hand out short batches mid-stream (why the floor)
    short = [len(b["id"]) for b in ds.iter_batches(batch_size=batch_size, local_shuffle_buffer_size=batch_size,
                                                     local_shuffle_seed=0, drop_last=True)]  # fmt: skip
    assert np.asarray(short).min() < batch_size, "Ray no longer shortens batches: the floor may go"
